"""Bulk separation: an archive of recordings -> one stem per query per recording, exactly once.

Input: a local folder or an ``s3://`` prefix (searched recursively for audio files), one audio
file, or a list of URIs (a ``.parquet`` or ``.csv`` file with a ``uri`` column and an optional
``relative_path`` column). Queries: class names / ids (a union in one stem with ``+``), ontology
levels (hierarchical separation), or folders of example recordings (see :class:`QuerySpec`).
Model: a checkpoint path, ``s3://`` URI or MLflow model URI
(:func:`pipelines.model_store.local_checkpoint`).

Output (local folder or ``s3://`` prefix ``OUTPUT``)::

    OUTPUT/<input's relative path>/<query>.flac     one stem per query (hierarchy nodes:
                                                    level<N>/<node>.flac, only nodes found active)
    OUTPUT/manifest.parquet                         one row per input (MANIFEST_SCHEMA)
    OUTPUT/_uss_bulk/<job signature>/complete/<input's relative path>.json
                                                    completion markers: the input's manifest row

The input's relative path is its path under the input folder (file name included, so ``a.wav``
and ``a.flac`` stay apart); for a list of URIs, the ``relative_path`` column or else the URI
without its scheme (``s3://bucket/x/a.wav`` -> ``bucket/x/a.wav``).

Pipeline (Ray Data): the driver lists the inputs and the completion markers (one listing each),
loads the model once to resolve the queries (class names, hierarchy nodes, example-audio
conditions), and builds a dataset of input rows. ``map_batches`` sends them to an actor pool of
:class:`BulkSeparator` (CPU or GPU actors, the model loaded once per actor in ``__init__``); each
actor streams one file at a time through :func:`uss_core.separation.separate_stream` (decode
block by block -> segments -> batched tagger + U-Net -> overlap-add -> stem writers) and returns
one manifest row per input. The driver consumes the rows as they arrive, prints progress and
writes the manifest.

Why whole files per actor, not segment rows spread over actors: the overlap-add of a file needs
its segments in order, and the separated segments are ``queries`` times larger than the input
(1.8 MB per 2-s segment for 7 stems). Segment rows would push all of that through the object
store and need an ordered regrouping per file (a shuffle) before anything could be written, so
memory would grow with the audio in flight; per-file streaming keeps one segment batch per actor
in memory, writes as it goes, and needs no shuffle. Archives of many files keep every actor busy
this way; only a job of a few very long files would finish sooner split by segments (one file is
never spread over several actors).

Exactly once: every output is written to a hidden temporary name beside its final one
(``.<name>.tmp``) and then moved into place (a rename on local disks; copy + delete on object
stores), so a final name only ever holds a complete file. An input is complete once its
completion marker exists, written after all of its stems; a rerun lists the markers of its job
signature (a hash of the model's weights, the queries, the segmentation and the output format)
and skips those inputs, taking their manifest rows from the markers. An input without a marker
is separated again and its outputs are overwritten; separation is deterministic, so a run that was
killed part way and rerun gives the same bytes as an uninterrupted one, and the temporary names
(fixed per output) are overwritten and moved away again. Inputs that failed get no marker and are
tried again on every run (a transient read error heals; a bad file fails again, quickly).

Statuses (manifest ``status``): ``ok``; ``invalid`` (not decodable, empty, truncated, non-finite
samples); ``silent`` (decodes, but its peak is at most ``silence_peak``: nothing to separate, no
stems); ``too_long`` (longer than ``max_input_seconds``, judged from the header before any work);
``failed`` (anything else, e.g. storage errors; the error text names the exception). Any channel
count and sample rate are accepted: channels are averaged and the audio resampled to the model's
rate (the manifest keeps the source rate and channel count).

Memory per actor is bounded whatever the file length: the decoder reads blocks, at most one batch
of segments and one overlap region are in memory, and stems stream to local scratch files (disk,
one file's worth) before they are uploaded. CPUs: each actor reserves ``cpus_per_actor`` (keep it
fractional on small machines: an actor pool that takes every CPU starves Ray Data's other tasks)
and runs torch with ``torch_threads`` threads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pipelines.model_store import local_checkpoint
from pipelines.schemas import STRING_LIST, Record, absolute_uri, records_to_table, resolve_filesystem
from uss_core.audio import AUDIO_EXTENSIONS, AudioFileWriter, load_audio, open_audio_stream
from uss_core.checkpoints import LoadedModel, load_model
from uss_core.errors import AudioError, ConfigError
from uss_core.ontology import LabelSet, load_ontology, safe_filename
from uss_core.separation import (
    Query,
    SeparationConfig,
    Separator,
    class_queries,
    hierarchy_queries,
    separate_stream,
)

STATE_DIR = "_uss_bulk"  # job state under the output: completion markers per job signature
MANIFEST_NAME = "manifest.parquet"
OUTPUT_FORMATS = ("flac", "wav")
DEFAULT_LEVELS = (1, 2, 3)

STATUS_OK = "ok"
STATUS_INVALID = "invalid"
STATUS_SILENT = "silent"
STATUS_TOO_LONG = "too_long"
STATUS_FAILED = "failed"
STATUSES = (STATUS_OK, STATUS_INVALID, STATUS_SILENT, STATUS_TOO_LONG, STATUS_FAILED)

# A decoder may report a few more frames than it delivers for compressed formats (MP3 padding);
# a shortfall beyond this is a truncated file.
TRUNCATION_TOLERANCE_SECONDS = 0.05
_COPY_BUFFER_BYTES = 1 << 20
_MAX_WORK_BLOCKS = 10_000  # blocks of input rows: bounds Ray Data's per-block bookkeeping

MANIFEST_SCHEMA = pa.schema(
    [
        ("input_uri", pa.string()),
        ("relative_path", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("stem_names", STRING_LIST),
        ("output_uris", STRING_LIST),
        ("detected_classes", STRING_LIST),
        ("duration_seconds", pa.float64()),
        ("source_sample_rate", pa.int32()),
        ("channels", pa.int32()),
        ("num_segments", pa.int32()),
        ("model_uri", pa.string()),
        ("model_sha256", pa.string()),
        ("job_signature", pa.string()),
        ("job_id", pa.string()),
        ("seconds_total", pa.float64()),
        ("seconds_tagging", pa.float64()),
        ("seconds_separating", pa.float64()),
        ("seconds_writing", pa.float64()),
        ("peak_rss_mb", pa.float64()),
        ("worker_node", pa.string()),
    ]
)


@dataclass(eq=False)
class ManifestRow(Record):
    """One input's outcome (a row of ``manifest.parquet``).

    ``status``: one of :data:`STATUSES`; ``error``: the reason ("" when ok). ``stem_names`` and
    ``output_uris``: the stems written, in query order (parallel lists). ``detected_classes``:
    the queries the tagger found active (probability >= the activity threshold) in at least one
    segment. ``duration_seconds``, ``source_sample_rate``, ``channels``: of the input file as
    decoded (0 where it could not be opened). ``model_uri`` / ``model_sha256``: the checkpoint as
    given and the SHA-256 of its files. ``job_signature``: what the output depends on (see the
    module doc); ``job_id``: the run that produced the row (an earlier run's id for inputs
    complete before). ``seconds_*``: wall time of the whole input, in the tagger, in the U-Net,
    and writing its outputs. ``peak_rss_mb``: the actor process's peak resident memory so far (MB, 10^6 bytes);
    ``worker_node``: the Ray node that separated it (the host name outside Ray).
    """

    SCHEMA: ClassVar[pa.Schema] = MANIFEST_SCHEMA

    input_uri: str
    relative_path: str
    status: str
    error: str
    stem_names: tuple[str, ...]
    output_uris: tuple[str, ...]
    detected_classes: tuple[str, ...]
    duration_seconds: float
    source_sample_rate: int
    channels: int
    num_segments: int
    model_uri: str
    model_sha256: str
    job_signature: str
    job_id: str
    seconds_total: float
    seconds_tagging: float
    seconds_separating: float
    seconds_writing: float
    peak_rss_mb: float
    worker_node: str

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.status not in STATUSES:
            raise ValueError(f"{self.input_uri}: status {self.status!r} is not one of {STATUSES}")
        if len(self.stem_names) != len(self.output_uris):
            raise ValueError(f"{self.input_uri}: {len(self.stem_names)} stem names but {len(self.output_uris)} outputs")


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class QuerySpec:
    """What to separate; give one kind (none at all: hierarchy at :data:`DEFAULT_LEVELS`).

    ``classes``: label names or mids, one stem each; ``"Piano+Organ"`` is their union in one
    stem. ``class_ids``: label-set indexes, same ``+`` rule (``"0+137"``). ``levels``: ontology
    levels, one stem per active node (needs the AudioSet ontology: ``metadata_dir``).
    ``query_audio``: folders (or files) of example recordings, local or ``s3://``; each gives one
    stem, conditioned on the examples' average condition.
    """

    classes: tuple[str, ...] = ()
    class_ids: tuple[str, ...] = ()
    levels: tuple[int, ...] = ()
    query_audio: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        kinds = [bool(self.classes or self.class_ids), bool(self.levels), bool(self.query_audio)]
        if sum(kinds) > 1:
            raise ConfigError("use one kind of query: classes/class ids, ontology levels, or example audio")


@dataclass(frozen=True)
class BulkSeparationConfig:
    """A bulk separation job.

    ``input`` / ``output``: see the module doc. ``checkpoint``: separation model (folder, official
    ``.ckpt``; local, ``s3://``, ``models:/...``, ``runs:/...``); ``tagger_checkpoint``: optional
    PANNs Cnn14 used as the activity tagger; ``labels_csv``: the label set of a checkpoint that
    carries none (official ``.ckpt``; default: AudioSet from ``metadata_dir``).
    Separation: ``segment_seconds`` (None: the model's training length), ``overlap``,
    ``batch_size`` (segment x query pairs per U-Net forward), ``activity_threshold``,
    ``device`` (None: ``cuda`` with GPU actors, else ``cpu``), ``precision`` (the U-Net's
    arithmetic: auto, fp32, bf16 or fp16; ``auto`` is resolved on each actor's machine, see
    :func:`~uss_core.separation.resolve_precision`). Inputs: ``max_input_seconds``
    (longer ones are rejected as ``too_long``), ``silence_peak`` (inputs whose peak is at most
    this are ``silent``). Ray: ``actors`` (pool size), ``cpus_per_actor``, ``gpus_per_actor``
    (fractional allowed), ``torch_threads`` (per actor), ``files_per_task`` (inputs per actor
    call; 1 balances long files best), ``memory_per_actor_gb`` (GiB of memory Ray reserves
    per actor when placing actors: None reserves none; set it to pack nodes without running out
    of memory: a ResUNet30 + Cnn14 actor with 3 queries and batches of 4 peaked at 2.2 GB
    resident here in fp32, 1.4 GB in bf16), ``scratch_dir`` (local scratch for stems before upload; default: the system temp
    folder).
    """

    input: str
    output: str
    checkpoint: str
    queries: QuerySpec = field(default_factory=QuerySpec)
    output_format: str = "flac"
    tagger_checkpoint: str | None = None
    labels_csv: str | None = None
    metadata_dir: str | None = None
    segment_seconds: float | None = None
    overlap: float = SeparationConfig.overlap
    batch_size: int = SeparationConfig.batch_size
    activity_threshold: float = SeparationConfig.activity_threshold
    device: str | None = None
    precision: str = SeparationConfig.precision
    max_input_seconds: float = 6 * 3600.0
    silence_peak: float = 1e-4  # -80 dBFS
    actors: int = 2
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    torch_threads: int = 1
    files_per_task: int = 1
    memory_per_actor_gb: float | None = None
    scratch_dir: str | None = None

    def __post_init__(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise ConfigError(f"output format {self.output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
        for name in ("actors", "torch_threads", "files_per_task"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.cpus_per_actor > 0:
            raise ConfigError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor < 0:
            raise ConfigError(f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        if not self.max_input_seconds > 0:
            raise ConfigError(f"max_input_seconds must be > 0, got {self.max_input_seconds}")
        if self.silence_peak < 0:
            raise ConfigError(f"silence_peak must be >= 0, got {self.silence_peak}")
        if self.memory_per_actor_gb is not None and not self.memory_per_actor_gb > 0:
            raise ConfigError(f"memory_per_actor_gb must be > 0, got {self.memory_per_actor_gb}")

    @property
    def actor_device(self) -> str:
        """The torch device the actors separate on."""
        return self.device or ("cuda" if self.gpus_per_actor > 0 else "cpu")

    @property
    def cpus(self) -> float:
        """CPUs the actors compute on: ``actors * max(cpus_per_actor, torch_threads)``."""
        return self.actors * max(self.cpus_per_actor, self.torch_threads)


@dataclass(frozen=True)
class BulkJobPlan:
    """What every actor needs, resolved once by the driver (pickled into the actors)."""

    checkpoint: str
    tagger_checkpoint: str | None
    labels: LabelSet
    model_sha256: str
    separation: SeparationConfig
    queries: tuple[Query, ...]
    stem_paths: tuple[str, ...]  # per query, relative to the input's output folder
    output_uri: str
    output_format: str
    signature: str
    job_id: str
    max_input_seconds: float
    silence_peak: float
    torch_threads: int
    scratch_dir: str | None

    def input_folder(self, relative_path: str) -> str:
        """URI of the folder that holds an input's stems."""
        return f"{self.output_uri}/{relative_path}"

    def marker_path(self, relative_path: str) -> str:
        """Where an input's completion marker is, relative to the output folder."""
        return f"{markers_path(self.signature)}/{relative_path}.json"


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class InputFile:
    """One recording to separate: where it is, and where its stems go under the output."""

    uri: str
    relative_path: str


_WORK_SCHEMA = pa.schema([("uri", pa.string()), ("relative_path", pa.string())])
_LIST_EXTENSIONS = (".parquet", ".csv")


def _join(uri: str, relative: str) -> str:
    return f"{uri.rstrip('/')}/{relative}"


def _clean_relative(path: str, source: str) -> str:
    """``path`` as a relative output path: no scheme, leading slash, ``.`` or ``..`` parts."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ConfigError(f"{source}: {path!r} is not usable as a relative output path")
    if parts[0] == STATE_DIR or "/".join(parts) == MANIFEST_NAME:
        raise ConfigError(f"{source}: {path!r} collides with the job's own files ({STATE_DIR}/, {MANIFEST_NAME})")
    return "/".join(parts)


def _read_uri_list(uri: str, fs: pafs.FileSystem, path: str) -> list[InputFile]:
    try:
        if path.lower().endswith(".parquet"):
            table = pq.read_table(path, filesystem=fs)
        else:
            with fs.open_input_stream(path) as f:
                table = pacsv.read_csv(f)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ConfigError(f"{uri}: cannot read the list of inputs ({exc})") from None
    if "uri" not in table.column_names:
        raise ConfigError(
            f"{uri}: a list of inputs needs a 'uri' column (and optionally 'relative_path'); "
            f"it has {', '.join(table.column_names)}"
        )
    uris = [str(u) for u in table.column("uri").to_pylist() if u]
    if "relative_path" in table.column_names:
        given = [str(r) if r else "" for r in table.column("relative_path").to_pylist()]
    else:
        given = [u.split("://", 1)[-1] for u in uris]
    items = {}
    for item_uri, relative in zip(uris, given):
        items[item_uri] = InputFile(item_uri, _clean_relative(relative or item_uri.split("://", 1)[-1], uri))
    return list(items.values())


def list_inputs(input_uri: str, filesystem: Any = None) -> list[InputFile]:
    """The inputs at ``input_uri`` (a folder or prefix searched recursively for audio files,
    hidden files skipped; one audio file; or a ``.parquet`` / ``.csv`` list of URIs), sorted by
    relative path. Raises ConfigError if there is none, or two share a relative path."""
    fs, path = resolve_filesystem(input_uri, filesystem)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        if path.lower().endswith(_LIST_EXTENSIONS):
            items = _read_uri_list(input_uri, fs, path)
        else:
            items = [InputFile(input_uri, _clean_relative(info.base_name, input_uri))]
    elif info.type == pafs.FileType.Directory:
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        items = [
            InputFile(_join(input_uri, i.path[len(path) :].lstrip("/")), i.path[len(path) :].lstrip("/"))
            for i in found
            if i.type == pafs.FileType.File
            and os.path.splitext(i.base_name)[1].lower() in AUDIO_EXTENSIONS
            and not any(part.startswith(".") for part in i.path[len(path) :].split("/"))
        ]
    else:
        raise ConfigError(f"{input_uri}: no such file or folder")
    if not items:
        raise ConfigError(f"{input_uri}: no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))}) found")
    by_path: dict[str, str] = {}
    for item in items:
        if item.relative_path in by_path:
            raise ConfigError(
                f"{item.uri} and {by_path[item.relative_path]} would both write to {item.relative_path}/; "
                "give the list a 'relative_path' column with distinct paths"
            )
        by_path[item.relative_path] = item.uri
    return sorted(items, key=lambda i: i.relative_path)


def check_output_location(input_uri: str, output_uri: str, filesystem: Any = None) -> None:
    """Refuse an output inside the input folder (its stems would be inputs of the next run)."""
    in_fs, in_path = resolve_filesystem(input_uri, filesystem)
    out_fs, out_path = resolve_filesystem(output_uri, filesystem)
    if in_fs.type_name != out_fs.type_name or in_fs.get_file_info(in_path).type != pafs.FileType.Directory:
        return
    inner, outer = out_path.rstrip("/") + "/", in_path.rstrip("/") + "/"
    if inner.startswith(outer):
        raise ConfigError(
            f"the output {output_uri} is inside the input folder {input_uri}; choose an output outside it "
            "(its stems would be taken as inputs on the next run)"
        )


# --------------------------------------------------------------------------------------------
# Storage: atomic commits and completion markers


def markers_path(signature: str) -> str:
    """Folder of the completion markers of one job signature, relative to the output folder."""
    return f"{STATE_DIR}/{signature}/complete"


def output_filesystem(output_uri: str, filesystem: Any = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and root path that outputs are written through (see
    :func:`resolve_filesystem`).

    pyarrow's own S3 filesystem puts an empty ``folder/`` object beside every file it deletes or
    moves (to keep the folder "existing"), which would leave one stray object per input in the
    bucket; object-store outputs are therefore written through ``s3fs`` with the same endpoint,
    region and credentials.
    """
    fs, root = resolve_filesystem(output_uri, filesystem)
    if isinstance(fs, pafs.S3FileSystem):
        import s3fs

        _, (options,) = fs.__reduce__()  # the pickling protocol: every option, as given
        endpoint = options["endpoint_override"] or None
        if endpoint and "://" not in endpoint:
            endpoint = f"{options['scheme']}://{endpoint}"
        s3 = s3fs.S3FileSystem(
            anon=options["anonymous"],
            key=options["access_key"],
            secret=options["secret_key"],
            token=options["session_token"],
            endpoint_url=endpoint,
            client_kwargs={"region_name": options["region"]} if options["region"] else None,
        )
        fs, root = resolve_filesystem(output_uri, s3)
    return fs, root.rstrip("/")


def _temporary_name(path: str) -> str:
    """The fixed hidden temporary name beside ``path`` (a rerun overwrites a stale one)."""
    folder, _, name = path.rpartition("/")
    return f"{folder}/.{name}.tmp" if folder else f".{name}.tmp"


def _prepare_parent(fs: pafs.FileSystem, path: str) -> None:
    # Object stores have no folders (creating one writes a marker object): local disks only.
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path.rpartition("/")[0], recursive=True)


def commit_file(local_path: str | os.PathLike, fs: pafs.FileSystem, path: str) -> None:
    """Copy a finished local file to ``path`` on ``fs``: first to its temporary name, then moved
    into place, so ``path`` never holds a partial file. Streams in 1-MiB pieces."""
    temp = _temporary_name(path)
    _prepare_parent(fs, path)
    with open(local_path, "rb") as src, fs.open_output_stream(temp) as dst:
        shutil.copyfileobj(src, dst, _COPY_BUFFER_BYTES)
    fs.move(temp, path)


def commit_bytes(data: bytes, fs: pafs.FileSystem, path: str) -> None:
    """Write ``data`` to ``path`` on ``fs`` through its temporary name (see :func:`commit_file`)."""
    temp = _temporary_name(path)
    _prepare_parent(fs, path)
    with fs.open_output_stream(temp) as dst:
        dst.write(data)
    fs.move(temp, path)


def completed_inputs(output_uri: str, signature: str, filesystem: Any = None) -> set[str]:
    """Relative paths of the inputs complete for ``signature`` (one recursive listing)."""
    fs, output_root = resolve_filesystem(output_uri, filesystem)
    root = f"{output_root.rstrip('/')}/{markers_path(signature)}"
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return set()
    return {
        i.path[len(root) :].lstrip("/")[: -len(".json")]
        for i in infos
        if i.type == pafs.FileType.File and i.path.endswith(".json") and not i.base_name.startswith(".")
    }


def read_markers(batch: pa.Table, plan: BulkJobPlan, filesystem: Any = None) -> pa.Table:
    """Ray Data task: input rows (``uri``, ``relative_path``) complete before -> their manifest
    rows, read from their completion markers."""
    fs, root = output_filesystem(plan.output_uri, filesystem)
    rows = []
    for relative in batch.column("relative_path").to_pylist():
        with fs.open_input_stream(f"{root}/{plan.marker_path(relative)}") as f:
            rows.append(ManifestRow.from_dict(json.loads(f.read())))
    return records_to_table(rows, MANIFEST_SCHEMA)


# --------------------------------------------------------------------------------------------
# Model, queries and the job signature


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file, or of every file in a checkpoint folder (names and bytes,
    in sorted order): the model's identity, whatever URI it was loaded from."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        if file != root:
            digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_bulk_model(
    checkpoint: str, tagger_checkpoint: str | None, labels: LabelSet | None, metadata_dir: str | None, filesystem: Any = None
) -> tuple[LoadedModel, str]:
    """The model at ``checkpoint`` (any URI :func:`local_checkpoint` takes) and its SHA-256
    (of the separator checkpoint, plus the tagger's if one is given)."""
    path, tmp = local_checkpoint(checkpoint, filesystem)
    tagger_path, tagger_tmp = local_checkpoint(tagger_checkpoint, filesystem) if tagger_checkpoint else (None, None)
    try:
        sha = checkpoint_sha256(path)
        if tagger_path is not None:
            sha = hashlib.sha256(f"{sha}+{checkpoint_sha256(tagger_path)}".encode()).hexdigest()
        loaded = load_model(path, labels, tagger_path, metadata_dir)
    finally:
        for folder in (tmp, tagger_tmp):
            if folder is not None:
                folder.cleanup()
    loaded.source = checkpoint  # the URI the user gave, not a temporary download folder
    return loaded, sha


def _load_examples(uri: str, sample_rate: int, filesystem: Any) -> tuple[list[np.ndarray], list[str]]:
    items = list_inputs(uri, filesystem)
    audio = []
    for item in items:
        fs, path = resolve_filesystem(item.uri, filesystem)
        with fs.open_input_stream(path) as f:
            audio.append(load_audio(f.read(), sample_rate, name=item.uri))
    return audio, [i.uri for i in items]


def build_queries(
    spec: QuerySpec, separator: Separator, labels: LabelSet, metadata_dir: str | None = None, filesystem: Any = None
) -> list[Query]:
    """The queries ``spec`` asks for, checked against the model."""
    specs: list = [c.split("+") for c in spec.classes]
    for value in spec.class_ids:
        try:
            specs.append([int(v) for v in value.split("+")])
        except ValueError:
            raise ConfigError(f"class ids are integers joined by '+', got {value!r}") from None
    if specs:
        queries = class_queries(labels, specs)
    elif spec.query_audio:
        queries = []
        for uri in spec.query_audio:
            examples, names = _load_examples(uri, separator.sample_rate, filesystem)
            condition = separator.condition_from_examples(examples, names)
            name = uri.rstrip("/").rsplit("/", 1)[-1]
            queries.append(Query(name=f"query-{name}", condition=condition, gated=False))
    else:
        queries = hierarchy_queries(load_ontology(metadata_dir), labels, spec.levels or DEFAULT_LEVELS)
    separator.check_queries(queries)
    return queries


def stem_paths(queries: Sequence[Query], output_format: str) -> list[str]:
    """Output path of each query's stem, relative to the input's folder: ``<name>.<format>``,
    ``level<N>/<name>.<format>`` for hierarchy nodes; a repeated name gets ``-2``, ``-3`` ..."""
    seen: dict[str, int] = {}
    paths = []
    for query in queries:
        folder = f"level{query.level}/" if query.level is not None else ""
        base = folder + safe_filename(query.name)
        seen[base] = seen.get(base, 0) + 1
        paths.append(f"{base}{'' if seen[base] == 1 else f'-{seen[base]}'}.{output_format}")
    return paths


def job_signature(model_sha256: str, queries: Sequence[Query], separation: SeparationConfig, output_format: str) -> str:
    """A short hash of everything the stems depend on: the model's weights, the queries, the
    segmentation, the activity threshold, the arithmetic precision and the output format (not the
    device, batch size or actor layout, which only change how fast the same work is done)."""
    document = {
        "model": model_sha256,
        "format": output_format,
        "segment_seconds": separation.segment_seconds,
        "overlap": separation.overlap,
        "activity_threshold": separation.activity_threshold,
        "precision": separation.precision,
        "queries": [
            {
                "name": q.name,
                "class_indexes": list(q.class_indexes) if q.class_indexes is not None else None,
                "condition": hashlib.sha256(np.ascontiguousarray(q.condition, np.float32)).hexdigest()
                if q.condition is not None
                else None,
                "level": q.level,
                "mid": q.mid,
                "gated": q.gated,
            }
            for q in queries
        ],
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def plan_job(config: BulkSeparationConfig, job_id: str, filesystem: Any = None) -> BulkJobPlan:
    """Load the model once here (the driver) to resolve the queries and the job signature."""
    labels = LabelSet.from_csv(config.labels_csv) if config.labels_csv else None
    loaded, sha = load_bulk_model(config.checkpoint, config.tagger_checkpoint, labels, config.metadata_dir, filesystem)
    separation = SeparationConfig(
        segment_seconds=config.segment_seconds or loaded.model.config.segment_seconds,
        overlap=config.overlap,
        batch_size=config.batch_size,
        activity_threshold=config.activity_threshold,
        device=config.actor_device,
        precision=config.precision,
    )
    # The driver only computes example conditions and checks queries: on CPU, whatever the actors use.
    separator = Separator(loaded, SeparationConfig(segment_seconds=separation.segment_seconds, device="cpu"))
    queries = build_queries(config.queries, separator, loaded.labels, config.metadata_dir, filesystem)
    output_uri = absolute_uri(config.output)
    return BulkJobPlan(
        checkpoint=config.checkpoint,
        tagger_checkpoint=config.tagger_checkpoint,
        labels=loaded.labels,
        model_sha256=sha,
        separation=separation,
        queries=tuple(queries),
        stem_paths=tuple(stem_paths(queries, config.output_format)),
        output_uri=output_uri.rstrip("/"),
        output_format=config.output_format,
        signature=job_signature(sha, queries, separation, config.output_format),
        job_id=job_id,
        max_input_seconds=config.max_input_seconds,
        silence_peak=config.silence_peak,
        torch_threads=config.torch_threads,
        scratch_dir=config.scratch_dir,
    )


# --------------------------------------------------------------------------------------------
# The actor


class _Rejected(Exception):
    """An input that decodes but is not separated (silent, too long): its status and reason."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _MeteredReader:
    """``read(n)`` over an audio stream that counts the samples delivered and tracks the peak."""

    def __init__(self, read: Callable[[int], np.ndarray]) -> None:
        self._read = read
        self.samples = 0
        self.peak = 0.0

    def read(self, num_samples: int) -> np.ndarray:
        block = self._read(num_samples)
        self.samples += len(block)
        if len(block):
            self.peak = max(self.peak, float(np.abs(block).max()))
        return block


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # Linux reports KiB; MB = 10^6 bytes


def _worker_node() -> str:
    """The Ray node id of this process, or the host name outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()


@dataclass
class _Outcome:
    """What is known about an input so far (filled in as processing gets further)."""

    duration_seconds: float = 0.0
    source_sample_rate: int = 0
    channels: int = 0
    num_segments: int = 0
    stem_names: list[str] = field(default_factory=list)
    output_uris: list[str] = field(default_factory=list)
    detected: list[str] = field(default_factory=list)
    seconds_tagging: float = 0.0
    seconds_separating: float = 0.0
    seconds_writing: float = 0.0


class BulkSeparator:
    """Ray Data actor: input rows (``uri``, ``relative_path``) -> manifest rows.

    The model is loaded once, in ``__init__``; each input is streamed through the separator and
    its stems committed (see the module doc). Errors of one input become its row; the actor goes
    on. Also usable without Ray: ``BulkSeparator(plan)(table)``.
    """

    def __init__(self, plan: BulkJobPlan, filesystem: Any = None) -> None:
        torch.set_num_threads(plan.torch_threads)
        self.plan = plan
        self.filesystem = filesystem
        loaded, sha = load_bulk_model(plan.checkpoint, plan.tagger_checkpoint, plan.labels, None, filesystem)
        if sha != plan.model_sha256:
            raise ConfigError(
                f"{plan.checkpoint} changed while the job was starting (SHA-256 {sha[:12]} here, "
                f"{plan.model_sha256[:12]} in the driver); rerun the job"
            )
        self.separator = Separator(loaded, plan.separation)
        self.worker_node = _worker_node()
        self.output_fs, self.output_root = output_filesystem(plan.output_uri, filesystem)

    def __call__(self, batch: pa.Table) -> pa.Table:
        uris = batch.column("uri").to_pylist()
        relative_paths = batch.column("relative_path").to_pylist()
        rows = [self.separate_input(InputFile(u, r)) for u, r in zip(uris, relative_paths)]
        return records_to_table(rows, MANIFEST_SCHEMA)

    def separate_input(self, item: InputFile) -> ManifestRow:
        """Separate one input and commit its stems and completion marker; never raises for a bad
        input (the row says what went wrong)."""
        t0 = time.perf_counter()
        outcome = _Outcome()
        status, error = STATUS_OK, ""
        try:
            self._separate(item, outcome)
        except _Rejected as exc:
            status, error = exc.status, str(exc)
        except AudioError as exc:
            status, error = STATUS_INVALID, str(exc)
        except Exception as exc:  # storage, model: recorded, and the job goes on with the next input
            status, error = STATUS_FAILED, f"{type(exc).__name__}: {exc}"
        row = self._row(item, status, error, outcome, time.perf_counter() - t0)
        if status == STATUS_OK:
            # Written last: the marker (holding this row) is what makes the input complete.
            try:
                marker = f"{self.output_root}/{self.plan.marker_path(item.relative_path)}"
                commit_bytes(json.dumps(row.to_dict()).encode(), self.output_fs, marker)
            except Exception as exc:  # the stems are in place, but the input is redone next time
                reason = f"writing the completion marker: {type(exc).__name__}: {exc}"
                return self._row(item, STATUS_FAILED, reason, outcome, time.perf_counter() - t0)
        return row

    def _row(self, item: InputFile, status: str, error: str, outcome: _Outcome, seconds: float) -> ManifestRow:
        plan = self.plan
        ok = status == STATUS_OK
        return ManifestRow(
            input_uri=item.uri,
            relative_path=item.relative_path,
            status=status,
            error=error,
            stem_names=tuple(outcome.stem_names) if ok else (),
            output_uris=tuple(outcome.output_uris) if ok else (),
            detected_classes=tuple(outcome.detected),
            duration_seconds=outcome.duration_seconds,
            source_sample_rate=outcome.source_sample_rate,
            channels=outcome.channels,
            num_segments=outcome.num_segments,
            model_uri=plan.checkpoint,
            model_sha256=plan.model_sha256,
            job_signature=plan.signature,
            job_id=plan.job_id,
            seconds_total=seconds,
            seconds_tagging=outcome.seconds_tagging,
            seconds_separating=outcome.seconds_separating,
            seconds_writing=outcome.seconds_writing,
            peak_rss_mb=_peak_rss_mb(),
            worker_node=self.worker_node,
        )

    def _separate(self, item: InputFile, outcome: _Outcome) -> None:
        plan = self.plan
        rate = self.separator.sample_rate
        fs, path = resolve_filesystem(item.uri, self.filesystem)
        with fs.open_input_file(path) as raw, open_audio_stream(raw, rate, name=item.uri) as stream:
            outcome.duration_seconds = stream.duration_seconds
            outcome.source_sample_rate = stream.source_sample_rate
            outcome.channels = stream.channels
            if stream.duration_seconds > plan.max_input_seconds:
                raise _Rejected(
                    STATUS_TOO_LONG,
                    f"{item.uri}: {stream.duration_seconds:.0f} s is longer than the limit of "
                    f"{plan.max_input_seconds:.0f} s (raise max_input_seconds to separate it)",
                )
            with tempfile.TemporaryDirectory(prefix="uss-bulk-", dir=plan.scratch_dir) as scratch:
                local_stems = self._separate_to_scratch(item, stream, Path(scratch), outcome)
                t_write = time.perf_counter()
                folder = f"{self.output_root}/{item.relative_path}"
                for query, relative, local in zip(plan.queries, plan.stem_paths, local_stems):
                    if local is None:
                        continue
                    commit_file(local, self.output_fs, f"{folder}/{relative}")
                    outcome.stem_names.append(query.name)
                    outcome.output_uris.append(f"{plan.input_folder(item.relative_path)}/{relative}")
                outcome.seconds_writing = time.perf_counter() - t_write

    def _separate_to_scratch(self, item: InputFile, stream, scratch: Path, outcome: _Outcome) -> list[Path | None]:
        """Stream the input through the separator into local stem files; the stems to publish
        (None for hierarchy nodes never found active, as ``uss separate`` does)."""
        plan = self.plan
        rate = self.separator.sample_rate
        writers = [
            AudioFileWriter(scratch / f"{i}.{plan.output_format}", rate, plan.output_format) for i in range(len(plan.queries))
        ]
        try:
            reader = _MeteredReader(stream.read)

            def emit(block: np.ndarray) -> None:
                for writer, samples in zip(writers, block):
                    writer.write(samples)

            result = separate_stream(self.separator, reader.read, stream.num_samples, plan.queries, emit)
            outcome.num_segments = result.num_segments
            outcome.seconds_tagging = result.seconds_tagging
            outcome.seconds_separating = result.seconds_separating
            shortfall = stream.num_samples - reader.samples
            if shortfall > TRUNCATION_TOLERANCE_SECONDS * rate:
                raise AudioError(
                    f"{item.uri}: only {reader.samples / rate:.2f} s of the {stream.num_samples / rate:.2f} s "
                    "its header announces could be decoded; the file is truncated, re-export or re-upload it"
                )
            if reader.peak <= plan.silence_peak:
                raise _Rejected(
                    STATUS_SILENT,
                    f"{item.uri}: the recording is silent (peak {reader.peak:.2g} <= {plan.silence_peak:.2g}); "
                    "nothing to separate",
                )
            threshold = plan.separation.activity_threshold
            # NaN activity: the query is not tag-based (example audio), so never "detected".
            peak_activity = np.where(np.isnan(result.activity), -1.0, result.activity).max(axis=0)
            outcome.detected = [q.name for q, p in zip(plan.queries, peak_activity) if p >= threshold]
            published: list[Path | None] = []
            for query, writer, active in zip(plan.queries, writers, result.active_segments.T):
                keep = query.level is None or bool(active.any())
                published.append(writer.commit() if keep else writer.discard())
            return published
        except BaseException:
            for writer in writers:
                writer.discard()
            raise


# --------------------------------------------------------------------------------------------
# The driver


@dataclass(frozen=True)
class BulkProgress:
    """Where a running job stands (passed to the ``on_progress`` callback)."""

    total: int
    finished: int  # inputs with a manifest row so far, complete-before ones included
    complete_before: int  # of those, skipped as complete from an earlier run
    statuses: dict[str, int]  # rows so far by status (this run's and earlier ones')
    audio_seconds: float  # audio separated by this run so far (ok inputs)
    elapsed_seconds: float


@dataclass(frozen=True)
class BulkResult:
    """What :func:`run_bulk_separation` did: counts, audio separated and wall time."""

    manifest_uri: str
    signature: str
    inputs: int
    complete_before: int
    statuses: dict[str, int]
    audio_seconds: float  # audio separated by this run (ok inputs, complete-before ones excluded)
    wall_seconds: float  # listing, model load, separation and manifest, end to end
    cpus: float

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != STATUS_OK)

    @property
    def audio_seconds_per_second(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else math.nan

    @property
    def audio_seconds_per_second_per_cpu(self) -> float:
        return self.audio_seconds_per_second / self.cpus if self.cpus > 0 else math.nan


def _work_dataset(items: Sequence[InputFile], rows_per_block: int):
    """A dataset of input rows; each block is a unit of work for one actor call."""
    import ray.data

    table = pa.Table.from_pydict(
        {"uri": [i.uri for i in items], "relative_path": [i.relative_path for i in items]}, schema=_WORK_SCHEMA
    )
    per_block = max(rows_per_block, math.ceil(len(items) / _MAX_WORK_BLOCKS))
    return ray.data.from_arrow([table.slice(i, per_block) for i in range(0, len(items), per_block)])


def run_bulk_separation(
    config: BulkSeparationConfig,
    filesystem: Any = None,
    *,
    job_id: str | None = None,
    on_progress: Callable[[BulkProgress], None] | None = None,
    manifest_copy: str | os.PathLike | None = None,
) -> BulkResult:
    """Run a bulk separation job on the connected Ray (see the module doc).

    ``filesystem``: for ``s3://`` URIs (see :func:`~pipelines.schemas.resolve_filesystem`);
    None: from the URI and the AWS environment. ``job_id``: recorded in the rows this run
    produces (default: a fresh id). ``on_progress``: called after every block of rows.
    ``manifest_copy``: also keep the manifest at this local path (e.g. to log it).
    """
    import ray.data

    t0 = time.perf_counter()
    job_id = job_id or f"bulk-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    check_output_location(config.input, config.output, filesystem)
    inputs = list_inputs(config.input, filesystem)
    plan = plan_job(config, job_id, filesystem)
    complete = completed_inputs(plan.output_uri, plan.signature, filesystem)
    todo = [i for i in inputs if i.relative_path not in complete]
    done_before = [i for i in inputs if i.relative_path in complete]

    parts = []
    if todo:
        parts.append(
            _work_dataset(todo, config.files_per_task).map_batches(
                BulkSeparator,
                fn_constructor_kwargs={"plan": plan, "filesystem": filesystem},
                batch_size=config.files_per_task,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=min(config.actors, len(todo))),
                num_cpus=config.cpus_per_actor,
                num_gpus=config.gpus_per_actor,
                **({"memory": int(config.memory_per_actor_gb * 2**30)} if config.memory_per_actor_gb else {}),
                zero_copy_batch=True,
            )
        )
    if done_before:
        parts.append(
            _work_dataset(done_before, 64).map_batches(
                read_markers, fn_kwargs={"plan": plan, "filesystem": filesystem}, batch_format="pyarrow", num_cpus=0.25
            )
        )
    rows = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]

    statuses: dict[str, int] = {}
    finished = earlier = 0
    audio_seconds = 0.0
    out_fs, out_root = output_filesystem(plan.output_uri, filesystem)
    with tempfile.TemporaryDirectory(prefix="uss-bulk-manifest-", dir=config.scratch_dir) as scratch:
        local_manifest = Path(scratch) / MANIFEST_NAME
        with pq.ParquetWriter(local_manifest, MANIFEST_SCHEMA) as writer:
            for batch in rows.iter_batches(batch_size=None, batch_format="pyarrow"):
                batch = batch.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
                writer.write_table(batch)
                this_run = np.asarray(batch.column("job_id").to_pylist()) == job_id
                status = np.asarray(batch.column("status").to_pylist(), dtype=object)
                duration = batch.column("duration_seconds").to_numpy()
                for name in status:
                    statuses[name] = statuses.get(name, 0) + 1
                finished += batch.num_rows
                earlier += int((~this_run).sum())
                audio_seconds += float(duration[this_run & (status == STATUS_OK)].sum())
                if on_progress is not None:
                    on_progress(
                        BulkProgress(len(inputs), finished, earlier, dict(statuses), audio_seconds, time.perf_counter() - t0)
                    )
        commit_file(local_manifest, out_fs, f"{out_root}/{MANIFEST_NAME}")
        if manifest_copy is not None:
            shutil.copyfile(local_manifest, manifest_copy)
    return BulkResult(
        manifest_uri=f"{plan.output_uri}/{MANIFEST_NAME}",
        signature=plan.signature,
        inputs=len(inputs),
        complete_before=len(done_before),
        statuses=statuses,
        audio_seconds=audio_seconds,
        wall_seconds=time.perf_counter() - t0,
        cpus=config.cpus,
    )


__all__ = [
    "BulkJobPlan",
    "BulkProgress",
    "BulkResult",
    "BulkSeparationConfig",
    "BulkSeparator",
    "InputFile",
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA",
    "ManifestRow",
    "QuerySpec",
    "STATE_DIR",
    "STATUSES",
    "build_queries",
    "check_output_location",
    "checkpoint_sha256",
    "commit_bytes",
    "commit_file",
    "completed_inputs",
    "job_signature",
    "list_inputs",
    "load_bulk_model",
    "markers_path",
    "output_filesystem",
    "plan_job",
    "read_markers",
    "run_bulk_separation",
    "stem_paths",
]
