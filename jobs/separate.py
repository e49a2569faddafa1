"""``python -m jobs.separate`` (``uss bulk-separate``): separate a whole archive on a Ray cluster.

    python -m jobs.separate --input s3://bucket/recordings/ --output s3://bucket/stems/ \\
        --checkpoint models:/uss/3 --class Speech --class "Music+Singing" --actors 8
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.separate --input s3://bucket/list.parquet --output s3://bucket/stems \\
        --checkpoint s3://bucket/models/uss --levels 1 2 --gpus-per-actor 0.5

Input: a folder or ``s3://`` prefix of audio files, one file, or a ``.parquet`` / ``.csv`` list
with a ``uri`` column (optional ``relative_path``). Writes ``OUTPUT/<input's relative
path>/<query>.flac`` per query and ``OUTPUT/manifest.parquet`` (one row per input: status,
error, output URIs, duration, detected classes, model identity, timings); see
:mod:`pipelines.bulk_separation`. A rerun skips the inputs already complete. Progress is printed
as inputs finish; at the end, the throughput (audio seconds per wall second, and per CPU). One
MLflow run: the config as parameters, the counts and throughput as metrics (progress as stepped
metrics while it runs), the manifest as an artifact. ``s3://`` URIs use the standard AWS
environment (``AWS_ENDPOINT_URL`` for a non-AWS endpoint).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from jobs.common import add_query_arguments
from pipelines.bulk_separation import (
    OUTPUT_FORMATS,
    BulkProgress,
    BulkResult,
    BulkSeparationConfig,
    QuerySpec,
    run_bulk_separation,
)
from uss_core.separation import PRECISIONS

PROGRESS_INTERVAL_SECONDS = 10.0  # at most one progress line (and MLflow step) per interval


def build_parser() -> argparse.ArgumentParser:
    d = BulkSeparationConfig(input="", output="", checkpoint="")
    p = argparse.ArgumentParser(
        prog="uss bulk-separate",
        description=__doc__.split("\n\n")[0],
        epilog="Queries: one kind; none at all separates hierarchically at ontology levels 1 2 3.",
    )
    p.add_argument("--input", required=True, help="folder, s3:// prefix, audio file, or .parquet/.csv list of URIs")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix")
    p.add_argument("--checkpoint", required=True, help="model: folder/.ckpt, s3://..., models:/NAME/VERSION, runs:/...")
    p.add_argument("--tagger-checkpoint", help="PANNs Cnn14 checkpoint used to detect active segments")
    p.add_argument("--labels-csv", help="label set of a checkpoint that carries none (official .ckpt)")
    p.add_argument("--metadata-dir", help="folder with AudioSet ontology.json and class_labels_indices.csv")
    add_query_arguments(p)
    s = p.add_argument_group("separation")
    s.add_argument("--format", choices=OUTPUT_FORMATS, default=d.output_format, help="stem format (default %(default)s)")
    s.add_argument("--segment-seconds", type=float, help="segment length (default: the model's training length)")
    s.add_argument("--overlap", type=float, default=d.overlap, help="fraction of segment overlap (default %(default)s)")
    s.add_argument("--batch-size", type=int, default=d.batch_size, help="segment x query pairs per forward (default %(default)s)")
    s.add_argument("--activity-threshold", type=float, default=d.activity_threshold, help="(default %(default)s)")
    s.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: cuda with GPU actors, else cpu)")
    s.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="U-Net arithmetic: fp32 (exact, the reference's numbers), bf16 (faster on CPUs with AMX and on "
                        "GPUs), fp16 (GPU), auto (the default: bf16 on a CPU with AMX, else fp32)")
    s.add_argument("--max-input-seconds", type=float, default=d.max_input_seconds, help="longer inputs are rejected (default %(default)s)")
    s.add_argument("--silence-peak", type=float, default=d.silence_peak, help="inputs with a lower peak are 'silent' (default %(default)s)")
    r = p.add_argument_group("Ray")
    r.add_argument("--actors", type=int, default=d.actors, help="actor pool size (default %(default)s)")
    r.add_argument("--cpus-per-actor", type=float, default=d.cpus_per_actor, help="CPUs reserved per actor (default %(default)s)")
    r.add_argument("--gpus-per-actor", type=float, default=d.gpus_per_actor, help="GPUs per actor, fractional allowed (default %(default)s)")
    r.add_argument("--torch-threads", type=int, default=d.torch_threads, help="torch threads per actor (default %(default)s)")
    r.add_argument("--files-per-task", type=int, default=d.files_per_task, help="inputs per actor call (default %(default)s)")
    r.add_argument("--memory-per-actor", type=float, metavar="GIB", help="memory (GiB) Ray reserves per actor (default: none)")
    r.add_argument("--scratch-dir", help="local scratch folder for stems before upload (default: system temp)")
    return p


def config_from_args(args: argparse.Namespace) -> BulkSeparationConfig:
    """The job config the command line describes."""
    return BulkSeparationConfig(
        input=args.input,
        output=args.output,
        checkpoint=args.checkpoint,
        queries=QuerySpec(
            classes=tuple(args.classes),
            class_ids=tuple(args.class_ids),
            levels=tuple(args.levels),
            query_audio=tuple(args.query_audio),
        ),
        output_format=args.format,
        tagger_checkpoint=args.tagger_checkpoint,
        labels_csv=args.labels_csv,
        metadata_dir=args.metadata_dir,
        segment_seconds=args.segment_seconds,
        overlap=args.overlap,
        batch_size=args.batch_size,
        activity_threshold=args.activity_threshold,
        device=args.device,
        precision=args.precision,
        max_input_seconds=args.max_input_seconds,
        silence_peak=args.silence_peak,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        torch_threads=args.torch_threads,
        files_per_task=args.files_per_task,
        memory_per_actor_gb=args.memory_per_actor,
        scratch_dir=args.scratch_dir,
    )


def _status_summary(statuses: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in sorted(statuses.items())) or "none yet"


class ProgressReporter:
    """Prints a progress line and logs stepped MLflow metrics, at most once per interval (and
    always for the last input)."""

    def __init__(self, interval_seconds: float = PROGRESS_INTERVAL_SECONDS) -> None:
        self.interval_seconds = interval_seconds
        self._last = -float("inf")

    def __call__(self, progress: BulkProgress) -> None:
        import mlflow

        now = time.monotonic()
        if now - self._last < self.interval_seconds and progress.finished < progress.total:
            return
        self._last = now
        rate = progress.audio_seconds / progress.elapsed_seconds if progress.elapsed_seconds > 0 else 0.0
        print(
            f"bulk-separate: {progress.finished}/{progress.total} inputs ({_status_summary(progress.statuses)}; "
            f"{progress.complete_before} complete before), {progress.audio_seconds:.1f} s of audio separated, "
            f"{rate:.2f} audio-s/s",
            flush=True,
        )
        mlflow.log_metrics(
            {"progress_inputs_finished": progress.finished, "progress_audio_seconds": progress.audio_seconds},
            step=progress.finished,
        )


def _log_result(result: BulkResult) -> None:
    import mlflow

    metrics = {
        "inputs": result.inputs,
        "complete_before": result.complete_before,
        "errors": result.errors,
        "audio_seconds": result.audio_seconds,
        "wall_seconds": result.wall_seconds,
        "audio_seconds_per_second": result.audio_seconds_per_second,
        "audio_seconds_per_second_per_cpu": result.audio_seconds_per_second_per_cpu,
    }
    metrics.update({f"status_{status}": n for status, n in result.statuses.items()})
    mlflow.log_metrics(metrics)


def main(argv: list[str] | None = None) -> int:
    import mlflow

    from jobs.common import connect_ray, mlflow_run

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    config = config_from_args(args)
    connect_ray()
    with mlflow_run("bulk-separate", config) as run, tempfile.TemporaryDirectory(prefix="uss-bulk-job-") as tmp:
        mlflow.set_tags({"uss.input": config.input, "uss.output": config.output})
        manifest = Path(tmp) / "manifest.parquet"
        result = run_bulk_separation(
            config, job_id=run.info.run_id, on_progress=ProgressReporter(), manifest_copy=manifest
        )
        mlflow.set_tag("uss.job_signature", result.signature)
        _log_result(result)
        mlflow.log_artifact(str(manifest))
    print(
        f"bulk-separate: {result.inputs} inputs ({_status_summary(result.statuses)}; "
        f"{result.complete_before} complete before) -> {result.manifest_uri}\n"
        f"throughput: {result.audio_seconds:.1f} s of audio in {result.wall_seconds:.1f} s = "
        f"{result.audio_seconds_per_second:.2f} audio-s per wall-s, "
        f"{result.audio_seconds_per_second_per_cpu:.2f} per CPU ({result.cpus:g} CPUs)"
    )
    return 0


if __name__ == "__main__":
    from jobs.cli import run_main

    sys.exit(run_main(main, None))
