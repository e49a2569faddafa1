"""Tagger training on weak labels: AP/mAP, the split and class balance, presets, and real Ray Train
runs (2 CPU workers, gloo DDP) on a tiny synthetic clips dataset on S3 (moto) and on disk, with
the MLflow run checked in a SQLite store.

The synthetic clips are 1 s long: three classes (a low tone, a high tone, noise bursts), one or
two per clip at random times, over faint noise; the code takes the clip length from the data.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.schemas import CLIP_SCHEMA, Clip, records_to_table
from pipelines.tagger_training import (
    AugmentConfig,
    TaggerTrainingConfig,
    _augment,
    _to_examples,
    average_precision,
    is_validation,
    mean_average_precision,
    oversample_factors,
    repeat_counts,
)
from uss_core.checkpoints import load_tagger, read_checkpoint_document, TAGGER_FORMAT_NAME
from uss_core.config import load_yaml, to_dict
from uss_core.errors import ConfigError
from uss_core.models.panns import Cnn14Config
from uss_core.ontology import LabelSet

RATE = 32000
SECONDS = 1.0
LABELS = LabelSet(("/m/low", "/m/high", "/m/noise"), ("Low tone", "High tone", "Noise burst"))
PRESETS = Path(__file__).resolve().parent.parent / "jobs" / "presets"


def synthetic_clips(n: int, seed: int = 0) -> list[Clip]:
    """``n`` weakly labelled 1-s clips of 1-2 of the three classes, events 0.2-0.4 s long."""
    rng = np.random.default_rng(seed)
    samples = int(RATE * SECONDS)
    t = np.arange(samples) / RATE
    clips = []
    for i in range(n):
        wave = 0.003 * rng.standard_normal(samples)
        classes = sorted(rng.choice(3, size=int(rng.integers(1, 3)), replace=False).tolist())
        for c in classes:
            length = int(rng.uniform(0.2, 0.4) * RATE)
            start = int(rng.integers(0, samples - length))
            if c == 2:
                event = rng.standard_normal(length) * 0.2
            else:
                event = 0.3 * np.sin(2 * np.pi * (500.0 if c == 0 else 3000.0) * t[:length])
            wave[start : start + length] += event * np.hanning(length)
        clips.append(
            Clip(
                clip_id=f"synth/{i:04d}",
                source_uri=f"memory://synth/{i}",
                label_indexes=tuple(classes),
                label_mids=tuple(LABELS.mids[c] for c in classes),
                sample_rate=RATE,
                num_samples=samples,
                waveform=wave.astype(np.float32),
            )
        )
    return clips


def write_clips_folder(clips: list[Clip], write_file) -> None:
    """Write ``clips`` as three Parquet files via ``write_file(name, table)``."""
    for k in range(3):
        write_file(f"part-{k:03d}.parquet", records_to_table(clips[k::3], CLIP_SCHEMA))


def tiny_config(**overrides) -> TaggerTrainingConfig:
    base = TaggerTrainingConfig(
        model=Cnn14Config(conv_channels=(8, 16), embedding_size=16, mel_bins=32),
        head="sed",
        epochs=2,
        max_steps_per_epoch=3,
        batch_size=4,
        lr=3e-3,
        num_workers=2,
        cpus_per_worker=0.5,
        validation_fraction=0.25,
        seed=3,
        shuffle_buffer=8,
        augment=AugmentConfig(gain_db=3.0, time_shift=True, mixup_alpha=0.5),
    )
    return dataclasses.replace(base, **overrides)


# ---------------------------------------------------------------------------------------------
# Pure functions


def test_average_precision_hand_cases():
    # Ranking + - + -: precision 1 at recall 1/2, 2/3 at recall 1 -> (1 + 2/3) / 2.
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # Perfect ranking, and the worst one (positives last): 1 and (1/3 + 2/4) / 2.
    assert average_precision(np.array([0.9, 0.1, 0.8]), np.array([1, 0, 1])) == pytest.approx(1.0)
    assert average_precision(np.array([0.1, 0.2, 0.9, 0.8]), np.array([1, 1, 0, 0])) == pytest.approx((1 / 3 + 2 / 4) / 2)
    # Ties are one threshold: two equal scores, one positive -> precision 1/2 at recall 1.
    assert average_precision(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    assert average_precision(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    # Tie after a hit: + then {+, -} tied -> 1 * 1/2 + 2/3 * 1/2.
    assert average_precision(np.array([0.9, 0.4, 0.4]), np.array([1, 1, 0])) == pytest.approx(0.5 + 1 / 3)
    assert math.isnan(average_precision(np.array([0.3, 0.2]), np.array([0, 0])))


def test_mean_average_precision_skips_classes_without_positives():
    scores = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.4], [0.7, 0.3, 0.6]])
    targets = np.array([[1, 0, 0], [0, 0, 0], [0, 1, 0]])
    value, per_class = mean_average_precision(scores, targets)
    assert per_class[0] == pytest.approx(1.0)
    assert per_class[1] == pytest.approx(1 / 2)  # its positive (0.3) ranks second, after 0.8
    assert math.isnan(per_class[2])
    assert value == pytest.approx((1.0 + 1 / 2) / 2)
    with pytest.raises(ValueError):
        mean_average_precision(scores, targets[:2])


def test_split_is_deterministic_and_near_the_fraction():
    ids = [f"shard-{i // 100}/clip-{i:05d}" for i in range(4000)]
    first = [is_validation(c, 0.2) for c in ids]
    assert first == [is_validation(c, 0.2) for c in ids]
    assert 0.17 < np.mean(first) < 0.23
    # A larger fraction keeps every clip already held out (the hash, not a coin per call).
    assert all(is_validation(c, 0.3) for c, v in zip(ids, first) if v)


def test_oversampling_balances_by_the_rarest_label():
    counts = np.array([100, 25, 50, 0])
    factors = oversample_factors([(0,), (1,), (0, 2), (1, 2), (0, 3)], counts, power=1.0, max_oversample=3.0)
    np.testing.assert_allclose(factors, [1.0, 3.0, 2.0, 3.0, 1.0])  # 100/25 = 4 capped at 3
    np.testing.assert_allclose(oversample_factors([(1,)], counts, power=0.5, max_oversample=8), [2.0])
    ids = [f"c{i}" for i in range(20000)]
    repeats = repeat_counts(ids, np.full(len(ids), 1.5), seed=7)
    assert set(np.unique(repeats)) == {1, 2}
    assert abs(repeats.mean() - 1.5) < 0.02  # dithered: E[n] = f
    np.testing.assert_array_equal(repeats, repeat_counts(ids, np.full(len(ids), 1.5), seed=7))
    assert not np.array_equal(repeats, repeat_counts(ids, np.full(len(ids), 1.5), seed=8))


def test_examples_repeat_pad_and_multi_hot():
    clips = synthetic_clips(40)
    table = records_to_table(clips, CLIP_SCHEMA)
    config = tiny_config(max_oversample=2.0)
    counts = np.array([30, 5, 30])
    train = _to_examples(table, False, 3, 33000, counts, config)
    val = _to_examples(table, True, 3, 33000, None, config)
    is_val = [is_validation(c.clip_id, config.validation_fraction) for c in clips]
    assert val["waveform"].shape == (sum(is_val), 33000)
    assert train["waveform"].shape[0] >= len(clips) - sum(is_val)
    assert train["waveform"].dtype == np.float32 and train["target"].shape[1] == 3
    np.testing.assert_array_equal(train["waveform"][:, 32000:], 0.0)  # zero-padded to clip_samples
    # Targets are the weak labels; a clip with label 1 (the rarest) appears twice.
    kept = [c for c, v in zip(clips, is_val) if not v]
    expected_rows = sum(2 if 1 in c.label_indexes else 1 for c in kept)
    assert train["target"].shape[0] == expected_rows
    first = kept[0]
    np.testing.assert_array_equal(np.flatnonzero(train["target"][0]), first.label_indexes)
    np.testing.assert_array_equal(train["waveform"][0, :32000], first.waveform)


def test_augment_keeps_shapes_and_targets_without_mixup():
    torch = pytest.importorskip("torch")
    wave = torch.randn(4, 1000)
    target = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    rng = np.random.default_rng(0)
    out, out_target = _augment(wave, target, AugmentConfig(gain_db=6.0, time_shift=True), rng)
    assert out.shape == wave.shape and torch.equal(out_target, target)
    # A circular shift and a gain: per-row energy changes by the gain only (within +-6 dB).
    ratio = (out.pow(2).sum(1) / wave.pow(2).sum(1)).log10() * 10
    assert bool((ratio.abs() <= 6.0 + 1e-4).all())
    mixed, mixed_target = _augment(wave, target, AugmentConfig(mixup_alpha=1.0), rng)
    assert mixed.shape == wave.shape and mixed_target.shape == target.shape
    assert bool(((mixed_target >= 0) & (mixed_target <= 1)).all())


def test_presets_load_into_the_config():
    small = load_yaml(TaggerTrainingConfig, PRESETS / "tagger-cpu-small.yaml")
    full = load_yaml(TaggerTrainingConfig, PRESETS / "tagger-cnn14.yaml")
    assert small.head == "sed" and small.num_workers * small.cpus_per_worker < 2
    assert len(small.model.conv_channels) < len(full.model.conv_channels)
    assert full.model == Cnn14Config()  # exactly PANNs Cnn14 (classes_num comes from the labels)
    with pytest.raises(ConfigError, match="head"):
        TaggerTrainingConfig(head="frame")
    with pytest.raises(ConfigError, match="global batch"):
        TaggerTrainingConfig(batch_size=1, num_workers=2)


# ---------------------------------------------------------------------------------------------
# Ray Train runs


def test_train_sed_tagger_from_s3_to_s3(ray_local, s3_server, tmp_path):
    from pipelines.tagger_training import train_tagger

    fs = s3_server.fs
    clips = synthetic_clips(40, seed=1)

    def put(name, table):
        with fs.open(f"{s3_server.bucket}/tagger/clips/{name}", "wb") as f:
            pq.write_table(table, f)

    write_clips_folder(clips, put)
    seen = []
    result = train_tagger(
        tiny_config(),
        s3_server.uri("tagger/clips"),
        s3_server.uri("tagger/sed"),
        LABELS,
        filesystem=fs,
        storage_path=tmp_path / "ray_results",
        on_summary=seen.append,
    )
    summary = result.dataset
    assert seen == [summary]
    n_val = sum(is_validation(c.clip_id, 0.25) for c in clips)
    assert (summary.train_clips, summary.validation_clips) == (40 - n_val, n_val)
    assert summary.clip_samples == 32000 and summary.train_rows_per_epoch >= summary.train_clips
    assert sum(summary.train_class_counts) == sum(
        len(c.label_indexes) for c in clips if not is_validation(c.clip_id, 0.25)
    )
    assert [h["epoch"] for h in result.history] == [1, 2]
    for h in result.history:
        assert 0.0 <= h["val_mAP"] <= 1.0 and h["val_clips"] == n_val and h["train_loss"] > 0
    assert result.history[-1]["step"] == 6  # 2 epochs x max_steps_per_epoch 3
    assert result.exported_val_mAP == max(h["val_mAP"] for h in result.history)

    local = tmp_path / "downloaded"
    fs.get(f"{s3_server.bucket}/tagger/sed/", str(local), recursive=True)
    model, labels = load_tagger(local, sound_event_detection=True)
    assert labels == LABELS
    document = read_checkpoint_document(local, TAGGER_FORMAT_NAME)
    assert document["metadata"]["head"] == "sed" and document["metadata"]["epoch"] == result.exported_epoch
    torch = pytest.importorskip("torch")
    with torch.inference_mode():
        out = model(torch.from_numpy(clips[0].waveform[None]))
    assert out["framewise_output"].shape == (1, 101, 3)
    scores = np.stack([model(torch.from_numpy(c.waveform[None]))["clipwise_output"][0].detach().numpy() for c in clips[:6]])
    assert np.isfinite(scores).all()


def test_train_tagger_job_logs_to_mlflow(ray_local, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from jobs import train_tagger as job

    monkeypatch.setenv("USS_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    folder = tmp_path / "clips"
    folder.mkdir()
    write_clips_folder(synthetic_clips(30, seed=2), lambda name, table: pq.write_table(table, folder / name))
    labels_csv = LABELS.to_csv(tmp_path / "labels.csv")
    preset = tmp_path / "tiny.yaml"
    # cpu_bf16: the bfloat16 training forward where the CPU has it (fp32 elsewhere), through Ray Train.
    preset.write_text(yaml.safe_dump(to_dict(tiny_config(augment=AugmentConfig(), export="last", cpu_bf16=True))))
    out = tmp_path / "tagger-clip"
    code = job.main(
        [
            "--clips", str(folder), "--out", str(out), "--preset", str(preset), "--labels-csv", str(labels_csv),
            "--head", "clip", "--epochs", "2", "--num-workers", "1", "--run-name", "tiny-clip",
        ]
    )  # fmt: skip
    assert code == 0
    model, labels = load_tagger(out)
    assert labels == LABELS and type(model).__name__ == "Cnn14"
    assert read_checkpoint_document(out, TAGGER_FORMAT_NAME)["metadata"]["epoch"] == 2  # export: last

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("uss-at-scale").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-clip"
    params = run.data.params
    assert params["head"] == "clip" and params["num_workers"] == "1" and params["data.clips_uri"] == str(folder)
    assert params["cpu_bf16"] == "True"
    assert int(params["data.train_clips"]) + int(params["data.validation_clips"]) == 30
    assert params["data.num_classes"] == "3" and params["exported_epoch"] == "2"
    history = client.get_metric_history(run.info.run_id, "val_mAP")
    assert sorted(m.step for m in history) == [1, 2]
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [1, 2] and all(math.isfinite(m.value) and m.value > 0 for m in losses)
    assert run.data.metrics["final_val_mAP"] == pytest.approx(max(history, key=lambda m: m.step).value)
    names = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert {"checkpoint/config.json", "checkpoint/model.safetensors"} <= names
