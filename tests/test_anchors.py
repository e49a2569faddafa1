"""Anchor mining: the max-area arithmetic against the reference's, random placement, the Ray
stage on local paths and S3, the mine / ingest / anchor-accuracy jobs.

The SED in the plumbing tests is a real :class:`Cnn14DecisionLevelMax` with random weights made
non-negative: log-mel values are positive only where there is sound, so it is an energy detector
and a noise burst at a known time must give an anchor there. The clips are 10 s of near-silence
with one burst.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from pipelines.anchors import (
    AnchorGeometry,
    AnchorMiner,
    MiningConfig,
    anchor_accuracy,
    anchor_score,
    max_area_anchor,
    mine_anchors,
    random_anchor,
)
from pipelines.schemas import (
    ANCHOR_SCHEMA,
    CLIP_SCHEMA,
    Anchor,
    Clip,
    list_column_to_numpy,
    read_table,
    records_to_table,
    table_to_records,
)
from uss_core.checkpoints import load_tagger, save_tagger_checkpoint
from uss_core.errors import ConfigError
from uss_core.models.panns import Cnn14, Cnn14Config, Cnn14DecisionLevelMax
from uss_core.ontology import LabelSet

RATE = 32000
CLIP = 320000
GEOMETRY = AnchorGeometry(RATE, 320, CLIP, 2.0)
LABELS = LabelSet(["/m/a", "/m/b", "/m/c", "/m/d"], ["Alpha", "Beta", "Gamma", "Delta"])
TINY = dict(conv_channels=(4, 8), embedding_size=16)

# (labels, burst onset seconds): one 2-s noise burst per clip
CLIPS = [([0], 6.0), ([1, 2], 1.0), ([0, 2], 4.0), ([3], 8.0), ([1], 0.0), ([2, 3], 3.5)]


# --------------------------------------------------------------------------------------------
# The reference's arithmetic, re-implemented here from uss/data/anchor_segment_detectors.py


def reference_anchor(prob: torch.Tensor, clip_seconds=10, segment_seconds=2, fps=100, sample_rate=32000):
    clip_frames = int(clip_seconds * fps)
    segment_frames = int(segment_seconds * fps + 1)
    hop_samples = sample_rate // fps
    x = F.pad(prob[None, None, :], pad=(segment_frames // 2, segment_frames // 2), mode="replicate")
    scores = torch.conv1d(x, torch.ones(1, 1, segment_frames) / segment_frames, padding=0).squeeze(dim=(0, 1))
    anchor_index = torch.clamp(torch.argmax(scores), min=segment_frames // 2, max=clip_frames - segment_frames // 2)
    bgn = (anchor_index - segment_frames // 2) * hop_samples
    end = (anchor_index + segment_frames // 2) * hop_samples
    return int(bgn), int(end)


def test_geometry_of_two_second_anchors():
    assert (GEOMETRY.clip_frames, GEOMETRY.segment_frames, GEOMETRY.anchor_samples) == (1000, 201, 64000)


@pytest.mark.parametrize(
    "plateau, expected_start",
    [
        ((300, 501), 300 * 320),  # 201 frames: one window holds it all, centred on frame 400
        ((0, 40), 0),  # near the start: the centre is clamped to frame 100
        ((960, 1001), 800 * 320),  # near the end: clamped to frame 900 (clip_frames - 100)
        ((300, 500), 299 * 320),  # 200 frames: windows at 399 and 400 tie, the first wins
    ],
)
def test_max_area_on_hand_made_curves(plateau, expected_start):
    prob = torch.full((1001,), 0.05)
    prob[plateau[0] : plateau[1]] = 0.9
    start, end = max_area_anchor(prob, GEOMETRY)
    assert (start, end) == reference_anchor(prob)
    assert start == expected_start and end - start == 64000


def test_max_area_equals_reference_formula_on_random_curves():
    gen = torch.Generator().manual_seed(0)
    for i in range(200):
        prob = torch.rand(1001, generator=gen)
        if i % 2:  # smooth curves with one broad bump, as a trained SED gives
            centre = int(torch.randint(0, 1001, (1,), generator=gen))
            prob = 0.8 * torch.exp(-(((torch.arange(1001) - centre) / 80.0) ** 2)) + 0.1 * prob
        assert max_area_anchor(prob, GEOMETRY) == reference_anchor(prob)
        assert max_area_anchor(prob.numpy(), GEOMETRY) == reference_anchor(prob)


def test_max_area_follows_a_peak():
    prob = torch.clamp(1.0 - (torch.arange(1001) - 455).abs() / 150.0, min=0.0)
    assert max_area_anchor(prob, GEOMETRY) == ((455 - 100) * 320, (455 + 100) * 320)


def test_other_label_penalty_moves_the_anchor_off_the_other_class():
    # The class plays twice, louder where a second label of the clip plays too.
    prob = torch.full((1001,), 0.05)
    prob[100:300] = 0.6
    prob[600:800] = 0.9
    other = torch.zeros(1, 1001)
    other[0, 550:850] = 0.9
    assert max_area_anchor(prob, GEOMETRY, other, 0.0) == max_area_anchor(prob, GEOMETRY) == (599 * 320, 799 * 320)
    assert max_area_anchor(prob, GEOMETRY, other, 0.5) == (99 * 320, 299 * 320)
    assert max_area_anchor(prob, GEOMETRY, torch.zeros(0, 1001), 0.5) == max_area_anchor(prob, GEOMETRY)
    with pytest.raises(ConfigError, match="max_area"):
        MiningConfig("sed", "tagger", mode="random", other_label_penalty=0.5)
    with pytest.raises(ConfigError, match=">= 0"):
        MiningConfig("sed", "tagger", other_label_penalty=-1)


@pytest.mark.reference
def test_max_area_equals_the_reference_package():
    detectors = pytest.importorskip("uss.data.anchor_segment_detectors", reason="install the reference extra")

    class FakeSed(torch.nn.Module):
        def __init__(self, framewise):
            super().__init__()
            self.framewise = framewise

        def forward(self, input):
            return {"framewise_output": self.framewise}

    gen = torch.Generator().manual_seed(1)
    framewise = torch.rand(8, 1001, 5, generator=gen)
    detector = detectors.AnchorSegmentDetector(FakeSed(framewise), 10.0, 2.0, 100, 32000, "max_area")
    waveforms = torch.randn(8, CLIP, generator=gen)
    class_ids = [0, 1, 2, 3, 4, 0, 1, 2]
    got = detector(waveforms, class_ids)
    for n, class_id in enumerate(class_ids):
        assert max_area_anchor(framewise[n, :, class_id], GEOMETRY) == (
            int(got["bgn_sample"][n]),
            int(got["end_sample"][n]),
        )


def test_random_anchor_is_uniform_over_the_whole_clip():
    high = CLIP - 64000
    starts = np.array([random_anchor(seed, f"s/clip{i}", "/m/a", GEOMETRY)[0] for seed in range(4) for i in range(1000)])
    assert starts.min() >= 0 and starts.max() <= high
    # The reference would put every start in the first second; uniform over [0, 256000] instead.
    counts, _ = np.histogram(starts, bins=8, range=(0, high + 1))
    expected = len(starts) / 8
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 24.3  # p = 0.001 for 7 degrees of freedom
    assert abs(starts.mean() / high - 0.5) < 0.02


def test_random_anchor_is_determined_by_seed_clip_and_class():
    a = random_anchor(3, "s/x", "/m/a", GEOMETRY)
    assert a == random_anchor(3, "s/x", "/m/a", GEOMETRY)
    assert a[1] - a[0] == 64000
    others = {random_anchor(4, "s/x", "/m/a", GEOMETRY), random_anchor(3, "s/y", "/m/a", GEOMETRY), random_anchor(3, "s/x", "/m/b", GEOMETRY)}
    assert a not in others


def test_anchor_score_is_the_mean_over_the_anchor_frames():
    prob = np.zeros(1001, np.float32)
    prob[100:200] = 1.0
    assert anchor_score(prob, 100 * 320, GEOMETRY) == pytest.approx(0.5)
    assert anchor_score(prob, 0, GEOMETRY) == pytest.approx(0.5)
    assert anchor_score(prob, 500 * 320, GEOMETRY) == 0.0


def test_geometry_refuses_anchors_longer_than_clips():
    with pytest.raises(ConfigError):
        AnchorGeometry(RATE, 320, 32000, 2.0).validate()
    with pytest.raises(ConfigError):
        MiningConfig("a", "b", mode="loudest")


# --------------------------------------------------------------------------------------------
# Taggers and clips for the plumbing tests


def energy_sed(classes: int) -> Cnn14DecisionLevelMax:
    """A real SED with random non-negative weights: an energy detector (see module docstring)."""
    torch.manual_seed(0)
    sed = Cnn14DecisionLevelMax(Cnn14Config(classes_num=classes, **TINY))
    with torch.no_grad():
        for name, p in sed.named_parameters():
            if name.startswith(("conv_block", "fc")) and p.dim() > 1:
                p.abs_()
            elif name == "fc_audioset.bias":
                p.fill_(-1.0)
    return sed.eval()


@pytest.fixture(scope="module")
def taggers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("taggers")
    save_tagger_checkpoint(energy_sed(len(LABELS)), LABELS, root / "sed")
    torch.manual_seed(1)
    condition_labels = LabelSet([f"/m/q{i}" for i in range(7)], [f"Q{i}" for i in range(7)])
    save_tagger_checkpoint(Cnn14(Cnn14Config(classes_num=7, **TINY)), condition_labels, root / "clip")
    return {"sed": root / "sed", "clip": root / "clip"}


def burst_clip(i: int, labels: list[int], onset: float, shard: str = "src") -> Clip:
    rng = np.random.default_rng(i)
    audio = (1e-4 * rng.standard_normal(CLIP)).astype(np.float32)
    s = int(onset * RATE)
    audio[s : s + 64000] += (0.3 * rng.standard_normal(64000)).astype(np.float32)
    return Clip(f"{shard}/clip{i:02d}", f"mem://{i}", labels, [LABELS.mids[j] for j in labels], RATE, CLIP, audio)


def clips_table() -> pa.Table:
    return records_to_table([burst_clip(i, labels, onset) for i, (labels, onset) in enumerate(CLIPS)], CLIP_SCHEMA)


def test_miner_places_max_area_anchors_on_the_bursts(taggers):
    clips = clips_table()
    miner = AnchorMiner(MiningConfig(str(taggers["sed"]), str(taggers["clip"]), batch_size=4, model_batch_size=3))
    out = miner(clips)
    assert out.schema == ANCHOR_SCHEMA
    anchors = table_to_records(out, Anchor)  # every row validates as a typed record
    assert len(anchors) == sum(len(labels) for labels, _ in CLIPS)
    waves = {c.clip_id: c.waveform for c in table_to_records(clips, Clip)}
    expected = [(f"src/clip{i:02d}", j, onset) for i, (labels, onset) in enumerate(CLIPS) for j in labels]
    for anchor, (clip_id, class_index, onset) in zip(anchors, expected):
        assert anchor.anchor_id == f"{clip_id}-{LABELS.mids[class_index]}-max_area"
        assert (anchor.clip_id, anchor.class_index, anchor.mode) == (clip_id, class_index, "max_area")
        assert abs(anchor.start_sample / RATE - onset) <= 0.1, (anchor.anchor_id, anchor.start_sample)
        assert anchor.end_sample - anchor.start_sample == 64000
        assert np.array_equal(anchor.waveform, waves[clip_id][anchor.start_sample : anchor.end_sample])
        assert 0.9 <= anchor.score <= 1.0
        assert anchor.condition_at_soft.shape == (7,) and anchor.condition_embedding.shape == (16,)
    # The conditions are the condition tagger's outputs on the anchor audio.
    tagger, _ = load_tagger(taggers["clip"])
    with torch.inference_mode():
        ref = tagger(torch.from_numpy(np.stack([a.waveform for a in anchors[:3]])))
    np.testing.assert_allclose(np.stack([a.condition_at_soft for a in anchors[:3]]), ref["clipwise_output"], atol=1e-5)
    np.testing.assert_allclose(np.stack([a.condition_embedding for a in anchors[:3]]), ref["embedding"], atol=1e-4)


def test_miner_random_mode_uses_the_pure_placement(taggers):
    config = MiningConfig(str(taggers["sed"]), str(taggers["sed"]), mode="random", seed=5)
    out = AnchorMiner(config)(clips_table())
    for clip_id, mid, start in zip(*(out.column(c).to_pylist() for c in ("clip_id", "class_mid", "start_sample"))):
        assert start == random_anchor(5, clip_id, mid, GEOMETRY)[0]
    assert len(out.column("condition_at_soft")[0]) == len(LABELS)  # one checkpoint serves both heads


def _write_clips(uri_or_path, fs=None, parts: int = 2) -> None:
    table = clips_table()
    step = -(-table.num_rows // parts)
    for k in range(parts):
        part = table.slice(k * step, step)
        if fs is None:
            Path(uri_or_path).mkdir(parents=True, exist_ok=True)
            pq.write_table(part, f"{uri_or_path}/part-{k}.parquet")
        else:
            with fs.open(f"{uri_or_path}/part-{k}.parquet", "wb") as f:
                pq.write_table(part, f)


def test_mine_anchors_with_ray_local_paths(ray_local, taggers, tmp_path):
    _write_clips(tmp_path / "clips")
    config = MiningConfig(str(taggers["sed"]), str(taggers["clip"]), batch_size=2, actors=2, cpus_per_actor=0.5)
    result = mine_anchors(str(tmp_path / "clips"), str(tmp_path / "anchors"), config)
    assert (result.num_clips, result.num_anchors) == (6, 9)
    table = pq.read_table(tmp_path / "anchors")  # plain pyarrow reads it
    assert table.num_rows == 9
    assert list_column_to_numpy(table.column("waveform")).shape == (9, 64000)
    direct = AnchorMiner(config)(clips_table())
    table = read_table(tmp_path / "anchors", schema=ANCHOR_SCHEMA)
    order = np.argsort(table.column("anchor_id").to_pylist())
    got = table.take(pa.array(order))
    want = direct.take(pa.array(np.argsort(direct.column("anchor_id").to_pylist())))
    for name in ("anchor_id", "start_sample", "end_sample", "class_index", "clip_label_indexes"):
        assert got.column(name).to_pylist() == want.column(name).to_pylist()


def test_mine_anchors_s3_in_and_out_with_checkpoint_on_s3(ray_local, taggers, s3_server):
    fs = s3_server.fs
    _write_clips(s3_server.uri("mine/clips"), fs)
    fs.put(str(taggers["sed"]), s3_server.uri("mine/tagger-sed"), recursive=True)
    config = MiningConfig(s3_server.uri("mine/tagger-sed"), str(taggers["clip"]), mode="random", actors=1)
    result = mine_anchors(s3_server.uri("mine/clips"), s3_server.uri("mine/anchors"), config, filesystem=fs)
    assert result.num_anchors == 9
    files = fs.glob(f"{s3_server.bucket}/mine/anchors/*.parquet")
    table = pa.concat_tables([pq.read_table(fs.open(f, "rb")) for f in files])
    assert sorted(table.column("mode").unique().to_pylist()) == ["random"]
    assert table.num_rows == 9


def test_unknown_clip_label_is_refused_before_mining(ray_local, taggers, tmp_path):
    clip = burst_clip(0, [0], 1.0)
    clip = Clip(clip.clip_id, clip.source_uri, (9,), ("/m/unknown",), RATE, CLIP, clip.waveform)
    (tmp_path / "clips").mkdir()
    pq.write_table(records_to_table([clip], CLIP_SCHEMA), tmp_path / "clips" / "part-0.parquet")
    with pytest.raises(ConfigError, match="/m/unknown"):
        mine_anchors(str(tmp_path / "clips"), str(tmp_path / "anchors"), MiningConfig(str(taggers["sed"]), str(taggers["sed"])))


# --------------------------------------------------------------------------------------------
# Jobs: ingest (WebDataset shards) -> mine -> anchor accuracy, with MLflow


def _write_shard(path: Path, clips: list[tuple[str, list[int], float]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, labels, onset in clips:
            clip = burst_clip(int(key[-2:]), labels, onset)
            buf = io.BytesIO()
            sf.write(buf, clip.waveform, RATE, format="FLAC", subtype="PCM_16")
            for name, data in (
                (f"{key}.flac", buf.getvalue()),
                (f"{key}.json", json.dumps({"labels": [LABELS.mids[j] for j in labels]}).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def job_env(tmp_path, monkeypatch):
    monkeypatch.setenv("USS_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def _runs(tmp_path, job: str):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`uss.job` = '{job}'", output_format="list")


def test_ingest_mine_and_accuracy_jobs(ray_local, taggers, job_env, capsys):
    from jobs import anchor_accuracy, ingest, mine

    tmp = job_env
    (tmp / "shards").mkdir()
    _write_shard(tmp / "shards" / "demo-00000.tar", [(f"key{i:02d}", labels, onset) for i, (labels, onset) in enumerate(CLIPS[:4])])
    _write_shard(tmp / "shards" / "demo-00001.tar", [(f"key{i:02d}", labels, onset) for i, (labels, onset) in enumerate(CLIPS) if i >= 4])
    LABELS.to_csv(tmp / "labels.csv")
    assert ingest.main(["--format", "webdataset", "--input", str(tmp / "shards"), "--out", str(tmp / "clips"),
                        "--labels-csv", str(tmp / "labels.csv")]) == 0
    assert pq.read_table(tmp / "clips").num_rows == 6
    assert pq.read_table(tmp / "clips-errors").num_rows == 0
    run = _runs(tmp, "ingest")[0]
    assert run.data.metrics["clips"] == 6 and run.data.tags["uss.output"] == str(tmp / "clips")

    assert mine.main(["--clips", str(tmp / "clips"), "--out", str(tmp / "anchors-max_area"), "--mode", "max_area",
                      "--sed-tagger", str(taggers["sed"]), "--condition-tagger", str(taggers["clip"])]) == 0
    (run,) = _runs(tmp, "mine")
    assert run.data.tags["uss.anchor_mode"] == "max_area" and run.data.tags["uss.output"] == str(tmp / "anchors-max_area")
    assert run.data.metrics["anchors"] == 9 and run.data.metrics["clips_per_second"] > 0
    assert run.data.params["mining.sed_tagger"] == str(taggers["sed"])
    # Random anchors of the same clips without Ray (the job path is the same but for the mode).
    random_anchors = AnchorMiner(MiningConfig(str(taggers["sed"]), str(taggers["clip"]), mode="random"))(
        read_table(tmp / "clips", schema=CLIP_SCHEMA)
    )
    (tmp / "anchors-random").mkdir()
    pq.write_table(random_anchors, tmp / "anchors-random" / "part-0.parquet")

    events = pa.table(
        {
            "clip_id": [f"key{i:02d}" for i, (labels, _) in enumerate(CLIPS) for _ in labels],
            "shard": [f"demo-0000{int(i >= 4)}" for i, (labels, _) in enumerate(CLIPS) for _ in labels],
            "mid": [LABELS.mids[j] for labels, _ in CLIPS for j in labels],
            "onset_seconds": [onset for labels, onset in CLIPS for _ in labels],
            "offset_seconds": [onset + 2.0 for labels, onset in CLIPS for _ in labels],
        }
    )
    pq.write_table(events, tmp / "events.parquet")
    capsys.readouterr()
    assert anchor_accuracy.main(["--anchors", str(tmp / "anchors-max_area"), str(tmp / "anchors-random"),
                                 "--events", str(tmp / "events.parquet"), "--json", str(tmp / "acc.json")]) == 0
    printed = capsys.readouterr().out
    assert f"{tmp / 'anchors-max_area'} (max_area): 9/9 anchors correct, accuracy 100.0%" in printed
    numbers = json.loads((tmp / "acc.json").read_text())
    assert numbers[str(tmp / "anchors-max_area")]["max_area"]["accuracy"] == 1.0
    assert numbers[str(tmp / "anchors-random")]["random"]["total"] == 9


def test_anchor_accuracy_half_overlap_rule():
    anchors = pa.table(
        {
            "clip_id": ["sh/k1", "sh/k1", "sh/k2", "other/k1", "sh/k1"],
            "class_mid": ["/m/a", "/m/a", "/m/a", "/m/a", "/m/b"],
            "start_sample": [0, 32000, 0, 0, 0],
            "end_sample": [64000, 96000, 64000, 64000, 64000],
            "mode": ["max_area", "max_area", "max_area", "random", "random"],
        }
    )
    events = pa.table(
        {
            "clip_id": ["k1", "k1", "k2"],
            "shard": ["sh", "sh", "sh"],
            "mid": ["/m/a", "/m/a", "/m/a"],
            "onset_seconds": [1.0, 2.5, 1.01],
            "offset_seconds": [1.5, 9.0, 4.0],
        }
    )
    # sh/k1 [0,2): event [1,1.5) overlaps 0.5 s < 1 s -> wrong; sh/k1 [1,3): [1,1.5)+[2.5,9) separately
    # 0.5 s each -> wrong (events are not merged); sh/k2 [0,2): [1.01,4) overlaps 0.99 s -> wrong;
    # other/k1: no such shard; sh/k1 /m/b: no event of the class.
    results = {r.mode: r for r in anchor_accuracy(anchors, events)}
    assert (results["max_area"].total, results["max_area"].correct, results["max_area"].unmatched) == (3, 0, 0)
    assert (results["random"].total, results["random"].correct, results["random"].unmatched) == (2, 0, 2)
    # Shares: sh/k1 [0,2) holds /m/a over [1,1.5) (0.25); [1,3) over [1,1.5) + [2.5,3) (0.5); sh/k2
    # [0,2) over [1.01,2) (0.495); the /m/b anchor of sh/k1 has /m/a, another class, over 0.25.
    assert results["max_area"].own_class_share == pytest.approx((0.25 + 0.5 + 0.495) / 3)
    assert results["max_area"].other_class_share == 0.0
    assert (results["random"].own_class_share, results["random"].other_class_share) == (0.0, pytest.approx(0.125))
    events2 = events.set_column(3, "onset_seconds", pa.array([1.0, 2.0, 1.0]))
    results = {r.mode: r for r in anchor_accuracy(anchors, events2)}
    assert results["max_area"].correct == 2  # [1,3) overlaps [2,9) by 1 s; [0,2) overlaps [1,4) by 1 s
