"""Arrow schemas and the AudioSet sources: HDF5 packs, WebDataset shards, folder + segments CSV.

The tests write tiny real sources (synthetic sines at several rates and channel counts, one
corrupt item, one item with no known label) into a temporary folder and into a real S3 API server
(moto), read them with Ray Data, write Parquet locally and to S3, and read it back with plain
pyarrow.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipelines.schemas import (
    ANCHOR_SCHEMA,
    CLIP_SCHEMA,
    ERROR_SCHEMA,
    FLOAT_LIST,
    MIXTURE_SCHEMA,
    Anchor,
    Clip,
    ItemError,
    Mixture,
    list_column_to_numpy,
    make_anchor_id,
    make_mixture_id,
    read_table,
    records_to_table,
    table_to_records,
)
from pipelines.sources import (
    ClipSourceConfig,
    match_ytid,
    parse_segments_csv,
    read_clips,
    read_outcomes,
    write_clips,
    write_dataset,
)
from uss_core.audio import fix_length, load_audio
from uss_core.errors import ConfigError, MetadataError
from uss_core.ontology import load_label_set

RATE = 32000
CLIP = 320000
SPEECH, DOG, MUSIC = "/m/09x0r", "/m/0bt9lr", "/m/04rlf"
UNKNOWN = "/m/not-a-class"


def sine(rate: int, seconds: float, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    """``(frames,)`` or ``(frames, channels)`` float32 sine at 0.5 amplitude."""
    t = np.arange(int(rate * seconds)) / rate
    mono = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono * (c + 1) / channels for c in range(channels)], axis=1)


def encode(audio: np.ndarray, rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    subtype = {"WAV": "FLOAT", "FLAC": "PCM_16", "OGG": "VORBIS"}[fmt]
    sf.write(buf, audio, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


CORRUPT = b"fLaC this is not really a flac stream" * 10


# --------------------------------------------------------------------------------------------
# Test sources: what is written, and what reading it must give


@dataclass
class Expected:
    clips: dict[str, tuple[str, ...]]  # clip_id -> label mids (label-set order)
    errors: dict[str, tuple[str, str]]  # item_id -> (stage, text in the reason)
    audio: dict[str, np.ndarray]  # clip_id -> exact waveform for some clips


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_webdataset(root: Path) -> Expected:
    root.mkdir(parents=True)
    a = encode(sine(44100, 3.0, channels=2), 44100, "FLAC")
    samples = [
        ("a-stereo44k", "flac", a, [SPEECH]),
        ("b-mono16k", "wav", encode(sine(16000, 12.0, freq=300), 16000, "WAV"), ["Music", SPEECH]),
        ("c-ogg32k", "ogg", encode(sine(RATE, 10.0, freq=600), RATE, "OGG"), ["Dog", UNKNOWN]),
        ("d-corrupt", "flac", CORRUPT, ["Dog"]),
        ("e-unlabelled", "flac", encode(sine(RATE, 1.0), RATE, "FLAC"), [UNKNOWN, "Not a sound"]),
    ]
    members = []
    for key, ext, data, labels in samples:  # as pipelines.demo_corpus writes them
        members.append((f"{key}.{ext}", data))
        members.append((f"{key}.json", json.dumps({"clip_id": key, "labels": labels, "sample_rate": RATE}).encode()))
    (root / "shard-000000.tar").write_bytes(_tar(members))
    # A shard that breaks off inside its second sample: the first still counts.
    ok = encode(sine(RATE, 2.0), RATE, "WAV")
    broken = _tar([("f-ok.wav", ok), ("f-ok.json", b'{"labels": ["Dog"]}'), ("g-cut.wav", ok), ("g-cut.json", b"{}")])
    g_data = 512 + -(-len(ok) // 512) * 512 + 512 + 512 + 512  # f-ok.wav, f-ok.json, g-cut.wav header
    (root / "shard-000001.tar").write_bytes(broken[: g_data + 1000])
    return Expected(
        clips={
            "shard-000000/a-stereo44k": (SPEECH,),
            "shard-000000/b-mono16k": (SPEECH, MUSIC),
            "shard-000000/c-ogg32k": (DOG,),
            "shard-000001/f-ok": (DOG,),
        },
        errors={
            "shard-000000/d-corrupt": ("decode", "cannot decode audio"),
            "shard-000000/e-unlabelled": ("label", "none of its labels"),
            "shard-000001": ("read", "cannot be read after 1 sample"),
        },
        audio={"shard-000000/a-stereo44k": fix_length(load_audio(a, RATE), CLIP)},
    )


def make_hdf5(root: Path) -> Expected:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    waves = (rng.standard_normal((3, CLIP)) * 3000).astype(np.int16)
    with h5py.File(root / "balanced_train.h5", "w") as f:
        f.create_dataset(
            "audio_name", data=[b"Y--PJHxphWEs.wav", b"Yab_cd-EF_gh.wav", b"Yunlabelled0.wav"], dtype="S20"
        )
        f.create_dataset("waveform", data=waves)
        target = np.zeros((3, 527), dtype=bool)
        target[0, [0, 137]] = True
        target[1, 74] = True
        f.create_dataset("target", data=target)
    with h5py.File(root / "pack16k.h5", "w") as f:  # another rate, declared by an attribute
        f.attrs["sample_rate"] = 16000
        f.create_dataset("audio_name", data=[b"Yhalfrate001.wav"], dtype="S20")
        f.create_dataset("waveform", data=(sine(16000, 10.0) * 32767).astype(np.int16)[None])
        target = np.zeros((1, 527), dtype=bool)
        target[0, 74] = True
        f.create_dataset("target", data=target)
    (root / "broken.h5").write_bytes(b"not an hdf5 file" * 100)
    return Expected(
        clips={
            "balanced_train/Y--PJHxphWEs": (SPEECH, MUSIC),
            "balanced_train/Yab_cd-EF_gh": (DOG,),
            "pack16k/Yhalfrate001": (DOG,),
        },
        errors={"balanced_train/Yunlabelled0": ("label", "no labels"), "broken": ("read", "cannot open the HDF5 pack")},
        audio={"balanced_train/Y--PJHxphWEs": waves[0].astype(np.float32) / 32768.0},
    )


SEGMENTS_CSV = f"""\
# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=6, num_segs=6, num_unique_labels=3, num_positive_labels=7
# YTID, start_seconds, end_seconds, positive_labels
--PJHxphWEs, 30.000, 40.000, "{SPEECH},{MUSIC}"
ab_cd-EF_gh, 30.000, 40.000, "{DOG}"
longrec0001, 10.000, 20.000, "{MUSIC}"
corrupt0001, 0.000, 10.000, "{DOG}"
unknown0001, 0.000, 10.000, "{UNKNOWN}"
missingfile, 0.000, 10.000, "{DOG}"
"""


def make_folder(root: Path) -> Expected:
    audio = root / "audio"
    (audio / "sub").mkdir(parents=True)
    (audio / "Y--PJHxphWEs.wav").write_bytes(encode(sine(44100, 3.0, channels=2), 44100, "WAV"))
    (audio / "ab_cd-EF_gh_30.000.flac").write_bytes(encode(sine(16000, 12.0), 16000, "FLAC"))
    long = np.zeros(30 * RATE, dtype=np.float32)  # a whole 30-s recording, sound only in [10, 20) s
    long[10 * RATE : 20 * RATE] = sine(RATE, 10.0, freq=1000)
    (audio / "sub" / "Ylongrec0001.wav").write_bytes(encode(long, RATE, "WAV"))
    (audio / "Ycorrupt0001.flac").write_bytes(CORRUPT)
    (audio / "Yunknown0001.wav").write_bytes(encode(sine(RATE, 1.0), RATE, "WAV"))
    (audio / "stray.wav").write_bytes(encode(sine(RATE, 1.0), RATE, "WAV"))
    (root / "segments.csv").write_text(SEGMENTS_CSV)
    return Expected(
        clips={
            "audio/Y--PJHxphWEs": (SPEECH, MUSIC),
            "audio/ab_cd-EF_gh_30.000": (DOG,),
            "audio/sub/Ylongrec0001": (MUSIC,),
        },
        errors={
            "audio/Ycorrupt0001": ("decode", "cannot decode audio"),
            "audio/Yunknown0001": ("label", "none of its labels"),
            "audio/stray": ("label", "no row of"),
        },
        audio={"audio/sub/Ylongrec0001": long[10 * RATE : 20 * RATE]},
    )


@dataclass
class Corpus:
    local: Path
    s3_prefix: str  # s3://bucket/corpus
    expected: dict[str, Expected]

    def config(self, fmt: str, where: str, **kwargs) -> ClipSourceConfig:
        base = str(self.local) if where == "local" else self.s3_prefix
        if fmt == "folder":
            return ClipSourceConfig(
                "folder", (f"{base}/folder/audio",), segments_csv=f"{base}/folder/segments.csv", **kwargs
            )
        return ClipSourceConfig(fmt, (f"{base}/{fmt}",), **kwargs)


@pytest.fixture(scope="module")
def labels(audioset_dir):
    return load_label_set(audioset_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, s3_server) -> Corpus:
    root = tmp_path_factory.mktemp("sources")
    expected = {
        "webdataset": make_webdataset(root / "webdataset"),
        "hdf5": make_hdf5(root / "hdf5"),
        "folder": make_folder(root / "folder"),
    }
    for path in root.rglob("*"):
        if path.is_file():
            s3_server.fs.put_file(str(path), f"{s3_server.bucket}/corpus/{path.relative_to(root).as_posix()}")
    return Corpus(root, s3_server.uri("corpus"), expected)


# --------------------------------------------------------------------------------------------
# Schemas and records (no Ray)


def _records():
    clip = Clip("pack/Y1", "s3://b/pack.h5#3", [0, 137], [SPEECH, MUSIC], RATE, 5, np.arange(5, dtype=np.float32))
    anchor = Anchor(
        make_anchor_id(clip.clip_id, MUSIC, "max_area"),
        clip.clip_id,
        137,
        MUSIC,
        32000,
        32004,
        0.75,
        "max_area",
        clip.label_indexes,
        np.ones(4),
        np.full(527, 0.1),
        np.zeros(2048),
    )
    mixture = Mixture(
        make_mixture_id([anchor.anchor_id, "pack/Y2-/m/0bt9lr-random"]),
        anchor.anchor_id,
        ["pack/Y2-/m/0bt9lr-random"],
        137,
        [74],
        np.ones(4),
        np.full(4, 0.5),
        np.full(527, 0.1),
        np.zeros(2048),
        1.0,
        [0.8],
    )
    error = ItemError("pack/Y9", "s3://b/pack.h5#9", "decode", "cannot decode audio")
    return [(clip, CLIP_SCHEMA), (anchor, ANCHOR_SCHEMA), (mixture, MIXTURE_SCHEMA), (error, ERROR_SCHEMA)]


@pytest.mark.parametrize("index", range(4), ids=["clip", "anchor", "mixture", "error"])
def test_records_round_trip_through_parquet(tmp_path, index):
    record, schema = _records()[index]
    cls = type(record)
    assert cls.from_dict(record.to_dict()) == record
    table = records_to_table([record, record], schema)
    assert table.schema == schema
    folder = tmp_path / "ds"
    folder.mkdir()
    pq.write_table(table, folder / "part-0.parquet")
    back = pq.read_table(folder)  # plain pyarrow, no helper
    assert back.num_rows == 2 and back.schema.metadata is None
    for f in schema:
        if f.type == FLOAT_LIST:
            assert back.schema.field(f.name).type.value_type == pa.float32()  # a plain list, no extension type
    assert table_to_records(read_table(folder, schema=schema), cls) == [record, record]


def test_record_ids_and_validation():
    clip = _records()[0][0]
    assert make_anchor_id("pack/Y1", MUSIC, "random") == "pack/Y1-/m/04rlf-random"
    assert make_mixture_id(["a", "b", "c"]) == "a+b+c"
    with pytest.raises(ValueError, match="num_samples"):
        Clip("x", "u", [0], [SPEECH], RATE, 6, np.zeros(5))
    with pytest.raises(ValueError, match="mids"):
        Clip("x", "u", [0, 1], [SPEECH], RATE, 5, np.zeros(5))
    with pytest.raises(ValueError, match="mode"):
        Anchor("a", "c", 0, SPEECH, 0, 2, 0.5, "best", (0,), np.zeros(2), np.zeros(3), np.zeros(3))
    assert list_column_to_numpy(records_to_table([clip, clip], CLIP_SCHEMA)["waveform"]).shape == (2, 5)


def test_read_table_of_a_stage_that_wrote_nothing(tmp_path):
    assert read_table(tmp_path / "missing", schema=ERROR_SCHEMA).schema == ERROR_SCHEMA
    with pytest.raises(FileNotFoundError):
        read_table(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# Source parsing and config (no Ray)


def test_parse_segments_csv_reads_audioset_format():
    segments = parse_segments_csv(SEGMENTS_CSV)
    assert segments["--PJHxphWEs"].mids == (SPEECH, MUSIC)
    assert segments["longrec0001"].start_seconds == 10.0 and segments["longrec0001"].end_seconds == 20.0
    assert len(segments) == 6
    with_header = parse_segments_csv("YTID,start_seconds,end_seconds,positive_labels\nabc,0,10,/m/09x0r\n")
    assert with_header["abc"].mids == (SPEECH,)
    with pytest.raises(MetadataError, match="line 2"):
        parse_segments_csv('# comment\nabc, 0.0, ten, "/m/09x0r"\n')
    with pytest.raises(MetadataError, match="4 fields"):
        parse_segments_csv("abc, 0.0\n")


def test_match_ytid_rule():
    ytids = {"--PJHxphWEs", "ab_cd-EF_gh", "Yabc"}
    assert match_ytid("Y--PJHxphWEs", ytids) == "--PJHxphWEs"
    assert match_ytid("--PJHxphWEs", ytids) == "--PJHxphWEs"
    assert match_ytid("--PJHxphWEs_30.000", ytids) == "--PJHxphWEs"
    assert match_ytid("Y--PJHxphWEs_30.000_40.000", ytids) == "--PJHxphWEs"
    assert match_ytid("ab_cd-EF_gh_30.000", ytids) == "ab_cd-EF_gh"  # YTIDs may hold '_'
    assert match_ytid("Yabc", ytids) == "Yabc"  # the whole stem wins over a stripped 'Y'
    assert match_ytid("stray", ytids) is None


def test_config_validation(tmp_path):
    assert ClipSourceConfig("hdf5", "a.h5").uris == ("a.h5",)
    assert ClipSourceConfig("hdf5", ["a.h5"], clip_seconds=2.0).clip_samples == 64000
    for bad in (
        dict(format="mp4", uris=("x",)),
        dict(format="folder", uris=("x",)),
        dict(format="hdf5", uris=("x",), segments_csv="s.csv"),
        dict(format="hdf5", uris=()),
        dict(format="hdf5", uris=("x",), clip_seconds=0),
        dict(format="hdf5", uris=("x",), batch_size=0),
    ):
        with pytest.raises(ConfigError):
            ClipSourceConfig(**bad)


def test_listing_errors_are_config_errors(tmp_path, labels):
    with pytest.raises(ConfigError, match="no such file or folder"):
        read_outcomes(ClipSourceConfig("webdataset", str(tmp_path / "nope")), labels)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no webdataset input"):
        read_outcomes(ClipSourceConfig("webdataset", str(tmp_path / "empty")), labels)
    with h5py.File(tmp_path / "small.h5", "w") as f:
        f.create_dataset("audio_name", data=[b"x"])
        f.create_dataset("waveform", data=np.zeros((1, 10), np.int16))
        f.create_dataset("target", data=np.zeros((1, 10), bool))
    with pytest.raises(ConfigError, match="10 classes but the label set has 527"):
        read_outcomes(ClipSourceConfig("hdf5", str(tmp_path / "small.h5")), labels)


# --------------------------------------------------------------------------------------------
# Reading with Ray, writing Parquet, reading back with pyarrow


def check_outputs(clips: pa.Table, errors: pa.Table, expected: Expected, labels) -> None:
    ids = clips["clip_id"].to_pylist()
    assert sorted(ids) == sorted(expected.clips)
    for clip in table_to_records(clips, Clip):
        mids = expected.clips[clip.clip_id]
        assert clip.label_mids == mids
        assert clip.label_indexes == tuple(labels.index_of_mid(m) for m in mids)
        assert clip.sample_rate == RATE and clip.num_samples == CLIP and clip.waveform.shape == (CLIP,)
        assert np.isfinite(clip.waveform).all() and np.abs(clip.waveform).max() > 0.05
        if clip.clip_id in expected.audio:
            np.testing.assert_allclose(clip.waveform, expected.audio[clip.clip_id], atol=1e-6)
    assert list_column_to_numpy(clips["waveform"]).shape == (len(ids), CLIP)
    found = {row["item_id"]: row for row in errors.to_pylist()}
    assert sorted(found) == sorted(expected.errors)
    for item_id, (stage, reason) in expected.errors.items():
        assert found[item_id]["stage"] == stage, found[item_id]
        assert reason in found[item_id]["error"], found[item_id]


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("fmt", ["hdf5", "webdataset", "folder"])
def test_read_clips_and_write_parquet(ray_local, s3_server, corpus, labels, tmp_path, fmt, where):
    fs = s3_server.fs if where == "s3" else None
    clips, errors = read_clips(corpus.config(fmt, where, batch_size=2), labels, filesystem=fs)
    out = str(tmp_path) if where == "local" else s3_server.uri(f"out/{fmt}")
    write_dataset(clips, f"{out}/clips", fs, schema=CLIP_SCHEMA)
    write_dataset(errors, f"{out}/errors", fs, schema=ERROR_SCHEMA)
    if where == "local":  # plain pyarrow on the folders, no helper
        clips_table, errors_table = pq.read_table(f"{out}/clips"), pq.read_table(f"{out}/errors")
    else:
        clips_table = read_table(f"{out}/clips", s3_server.fs, schema=CLIP_SCHEMA)
        errors_table = pq.read_table(f"{s3_server.bucket}/out/{fmt}/errors", filesystem=s3_server.fs)
    assert clips_table.column_names == CLIP_SCHEMA.names and errors_table.column_names == ERROR_SCHEMA.names
    check_outputs(clips_table, errors_table, corpus.expected[fmt], labels)


@pytest.mark.parametrize("fmt", ["hdf5", "webdataset", "folder"])
def test_write_clips_one_pass_from_s3(ray_local, s3_server, corpus, labels, tmp_path, fmt):
    errors_uri = s3_server.uri(f"ingest/{fmt}/errors")
    result = write_clips(corpus.config(fmt, "s3"), labels, str(tmp_path / "clips"), errors_uri, s3_server.fs)
    expected = corpus.expected[fmt]
    assert (result.num_clips, result.num_errors) == (len(expected.clips), len(expected.errors))
    clips = pq.read_table(tmp_path / "clips")
    errors = read_table(errors_uri, s3_server.fs, schema=ERROR_SCHEMA)
    check_outputs(clips, errors, expected, labels)
    if fmt == "hdf5":  # a rerun replaces the outputs instead of adding to them
        write_clips(corpus.config(fmt, "s3"), labels, str(tmp_path / "clips"), errors_uri, s3_server.fs)
        assert pq.read_table(tmp_path / "clips").num_rows == len(expected.clips)
        assert read_table(errors_uri, s3_server.fs, schema=ERROR_SCHEMA).num_rows == len(expected.errors)


def test_outputs_are_checked_before_any_work(s3_server, corpus, labels, tmp_path):
    source = corpus.config("hdf5", "local")
    with pytest.raises(ConfigError, match="different folders"):
        write_clips(source, labels, str(tmp_path / "x"), str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="bucket root"):
        write_clips(source, labels, s3_server.uri(""), str(tmp_path / "errors"), s3_server.fs)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_dataset_without_rows_still_has_its_schema(ray_local, s3_server, tmp_path, where):
    import ray.data

    fs = s3_server.fs if where == "s3" else None
    uri = s3_server.uri("out/no-errors") if where == "s3" else str(tmp_path / "no-errors")
    write_dataset(ray.data.from_arrow(ERROR_SCHEMA.empty_table()), uri, fs, schema=ERROR_SCHEMA)
    path = f"{s3_server.bucket}/out/no-errors" if where == "s3" else uri
    table = pq.read_table(path, filesystem=fs)
    assert table.num_rows == 0 and table.schema == ERROR_SCHEMA
