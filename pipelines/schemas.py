"""Arrow schemas of every dataset the pipelines write, one typed record per dataset.

Every arrow between stages is a Parquet dataset (a folder of ``*.parquet`` files, local or
``s3://``) with one of the schemas below. Each schema has a typed record (a dataclass) that
converts to and from rows (``to_dict`` / ``from_dict``) and tables (:func:`records_to_table`,
:func:`table_to_records`). Audio and vector columns are plain ``list<float32>`` (never Ray's
tensor extension type), so plain pyarrow or pandas read every dataset without Ray
(:func:`read_table`); :func:`list_column_to_numpy` turns such a column into a
``(rows, length)`` array. No column holds nulls.

All audio is mono float32 in [-1, 1] at :data:`SAMPLE_RATE` (32 kHz) unless its row says
otherwise; sample positions and lengths are counts of samples at that rate.

Clips (``CLIP_SCHEMA`` / :class:`Clip`) -- the decoded, weakly labelled 10-s clips (ingest)
    ===============  ==============  ======================================================
    clip_id          string          ``"<source stem>/<item name>"``, unique per source: the
                                     HDF5 pack / tar shard / folder name, then the item's
                                     audio name / sample key / relative path, without
                                     audio extension; e.g. ``"balanced_train/Y--PJHxphWEs"``
    source_uri       string          where the audio came from: the file's URI, or
                                     ``"<pack or shard uri>#<row index or member name>"``
    label_indexes    list<int32>     indexes of the clip's weak labels in the label set the
                                     dataset was built with (AudioSet order for the full
                                     set), ascending, at least one
    label_mids       list<string>    the same labels as AudioSet machine ids (``/m/09x0r``),
                                     same order as ``label_indexes``
    sample_rate      int32           Hz of ``waveform`` (32000)
    num_samples      int32           length of ``waveform`` in samples (320000 for 10 s)
    waveform         list<float32>   mono audio, zero-padded or cut to exactly num_samples
    ===============  ==============  ======================================================

Errors (``ERROR_SCHEMA`` / :class:`ItemError`) -- items a stage skipped, one row each
    ===============  ==============  ======================================================
    item_id          string          the id the item would have had (e.g. its clip_id), or
                                     the container's stem for a whole unreadable pack/shard
    source_uri       string          URI of the item (same convention as Clip.source_uri)
    stage            string          what failed: ``"read"`` (I/O, unreadable container),
                                     ``"decode"`` (audio cannot be decoded or is unusable),
                                     ``"label"`` (no label in the label set); later stages
                                     add their own names
    error            string          the reason, readable by a person
    ===============  ==============  ======================================================

Anchors (``ANCHOR_SCHEMA`` / :class:`Anchor`) -- mined segments where one class is active
    ===================  ==============  ==================================================
    anchor_id            string          ``f"{clip_id}-{class_mid}-{mode}"`` (:func:`make_anchor_id`)
    clip_id              string          the clip it was cut from
    class_index          int32           the class it was mined for (label-set index)
    class_mid            string          that class's AudioSet machine id
    start_sample         int32           first sample of the anchor in the clip
    end_sample           int32           one past its last sample (end - start = its length)
    score                float32         mean SED probability of the class over the anchor,
                                         in [0, 1]
    mode                 string          ``"max_area"`` (max area under the SED curve) or
                                         ``"random"`` (uniformly placed)
    clip_label_indexes   list<int32>     all weak labels of the clip (to keep mixtures'
                                         labels disjoint)
    waveform             list<float32>   the anchor's audio, ``end_sample - start_sample``
                                         samples
    condition_at_soft    list<float32>   the query net's tagging probabilities on the anchor
                                         (527 for AudioSet), each in [0, 1]
    condition_embedding  list<float32>   its penultimate-layer embedding (2048 for Cnn14)
    ===================  ==============  ==================================================

Mixtures (``MIXTURE_SCHEMA`` / :class:`Mixture`) -- training examples: a target anchor summed
with partner anchors of other classes
    =====================  ==============  ================================================
    mixture_id             string          ``"+".join(anchor ids)``, target first
                                           (:func:`make_mixture_id`)
    target_anchor_id       string          the anchor to recover
    partner_anchor_ids     list<string>    the anchors mixed in, in mixing order
    target_class_index     int32           the target anchor's class
    partner_class_indexes  list<int32>     the partners' classes (disjoint from the
                                           target clip's labels)
    mixture                list<float32>   the model input: gained target + gained partners
    target                 list<float32>   the training target: the gained target anchor,
                                           same length as ``mixture``
    condition_at_soft      list<float32>   the target anchor's soft condition (its
                                           ``condition_at_soft``: tagging probabilities)
    condition_embedding    list<float32>   the target anchor's latent condition (its
                                           ``condition_embedding``); training picks the
                                           one its query net takes
    target_gain            float32         linear gain applied to the target anchor
    partner_gains          list<float32>   linear gain applied to each partner (energy match)
    =====================  ==============  ================================================

Storage helpers: :func:`resolve_filesystem` turns ``(uri, filesystem)`` into a pyarrow
filesystem and path (``filesystem`` may be a pyarrow or an fsspec filesystem such as
``s3fs.S3FileSystem``); :func:`read_table` reads a Parquet dataset folder with pyarrow alone
(only the named ``columns``, if given); :func:`count_rows` counts its rows from the footers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SAMPLE_RATE = 32000  # Hz of every waveform column (kept equal to uss_core.audio.SAMPLE_RATE)

FLOAT_LIST = pa.list_(pa.float32())
INT_LIST = pa.list_(pa.int32())
STRING_LIST = pa.list_(pa.string())

CLIP_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source_uri", pa.string()),
        ("label_indexes", INT_LIST),
        ("label_mids", STRING_LIST),
        ("sample_rate", pa.int32()),
        ("num_samples", pa.int32()),
        ("waveform", FLOAT_LIST),
    ]
)

ERROR_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("source_uri", pa.string()),
        ("stage", pa.string()),
        ("error", pa.string()),
    ]
)

ANCHOR_SCHEMA = pa.schema(
    [
        ("anchor_id", pa.string()),
        ("clip_id", pa.string()),
        ("class_index", pa.int32()),
        ("class_mid", pa.string()),
        ("start_sample", pa.int32()),
        ("end_sample", pa.int32()),
        ("score", pa.float32()),
        ("mode", pa.string()),
        ("clip_label_indexes", INT_LIST),
        ("waveform", FLOAT_LIST),
        ("condition_at_soft", FLOAT_LIST),
        ("condition_embedding", FLOAT_LIST),
    ]
)

MIXTURE_SCHEMA = pa.schema(
    [
        ("mixture_id", pa.string()),
        ("target_anchor_id", pa.string()),
        ("partner_anchor_ids", STRING_LIST),
        ("target_class_index", pa.int32()),
        ("partner_class_indexes", INT_LIST),
        ("mixture", FLOAT_LIST),
        ("target", FLOAT_LIST),
        ("condition_at_soft", FLOAT_LIST),
        ("condition_embedding", FLOAT_LIST),
        ("target_gain", pa.float32()),
        ("partner_gains", FLOAT_LIST),
    ]
)

ANCHOR_MODES = ("max_area", "random")

R = TypeVar("R", bound="Record")


# --------------------------------------------------------------------------------------------
# Records


def _to_python(value: Any, arrow_type: pa.DataType) -> Any:
    """A row value as the record field type of ``arrow_type``."""
    if arrow_type == FLOAT_LIST:
        return np.asarray(value, dtype=np.float32).reshape(-1)
    if arrow_type == INT_LIST:
        return tuple(int(v) for v in value)
    if arrow_type == STRING_LIST:
        return tuple(str(v) for v in value)
    if pa.types.is_integer(arrow_type):
        return int(value)
    if pa.types.is_floating(arrow_type):
        return float(value)
    if pa.types.is_string(arrow_type):
        return str(value)
    raise TypeError(f"no record conversion for Arrow type {arrow_type}")


class Record:
    """Base of the typed records: row conversion driven by the class's Arrow ``SCHEMA``.

    Field types by Arrow type: string -> ``str``, int32 -> ``int``, float32 -> ``float``,
    list<int32> / list<string> -> ``tuple``, list<float32> -> 1-D float32 ``np.ndarray``.
    """

    SCHEMA: ClassVar[pa.Schema]

    def __post_init__(self) -> None:
        for f in self.SCHEMA:
            object.__setattr__(self, f.name, _to_python(getattr(self, f.name), f.type))

    def to_dict(self) -> dict[str, Any]:
        """The record as one row: ``{column: value}`` in schema order (arrays stay numpy)."""
        return {name: getattr(self, name) for name in self.SCHEMA.names}

    @classmethod
    def from_dict(cls: type[R], row: dict[str, Any]) -> R:
        """Build a record from a row (extra keys, e.g. partition columns, are ignored)."""
        missing = [name for name in cls.SCHEMA.names if name not in row]
        if missing:
            raise ValueError(f"{cls.__name__} row lacks columns {missing}")
        return cls(**{name: row[name] for name in cls.SCHEMA.names})

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for name in self.SCHEMA.names:
            a, b = getattr(self, name), getattr(other, name)
            if isinstance(a, np.ndarray):
                if not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # records hold arrays


@dataclass(eq=False)
class Clip(Record):
    """One decoded, weakly labelled clip: ``waveform`` is ``(num_samples,)`` float32 mono."""

    SCHEMA: ClassVar[pa.Schema] = CLIP_SCHEMA

    clip_id: str
    source_uri: str
    label_indexes: tuple[int, ...]
    label_mids: tuple[str, ...]
    sample_rate: int
    num_samples: int
    waveform: np.ndarray

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.label_indexes) != len(self.label_mids):
            raise ValueError(f"{self.clip_id}: {len(self.label_indexes)} label indexes but {len(self.label_mids)} mids")
        if self.waveform.shape != (self.num_samples,):
            raise ValueError(
                f"{self.clip_id}: waveform has {self.waveform.size} samples, num_samples says {self.num_samples}"
            )


@dataclass(eq=False)
class ItemError(Record):
    """One item a stage could not use, and why."""

    SCHEMA: ClassVar[pa.Schema] = ERROR_SCHEMA

    item_id: str
    source_uri: str
    stage: str
    error: str


@dataclass(eq=False)
class Anchor(Record):
    """A segment of a clip where ``class_mid`` is active: ``waveform`` is ``(end - start,)``."""

    SCHEMA: ClassVar[pa.Schema] = ANCHOR_SCHEMA

    anchor_id: str
    clip_id: str
    class_index: int
    class_mid: str
    start_sample: int
    end_sample: int
    score: float
    mode: str
    clip_label_indexes: tuple[int, ...]
    waveform: np.ndarray
    condition_at_soft: np.ndarray
    condition_embedding: np.ndarray

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ANCHOR_MODES:
            raise ValueError(f"{self.anchor_id}: mode {self.mode!r} is not one of {ANCHOR_MODES}")
        if self.waveform.shape != (self.end_sample - self.start_sample,):
            raise ValueError(
                f"{self.anchor_id}: waveform has {self.waveform.size} samples, "
                f"[{self.start_sample}, {self.end_sample}) spans {self.end_sample - self.start_sample}"
            )


@dataclass(eq=False)
class Mixture(Record):
    """One training example: ``mixture``, ``target`` are ``(samples,)``; the conditions
    ``(classes,)`` and ``(embedding_size,)``."""

    SCHEMA: ClassVar[pa.Schema] = MIXTURE_SCHEMA

    mixture_id: str
    target_anchor_id: str
    partner_anchor_ids: tuple[str, ...]
    target_class_index: int
    partner_class_indexes: tuple[int, ...]
    mixture: np.ndarray
    target: np.ndarray
    condition_at_soft: np.ndarray
    condition_embedding: np.ndarray
    target_gain: float
    partner_gains: np.ndarray

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixture.shape != self.target.shape:
            raise ValueError(f"{self.mixture_id}: mixture {self.mixture.shape} and target {self.target.shape} differ")
        n = len(self.partner_anchor_ids)
        if len(self.partner_class_indexes) != n or self.partner_gains.shape != (n,):
            raise ValueError(f"{self.mixture_id}: partner ids, classes and gains must have one entry per partner")


def make_anchor_id(clip_id: str, class_mid: str, mode: str) -> str:
    """The traceable id of an anchor: ``"<clip_id>-<class_mid>-<mode>"``."""
    return f"{clip_id}-{class_mid}-{mode}"


def make_mixture_id(anchor_ids: Sequence[str]) -> str:
    """The traceable id of a mixture: its anchor ids, target first, joined by ``+``."""
    return "+".join(anchor_ids)


# --------------------------------------------------------------------------------------------
# Records <-> Arrow


def float_list_array(arrays: Sequence[np.ndarray] | np.ndarray) -> pa.ListArray:
    """A ``list<float32>`` array from 1-D arrays of any lengths, or the rows of a 2-D array.

    Built from one concatenated buffer and offsets (no per-element Python objects).
    """
    if isinstance(arrays, np.ndarray) and arrays.ndim == 2:
        rows, length = arrays.shape
        values = np.ascontiguousarray(arrays, dtype=np.float32).reshape(-1)
        offsets = np.arange(rows + 1, dtype=np.int64) * length
    else:
        parts = [np.asarray(a, dtype=np.float32).reshape(-1) for a in arrays]
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([p.size for p in parts], out=offsets[1:])
        values = np.concatenate(parts) if parts else np.empty(0, dtype=np.float32)
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"{offsets[-1]} values do not fit one list<float32> array: use smaller batches")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=pa.float32()))


def list_column_to_arrays(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """The rows of a ``list<float32>`` column as 1-D float32 arrays (views, no copy per row)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out: list[np.ndarray] = []
    for chunk in chunks:
        if chunk.null_count:
            raise ValueError("list column holds nulls")
        offsets = chunk.offsets.to_numpy()
        values = chunk.values.to_numpy(zero_copy_only=False)
        out.extend(values[offsets[i] : offsets[i + 1]] for i in range(len(chunk)))
    return out


def list_column_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A ``list<float32>`` column whose rows have one length as a ``(rows, length)`` array."""
    rows = list_column_to_arrays(column)
    if not rows:
        return np.empty((0, 0), dtype=np.float32)
    lengths = {r.size for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"rows have different lengths {sorted(lengths)[:5]}: use list_column_to_arrays")
    return np.stack(rows).astype(np.float32, copy=False)


def records_to_table(records: Iterable[Record], schema: pa.Schema) -> pa.Table:
    """A ``pyarrow.Table`` with exactly ``schema`` from typed records (all of one class)."""
    records = list(records)
    for r in records:
        if list(r.SCHEMA.names) != list(schema.names):
            raise TypeError(f"{type(r).__name__} records do not have the columns of this schema {schema.names}")
    columns = []
    for f in schema:
        values = [getattr(r, f.name) for r in records]
        columns.append(float_list_array(values) if f.type == FLOAT_LIST else pa.array(values, type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def table_to_records(table: pa.Table, cls: type[R]) -> list[R]:
    """The rows of ``table`` as ``cls`` records (columns not in ``cls.SCHEMA`` are ignored)."""
    columns: dict[str, list] = {}
    for f in cls.SCHEMA:
        if f.name not in table.column_names:
            raise ValueError(f"table lacks column {f.name!r} of {cls.__name__}")
        col = table.column(f.name)
        columns[f.name] = list_column_to_arrays(col) if f.type == FLOAT_LIST else col.to_pylist()
    return [cls.from_dict({name: values[i] for name, values in columns.items()}) for i in range(table.num_rows)]


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly the columns, order and types of ``schema`` (raises if it lacks one)."""
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise ValueError(f"table lacks columns {missing}")
    return table.select(schema.names).cast(schema)


# --------------------------------------------------------------------------------------------
# Storage


def _split_scheme(uri: str) -> tuple[str | None, str]:
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return scheme, rest
    return None, uri


def absolute_uri(uri: str) -> str:
    """``uri`` with a local path made absolute (remote URIs unchanged): Ray workers do not run
    in the caller's working directory, so relative paths must not leave the driver."""
    scheme, rest = _split_scheme(str(uri))
    return os.path.abspath(rest) if scheme in (None, "file") else str(uri)


def resolve_filesystem(uri: str, filesystem: Any = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path in it for ``uri``.

    ``uri``: a local path (always the local filesystem, whatever ``filesystem`` is) or
    ``scheme://bucket/key`` (``s3://`` ...), which goes through ``filesystem``: None (taken from
    the URI; S3 settings then come from the standard AWS environment variables, including
    ``AWS_ENDPOINT_URL``), a ``pyarrow.fs.FileSystem``, or an fsspec filesystem such as
    ``s3fs.S3FileSystem(endpoint_url=...)`` (wrapped for pyarrow). The result pickles, so Ray
    tasks can carry it.
    """
    scheme, rest = _split_scheme(str(uri))
    if scheme is None or scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(rest)
    if filesystem is None:
        return pafs.FileSystem.from_uri(str(uri))
    if isinstance(filesystem, pafs.FileSystem):
        return filesystem, rest
    # An fsspec filesystem (s3fs, gcsfs, local ...).
    path = filesystem._strip_protocol(str(uri))
    if isinstance(path, list):  # fsspec returns a list for lists; a single uri gives a str
        path = path[0]
    # fsspec caches listings per instance; other processes (Ray workers) may have written since.
    filesystem.invalidate_cache(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path


def list_parquet_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """The Parquet files under folder ``path``, sorted (hidden and ``_`` files skipped); [] if
    there is no such folder (object stores have no empty folders)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return []
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File and i.path.endswith(".parquet") and not i.base_name.startswith((".", "_"))
    )


def read_table(
    path_or_uri: str | os.PathLike,
    filesystem: Any = None,
    *,
    schema: pa.Schema | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """Read a Parquet dataset folder (or one file) with pyarrow alone, local or ``s3://``.

    With ``schema``, the result has exactly that schema, and a folder that is missing or holds
    no Parquet file (a stage that wrote no rows) reads as an empty table instead of raising.
    ``columns`` reads only those columns (after ``schema`` is applied).
    """
    fs, path = resolve_filesystem(str(path_or_uri), filesystem)
    info = fs.get_file_info(path)
    files: list[str] | str = path if info.type == pafs.FileType.File else list_parquet_files(fs, path)
    if columns is not None:
        columns = list(columns)
        if schema is not None:
            schema = pa.schema([schema.field(name) for name in columns])
    if not files:
        if schema is None:
            raise FileNotFoundError(f"no Parquet data at {path_or_uri}")
        return schema.empty_table()
    table = pq.read_table(files, filesystem=fs, schema=schema, columns=columns)  # reads only `columns`
    return conform(table, schema) if schema is not None else table


def count_rows(path_or_uri: str | os.PathLike, filesystem: Any = None) -> int:
    """Rows of a Parquet dataset folder (or file), from the file footers alone; 0 if missing."""
    fs, path = resolve_filesystem(str(path_or_uri), filesystem)
    info = fs.get_file_info(path)
    files = [path] if info.type == pafs.FileType.File else list_parquet_files(fs, path)
    total = 0
    for name in files:
        with fs.open_input_file(name) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


__all__ = [
    "ANCHOR_MODES",
    "ANCHOR_SCHEMA",
    "CLIP_SCHEMA",
    "ERROR_SCHEMA",
    "FLOAT_LIST",
    "INT_LIST",
    "MIXTURE_SCHEMA",
    "SAMPLE_RATE",
    "STRING_LIST",
    "Anchor",
    "Clip",
    "ItemError",
    "Mixture",
    "Record",
    "conform",
    "count_rows",
    "float_list_array",
    "list_column_to_arrays",
    "list_column_to_numpy",
    "list_parquet_files",
    "make_anchor_id",
    "make_mixture_id",
    "read_table",
    "records_to_table",
    "resolve_filesystem",
    "table_to_records",
]
