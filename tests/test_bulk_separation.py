"""Bulk separation: input listing, bad inputs, bounded memory, exactly-once reruns on a real S3
API server (moto) with a real local Ray, and the job entry point with its MLflow run.

The model is a small random-weight separator (real ResUNet + Cnn14 query net); the inputs are
short generated recordings, so each separates in well under a second.
"""

from __future__ import annotations

import hashlib
import io
import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from pipelines.bulk_separation import (
    MANIFEST_SCHEMA,
    STATE_DIR,
    BulkSeparationConfig,
    BulkSeparator,
    ManifestRow,
    QuerySpec,
    check_output_location,
    completed_inputs,
    job_signature,
    list_inputs,
    plan_job,
    run_bulk_separation,
    stem_paths,
)
from pipelines.schemas import resolve_filesystem, table_to_records
from tests.tiny_models import tiny_checkpoint
from uss_core.errors import ConfigError
from uss_core.ontology import LabelSet, load_label_set
from uss_core.separation import Query, SeparationConfig

torch.set_num_threads(1)

RATE = 32000
LABELS = LabelSet(mids=("/m/a", "/m/b", "/m/c"), names=("Alpha", "Beta", "Gamma"))
CLASSES = QuerySpec(classes=("Alpha", "Beta+Gamma"))
# Columns that depend on the run (who, when, how fast), not on the job's result.
RUN_COLUMNS = {
    "job_id", "seconds_total", "seconds_tagging", "seconds_separating", "seconds_writing", "peak_rss_mb", "worker_node"
}


def noise(seconds: float, rate: int = RATE, channels: int = 1, seed: int = 0) -> np.ndarray:
    shape = (int(seconds * rate), channels) if channels > 1 else (int(seconds * rate),)
    return (0.1 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def flac_bytes(audio: np.ndarray, rate: int = RATE) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", LABELS)


def config_for(input_uri, output_uri, checkpoint, **overrides) -> BulkSeparationConfig:
    values = dict(
        input=str(input_uri),
        output=str(output_uri),
        checkpoint=str(checkpoint),
        queries=CLASSES,
        activity_threshold=0.0,
        actors=1,
        cpus_per_actor=0.5,
    )
    values.update(overrides)
    return BulkSeparationConfig(**values)


def manifest_records(uri, filesystem=None) -> list[ManifestRow]:
    if hasattr(filesystem, "invalidate_cache"):
        filesystem.invalidate_cache()  # s3fs caches listings; the job wrote from other processes
    fs, path = resolve_filesystem(str(uri), filesystem)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f)
    assert table.schema.equals(MANIFEST_SCHEMA)
    return sorted(table_to_records(table, ManifestRow), key=lambda r: r.relative_path)


def result_view(rows: list[ManifestRow]) -> list[dict]:
    """The rows without their run-dependent columns."""
    return [{k: v for k, v in r.to_dict().items() if k not in RUN_COLUMNS} for r in rows]


# --------------------------------------------------------------------------------------------
# Listing and naming


def test_list_inputs_from_folders_prefixes_and_lists(tmp_path, s3_server):
    root = tmp_path / "in"
    (root / "a" / ".hidden").mkdir(parents=True)
    for rel in ("x.wav", "x.flac", "a/y.ogg", "a/.z.wav", "a/.hidden/w.wav", "notes.txt"):
        (root / rel).write_bytes(b"")
    found = list_inputs(str(root))
    assert [i.relative_path for i in found] == ["a/y.ogg", "x.flac", "x.wav"]
    assert found[2].uri == f"{root}/x.wav"
    assert [i.relative_path for i in list_inputs(str(root / "x.wav"))] == ["x.wav"]

    fs = s3_server.fs
    for rel in ("p/one.wav", "p/sub/two.flac", "p/readme.md"):
        fs.pipe(f"{s3_server.bucket}/{rel}", b"")
    remote = list_inputs(s3_server.uri("p"), fs)
    assert [(i.uri, i.relative_path) for i in remote] == [
        (s3_server.uri("p/one.wav"), "one.wav"),
        (s3_server.uri("p/sub/two.flac"), "sub/two.flac"),
    ]

    listed = pa.table({"uri": [s3_server.uri("p/one.wav"), f"{root}/x.wav", s3_server.uri("p/one.wav")]})
    pq.write_table(listed, tmp_path / "list.parquet")
    from_list = list_inputs(str(tmp_path / "list.parquet"), fs)
    assert [i.relative_path for i in from_list] == [f"{str(root).lstrip('/')}/x.wav", f"{s3_server.bucket}/p/one.wav"]
    csv = pa.table({"uri": [s3_server.uri("p/one.wav")], "relative_path": ["batch1/one.wav"]})
    pacsv.write_csv(csv, tmp_path / "list.csv")
    assert [i.relative_path for i in list_inputs(str(tmp_path / "list.csv"), fs)] == ["batch1/one.wav"]

    pacsv.write_csv(pa.table({"path": ["x"]}), tmp_path / "bad.csv")
    with pytest.raises(ConfigError, match="'uri' column"):
        list_inputs(str(tmp_path / "bad.csv"))
    pq.write_table(pa.table({"uri": ["/a/x.wav", "/b/x.wav"], "relative_path": ["x.wav", "x.wav"]}), tmp_path / "dup.parquet")
    with pytest.raises(ConfigError, match="both write"):
        list_inputs(str(tmp_path / "dup.parquet"))
    pq.write_table(pa.table({"uri": ["/a/x.wav"], "relative_path": [f"{STATE_DIR}/x.wav"]}), tmp_path / "state.parquet")
    with pytest.raises(ConfigError, match="collides"):
        list_inputs(str(tmp_path / "state.parquet"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("no audio here")
    with pytest.raises(ConfigError, match="no audio files"):
        list_inputs(str(tmp_path / "docs"))
    with pytest.raises(ConfigError, match="no such"):
        list_inputs(str(tmp_path / "missing"))


def test_output_inside_input_is_refused(tmp_path, s3_server):
    (tmp_path / "in").mkdir()
    with pytest.raises(ConfigError, match="inside the input folder"):
        check_output_location(str(tmp_path / "in"), str(tmp_path / "in" / "stems"))
    check_output_location(str(tmp_path / "in"), str(tmp_path / "in-stems"))
    # Its own prefix: the bucket is shared by the session (the S3 job test lists "archive").
    s3_server.fs.pipe(f"{s3_server.bucket}/refused/a.wav", b"")
    with pytest.raises(ConfigError, match="inside the input folder"):
        check_output_location(s3_server.uri("refused"), s3_server.uri("refused/out"), s3_server.fs)


def test_stem_paths_and_job_signature():
    queries = [
        Query("Music", class_indexes=(0,)),
        Query("Music", class_indexes=(1,)),
        Query("A/B", class_indexes=(2,)),
        Query("Music", class_indexes=(0,), level=1, mid="/m/x"),
    ]
    assert stem_paths(queries, "flac") == ["Music.flac", "Music-2.flac", "A_B.flac", "level1/Music.flac"]
    base = job_signature("sha", queries, SeparationConfig(), "flac")
    assert base == job_signature("sha", queries, SeparationConfig(batch_size=16, device="cpu"), "flac")
    assert base != job_signature("sha", queries, SeparationConfig(overlap=0.5), "flac")
    assert base != job_signature("sha", queries[:3], SeparationConfig(), "flac")
    assert base != job_signature("sha2", queries, SeparationConfig(), "flac")
    assert base != job_signature("sha", queries, SeparationConfig(), "wav")


# --------------------------------------------------------------------------------------------
# Bad inputs, in one actor without Ray


def _write_inputs(folder):
    """Good files, edge cases that must succeed, and bad ones; -> {relative path: expected status}."""
    folder.mkdir(parents=True)
    sf.write(folder / "good.wav", noise(3.0), RATE)
    sf.write(folder / "good.flac", noise(2.5, seed=1), RATE)
    sf.write(folder / "eight-channels.wav", noise(2.0, channels=8), RATE)
    sf.write(folder / "eight-khz.wav", noise(2.0, rate=8000), 8000)
    sf.write(folder / "short.wav", noise(0.1), RATE)
    whole = flac_bytes(noise(4.0, seed=2))
    (folder / "truncated.flac").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.wav").write_bytes(b"")
    (folder / "text.wav").write_text("this is not audio\n" * 100)
    nan = noise(2.0)
    nan[40000:40010] = np.nan
    sf.write(folder / "nan.wav", nan, RATE, subtype="FLOAT")
    sf.write(folder / "silent.wav", np.zeros(RATE, np.float32), RATE)
    sf.write(folder / "huge.flac", noise(12.0, rate=8000), 8000)
    return {
        "good.wav": "ok",
        "good.flac": "ok",
        "eight-channels.wav": "ok",
        "eight-khz.wav": "ok",
        "short.wav": "ok",
        "truncated.flac": "invalid",
        "empty.wav": "invalid",
        "text.wav": "invalid",
        "nan.wav": "invalid",
        "silent.wav": "silent",
        "huge.flac": "too_long",
    }


def test_bad_inputs_get_their_status_and_the_rest_succeed(tmp_path, checkpoint):
    expected = _write_inputs(tmp_path / "in")
    config = config_for(tmp_path / "in", tmp_path / "out", checkpoint, max_input_seconds=10.0)
    plan = plan_job(config, "job-1")
    inputs = list_inputs(config.input)
    actor = BulkSeparator(plan)
    table = actor(pa.table({"uri": [i.uri for i in inputs], "relative_path": [i.relative_path for i in inputs]}))
    rows = {r.relative_path: r for r in table_to_records(table, ManifestRow)}
    assert {k: r.status for k, r in rows.items()} == expected

    reasons = {k: r.error for k, r in rows.items()}
    assert "decoding failed" in reasons["truncated.flac"]
    assert "cannot decode" in reasons["empty.wav"] and "cannot decode" in reasons["text.wav"]
    assert "non-finite" in reasons["nan.wav"] and "1.250 s" in reasons["nan.wav"]
    assert "silent" in reasons["silent.wav"]
    assert "longer than the limit" in reasons["huge.flac"] and rows["huge.flac"].duration_seconds == 12.0
    assert (rows["eight-channels.wav"].channels, rows["eight-khz.wav"].source_sample_rate) == (8, 8000)

    out = tmp_path / "out"
    for name, row in rows.items():
        folder = out / name
        if row.status != "ok":
            assert row.error and not row.output_uris and not folder.exists()
            continue
        assert row.error == "" and row.stem_names == ("Alpha", "Beta + Gamma")
        assert row.output_uris == (f"{folder}/Alpha.flac", f"{folder}/Beta + Gamma.flac")
        for uri in row.output_uris:
            audio, rate = sf.read(uri)
            assert rate == RATE and len(audio) == round(row.duration_seconds * RATE)
            assert np.isfinite(audio).all()
    assert completed_inputs(str(out), plan.signature) == {k for k, s in expected.items() if s == "ok"}
    # No temporary file survives a clean run; scratch space is released.
    assert not [p for p in out.rglob(".*")]


def test_memory_per_input_does_not_grow_with_its_length(tmp_path, checkpoint):
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "short.wav", noise(6.0), RATE)
    sf.write(tmp_path / "in" / "long.wav", noise(120.0), RATE)  # 15 MB of float32 samples per stem
    plan = plan_job(config_for(tmp_path / "in", tmp_path / "out", checkpoint, queries=QuerySpec(classes=("Alpha",))), "j")
    actor = BulkSeparator(plan)
    peaks = {}
    for name in ("short.wav", "long.wav"):
        tracemalloc.start()
        table = actor(pa.table({"uri": [str(tmp_path / "in" / name)], "relative_path": [name]}))
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert table.column("status").to_pylist() == ["ok"]
    # Decoder blocks, segments, overlap-add and upload buffers stay the same size whatever the
    # file's length; the long file's samples alone (15 MB) would not fit in the margin.
    assert peaks["long.wav"] < peaks["short.wav"] + (2 << 20), peaks


def test_example_audio_and_hierarchy_queries(tmp_path, audioset_dir):
    ckpt = tiny_checkpoint(tmp_path / "as", load_label_set(audioset_dir))
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "a.wav", noise(2.0), RATE)
    examples = tmp_path / "dogs"
    examples.mkdir()
    sf.write(examples / "1.wav", 0.5 * np.sin(np.arange(RATE) / 5), RATE)
    sf.write(examples / "2.flac", 0.5 * np.sin(np.arange(RATE) / 7), RATE)
    by_example = plan_job(config_for(tmp_path / "in", tmp_path / "o1", ckpt, queries=QuerySpec(query_audio=(str(examples),))), "j")
    assert [q.name for q in by_example.queries] == ["query-dogs"] and by_example.stem_paths == ("query-dogs.flac",)
    row = BulkSeparator(by_example).separate_input(list_inputs(str(tmp_path / "in"))[0])
    assert row.status == "ok" and row.detected_classes == ()  # example queries are not tag-based

    hierarchy = config_for(
        tmp_path / "in", tmp_path / "o2", ckpt, queries=QuerySpec(levels=(1,)), metadata_dir=str(audioset_dir)
    )
    plan = plan_job(hierarchy, "j")
    assert len(plan.queries) == 7 and plan.stem_paths[2] == "level1/Music.flac"
    row = BulkSeparator(plan).separate_input(list_inputs(str(tmp_path / "in"))[0])
    assert row.status == "ok" and len(row.output_uris) == 7 and set(row.detected_classes) == set(row.stem_names)
    with pytest.raises(ConfigError, match="one kind"):
        QuerySpec(classes=("Speech",), levels=(1,))


# --------------------------------------------------------------------------------------------
# On Ray, against the S3 API server: reruns skip completed inputs, repair interrupted ones


def stem_digests(fs, prefix: str) -> dict[str, str]:
    """sha256 of every file under ``prefix`` outside the job state and the manifest."""
    # s3fs answers from listings it cached earlier; other processes (the job) changed the bucket.
    fs.invalidate_cache()
    out = {}
    for path in fs.find(prefix):
        relative = path[len(prefix) + 1 :]
        if relative.startswith(STATE_DIR) or relative == "manifest.parquet":
            continue
        out[relative] = hashlib.sha256(fs.cat_file(path)).hexdigest()
    return out


def test_s3_job_reruns_exactly_once(tmp_path, checkpoint, s3_server, ray_local):
    # Under its own prefix: the bucket is shared by the whole test session.
    fs, bucket = s3_server.fs, f"{s3_server.bucket}/bulk"
    for i in range(4):
        fs.pipe(f"{bucket}/archive/{'deep/' if i % 2 else ''}clip{i}.flac", flac_bytes(noise(2.0 + i / 2, seed=i)))
    fs.pipe(f"{bucket}/archive/broken.wav", b"RIFF....WAVEfmt junk")
    fs.put(str(checkpoint), f"{bucket}/models/tiny", recursive=True)
    config = config_for(
        s3_server.uri("bulk/archive"), s3_server.uri("bulk/stems"), s3_server.uri("bulk/models/tiny"), actors=2, files_per_task=1
    )
    progress = []
    first = run_bulk_separation(config, fs, job_id="run-1", on_progress=progress.append)
    assert first.inputs == 5 and first.complete_before == 0 and first.statuses == {"ok": 4, "invalid": 1}
    assert first.audio_seconds == pytest.approx(2.0 + 2.5 + 3.0 + 3.5)
    assert [p.finished for p in progress] == sorted(p.finished for p in progress) and progress[-1].finished == 5
    rows = manifest_records(first.manifest_uri, fs)
    assert [r.relative_path for r in rows] == ["broken.wav", "clip0.flac", "clip2.flac", "deep/clip1.flac", "deep/clip3.flac"]
    assert {r.model_uri for r in rows} == {s3_server.uri("bulk/models/tiny")} and len({r.model_sha256 for r in rows}) == 1
    stems = stem_digests(fs, f"{bucket}/stems")
    assert sorted(stems) == sorted(f"{r.relative_path}/{n}.flac" for r in rows[1:] for n in ("Alpha", "Beta + Gamma"))
    for r in rows[1:]:
        for uri in r.output_uris:
            audio, rate = sf.read(io.BytesIO(fs.cat_file(uri)))
            assert rate == RATE and len(audio) == round(r.duration_seconds * RATE)

    # A rerun skips every completed input; the failed one is tried again.
    second = run_bulk_separation(config, fs, job_id="run-2")
    assert second.complete_before == 4 and second.statuses == {"ok": 4, "invalid": 1} and second.audio_seconds == 0
    again = manifest_records(second.manifest_uri, fs)
    assert result_view(again) == result_view(rows)
    assert {r.relative_path: r.job_id for r in again}["clip0.flac"] == "run-1"
    assert {r.relative_path: r.job_id for r in again}["broken.wav"] == "run-2"

    # An interrupted run: one input lost its marker and has a half-written stem under its
    # temporary name; its final stem was never moved into place.
    signature = first.signature
    fs.rm(f"{bucket}/stems/{STATE_DIR}/{signature}/complete/deep/clip3.flac.json")
    fs.pipe(f"{bucket}/stems/deep/clip3.flac/.Alpha.flac.tmp", b"fLaC partial")
    fs.rm(f"{bucket}/stems/deep/clip3.flac/Alpha.flac")
    third = run_bulk_separation(config, fs, job_id="run-3")
    assert third.complete_before == 3 and third.audio_seconds == pytest.approx(3.5)
    assert stem_digests(fs, f"{bucket}/stems") == stems  # byte-identical, no leftovers
    assert result_view(manifest_records(third.manifest_uri, fs)) == result_view(rows)


# --------------------------------------------------------------------------------------------
# The job entry point: MLflow run with metrics and the manifest artifact


def test_job_logs_metrics_and_manifest_to_mlflow(tmp_path, checkpoint, ray_local, monkeypatch, capsys):
    import mlflow

    from jobs.separate import main

    monkeypatch.setenv("USS_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "a.wav", noise(2.0), RATE)
    (tmp_path / "in" / "b.wav").write_bytes(b"")
    code = main([
        "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--checkpoint", str(checkpoint),
        "--class", "Alpha", "--class-id", "1+2", "--activity-threshold", "0", "--actors", "1", "--format", "wav",
        "--memory-per-actor", "0.5",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "2 inputs (1 invalid, 1 ok" in printed and "audio-s per wall-s" in printed and "per CPU" in printed
    assert sorted(p.name for p in (tmp_path / "out" / "a.wav").iterdir()) == ["Alpha.wav", "Beta + Gamma.wav"]

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}")
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.tags["uss.job"] == "bulk-separate"
    metrics = run.data.metrics
    assert metrics["inputs"] == 2 and metrics["status_ok"] == 1 and metrics["status_invalid"] == 1
    assert metrics["audio_seconds"] == 2.0 and metrics["audio_seconds_per_second_per_cpu"] > 0
    assert run.data.params["queries.class_ids"] == "['1+2']"
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="manifest.parquet", dst_path=str(tmp_path / "dl"))
    rows = {r["relative_path"]: r for r in pq.read_table(local).to_pylist()}
    assert rows["a.wav"]["job_id"] == run.info.run_id and rows["b.wav"]["status"] == "invalid"
    # The manifest in the output is the one logged.
    assert pq.read_table(tmp_path / "out" / "manifest.parquet").equals(pq.read_table(local))
