"""Spectral front ends: STFT / inverse STFT and the log-mel filter bank.

The reference (torchlibrosa) computes the STFT as a 1-D convolution with a stored DFT matrix and
keeps those matrices in every checkpoint. They are constants, so here the transforms run on
``torch.stft`` / ``torch.istft`` (an FFT: same numbers, a fraction of the work) and the matrices
are not part of our state dicts. :func:`reference_frontend_constants` regenerates them, for
writing checkpoints the reference code can load; ``uss_core.checkpoints`` drops them on import
after checking they are the standard matrices.

The mel matrix is different: PANNs checkpoints store it and it is small, so it stays a buffer
under the reference's name (``logmel_extractor.melW``) and is loaded, not recomputed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


def hann_window(length: int) -> torch.Tensor:
    """Periodic Hann window, as librosa's ``get_window('hann', fftbins=True)``."""
    return torch.hann_window(length, periodic=True, dtype=torch.float32)


class Stft(nn.Module):
    """Centred STFT with reflect padding and a periodic Hann window.

    ``forward(waveform (batch, samples)) -> (real, imag)``, each ``(batch, 1, frames, n_fft//2+1)``,
    the layout torchlibrosa uses.
    """

    def __init__(self, n_fft: int, hop_length: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.register_buffer("window", hann_window(n_fft), persistent=False)

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = torch.stft(
            waveform,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=self.window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )  # (batch, freq, frames)
        spec = spec.transpose(1, 2).unsqueeze(1)
        return spec.real, spec.imag


class InverseStft(nn.Module):
    """Inverse of :class:`Stft` (window-sum-square normalised overlap-add).

    ``forward(real, imag, length)`` with ``real, imag: (batch, 1, frames, n_fft//2+1)`` returns
    ``(batch, length)``.
    """

    def __init__(self, n_fft: int, hop_length: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.register_buffer("window", hann_window(n_fft), persistent=False)

    def forward(self, real: torch.Tensor, imag: torch.Tensor, length: int) -> torch.Tensor:
        spec = torch.complex(real[:, 0], imag[:, 0]).transpose(1, 2)  # (batch, freq, frames)
        return torch.istft(
            spec,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            window=self.window,
            center=True,
            length=length,
        )


def _hz_to_mel(freqs: np.ndarray) -> np.ndarray:
    """Slaney mel scale (linear below 1 kHz, logarithmic above), as librosa's default."""
    freqs = np.asanyarray(freqs, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = freqs / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_region = freqs >= min_log_hz
    mels = np.where(log_region, min_log_mel + np.log(np.maximum(freqs, 1e-12) / min_log_hz) / logstep, mels)
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asanyarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_region = mels >= min_log_mel
    return np.where(log_region, min_log_hz * np.exp(logstep * (mels - min_log_mel)), freqs)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Slaney-normalised triangular mel filters, ``(n_fft//2+1, n_mels)`` (librosa.filters.mel, transposed)."""
    fft_freqs = np.linspace(0, sample_rate / 2, 1 + n_fft // 2)
    mel_freqs = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_freqs)
    ramps = mel_freqs[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2 : n_mels + 2] - mel_freqs[:n_mels]))[:, None]
    return weights.T.astype(np.float32)


class PowerSpectrogram(nn.Module):
    """``forward(waveform (batch, samples)) -> |STFT|^2 (batch, 1, frames, n_fft//2+1)``."""

    def __init__(self, n_fft: int, hop_length: int) -> None:
        super().__init__()
        self.stft = Stft(n_fft, hop_length)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        real, imag = self.stft(waveform)
        return real**2 + imag**2


class LogMelFilterBank(nn.Module):
    """Power spectrogram -> mel -> dB (``10 log10(max(x, 1e-10))``, no top-dB clipping), as PANNs.

    ``forward(power (..., n_fft//2+1)) -> (..., mel_bins)``.
    """

    def __init__(self, sample_rate: int, n_fft: int, mel_bins: int, fmin: float, fmax: float) -> None:
        super().__init__()
        self.register_buffer("melW", torch.from_numpy(mel_filterbank(sample_rate, n_fft, mel_bins, fmin, fmax)))

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        return 10.0 * torch.log10(torch.clamp(torch.matmul(power, self.melW), min=1e-10))


def reference_frontend_constants(prefix: str, kind: str, n_fft: int) -> dict[str, torch.Tensor]:
    """The constant tensors torchlibrosa keeps in a state dict, keyed as the reference names them.

    Args:
        prefix: module path of the transform, e.g. ``"base.stft"`` or ``"spectrogram_extractor.stft"``.
        kind: ``"stft"`` or ``"istft"``.
        n_fft: FFT size.
    """
    window = hann_window(n_fft).double().numpy()
    n = np.arange(n_fft)
    if kind == "stft":
        bins = n_fft // 2 + 1
        angle = -2 * np.pi * np.outer(n, np.arange(bins)) / n_fft  # (n_fft, bins)
        real = (np.cos(angle) * window[:, None]).T[:, None, :]
        imag = (np.sin(angle) * window[:, None]).T[:, None, :]
        return {
            f"{prefix}.conv_real.weight": torch.tensor(real, dtype=torch.float32),
            f"{prefix}.conv_imag.weight": torch.tensor(imag, dtype=torch.float32),
        }
    if kind == "istft":
        angle = 2 * np.pi * np.outer(n, n) / n_fft
        real = (np.cos(angle) / n_fft * window[None, :]).T[:, :, None]
        imag = (np.sin(angle) / n_fft * window[None, :]).T[:, :, None]
        return {
            f"{prefix}.conv_real.weight": torch.tensor(real, dtype=torch.float32),
            f"{prefix}.conv_imag.weight": torch.tensor(imag, dtype=torch.float32),
            f"{prefix}.ola_window": torch.tensor(window**2, dtype=torch.float32),
        }
    raise ValueError(f"kind must be 'stft' or 'istft', got {kind!r}")
