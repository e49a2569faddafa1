"""Separator evaluation: metrics on pairs with known answers, conditions per query-net type, the IRM
ceiling, class averaging, and the evaluate job end to end on a tiny random model (Parquet and
audio-folder evaluation sets, local and S3, MLflow metrics and artifacts)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import torch

from jobs import evaluate as evaluate_job
from pipelines.evaluation import (
    CLASS_METRICS,
    ClassScores,
    class_table_markdown,
    read_class_table,
    report_markdown,
    write_class_table,
)
from pipelines.schemas import (
    MIXTURE_SCHEMA,
    Mixture,
    make_anchor_id,
    make_mixture_id,
    records_to_table,
)
from uss_core.checkpoints import SeparatorModel, SeparatorModelConfig, save_checkpoint
from uss_core.errors import AudioError, ConfigError, LabelError
from uss_core.evaluation import (
    class_average,
    ideal_ratio_mask,
    pair_conditions,
    pair_scores,
    separate_pairs,
)
from uss_core.metrics import sdr
from uss_core.models.panns import Cnn14Config
from uss_core.models.query_nets import QueryNetConfig
from uss_core.models.resunet import ResUNetConfig
from uss_core.ontology import LabelSet

torch.set_num_threads(1)

RATE = 32000
LABELS = LabelSet(mids=tuple(f"/m/x{i}" for i in range(4)), names=("Dog", "Piano", "Rain", "Speech"))


def tiny_model(condition_type: str = "at_soft", embedding_size: int = 8) -> SeparatorModel:
    tagger = Cnn14Config(classes_num=len(LABELS), conv_channels=(4, 8), embedding_size=embedding_size)
    query = QueryNetConfig(condition_type=condition_type, tagger=tagger, adaptor_hidden=6, adaptor_outputs=5)
    separator = ResUNetConfig(condition_size=query.condition_size, encoder_channels=(4, 8))
    torch.manual_seed(0)
    return SeparatorModel(SeparatorModelConfig(separator=separator, query_net=query))


def tone(freq: float, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Known answers


def test_perfect_estimate_hits_the_metric_cap_and_the_mixture_scores_zero_improvement():
    rng = np.random.default_rng(0)
    targets = (0.1 * rng.standard_normal((3, 8000))).astype(np.float32)
    mixtures = targets + (0.1 * rng.standard_normal((3, 8000))).astype(np.float32)

    perfect = pair_scores(targets, targets, mixtures)
    power = np.mean(targets.astype(np.float64) ** 2, axis=1)
    # sdr's error power is floored at eps = 1e-10: a perfect estimate scores 10 log10(power / eps).
    np.testing.assert_allclose(perfect["sdr"], 10 * np.log10(power / 1e-10), rtol=1e-9)
    variance = np.var(targets.astype(np.float64), axis=1)  # SI-SDR works on zero-mean signals
    np.testing.assert_allclose(perfect["si_sdr"], 10 * np.log10(variance / 1e-10), rtol=1e-9)
    np.testing.assert_allclose(perfect["sdri"], perfect["sdr"] - perfect["mixture_sdr"])
    # target + independent noise of equal power: the mixture is at about 0 dB.
    np.testing.assert_allclose(perfect["mixture_sdr"], 0.0, atol=0.3)

    unprocessed = pair_scores(mixtures, targets, mixtures)
    np.testing.assert_array_equal(unprocessed["sdri"], 0.0)
    np.testing.assert_array_equal(unprocessed["si_sdri"], 0.0)

    doubled = pair_scores(2 * targets, targets, mixtures)  # error == target: SDR 0 dB; SI-SDR blind to scale
    np.testing.assert_allclose(doubled["sdr"], 0.0, atol=1e-6)
    np.testing.assert_allclose(doubled["si_sdr"], 10 * np.log10(4 * variance / 1e-10), rtol=1e-9)


def test_ideal_ratio_mask_recovers_a_target_with_a_disjoint_spectrum():
    target, noise = tone(440), tone(6000, amplitude=1.0)
    mixture = target + noise
    estimate = ideal_ratio_mask(mixture, target)
    assert estimate.shape == target.shape and estimate.dtype == np.float32
    assert sdr(target, mixture) < 0 and sdr(target, estimate) > 40
    # No interference: the mask is 1 everywhere and the STFT round trip gives the target back.
    assert sdr(target, ideal_ratio_mask(target, target)) > 60
    # Batched rows give the same as one at a time.
    batch = ideal_ratio_mask(np.stack([mixture, target]), np.stack([target, target]))
    np.testing.assert_allclose(batch[0], estimate, atol=1e-6)


def test_ideal_ratio_mask_of_overlapping_sources_is_a_ceiling_not_a_copy():
    rng = np.random.default_rng(1)
    target = (0.1 * rng.standard_normal(RATE)).astype(np.float32)
    noise = (0.1 * rng.standard_normal(RATE)).astype(np.float32)
    irm_sdr = sdr(target, ideal_ratio_mask(target + noise, target))
    assert sdr(target, target + noise) + 3 < irm_sdr < 20  # a real gain, far from perfect on white noise


def test_class_average_is_the_mean_of_per_class_nan_medians():
    values = [1.0, 2.0, 3.0, np.nan, 10.0, 5.0, np.nan]
    classes = [0, 0, 0, 2, 2, 7, 9]
    medians, mean = class_average(values, classes)
    assert list(medians) == [0, 2, 7, 9]
    assert medians[0] == 2.0 and medians[2] == 10.0 and medians[7] == 5.0 and np.isnan(medians[9])
    assert mean == pytest.approx((2.0 + 10.0 + 5.0) / 3)  # the all-NaN class is left out
    with pytest.raises(ValueError):
        class_average([1.0, 2.0], [0])


# --------------------------------------------------------------------------------------------
# Conditions and batched separation


def test_hard_condition_is_the_one_hot_class():
    model = tiny_model("hard")
    conditions = pair_conditions(model, class_indexes=[2, 0, 2])
    np.testing.assert_array_equal(conditions, np.eye(4, dtype=np.float32)[[2, 0, 2]])
    with pytest.raises(ConfigError, match="class_indexes"):
        pair_conditions(model, targets=np.zeros((1, 100), np.float32))
    with pytest.raises(ConfigError, match="class indexes"):
        pair_conditions(model, class_indexes=[4])


def test_soft_condition_is_precomputed_or_the_query_net_of_the_target():
    model = tiny_model("at_soft")
    rng = np.random.default_rng(2)
    targets = (0.1 * rng.standard_normal((3, RATE))).astype(np.float32)
    precomputed = rng.uniform(size=(3, 4)).astype(np.float32)
    np.testing.assert_array_equal(pair_conditions(model, at_soft=precomputed, targets=targets), precomputed)
    with torch.inference_mode():
        expected = model.eval().query_net.bottleneck(torch.from_numpy(targets)).numpy()
    np.testing.assert_allclose(pair_conditions(model, targets=targets, batch_size=2), expected, atol=1e-6)
    with pytest.raises(ConfigError, match="precomputed at_soft rows or the target audio"):
        pair_conditions(model, class_indexes=[0])
    with pytest.raises(ConfigError, match="shape"):
        pair_conditions(model, at_soft=np.zeros((3, 8), np.float32))


def test_adaptive_condition_adapts_the_bottleneck_in_eval_mode_and_restores_training_mode():
    model = tiny_model("adaptive")
    bottleneck = np.random.default_rng(3).uniform(size=(4, 4)).astype(np.float32)
    model.train()
    first = pair_conditions(model, at_soft=bottleneck)
    assert model.training and model.query_net.fc1.training and not model.query_net.base.training
    # Dropout off: the same input gives the same condition, and it is the adaptor's output.
    np.testing.assert_array_equal(pair_conditions(model, at_soft=bottleneck), first)
    with torch.inference_mode():
        expected = model.eval().query_net.adapt(torch.from_numpy(bottleneck)).numpy()
    np.testing.assert_allclose(first, expected, atol=1e-6)
    assert first.shape == (4, 5)


def test_separate_pairs_matches_the_model_in_eval_mode_and_leaves_training_state_alone():
    model = tiny_model("hard")
    rng = np.random.default_rng(4)
    mixtures = (0.1 * rng.standard_normal((3, 16000))).astype(np.float32)
    conditions = pair_conditions(model, class_indexes=[0, 1, 3])
    model.train()
    running_mean = model.ss_model.base.bn0.running_mean.clone()
    estimates = separate_pairs(model, mixtures, conditions, batch_size=2)
    assert model.training and model.ss_model.training
    assert torch.equal(model.ss_model.base.bn0.running_mean, running_mean)  # eval mode: statistics untouched
    with torch.inference_mode():
        model.eval()
        expected = model.ss_model(torch.from_numpy(mixtures)[:, None], torch.from_numpy(conditions))[:, 0].numpy()
    assert estimates.shape == mixtures.shape
    np.testing.assert_allclose(estimates, expected, atol=1e-5)
    bf16 = separate_pairs(model, mixtures, conditions, batch_size=2, precision="bf16")
    assert not np.array_equal(bf16, estimates)  # autocast really ran
    assert 10 * np.log10(np.sum(estimates**2) / np.sum((bf16 - estimates) ** 2)) > 25
    with pytest.raises(ConfigError, match="conditions has shape"):
        separate_pairs(model, mixtures, conditions[:2])


# --------------------------------------------------------------------------------------------
# The job


def eval_rows(pairs_per_class: int = 2, classes=(0, 1, 3), seconds: float = 1.0, mids=LABELS.mids) -> list[Mixture]:
    """Mixture records as the mixing stage writes them: tones of the target class over noise."""
    rng = np.random.default_rng(5)
    rows = []
    for c in classes:
        for k in range(pairs_per_class):
            target = tone(200 * (c + 1) + 50 * k, seconds)
            partner = (0.05 * rng.standard_normal(target.size)).astype(np.float32)
            ids = [
                make_anchor_id(f"eval/clip{c}{k}", mids[c], "max_area"),
                make_anchor_id(f"eval/noise{c}{k}", "/m/n", "random"),
            ]
            rows.append(
                Mixture(
                    make_mixture_id(ids), ids[0], (ids[1],), c, (9,), target + partner, target,
                    np.eye(len(LABELS), dtype=np.float32)[c], rng.standard_normal(8).astype(np.float32),
                    1.0, np.ones(1, np.float32),
                )
            )
    return rows


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tiny_model("at_soft"), LABELS, tmp_path_factory.mktemp("ckpt") / "separator")


@pytest.fixture(scope="module")
def eval_parquet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval") / "eval-mixtures"
    folder.mkdir()
    rows = eval_rows()
    # Two files, as the mixing stage writes them (one per chunk of rows).
    pq.write_table(records_to_table(rows[:4], MIXTURE_SCHEMA), folder / "part-000000.parquet")
    pq.write_table(records_to_table(rows[4:], MIXTURE_SCHEMA), folder / "part-000001.parquet")
    return folder


def test_evaluate_job_writes_the_report_and_logs_mlflow_metrics(
    checkpoint, eval_parquet, tmp_path, monkeypatch, capsys
):
    from mlflow.tracking import MlflowClient

    # The embedded store (no MLFLOW_TRACKING_URI): the run and its artifacts live in the workspace.
    # delenv also makes monkeypatch remove the variable MLflow itself exports when the test ends.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("USS_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "report"
    argv = ["--checkpoint", str(checkpoint), "--eval", str(eval_parquet), "--out", str(out), "--batch-size", "4",
            "--device", "cpu"]
    assert evaluate_job.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| class | name | pairs | SDRi |" in printed
    assert "evaluate: 6 pairs, 3 classes, conditions from dataset" in printed

    classes = read_class_table(out / "classes.csv")
    assert [(c.class_index, c.mid, c.name, c.pairs) for c in classes] == [
        (0, "/m/x0", "Dog", 2), (1, "/m/x1", "Piano", 2), (3, "/m/x3", "Speech", 2)
    ]
    with open(out / "pairs.csv", newline="") as f:
        pairs = list(csv.DictReader(f))
    assert [p["pair_id"] for p in pairs] == [m.mixture_id for m in eval_rows()]
    # Class rows are the medians of their pairs (two pairs: the mean of both), the mixture is the zero line.
    for row in classes:
        mine = [p for p in pairs if int(p["class_index"]) == row.class_index]
        assert row.sdri == pytest.approx(np.median([float(p["sdri"]) for p in mine]), abs=1e-3)
        for p in mine:
            assert float(p["sdri"]) == pytest.approx(float(p["sdr"]) - float(p["mixture_sdr"]), abs=2e-4)
    # The IRM ceiling: tones over weak noise are nearly perfectly recovered by an oracle mask.
    assert all(c.irm_sdri > 10 for c in classes)
    # The ceiling is recomputed on the same pairs here, independently of the job.
    first = eval_rows()[0]
    expected_irm = sdr(first.target, ideal_ratio_mask(first.mixture, first.target)) - sdr(first.target, first.mixture)
    assert float(pairs[0]["irm_sdri"]) == pytest.approx(expected_irm, abs=1e-3)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 6 and summary["classes"] == 3 and summary["conditions"] == "dataset"
    assert summary["precision"] == "fp32"  # the default: scores that do not depend on the CPU
    averages = summary["class_average"]
    assert averages["sdri"] == pytest.approx(np.mean([c.sdri for c in classes]), abs=1e-6)
    assert (out / "sdri_per_class.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = report_markdown(out)
    assert "**class average** (3 classes)" in markdown and f"**{averages['sdri']:.2f}**" in markdown

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}")
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string="tags.`uss.job` = 'evaluate'"
    )
    metrics = run.data.metrics
    for name in CLASS_METRICS:
        assert metrics[name] == pytest.approx(averages[name])
    assert metrics["class/3/sdri"] == pytest.approx(classes[2].sdri) and metrics["pairs"] == 6
    assert run.data.params["batch_size"] == "4" and run.data.tags["uss.conditions"] == "dataset"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"classes.csv", "pairs.csv", "summary.json", "sdri_per_class.png"}
    assert run.info.artifact_uri.startswith((tmp_path / "ws" / "mlartifacts").as_uri())
    assert not (tmp_path / "mlruns").exists()


def test_query_net_conditions_and_s3_inputs(checkpoint, eval_parquet, s3_server, tmp_path):
    fs = s3_server.fs
    fs.put(str(checkpoint), s3_server.uri("models/separator"), recursive=True)
    for path in sorted(eval_parquet.glob("*.parquet")):
        fs.put(str(path), s3_server.uri(f"eval/{path.name}"))
    remote = evaluate_job.evaluate(
        s3_server.uri("models/separator"), s3_server.uri("eval"), tmp_path / "s3", device="cpu",
        conditions="query-net", filesystem=fs, track=False,
    )
    local = evaluate_job.evaluate(checkpoint, str(eval_parquet), tmp_path / "local", device="cpu",
                                  conditions="query-net", track=False)
    assert remote.conditions == "query-net" and remote.num_pairs == 6 and remote.run_id is None
    assert remote.averages == pytest.approx(local.averages)
    dataset = evaluate_job.evaluate(checkpoint, str(eval_parquet), tmp_path / "dataset", device="cpu", track=False)
    # The random query net's probabilities are not the one-hot rows stored in the set.
    assert dataset.conditions == "dataset" and dataset.averages["sdri"] != pytest.approx(local.averages["sdri"])
    assert dataset.averages["irm_sdri"] == pytest.approx(local.averages["irm_sdri"])  # the oracle needs no model


def test_evaluation_set_of_another_label_set_is_refused(checkpoint, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    other = ("/m/x0", "/m/zz", "/m/x2", "/m/x3")
    pq.write_table(records_to_table(eval_rows(1, classes=(1,), mids=other), MIXTURE_SCHEMA), folder / "p.parquet")
    with pytest.raises(ConfigError, match="another label set"):
        evaluate_job.evaluate(checkpoint, str(folder), tmp_path / "out", device="cpu", track=False)


def test_precomputed_conditions_that_do_not_fit_the_model_ask_for_query_net_conditions(eval_parquet, tmp_path):
    # The set's embeddings are 8 wide (its mining tagger); this model's query net makes 6.
    checkpoint = save_checkpoint(tiny_model("embedding", embedding_size=6), LABELS, tmp_path / "embedding")
    with pytest.raises(ConfigError, match="--conditions query-net"):
        evaluate_job.evaluate(checkpoint, str(eval_parquet), tmp_path / "out", device="cpu", track=False)
    result = evaluate_job.evaluate(
        checkpoint, str(eval_parquet), tmp_path / "out", device="cpu", conditions="query-net", track=False
    )
    assert result.num_pairs == 6 and result.conditions == "query-net"


def write_pair(folder, name, mixture, source):
    folder.mkdir(parents=True, exist_ok=True)
    soundfile.write(folder / f"{name},mixture.wav", mixture, RATE, subtype="FLOAT")
    soundfile.write(folder / f"{name},source.wav", source, RATE, subtype="FLOAT")


def test_audio_folder_in_the_reference_layout_and_with_labels_csv(checkpoint, tmp_path):
    root = tmp_path / "pairs"
    rows = eval_rows(1, classes=(0, 2), seconds=0.5)
    for row in rows:  # the reference's layout: class_id=N/<name>,mixture.wav
        write_pair(root / f"class_id={row.target_class_index}", f"seg{row.target_class_index}", row.mixture, row.target)
    longer = eval_rows(1, classes=(3,), seconds=0.75)[0]  # another length, a class from labels.csv
    write_pair(root / "extra", "talk", longer.mixture, longer.target)
    (root / "labels.csv").write_text("pair,label\nextra/talk,Speech\n")
    result = evaluate_job.evaluate(checkpoint, str(root), tmp_path / "out", device="cpu", track=False)
    assert result.conditions == "query-net" and result.num_pairs == 3
    assert [(c.class_index, c.pairs) for c in result.classes] == [(0, 1), (2, 1), (3, 1)]
    with open(result.paths.pairs_csv, newline="") as f:
        pairs = {p["pair_id"]: p for p in csv.DictReader(f)}
    assert set(pairs) == {"class_id=0/seg0", "class_id=2/seg2", "extra/talk"}
    # Same audio as the Parquet row: the same oracle score.
    expected = sdr(longer.target, ideal_ratio_mask(longer.mixture, longer.target)) - sdr(longer.target, longer.mixture)
    assert float(pairs["extra/talk"]["irm_sdri"]) == pytest.approx(expected, abs=1e-3)

    with pytest.raises(ConfigError, match="precomputed conditions"):
        evaluate_job.evaluate(checkpoint, str(root), tmp_path / "o2", device="cpu", conditions="dataset", track=False)
    (root / "labels.csv").unlink()
    with pytest.raises(LabelError, match="extra/talk: no class"):
        evaluate_job.evaluate(checkpoint, str(root), tmp_path / "o3", device="cpu", track=False)
    (root / "extra" / "talk,source.wav").unlink()
    with pytest.raises(AudioError, match="lack their mixture or source"):
        evaluate_job.evaluate(checkpoint, str(root), tmp_path / "o4", device="cpu", track=False)
    with pytest.raises(LabelError, match="out of range"):
        write_pair(root / "class_id=7", "x", rows[0].mixture, rows[0].target)
        (root / "extra" / "talk,mixture.wav").unlink()
        evaluate_job.evaluate(checkpoint, str(root), tmp_path / "o5", device="cpu", track=False)


def test_class_table_csv_and_markdown_round_trip(tmp_path):
    rows = [
        ClassScores(0, "/m/a", "Bass | guitar", 3, 1.234, 0.5, 9.0, 8.5, -0.25),
        ClassScores(5, "/m/b", "Rain", 1, float("nan"), -1.0, 7.0, 6.0, 0.0),
    ]
    write_class_table(rows, tmp_path / "classes.csv")
    again = read_class_table(tmp_path / "classes.csv")
    assert again[0] == rows[0] and again[1].name == "Rain" and np.isnan(again[1].sdri)
    markdown = class_table_markdown(again, {"sdri": 1.234, "si_sdri": -0.25, "irm_sdri": 8.0, "irm_si_sdri": 7.25,
                                            "mixture_sdr": -0.125})
    lines = markdown.splitlines()
    assert lines[0] == "| class | name | pairs | SDRi | SI-SDRi | IRM SDRi | IRM SI-SDRi | mixture SDR |"
    assert lines[2] == "| 0 | Bass \\| guitar | 3 | 1.23 | 0.50 | 9.00 | 8.50 | -0.25 |"
    assert lines[3].startswith("| 5 | Rain | 1 | n/a |")
    averages_row = "| | **class average** (2 classes) | 4 | **1.23** | **-0.25** | **8.00** | **7.25** | **-0.12** |"
    assert lines[4] == averages_row
