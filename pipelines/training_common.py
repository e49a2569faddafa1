"""Plumbing shared by the Ray Train jobs (tagger and separator training).

- :func:`scheduled_lr`: the learning rate at an optimizer step (warm-up, then constant or
  cosine), a pure function of the step, so a resumed run needs only its step count;
- :func:`ray_storage`: a local folder or ``s3://`` URI as Ray Train's ``storage_path`` and
  ``storage_filesystem``;
- :func:`write_folder`: write a checkpoint folder to a local path or an ``s3://`` prefix;
- :class:`ReportCallback`: prints each report of rank 0 and hands its metrics on (MLflow);
- :func:`bf16_autocast`: whether a worker trains under bfloat16 autocast.
- :func:`worker_threads`: a worker's intra-op threads.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs as pafs
from ray.train import UserCallback

from pipelines.schemas import resolve_filesystem
from uss_core.errors import ConfigError

WARMUPS = ("linear", "staged")
LR_SCHEDULES = ("constant", "cosine")


def scheduled_lr(
    step: int,
    lr: float,
    warmup_steps: int,
    total_steps: int,
    warmup: str = "linear",
    schedule: str = "constant",
) -> float:
    """Learning rate at optimizer step ``step`` (0-based).

    Warm-up over the first steps (none if ``warmup_steps`` is 0):

    - ``"linear"``: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps``;
    - ``"staged"``: the USS reference's ``constant_warm_up``: ``lr`` times 0.001, 0.01 and 0.1
      for ``warmup_steps`` steps each (``3 * warmup_steps`` in all).

    After it, ``"constant"`` keeps ``lr``; ``"cosine"`` decays it to 0 at ``total_steps``.
    """
    if warmup not in WARMUPS:
        raise ConfigError(f"warm-up must be one of {WARMUPS}, got {warmup!r}")
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    warmup_end = warmup_steps * (3 if warmup == "staged" else 1)
    if step < warmup_end:
        if warmup == "linear":
            return lr * (step + 1) / warmup_steps
        return lr * 10.0 ** (step // warmup_steps - 3)
    if schedule == "cosine":
        span = max(1, total_steps - warmup_end)
        progress = min(1.0, (step - warmup_end) / span)
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


def worker_threads(torch_threads: int | None, cpus_per_worker: float) -> int:
    """Intra-op threads of a training worker: ``torch_threads``, else one per CPU it reserves (at
    least one), as Ray itself sets them."""
    return torch_threads or max(1, int(cpus_per_worker))


def bf16_autocast(device: Any, gpu_mixed_precision: bool, cpu_bf16: bool) -> bool:
    """Whether a training worker on ``device`` (a ``torch.device``) runs its forward in bfloat16
    autocast: on a GPU if ``gpu_mixed_precision``; on a CPU if ``cpu_bf16`` and the CPU computes
    bf16 in AMX tiles (:func:`uss_core.separation.cpu_has_amx_bf16`; on other CPUs bf16 is
    slower than fp32, so fp32 stays)."""
    from uss_core.separation import cpu_has_amx_bf16

    if device.type == "cuda":
        return gpu_mixed_precision
    return cpu_bf16 and device.type == "cpu" and cpu_has_amx_bf16()


def ray_storage(uri: str | os.PathLike, filesystem: Any = None) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``.

    A local path becomes an absolute path (no filesystem). A remote URI (``s3://bucket/prefix``)
    becomes ``"bucket/prefix"`` and a pyarrow filesystem: ``filesystem`` (pyarrow or fsspec,
    e.g. an ``s3fs.S3FileSystem`` with its endpoint) or one from the URI and the standard AWS
    environment. Ray refuses an ``s3://`` path together with a filesystem, hence the split.
    """
    fs, path = resolve_filesystem(str(uri), filesystem)
    if isinstance(fs, pafs.LocalFileSystem):
        return path, None
    return path, fs


def write_folder(out_uri: str, write: Callable[[Path], Any], filesystem: Any = None) -> str:
    """Write a folder to ``out_uri`` (a local path or a remote prefix such as ``s3://...``).

    ``write(path)`` creates the folder at ``path`` (e.g. ``save_checkpoint``, which replaces it
    atomically). A remote target is written to a temporary folder, then uploaded over what is
    there. Returns ``out_uri``.
    """
    fs, path = resolve_filesystem(out_uri, filesystem)
    if isinstance(fs, pafs.LocalFileSystem):
        write(Path(path))
        return out_uri
    with tempfile.TemporaryDirectory(prefix="uss-export-") as tmp:
        local = Path(tmp) / "folder"
        write(local)
        fs.delete_dir_contents(path, missing_dir_ok=True)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return out_uri


class ReportCallback(UserCallback):
    """Runs in the Ray Train controller (an actor on the driver's node): for every report of rank 0
    that has ``required_key``, prints ``format_line(metrics)`` and hands the metrics to
    ``on_report`` (both must pickle). A failing ``on_report`` is printed, never raised: tracking
    must not kill a training run."""

    def __init__(self, format_line: Callable[[dict], str], on_report: Callable[[dict], None] | None,
                 required_key: str, job: str) -> None:
        self.format_line = format_line
        self.on_report = on_report
        self.required_key = required_key
        self.job = job

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if not metrics or self.required_key not in metrics[0]:
            return
        print(self.format_line(metrics[0]), flush=True)
        if self.on_report is not None:
            try:
                self.on_report(dict(metrics[0]))
            except Exception as exc:
                print(f"[{self.job}] warning: report callback failed: {type(exc).__name__}: {exc}", flush=True)


__all__ = [
    "LR_SCHEDULES", "ReportCallback", "WARMUPS", "bf16_autocast", "ray_storage", "scheduled_lr", "worker_threads",
    "write_folder",
]
