"""Training a Cnn14-family audio tagger on weakly labelled clips, with Ray Train and Ray Data.

The clips dataset (a Parquet folder with :data:`~pipelines.schemas.CLIP_SCHEMA`, local or
``s3://``) is streamed through Ray Data into a :class:`ray.train.torch.TorchTrainer` (gloo DDP on
CPU): no worker holds a copy of the dataset. Each epoch:

- **split** -- a clip is in the validation split iff a hash of its ``clip_id`` falls below
  ``validation_fraction`` (:func:`is_validation`): deterministic, the same for every seed, run
  and storage layout, so a clip never moves between splits;
- **class-balanced sampling** -- each training row is repeated ``n = floor(f + u)`` times, with
  ``f = min(max_oversample, (c_max / c_rarest) ** balance_power)``, ``c_rarest`` the training
  count of the row's rarest label, ``c_max`` the count of the most frequent class, and
  ``u in [0, 1)`` a hash of ``(seed, clip_id)`` (so ``E[n] = f`` and the replication is the same
  every epoch) -- see :func:`oversample_factors`. Rare classes are seen about as often as
  frequent ones (exactly so for single-label clips, up to the cap);
- **shuffle** -- ``"local"`` (default, streaming): Parquet files in a new seeded order every epoch
  (``FileShuffleConfig(reseed_after_execution=True)``) and a per-worker shuffle buffer of
  ``shuffle_buffer`` rows seeded by ``(seed, epoch, rank)``, which also spreads a row's
  repeats apart; ``"global"``: a full ``random_shuffle`` reseeded every epoch (moves every
  waveform through the object store each epoch: small datasets only);
- **augmentation** on the worker (``AugmentConfig``): random gain, circular time shift (keeps
  every event of the clip, so weak labels stay true), optional mixup (PANNs-style mixed
  targets);
- **loss**: binary cross-entropy between ``clipwise_output`` and the multi-hot weak labels. With
  ``head="sed"`` the model is :class:`~uss_core.models.panns.Cnn14DecisionLevelMax`, whose
  clip output is the max over time of its frame-wise probabilities (multiple-instance
  learning): the frame-wise output is what anchor mining needs. ``head="clip"`` trains
  :class:`~uss_core.models.panns.Cnn14`. Both share one weight layout;
- **validation**: macro mAP (:func:`mean_average_precision`, over the classes with a positive in
  the validation split) reported with ``ray.train.report`` together with a checkpoint (rank 0
  writes it in the project's tagger format, :func:`~uss_core.checkpoints.save_tagger_checkpoint`).

After the run the best (or last) epoch's checkpoint is exported with ``save_tagger_checkpoint``
to a local folder or an ``s3://`` URI (written locally, then uploaded).

Use::

    config = load_yaml(TaggerTrainingConfig, "jobs/presets/tagger-cpu-small.yaml")
    result = train_tagger(config, "s3://bucket/clips", "s3://bucket/tagger", labels, filesystem=fs)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from ray.train import DataConfig

from pipelines.schemas import list_column_to_arrays, list_parquet_files, resolve_filesystem
from pipelines.training_common import LR_SCHEDULES, ReportCallback, bf16_autocast, scheduled_lr, write_folder
from uss_core.config import from_dict, to_dict
from uss_core.errors import ConfigError
from uss_core.models.panns import TAGGER_HEADS, Cnn14Config
from uss_core.ontology import LabelSet

BALANCE_MODES = ("rarest_label", "none")
SHUFFLE_MODES = ("local", "global")
EXPORT_MODES = ("best", "last")
METRIC = "val_mAP"  # the metric checkpoints are ranked by
HISTORY_FILE = "history.json"  # per-epoch metrics so far, beside each Ray Train checkpoint


# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class AugmentConfig:
    """Waveform augmentation on the training workers (all off by default).

    ``gain_db``: a random gain uniform in ``[-gain_db, +gain_db]`` dB per clip;
    ``time_shift``: circularly shift each clip by a uniform random offset (events move, none is
    lost, so the weak labels stay true; an event may wrap around the end);
    ``mixup_alpha``: if > 0, mix each clip with another of the batch with weight
    ``lambda ~ Beta(alpha, alpha)``, targets mixed the same way (as PANNs).
    """

    gain_db: float = 0.0
    time_shift: bool = False
    mixup_alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.gain_db < 0:
            raise ConfigError(f"augment.gain_db must be >= 0, got {self.gain_db}")
        if self.mixup_alpha < 0:
            raise ConfigError(f"augment.mixup_alpha must be >= 0, got {self.mixup_alpha}")


@dataclass(frozen=True)
class TaggerTrainingConfig:
    """Everything a tagger training run needs, data location and labels aside.

    ``model.classes_num`` is replaced by the size of the label set the run is given.
    ``batch_size`` is global (split evenly over ``num_workers``); ``max_steps_per_epoch`` cuts
    epochs short (smoke tests). ``cpus_per_worker`` is the Ray resource each training worker
    reserves: keep ``num_workers * cpus_per_worker`` below the cluster's CPUs so Ray Data keeps
    CPUs to read with (a 2-CPU machine hangs with 2 workers x 1 CPU). ``torch_threads``: intra-op
    threads per worker (None: as Ray sets them, one per reserved CPU, at least one). ``use_gpu``: one
    GPU per worker (NCCL); ``cpus_per_worker`` then still applies. ``cpu_bf16``: the training
    forward in bfloat16 autocast on CPU workers whose CPU has AMX (elsewhere fp32, which is
    faster there), the log-mel front end and validation still in fp32.
    ``clip_samples``: length every clip is cut or zero-padded to (None: the longest clip in the
    data). ``export``: which epoch's checkpoint the run exports -- ``"best"`` validation mAP or the
    ``"last"``.
    """

    model: Cnn14Config = field(default_factory=Cnn14Config)
    head: str = "sed"
    epochs: int = 10
    max_steps_per_epoch: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    use_gpu: bool = False
    cpu_bf16: bool = False
    torch_threads: int | None = None
    validation_fraction: float = 0.2
    seed: int = 0
    balance: str = "rarest_label"
    balance_power: float = 1.0
    max_oversample: float = 4.0
    shuffle: str = "local"
    shuffle_buffer: int = 32
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    clip_samples: int | None = None
    export: str = "best"

    def __post_init__(self) -> None:
        checks = [
            (self.head in TAGGER_HEADS, f"head must be one of {TAGGER_HEADS}, got {self.head!r}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (
                self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
                f"max_steps_per_epoch must be >= 1 or null, got {self.max_steps_per_epoch}",
            ),
            (self.num_workers >= 1, f"num_workers must be >= 1, got {self.num_workers}"),
            (
                self.batch_size >= self.num_workers,
                f"batch_size {self.batch_size} is the global batch: it must be >= num_workers ({self.num_workers})",
            ),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.cpus_per_worker > 0, f"cpus_per_worker must be > 0, got {self.cpus_per_worker}"),
            (
                self.torch_threads is None or self.torch_threads >= 1,
                f"torch_threads must be >= 1 or null, got {self.torch_threads}",
            ),
            (
                0 < self.validation_fraction < 1,
                f"validation_fraction must be in (0, 1), got {self.validation_fraction}",
            ),
            (self.balance in BALANCE_MODES, f"balance must be one of {BALANCE_MODES}, got {self.balance!r}"),
            (self.balance_power >= 0, f"balance_power must be >= 0, got {self.balance_power}"),
            (self.max_oversample >= 1, f"max_oversample must be >= 1, got {self.max_oversample}"),
            (self.shuffle in SHUFFLE_MODES, f"shuffle must be one of {SHUFFLE_MODES}, got {self.shuffle!r}"),
            (self.shuffle_buffer >= 0, f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}"),
            (
                self.clip_samples is None or self.clip_samples >= self.model.window_size,
                f"clip_samples must be >= the model window ({self.model.window_size}) or null",
            ),
            (self.export in EXPORT_MODES, f"export must be one of {EXPORT_MODES}, got {self.export!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"TaggerTrainingConfig: {message}")

    @property
    def worker_batch_size(self) -> int:
        return self.batch_size // self.num_workers


# --------------------------------------------------------------------------------------------
# Split, class balance, metrics (pure functions)


def _unit_hash(text: str) -> float:
    """A uniform number in [0, 1) from ``text`` (stable across processes and versions)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") / 2.0**64


def is_validation(clip_id: str, validation_fraction: float) -> bool:
    """Whether ``clip_id`` belongs to the validation split (a hash of the id alone)."""
    return _unit_hash(f"split/{clip_id}") < validation_fraction


def oversample_factors(
    label_indexes: Sequence[Sequence[int]],
    class_counts: np.ndarray,
    power: float = 1.0,
    max_oversample: float = 4.0,
) -> np.ndarray:
    """Expected repeats per epoch of each row: ``min(max_oversample, (c_max / c_rarest) ** power)``.

    ``class_counts (classes,)``: training clips per class; ``c_rarest``: the smallest count among
    the row's labels (a row whose labels all have count 0 -- impossible for training rows -- gets
    1). Returns ``(rows,)`` float64, each in ``[1, max_oversample]``.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    top = counts.max() if counts.size else 0.0
    out = np.ones(len(label_indexes), dtype=np.float64)
    for i, labels in enumerate(label_indexes):
        present = [counts[j] for j in labels if counts[j] > 0]
        if present and top > 0:
            out[i] = min(max_oversample, (top / min(present)) ** power)
    return np.maximum(out, 1.0)


def repeat_counts(clip_ids: Sequence[str], factors: np.ndarray, seed: int) -> np.ndarray:
    """Integer repeats ``floor(f + u)`` with ``u`` a hash of ``(seed, clip_id)``: ``(rows,)`` int64."""
    u = np.array([_unit_hash(f"oversample/{seed}/{c}") for c in clip_ids], dtype=np.float64)
    return np.floor(np.asarray(factors, dtype=np.float64) + u).astype(np.int64)


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of one class: ``sum_k (R_k - R_{k-1}) P_k`` over the distinct score
    thresholds, highest first (the step-wise area under the precision-recall curve, no
    interpolation; tied scores form one threshold). ``scores, targets (n,)``; NaN if no target
    is positive."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = np.asarray(targets).reshape(-1) > 0.5
    if scores.shape != positive.shape:
        raise ValueError(f"scores {scores.shape} and targets {positive.shape} differ")
    total = int(positive.sum())
    if total == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1]
    tp = np.cumsum(positive)[last_of_tie]
    predicted = last_of_tie + 1
    precision = tp / predicted
    recall = tp / total
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Macro mAP over the classes with at least one positive. ``scores, targets (n, classes)``.

    Returns ``(mAP, per-class AP (classes,))``, NaN for classes without positives (and a NaN mAP
    if no class has one).
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must be equal (n, classes) arrays")
    per_class = np.array([average_precision(scores[:, k], targets[:, k]) for k in range(scores.shape[1])])
    present = ~np.isnan(per_class)
    return (float(per_class[present].mean()) if present.any() else float("nan")), per_class


# --------------------------------------------------------------------------------------------
# Datasets


@dataclass(frozen=True)
class DatasetSummary:
    """What the training run reads: counts per split, class counts, clip length."""

    clips_uri: str
    num_classes: int
    train_clips: int
    validation_clips: int
    train_rows_per_epoch: int  # after class-balanced oversampling
    clip_samples: int
    train_class_counts: tuple[int, ...]
    validation_class_counts: tuple[int, ...]


def _parquet_files(uri: str, filesystem: Any) -> tuple[pafs.FileSystem, list[str]]:
    fs, path = resolve_filesystem(uri, filesystem)
    info = fs.get_file_info(path)
    files = [path] if info.type == pafs.FileType.File else list_parquet_files(fs, path)
    if not files:
        raise ConfigError(f"{uri}: no Parquet files; expected a clips dataset folder (the ingest job's output)")
    return fs, files


def _label_offsets(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(values, offsets)`` of a ``list<int32>`` column (one chunk)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        raise ConfigError("clips dataset: label_indexes holds nulls")
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False)
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]


def _split_mask(clip_ids: Sequence[str], fraction: float) -> np.ndarray:
    return np.array([is_validation(c, fraction) for c in clip_ids], dtype=bool)


def _stats_batch(batch: pa.Table, num_classes: int, fraction: float) -> dict[str, np.ndarray]:
    """One row of partial statistics for a batch of (clip_id, label_indexes, num_samples)."""
    ids = batch["clip_id"].to_pylist()
    val = _split_mask(ids, fraction)
    values, offsets = _label_offsets(batch["label_indexes"])
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ConfigError(
            f"clips dataset: label index {int(values.max())} is outside the label set ({num_classes} classes); "
            "train with the label set the clips were ingested with"
        )
    row_of_value = np.repeat(np.arange(len(ids)), np.diff(offsets))
    counts = np.zeros((2, num_classes), dtype=np.int64)
    np.add.at(counts, (val[row_of_value].astype(np.int64), values), 1)
    samples = batch["num_samples"].to_numpy()
    return {
        "rows": np.array([[int((~val).sum()), int(val.sum())]]),
        "counts": counts[None],
        "max_samples": np.array([int(samples.max()) if samples.size else 0]),
    }


def _repeats_batch(batch: pa.Table, class_counts: np.ndarray, config: TaggerTrainingConfig) -> dict[str, np.ndarray]:
    ids = batch["clip_id"].to_pylist()
    keep = ~_split_mask(ids, config.validation_fraction)
    repeats = _row_repeats(batch, keep, class_counts, config)
    return {"rows": np.array([int(repeats.sum())])}


def _row_repeats(batch: pa.Table, keep: np.ndarray, class_counts: np.ndarray, config: TaggerTrainingConfig) -> np.ndarray:
    """Repeats per row of ``batch`` (0 for rows not kept)."""
    if config.balance == "none":
        return keep.astype(np.int64)
    values, offsets = _label_offsets(batch["label_indexes"])
    labels = [values[offsets[i] : offsets[i + 1]] for i in range(batch.num_rows)]
    factors = oversample_factors(labels, class_counts, config.balance_power, config.max_oversample)
    repeats = repeat_counts(batch["clip_id"].to_pylist(), factors, config.seed)
    return np.where(keep, repeats, 0)


def _to_examples(
    batch: pa.Table,
    validation: bool,
    num_classes: int,
    clip_samples: int,
    class_counts: np.ndarray | None,
    config: TaggerTrainingConfig,
) -> dict[str, np.ndarray]:
    """Clip rows -> model inputs for one split: ``waveform (rows, clip_samples)`` float32 and
    ``target (rows, classes)`` float32 multi-hot; training rows repeated for class balance."""
    in_split = _split_mask(batch["clip_id"].to_pylist(), config.validation_fraction) == validation
    if validation or class_counts is None:
        repeats = in_split.astype(np.int64)
    else:
        repeats = _row_repeats(batch, in_split, class_counts, config)
    rows = np.repeat(np.arange(batch.num_rows), repeats)
    waves = list_column_to_arrays(batch["waveform"])
    waveform = np.zeros((rows.size, clip_samples), dtype=np.float32)
    values, offsets = _label_offsets(batch["label_indexes"])
    target = np.zeros((rows.size, num_classes), dtype=np.float32)
    for out, i in enumerate(rows):
        w = waves[i][:clip_samples]
        waveform[out, : w.size] = w
        target[out, values[offsets[i] : offsets[i + 1]]] = 1.0
    return {"waveform": waveform, "target": target}


def read_clip_columns(uri: str, filesystem: Any, columns: Sequence[str], shuffle: Any = None):
    """A Ray dataset of ``columns`` of the clips Parquet folder at ``uri`` (lazy)."""
    import ray.data

    fs, files = _parquet_files(uri, filesystem)
    return ray.data.read_parquet(files, filesystem=fs, shuffle=shuffle).select_columns(list(columns))


def summarize_clips(
    uri: str, num_classes: int, config: TaggerTrainingConfig, filesystem: Any = None
) -> DatasetSummary:
    """Counts per split and class, clip length and the oversampled epoch size: two passes over
    the small columns only (``clip_id``, ``label_indexes``, ``num_samples``), never the audio."""
    small = read_clip_columns(uri, filesystem, ["clip_id", "label_indexes", "num_samples"]).materialize()
    parts = small.map_batches(
        _stats_batch,
        batch_format="pyarrow",
        batch_size=4096,
        fn_kwargs={"num_classes": num_classes, "fraction": config.validation_fraction},
    ).take_all()
    if not parts:
        raise ConfigError(f"{uri}: the clips dataset has no rows")
    rows = np.sum([p["rows"] for p in parts], axis=0)
    counts = np.sum([p["counts"] for p in parts], axis=0)
    max_samples = max(int(p["max_samples"]) for p in parts)
    train_clips, val_clips = int(rows[0]), int(rows[1])
    if train_clips == 0 or val_clips == 0:
        raise ConfigError(
            f"{uri}: {train_clips} training and {val_clips} validation clips with validation_fraction "
            f"{config.validation_fraction}; the dataset is too small for this fraction"
        )
    epoch_rows = train_clips
    if config.balance != "none":
        epoch_rows = int(
            sum(
                int(p["rows"])
                for p in small.map_batches(
                    _repeats_batch,
                    batch_format="pyarrow",
                    batch_size=4096,
                    fn_kwargs={"class_counts": counts[0], "config": config},
                ).take_all()
            )
        )
    return DatasetSummary(
        clips_uri=uri,
        num_classes=num_classes,
        train_clips=train_clips,
        validation_clips=val_clips,
        train_rows_per_epoch=epoch_rows,
        clip_samples=config.clip_samples or max_samples,
        train_class_counts=tuple(int(c) for c in counts[0]),
        validation_class_counts=tuple(int(c) for c in counts[1]),
    )


def training_datasets(
    uri: str, summary: DatasetSummary, config: TaggerTrainingConfig, filesystem: Any = None
) -> dict[str, Any]:
    """``{"train": ..., "validation": ...}`` Ray datasets of model inputs (``waveform``,
    ``target``), lazy and streamed; the train one oversampled and shuffled as configured."""
    from ray.data import FileShuffleConfig
    from ray.data._internal.random_config import RandomSeedConfig

    columns = ["clip_id", "label_indexes", "waveform"]
    common = {"num_classes": summary.num_classes, "clip_samples": summary.clip_samples, "config": config}
    file_shuffle = FileShuffleConfig(seed=config.seed, reseed_after_execution=True) if config.shuffle == "local" else None
    train = read_clip_columns(uri, filesystem, columns, shuffle=file_shuffle).map_batches(
        _to_examples,
        batch_format="pyarrow",
        batch_size=16,
        fn_kwargs={"validation": False, "class_counts": np.asarray(summary.train_class_counts), **common},
    )
    if config.shuffle == "global":
        train = train.random_shuffle(seed=RandomSeedConfig(seed=config.seed, reseed_after_execution=True))
    validation = read_clip_columns(uri, filesystem, columns).map_batches(
        _to_examples,
        batch_format="pyarrow",
        batch_size=16,
        fn_kwargs={"validation": True, "class_counts": None, **common},
    )
    return {"train": train, "validation": validation}


class _TaggerDataConfig(DataConfig):
    """Ray Train's data config, except that ``"validation"`` is split without equalising.

    ``DataConfig`` splits every dataset with ``streaming_split(equal=True)``, which drops up to
    ``world - 1`` rows to give each worker the same number (DDP needs equal steps: kept for
    ``"train"``). Validation runs no collective per batch, so it is split with ``equal=False``:
    every clip is scored exactly once, by one worker, and the scores are gathered for the mAP.
    One streaming execution serves all workers (an unsplit dataset would run one per worker).
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        regular = {k: v for k, v in datasets.items() if k != "validation"}
        output = super().configure(regular, world_size, worker_handles, worker_node_ids, **kwargs) if regular else [
            {} for _ in range(world_size)
        ]
        if "validation" in datasets:
            ds = datasets["validation"]
            if ds.name is None:
                ds.set_name("validation")
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options("validation")
            hints = worker_node_ids if self._enable_shard_locality else None
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[i]["validation"] = split
        return output


# --------------------------------------------------------------------------------------------
# The training loop (runs on every Ray Train worker)


def _lr_at(step: int, total_steps: int, config: TaggerTrainingConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup, then constant or
    cosine decay to 0 at ``total_steps``."""
    return scheduled_lr(step, config.lr, config.warmup_steps, total_steps, "linear", config.lr_schedule)


def _augment(waveform, target, augment: AugmentConfig, rng: np.random.Generator):
    """``waveform (batch, samples)``, ``target (batch, classes)`` -> augmented copies (same device)."""
    import torch

    batch, samples = waveform.shape
    device, dtype = waveform.device, waveform.dtype
    if augment.gain_db > 0:
        gain_db = rng.uniform(-augment.gain_db, augment.gain_db, size=(batch, 1))
        waveform = waveform * torch.from_numpy(10.0 ** (gain_db / 20.0)).to(device, dtype)
    if augment.time_shift:
        shift = torch.from_numpy(rng.integers(0, samples, size=(batch, 1))).to(device)
        index = (torch.arange(samples, device=device)[None, :] - shift) % samples
        waveform = torch.gather(waveform, 1, index)
    if augment.mixup_alpha > 0 and batch > 1:
        lam = torch.from_numpy(rng.beta(augment.mixup_alpha, augment.mixup_alpha, size=(batch, 1))).to(device, dtype)
        perm = torch.from_numpy(rng.permutation(batch)).to(device)
        waveform = lam * waveform + (1 - lam) * waveform[perm]
        target = lam * target + (1 - lam) * target[perm]
    return waveform, target


def _model_class(head: str):
    from uss_core.models.panns import Cnn14, Cnn14DecisionLevelMax

    return Cnn14DecisionLevelMax if head == "sed" else Cnn14


def _bce(probabilities, target):
    import torch.nn.functional as F

    return F.binary_cross_entropy(probabilities.clamp(1e-7, 1 - 1e-7), target)


def _train_loop(loop_config: dict) -> None:
    """Ray Train worker loop: train, validate, report + checkpoint every epoch."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from uss_core.checkpoints import save_tagger_checkpoint

    config = from_dict(TaggerTrainingConfig, loop_config["config"])
    labels = LabelSet.from_records(loop_config["labels"])
    total_steps = int(loop_config["total_steps"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)  # same initial weights everywhere (DDP broadcasts them anyway)
    model_config = dataclasses.replace(config.model, classes_num=len(labels), head=config.head)
    net = _model_class(config.head)(model_config)
    model = ray.train.torch.prepare_model(net)  # DDP (gloo) when world > 1
    net = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    device = ray.train.torch.get_device()
    autocast = bf16_autocast(device, False, config.cpu_bf16)
    train_shard = ray.train.get_dataset_shard("train")
    validation_shard = ray.train.get_dataset_shard("validation")
    step = 0
    history: list[dict] = []
    for epoch in range(1, config.epochs + 1):
        started = time.monotonic()
        model.train()
        rng = np.random.default_rng([config.seed, epoch, rank])
        loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of losses, batches)
        batches = train_shard.iter_torch_batches(
            batch_size=config.worker_batch_size,
            dtypes=torch.float32,
            local_shuffle_buffer_size=(config.shuffle_buffer or None) if config.shuffle == "local" else None,
            local_shuffle_seed=(config.seed * 1_000_003 + epoch * 1009 + rank) % 2**31,
        )
        for i, batch in enumerate(batches):
            if config.max_steps_per_epoch is not None and i >= config.max_steps_per_epoch:
                break
            waveform, target = _augment(batch["waveform"], batch["target"], config.augment, rng)
            lr = _lr_at(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                probabilities = model(waveform)["clipwise_output"]
            loss = _bce(probabilities.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += torch.tensor([loss.item(), 1.0], dtype=torch.float64)  # .item() syncs a GPU
            step += 1
        if world > 1:
            reduced = loss_sum.to(device)
            dist.all_reduce(reduced)
            loss_sum = reduced.cpu()
        train_seconds = time.monotonic() - started

        # Validation on the unwrapped model: DDP's forward would sync buffers, and the ranks'
        # validation shards differ in size (split without dropping rows).
        net.eval()
        scores, targets = [], []
        with torch.inference_mode():
            for batch in validation_shard.iter_torch_batches(batch_size=config.worker_batch_size, dtypes=torch.float32):
                scores.append(net(batch["waveform"])["clipwise_output"].float().cpu().numpy())
                targets.append(batch["target"].cpu().numpy())
        local = (
            np.concatenate(scores) if scores else np.zeros((0, len(labels)), np.float32),
            np.concatenate(targets) if targets else np.zeros((0, len(labels)), np.float32),
        )
        gathered = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        all_scores = np.concatenate([g[0] for g in gathered])
        all_targets = np.concatenate([g[1] for g in gathered])
        val_map, _ = mean_average_precision(all_scores, all_targets)
        val_loss = float(_bce(torch.from_numpy(all_scores), torch.from_numpy(all_targets))) if len(all_scores) else float("nan")
        metrics = {
            "epoch": epoch,
            "step": step,
            "train_loss": float(loss_sum[0] / max(loss_sum[1], 1.0)),
            "train_batches": int(loss_sum[1]),
            "val_loss": val_loss,
            METRIC: val_map,
            "val_clips": int(len(all_scores)),
            "lr": _lr_at(max(step - 1, 0), total_steps, config),
            "train_seconds": train_seconds,
            "validation_seconds": time.monotonic() - started - train_seconds,
            "epoch_seconds": time.monotonic() - started,
        }
        history.append(metrics)
        with tempfile.TemporaryDirectory(prefix="tagger-ckpt-") as tmp:
            checkpoint = None
            if rank == 0:
                folder = Path(tmp) / "tagger"
                metadata = {**loop_config.get("metadata", {}), **metrics, "head": config.head}
                save_tagger_checkpoint(net, labels, folder, metadata=metadata)
                (folder / HISTORY_FILE).write_text(json.dumps(history, indent=1))
                checkpoint = ray.train.Checkpoint.from_directory(str(folder))
            ray.train.report(metrics, checkpoint=checkpoint)


# --------------------------------------------------------------------------------------------
# Driver


def _epoch_line(metrics: dict, epochs: int) -> str:
    return (
        f"[train_tagger] epoch {metrics['epoch']}/{epochs}: train loss {metrics['train_loss']:.4f} "
        f"({metrics['train_batches']} batches), val loss {metrics['val_loss']:.4f}, "
        f"val mAP {metrics[METRIC]:.4f} on {metrics['val_clips']} clips, lr {metrics['lr']:.2e}, "
        f"{metrics['epoch_seconds']:.1f} s"
    )


@dataclass
class TaggerTrainingResult:
    """What a run produced: the exported checkpoint, per-epoch metrics and the data it read."""

    checkpoint_uri: str
    exported_epoch: int
    exported_val_mAP: float
    history: list[dict]
    dataset: DatasetSummary
    ray_checkpoint: Any  # ray.train.Checkpoint of the exported epoch (a project-format tagger dir)
    wall_seconds: float

    @property
    def final_val_mAP(self) -> float:
        return float(self.history[-1][METRIC]) if self.history else float("nan")

    @property
    def best_val_mAP(self) -> float:
        values = [h[METRIC] for h in self.history if not math.isnan(h[METRIC])]
        return max(values) if values else float("nan")


def export_tagger(ray_checkpoint: Any, out_uri: str, filesystem: Any = None, metadata: dict | None = None) -> str:
    """Write the tagger in ``ray_checkpoint`` to ``out_uri`` (a local folder or ``s3://`` prefix)
    with :func:`~uss_core.checkpoints.save_tagger_checkpoint` (replacing what is there); returns
    ``out_uri``. Remote targets are written locally, then uploaded."""
    from uss_core.checkpoints import load_tagger, read_checkpoint_document, save_tagger_checkpoint, TAGGER_FORMAT_NAME

    with ray_checkpoint.as_directory() as source:
        document = read_checkpoint_document(source, TAGGER_FORMAT_NAME)
        head = document.get("metadata", {}).get("head", "sed")
        tagger, labels = load_tagger(source, sound_event_detection=head == "sed")
    meta = {**document.get("metadata", {}), **(metadata or {})}
    return write_folder(out_uri, lambda path: save_tagger_checkpoint(tagger, labels, path, metadata=meta), filesystem)


def train_tagger(
    config: TaggerTrainingConfig,
    clips_uri: str,
    out_uri: str,
    labels: LabelSet,
    filesystem: Any = None,
    *,
    storage_path: str | os.PathLike | None = None,
    run_name: str | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_summary: Callable[[DatasetSummary], None] | None = None,
) -> TaggerTrainingResult:
    """Train a tagger on the clips at ``clips_uri`` and export it to ``out_uri``.

    Needs a connected Ray. ``storage_path``: where Ray Train keeps its run folder and per-epoch
    checkpoints (a local folder; default ``./ray_results``). ``on_epoch(metrics)`` is called
    after every epoch with rank 0's metrics (epoch, step, train_loss, val_loss, val_mAP, ...);
    it runs in the Ray Train controller process, so it must pickle. ``on_summary`` is called in
    this process once the dataset has been summarised, before training.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.monotonic()
    summary = summarize_clips(clips_uri, len(labels), config, filesystem)
    if on_summary is not None:
        on_summary(summary)
    steps_per_epoch = math.ceil(summary.train_rows_per_epoch / config.num_workers / config.worker_batch_size)
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    datasets = training_datasets(clips_uri, summary, config, filesystem)
    loop_config = {
        "config": to_dict(config),
        "labels": labels.to_records(),
        "total_steps": steps_per_epoch * config.epochs,
        "metadata": {"clips_uri": clips_uri, "train_clips": summary.train_clips, "validation_clips": summary.validation_clips},
    }
    run_name = run_name or f"train_tagger-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        datasets=datasets,
        dataset_config=_TaggerDataConfig(datasets_to_split="all"),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(Path(storage_path or "ray_results").resolve()),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=METRIC, checkpoint_score_order="max"
            ),
            callbacks=[ReportCallback(functools.partial(_epoch_line, epochs=config.epochs), on_epoch, METRIC, "train_tagger")],
        ),
    )
    result = trainer.fit()
    kept = [(c, m) for c, m in (result.best_checkpoints or []) if c is not None]
    if not kept:
        raise RuntimeError("tagger training ended without a checkpoint")
    if config.export == "best":
        checkpoint, metrics = max(kept, key=lambda cm: (np.nan_to_num(cm[1].get(METRIC, np.nan), nan=-1.0), cm[1]["epoch"]))
    else:
        checkpoint, metrics = max(kept, key=lambda cm: cm[1]["epoch"])
    history = _history(result)
    export_tagger(checkpoint, out_uri, filesystem, metadata={"exported": config.export})
    return TaggerTrainingResult(
        checkpoint_uri=out_uri,
        exported_epoch=int(metrics["epoch"]),
        exported_val_mAP=float(metrics[METRIC]),
        history=history,
        dataset=summary,
        ray_checkpoint=checkpoint,
        wall_seconds=time.monotonic() - started,
    )


def _history(result: Any) -> list[dict]:
    """Per-epoch metrics of a run, from the latest checkpoint's history file."""
    with result.checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / HISTORY_FILE).read_text())


__all__ = [
    "AugmentConfig",
    "DatasetSummary",
    "TaggerTrainingConfig",
    "TaggerTrainingResult",
    "average_precision",
    "export_tagger",
    "is_validation",
    "mean_average_precision",
    "oversample_factors",
    "repeat_counts",
    "summarize_clips",
    "train_tagger",
    "training_datasets",
]
