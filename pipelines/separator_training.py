"""Training the query-conditioned separator (ResUNet + FiLM) with Ray Train and Ray Data.

Data (local or ``s3://``), streamed through Ray Data into a
:class:`ray.train.torch.TorchTrainer` (gloo DDP on CPU, NCCL on GPU): every worker reads its own
shard (``ray.train.get_dataset_shard``), no worker holds a copy of the dataset.

- **fixed mixtures** (default): the mixing stage's Parquet (:data:`~pipelines.schemas.MIXTURE_SCHEMA`):
  input ``mixture``, target ``target``, condition from ``condition_at_soft`` /
  ``condition_embedding`` / ``target_class_index`` as the query net needs;
- **remix** (``remix: true``): fresh mixtures every step from the anchors dataset
  (:data:`~pipelines.schemas.ANCHOR_SCHEMA`), restricted to the anchors the mixing stage used as
  training targets (so held-out evaluation clips stay out). Each worker batch of anchors is
  paired within itself (:func:`remix_batch`): every anchor is a target, its partner a random
  other anchor of the batch whose clip shares no label with it, energy-matched as the mixing
  stage does (:func:`pipelines.mixing.mix`). Endless fresh pairings of the same anchors.

The recipe (defaults: the reference's): L1 on the waveform (``loss: l1_wav``; ``l1_wav_spec``
adds L1 on the STFT magnitude; ``snr`` is minus the signal-to-error ratio, the paper's SDR),
AdamW (lr 1e-3, amsgrad, no weight decay), the reference's staged constant warm-up (lr x 0.001,
0.01, 0.1 for ``warmup_steps`` steps each), constant after. Mixed precision (bfloat16 autocast)
on GPU. The optimizer gets the separator's parameters *and* the query net's trainable ones: the
learnable adaptor (``condition_type: adaptive``) really trains (the reference passes only the
separator's, so its adaptor never learns). The query net's Cnn14 is frozen and not run in
training: its outputs on the target anchor are precomputed by the mining stage (``condition_*``
columns), from the same tagger the checkpoint carries (``condition_tagger``), so inference by
class or example sees the same conditions.

Checkpoints: every ``checkpoint_every`` steps (and at the end) rank 0 writes a Ray Train
checkpoint holding the project's separator checkpoint (:func:`uss_core.checkpoints.save_checkpoint`)
plus ``training_state.pt`` (optimizer state, step) and the metrics so far. Rerunning with the same
``run_name`` and ``storage_path`` resumes from the latest one (Ray Train restores the run; the
loop reloads weights, optimizer and step), so a killed run continues with the same step count
(the data stream restarts at a fresh shuffle, the way an epoch boundary would).

Validation: every ``eval_every`` steps rank 0 scores the evaluation set (``jobs.mix --eval-out``)
with :mod:`pipelines.evaluation` (precomputed conditions) and reports the class-averaged
``val_sdri`` / ``val_si_sdri``.

Use::

    config = load_yaml(SeparatorTrainingConfig, "jobs/presets/separator-cpu-small.yaml")
    result = train_separator(config, data, "runs/separator", labels)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn as nn

from pipelines.mixing import mix
from pipelines.model_store import local_checkpoint
from pipelines.schemas import absolute_uri, count_rows, list_column_to_numpy, list_parquet_files, read_table, resolve_filesystem
from pipelines.training_common import (
    LR_SCHEDULES, WARMUPS, ReportCallback, bf16_autocast, ray_storage, scheduled_lr, worker_threads, write_folder,
)
from uss_core.config import from_dict, to_dict
from uss_core.errors import ConfigError
from uss_core.models.query_nets import CONDITION_TYPES, QueryNetConfig
from uss_core.models.resunet import ResUNetConfig
from uss_core.ontology import LabelSet

LOSSES = ("l1_wav", "l1_wav_spec", "snr")
SNR_LOSS_EPS = 1e-8  # in both energies of the snr loss: a silent target and estimate score 0 dB, not NaN
STATE_FILE = "training_state.pt"  # optimizer state and step, beside the separator checkpoint
HISTORY_FILE = "history.json"  # metrics reported so far
SEPARATOR_DIR = "separator"  # the project-format checkpoint inside each Ray Train checkpoint
VAL_METRIC = "val_sdri"


# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class SeparatorTrainingConfig:
    """Everything a separator training run needs, data locations and labels aside.

    Model: ``separator`` (its ``condition_size`` is set from the query net), ``condition_type``
    (``hard``, ``at_soft``, ``embedding``, ``adaptive``; adaptive's MLP: ``adaptor_bottleneck``,
    ``adaptor_hidden``, ``adaptor_outputs``), ``segment_samples`` (the data's example length, which
    must match), ``crop_samples`` (train on a random crop of that many samples of every example:
    cheaper steps, so more pairings per second; None: the whole example). ``batch_size`` is global (split evenly over ``num_workers``).
    ``cpus_per_worker``: the Ray resource each worker reserves (keep the total below the
    cluster's CPUs so Ray Data keeps some to read with); ``torch_threads``: intra-op threads per
    worker (None: one per reserved CPU, at least one). ``use_gpu``: one GPU per worker (NCCL),
    ``mixed_precision`` then autocasts to bfloat16. ``cpu_bf16``: bfloat16 autocast on CPU workers
    too, where the CPU has AMX (elsewhere bf16 is slower than fp32, so those workers stay in
    fp32; :func:`uss_core.separation.cpu_has_amx_bf16`).
    """

    separator: ResUNetConfig = field(default_factory=ResUNetConfig)
    condition_type: str = "at_soft"
    adaptor_bottleneck: str = "at_soft"
    adaptor_hidden: int = 2048
    adaptor_outputs: int = 2048
    segment_samples: int = 64000
    crop_samples: int | None = None
    max_steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: str = "staged"
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    loss: str = "l1_wav"
    spec_loss_weight: float = 1.0
    grad_clip_norm: float | None = None
    remix: bool = False
    remix_partner_gain_db: float = 0.0
    shuffle_buffer: int = 64
    checkpoint_every: int = 200
    eval_every: int = 200
    eval_batch_size: int = 16
    log_every: int = 10
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    mixed_precision: bool = True
    cpu_bf16: bool = False
    torch_threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.condition_type in CONDITION_TYPES, f"condition_type must be one of {CONDITION_TYPES}"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.num_workers >= 1, "num_workers must be >= 1"),
            (self.batch_size >= self.num_workers, f"batch_size is global: it must be >= num_workers ({self.num_workers})"),
            (self.batch_size % self.num_workers == 0, f"batch_size must be a multiple of num_workers ({self.num_workers})"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.warmup in WARMUPS, f"warmup must be one of {WARMUPS}"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}"),
            (self.spec_loss_weight >= 0, "spec_loss_weight must be >= 0"),
            (self.grad_clip_norm is None or self.grad_clip_norm > 0, "grad_clip_norm must be > 0 or null"),
            (self.remix_partner_gain_db >= 0, "remix_partner_gain_db must be >= 0"),
            (self.segment_samples >= self.separator.n_fft, f"segment_samples must be >= n_fft ({self.separator.n_fft})"),
            (self.crop_samples is None or self.separator.n_fft <= self.crop_samples <= self.segment_samples,
             f"crop_samples must be null or between n_fft ({self.separator.n_fft}) and segment_samples ({self.segment_samples})"),
            (self.checkpoint_every >= 1 and self.eval_every >= 1 and self.log_every >= 1,
             "checkpoint_every, eval_every and log_every must be >= 1"),
            (self.cpus_per_worker > 0, "cpus_per_worker must be > 0"),
            (self.torch_threads is None or self.torch_threads >= 1, "torch_threads must be >= 1 or null"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"SeparatorTrainingConfig: {message}")

    @property
    def worker_batch_size(self) -> int:
        return self.batch_size // self.num_workers

    def query_net_config(self, tagger: Any) -> QueryNetConfig:
        """The query net for a condition tagger config (``Cnn14Config``) of the run's label set."""
        return QueryNetConfig(
            condition_type=self.condition_type,
            tagger=tagger,
            adaptor_bottleneck=self.adaptor_bottleneck,
            adaptor_hidden=self.adaptor_hidden,
            adaptor_outputs=self.adaptor_outputs,
        )


@dataclass(frozen=True)
class TrainingData:
    """Where a run reads: the fixed mixtures (also the list of training anchors, for remix), the
    anchors (remix only) and the evaluation set (optional)."""

    mixtures_uri: str
    anchors_uri: str | None = None
    eval_uri: str | None = None

    def __post_init__(self) -> None:
        for name in ("mixtures_uri", "anchors_uri", "eval_uri"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, absolute_uri(getattr(self, name)))


@dataclass(frozen=True)
class DatasetSummary:
    """Sizes of what a run reads (logged to MLflow)."""

    mixtures: int
    train_anchors: int  # distinct target anchors of the mixtures (remix draws from these)
    eval_pairs: int
    segment_samples: int


# --------------------------------------------------------------------------------------------
# Batches -> model inputs (pure functions)


def condition_column(condition_type: str, adaptor_bottleneck: str) -> str | None:
    """The data column holding a query net's bottleneck (None for ``hard``: a one-hot of the class)."""
    bottleneck = adaptor_bottleneck if condition_type == "adaptive" else condition_type
    return None if bottleneck == "hard" else f"condition_{bottleneck}"


def bottleneck_rows(batch: dict[str, np.ndarray], column: str | None, num_classes: int, class_key: str) -> np.ndarray:
    """``(rows, bottleneck_size)`` float32: the ``column`` rows, or one-hot rows of ``class_key``."""
    if column is None:
        return np.eye(num_classes, dtype=np.float32)[np.asarray(batch[class_key], dtype=np.int64)]
    return np.stack([np.asarray(v, dtype=np.float32) for v in batch[column]])


def remix_batch(
    anchors: dict[str, np.ndarray], rng: np.random.Generator, partner_gain_db: float = 0.0
) -> dict[str, np.ndarray]:
    """Fresh two-source mixtures from a batch of anchors (numpy batch of ``ANCHOR_SCHEMA`` columns).

    Every anchor is a target; its partner is drawn uniformly from the other anchors of the batch
    whose clip labels are disjoint from its own (an anchor with none is left out), rescaled to
    the target's energy (:func:`pipelines.mixing.mix`), then by a random gain uniform in
    ``[-partner_gain_db, +partner_gain_db]`` dB. Returns ``mixture``, ``target`` ``(rows,
    samples)`` float32, ``rows`` (the target anchors' row indexes) and ``partners``.
    """
    waves = [np.asarray(w, dtype=np.float32) for w in anchors["waveform"]]
    labels = [frozenset(int(i) for i in row) for row in anchors["clip_label_indexes"]]
    mixtures, targets, rows, partners = [], [], [], []
    for i, own in enumerate(labels):
        candidates = [j for j in range(len(waves)) if j != i and not (labels[j] & own) and waves[j].shape == waves[i].shape]
        if not candidates:
            continue
        j = candidates[int(rng.integers(len(candidates)))]
        mixture, _ = mix(waves[i], [waves[j]])
        if partner_gain_db > 0:  # after the energy match, which would undo it
            gain = np.float32(10.0 ** (rng.uniform(-partner_gain_db, partner_gain_db) / 20.0))
            mixture = waves[i] + (mixture - waves[i]) * gain
        mixtures.append(mixture)
        targets.append(waves[i])
        rows.append(i)
        partners.append(j)
    samples = waves[0].size if waves else 0
    return {
        "mixture": np.stack(mixtures) if mixtures else np.zeros((0, samples), np.float32),
        "target": np.stack(targets) if targets else np.zeros((0, samples), np.float32),
        "rows": np.asarray(rows, dtype=np.int64),
        "partners": np.asarray(partners, dtype=np.int64),
    }


def random_crop(mixture: np.ndarray, target: np.ndarray, crop_samples: int | None, rng: np.random.Generator):
    """The same random window of ``crop_samples`` from each row of ``mixture`` and ``target``
    ``(rows, samples)`` (a fresh offset per row); unchanged when ``crop_samples`` is None or the rows
    are no longer."""
    rows, samples = mixture.shape
    if crop_samples is None or crop_samples >= samples:
        return mixture, target
    offsets = rng.integers(0, samples - crop_samples + 1, size=rows)
    index = offsets[:, None] + np.arange(crop_samples)
    return np.take_along_axis(mixture, index, axis=1), np.take_along_axis(target, index, axis=1)


def separation_loss(estimate, target, kind: str, spec_weight: float = 1.0, n_fft: int = 2048, hop: int = 320):
    """``estimate, target (batch, samples)`` -> scalar loss: L1 on the waveform (``l1_wav``), plus
    ``spec_weight`` times L1 on the STFT magnitude (``l1_wav_spec``); or the batch mean of
    ``-10 log10(|target|^2 / |target - estimate|^2)`` (``snr``: minus the SDR the paper reports,
    so every example counts by its ratio, not its level)."""
    import torch

    if kind == "snr":
        signal = torch.sum(target**2, dim=-1) + SNR_LOSS_EPS
        error = torch.sum((target - estimate) ** 2, dim=-1) + SNR_LOSS_EPS
        return -10 * torch.mean(torch.log10(signal / error))
    loss = torch.mean(torch.abs(estimate - target))
    if kind == "l1_wav_spec":
        window = torch.hann_window(n_fft, device=estimate.device, dtype=torch.float32)

        def magnitude(x):
            return torch.stft(x.float(), n_fft, hop, window=window, center=True, return_complex=True).abs()

        loss = loss + spec_weight * torch.mean(torch.abs(magnitude(estimate) - magnitude(target)))
    return loss


# --------------------------------------------------------------------------------------------
# Datasets


def _files(uri: str, filesystem: Any, what: str) -> tuple[Any, list[str]]:
    fs, path = resolve_filesystem(uri, filesystem)
    files = list_parquet_files(fs, path)
    if not files:
        raise ConfigError(f"{uri}: no Parquet files; expected {what}")
    return fs, files


def _training_anchor_ids(mixtures_uri: str, filesystem: Any) -> list[str]:
    table = read_table(mixtures_uri, columns=["target_anchor_id"], filesystem=filesystem)
    return sorted(set(table.column("target_anchor_id").to_pylist()))


def summarize_data(data: TrainingData, labels: LabelSet, config: SeparatorTrainingConfig, filesystem: Any = None) -> DatasetSummary:
    """Count the data and check it fits the run (segment length, class indexes): small columns only."""
    mixtures = read_table(data.mixtures_uri, columns=["target_anchor_id", "target_class_index"], filesystem=filesystem)
    if mixtures.num_rows == 0:
        raise ConfigError(f"{data.mixtures_uri}: the mixtures dataset has no rows; run `python -m jobs.mix` first")
    top = pc.max(mixtures.column("target_class_index")).as_py()
    if top >= len(labels):
        raise ConfigError(
            f"{data.mixtures_uri}: class index {top} is outside the label set ({len(labels)} classes); "
            "train with the label set the clips were ingested with (--labels-csv)"
        )
    fs, files = _files(data.mixtures_uri, filesystem, "a mixtures dataset (the mixing stage's output)")
    import pyarrow.parquet as pq

    with fs.open_input_file(files[0]) as f:
        first = pq.ParquetFile(f).read_row_group(0, columns=["mixture"]).column("mixture")
    samples = len(first[0]) if len(first) else 0
    if samples != config.segment_samples:
        raise ConfigError(
            f"{data.mixtures_uri}: mixtures have {samples} samples but the preset's segment_samples is "
            f"{config.segment_samples}; set segment_samples to the mined anchor length"
        )
    anchors = len(set(mixtures.column("target_anchor_id").to_pylist()))
    if config.remix and not data.anchors_uri:
        raise ConfigError("remix needs the anchors dataset: give --anchors (the mining stage's output)")
    eval_pairs = count_rows(data.eval_uri, filesystem) if data.eval_uri else 0
    return DatasetSummary(mixtures.num_rows, anchors, eval_pairs, samples)


def _keep_anchors(batch: pa.Table, keep: pa.Array) -> pa.Table:
    return batch.filter(pc.is_in(batch["anchor_id"], value_set=keep))


def training_dataset(data: TrainingData, config: SeparatorTrainingConfig, filesystem: Any = None):
    """The lazy, streamed Ray dataset the workers train on: mixture rows, or (remix) training
    anchor rows; Parquet files in a new seeded order each pass, rows shuffled on the worker."""
    import ray.data
    from ray.data import FileShuffleConfig

    shuffle = FileShuffleConfig(seed=config.seed, reseed_after_execution=True)
    column = condition_column(config.condition_type, config.adaptor_bottleneck)
    if config.remix:
        fs, files = _files(data.anchors_uri, filesystem, "an anchors dataset (the mining stage's output)")
        keep = pa.array(_training_anchor_ids(data.mixtures_uri, filesystem))
        columns = ["anchor_id", "class_index", "clip_label_indexes", "waveform"] + ([column] if column else [])
        ds = ray.data.read_parquet(files, filesystem=fs, shuffle=shuffle).select_columns(columns)
        ds = ds.map_batches(_keep_anchors, fn_kwargs={"keep": keep}, batch_format="pyarrow")
    else:
        fs, files = _files(data.mixtures_uri, filesystem, "a mixtures dataset (the mixing stage's output)")
        columns = ["mixture", "target", "target_class_index"] + ([column] if column else [])
        ds = ray.data.read_parquet(files, filesystem=fs, shuffle=shuffle).select_columns(columns)
    ds.context.enable_progress_bars = False  # one bar per pass over the data: noise; [train] lines report progress
    return ds


# --------------------------------------------------------------------------------------------
# The training loop (runs on every Ray Train worker)


def _build_model(loop_config: dict):
    """The separation model with the condition tagger's weights (or random weights for ``hard``
    without a tagger), the same on every rank (seeded; DDP broadcasts rank 0's anyway)."""
    import ray
    import torch

    from uss_core.checkpoints import SeparatorModel, SeparatorModelConfig

    model_config = from_dict(SeparatorModelConfig, loop_config["model"])
    torch.manual_seed(int(loop_config["seed"]))
    model = SeparatorModel(model_config)
    tagger_state = ray.get(loop_config["tagger_state"]) if loop_config.get("tagger_state") is not None else None
    if tagger_state is not None:
        target = model.query_net.base if model.query_net.base is not None else model.tagger
        target.load_state_dict(tagger_state)
    return model


class _TrainingForward(nn.Module):
    """What DDP wraps: ``forward(mixture (batch, samples), bottleneck (batch, bottleneck_size))
    -> estimate (batch, samples)``, the query net's adaptor then the separator (the frozen
    Cnn14 is not run: bottlenecks are precomputed)."""

    def __init__(self, net) -> None:
        super().__init__()
        self.net = net

    def forward(self, mixture: torch.Tensor, bottleneck: torch.Tensor) -> torch.Tensor:
        condition = self.net.query_net.adapt(bottleneck)
        return self.net.ss_model(mixture[:, None, :], condition)[:, 0]


def _save_training_checkpoint(folder: Path, net, labels: LabelSet, optimizer, step: int, history: list, metadata: dict):
    import torch

    from uss_core.checkpoints import save_checkpoint

    save_checkpoint(net, labels, folder / SEPARATOR_DIR, metadata={**metadata, "step": step})
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, folder / STATE_FILE)
    (folder / HISTORY_FILE).write_text(json.dumps(history, indent=1))


def _restore(checkpoint, net, optimizer) -> tuple[int, list]:
    """Load weights, optimizer state and step from a Ray Train checkpoint of this loop."""
    import torch
    from safetensors.torch import load_file

    from uss_core.checkpoints import WEIGHTS_FILE

    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        net.load_state_dict(load_file(str(folder / SEPARATOR_DIR / WEIGHTS_FILE)))
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        history = json.loads((folder / HISTORY_FILE).read_text())
    return int(state["step"]), history


def _validate(net, loop_config: dict, labels: LabelSet, batch_size: int) -> dict:
    from pipelines.evaluation import open_evaluation_set, score_evaluation_set, summarise

    started = time.monotonic()
    evaluation_set = open_evaluation_set(loop_config["eval_uri"], labels, loop_config.get("filesystem"))
    results = score_evaluation_set(net, evaluation_set, "dataset", batch_size)
    _, averages = summarise(results, labels)
    return {
        "val_sdri": averages["sdri"],
        "val_si_sdri": averages["si_sdri"],
        "val_irm_sdri": averages["irm_sdri"],
        "val_pairs": len(results.pair_ids),
        "val_seconds": time.monotonic() - started,
    }


def _train_loop(loop_config: dict) -> None:
    """Ray Train worker loop: stream batches, step, report metrics; checkpoint and validate on rank 0."""
    import ray.train
    import ray.train.torch
    import torch

    config = from_dict(SeparatorTrainingConfig, loop_config["config"])
    labels = LabelSet.from_records(loop_config["labels"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(worker_threads(config.torch_threads, config.cpus_per_worker))
    device = ray.train.torch.get_device()
    net = _build_model(loop_config)
    column = condition_column(config.condition_type, config.adaptor_bottleneck)
    # The separator and the query net's trainable part (the adaptor); the frozen Cnn14 is not.
    params = list(net.ss_model.parameters()) + net.query_net.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=config.weight_decay, amsgrad=True)
    step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        step, history = _restore(checkpoint, net, optimizer)
        print(f"[train] rank {rank}: resumed at step {step}", flush=True)
    # To the device; DDP when world > 1. The reference's decoder blocks carry a bn2 and a FiLM beta2
    # that their forward never uses (kept for state-dict compatibility): DDP must expect them unused.
    model = ray.train.torch.prepare_model(
        _TrainingForward(net), parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    net.train()
    autocast = bf16_autocast(device, config.use_gpu and config.mixed_precision, config.cpu_bf16)
    shard = ray.train.get_dataset_shard("train")
    rng = np.random.default_rng([config.seed, rank, step])  # a resumed run draws fresh pairings
    window = {"loss": 0.0, "batches": 0, "examples": 0, "started": time.monotonic()}
    num_classes = len(labels)

    def report(metrics: dict, save: bool) -> None:
        with tempfile.TemporaryDirectory(prefix="separator-ckpt-") as tmp:
            ckpt = None
            if save and rank == 0:
                _save_training_checkpoint(Path(tmp), net, labels, optimizer, step, history, loop_config["metadata"])
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    if step >= config.max_steps:  # restored from a finished run: hand its final state back
        report({**(history[-1] if history else {}), "step": step}, True)
        return
    while step < config.max_steps:
        batches = shard.iter_batches(
            batch_size=config.worker_batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=config.shuffle_buffer or None,
            local_shuffle_seed=int(rng.integers(2**31)),
            drop_last=True,
        )
        seen = 0
        for batch in batches:
            seen += 1
            if config.remix:
                mixed = remix_batch(batch, rng, config.remix_partner_gain_db)
                if not len(mixed["rows"]):
                    continue
                mixture, target = mixed["mixture"], mixed["target"]
                picked = {k: v[mixed["rows"]] for k, v in batch.items()}
                bottleneck = bottleneck_rows(picked, column, num_classes, "class_index")
            else:
                mixture = np.stack([np.asarray(v, np.float32) for v in batch["mixture"]])
                target = np.stack([np.asarray(v, np.float32) for v in batch["target"]])
                bottleneck = bottleneck_rows(batch, column, num_classes, "target_class_index")
            mixture, target = random_crop(mixture, target, config.crop_samples, rng)
            mixture_t = torch.from_numpy(mixture).to(device)
            target_t = torch.from_numpy(target).to(device)
            lr = scheduled_lr(step, config.lr, config.warmup_steps, config.max_steps, config.warmup, config.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                estimate = model(mixture_t, torch.from_numpy(bottleneck).to(device))
                loss = separation_loss(estimate.float(), target_t, config.loss, config.spec_loss_weight,
                                       config.separator.n_fft, config.separator.hop_length)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip_norm)
            optimizer.step()
            step += 1
            window["loss"] += float(loss.detach())
            window["batches"] += 1
            window["examples"] += len(mixture)
            last = step >= config.max_steps
            do_eval = bool(loop_config.get("eval_uri")) and (step % config.eval_every == 0 or last)
            do_save = step % config.checkpoint_every == 0 or last
            if step % config.log_every == 0 or do_eval or do_save:
                elapsed = time.monotonic() - window["started"]
                metrics = {
                    "step": step,
                    "train_loss": window["loss"] / max(window["batches"], 1),
                    "lr": lr,
                    "examples_per_second": window["examples"] / max(elapsed, 1e-9),
                    "seconds_per_step": elapsed / max(window["batches"], 1),
                }
                if do_eval and rank == 0:
                    metrics.update(_validate(net, loop_config, labels, config.eval_batch_size))
                if rank == 0:
                    history.append(metrics)
                report(metrics, do_save)
                window = {"loss": 0.0, "batches": 0, "examples": 0, "started": time.monotonic()}
            if last:
                break
        if seen == 0:
            raise ConfigError(
                f"worker {rank} got no training batch of {config.worker_batch_size}: the dataset is smaller than "
                "one batch per worker; lower batch_size or make more mixtures"
            )


# --------------------------------------------------------------------------------------------
# Driver


def _report_line(metrics: dict, max_steps: int) -> str:
    line = (
        f"[train] step {metrics['step']}/{max_steps}: loss {metrics['train_loss']:.4f}, lr {metrics['lr']:.1e}, "
        f"{metrics['seconds_per_step']:.2f} s/step"
    )
    if VAL_METRIC in metrics:
        line += (
            f"; validation SDRi {metrics['val_sdri']:.2f} dB, SI-SDRi {metrics['val_si_sdri']:.2f} dB "
            f"(IRM {metrics['val_irm_sdri']:.2f} dB) on {metrics['val_pairs']} pairs"
        )
    return line


@dataclass
class SeparatorTrainingResult:
    """What a run produced: the exported checkpoint, the reported metrics and the data it read."""

    checkpoint_uri: str
    steps: int
    history: list[dict]
    dataset: DatasetSummary
    ray_checkpoint: Any  # the final ray.train.Checkpoint (separator/ + training_state.pt)
    wall_seconds: float

    def last(self, name: str) -> float:
        """The latest reported value of metric ``name`` (NaN if never reported)."""
        values = [h[name] for h in self.history if name in h]
        return float(values[-1]) if values else float("nan")


def separator_model_config(config: SeparatorTrainingConfig, labels: LabelSet, tagger_config: Any | None):
    """The :class:`~uss_core.checkpoints.SeparatorModelConfig` a run trains.

    ``tagger_config``: the condition tagger's ``Cnn14Config`` (required unless ``hard``). A ``hard``
    model keeps it as its separate activity tagger (segments are gated by it at inference).
    """
    from uss_core.checkpoints import SeparatorModelConfig
    from uss_core.models.panns import Cnn14Config

    if tagger_config is None and config.condition_type != "hard":
        raise ConfigError(
            f"a '{config.condition_type}' separator needs the condition tagger its anchors were mined with "
            "(--condition-tagger): the checkpoint carries it as the query net"
        )
    if tagger_config is not None and tagger_config.classes_num != len(labels):
        raise ConfigError(f"the condition tagger predicts {tagger_config.classes_num} classes, the label set has {len(labels)}")
    query_tagger = tagger_config or dataclasses.replace(Cnn14Config(), classes_num=len(labels))
    query_net = config.query_net_config(query_tagger)
    return SeparatorModelConfig(
        separator=dataclasses.replace(config.separator, condition_size=query_net.condition_size),
        query_net=query_net,
        tagger=tagger_config if config.condition_type == "hard" else None,
        segment_seconds=config.segment_samples / 32000,
    )


def load_condition_tagger(uri: str | None, labels: LabelSet, filesystem: Any = None):
    """The condition tagger (a Cnn14 clip tagger) at ``uri``, checked against ``labels``; None if no ``uri``."""
    if not uri:
        return None
    from pipelines.anchors import load_tagger_from

    tagger, tagger_labels = load_tagger_from(uri, False, labels, filesystem)
    if list(tagger_labels.mids) != list(labels.mids):
        raise ConfigError(
            f"{uri}: the condition tagger's label set is not the run's ({len(tagger_labels)} vs {len(labels)} classes "
            "or another order); use the tagger the anchors were mined with and its labels CSV"
        )
    return tagger


def train_separator(
    config: SeparatorTrainingConfig,
    data: TrainingData,
    out_uri: str,
    labels: LabelSet,
    condition_tagger: str | None = None,
    filesystem: Any = None,
    *,
    storage_path: str | os.PathLike | None = None,
    run_name: str | None = None,
    on_report: Callable[[dict], None] | None = None,
    on_summary: Callable[[DatasetSummary], None] | None = None,
) -> SeparatorTrainingResult:
    """Train a separator on ``data`` and export it (project format) to ``out_uri``.

    Needs a connected Ray. ``condition_tagger``: the Cnn14 tagger checkpoint the anchors'
    conditions were computed with (required unless ``hard``). ``storage_path``: Ray Train's run
    storage (a local folder or ``s3://`` prefix; default ``./ray_results``); a rerun with the same
    ``run_name`` there resumes from the latest checkpoint. ``on_report(metrics)``: called with rank
    0's metrics of every report, in the Ray Train controller (so it must pickle); ``on_summary``:
    called here once the data is counted.
    """
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from uss_core.checkpoints import load_model, read_checkpoint_document, save_checkpoint

    started = time.monotonic()
    summary = summarize_data(data, labels, config, filesystem)
    if on_summary is not None:
        on_summary(summary)
    tagger = load_condition_tagger(condition_tagger, labels, filesystem)
    model_config = separator_model_config(config, labels, tagger.config if tagger is not None else None)
    storage, storage_fs = ray_storage(storage_path or "ray_results", filesystem)
    loop_config = {
        "config": to_dict(config),
        "model": to_dict(model_config),
        "labels": labels.to_records(),
        "seed": config.seed,
        "tagger_state": ray.put(tagger.state_dict()) if tagger is not None else None,
        "eval_uri": data.eval_uri,
        "filesystem": filesystem,
        "metadata": {"mixtures_uri": data.mixtures_uri, "anchors_uri": data.anchors_uri, "remix": config.remix,
                     "condition_tagger": condition_tagger},
    }
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        datasets={"train": training_dataset(data, config, filesystem)},
        run_config=RunConfig(
            name=run_name or f"train_separator-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[ReportCallback(functools.partial(_report_line, max_steps=config.max_steps), on_report,
                                      "train_loss", "train")],
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("separator training ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        history = json.loads((Path(folder) / HISTORY_FILE).read_text())
        steps = int(torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)["step"])
        # Re-saved through the checkpoint writer (atomic replacement of what is at out_uri).
        loaded = load_model(Path(folder) / SEPARATOR_DIR)
        metadata = read_checkpoint_document(Path(folder) / SEPARATOR_DIR)["metadata"]
        write_folder(out_uri, lambda path: save_checkpoint(loaded.model, loaded.labels, path, metadata), filesystem)
    return SeparatorTrainingResult(out_uri, steps, history, summary, result.checkpoint, time.monotonic() - started)


__all__ = [
    "DatasetSummary",
    "LOSSES",
    "SeparatorTrainingConfig",
    "SeparatorTrainingResult",
    "TrainingData",
    "bottleneck_rows",
    "condition_column",
    "load_condition_tagger",
    "remix_batch",
    "separation_loss",
    "separator_model_config",
    "summarize_data",
    "train_separator",
    "training_dataset",
]
