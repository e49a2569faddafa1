"""Separator evaluation on mixture/target pairs: conditions, batched separation, per-pair scores,
the ideal-ratio-mask ceiling, and the class average the paper reports.

The protocol follows the reference's AudioSet evaluation: each pair is a mixture and the target
source of one class; the model is conditioned on that class (the query net of the target source
itself, or the one-hot class for a ``hard`` model); SDR and SI-SDR of the estimate, minus those of
the unprocessed mixture (the zero line), give SDRi and SI-SDRi; per class the median over its pairs
(the reference's ``nanmedian``), then the mean over classes.

Plain library: numpy and torch only, so training (validation) and the evaluation job share it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from uss_core.checkpoints import SeparatorModel
from uss_core.errors import ConfigError
from uss_core.metrics import sdr, sdri, si_sdr, si_sdri
from uss_core.models.frontend import InverseStft, Stft
from uss_core.separation import precision_autocast, resolve_precision


@contextlib.contextmanager
def _inference(model: SeparatorModel) -> Iterator[None]:
    """Eval mode and no autograd for the body; every submodule's training flag restored after
    (training calls these functions mid-epoch, and a frozen tagger stays in eval mode)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for module, training in flags:
            module.training = training


def _model_device(model: SeparatorModel) -> torch.device:
    return next(model.parameters()).device


def _as_rows(values: np.ndarray | None, count: int | None, width: int, what: str) -> np.ndarray | None:
    """``values`` as a float32 ``(count, width)`` array, or a ConfigError naming ``what``."""
    if values is None:
        return None
    rows = np.asarray(values, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != width or (count is not None and rows.shape[0] != count):
        expected = f"({count if count is not None else 'pairs'}, {width})"
        raise ConfigError(f"{what} has shape {rows.shape}, the model expects {expected}")
    return rows


def pair_conditions(
    model: SeparatorModel,
    class_indexes: np.ndarray | None = None,
    at_soft: np.ndarray | None = None,
    embedding: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    batch_size: int = 8,
) -> np.ndarray:
    """The condition of each pair's target, as the model's query net makes it.

    - ``hard``: the one-hot vector of ``class_indexes``;
    - ``at_soft`` / ``embedding``: the given precomputed bottleneck (the mixtures dataset's
      ``condition_at_soft`` / ``condition_embedding`` rows), else ``query_net.bottleneck`` of the
      ``targets`` audio (the reference's AudioSet evaluation conditions on the query net of the
      target source itself);
    - ``adaptive``: ``query_net.adapt`` of that bottleneck.

    Args:
        model: the separation model (its query net runs on the device its parameters are on).
        class_indexes: ``(pairs,)`` target class per pair (needed for ``hard``).
        at_soft: ``(pairs, classes)`` precomputed tagging probabilities of each target.
        embedding: ``(pairs, embedding_size)`` precomputed Cnn14 embeddings of each target.
        targets: ``(pairs, samples)`` target audio, for conditions not given precomputed.
        batch_size: targets per query-net forward.
    Returns:
        ``(pairs, condition_size)`` float32.
    Raises:
        ConfigError: what the model's condition type needs is missing or has the wrong shape.
    """
    qcfg = model.config.query_net
    if qcfg.condition_type == "hard":
        if class_indexes is None:
            raise ConfigError("a 'hard' model is conditioned on class indexes: give class_indexes")
        indexes = np.asarray(class_indexes, dtype=np.int64).reshape(-1)
        if len(indexes) and (indexes.min() < 0 or indexes.max() >= qcfg.condition_size):
            raise ConfigError(f"class indexes must lie in [0, {qcfg.condition_size}) for this model")
        return np.eye(qcfg.condition_size, dtype=np.float32)[indexes]

    precomputed = {"at_soft": at_soft, "embedding": embedding}[qcfg.bottleneck_type]
    bottleneck = _as_rows(precomputed, None, qcfg.bottleneck_size, f"precomputed {qcfg.bottleneck_type} conditions")
    if bottleneck is None and targets is None:
        raise ConfigError(
            f"a '{qcfg.condition_type}' model needs each target's {qcfg.bottleneck_type} condition: give the "
            f"precomputed {qcfg.bottleneck_type} rows or the target audio"
        )
    device = _model_device(model)
    conditions = []
    with _inference(model):
        if bottleneck is not None:
            chunks = (
                torch.from_numpy(bottleneck[lo : lo + batch_size]).to(device)
                for lo in range(0, len(bottleneck), batch_size)
            )
        else:
            audio = np.asarray(targets, dtype=np.float32)
            if audio.ndim != 2:
                raise ConfigError(f"targets must be (pairs, samples), got shape {audio.shape}")
            chunks = (
                model.query_net.bottleneck(torch.from_numpy(audio[lo : lo + batch_size]).to(device))
                for lo in range(0, len(audio), batch_size)
            )
        for chunk in chunks:
            conditions.append(model.query_net.adapt(chunk).float().cpu().numpy())
    if not conditions:
        return np.zeros((0, qcfg.condition_size), dtype=np.float32)
    return np.concatenate(conditions)


def separate_pairs(
    model: SeparatorModel,
    mixtures: np.ndarray,
    conditions: np.ndarray,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> np.ndarray:
    """Separate each mixture with its condition, in batches, in eval mode without autograd, the
    U-Net in ``precision`` (:func:`uss_core.separation.resolve_precision`).

    The model's training mode (every submodule's) is restored afterwards, so training can call this
    for validation. The model must already be on ``device``.

    Args:
        mixtures: ``(pairs, samples)``.
        conditions: ``(pairs, condition_size)``, e.g. from :func:`pair_conditions`.
    Returns:
        ``(pairs, samples)`` float32 estimates.
    """
    mixtures = np.asarray(mixtures, dtype=np.float32)
    if mixtures.ndim != 2:
        raise ConfigError(f"mixtures must be (pairs, samples), got shape {mixtures.shape}")
    conditions = _as_rows(conditions, len(mixtures), model.config.query_net.condition_size, "conditions")
    device = torch.device(device)
    if _model_device(model).type != device.type:
        raise ConfigError(f"the model is on {_model_device(model)}, not on the requested device {device}")
    autocast = precision_autocast(resolve_precision(precision, device), device)
    estimates = np.empty_like(mixtures)
    with _inference(model), autocast:
        for lo in range(0, len(mixtures), batch_size):
            hi = lo + batch_size
            mixture = torch.from_numpy(mixtures[lo:hi]).to(device).unsqueeze(1)
            condition = torch.from_numpy(conditions[lo:hi]).to(device)
            estimates[lo:hi] = model.ss_model(mixture, condition)[:, 0].float().cpu().numpy()
    return estimates


def pair_scores(estimates: np.ndarray, targets: np.ndarray, mixtures: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pair scores in dB, each ``(pairs,)`` float64.

    Keys: ``sdr``, ``sdri``, ``si_sdr``, ``si_sdri`` of the estimates, and ``mixture_sdr`` (the SDR
    of the unprocessed mixture, the zero line of SDRi). SDR as the paper defines it
    (:func:`uss_core.metrics.sdr`), SI-SDR as Le Roux et al.

    Args:
        estimates, targets, mixtures: ``(pairs, samples)``.
    """
    return {
        "sdr": sdr(targets, estimates),
        "sdri": sdri(targets, estimates, mixtures),
        "si_sdr": si_sdr(targets, estimates),
        "si_sdri": si_sdri(targets, estimates, mixtures),
        "mixture_sdr": sdr(targets, mixtures),
    }


def ideal_ratio_mask(mixture: np.ndarray, target: np.ndarray, n_fft: int = 2048, hop_length: int = 320) -> np.ndarray:
    """The ideal-ratio-mask oracle estimate of ``target`` from ``mixture``: the ceiling a
    magnitude-masking separator could reach on this pair.

    The magnitude IRM ``M = |S| / (|S| + |N|)`` with ``S`` the target's STFT and ``N`` the STFT of
    the rest, ``mixture - target``; ``M`` times the mixture STFT (mixture phase), inverse STFT.
    Same STFT as the separator (centred, periodic Hann, ``n_fft`` 2048, hop 320 by default).

    Args:
        mixture, target: ``(samples,)`` or ``(pairs, samples)``.
    Returns:
        the estimate, same shape as ``mixture``, float32.
    """
    mixture = np.asarray(mixture, dtype=np.float32)
    target = np.asarray(target, dtype=np.float32)
    if mixture.shape != target.shape or mixture.ndim not in (1, 2):
        raise ValueError(
            f"mixture {mixture.shape} and target {target.shape} must both be (samples,) or (pairs, samples)"
        )
    length = mixture.shape[-1]
    stft, istft = Stft(n_fft, hop_length), InverseStft(n_fft, hop_length)
    with torch.inference_mode():
        waves = torch.from_numpy(np.stack([mixture, target, mixture - target]).reshape(3, -1, length))
        real, imag = stft(waves.reshape(-1, length))
        magnitude = torch.sqrt(real**2 + imag**2).reshape(3, waves.shape[1], *real.shape[1:])
        # Where both magnitudes are zero the mixture bin is zero too, so any mask value will do.
        mask = magnitude[1] / (magnitude[1] + magnitude[2]).clamp_min(1e-12)
        mixture_real = real.reshape(3, *mask.shape)[0]
        mixture_imag = imag.reshape(3, *mask.shape)[0]
        estimate = istft(mask * mixture_real, mask * mixture_imag, length)
    return estimate.numpy().reshape(mixture.shape)


def class_average(values: np.ndarray, class_indexes: np.ndarray) -> tuple[dict[int, float], float]:
    """Per-class median of per-pair ``values`` (NaNs ignored, as the reference's ``nanmedian``) and
    their mean over classes (the class-averaged figure the paper reports).

    Args:
        values: ``(pairs,)`` scores, e.g. SDRi.
        class_indexes: ``(pairs,)`` class of each pair.
    Returns:
        ``({class_index: median}, mean over classes)``, classes in ascending order; a class whose
        values are all NaN has a NaN median and is left out of the mean (NaN if no class is left).
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    class_indexes = np.asarray(class_indexes, dtype=np.int64).reshape(-1)
    if values.shape != class_indexes.shape:
        raise ValueError(f"values {values.shape} and class_indexes {class_indexes.shape} need one entry per pair")
    medians: dict[int, float] = {}
    for index in np.unique(class_indexes):
        in_class = values[class_indexes == index]
        in_class = in_class[~np.isnan(in_class)]
        medians[int(index)] = float(np.median(in_class)) if len(in_class) else float("nan")
    finite = [m for m in medians.values() if not np.isnan(m)]
    return medians, float(np.mean(finite)) if finite else float("nan")
