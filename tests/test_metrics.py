"""Separation metrics with known answers."""

import math

import numpy as np
import pytest

from uss_core.metrics import sdr, sdri, segmental_snr, si_sdr, si_sdri

RNG = np.random.default_rng(0)


def signal(n: int = 16000, *batch: int) -> np.ndarray:
    return RNG.standard_normal((*batch, n))


def at_snr(reference: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``reference`` plus ``noise`` scaled so that mean power ratio is exactly ``snr_db``."""
    power_ratio = np.mean(reference**2, -1, keepdims=True) / np.mean(noise**2, -1, keepdims=True)
    scale = np.sqrt(power_ratio / 10 ** (snr_db / 10))
    return reference + scale * noise


def test_sdr_of_known_snr():
    reference = signal()
    for snr_db in (-5.0, 0.0, 10.0, 30.0):
        assert sdr(reference, at_snr(reference, signal(), snr_db)) == pytest.approx(snr_db, abs=0.01)


def test_sdr_is_the_reference_formula():
    reference, estimate = signal(1000).astype(np.float32), signal(1000).astype(np.float32)
    # uss/utils.py calculate_sdr
    numerator = np.clip(np.mean(reference**2), 1e-10, None)
    denominator = np.clip(np.mean((estimate - reference) ** 2), 1e-10, None)
    expected = 10 * np.log10(numerator / denominator)
    assert sdr(reference, estimate) == pytest.approx(float(expected), abs=1e-5)
    assert sdr(np.zeros(10), np.zeros(10)) == 0.0  # both powers floored at eps
    assert sdr(reference, reference) == pytest.approx(10 * np.log10(np.mean(reference.astype(np.float64) ** 2) / 1e-10))
    assert isinstance(sdr(reference, estimate), float)


def test_batched_inputs_reduce_the_last_axis():
    reference, estimate = signal(500, 3, 2), signal(500, 3, 2)
    for metric in (sdr, si_sdr):
        batched = metric(reference, estimate)
        assert batched.shape == (3, 2)
        assert batched[2, 1] == pytest.approx(metric(reference[2, 1], estimate[2, 1]))
    broadcast = sdr(reference, estimate[0, 0])  # one estimate against many references
    assert broadcast.shape == (3, 2) and broadcast[1, 0] == pytest.approx(sdr(reference[1, 0], estimate[0, 0]))
    assert segmental_snr(reference, estimate, 8000).shape == (3, 2)


def test_si_sdr_known_value_and_invariances():
    reference = signal() + 0.3  # a DC offset, removed by the zero-mean step
    centred = reference - reference.mean()
    noise = signal()
    noise -= noise.mean()
    noise -= centred * (noise @ centred) / (centred @ centred)  # orthogonal to the reference
    noise *= np.sqrt((centred @ centred) / (noise @ noise) / 10)  # 10 dB below it
    estimate = reference + noise
    assert si_sdr(reference, estimate) == pytest.approx(10.0, abs=1e-6)
    for gain in (3.0, 0.01, -0.5):
        assert si_sdr(reference, gain * estimate) == pytest.approx(10.0, abs=1e-6)
        assert si_sdr(gain * reference, estimate) == pytest.approx(10.0, abs=1e-6)
    assert si_sdr(reference, estimate + 5.0) == pytest.approx(10.0, abs=1e-6)
    # plain SDR is not scale invariant
    assert sdr(reference, 0.5 * estimate) < 8.0


def test_improvements():
    reference, interference = signal(), signal()
    mixture = reference + interference
    estimate = at_snr(reference, interference, 12.0)
    assert sdri(reference, mixture, mixture) == 0.0 and si_sdri(reference, mixture, mixture) == 0.0
    assert sdri(reference, estimate, mixture) == pytest.approx(12.0 - sdr(reference, mixture))
    assert sdri(reference, estimate, mixture) == pytest.approx(12.0, abs=0.2)  # the mixture is at about 0 dB
    expected = si_sdr(reference, estimate) - si_sdr(reference, mixture)
    assert si_sdri(reference, estimate, mixture) == pytest.approx(expected)


def loizou_segmental_snr(clean, processed, rate):
    """comp_snr.m (Loizou, Speech Enhancement), transcribed loop by loop."""
    winlength = int(math.floor(30 * rate / 1000 + 0.5))
    skiprate = winlength // 4
    num_frames = int(math.floor(len(clean) / skiprate - winlength / skiprate))
    window = 0.5 * (1 - np.cos(2 * np.pi * np.arange(1, winlength + 1) / (winlength + 1)))
    eps = np.finfo(float).eps
    values = []
    start = 0
    for _ in range(num_frames):
        clean_frame = clean[start : start + winlength] * window
        processed_frame = processed[start : start + winlength] * window
        energy = np.sum(clean_frame**2)
        noise_energy = np.sum((clean_frame - processed_frame) ** 2)
        values.append(min(max(10 * np.log10(energy / (noise_energy + eps) + eps), -10), 35))
        start += skiprate
    return float(np.mean(values))


def test_segmental_snr_matches_loizou():
    for rate, n in ((16000, 16000), (16000, 12345), (8000, 5000)):
        clean = signal(n) * np.repeat(RNG.uniform(0.01, 1, n // 100 + 1), 100)[:n]  # loud and quiet parts
        processed = clean + 0.3 * signal(n)
        expected = loizou_segmental_snr(clean, processed, rate)
        assert segmental_snr(clean, processed, rate) == pytest.approx(expected, abs=1e-9)


def test_segmental_snr_known_values_and_clamping():
    reference = signal()
    # a noise proportional to the signal gives the same SNR in every frame: -20 log10(c)
    assert segmental_snr(reference, reference * 1.1, 16000) == pytest.approx(20.0, abs=1e-6)
    assert segmental_snr(reference, reference * 1.001, 16000) == pytest.approx(35.0)  # 60 dB, clamped
    assert segmental_snr(reference, reference * -9.0, 16000) == pytest.approx(-10.0)  # -20 dB, clamped
    assert segmental_snr(reference, reference * 1.1, 16000, min_db=-20, max_db=15) == pytest.approx(15.0)


def test_shape_errors():
    with pytest.raises(ValueError, match="same number of samples"):
        sdr(np.zeros(10), np.zeros(11))
    with pytest.raises(ValueError, match="too short for segmental SNR"):
        segmental_snr(np.ones(500), np.ones(500), 16000)
