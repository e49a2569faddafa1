"""Separator training: remixing and losses (pure functions), then real Ray Train runs on a tiny
dataset written by the tests: a 2-worker CPU run that is killed after its first checkpoint and
resumed with the step count and optimizer state continuing; the learnable adaptor really
training; the job's MLflow run contents and the model-registry round trip through ``uss separate
--checkpoint models:/NAME/VERSION``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipelines.mixing import energy, mix
from pipelines.schemas import (
    ANCHOR_SCHEMA,
    MIXTURE_SCHEMA,
    Anchor,
    Mixture,
    make_anchor_id,
    make_mixture_id,
    records_to_table,
)
from pipelines.separator_training import (
    STATE_FILE,
    SeparatorTrainingConfig,
    TrainingData,
    bottleneck_rows,
    condition_column,
    random_crop,
    remix_batch,
    separation_loss,
    separator_model_config,
    train_separator,
)
from uss_core.checkpoints import load_model, save_tagger_checkpoint
from uss_core.errors import ConfigError
from uss_core.models.panns import Cnn14, Cnn14Config
from uss_core.models.resunet import ResUNetConfig
from uss_core.ontology import LabelSet

REPO = Path(__file__).resolve().parent.parent
RATE = 32000
SAMPLES = 4096
LABELS = LabelSet(mids=("/m/a0", "/m/a1", "/m/a2"), names=("Alpha", "Beta", "Gamma"))
TAGGER = Cnn14Config(classes_num=3, conv_channels=(4, 8), embedding_size=8, window_size=256, hop_size=64, mel_bins=16)


def tiny_config(**overrides) -> SeparatorTrainingConfig:
    base = dict(
        separator=ResUNetConfig(encoder_channels=(4, 8), n_fft=256, hop_length=64),
        segment_samples=SAMPLES, max_steps=4, batch_size=4, lr=1e-3, warmup="linear", warmup_steps=1,
        checkpoint_every=2, eval_every=2, eval_batch_size=4, log_every=1, num_workers=1,
        cpus_per_worker=0.5, torch_threads=1, shuffle_buffer=8,
    )
    base.update(overrides)
    return SeparatorTrainingConfig(**base)


# --------------------------------------------------------------------------------------------
# Pure functions


def tone(freq: float, phase: float = 0.0) -> np.ndarray:
    t = np.arange(SAMPLES) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def anchor(clip: str, class_index: int, clip_labels: tuple[int, ...], k: int) -> Anchor:
    wave = tone(300 * (class_index + 1) + 7 * k, phase=k)
    rng = np.random.default_rng(k)
    return Anchor(
        make_anchor_id(clip, LABELS.mids[class_index], "max_area"), clip, class_index, LABELS.mids[class_index],
        0, SAMPLES, 0.9, "max_area", clip_labels, wave,
        np.eye(3, dtype=np.float32)[class_index] * 0.8 + 0.1, rng.standard_normal(8).astype(np.float32),
    )


def anchors_batch(anchors: list[Anchor]) -> dict[str, np.ndarray]:
    table = records_to_table(anchors, ANCHOR_SCHEMA)
    return {name: np.asarray(table.column(name).to_pylist(), dtype=object) for name in table.column_names}


def test_remix_pairs_only_anchors_whose_clips_share_no_label_and_matches_energy():
    anchors = [
        anchor("c0", 0, (0, 1), 0),  # shares labels with c1 (class 1): may only meet class 2
        anchor("c1", 1, (1,), 1),
        anchor("c2", 2, (2,), 2),
        anchor("c3", 2, (2,), 3),
    ]
    batch = anchors_batch(anchors)
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = remix_batch(batch, rng)
        assert list(out["rows"]) == [0, 1, 2, 3]  # every anchor finds a partner here
        for row, partner, mixture, target in zip(out["rows"], out["partners"], out["mixture"], out["target"]):
            assert not set(anchors[row].clip_label_indexes) & set(anchors[partner].clip_label_indexes)
            np.testing.assert_array_equal(target, anchors[row].waveform)
            expected, _ = mix(anchors[row].waveform, [anchors[partner].waveform])
            np.testing.assert_allclose(mixture, expected, atol=1e-6)
            assert energy(mixture - target) == pytest.approx(energy(target), rel=1e-3)


def test_remix_leaves_out_anchors_without_a_partner_and_gain_augmentation_moves_the_partner_level():
    lonely = [anchor("c0", 0, (0,), 0), anchor("c1", 0, (0,), 1)]  # same class: no valid pair
    assert remix_batch(anchors_batch(lonely), np.random.default_rng(0))["mixture"].shape == (0, SAMPLES)
    pair = anchors_batch([anchor("c0", 0, (0,), 0), anchor("c1", 1, (1,), 1)])
    ratios = []
    for seed in range(10):
        out = remix_batch(pair, np.random.default_rng(seed), partner_gain_db=6.0)
        ratios.append(10 * np.log10(energy(out["mixture"][0] - out["target"][0]) / energy(out["target"][0])))
    assert max(abs(r) for r in ratios) <= 6.0 + 1e-3 and np.ptp(ratios) > 1.0


def test_bottlenecks_per_condition_type():
    assert condition_column("hard", "at_soft") is None
    assert condition_column("at_soft", "at_soft") == "condition_at_soft"
    assert condition_column("adaptive", "embedding") == "condition_embedding"
    batch = {"target_class_index": np.array([2, 0]), "condition_at_soft": np.array([np.ones(3), np.zeros(3)], dtype=object)}
    np.testing.assert_array_equal(bottleneck_rows(batch, None, 3, "target_class_index"), [[0, 0, 1], [1, 0, 0]])
    assert bottleneck_rows(batch, "condition_at_soft", 3, "target_class_index").shape == (2, 3)


def test_random_crop_takes_the_same_window_of_mixture_and_target():
    rng = np.random.default_rng(0)
    mixture = np.arange(4 * 100, dtype=np.float32).reshape(4, 100)
    target = -mixture
    crop_m, crop_t = random_crop(mixture, target, 30, rng)
    assert crop_m.shape == crop_t.shape == (4, 30)
    assert np.array_equal(crop_t, -crop_m)
    starts = crop_m[:, 0] - mixture[:, 0]
    assert ((starts >= 0) & (starts <= 70)).all()
    assert np.array_equal(crop_m, mixture[np.arange(4)[:, None], starts.astype(int)[:, None] + np.arange(30)])
    assert random_crop(mixture, target, None, rng)[0] is mixture
    with pytest.raises(ConfigError, match="crop_samples must be null or between"):
        tiny_config(crop_samples=10)


def test_losses():
    target = torch.from_numpy(np.stack([tone(440.0), tone(880.0)]))
    assert float(separation_loss(target, target, "l1_wav")) == 0.0
    estimate = target + 0.1
    assert float(separation_loss(estimate, target, "l1_wav")) == pytest.approx(0.1, rel=1e-5)
    spec = separation_loss(estimate, target, "l1_wav_spec", 1.0, n_fft=256, hop=64)
    assert float(spec) > float(separation_loss(estimate, target, "l1_wav"))
    # snr: minus the SDR. Half the target scores 20 log10(2) = 6.02 dB whatever the level.
    assert float(separation_loss(0.5 * target, target, "snr")) == pytest.approx(-6.0206, abs=1e-3)
    assert float(separation_loss(0.05 * target, 0.1 * target, "snr")) == pytest.approx(-6.0206, abs=1e-3)
    silent = torch.zeros_like(target)
    assert float(separation_loss(silent, silent, "snr")) == 0.0


def test_config_errors_say_what_is_wrong():
    with pytest.raises(ConfigError, match="batch_size must be a multiple of num_workers"):
        tiny_config(batch_size=5, num_workers=2)
    with pytest.raises(ConfigError, match="loss must be one of"):
        tiny_config(loss="l2")
    with pytest.raises(ConfigError, match="needs the condition tagger"):
        separator_model_config(tiny_config(condition_type="at_soft"), LABELS, None)
    hard = separator_model_config(tiny_config(condition_type="hard"), LABELS, TAGGER)
    assert hard.separator.condition_size == 3 and hard.tagger == TAGGER  # the activity tagger
    adaptive = separator_model_config(tiny_config(condition_type="adaptive", adaptor_hidden=6, adaptor_outputs=5), LABELS, TAGGER)
    assert adaptive.separator.condition_size == 5 and adaptive.tagger is None


# --------------------------------------------------------------------------------------------
# A tiny dataset, written the way the mining and mixing stages write theirs


def write_dataset(root: Path) -> TrainingData:
    """Anchors of 3 classes (12 clips, one label each), their fixed training mixtures, and an
    evaluation set of 6 pairs; plus a random-weight condition tagger."""
    anchors = [anchor(f"train/clip{k}", k % 3, (k % 3,), k) for k in range(12)]
    held_out = [anchor(f"eval/clip{k}", k % 3, (k % 3,), 100 + k) for k in range(6)]

    def mixtures(group: list[Anchor]) -> list[Mixture]:
        rows = []
        for i, a in enumerate(group):
            b = next(x for x in group[i + 1:] + group[:i] if x.class_index != a.class_index)
            mixture, gains = mix(a.waveform, [b.waveform])
            rows.append(Mixture(make_mixture_id([a.anchor_id, b.anchor_id]), a.anchor_id, (b.anchor_id,), a.class_index,
                                (b.class_index,), mixture, a.waveform, a.condition_at_soft, a.condition_embedding,
                                1.0, gains))
        return rows

    for name, table in [
        ("anchors", records_to_table(anchors + held_out, ANCHOR_SCHEMA)),
        ("mixtures", records_to_table(mixtures(anchors), MIXTURE_SCHEMA)),
        ("eval", records_to_table(mixtures(held_out), MIXTURE_SCHEMA)),
    ]:
        (root / name).mkdir(parents=True)
        pq.write_table(table.slice(0, table.num_rows // 2), root / name / "part-000000.parquet")
        pq.write_table(table.slice(table.num_rows // 2), root / name / "part-000001.parquet")
    torch.manual_seed(0)
    save_tagger_checkpoint(Cnn14(TAGGER), LABELS, root / "tagger")
    LABELS.to_csv(root / "labels.csv")
    return TrainingData(str(root / "mixtures"), str(root / "anchors"), str(root / "eval"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> TrainingData:
    return write_dataset(tmp_path_factory.mktemp("sepdata"))


def test_adaptor_weights_change_and_remix_trains_on_training_anchors_only(dataset, tmp_path, ray_local):
    config = tiny_config(condition_type="adaptive", adaptor_hidden=6, adaptor_outputs=5, remix=True, max_steps=3,
                         eval_every=3, checkpoint_every=3, crop_samples=SAMPLES // 2)
    tagger_path = str(Path(dataset.mixtures_uri).parent / "tagger")
    torch.manual_seed(config.seed)
    from uss_core.checkpoints import SeparatorModel

    initial = SeparatorModel(separator_model_config(config, LABELS, TAGGER)).state_dict()
    result = train_separator(config, dataset, str(tmp_path / "out"), LABELS, tagger_path,
                             storage_path=tmp_path / "ray", run_name="adaptive")
    assert result.steps == 3
    trained = load_model(tmp_path / "out").model.state_dict()
    for name in ("query_net.fc1.weight", "query_net.fc2.weight", "ss_model.base.encoder_block1.conv_block1.conv1.weight"):
        assert not torch.equal(initial[name], trained[name]), f"{name} did not train"
    # The frozen condition tagger is the one given, untouched.
    tagger = load_file(os.path.join(tagger_path, "model.safetensors"))
    assert torch.equal(trained["query_net.base.conv_block1.conv1.weight"], tagger["conv_block1.conv1.weight"])
    final = result.history[-1]
    assert final["step"] == 3 and np.isfinite(final["train_loss"]) and final["val_pairs"] == 6
    assert np.isfinite(final["val_sdri"])


def _train_command(dataset: TrainingData, out: Path, storage: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "jobs.train", "--mixtures", dataset.mixtures_uri, "--eval", dataset.eval_uri,
        "--condition-tagger", str(Path(dataset.mixtures_uri).parent / "tagger"), "--labels-csv",
        str(Path(dataset.mixtures_uri).parent / "labels.csv"), "--preset", str(out.parent / "preset.yaml"),
        "--out", str(out), "--storage", str(storage), "--run-name", "killed", "--steps", str(steps), *extra,
    ]


def _checkpoint_steps(storage: Path) -> list[int]:
    steps = []
    for state in storage.glob(f"killed/checkpoint_*/{STATE_FILE}"):
        steps.append(int(torch.load(state, weights_only=True)["step"]))
    return sorted(steps)


def test_two_worker_run_killed_after_a_checkpoint_resumes_with_its_step_and_optimizer(dataset, tmp_path):
    """The job in its own process (its own local Ray, 2 CPUs, 2 DDP workers on gloo): SIGKILL of the
    whole process group once a checkpoint is registered, then the same command again."""
    import yaml

    from uss_core.config import to_dict

    config = tiny_config(num_workers=2, batch_size=4, checkpoint_every=2, eval_every=2, max_steps=40)
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(to_dict(config)))
    env = {**os.environ, "USS_WORKSPACE": str(tmp_path / "ws"), "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    storage = tmp_path / "ray"
    out = tmp_path / "separator"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_train_command(dataset, out, storage, 40, "--register-as", ""), cwd=tmp_path, env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def reported_checkpoint() -> int | None:
        # The controller prints a report line once the report (and its checkpoint) is registered.
        steps = [int(m) for m in re.findall(r"\[train\] step (\d+)/40", (tmp_path / "first.log").read_text())]
        saved = [s for s in steps if s % config.checkpoint_every == 0]
        return max(saved) if saved else None

    try:
        deadline = time.monotonic() + 240
        while reported_checkpoint() is None and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
        registered = reported_checkpoint()
        assert registered, f"no checkpoint before the kill:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
    finally:
        try:  # the job and the Ray it started (its process group): only processes this test started
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone
        first.wait()
    on_disk = _checkpoint_steps(storage)
    killed_at = max(on_disk)
    assert killed_at < 40 and not out.exists()

    second = subprocess.run(_train_command(dataset, out, storage, killed_at + 4, "--register-as", ""), cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resumed = {int(m) for m in re.findall(r"rank 0: resumed at step (\d+)", second.stdout + second.stderr)}
    assert len(resumed) == 1 and resumed <= set(on_disk) and min(resumed) >= registered, (resumed, on_disk, registered)
    final = max(storage.glob(f"killed/checkpoint_*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    state = torch.load(final, weights_only=True)
    assert state["step"] == killed_at + 4
    # AdamW's step counter lives in the optimizer state: restored and continued, not restarted.
    assert all(int(s["step"]) == killed_at + 4 for s in state["optimizer"]["state"].values())
    assert json.loads((out / "config.json").read_text())["metadata"]["step"] == killed_at + 4


def test_job_logs_the_run_to_mlflow_and_registers_a_model_that_uss_separate_loads(dataset, tmp_path, ray_local, monkeypatch):
    import soundfile
    import yaml
    from mlflow.tracking import MlflowClient

    from jobs import separate_files
    from jobs import train as train_job
    from uss_core.config import to_dict

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the embedded store in the workspace
    monkeypatch.setenv("USS_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(to_dict(tiny_config(max_steps=4, eval_every=2))))
    root = Path(dataset.mixtures_uri).parent
    argv = ["--mixtures", dataset.mixtures_uri, "--anchors", dataset.anchors_uri, "--remix", "--eval", dataset.eval_uri,
            "--condition-tagger", str(root / "tagger"), "--labels-csv", str(root / "labels.csv"),
            "--preset", str(tmp_path / "preset.yaml"), "--out", str(tmp_path / "separator"), "--run-name", "tracked",
            "--register-as", "tiny-separator"]
    assert train_job.main(argv) == 0

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string="tags.`uss.job` = 'train'")
    params = run.data.params
    assert params["data.mixtures_uri"] == dataset.mixtures_uri and params["data.anchors_uri"] == dataset.anchors_uri
    assert params["data.mixtures"] == "12" and params["data.train_anchors"] == "12" and params["data.eval_pairs"] == "6"
    assert params["remix"] == "True" and params["max_steps"] == "4" and params["steps_done"] == "4"
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [1, 2, 3, 4] and all(np.isfinite(m.value) for m in losses)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_sdri")] == [2, 4]
    assert "final_val_sdri" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")} == {
        "checkpoint/config.json", "checkpoint/model.safetensors"}
    (version,) = client.search_model_versions("name = 'tiny-separator'")
    assert str(version.version) == "1" and version.run_id == run.info.run_id

    # The registered model is a checkpoint `uss separate` loads by its registry URI.
    soundfile.write(tmp_path / "mix.wav", tone(600.0) + tone(900.0), RATE)
    assert separate_files.main([str(tmp_path / "mix.wav"), "-o", str(tmp_path / "out"), "--checkpoint",
                                "models:/tiny-separator/1", "--class", "Beta", "--device", "cpu", "--quiet"]) == 0
    stem, rate = soundfile.read(tmp_path / "out" / "mix" / "Beta.wav")
    assert rate == RATE and stem.shape == (SAMPLES,)
    manifest = json.loads((tmp_path / "out" / "mix" / "manifest.json").read_text())
    assert "models:/tiny-separator/1" in json.dumps(manifest)


def test_training_data_makes_local_paths_absolute(tmp_path, monkeypatch):
    # Ray workers run elsewhere: a relative --eval used to fail at the first validation.
    monkeypatch.chdir(tmp_path)
    data = TrainingData("mixtures", anchors_uri="file://anchors", eval_uri="s3://bucket/eval")
    assert data.mixtures_uri == str(tmp_path / "mixtures")
    assert data.anchors_uri == str(tmp_path / "anchors")
    assert data.eval_uri == "s3://bucket/eval"


def test_train_overrides_replace_preset_fields():
    from jobs.train import build_parser, load_config

    args = build_parser().parse_args(["--mixtures", "m", "--out", "o", "--loss", "snr", "--steps", "7", "--lr", "0.01"])
    config = load_config(args)
    assert (config.loss, config.max_steps, config.lr) == ("snr", 7, 0.01)
    assert load_config(build_parser().parse_args(["--mixtures", "m", "--out", "o"])).loss == "l1_wav"
