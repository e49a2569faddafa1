"""The embedded demo corpus: real rendered sounds, weak labels in WebDataset shards, true event
times in events.parquet, byte-identical from a seed whatever the number of worker processes."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

pytest.importorskip("tinysoundfont", reason="install tinysoundfont==0.3.7 with --no-deps (infra/dev/install.sh)")
pytest.importorskip("espeakng_loader", reason="install espeakng-loader (see pyproject.toml)")

from pipelines import demo_corpus as dc  # noqa: E402
from uss_core.errors import ConfigError, MetadataError  # noqa: E402
from uss_core.ontology import LabelSet  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SR = 32000


def _metadata_dir() -> Path | None:
    folder = Path(os.environ.get("USS_METADATA_DIR") or REPO_ROOT.parent / "shared" / "audioset")
    return folder if (folder / "class_labels_indices.csv").is_file() else None


def small_config(**overrides) -> dc.DemoCorpusConfig:
    return dc.DemoCorpusConfig(**{"num_clips": 6, "clips_per_shard": 4, "seed": 7, **overrides})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 6-clip corpus built with 2 worker processes, and its config and classes."""
    out = tmp_path_factory.mktemp("demo") / "corpus"
    config = small_config()
    summary = dc.build_demo_corpus(config, out, metadata_dir=_metadata_dir(), progress=False, num_workers=2)
    classes = dc.resolve_demo_classes(config.classes, _metadata_dir())
    return summary, config, classes


def read_shards(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    """{clip key: {extension: bytes}} of every member, in shard and member order."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(shard_dir.glob("demo-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                assert member.isfile()
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.asarray(x, np.float64) ** 2) + 1e-20))


def test_layout_and_webdataset_members(corpus):
    summary, config, classes = corpus
    out = summary.out_dir
    assert [p.name for p in summary.shard_paths] == ["demo-00000.tar", "demo-00001.tar"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["demo-00000.tar", "demo-00001.tar"]  # no temp files
    for name in ("events.parquet", "labels.csv", "corpus.json", "README.txt"):
        assert (out / name).is_file(), name
    labels = LabelSet.from_csv(out / "labels.csv")
    assert labels.names == tuple(config.classes) and labels.mids == tuple(c.mid for c in classes)

    samples = read_shards(out / "shards")
    assert list(samples) == [dc.clip_id_for(config, i) for i in range(6)]
    for key, members in samples.items():
        assert set(members) == {"flac", "json"}
        meta = json.loads(members["json"])
        assert set(meta) == {"clip_id", "labels", "sample_rate"}
        assert meta["clip_id"] == key and meta["sample_rate"] == SR
        assert 1 <= len(meta["labels"]) <= 3 and len(set(meta["labels"])) == len(meta["labels"])
        assert all(labels.has_mid(m) for m in meta["labels"])
        audio, sr = soundfile.read(io.BytesIO(members["flac"]), dtype="float32")
        assert sr == SR and audio.shape == (config.clip_samples,)
        assert np.isfinite(audio).all() and 0 < np.abs(audio).max() <= 1.0

    info = json.loads((out / "corpus.json").read_text())
    assert info["num_clips"] == 6 and info["num_events"] == summary.num_events
    assert info["config"]["seed"] == 7 and len(info["classes"]) == len(config.classes)
    assert "GPL-2.0" in info["licenses"]["TimGM6mb.sf2"] and "GPL-3.0" in info["licenses"]["eSpeak NG"]
    assert "GPL-2.0" in (out / "README.txt").read_text()


def test_events_match_weak_labels(corpus):
    summary, config, classes = corpus
    table = pq.read_table(summary.events_path)
    assert table.schema.equals(dc.EVENT_SCHEMA)
    events = table.to_pylist()
    assert len(events) == summary.num_events
    samples = read_shards(summary.out_dir / "shards")
    by_clip: dict[str, list[dict]] = {}
    for e in events:
        by_clip.setdefault(e["clip_id"], []).append(e)
        assert 0 <= e["onset_seconds"] < e["offset_seconds"] <= config.clip_seconds
        assert classes[e["class_index"]].mid == e["mid"] and classes[e["class_index"]].display_name == e["display_name"]
    assert set(by_clip) == set(samples)
    for key, clip_events in by_clip.items():
        mids = [e["mid"] for e in clip_events]
        assert len(mids) == len(set(mids))  # distinct classes in a clip
        assert set(mids) == set(json.loads(samples[key]["json"])["labels"])
        shard_index = int(key.rsplit("-", 1)[1]) // config.clips_per_shard
        assert {e["shard"] for e in clip_events} == {f"demo-{shard_index:05d}"}


def test_same_seed_same_bytes_any_worker_count(corpus, tmp_path):
    summary, config, _ = corpus
    again = dc.build_demo_corpus(
        config, tmp_path / "again", metadata_dir=_metadata_dir(), progress=False, num_workers=1
    )
    for a, b in zip(summary.shard_paths, again.shard_paths, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert summary.events_path.read_bytes() == again.events_path.read_bytes()
    assert summary.labels_path.read_bytes() == again.labels_path.read_bytes()
    other = dc.render_clip(small_config(seed=8), dc.resolve_demo_classes(config.classes), 0)
    assert not np.array_equal(other.audio, dc.render_clip(config, dc.resolve_demo_classes(config.classes), 0).audio)


def test_every_event_is_audible_in_its_window_and_silent_outside(corpus):
    summary, config, classes = corpus
    samples = read_shards(summary.out_dir / "shards")
    events = pq.read_table(summary.events_path).to_pylist()
    for i in range(config.num_clips):
        clip = dc.render_clip(config, classes, i)
        stored, _ = soundfile.read(io.BytesIO(samples[clip.clip_id]["flac"]), dtype="float32")
        assert np.abs(stored - clip.audio).max() <= 1.5 / 32767  # the shard holds this render
        background = db(clip.background)
        lo, hi = config.background_level_dbfs
        assert lo - 0.5 <= background <= hi + 0.5
        rows = sorted((e for e in events if e["clip_id"] == clip.clip_id), key=lambda e: e["event_index"])
        assert len(rows) == len(clip.event_audio)
        for row, own in zip(rows, clip.event_audio):
            s0, s1 = round(row["onset_seconds"] * SR), round(row["offset_seconds"] * SR)
            assert not own[:s0].any() and not own[s1:].any()  # the event is silent outside its times
            assert db(own[s0:s1]) > background + 10, row  # and well above the floor inside them
            assert db(stored[s0:s1]) > background + 10, row
            assert abs(own[s0]) < 0.05 and abs(own[s1 - 1]) < 0.05  # faded: no click at either end


def test_every_default_class_renders_sound_like_its_class():
    rng_for = np.random.default_rng
    for name in dc.DEFAULT_CLASSES:
        event = dc.render_event(name, rng_for(3), 2.5, SR, -20.0)
        x = event.audio
        assert np.isfinite(x).all() and 0.4 * SR <= len(x) <= 2.5 * SR, (name, len(x) / SR)
        assert abs(dc.gated_rms_db(x, SR) + 20.0) < 1.0 or np.abs(x).max() >= 0.89, name
        assert np.abs(x).max() <= 0.9 + 1e-6
        assert db(x) > -40, name  # clearly non-silent as a whole

    def dominant_hz(name: str) -> float:
        peaks = []
        for seed in range(4):
            x = dc.render_event(name, rng_for(seed), 3.0, SR, -20.0).audio
            spectrum = np.abs(np.fft.rfft(x))
            freqs = np.fft.rfftfreq(len(x), 1 / SR)
            band = (freqs > 30) & (freqs < 4000)
            peaks.append(freqs[band][np.argmax(spectrum[band])])
        return float(np.mean(peaks))

    assert dominant_hz("Bass guitar") < dominant_hz("Violin, fiddle")  # registers: bass low, violin high
    assert dominant_hz("Bass guitar") < dominant_hz("Flute")


def test_speech_is_deterministic_whatever_came_before():
    first = dc.render_event("Speech", np.random.default_rng(11), 3.0, SR, -20.0)
    dc.render_event("Speech", np.random.default_rng(12), 3.0, SR, -20.0)  # eSpeak state must not leak
    again = dc.render_event("Speech", np.random.default_rng(11), 3.0, SR, -20.0)
    assert first.source.startswith("espeak:") and np.array_equal(first.audio, again.audio)


def test_class_ids_come_from_the_metadata():
    folder = _metadata_dir()
    if folder is None:
        pytest.skip("AudioSet metadata not found; set USS_METADATA_DIR")
    classes = dc.resolve_demo_classes(dc.DEFAULT_CLASSES, folder)
    audioset = LabelSet.from_csv(folder / "class_labels_indices.csv")
    for c in classes:
        assert audioset.names[c.audioset_index] == c.display_name and audioset.mids[c.audioset_index] == c.mid
    piano = classes[dc.DEFAULT_CLASSES.index("Piano")]
    assert "Music" in piano.ancestors
    with pytest.raises(MetadataError):
        dc.resolve_demo_classes(["Piano"], folder / "no-such-folder")


def test_bad_configs_are_refused(tmp_path):
    for bad in (
        small_config(classes=("Piano", "Kazoo")),
        small_config(classes=("Piano", "Piano")),
        small_config(classes=("Piano", "Harp"), max_events=3),
        small_config(min_event_seconds=5.0, max_event_seconds=2.0),
        small_config(num_clips=0),
    ):
        with pytest.raises(ConfigError):
            dc.build_demo_corpus(bad, tmp_path, progress=False)


def test_uss_corpus_demo_command(tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "cli"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "demo-00009.tar").write_bytes(b"stale")
    args = ["corpus", "demo", "--out", str(out), "--num-clips", "3", "--clips-per-shard", "2", "--seed", "5"]
    args += ["--no-progress"]
    if _metadata_dir() is not None:
        args += ["--metadata-dir", str(_metadata_dir())]
    assert main(args) == 0
    assert "3 clips" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["demo-00000.tar", "demo-00001.tar"]
    assert main(["corpus", "demo", "--out", str(out), "--num-clips", "0"]) == 2  # a user error, no traceback


def _eval_set(tmp_path: Path, corpus, anchors: list[dict], gains: list[float]) -> tuple[str, str]:
    """An anchors dataset and an evaluation set of one pair per anchor, mixed from the shards'
    decoded audio as the mixing stage does (target = gain x anchor; partner = the next anchor)."""
    import pyarrow as pa

    from pipelines.schemas import MIXTURE_SCHEMA

    summary, config, classes = corpus
    samples = read_shards(summary.out_dir / "shards")
    audio = {key: soundfile.read(io.BytesIO(s["flac"]), dtype="float32")[0] for key, s in samples.items()}
    segments = [audio[a["clip_id"].split("/")[-1]][a["start_sample"] : a["end_sample"]] for a in anchors]
    rows = []
    for i, (a, gain) in enumerate(zip(anchors, gains)):
        target = gain * segments[i]
        partner = segments[(i + 1) % len(anchors)]
        rows.append({
            "mixture_id": f"pair-{i}", "target_anchor_id": a["anchor_id"], "partner_anchor_ids": ["p"],
            "target_class_index": a["class_index"], "partner_class_indexes": [0],
            "mixture": (target + partner).tolist(), "target": target.tolist(),
            "condition_at_soft": [], "condition_embedding": [], "target_gain": gain, "partner_gains": [1.0],
        })
    anchors_dir, eval_dir = tmp_path / "anchors", tmp_path / "eval"
    anchors_dir.mkdir()
    eval_dir.mkdir()
    pq.write_table(pa.Table.from_pylist(anchors), anchors_dir / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=MIXTURE_SCHEMA), eval_dir / "part-0.parquet")
    return str(eval_dir), str(anchors_dir)


def test_true_source_evaluation_set_holds_each_targets_class_alone(corpus, tmp_path):
    from pipelines.schemas import float_list_array

    summary, config, classes = corpus
    events = pq.read_table(summary.events_path).to_pylist()
    seg = 2 * SR
    anchors, expected = [], []
    for i, e in enumerate(events[:4]):
        index = dc.clip_index_for(config, e["clip_id"])
        clip = dc.render_clip(config, classes, index)
        onset = int(e["onset_seconds"] * SR)
        on = min(onset, config.clip_samples - seg)  # the 2 s from the event's onset: holds it
        # Events last at most 6 of the 10 s: the first or last 2 s of the clip miss this one.
        off = config.clip_samples - seg if e["onset_seconds"] < 2.0 else 0
        for start, label in ((on, "on"), (off, "off")):
            anchors.append({"anchor_id": f"{e['clip_id']}-{label}", "clip_id": f"{e['shard']}/{e['clip_id']}",
                            "class_index": e["class_index"], "start_sample": start, "end_sample": start + seg})
            expected.append(clip.event_audio[e["event_index"]][start : start + seg])
    gains = [0.5 + 0.25 * i for i in range(len(anchors))]
    eval_uri, anchors_uri = _eval_set(tmp_path, corpus, anchors, gains)

    written = dc.write_true_source_evaluation_set(summary.out_dir, eval_uri, anchors_uri, tmp_path / "true")
    assert (written.num_pairs, written.num_dropped, written.num_clips) == (4, 4, len({a["clip_id"] for a in anchors}))
    table = pq.read_table(written.out_path)
    weak = pq.read_table(Path(eval_uri) / "part-0.parquet")
    assert table.column("mixture_id").to_pylist() == [f"pair-{i}" for i in range(0, 8, 2)]  # the "on" pairs
    for row, i in zip(table.to_pylist(), range(0, 8, 2)):
        np.testing.assert_allclose(row["target"], gains[i] * expected[i], atol=1e-6)
        assert row["mixture"] == weak.column("mixture")[i].as_py()  # same mixture, new target
    assert 0.0 < written.mean_true_share <= 1.0 + 1e-6

    from jobs.cli import main  # the same through `uss corpus true-sources`

    args = ["corpus", "true-sources", "--corpus", str(summary.out_dir), "--eval", eval_uri, "--anchors", anchors_uri]
    assert main(args + ["--out", str(tmp_path / "cli")]) == 0
    assert pq.read_table(tmp_path / "cli").equals(table)

    # Shard audio that the corpus does not render (other package versions) is refused.
    other = tmp_path / "other"
    other.mkdir()
    tampered = weak.set_column(weak.schema.get_field_index("target"), "target",
                               float_list_array([np.asarray(t, np.float32) * 1.1 for t in weak.column("target").to_pylist()]))
    pq.write_table(tampered, other / "part-0.parquet")
    with pytest.raises(ConfigError, match="renders differently"):
        dc.write_true_source_evaluation_set(summary.out_dir, str(other), anchors_uri, tmp_path / "t2")
    with pytest.raises(ConfigError, match="not a clip of this demo corpus"):
        dc.clip_index_for(dc.DemoCorpusConfig(seed=99), anchors[0]["clip_id"])
    with pytest.raises(ConfigError, match="not a finished demo corpus"):
        dc.write_true_source_evaluation_set(tmp_path, eval_uri, anchors_uri, tmp_path / "t3")
    assert not (tmp_path / "t2").exists()  # nothing half-written
