"""Ray Data readers: AudioSet-style sources -> the clips dataset and the errors dataset.

Three source formats, each decoded to mono float32 clips at ``sample_rate`` (32 kHz), zero-padded
or cut to exactly ``clip_seconds`` (10 s), with weak labels resolved against a
:class:`~uss_core.ontology.LabelSet` (rows follow :data:`~pipelines.schemas.CLIP_SCHEMA`):

``"hdf5"`` -- the reference's packed HDF5 files (PANNs / ``uss`` packs): datasets ``audio_name``
    (bytes, ``(N,)``), ``waveform`` (int16 or float, ``(N, samples)``) and ``target`` (bool,
    ``(N, classes)``). ``target`` columns are indexes into the label set, which must be the one
    the pack was built with (the 527 AudioSet classes in ``class_labels_indices.csv`` order);
    a width mismatch is a :class:`~uss_core.errors.ConfigError`. The pack's sample rate is its
    ``sample_rate`` attribute (file or ``waveform`` dataset) if it has one, else
    ``samples / clip_seconds``; other rates are resampled. Item name: ``audio_name`` without its
    audio extension. ``uris``: pack files, or folders holding ``*.h5`` / ``*.hdf5``.
``"webdataset"`` -- tar shards (``*.tar``, also gzip-compressed), WebDataset layout: the members
    of one sample are adjacent and share a key (the member path up to the first dot of its file
    name); each sample has one audio member (``.flac``, ``.wav``, ``.ogg``, ``.mp3`` ...) and a
    ``.json`` member ``{"labels": [mid or display name, ...]}``; other members are ignored.
    Item name: the key. ``uris``: shard files, or folders holding them.
``"folder"`` -- audio files under folders plus an AudioSet segments CSV (``YTID, start_seconds,
    end_seconds, positive_labels``; ``#`` comment lines and a ``YTID,...`` header are skipped;
    ``positive_labels`` is a quoted, comma-separated list of mids). Matching rule
    (:func:`match_ytid`): a file belongs to the row whose YTID is its whole file stem, or its
    stem without a leading ``Y``, or the part of either before an ``_`` (longest first): e.g.
    ``Y--PJHxphWEs.wav``, ``--PJHxphWEs.flac``, ``--PJHxphWEs_30.000.flac``,
    ``Y--PJHxphWEs_30.000_40.000.wav``. A file is taken to be the segment itself, unless it is
    longer than both the clip (+1 s) and the row's ``end_seconds``: then it is the whole
    recording and ``[start_seconds, end_seconds)`` is cut from it. CSV rows without a file are
    not reported (AudioSet downloads always miss some). Item name: the path relative to the
    folder, without extension. ``uris``: folders (searched recursively) or audio files.

``clip_id`` is ``"<pack / shard / folder stem>/<item name>"``; ``source_uri`` is the file's URI, or
``"<pack uri>#<row>"`` / ``"<shard uri>#<member name>"``. Items that cannot be read or decoded,
or have no label in the label set, become rows of the errors dataset (``ERROR_SCHEMA``; stage
``"read"``, ``"decode"`` or ``"label"``) and the run goes on; a pack or shard that cannot be opened
(or breaks off) gives one error row for itself.

Use::

    labels = load_label_set()
    source = ClipSourceConfig(format="webdataset", uris=("s3://bucket/shards/",))
    clips, errors = read_clips(source, labels, filesystem=s3fs.S3FileSystem())
    write_dataset(clips, "s3://bucket/clips", filesystem=fs, schema=CLIP_SCHEMA)

``read_clips`` lists the sources (and reads the CSV and pack sizes) at once; decoding is lazy and
runs each time a returned dataset is consumed, so writing both datasets decodes twice. For the
ingest job use :func:`write_clips`, which decodes once and writes both datasets in one pass.

URIs with a scheme (``s3://``) go through ``filesystem`` (an fsspec filesystem such as
``s3fs.S3FileSystem`` -- recommended for HDF5 on S3, its read-ahead cache suits h5py's small
reads -- or a ``pyarrow.fs`` one; None: from the URI and the AWS environment); plain paths are
local. Decode tasks take ``num_cpus`` each (default 1): on small machines leave CPUs free for
other stages.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import tarfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Container, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import Datasink
from ray.data.block import BlockAccessor

from pipelines.schemas import (
    CLIP_SCHEMA,
    ERROR_SCHEMA,
    Clip,
    ItemError,
    conform,
    list_parquet_files,
    records_to_table,
    resolve_filesystem,
)
from uss_core.audio import AUDIO_EXTENSIONS, SAMPLE_RATE, fix_length, load_audio, resample
from uss_core.errors import ConfigError, LabelError, MetadataError, UssError
from uss_core.ontology import LabelSet

FORMATS = ("hdf5", "webdataset", "folder")
HDF5_EXTENSIONS = (".h5", ".hdf5")
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")

# Error stages of this module (ItemError.stage).
STAGE_READ = "read"
STAGE_DECODE = "decode"
STAGE_LABEL = "label"

# Each decode call's output is one table of at most batch_size clips (1.28 MB each at 10 s).
_RANGES_PER_BLOCK = 8  # HDF5: batch-sized row ranges per read task
_MAX_BLOCKS = 2000


@dataclass(frozen=True)
class ClipSourceConfig:
    """Where the clips come from and how they are cut.

    ``uris``: files or folders (local paths or ``s3://...``); a single string is accepted.
    ``segments_csv``: the AudioSet segments CSV (``"folder"`` format only; local or ``s3://``).
    ``batch_size``: clips per decoded block; ``num_cpus``: CPUs reserved per decode task.
    """

    format: str
    uris: tuple[str, ...]
    segments_csv: str | None = None
    clip_seconds: float = 10.0
    sample_rate: int = SAMPLE_RATE
    batch_size: int = 16
    num_cpus: float = 1.0

    def __post_init__(self) -> None:
        uris = (self.uris,) if isinstance(self.uris, (str, os.PathLike)) else tuple(self.uris)
        object.__setattr__(self, "uris", tuple(str(u) for u in uris))
        if self.format not in FORMATS:
            raise ConfigError(f"source format {self.format!r} is not one of {', '.join(FORMATS)}")
        if not self.uris:
            raise ConfigError("a clip source needs at least one uri (file or folder)")
        if self.format == "folder" and not self.segments_csv:
            raise ConfigError(
                "the 'folder' source format needs segments_csv (the AudioSet segments CSV with the labels)"
            )
        if self.format != "folder" and self.segments_csv:
            raise ConfigError(f"segments_csv is only used by the 'folder' format, not {self.format!r}")
        if not self.clip_seconds > 0:
            raise ConfigError(f"clip_seconds must be > 0, got {self.clip_seconds}")
        if not 1000 <= self.sample_rate <= 768000:
            raise ConfigError(f"sample_rate {self.sample_rate} Hz is outside 1000-768000 Hz")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.num_cpus > 0:
            raise ConfigError(f"num_cpus must be > 0, got {self.num_cpus}")

    @property
    def clip_samples(self) -> int:
        """Length of every clip in samples."""
        return int(round(self.clip_seconds * self.sample_rate))


# --------------------------------------------------------------------------------------------
# Outcomes: one table type for clips and errors while they travel together


# The clip columns plus the error columns; an error row has clip_id = item_id, source_uri, the
# error columns set and nulls elsewhere. Private: split by _clips_of / _errors_of.
_OUTCOME_SCHEMA = pa.schema(list(CLIP_SCHEMA) + [pa.field("error_stage", pa.string()), pa.field("error", pa.string())])


@dataclass(frozen=True)
class _Decoder:
    """What a decode task needs (pickled into each task)."""

    labels: LabelSet
    sample_rate: int
    clip_samples: int
    clip_seconds: float
    batch_size: int


@dataclass
class _Outcomes:
    clips: list[Clip] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.clips) + len(self.errors)

    def error(self, item_id: str, source_uri: str, stage: str, reason: str) -> None:
        self.errors.append(ItemError(item_id, source_uri, stage, reason))

    def take_table(self) -> pa.Table:
        clips = records_to_table(self.clips, CLIP_SCHEMA)
        n = len(self.errors)
        errors = [
            pa.array([e.item_id for e in self.errors], pa.string()),
            pa.array([e.source_uri for e in self.errors], pa.string()),
        ]
        errors += [pa.nulls(n, f.type) for f in list(CLIP_SCHEMA)[2:]]
        errors += [
            pa.array([e.stage for e in self.errors], pa.string()),
            pa.array([e.error for e in self.errors], pa.string()),
        ]
        clip_part = pa.Table.from_arrays(
            list(clips.columns) + [pa.nulls(clips.num_rows, pa.string())] * 2, schema=_OUTCOME_SCHEMA
        )
        self.clips, self.errors = [], []
        return pa.concat_tables([clip_part, pa.Table.from_arrays(errors, schema=_OUTCOME_SCHEMA)])


def _clips_of(table: pa.Table) -> pa.Table:
    """The clip rows of an outcome table, as CLIP_SCHEMA."""
    return conform(table.filter(pc.is_null(table["error"])), CLIP_SCHEMA)


def _errors_of(table: pa.Table) -> pa.Table:
    """The error rows of an outcome table, as ERROR_SCHEMA."""
    e = table.filter(pc.is_valid(table["error"]))
    return pa.Table.from_arrays([e["clip_id"], e["source_uri"], e["error_stage"], e["error"]], schema=ERROR_SCHEMA)


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, UssError) else f"{type(exc).__name__}: {exc}"


def _resolve_labels(texts: Sequence[str], labels: LabelSet) -> tuple[list[int], list[str]]:
    """Label-set indexes (ascending, unique) and mids of the labels in ``texts`` that it knows."""
    indexes = set()
    for text in texts:
        if labels.has_mid(text):
            indexes.add(labels.index_of_mid(text))
        elif not text.startswith("/"):  # not a mid: a display name (exact, then any case)
            try:
                indexes.add(labels.resolve(text))
            except LabelError:
                continue
    ordered = sorted(indexes)
    return ordered, [labels.mids[i] for i in ordered]


def _unlabelled_reason(texts: Sequence[str], labels: LabelSet) -> str:
    if not texts:
        return "the item has no labels"
    shown = ", ".join(repr(t) for t in list(texts)[:8]) + (" ..." if len(texts) > 8 else "")
    return f"none of its labels ({shown}) is in the label set ({len(labels)} classes)"


def _stem(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for ext in TAR_EXTENSIONS + HDF5_EXTENSIONS + tuple(AUDIO_EXTENSIONS):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _strip_audio_extension(name: str) -> str:
    root, ext = os.path.splitext(name)
    return root if ext.lower() in AUDIO_EXTENSIONS else name


def _uri_of(uri_root: str, path_root: str, path: str) -> str:
    """The URI of ``path`` (found under ``path_root``, which ``uri_root`` names)."""
    if path == path_root:
        return uri_root
    return uri_root.rstrip("/") + "/" + path[len(path_root) :].lstrip("/")


def _list_files(uri: str, fs: pafs.FileSystem, path: str, extensions: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(uri, path, folder path)`` of the files with ``extensions`` at ``uri`` (a file, or a
    folder searched recursively), sorted. Raises ConfigError if there is nothing there."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [(uri, path, path.rsplit("/", 1)[0] if "/" in path else "")]
    if info.type != pafs.FileType.Directory:
        raise ConfigError(f"{uri}: no such file or folder")
    found = sorted(
        i.path
        for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if i.type == pafs.FileType.File
        and i.path.lower().endswith(tuple(extensions))
        and not i.base_name.startswith(".")  # hidden files, e.g. macOS "._x.wav" resource forks
    )
    return [(_uri_of(uri, path, p), p, path) for p in found]


def _blocks(rows: list[dict[str, Any]], schema: pa.Schema, rows_per_block: int) -> ray.data.Dataset:
    """A dataset of work items, ``rows_per_block`` per block (at most _MAX_BLOCKS blocks)."""
    table = pa.Table.from_pylist(rows, schema=schema)
    per_block = max(rows_per_block, math.ceil(len(rows) / _MAX_BLOCKS))
    return ray.data.from_arrow([table.slice(i, per_block) for i in range(0, max(len(rows), 1), per_block)])


# --------------------------------------------------------------------------------------------
# HDF5 packs


_HDF5_WORK = pa.schema(
    [
        ("uri", pa.string()),
        ("path", pa.string()),
        ("start", pa.int64()),
        ("stop", pa.int64()),
        ("rate", pa.int64()),
        ("error", pa.string()),
    ]
)


def _open_hdf5(fs: pafs.FileSystem, path: str):
    import h5py

    handle = fs.open_input_file(path)
    try:
        return h5py.File(handle, "r"), handle
    except Exception:
        handle.close()
        raise


def _hdf5_rate(pack, width: int, clip_seconds: float) -> int:
    for attrs in (pack.attrs, pack["waveform"].attrs):
        if "sample_rate" in attrs:
            return int(attrs["sample_rate"])
    return int(round(width / clip_seconds))


def _pack_rows(uri: str, path: str, start: int = 0, stop: int = 0, rate: int = 0, error: str | None = None) -> dict:
    """One HDF5 work item: rows ``[start, stop)`` of a pack, or an error for the whole pack."""
    return dict(uri=uri, path=path, start=start, stop=stop, rate=rate, error=error)


def _hdf5_work(source: ClipSourceConfig, labels: LabelSet, filesystem: Any) -> list[dict[str, Any]]:
    """Row ranges of ``batch_size`` rows of every pack (opened here for their sizes)."""
    work = []
    for uri in source.uris:
        fs, path = resolve_filesystem(uri, filesystem)
        for file_uri, file_path, _ in _list_files(uri, fs, path, HDF5_EXTENSIONS):
            try:
                pack, handle = _open_hdf5(fs, file_path)
            except Exception as exc:  # an unreadable pack is one error row; the run goes on
                work.append(_pack_rows(file_uri, file_path, error=f"cannot open the HDF5 pack: {_reason(exc)}"))
                continue
            with handle, pack:
                missing = [k for k in ("audio_name", "waveform", "target") if k not in pack]
                if missing:
                    work.append(_pack_rows(file_uri, file_path, error=f"not a clip pack: it has no {missing}"))
                    continue
                n, width = pack["waveform"].shape
                classes = pack["target"].shape[1]
                if classes != len(labels):
                    raise ConfigError(
                        f"{file_uri}: 'target' has {classes} classes but the label set has {len(labels)}; "
                        "read the pack with the label set it was built with (the 527 AudioSet classes)"
                    )
                if len(pack["audio_name"]) != n or pack["target"].shape[0] != n:
                    reason = "audio_name, waveform and target have different lengths"
                    work.append(_pack_rows(file_uri, file_path, error=reason))
                    continue
                rate = _hdf5_rate(pack, width, source.clip_seconds)
            for start in range(0, n, source.batch_size):
                work.append(_pack_rows(file_uri, file_path, start, min(start + source.batch_size, n), rate))
    return work


def _decode_hdf5(work: pa.Table, fs: pafs.FileSystem, decoder: _Decoder) -> Iterator[pa.Table]:
    """Work rows are row ranges of packs; yields one outcome table per range."""
    opened: tuple[str, Any, Any] | None = None  # (path, pack, handle), reused across ranges
    try:
        for item in work.to_pylist():
            out = _Outcomes()
            stem = _stem(item["uri"])
            if item["error"] is not None:
                out.error(stem, item["uri"], STAGE_READ, item["error"])
                yield out.take_table()
                continue
            try:
                if opened is None or opened[0] != item["path"]:
                    if opened is not None:
                        _close_pack(opened)
                        opened = None
                    opened = (item["path"], *_open_hdf5(fs, item["path"]))
                pack = opened[1]
                start, stop = item["start"], item["stop"]
                names = pack["audio_name"][start:stop]
                waves = pack["waveform"][start:stop]
                targets = np.asarray(pack["target"][start:stop], dtype=bool)
            except Exception as exc:
                for row in range(item["start"], item["stop"]):
                    out.error(
                        f"{stem}/{row:07d}",
                        f"{item['uri']}#{row}",
                        STAGE_READ,
                        f"cannot read the pack rows: {_reason(exc)}",
                    )
                yield out.take_table()
                continue
            for k, row in enumerate(range(start, stop)):
                raw = names[k]
                name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                item_id = f"{stem}/{_strip_audio_extension(name) or f'{row:07d}'}"
                uri = f"{item['uri']}#{row}"
                indexes = [int(i) for i in np.flatnonzero(targets[k])]
                if not indexes:
                    out.error(item_id, uri, STAGE_LABEL, "the item has no labels (its target row is all false)")
                    continue
                try:
                    wave = waves[k]
                    audio = wave.astype(np.float32) / 32768.0 if wave.dtype == np.int16 else wave.astype(np.float32)
                    if not np.isfinite(audio).all():
                        raise ValueError("non-finite samples (NaN or infinity)")
                    audio = resample(audio, int(item["rate"]), decoder.sample_rate)
                    audio = fix_length(audio, decoder.clip_samples)
                except Exception as exc:
                    out.error(item_id, uri, STAGE_DECODE, _reason(exc))
                    continue
                mids = [decoder.labels.mids[i] for i in indexes]
                out.clips.append(Clip(item_id, uri, indexes, mids, decoder.sample_rate, decoder.clip_samples, audio))
            yield out.take_table()
    finally:
        if opened is not None:
            _close_pack(opened)


def _close_pack(opened: tuple[str, Any, Any]) -> None:
    opened[1].close()
    opened[2].close()


# --------------------------------------------------------------------------------------------
# WebDataset tar shards


_SHARD_WORK = pa.schema([("uri", pa.string()), ("path", pa.string())])
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset: key, then extension(s)


def _tar_samples(stream) -> Iterator[tuple[str, dict[str, bytes], list[str]]]:
    """``(key, {extension: bytes}, member names)`` of consecutive members sharing a key."""
    key, members, names = None, {}, []
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            m = _KEY_RE.match(info.name)
            if m is None:
                continue
            k, ext = m.group(1), m.group(2).lower()
            if k != key and key is not None:
                yield key, members, names
                members, names = {}, []
            key = k
            data = tar.extractfile(info)
            members[ext] = data.read() if data is not None else b""
            names.append(info.name)
    if key is not None:
        yield key, members, names


def _sample_outcome(
    out: _Outcomes, stem: str, shard_uri: str, key: str, members: dict[str, bytes], names: list[str], decoder: _Decoder
) -> None:
    item_id = f"{stem}/{key}"
    audio_ext = next((ext for ext in members if "." + ext.rsplit(".", 1)[-1] in AUDIO_EXTENSIONS), None)
    uri = f"{shard_uri}#{key}.{audio_ext}" if audio_ext else f"{shard_uri}#{key}"
    if audio_ext is None:
        out.error(
            item_id,
            uri,
            STAGE_DECODE,
            f"the sample has no audio member (.flac, .wav, .ogg, .mp3 ...); members: {names}",
        )
        return
    if "json" not in members:
        out.error(item_id, uri, STAGE_LABEL, f"the sample has no .json member with its labels; members: {names}")
        return
    try:
        meta = json.loads(members["json"])
        texts = meta.get("labels", []) if isinstance(meta, dict) else None
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError('expected {"labels": ["<mid or name>", ...]}')
    except ValueError as exc:
        out.error(item_id, uri, STAGE_LABEL, f"the .json member cannot be used: {exc}")
        return
    indexes, mids = _resolve_labels(texts, decoder.labels)
    if not indexes:
        out.error(item_id, uri, STAGE_LABEL, _unlabelled_reason(texts, decoder.labels))
        return
    try:
        audio = fix_length(load_audio(members[audio_ext], decoder.sample_rate, name=uri), decoder.clip_samples)
    except Exception as exc:
        out.error(item_id, uri, STAGE_DECODE, _reason(exc))
        return
    out.clips.append(Clip(item_id, uri, indexes, mids, decoder.sample_rate, decoder.clip_samples, audio))


def _decode_shards(work: pa.Table, fs: pafs.FileSystem, decoder: _Decoder) -> Iterator[pa.Table]:
    """Work rows are shards; streams each and yields outcome tables of ``batch_size`` items."""
    for item in work.to_pylist():
        stem, out, count = _stem(item["uri"]), _Outcomes(), 0
        try:
            with fs.open_input_stream(item["path"]) as stream:
                for key, members, names in _tar_samples(stream):
                    _sample_outcome(out, stem, item["uri"], key, members, names, decoder)
                    count += 1
                    if len(out) >= decoder.batch_size:
                        yield out.take_table()
        except Exception as exc:  # unreadable or truncated shard: keep what was read, report it
            where = f"after {count} sample(s)" if count else "before its first sample"
            out.error(stem, item["uri"], STAGE_READ, f"the tar shard cannot be read {where}: {_reason(exc)}")
        if len(out):
            yield out.take_table()


# --------------------------------------------------------------------------------------------
# Folder + AudioSet segments CSV


@dataclass(frozen=True)
class Segment:
    """One row of an AudioSet segments CSV."""

    ytid: str
    start_seconds: float
    end_seconds: float
    mids: tuple[str, ...]


def parse_segments_csv(text: str, name: str = "segments csv") -> dict[str, Segment]:
    """``{YTID: Segment}`` from the text of an AudioSet segments CSV.

    Lines starting with ``#`` and a ``YTID,...`` header are skipped; fields may be followed by
    spaces (AudioSet writes ``", "``); ``positive_labels`` is one quoted field of comma-separated
    mids. Raises MetadataError (with the line number) on a malformed row.
    """
    segments: dict[str, Segment] = {}
    fields = "YTID, start_seconds, end_seconds, positive_labels"
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        row = next(csv.reader([line], skipinitialspace=True))
        if row[0].strip() == "YTID":
            continue
        if len(row) != 4:
            raise MetadataError(f"{name}, line {lineno}: expected 4 fields ({fields}), got {len(row)}")
        try:
            start, end = float(row[1]), float(row[2])
        except ValueError:
            raise MetadataError(
                f"{name}, line {lineno}: start/end seconds {row[1]!r}, {row[2]!r} are not numbers"
            ) from None
        mids = tuple(m.strip() for m in row[3].split(",") if m.strip())
        segments[row[0].strip()] = Segment(row[0].strip(), start, end, mids)
    return segments


def match_ytid(stem: str, ytids: Container[str]) -> str | None:
    """The YTID a file stem belongs to, or None (the module docstring states the rule).

    Tried in order: the stem, the stem without a leading ``Y``, then the parts of each before an
    ``_``, longest first. ``"Y--PJHxphWEs"``, ``"--PJHxphWEs_30.000"`` -> ``"--PJHxphWEs"``.
    """
    bases = [stem] + ([stem[1:]] if stem.startswith("Y") and len(stem) > 1 else [])
    candidates = list(bases)
    for base in bases:
        cuts = [i for i, ch in enumerate(base) if ch == "_" and i > 0]
        candidates += [base[:i] for i in reversed(cuts)]
    return next((c for c in candidates if c in ytids), None)


_FOLDER_WORK = pa.schema(
    [
        ("uri", pa.string()),
        ("path", pa.string()),
        ("item_id", pa.string()),
        ("mids", pa.list_(pa.string())),
        ("start_seconds", pa.float64()),
        ("end_seconds", pa.float64()),
        ("error", pa.string()),
    ]
)


def _read_text(uri: str, filesystem: Any) -> str:
    fs, path = resolve_filesystem(uri, filesystem)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{uri}: cannot read the segments CSV ({exc})") from None


def _folder_work(source: ClipSourceConfig, filesystem: Any) -> list[dict[str, Any]]:
    segments = parse_segments_csv(_read_text(source.segments_csv, filesystem), source.segments_csv)
    work = []
    for uri in source.uris:
        fs, path = resolve_filesystem(uri, filesystem)
        for file_uri, file_path, root in _list_files(uri, fs, path, sorted(AUDIO_EXTENSIONS)):
            relative = file_path[len(root) :].lstrip("/") if root else file_path
            item_id = f"{_stem(root) or 'root'}/{_strip_audio_extension(relative)}"
            ytid = match_ytid(_stem(file_path), segments)
            if ytid is None:
                work.append(
                    dict(
                        uri=file_uri,
                        path=file_path,
                        item_id=item_id,
                        mids=[],
                        start_seconds=0.0,
                        end_seconds=0.0,
                        error=f"no row of {source.segments_csv} matches the file name (by YTID)",
                    )
                )
                continue
            seg = segments[ytid]
            work.append(
                dict(
                    uri=file_uri,
                    path=file_path,
                    item_id=item_id,
                    mids=list(seg.mids),
                    start_seconds=seg.start_seconds,
                    end_seconds=seg.end_seconds,
                    error=None,
                )
            )
    return work


def _decode_files(work: pa.Table, fs: pafs.FileSystem, decoder: _Decoder) -> pa.Table:
    out = _Outcomes()
    for item in work.to_pylist():
        item_id, uri = item["item_id"], item["uri"]
        if item["error"] is not None:
            out.error(item_id, uri, STAGE_LABEL, item["error"])
            continue
        indexes, mids = _resolve_labels(item["mids"], decoder.labels)
        if not indexes:
            out.error(item_id, uri, STAGE_LABEL, _unlabelled_reason(item["mids"], decoder.labels))
            continue
        try:
            with fs.open_input_stream(item["path"]) as f:
                data = f.read()
        except Exception as exc:
            out.error(item_id, uri, STAGE_READ, f"cannot read the file: {_reason(exc)}")
            continue
        try:
            audio = load_audio(data, decoder.sample_rate, name=uri)
            start, end = item["start_seconds"], item["end_seconds"]
            seconds = len(audio) / decoder.sample_rate
            if seconds > decoder.clip_seconds + 1.0 and seconds >= end > start:  # the whole recording
                audio = audio[int(round(start * decoder.sample_rate)) : int(round(end * decoder.sample_rate))]
            audio = fix_length(audio, decoder.clip_samples)
        except Exception as exc:
            out.error(item_id, uri, STAGE_DECODE, _reason(exc))
            continue
        out.clips.append(Clip(item_id, uri, indexes, mids, decoder.sample_rate, decoder.clip_samples, audio))
    return out.take_table()


# --------------------------------------------------------------------------------------------
# Entry points


def _remote_args(source: ClipSourceConfig) -> dict[str, Any]:
    return {"num_cpus": source.num_cpus}


def read_outcomes(source: ClipSourceConfig, labels: LabelSet, filesystem: Any = None) -> ray.data.Dataset:
    """The decoded clips and the errors together (private outcome schema; see :func:`read_clips`).

    Lists the sources now (raises ConfigError if a uri holds nothing, or an HDF5 pack's class
    count does not match ``labels``); decoding is lazy.
    """
    # Every uri of one source shares one filesystem (all local or all through ``filesystem``).
    filesystems = [resolve_filesystem(u, filesystem)[0] for u in source.uris]
    if len({type(fs) for fs in filesystems}) > 1:
        raise ConfigError("the uris of one source must be all local or all remote; use one source per kind")
    decoder = _Decoder(labels, source.sample_rate, source.clip_samples, source.clip_seconds, source.batch_size)
    if source.format == "hdf5":
        work, schema, fn = _hdf5_work(source, labels, filesystem), _HDF5_WORK, _decode_hdf5
        batch_size, rows_per_block = None, _RANGES_PER_BLOCK  # one call per block, yields per range
    elif source.format == "webdataset":
        work = [
            dict(uri=u, path=p)
            for uri in source.uris
            for u, p, _ in _list_files(uri, *resolve_filesystem(uri, filesystem), TAR_EXTENSIONS)
        ]
        schema, fn = _SHARD_WORK, _decode_shards
        batch_size, rows_per_block = None, 1  # one shard per block and call, yields per batch
    else:
        work, schema, fn = _folder_work(source, filesystem), _FOLDER_WORK, _decode_files
        batch_size, rows_per_block = source.batch_size, source.batch_size * 4
    if not work:
        raise ConfigError(f"no {source.format} input found at {', '.join(source.uris)}")
    return _blocks(work, schema, rows_per_block).map_batches(
        fn,
        batch_size=batch_size,
        batch_format="pyarrow",
        fn_kwargs={"fs": filesystems[0], "decoder": decoder},
        **_remote_args(source),
    )


def read_clips(
    source: ClipSourceConfig, labels: LabelSet, filesystem: Any = None
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """``(clips, errors)``: Ray datasets with ``CLIP_SCHEMA`` and ``ERROR_SCHEMA`` rows.

    Each is lazy and decodes the source when consumed (see :func:`write_clips` for one pass).
    """
    outcomes = read_outcomes(source, labels, filesystem)
    remote = _remote_args(source)
    clips = outcomes.map_batches(_clips_of, batch_format="pyarrow", **remote)
    errors = outcomes.map_batches(_errors_of, batch_format="pyarrow", **remote)
    return clips, errors


def _check_output(uri: str, fs: pafs.FileSystem, path: str) -> None:
    parts = [p for p in path.split("/") if p]
    if len(parts) < (1 if isinstance(fs, pafs.LocalFileSystem) else 2):
        raise ConfigError(
            f"{uri}: refusing to write a dataset at a file system or bucket root; give a folder inside it"
        )


def _ensure_schema_file(fs: pafs.FileSystem, path: str, schema: pa.Schema) -> None:
    """Write an empty Parquet file with ``schema`` if the folder holds no Parquet file."""
    if not list_parquet_files(fs, path):
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/part-empty.parquet") as f:
            pq.write_table(schema.empty_table(), f)


def write_dataset(
    ds: ray.data.Dataset, uri: str, filesystem: Any = None, *, schema: pa.Schema | None = None, mode: str = "overwrite"
) -> None:
    """Write ``ds`` as a Parquet dataset folder at ``uri`` (local or ``s3://``).

    ``mode``: ``"overwrite"`` (default: a rerun replaces the folder's contents), ``"append"``,
    ``"error"`` (fail if it exists) or ``"ignore"``. With ``schema``, rows are cast to it and a
    dataset with no rows still leaves a (row-less) Parquet file, so readers see the schema.
    """
    from ray.data import SaveMode

    modes = {
        "overwrite": SaveMode.OVERWRITE,
        "append": SaveMode.APPEND,
        "error": SaveMode.CREATE,
        "ignore": SaveMode.IGNORE,
    }
    if mode not in modes:
        raise ConfigError(f"write mode {mode!r} is not one of {', '.join(modes)}")
    fs, path = resolve_filesystem(uri, filesystem)
    _check_output(uri, fs, path)
    if schema is not None:
        ds = ds.map_batches(conform, batch_format="pyarrow", fn_kwargs={"schema": schema})
    # Object stores have no folders: with try_create_dir, Ray 2.60 deletes the "created" folder
    # after a write of no rows, which raises FileNotFoundError through s3fs.
    ds.write_parquet(path, filesystem=fs, mode=modes[mode], try_create_dir=isinstance(fs, pafs.LocalFileSystem))
    if schema is not None:
        _ensure_schema_file(fs, path, schema)


@dataclass(frozen=True)
class IngestResult:
    """What :func:`write_clips` wrote."""

    clips_uri: str
    errors_uri: str
    num_clips: int
    num_errors: int


class _ClipsAndErrorsDatasink(Datasink):
    """Splits outcome blocks into two Parquet folders; each write task writes one file per folder."""

    def __init__(self, clips: tuple[pafs.FileSystem, str], errors: tuple[pafs.FileSystem, str]) -> None:
        self.targets = {"clips": (*clips, CLIP_SCHEMA, _clips_of), "errors": (*errors, ERROR_SCHEMA, _errors_of)}
        self.run_id = uuid.uuid4().hex[:12]
        self.counts = {"clips": 0, "errors": 0}

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        for fs, path, _, _ in self.targets.values():
            fs.delete_dir_contents(path, missing_dir_ok=True)
            fs.create_dir(path, recursive=True)

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, int]:
        writers: dict[str, pq.ParquetWriter] = {}
        streams: dict[str, Any] = {}
        counts = {"clips": 0, "errors": 0}
        try:
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow()
                for kind, (fs, path, schema, split) in self.targets.items():
                    part = split(table)
                    if not part.num_rows:
                        continue
                    if kind not in writers:  # same name on a retry: the retry overwrites
                        streams[kind] = fs.open_output_stream(f"{path}/part-{self.run_id}-{ctx.task_idx:06d}.parquet")
                        writers[kind] = pq.ParquetWriter(streams[kind], schema)
                    writers[kind].write_table(part)
                    counts[kind] += part.num_rows
        finally:
            for kind in writers:
                writers[kind].close()
                streams[kind].close()
        return counts

    def on_write_complete(self, write_result: Any) -> None:
        for counts in write_result.write_returns:
            for kind, n in counts.items():
                self.counts[kind] += n
        for fs, path, schema, _ in self.targets.values():
            _ensure_schema_file(fs, path, schema)


def write_clips(
    source: ClipSourceConfig, labels: LabelSet, clips_uri: str, errors_uri: str, filesystem: Any = None
) -> IngestResult:
    """Decode ``source`` once and write the clips and the errors datasets (Parquet folders).

    Both folders are replaced (a rerun overwrites); each always holds at least one Parquet file,
    so a dataset with no rows still has its schema.
    """
    clips_target = resolve_filesystem(clips_uri, filesystem)
    errors_target = resolve_filesystem(errors_uri, filesystem)
    _check_output(clips_uri, *clips_target)
    _check_output(errors_uri, *errors_target)
    if clips_target[1].rstrip("/") == errors_target[1].rstrip("/"):
        raise ConfigError("the clips and errors datasets need different folders")
    sink = _ClipsAndErrorsDatasink(clips_target, errors_target)
    read_outcomes(source, labels, filesystem).write_datasink(sink, ray_remote_args=_remote_args(source))
    return IngestResult(clips_uri, errors_uri, sink.counts["clips"], sink.counts["errors"])


__all__ = [
    "FORMATS",
    "ClipSourceConfig",
    "IngestResult",
    "Segment",
    "match_ytid",
    "parse_segments_csv",
    "read_clips",
    "read_outcomes",
    "write_clips",
    "write_dataset",
]
