"""Model structure, presets and the checkpoint round trip (no reference packages needed)."""

import json

import numpy as np
import pytest
import torch

from uss_core.checkpoints import (
    SeparatorModel,
    SeparatorModelConfig,
    load_model,
    reference_state_dict,
    save_checkpoint,
)
from uss_core.config import from_dict
from uss_core.errors import CheckpointError, ConfigError
from uss_core.models.frontend import InverseStft, Stft, mel_filterbank
from uss_core.models.panns import Cnn14, Cnn14Config, Cnn14DecisionLevelMax
from uss_core.models.query_nets import QueryNet, QueryNetConfig
from uss_core.models.resunet import ResUNet, ResUNetConfig
from uss_core.ontology import LabelSet

torch.set_num_threads(1)

SMALL_TAGGER = Cnn14Config(classes_num=5, conv_channels=(8, 16, 32), embedding_size=32)


def small_model(condition_type="at_soft", separator_options: dict | None = None, **query_kwargs) -> SeparatorModel:
    query = QueryNetConfig(condition_type=condition_type, tagger=SMALL_TAGGER, adaptor_hidden=16, adaptor_outputs=12, **query_kwargs)
    sep = ResUNetConfig(condition_size=query.condition_size, encoder_channels=(8, 16, 16), **(separator_options or {}))
    return SeparatorModel(SeparatorModelConfig(separator=sep, query_net=query)).eval()


def five_labels() -> LabelSet:
    return LabelSet(mids=tuple(f"/m/x{i}" for i in range(5)), names=tuple(f"Sound {i}" for i in range(5)))


def test_stft_round_trip_is_exact():
    x = torch.randn(2, 12345)
    stft, istft = Stft(2048, 320), InverseStft(2048, 320)
    real, imag = stft(x)
    assert real.shape == (2, 1, 12345 // 320 + 1, 1025)
    assert torch.allclose(istft(real, imag, x.shape[-1]), x, atol=1e-5)


def test_mel_filterbank_shape_and_coverage():
    mel = mel_filterbank(32000, 1024, 64, 50, 14000)
    assert mel.shape == (513, 64)
    assert (mel.sum(axis=0) > 0).all()  # every filter has support
    assert mel[np.fft.rfftfreq(1024, 1 / 32000) > 14500].sum() == 0  # nothing above fmax


def test_resunet30_preset_matches_paper_layout():
    model = ResUNet(ResUNetConfig())
    keys = model.state_dict().keys()
    assert "base.encoder_block6.conv_block1.conv1.weight" in keys
    assert "base.conv_block7a.conv_block1.bn1.running_mean" in keys
    assert "base.decoder_block6.conv_block2.shortcut.weight" in keys
    assert "film.decoder_block1->conv_block2->beta2.weight" in keys
    assert model.state_dict()["base.after_conv.weight"].shape == (3, 32, 1, 1)
    assert sum(p.numel() for p in model.parameters()) == 26_595_781  # as uss 0.0.4 ResUNet30(527)


@pytest.mark.parametrize("samples", [32000, 64000, 70001])
def test_small_resunet_any_length(samples):
    model = ResUNet(ResUNetConfig(condition_size=7, encoder_channels=(4, 8, 8))).eval()
    with torch.inference_mode():
        out = model(torch.randn(3, 1, samples), torch.rand(3, 7))
    assert out.shape == (3, 1, samples)
    assert torch.isfinite(out).all()


def test_magnitude_mask_keeps_the_mixture_phase_and_log_input_is_an_option(tmp_path):
    config = ResUNetConfig(condition_size=7, encoder_channels=(4, 8, 8), mask="magnitude", input_scale="log")
    model = ResUNet(config).eval()
    assert model.state_dict()["base.after_conv.weight"].shape == (1, 4, 1, 1)  # no phase maps
    t = torch.arange(16000) / 32000
    # Tones far below Nyquist: the net leaves the top bin at mask 1/2, as the reference does.
    x = torch.stack([torch.sin(2 * torch.pi * 440 * t), 0.5 * torch.sin(2 * torch.pi * 3000 * t + 1.0)])[:, None]
    with torch.no_grad():
        model.base.after_conv.weight.zero_()
        model.base.after_conv.bias.fill_(30.0)  # magnitude mask sigmoid(30) = 1: the mixture itself
        assert torch.allclose(model(x, torch.rand(2, 7)), x, atol=1e-4)
        model.base.after_conv.bias.fill_(0.0)  # mask 1/2, phase untouched: half the mixture
        assert torch.allclose(model(x, torch.rand(2, 7)), 0.5 * x, atol=1e-4)
    with pytest.raises(ConfigError, match="mask must be one of"):
        from_dict(ResUNetConfig, {"mask": "phase"})
    with pytest.raises(ConfigError, match="input_scale must be one of"):
        from_dict(ResUNetConfig, {"input_scale": "db"})


def test_eval_fused_norm_equals_batchnorm():
    model = ResUNet(ResUNetConfig(condition_size=7, encoder_channels=(4, 8, 8)))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    x, c = torch.randn(2, 1, 16000), torch.rand(2, 7)
    model.eval()
    with torch.no_grad():
        fused = model(x, c)
        # Reference computation: BatchNorm modules in eval mode through the training code path.
        import uss_core.models.resunet as r

        original = r.norm_film_act
        r.norm_film_act = lambda bn, x, beta: torch.nn.functional.leaky_relu(bn(x) + beta, 0.01)
        try:
            plain = model(x, c)
        finally:
            r.norm_film_act = original
    assert torch.allclose(fused, plain, atol=1e-5)


def test_sed_framewise_has_one_frame_per_hop():
    sed = Cnn14DecisionLevelMax(SMALL_TAGGER).eval()
    with torch.inference_mode():
        out = sed(torch.randn(2, 32000 * 3))
    assert out["framewise_output"].shape == (2, 301, 5)
    assert torch.allclose(out["clipwise_output"], out["framewise_output"].amax(dim=1))


@pytest.mark.parametrize("condition_type,size", [("hard", 5), ("at_soft", 5), ("embedding", 32), ("adaptive", 12)])
def test_query_net_condition_sizes(condition_type, size):
    net = QueryNet(QueryNetConfig(condition_type=condition_type, tagger=SMALL_TAGGER, adaptor_hidden=16, adaptor_outputs=12)).eval()
    assert net.condition_size == size
    assert net(torch.randn(2, 32000)).shape == (2, size)


def test_embedding_model_refuses_class_queries():
    net = QueryNet(QueryNetConfig(condition_type="embedding", tagger=SMALL_TAGGER))
    with pytest.raises(ConfigError, match="query-audio"):
        net.require_class_queries()


def test_unknown_condition_type_is_a_config_error():
    with pytest.raises(ConfigError, match="hard, at_soft, embedding, adaptive"):
        QueryNetConfig(condition_type="soft")


def test_own_checkpoint_round_trip(tmp_path):
    model = small_model("adaptive", {"mask": "magnitude", "input_scale": "log"})
    path = save_checkpoint(model, five_labels(), tmp_path / "ckpt", metadata={"note": "test"})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    doc = json.loads((path / "config.json").read_text())
    assert doc["model"]["query_net"]["condition_type"] == "adaptive"
    assert doc["model"]["separator"]["mask"] == "magnitude"
    loaded = load_model(path)
    assert loaded.model.ss_model.config == model.ss_model.config
    assert loaded.labels == five_labels()
    x = torch.randn(2, 32000)
    with torch.inference_mode():
        a = model.ss_model(x[:, None], model.query_net(x))
        b = loaded.model.ss_model(x[:, None], loaded.model.query_net(x))
    assert torch.equal(a, b)


def test_checkpoint_save_is_atomic_and_replaces(tmp_path):
    model = small_model()
    save_checkpoint(model, five_labels(), tmp_path / "ckpt")
    save_checkpoint(model, five_labels(), tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_broken_checkpoints_raise_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "empty")
    path = save_checkpoint(small_model(), five_labels(), tmp_path / "ckpt")
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_model(path)
    bad = tmp_path / "pickle.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": _Unpicklable()}, bad)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(bad, labels=five_labels())


class _Unpicklable:
    """An arbitrary class: a weights-only load must refuse to rebuild it."""


def test_reference_state_dict_has_frontend_constants():
    model = small_model()
    state = reference_state_dict(model)
    assert state["ss_model.base.stft.conv_real.weight"].shape == (1025, 1, 2048)
    assert state["ss_model.base.istft.conv_real.weight"].shape == (2048, 2048, 1)
    assert state["query_net.base.spectrogram_extractor.stft.conv_imag.weight"].shape == (513, 1, 1024)


@pytest.mark.parametrize("sed", [False, True])
def test_tagger_checkpoint_round_trip(tmp_path, sed):
    from uss_core.checkpoints import load_tagger, save_tagger_checkpoint

    cls = Cnn14DecisionLevelMax if sed else Cnn14
    tagger = cls(SMALL_TAGGER).eval()
    path = save_tagger_checkpoint(tagger, five_labels(), tmp_path / "tagger")
    loaded, labels = load_tagger(path, sound_event_detection=sed)
    assert labels == five_labels() and type(loaded) is cls
    x = torch.randn(1, 32000)
    with torch.inference_mode():
        expected, got = tagger(x), loaded(x)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    with pytest.raises(CheckpointError, match="not a uss-at-scale/separator"):
        load_model(path)


@pytest.mark.parametrize(
    ("batch", "in_channels", "out_channels", "height", "width", "channels_last"),
    [(1, 5, 3, 7, 9, True), (2, 16, 24, 14, 13, False), (1, 8, 8, 4, 4, True), (1, 4, 6, 1, 2, True)],
)
def test_winograd_conv3x3_equals_conv2d(batch, in_channels, out_channels, height, width, channels_last):
    from uss_core.models.winograd import winograd_conv3x3, winograd_weight

    x = torch.randn(batch, in_channels, height, width)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, in_channels, 3, 3) / (3 * in_channels**0.5)
    expected = torch.nn.functional.conv2d(x, weight, padding=1)
    got = winograd_conv3x3(x, winograd_weight(weight))
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5 * float(expected.abs().max()))


def test_fused_cpu_inference_equals_the_eager_path(monkeypatch):
    import uss_core.models.resunet as r

    # Two blocks wide enough for the Winograd convolutions, the rest on oneDNN's fused ones.
    model = ResUNet(ResUNetConfig(condition_size=7, encoder_channels=(8, 16, r.WINOGRAD_MIN_CHANNELS)))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval().to(memory_format=torch.channels_last)
    x, c = torch.randn(3, 1, 16000), torch.rand(3, 7)
    calls = {"winograd": 0, "fused": 0}
    winograd, fused = r.winograd_conv3x3, r.ConvBlockRes._forward_fused

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(r, "winograd_conv3x3", count("winograd", winograd))
    monkeypatch.setattr(r.ConvBlockRes, "_forward_fused", count("fused", fused))

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        eager = model(x, c).detach()  # grad enabled: the plain path
        with torch.inference_mode():
            return eager, model(x, c)

    eager, fast = both()
    assert calls["fused"] == 3 * len([m for m in model.modules() if isinstance(m, r.ConvBlockRes)])
    assert calls["winograd"] > 0 and calls["fused"] > 0
    assert torch.allclose(fast, eager, atol=1e-5)
    # The folded weights follow in-place changes of the tensors they come from.
    block = model.base.encoder_block3.conv_block1
    with torch.no_grad():
        block.bn2.running_var.mul_(3)
        block.conv2.weight.mul_(0.5)
    eager2, fast2 = both()
    assert not torch.allclose(eager2, eager, atol=1e-3)
    assert torch.allclose(fast2, eager2, atol=1e-5)


def test_bf16_autocast_inference_runs_the_fused_path_in_bf16(monkeypatch):
    import uss_core.models.resunet as r

    model = ResUNet(ResUNetConfig(condition_size=7, encoder_channels=(8, 16, r.WINOGRAD_MIN_CHANNELS)))
    model.eval().to(memory_format=torch.channels_last)
    x, c = 0.1 * torch.randn(2, 1, 16000), torch.rand(2, 7)
    dtypes = []
    fused = r.ConvBlockRes._forward_fused
    monkeypatch.setattr(r.ConvBlockRes, "_forward_fused", lambda self, h, film: dtypes.append(h.dtype) or fused(self, h, film))
    with torch.inference_mode():
        fp32 = model(x, c)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x, c)
            plain = model.base(x, model.film(c))  # op-by-op autocast, what ResUNet.forward replaces
        again = model(x, c)  # back to fp32: the weights prepared for bf16 are not reused
    blocks = len([m for m in model.modules() if isinstance(m, r.ConvBlockRes)])
    per_forward = 2 * blocks  # every block once per row
    assert dtypes == [torch.float32] * per_forward + [torch.bfloat16] * per_forward + [torch.float32] * per_forward
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)

    def snr_db(y):
        return float(10 * torch.log10((fp32**2).sum() / ((y.float() - fp32) ** 2).sum()))

    assert snr_db(bf16) > 30 and snr_db(bf16) > snr_db(plain) - 3  # as close to fp32 as autocast
    assert torch.equal(again, fp32)


def test_a_cnn14_of_sed_weights_tags_through_the_sed_head(tmp_path):
    """A tagger trained with the decision-level head, loaded as a clip-level Cnn14 (conditions,
    segment activity), gives the probabilities of the head it was trained with."""
    import dataclasses

    from uss_core.checkpoints import load_tagger, save_tagger_checkpoint

    sed = Cnn14DecisionLevelMax(dataclasses.replace(SMALL_TAGGER, head="sed")).eval()
    path = save_tagger_checkpoint(sed, five_labels(), tmp_path / "tagger")
    clip, _ = load_tagger(path)  # the clip-level class, as the query net and the activity gate use
    assert type(clip) is Cnn14 and clip.config.head == "sed"
    x = torch.randn(2, 32000)
    with torch.inference_mode():
        assert torch.equal(clip(x)["clipwise_output"], sed(x)["clipwise_output"])
        plain = Cnn14(SMALL_TAGGER).eval()
        plain.load_state_dict(sed.state_dict())
        assert not torch.allclose(plain(x)["clipwise_output"], sed(x)["clipwise_output"])
    # A tagger saved before the config named its head: the training metadata says it.
    document = json.loads((path / "config.json").read_text())
    del document["model"]["head"]
    document["metadata"]["head"] = "sed"
    (path / "config.json").write_text(json.dumps(document))
    assert load_tagger(path)[0].config.head == "sed"
    with pytest.raises(ValueError, match="head must be one of"):
        dataclasses.replace(SMALL_TAGGER, head="frames")
