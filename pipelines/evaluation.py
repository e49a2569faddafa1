"""Evaluation sets and evaluation reports for the separator.

Evaluation sets (:func:`open_evaluation_set`), local or ``s3://``:

- the mixing stage's evaluation Parquet (``MIXTURE_SCHEMA`` rows, ``jobs.mix --eval-out``): per
  class a few 2-s mixture/target pairs; ``target_class_index`` is an index in the label set the
  clips were built with, which must be the checkpoint's; the rows carry the target's precomputed
  query conditions (``condition_at_soft``, ``condition_embedding``);
- a folder of audio pairs ``<name>,mixture.wav`` + ``<name>,source.wav`` (any format
  :func:`uss_core.audio.load_audio` decodes, resampled to 32 kHz), the reference's layout. The
  class of a pair is its folder's ``class_id=<N>`` (the reference's
  ``2s_segments_test/class_id=N/``; N a class index of the checkpoint's label set) or, for pairs
  elsewhere, the row of ``labels.csv`` in the root folder with columns ``pair,label`` (``pair``
  the pair's path under the root without ``,mixture.wav``; ``label`` a class name, mid or
  index).

Scoring (:func:`score_evaluation_set`) goes through :mod:`uss_core.evaluation` batch by batch,
so memory stays bounded by the batch, not the set; the report (:func:`summarise`,
:func:`write_report`) is a per-class table (medians per class, as the reference), its class
averages (the paper's figure), a per-pair table, a bar plot and ``summary.json``;
:func:`report_markdown` renders a written report as a Markdown table (for a README).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipelines.schemas import (
    MIXTURE_SCHEMA,
    conform,
    list_column_to_arrays,
    list_parquet_files,
    resolve_filesystem,
)
from uss_core.audio import AUDIO_EXTENSIONS, load_audio
from uss_core.checkpoints import SeparatorModel
from uss_core.errors import AudioError, ConfigError, LabelError, UssError
from uss_core.evaluation import (
    class_average,
    ideal_ratio_mask,
    pair_conditions,
    pair_scores,
    separate_pairs,
)
from uss_core.files import atomic_path
from uss_core.ontology import LabelSet

PAIR_COLUMNS = [
    "mixture_id",
    "target_anchor_id",
    "target_class_index",
    "mixture",
    "target",
    "condition_at_soft",
    "condition_embedding",
]
LABELS_CSV = "labels.csv"
CLASS_FOLDER = re.compile(r"^class_id=(\d+)$")
PAIR_FILE = re.compile(r"^(?P<name>.+),(?P<role>mixture|source)(?P<ext>\.[^.]+)$")
# Where conditions come from: the set's precomputed rows, the model's query net on each target,
# or the first of those the set allows.
CONDITION_SOURCES = ("auto", "dataset", "query-net")
# Per-pair scores (dB): the model's estimate, and the ideal-ratio-mask oracle's (prefix irm_).
PAIR_METRICS = ("sdr", "sdri", "si_sdr", "si_sdri", "mixture_sdr", "irm_sdr", "irm_sdri", "irm_si_sdr", "irm_si_sdri")
# Per-class medians and their class averages, in table order.
CLASS_METRICS = ("sdri", "si_sdri", "irm_sdri", "irm_si_sdri", "mixture_sdr")
METRIC_TITLES = {
    "sdri": "SDRi",
    "si_sdri": "SI-SDRi",
    "irm_sdri": "IRM SDRi",
    "irm_si_sdri": "IRM SI-SDRi",
    "mixture_sdr": "mixture SDR",
}
CLASSES_CSV, PAIRS_CSV, SUMMARY_JSON, PLOT_PNG = "classes.csv", "pairs.csv", "summary.json", "sdri_per_class.png"


# --------------------------------------------------------------------------------------------
# Evaluation sets


@dataclass
class PairBatch:
    """Evaluation pairs of one length: ``mixtures``, ``targets`` are ``(pairs, samples)``;
    ``at_soft`` ``(pairs, classes)`` and ``embedding`` ``(pairs, embedding_size)`` are the targets'
    precomputed conditions (None when the set has none)."""

    pair_ids: list[str]
    class_indexes: np.ndarray
    mixtures: np.ndarray
    targets: np.ndarray
    at_soft: np.ndarray | None = None
    embedding: np.ndarray | None = None


def _batches_by_length(
    pair_ids: list[str],
    class_indexes: list[int],
    mixtures: list[np.ndarray],
    targets: list[np.ndarray],
    at_soft: list[np.ndarray] | None = None,
    embedding: list[np.ndarray] | None = None,
) -> Iterator[PairBatch]:
    """Stack pairs into :class:`PairBatch` es, one per distinct length (in first-seen order)."""
    groups: dict[int, list[int]] = {}
    for i, (mixture, target) in enumerate(zip(mixtures, targets)):
        if mixture.shape != target.shape:
            raise AudioError(f"{pair_ids[i]}: mixture has {mixture.size} samples but the target {target.size}")
        groups.setdefault(mixture.size, []).append(i)

    def stacked(rows: list[np.ndarray] | None, take: list[int]) -> np.ndarray | None:
        return None if rows is None else np.stack([rows[i] for i in take]).astype(np.float32, copy=False)

    for take in groups.values():
        yield PairBatch(
            [pair_ids[i] for i in take],
            np.asarray([class_indexes[i] for i in take], dtype=np.int64),
            stacked(mixtures, take),
            stacked(targets, take),
            stacked(at_soft, take),
            stacked(embedding, take),
        )


class ParquetEvaluationSet:
    """The mixing stage's evaluation Parquet (``MIXTURE_SCHEMA``), read file by file.

    Target classes are checked against ``labels``: a target anchor's id names its class mid
    (``<clip_id>-<class_mid>-<mode>``), which must be the mid of its class index in ``labels``.
    """

    has_conditions = True

    def __init__(self, fs: pafs.FileSystem, files: list[str], uri: str, labels: LabelSet) -> None:
        self.fs = fs
        self.files = files
        self.uri = uri
        self.labels = labels

    def _check_classes(self, anchor_ids: list[str], class_indexes: list[int]) -> None:
        for anchor_id, index in zip(anchor_ids, class_indexes):
            if not 0 <= index < len(self.labels):
                raise ConfigError(
                    f"{self.uri}: target {anchor_id} has class index {index}, outside the checkpoint's "
                    f"{len(self.labels)} classes; the evaluation set was built with another label set"
                )
            if not anchor_id.rsplit("-", 1)[0].endswith(f"-{self.labels.mids[index]}"):
                raise ConfigError(
                    f"{self.uri}: target {anchor_id} has class index {index}, which is "
                    f"{self.labels.mids[index]} ({self.labels.names[index]}) in the checkpoint's label set; "
                    "the evaluation set was built with another label set"
                )

    def __len__(self) -> int:
        total = 0
        for name in self.files:
            with self.fs.open_input_file(name) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total

    def batches(self, pairs_per_batch: int) -> Iterator[PairBatch]:
        """The pairs in file order, at most ``pairs_per_batch`` per batch."""
        schema = pa.schema([MIXTURE_SCHEMA.field(name) for name in PAIR_COLUMNS])
        for name in self.files:
            with self.fs.open_input_file(name) as f:
                parquet = pq.ParquetFile(f)
                missing = [c for c in PAIR_COLUMNS if c not in parquet.schema_arrow.names]
                if missing:
                    raise ConfigError(
                        f"{name}: not an evaluation mixtures dataset (lacks {', '.join(missing)}); "
                        "make one with `python -m jobs.mix --eval-out ...`"
                    )
                for record_batch in parquet.iter_batches(batch_size=pairs_per_batch, columns=PAIR_COLUMNS):
                    table = conform(pa.Table.from_batches([record_batch]), schema)
                    class_indexes = table.column("target_class_index").to_pylist()
                    self._check_classes(table.column("target_anchor_id").to_pylist(), class_indexes)
                    yield from _batches_by_length(
                        table.column("mixture_id").to_pylist(),
                        class_indexes,
                        list_column_to_arrays(table.column("mixture")),
                        list_column_to_arrays(table.column("target")),
                        list_column_to_arrays(table.column("condition_at_soft")),
                        list_column_to_arrays(table.column("condition_embedding")),
                    )


@dataclass(frozen=True)
class AudioPair:
    """One pair of audio files of a folder evaluation set (paths in the set's filesystem)."""

    pair_id: str
    class_index: int
    mixture_path: str
    source_path: str


class AudioFolderEvaluationSet:
    """A folder of ``<name>,mixture.<ext>`` / ``<name>,source.<ext>`` pairs (module docstring)."""

    has_conditions = False

    def __init__(self, fs: pafs.FileSystem, pairs: list[AudioPair], uri: str) -> None:
        self.fs = fs
        self.pairs = pairs
        self.uri = uri

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, path: str) -> np.ndarray:
        with self.fs.open_input_file(path) as f:
            return load_audio(f.read(), name=path)

    def batches(self, pairs_per_batch: int) -> Iterator[PairBatch]:
        """The pairs sorted by id, at most ``pairs_per_batch`` per batch."""
        for lo in range(0, len(self.pairs), pairs_per_batch):
            chunk = self.pairs[lo : lo + pairs_per_batch]
            yield from _batches_by_length(
                [p.pair_id for p in chunk],
                [p.class_index for p in chunk],
                [self._load(p.mixture_path) for p in chunk],
                [self._load(p.source_path) for p in chunk],
            )


EvaluationSet = ParquetEvaluationSet | AudioFolderEvaluationSet


def _read_pair_labels(fs: pafs.FileSystem, path: str, labels: LabelSet) -> dict[str, int]:
    """``labels.csv`` (columns ``pair,label``) as ``{pair id: class index}``."""
    with fs.open_input_file(path) as f:
        text = f.read().decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not {"pair", "label"} <= set(reader.fieldnames):
        raise ConfigError(f"{path}: needs a header with columns 'pair' and 'label', got {reader.fieldnames}")
    classes = {}
    for line, row in enumerate(reader, start=2):
        label = (row["label"] or "").strip()
        try:
            index = labels.resolve_index(int(label)) if label.isdigit() else labels.resolve(label)
            classes[row["pair"].strip()] = index
        except LabelError as exc:
            raise LabelError(f"{path}, line {line}: {exc}") from None
    return classes


def _audio_pairs(fs: pafs.FileSystem, root: str, infos: list[pafs.FileInfo], labels: LabelSet) -> list[AudioPair]:
    """Match mixture and source files into pairs and give each its class."""
    found: dict[str, dict[str, str]] = {}
    for info in infos:
        match = PAIR_FILE.match(info.base_name)
        if info.type != pafs.FileType.File or not match or match["ext"].lower() not in AUDIO_EXTENSIONS:
            continue
        relative = os.path.relpath(info.path, root).replace(os.sep, "/")
        pair_id = relative[: -len(info.base_name)] + match["name"]
        found.setdefault(pair_id, {})[match["role"]] = info.path
    incomplete = sorted(pair_id for pair_id, files in found.items() if len(files) != 2)
    if incomplete:
        raise AudioError(
            f"{len(incomplete)} pair(s) in {root} lack their mixture or source file, e.g. {incomplete[:3]}; "
            "every <name>,mixture.wav needs a <name>,source.wav beside it"
        )
    labels_path = f"{root.rstrip('/')}/{LABELS_CSV}"
    listed = (
        _read_pair_labels(fs, labels_path, labels)
        if fs.get_file_info(labels_path).type == pafs.FileType.File
        else {}
    )
    pairs = []
    for pair_id in sorted(found):
        folder = pair_id.rsplit("/", 2)[-2] if "/" in pair_id else ""
        class_folder = CLASS_FOLDER.match(folder)
        if pair_id in listed:
            class_index = listed[pair_id]
        elif class_folder:
            try:
                class_index = labels.resolve_index(int(class_folder[1]))
            except LabelError as exc:
                raise LabelError(f"{root}/{pair_id}: folder {folder}: {exc}") from None
        else:
            raise LabelError(
                f"{root}/{pair_id}: no class; put the pair in a class_id=<N> folder or list it in {LABELS_CSV} "
                "(columns pair,label)"
            )
        pairs.append(AudioPair(pair_id, class_index, found[pair_id]["mixture"], found[pair_id]["source"]))
    return pairs


def open_evaluation_set(uri: str, labels: LabelSet, filesystem: Any = None) -> EvaluationSet:
    """The evaluation set at ``uri`` (local or ``s3://``): a Parquet dataset (folder or file) of
    the mixing stage, or a folder of audio pairs (module docstring); classes are checked against
    ``labels``, the checkpoint's label set."""
    fs, path = resolve_filesystem(str(uri), filesystem)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"evaluation set not found: {uri}")
    if info.type == pafs.FileType.File:
        return ParquetEvaluationSet(fs, [path], str(uri), labels)
    parquet_files = list_parquet_files(fs, path)
    if parquet_files:
        return ParquetEvaluationSet(fs, parquet_files, str(uri), labels)
    pairs = _audio_pairs(fs, path, fs.get_file_info(pafs.FileSelector(path, recursive=True)), labels)
    if not pairs:
        raise ConfigError(
            f"{uri} holds no evaluation pairs: expected the Parquet of `jobs.mix --eval-out`, or audio pairs "
            "<name>,mixture.wav + <name>,source.wav in class_id=<N> folders (or listed in labels.csv)"
        )
    return AudioFolderEvaluationSet(fs, pairs, str(uri))


# --------------------------------------------------------------------------------------------
# Scoring


def resolve_condition_source(requested: str, evaluation_set: EvaluationSet) -> str:
    """``dataset`` or ``query-net``: where the conditions of ``evaluation_set``'s pairs come from."""
    if requested not in CONDITION_SOURCES:
        raise ConfigError(f"conditions must be one of {', '.join(CONDITION_SOURCES)}, got {requested!r}")
    if requested == "auto":
        return "dataset" if evaluation_set.has_conditions else "query-net"
    if requested == "dataset" and not evaluation_set.has_conditions:
        raise ConfigError(f"{evaluation_set.uri} carries no precomputed conditions; use conditions 'query-net'")
    return requested


@dataclass
class PairResults:
    """Scores of every pair: ``scores[metric]`` is ``(pairs,)`` dB for each of :data:`PAIR_METRICS`;
    ``condition_source`` says where the conditions came from (``dataset`` or ``query-net``)."""

    pair_ids: list[str]
    class_indexes: np.ndarray
    scores: dict[str, np.ndarray]
    condition_source: str


def score_batch(
    model: SeparatorModel, batch: PairBatch, condition_source: str, batch_size: int, precision: str = "fp32"
) -> dict[str, np.ndarray]:
    """Separate one :class:`PairBatch` and score it and its IRM oracle (:data:`PAIR_METRICS`).

    ``condition_source``: ``dataset`` (the batch's precomputed conditions) or ``query-net``;
    ``precision``: the U-Net's arithmetic (:func:`uss_core.separation.resolve_precision`).
    """
    if condition_source == "dataset":
        try:
            conditions = pair_conditions(model, batch.class_indexes, at_soft=batch.at_soft, embedding=batch.embedding)
        except ConfigError as exc:
            # The set's conditions come from the mining tagger, which need not match this model's query net.
            raise ConfigError(f"{exc}: the evaluation set's precomputed conditions do not fit this model; "
                              "evaluate with conditions 'query-net' (--conditions query-net)") from None
    else:
        conditions = pair_conditions(model, batch.class_indexes, targets=batch.targets, batch_size=batch_size)
    device = next(model.parameters()).device
    estimates = separate_pairs(model, batch.mixtures, conditions, batch_size=batch_size, device=device, precision=precision)
    stft = model.config.separator
    oracle = ideal_ratio_mask(batch.mixtures, batch.targets, n_fft=stft.n_fft, hop_length=stft.hop_length)
    scores = pair_scores(estimates, batch.targets, batch.mixtures)
    irm = pair_scores(oracle, batch.targets, batch.mixtures)
    scores.update({f"irm_{k}": irm[k] for k in ("sdr", "sdri", "si_sdr", "si_sdri")})
    return scores


def score_evaluation_set(
    model: SeparatorModel,
    evaluation_set: EvaluationSet,
    condition_source: str = "auto",
    batch_size: int = 8,
    precision: str = "fp32",
) -> PairResults:
    """Score every pair of ``evaluation_set`` (model on its own device, see :func:`score_batch`).

    Pairs are read ``16 * batch_size`` at a time, so memory is bounded by that many pairs.
    """
    source = resolve_condition_source(condition_source, evaluation_set)
    pair_ids: list[str] = []
    class_indexes: list[np.ndarray] = []
    scores: dict[str, list[np.ndarray]] = {name: [] for name in PAIR_METRICS}
    for batch in evaluation_set.batches(16 * batch_size):
        batch_scores = score_batch(model, batch, source, batch_size, precision)
        pair_ids += batch.pair_ids
        class_indexes.append(batch.class_indexes)
        for name in PAIR_METRICS:
            scores[name].append(batch_scores[name])
    if not pair_ids:
        raise ConfigError(f"{evaluation_set.uri} holds no evaluation pairs")
    return PairResults(
        pair_ids, np.concatenate(class_indexes), {k: np.concatenate(v) for k, v in scores.items()}, source
    )


# --------------------------------------------------------------------------------------------
# Reports


@dataclass(frozen=True)
class ClassScores:
    """One row of the per-class table: medians over the class's pairs, in dB."""

    class_index: int
    mid: str
    name: str
    pairs: int
    sdri: float
    si_sdri: float
    irm_sdri: float
    irm_si_sdri: float
    mixture_sdr: float


def summarise(results: PairResults, labels: LabelSet) -> tuple[list[ClassScores], dict[str, float]]:
    """Per-class medians (:func:`uss_core.evaluation.class_average`) of :data:`CLASS_METRICS` and
    their class averages (the paper's figure), classes in index order."""
    medians: dict[str, dict[int, float]] = {}
    averages: dict[str, float] = {}
    for metric in CLASS_METRICS:
        medians[metric], averages[metric] = class_average(results.scores[metric], results.class_indexes)
    indexes, counts = np.unique(results.class_indexes, return_counts=True)
    rows = [
        ClassScores(
            int(index),
            labels.mids[index],
            labels.names[index],
            int(count),
            **{m: medians[m][int(index)] for m in CLASS_METRICS},
        )
        for index, count in zip(indexes, counts)
    ]
    return rows, averages


def write_class_table(rows: list[ClassScores], path: str | os.PathLike) -> Path:
    """The per-class table as CSV (columns: the :class:`ClassScores` fields), atomically."""
    names = [f.name for f in fields(ClassScores)]
    with atomic_path(path) as temp, open(temp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    return Path(path)


def read_class_table(path: str | os.PathLike) -> list[ClassScores]:
    """Inverse of :func:`write_class_table`."""
    with open(path, newline="") as f:
        return [
            ClassScores(
                int(row["class_index"]),
                row["mid"],
                row["name"],
                int(row["pairs"]),
                **{m: float(row[m]) for m in CLASS_METRICS},
            )
            for row in csv.DictReader(f)
        ]


def write_pair_table(results: PairResults, path: str | os.PathLike) -> Path:
    """Every pair's scores as CSV (``pair_id, class_index`` and :data:`PAIR_METRICS`), atomically."""
    with atomic_path(path) as temp, open(temp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["pair_id", "class_index", *PAIR_METRICS])
        for i, pair_id in enumerate(results.pair_ids):
            writer.writerow(
                [pair_id, int(results.class_indexes[i]), *(f"{results.scores[m][i]:.4f}" for m in PAIR_METRICS)]
            )
    return Path(path)


def format_db(value: float, missing: str = "n/a") -> str:
    """A score in dB for a table: 2 decimals, ``missing`` for NaN (no finite score)."""
    return missing if math.isnan(value) else f"{value:.2f}"


def class_table_markdown(rows: list[ClassScores], averages: dict[str, float]) -> str:
    """The per-class table as Markdown, with a last row of class averages (dB, 2 decimals)."""
    header = ["class", "name", "pairs", *(METRIC_TITLES[m] for m in CLASS_METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for row in rows:
        name = row.name.replace("|", "\\|")
        lines.append(
            f"| {row.class_index} | {name} | {row.pairs} | "
            + " | ".join(format_db(getattr(row, m)) for m in CLASS_METRICS)
            + " |"
        )
    total = sum(row.pairs for row in rows)
    lines.append(
        f"| | **class average** ({len(rows)} classes) | {total} | "
        + " | ".join(f"**{format_db(averages[m])}**" for m in CLASS_METRICS)
        + " |"
    )
    return "\n".join(lines)


def plot_class_scores(rows: list[ClassScores], averages: dict[str, float], path: str | os.PathLike, title: str) -> Path:
    """Write a PNG bar chart of per-class SDRi with the IRM oracle ceiling behind it, atomically.

    One horizontal bar per class (median SDRi), the IRM SDRi as a wider pale bar behind it; 0 dB
    is the unprocessed mixture; a dashed line marks the class-averaged SDRi.
    """
    count = len(rows)
    # About a fifth of an inch per class keeps names legible, within sane bounds (as plot_activity).
    figure = Figure(figsize=(9, min(2.0 + 0.22 * count, 80.0)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(count)[::-1]  # first class at the top
    axes.barh(positions, [r.irm_sdri for r in rows], height=0.8, color="#c6dbef", label="IRM oracle SDRi")
    axes.barh(positions, [r.sdri for r in rows], height=0.45, color="#08519c", label="model SDRi")
    axes.axvline(0.0, color="black", linewidth=0.8)
    if not math.isnan(averages["sdri"]):
        axes.axvline(averages["sdri"], color="#d94801", linestyle="--", linewidth=1.2,
                     label=f"class-averaged SDRi {averages['sdri']:.2f} dB")
    axes.set_yticks(positions)
    # '$' would start matplotlib mathtext inside a label.
    axes.set_yticklabels([f"{r.name} ({r.pairs})".replace("$", r"\$") for r in rows], fontsize=8 if count <= 100 else 6)
    axes.set_ylim(-0.6, count - 0.4)
    axes.set_xlabel("dB (median over the class's pairs; 0 = the mixture)")
    axes.set_title(title.replace("$", r"\$"))
    figure.legend(loc="outside lower center", ncols=3, fontsize=8)
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=100)
    return Path(path)


@dataclass(frozen=True)
class ReportPaths:
    """The files of a written report."""

    classes_csv: Path
    pairs_csv: Path
    summary_json: Path
    plot_png: Path


def write_report(
    out_dir: str | os.PathLike,
    results: PairResults,
    rows: list[ClassScores],
    averages: dict[str, float],
    summary: dict[str, Any],
    title: str,
) -> ReportPaths:
    """Write ``classes.csv``, ``pairs.csv``, ``summary.json`` (``summary`` plus the class averages
    under ``"class_average"``) and ``sdri_per_class.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / SUMMARY_JSON
    with atomic_path(summary_path) as temp:
        # NaN (a class without a finite score) is not JSON: write null.
        document = {**summary, "class_average": {k: None if math.isnan(v) else v for k, v in averages.items()}}
        temp.write_text(json.dumps(document, indent=2))
    return ReportPaths(
        write_class_table(rows, out / CLASSES_CSV),
        write_pair_table(results, out / PAIRS_CSV),
        summary_path,
        plot_class_scores(rows, averages, out / PLOT_PNG, title),
    )


def report_markdown(out_dir: str | os.PathLike) -> str:
    """The Markdown per-class table of a report written by :func:`write_report` (for a README)."""
    out = Path(out_dir)
    try:
        rows = read_class_table(out / CLASSES_CSV)
        summary = json.loads((out / SUMMARY_JSON).read_text())
    except FileNotFoundError as exc:
        raise UssError(
            f"{out} is not an evaluation report ({exc.filename} missing); run `python -m jobs.evaluate`"
        ) from None
    averages = {k: math.nan if v is None else float(v) for k, v in summary["class_average"].items()}
    return class_table_markdown(rows, averages)
