"""Compatibility with the reference implementation (``uss`` 0.0.4, ``panns-inference`` 0.1.1).

Random weights everywhere: the point is that our models, checkpoint import and separation path
compute what the reference computes. Requires the ``reference`` extra (see README).
"""

import numpy as np
import pytest
import soundfile
import torch

from benchmarks.reference_harness import (
    PANNS_KWARGS,
    import_reference,
    load_reference_models,
    randomize_batchnorm,
    reference_lit_model,
    write_reference_checkpoints,
)

pytestmark = pytest.mark.reference

torch.set_num_threads(2)

TOL = 1e-4


@pytest.fixture(scope="module")
def ref(tmp_path_factory, audioset_dir):
    pytest.importorskip("uss.models.resunet", reason="install the reference extra: see README")
    pytest.importorskip("panns_inference", reason="install the reference extra: see README")
    return import_reference(tmp_path_factory.mktemp("home"), audioset_dir)


def test_resunet30_state_dict_keys_and_shapes_match(ref):
    from uss_core.checkpoints import SeparatorModel, SeparatorModelConfig, reference_state_dict

    lit = reference_lit_model(ref)
    ours = SeparatorModel(SeparatorModelConfig())
    ref_state = lit.state_dict()
    our_state = reference_state_dict(ours)
    assert set(our_state) == set(ref_state)
    assert {k: tuple(v.shape) for k, v in our_state.items()} == {k: tuple(v.shape) for k, v in ref_state.items()}
    # Our own state dict is the reference's minus the constant STFT matrices, name for name.
    dropped = set(ref_state) - set(ours.state_dict())
    assert dropped and all(".stft." in k or ".istft." in k for k in dropped)
    # And the exported weights load into the reference strictly.
    lit.load_state_dict(our_state, strict=True)


def test_resunet30_forward_matches(ref):
    from uss_core.models.resunet import ResUNet, ResUNetConfig

    torch.manual_seed(1)
    theirs = ref.resunet.ResUNet30(input_channels=1, output_channels=1, condition_size=527)
    randomize_batchnorm(theirs, 1)
    theirs.eval()
    ours = ResUNet(ResUNetConfig()).eval()
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if k in ours.state_dict()}, strict=True)
    mixture = torch.randn(2, 1, 64000) * 0.3
    condition = torch.rand(2, 527)
    with torch.no_grad():
        expected = theirs({"mixture": mixture, "condition": condition})["waveform"]
        got = ours(mixture, condition)
        got_channels_last = ours.to(memory_format=torch.channels_last)(mixture, condition)
    assert (got - expected).abs().max() <= TOL
    assert (got_channels_last - expected).abs().max() <= TOL


@pytest.mark.parametrize("kind", ["Cnn14", "Cnn14_DecisionLevelMax"])
def test_panns_outputs_match(ref, kind, tmp_path):
    from uss_core.checkpoints import load_panns, panns_state_dict

    torch.manual_seed(2)
    theirs = getattr(ref.panns, kind)(**PANNS_KWARGS)
    randomize_batchnorm(theirs, 2)
    theirs.eval()
    path = tmp_path / "panns.pth"
    torch.save({"model": theirs.state_dict()}, path)
    ours = load_panns(path, sound_event_detection=kind != "Cnn14")
    assert set(panns_state_dict(ours)) == set(theirs.state_dict())
    audio = torch.randn(2, 32000 * 3) * 0.3
    with torch.no_grad():
        expected, got = theirs(audio), ours(audio)
    keys = ["clipwise_output", "embedding"] if kind == "Cnn14" else ["framewise_output", "clipwise_output"]
    for key in keys:
        assert got[key].shape == expected[key].shape
        assert (got[key] - expected[key]).abs().max() <= TOL, key


@pytest.fixture(scope="module")
def reference_files(ref, tmp_path_factory):
    """Official-format checkpoints with random weights, and a 10.5-s 32-kHz test file."""
    root = tmp_path_factory.mktemp("reference_files")
    write_reference_checkpoints(ref, root, seed=3)
    rng = np.random.default_rng(0)
    t = np.arange(int(32000 * 10.5)) / 32000
    audio = 0.3 * np.sin(2 * np.pi * 440 * t) * (t % 1 < 0.5) + 0.05 * rng.standard_normal(t.size)
    soundfile.write(root / "input.wav", audio.astype(np.float32), 32000, subtype="FLOAT")
    return root


def test_official_checkpoint_imports_with_inferred_config(reference_files, audioset_dir):
    from uss_core.checkpoints import load_model

    loaded = load_model(reference_files / "uss.ckpt", metadata_dir=audioset_dir)
    cfg = loaded.model.config
    assert cfg.query_net.condition_type == "at_soft"
    assert cfg.separator.encoder_channels == (32, 64, 128, 256, 384, 384)
    assert len(loaded.labels) == 527


def test_uss_separate_class_ids_matches_reference(ref, reference_files, audioset_dir, tmp_path):
    """`uss separate --class-id A+B+C --segment-seconds 2 --overlap 0 --precision fp32` == the
    reference's class-id path (the default precision is bf16 on CPUs that have it)."""
    import librosa

    from jobs.cli import main

    class_ids = [0, 137, 300]
    lit, at_model = load_reference_models(ref, reference_files / "uss.ckpt", reference_files / "tagger.pth")
    audio, _ = librosa.load(reference_files / "input.wav", sr=32000, mono=True)
    segment_samples = 64000
    at_probs = ref.inference.calculate_segment_at_probs(audio, segment_samples, at_model, "cpu")
    expected = ref.inference.separate_by_query_conditions(audio, segment_samples, at_probs, class_ids, lit, "cpu")
    ref.inference.separate_by_class_ids(audio, 32000, segment_samples, at_model, lit, "cpu", class_ids, str(tmp_path / "ref"))
    (ref_file,) = (tmp_path / "ref").iterdir()

    code = main([
        "separate", str(reference_files / "input.wav"), "-o", str(tmp_path / "ours"),
        "--checkpoint", str(reference_files / "uss.ckpt"), "--tagger-checkpoint", str(reference_files / "tagger.pth"),
        "--metadata-dir", str(audioset_dir), "--class-id", "+".join(map(str, class_ids)),
        "--segment-seconds", "2", "--overlap", "0", "--device", "cpu", "--precision", "fp32", "--quiet",
    ])
    assert code == 0
    out_dir = tmp_path / "ours" / "input"
    stems = [p for p in out_dir.glob("*.wav")]
    assert len(stems) == 1
    got, rate = soundfile.read(stems[0], dtype="float32")
    assert rate == 32000 and got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL
    # The reference writes 16-bit PCM; ours matches it to the quantisation step.
    written, _ = soundfile.read(ref_file, dtype="float32")
    assert np.abs(got - written).max() <= 2 / 32768
