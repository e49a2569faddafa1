"""The separation engine: chunking, overlap-add, batching, activity gating."""

import numpy as np
import pytest
import torch

from uss_core.checkpoints import LoadedModel
from uss_core.errors import ConfigError
from uss_core import separation
from uss_core.separation import (
    OverlapAdd,
    Query,
    SegmentPlan,
    SeparationConfig,
    Separator,
    iter_segments,
    cpu_has_amx_bf16,
    resolve_precision,
    separate_stream,
)
from tests.test_models import five_labels, small_model

torch.set_num_threads(1)
RATE = 32000


def _reader(signal):
    position = 0

    def read(n):
        nonlocal position
        block = signal[position : position + n]
        position += len(block)
        return block

    return read


def _run_ola(signal, plan, separate=lambda seg, i: seg):
    ola = OverlapAdd(plan, num_stems=1)
    blocks = []
    for i, seg in enumerate(iter_segments(_reader(signal), plan)):
        ola.add(i, [separate(seg, i)])
        blocks.append(ola.pop_ready())
    blocks.append(ola.pop_ready(final=True))
    return np.concatenate(blocks, axis=1)[0]


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("num_samples", [1, 1000, 64000, 64001, 300_000])
def test_identity_separator_reconstructs_exactly(overlap, num_samples):
    signal = np.random.default_rng(0).standard_normal(num_samples).astype(np.float32)
    plan = SegmentPlan.create(num_samples, RATE, 2.0, overlap)
    out = _run_ola(signal, plan)
    assert out.shape == signal.shape
    np.testing.assert_allclose(out, signal, atol=1e-6)


def test_reference_chunking_with_no_overlap():
    plan = SegmentPlan.create(10 * RATE + 5, RATE, 2.0, 0.0)
    assert plan.num_segments == 6 and plan.hop_samples == 64000
    assert [plan.start(i) for i in range(plan.num_segments)] == [i * 64000 for i in range(6)]
    segments = list(iter_segments(_reader(np.ones(plan.num_samples, np.float32)), plan))
    assert segments[-1][:5].tolist() == [1] * 5 and not segments[-1][5:].any()  # zero-padded tail


def test_overlap_removes_boundary_errors():
    """A separator with edge errors (as a conv net's zero padding makes): without overlap they
    land on every boundary; the windowed overlap-add down-weights segment edges."""
    t = np.arange(20 * RATE) / RATE
    signal = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    edge = int(0.02 * RATE)

    def edgy(segment, index):
        out = segment.copy()
        rng = np.random.default_rng(index)
        out[:edge] *= rng.uniform(0, 0.5)
        out[-edge:] *= rng.uniform(0, 0.5)
        return out

    def boundary_error(overlap):
        plan = SegmentPlan.create(signal.size, RATE, 2.0, overlap)
        out = _run_ola(signal, plan, edgy)
        # The file's own first and last samples are covered by one segment only: not a boundary.
        return float(np.sqrt(np.mean((out - signal)[edge:-edge] ** 2)))

    no_overlap, with_overlap = boundary_error(0.0), boundary_error(0.25)
    assert no_overlap > 0.02
    assert with_overlap < no_overlap / 20


def test_window_is_positive_and_symmetric():
    w = SegmentPlan.create(10 * RATE, RATE, 2.0, 0.25).window()
    assert (w > 0).all() and np.allclose(w, w[::-1]) and w.max() == 1


class IdentityModel(torch.nn.Module):
    """Stands in for the U-Net: returns the mixture, so outputs are checkable exactly."""

    def forward(self, mixture, condition):
        self.calls.append(mixture.shape[0])
        return mixture


def _separator(condition_type="at_soft", batch_size=4, threshold=0.2, overlap=0.25):
    model = small_model(condition_type)
    identity = IdentityModel()
    identity.calls = []
    model.ss_model = identity
    sep = Separator(LoadedModel(model, five_labels(), "test", "uss-at-scale"),
                    SeparationConfig(segment_seconds=1.0, overlap=overlap, batch_size=batch_size, activity_threshold=threshold, device="cpu"))
    return sep, identity


def test_stream_batches_pairs_and_reconstructs():
    sep, identity = _separator(batch_size=4, threshold=0.0)
    signal = np.random.default_rng(1).standard_normal(int(5.3 * RATE)).astype(np.float32)
    queries = [Query("a", class_indexes=(0,)), Query("b", class_indexes=(1, 2))]
    blocks = []
    result = separate_stream(sep, _reader(signal), signal.size, queries, blocks.append)
    out = np.concatenate(blocks, axis=1)
    assert out.shape == (2, signal.size)
    np.testing.assert_allclose(out[0], signal, atol=1e-5)
    np.testing.assert_allclose(out[1], signal, atol=1e-5)
    assert max(identity.calls) <= 4
    assert result.pairs_separated == 2 * result.num_segments == sum(identity.calls)


def test_inactive_segments_are_skipped_and_silent():
    sep, identity = _separator(threshold=1.01)  # nothing reaches the threshold
    signal = np.ones(3 * RATE, dtype=np.float32)
    blocks = []
    result = separate_stream(sep, _reader(signal), signal.size, [Query("a", class_indexes=(0,))], blocks.append)
    assert not result.active_segments.any() and identity.calls == []
    assert not np.concatenate(blocks, axis=1).any()
    assert np.isfinite(result.activity).all()


def test_example_query_runs_on_every_segment():
    sep, identity = _separator(threshold=1.01)
    cond = np.ones(5, dtype=np.float32)
    signal = np.ones(3 * RATE, dtype=np.float32)
    result = separate_stream(sep, _reader(signal), signal.size, [Query("ex", condition=cond, gated=False)], lambda b: None)
    assert result.active_segments.all()


def test_condition_shape_is_checked():
    sep, _ = _separator()
    with pytest.raises(ConfigError, match="expects"):
        sep.check_queries([Query("ex", condition=np.ones(3, np.float32))])


def test_hard_model_conditions_are_multi_hot():
    sep, _ = _separator("hard")
    bottleneck = sep.model.query_net.bottleneck(torch.zeros(2, 100))
    mask = torch.tensor([0, 1, 1, 0, 0.0])
    assert torch.equal(sep.model.query_net.class_condition(bottleneck, mask), mask.expand(2, -1))


def test_config_validation():
    with pytest.raises(ConfigError):
        SeparationConfig(overlap=1.0)
    with pytest.raises(ConfigError):
        SeparationConfig(batch_size=0)
    with pytest.raises(ConfigError, match="precision"):
        SeparationConfig(precision="int8")


def test_bf16_separation_stays_close_to_fp32():
    model = small_model("at_soft")
    labels = five_labels()
    signal = np.random.default_rng(3).standard_normal(int(2.5 * RATE)).astype(np.float32) * 0.1
    queries = [Query("a", class_indexes=(0,), gated=False)]
    outputs = {}
    for precision in ("fp32", "bf16"):
        config = SeparationConfig(segment_seconds=1.0, overlap=0.25, device="cpu", precision=precision)
        blocks = []
        separate_stream(Separator(LoadedModel(model, labels, "test", "uss-at-scale"), config),
                        _reader(signal), signal.size, queries, blocks.append)
        outputs[precision] = np.concatenate(blocks, axis=1)[0]
    reference, approx = outputs["fp32"], outputs["bf16"]
    assert not np.array_equal(reference, approx)  # autocast really ran in bf16
    snr_db = 10 * np.log10(np.sum(reference**2) / np.sum((approx - reference) ** 2))
    assert snr_db > 30


def test_auto_precision_is_bf16_only_on_a_cpu_with_amx(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_amx_bf16() else "fp32")
    assert resolve_precision("auto", gpu) == "fp32"
    assert [resolve_precision(p, cpu) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("int8", cpu)
    monkeypatch.setattr(separation, "cpu_has_amx_bf16", lambda: False)  # a CPU without AMX
    assert resolve_precision("auto", cpu) == "fp32"
    sep = Separator(LoadedModel(small_model("at_soft"), five_labels(), "test", "uss-at-scale"), SeparationConfig(device="cpu"))
    assert sep.config.precision == "auto" and sep.precision == "fp32"


def test_fp16_needs_a_gpu():
    with pytest.raises(ConfigError, match="GPU"):
        Separator(LoadedModel(small_model("at_soft"), five_labels(), "test", "uss-at-scale"),
                  SeparationConfig(device="cpu", precision="fp16"))
