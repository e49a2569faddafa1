"""Separation metrics (numpy, float64).

Every function takes ``(samples,)`` arrays or batches ``(..., samples)`` (leading axes
broadcast), reduces over the last axis, and returns a float for 1-D input or an array ``(...)``.
Results are in dB.
"""

from __future__ import annotations

import numpy as np

# Loizou's comp_snr adds MATLAB's eps inside and outside the log; keep it for identical numbers.
_SSNR_EPS = np.finfo(np.float64).eps


def _as_pair(reference: np.ndarray, estimate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reference = np.asarray(reference, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    if reference.ndim == 0 or estimate.ndim == 0 or reference.shape[-1] != estimate.shape[-1]:
        raise ValueError(
            f"reference {reference.shape} and estimate {estimate.shape} need the same number of samples (last axis)"
        )
    return reference, estimate


def _ratio_db(signal_power: np.ndarray, noise_power: np.ndarray, eps: float) -> np.ndarray:
    return 10.0 * np.log10(np.maximum(signal_power, eps) / np.maximum(noise_power, eps))


def sdr(reference: np.ndarray, estimate: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """Signal-to-distortion ratio as in the paper and the reference's ``calculate_sdr``:
    ``10 log10(max(mean(ref^2), eps) / max(mean((est - ref)^2), eps))``.

    Args:
        reference, estimate: ``(..., samples)``.
    Returns:
        ``(...)`` SDR in dB.
    """
    reference, estimate = _as_pair(reference, estimate)
    return _ratio_db(np.mean(reference**2, axis=-1), np.mean((estimate - reference) ** 2, axis=-1), eps)


def si_sdr(reference: np.ndarray, estimate: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """Scale-invariant SDR (Le Roux et al., "SDR - half-baked or well done?", ICASSP 2019).

    Both signals are made zero-mean (as the paper assumes); the target is the reference scaled by
    ``alpha = <est, ref> / <ref, ref>``, and the result is ``10 log10(|target|^2 / |est - target|^2)``,
    with powers floored at ``eps`` as in :func:`sdr`. Unchanged when either signal is scaled.

    Args:
        reference, estimate: ``(..., samples)``.
    Returns:
        ``(...)`` SI-SDR in dB.
    """
    reference, estimate = _as_pair(reference, estimate)
    reference = reference - reference.mean(axis=-1, keepdims=True)
    estimate = estimate - estimate.mean(axis=-1, keepdims=True)
    reference_power = np.mean(reference**2, axis=-1, keepdims=True)
    alpha = np.mean(estimate * reference, axis=-1, keepdims=True) / np.maximum(reference_power, eps)
    target = alpha * reference
    return _ratio_db(np.mean(target**2, axis=-1), np.mean((estimate - target) ** 2, axis=-1), eps)


def sdri(reference: np.ndarray, estimate: np.ndarray, mixture: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """SDR improvement ``sdr(reference, estimate) - sdr(reference, mixture)``: ``(...)`` dB."""
    return sdr(reference, estimate, eps) - sdr(reference, mixture, eps)


def si_sdri(reference: np.ndarray, estimate: np.ndarray, mixture: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """SI-SDR improvement ``si_sdr(reference, estimate) - si_sdr(reference, mixture)``: ``(...)`` dB."""
    return si_sdr(reference, estimate, eps) - si_sdr(reference, mixture, eps)


def segmental_snr(
    reference: np.ndarray,
    estimate: np.ndarray,
    sample_rate: int,
    frame_seconds: float = 0.03,
    hop_seconds: float | None = None,
    min_db: float = -10.0,
    max_db: float = 35.0,
) -> np.ndarray:
    """Segmental SNR as used for Voicebank-DEMAND (Loizou's ``comp_snr``, the SSNR of the
    composite measures): Hann-windowed frames of ``round(frame_seconds * sample_rate)`` samples
    (30 ms by default) every ``hop_seconds`` (default: a quarter frame, i.e. 75 % overlap);
    per frame ``10 log10(|ref|^2 / (|ref - est|^2 + eps) + eps)`` clamped to
    ``[min_db, max_db]``; the mean over frames. As comp_snr, there are
    ``floor((samples - frame) / hop)`` frames (its count leaves out the last full frame).

    Args:
        reference, estimate: ``(..., samples)``, at least one frame plus one hop long.
    Returns:
        ``(...)`` segmental SNR in dB.
    """
    reference, estimate = _as_pair(reference, estimate)
    frame = int(np.floor(frame_seconds * sample_rate + 0.5))  # MATLAB round
    hop = int(np.floor(hop_seconds * sample_rate + 0.5)) if hop_seconds is not None else frame // 4
    num_samples = reference.shape[-1]
    if frame < 1 or hop < 1:
        raise ValueError(f"frame ({frame}) and hop ({hop}) must be at least one sample")
    num_frames = (num_samples - frame) // hop
    if num_frames < 1:
        raise ValueError(f"{num_samples} samples is too short for segmental SNR with {frame}-sample frames")
    # MATLAB's hanning(frame): the periodic ends (zeros) are left out.
    window = 0.5 * (1 - np.cos(2 * np.pi * np.arange(1, frame + 1) / (frame + 1)))

    def framed(x: np.ndarray) -> np.ndarray:
        windows = np.lib.stride_tricks.sliding_window_view(x, frame, axis=-1)
        return windows[..., : num_frames * hop : hop, :] * window

    reference_frames = framed(reference)
    noise_frames = reference_frames - framed(estimate)
    signal_energy = np.sum(reference_frames**2, axis=-1)
    noise_energy = np.sum(noise_frames**2, axis=-1)
    frame_snr = 10 * np.log10(signal_energy / (noise_energy + _SSNR_EPS) + _SSNR_EPS)
    return np.clip(frame_snr, min_db, max_db).mean(axis=-1)
