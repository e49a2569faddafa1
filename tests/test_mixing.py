"""Mixing: the reference's energy match and clamp, the pairing rule (no shared labels, every
anchor a target once), the evaluation hold-out, byte-identical output whatever the input layout,
local paths and S3, and the mix job with MLflow.

The anchors are synthetic (noise at levels spread over 60 dB, so the gain clamp is hit), short
(0.25 s: mixing does not care about the length) and written by the tests.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.mixing import (
    GAIN_MAX,
    GAIN_MIN,
    MixingConfig,
    energy,
    energy_gain,
    is_held_out,
    mix,
    mix_anchors,
    plan_mixtures,
)
from pipelines.schemas import (
    ANCHOR_SCHEMA,
    MIXTURE_SCHEMA,
    Anchor,
    Mixture,
    make_mixture_id,
    read_table,
    records_to_table,
    table_to_records,
)
from uss_core.errors import ConfigError

SAMPLES = 8000
CLASSES = 6


def make_anchors(num_clips: int = 40, seed: int = 0) -> list[Anchor]:
    rng = np.random.default_rng(seed)
    anchors = []
    for c in range(num_clips):
        labels = tuple(sorted(rng.choice(CLASSES, size=int(rng.integers(1, 3)), replace=False).tolist()))
        for k in labels:
            level = 10 ** rng.uniform(-3, 0)
            anchors.append(
                Anchor(
                    f"sh/clip{c:03d}-/m/c{k}-max_area",
                    f"sh/clip{c:03d}",
                    k,
                    f"/m/c{k}",
                    16000,
                    16000 + SAMPLES,
                    float(rng.uniform()),
                    "max_area",
                    labels,
                    (level * rng.standard_normal(SAMPLES)).astype(np.float32),
                    rng.uniform(size=CLASSES).astype(np.float32),
                    rng.standard_normal(16).astype(np.float32),
                )
            )
    return anchors


ANCHORS = make_anchors()


def anchors_table(anchors=ANCHORS) -> pa.Table:
    return records_to_table(anchors, ANCHOR_SCHEMA)


def meta_table(anchors=ANCHORS) -> pa.Table:
    return anchors_table(anchors).select(["anchor_id", "clip_id", "class_index", "clip_label_indexes"])


# --------------------------------------------------------------------------------------------
# Energy matching


def test_energy_gain_is_the_reference_ratio_with_its_clamp():
    rng = np.random.default_rng(0)
    target = rng.standard_normal(1000).astype(np.float32)
    for scale, expected in [(0.5, 2.0), (4.0, 0.25), (1e-3, GAIN_MAX), (1e3, GAIN_MIN)]:
        assert energy_gain(target, target * scale) == pytest.approx(expected, rel=1e-5)
    assert energy_gain(target, np.zeros(1000, np.float32)) == GAIN_MAX  # silent partner: eps, then clamp
    assert energy_gain(np.zeros(1000, np.float32), target) == GAIN_MIN


@pytest.mark.reference
def test_energy_gain_equals_the_reference_package():
    mixers = pytest.importorskip("uss.data.anchor_segment_mixers", reason="install the reference extra")
    import torch

    rng = np.random.default_rng(1)
    for _ in range(50):
        a = (10 ** rng.uniform(-4, 0) * rng.standard_normal(4000)).astype(np.float32)
        b = (10 ** rng.uniform(-4, 0) * rng.standard_normal(4000)).astype(np.float32)
        ref = float(mixers.get_energy_ratio(torch.from_numpy(a), torch.from_numpy(b)))
        assert energy_gain(a, b) == pytest.approx(ref, rel=1e-4)
        ref_mixture, ref_target = mixers.AnchorSegmentMixer(2, True)(torch.from_numpy(np.stack([a, b])))
        ours, _ = mix(a, [b])
        np.testing.assert_allclose(ours, ref_mixture[0].numpy(), rtol=1e-4, atol=1e-7)


def test_mix_matches_partner_energy_to_the_target():
    rng = np.random.default_rng(2)
    target = (0.1 * rng.standard_normal(SAMPLES)).astype(np.float32)
    partners = [(s * rng.standard_normal(SAMPLES)).astype(np.float32) for s in (0.01, 0.5)]
    mixture, gains = mix(target, partners)
    for p, g in zip(partners, gains):
        assert energy(p * g) == pytest.approx(energy(target), rel=1e-4)
    np.testing.assert_array_equal(mixture, target + partners[0] * gains[0] + partners[1] * gains[1])
    plain, ones = mix(target, partners, match_energy=False)
    assert np.array_equal(ones, [1.0, 1.0]) and np.array_equal(plain, target + partners[0] + partners[1])


# --------------------------------------------------------------------------------------------
# Pairing


@pytest.mark.parametrize("mix_num", [2, 3])
def test_plan_groups_share_no_label_and_use_each_target_once(mix_num):
    labels = {a.anchor_id: set(a.clip_label_indexes) for a in ANCHORS}
    plan = plan_mixtures(meta_table(), MixingConfig(mix_num=mix_num, seed=3), make_eval=False)
    groups = plan.groups["train"]
    assert len(groups) + plan.dropped["train"] == len(ANCHORS)
    assert len(groups) > 0.8 * len(ANCHORS)
    targets = [g[0] for g in groups]
    assert len(set(targets)) == len(targets)
    for group in groups:
        assert len(group) == mix_num
        for i in range(mix_num):
            for j in range(i + 1, mix_num):
                assert labels[group[i]].isdisjoint(labels[group[j]]), group


def test_plan_is_deterministic_and_independent_of_row_order():
    config = MixingConfig(seed=7)
    plan = plan_mixtures(meta_table(), config, make_eval=False)
    shuffled = meta_table().take(pa.array(np.random.default_rng(0).permutation(len(ANCHORS))))
    assert plan_mixtures(shuffled, config, make_eval=False).groups == plan.groups
    assert plan_mixtures(meta_table(), MixingConfig(seed=8), make_eval=False).groups != plan.groups


def test_duplicate_anchor_ids_are_refused():
    meta = meta_table()
    with pytest.raises(ConfigError, match="not unique"):
        plan_mixtures(pa.concat_tables([meta, meta.slice(0, 1)]), MixingConfig(), make_eval=False)


def test_hold_out_is_a_hash_of_the_clip_id():
    ids = [f"shard/clip{i}" for i in range(20000)]
    held = [is_held_out(c, 0.1) for c in ids]
    assert abs(np.mean(held) - 0.1) < 0.01
    first = int.from_bytes(hashlib.sha256(ids[0].encode()).digest()[:8], "big") / 2**64
    assert held[0] == (first < 0.1)


def test_eval_plan_uses_held_out_clips_only():
    anchors = make_anchors(200, seed=4)
    config = MixingConfig(seed=1, eval_per_class=3, eval_fraction=0.25)
    plan = plan_mixtures(meta_table(anchors), config, make_eval=True)
    clip_of = {a.anchor_id: a.clip_id for a in anchors}
    class_of = {a.anchor_id: a.class_index for a in anchors}
    for group in plan.groups["train"]:
        assert not any(is_held_out(clip_of[a], 0.25) for a in group)
    for group in plan.groups["eval"]:
        assert all(is_held_out(clip_of[a], 0.25) for a in group)
    assert set(plan.eval_counts) == set(range(CLASSES)) and all(n == 3 for n in plan.eval_counts.values())
    per_class = [class_of[g[0]] for g in plan.groups["eval"]]
    assert per_class == sorted(per_class)


# --------------------------------------------------------------------------------------------
# The Ray stage: byte-identical files, local and S3; the job


CONFIG = MixingConfig(seed=11, mixtures_per_file=8, eval_per_class=2, eval_fraction=0.2)
CONFIG_ARGS = ["--seed", "11", "--mixtures-per-file", "8", "--eval-per-class", "2", "--eval-fraction", "0.2"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


@pytest.fixture(scope="module")
def mixed(ray_local, tmp_path_factory) -> Path:
    """The anchors in two layouts (one file; three files of shuffled rows and small row groups),
    and the first one mixed with CONFIG into m1 (training) and e1 (evaluation)."""
    root = tmp_path_factory.mktemp("mixing")
    table = anchors_table()
    (root / "a1").mkdir()
    pq.write_table(table, root / "a1" / "all.parquet")
    (root / "a2").mkdir()
    shuffled = table.take(pa.array(np.random.default_rng(5).permutation(table.num_rows)))
    for k, rows in enumerate(np.array_split(np.arange(table.num_rows), 3)):
        pq.write_table(shuffled.take(pa.array(rows)), root / "a2" / f"part-{k}.parquet", row_group_size=7)
    result = mix_anchors(str(root / "a1"), str(root / "m1"), CONFIG, eval_uri=str(root / "e1"))
    assert result.num_mixtures > 0 and result.num_eval > 0 and result.num_anchors == len(ANCHORS)
    return root


def test_mixtures_are_built_from_their_anchors(mixed):
    # Plain pyarrow reads them; every row is a valid Mixture built from its anchors.
    table = pq.read_table(mixed / "m1")
    assert table.schema.equals(MIXTURE_SCHEMA) and len(_files(mixed / "m1")) > 2
    mixtures = table_to_records(table, Mixture)
    by_id = {a.anchor_id: a for a in ANCHORS}
    clamped = 0
    for m in mixtures:
        target, partners = by_id[m.target_anchor_id], [by_id[p] for p in m.partner_anchor_ids]
        assert m.mixture_id == make_mixture_id([m.target_anchor_id, *m.partner_anchor_ids])
        assert set(target.clip_label_indexes).isdisjoint(partners[0].clip_label_indexes)
        assert m.target_class_index == target.class_index and m.partner_class_indexes == (partners[0].class_index,)
        assert np.array_equal(m.target, target.waveform) and m.target_gain == 1.0
        assert np.array_equal(m.condition_at_soft, target.condition_at_soft)
        assert np.array_equal(m.condition_embedding, target.condition_embedding)
        assert np.array_equal(m.partner_gains, [np.float32(energy_gain(target.waveform, partners[0].waveform))])
        np.testing.assert_array_equal(m.mixture, target.waveform + partners[0].waveform * m.partner_gains[0])
        clamped += int(m.partner_gains[0] in (np.float32(GAIN_MIN), np.float32(GAIN_MAX)))
    assert clamped > 0  # levels span 60 dB: some gains hit the clamp
    plan = plan_mixtures(meta_table(), CONFIG, make_eval=True)
    assert [m.mixture_id for m in mixtures] == [make_mixture_id(g) for g in plan.groups["train"]]  # plan order
    held = {m.target_anchor_id for m in table_to_records(read_table(mixed / "e1"), Mixture)}
    assert held and not held & {m.target_anchor_id for m in mixtures}


def test_mix_job_is_byte_identical_on_another_layout_and_logs_to_mlflow(mixed, tmp_path, monkeypatch, capsys):
    import mlflow

    from jobs import mix as mix_job

    monkeypatch.setenv("USS_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    argv = ["--anchors", str(mixed / "a2"), "--out", str(tmp_path / "m2"), "--eval-out", str(tmp_path / "e2"), *CONFIG_ARGS]
    assert mix_job.main(argv) == 0
    assert f"mix: {len(ANCHORS)} anchors" in capsys.readouterr().out
    assert _files(mixed / "m1") == _files(tmp_path / "m2")
    assert _files(mixed / "e1") == _files(tmp_path / "e2")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`uss.job` = 'mix'", output_format="list")
    assert run.data.metrics["anchors"] == len(ANCHORS)
    assert run.data.metrics["mixtures"] == pq.read_table(tmp_path / "m2").num_rows
    assert run.data.metrics["eval_mixtures"] == pq.read_table(tmp_path / "e2").num_rows > 0
    assert run.data.tags["uss.output"] == str(tmp_path / "m2") and run.data.params["mixing.seed"] == "11"


def test_mix_s3_in_and_out_gives_the_same_bytes(mixed, s3_server):
    fs = s3_server.fs
    with fs.open(s3_server.uri("mix/anchors/part-0.parquet"), "wb") as f:
        pq.write_table(anchors_table(), f)
    result = mix_anchors(
        s3_server.uri("mix/anchors"), s3_server.uri("mix/out"), CONFIG, eval_uri=s3_server.uri("mix/eval"), filesystem=fs
    )
    assert result.num_mixtures == pq.read_table(mixed / "m1").num_rows
    for folder, local in (("out", "m1"), ("eval", "e1")):
        remote = {Path(p).name: fs.cat_file(p) for p in sorted(fs.glob(f"{s3_server.bucket}/mix/{folder}/*.parquet"))}
        assert remote == _files(mixed / local)


def test_anchors_of_different_lengths_are_refused(ray_local, tmp_path):
    short = ANCHORS[0]
    odd = Anchor(short.anchor_id + "x", short.clip_id, short.class_index, short.class_mid, 0, 100, 0.5, "random",
                 short.clip_label_indexes, np.zeros(100, np.float32), short.condition_at_soft, short.condition_embedding)
    (tmp_path / "a").mkdir()
    pq.write_table(anchors_table([*ANCHORS[:5], odd]), tmp_path / "a" / "part-0.parquet")
    with pytest.raises(ConfigError, match="different lengths"):
        mix_anchors(str(tmp_path / "a"), str(tmp_path / "m"), MixingConfig())
