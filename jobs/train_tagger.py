"""``python -m jobs.train_tagger``: train a Cnn14 tagger (SED or clip head) on weakly labelled clips.

Reads a clips dataset (the ingest job's Parquet output, local or ``s3://``), trains with Ray Train
(see :mod:`pipelines.tagger_training`), tracks the run in MLflow (config and dataset sizes as
parameters, per-epoch ``train_loss`` / ``val_loss`` / ``val_mAP`` as metrics with step = epoch,
the exported checkpoint folder as the ``checkpoint`` artifact) and exports the tagger in the
project's checkpoint format to ``--out`` (a folder or ``s3://`` prefix).

Example::

    python -m jobs.train_tagger --clips /data/demo/clips --out /data/demo/tagger-sed \\
        --labels-csv /data/demo/labels.csv --preset tagger-cpu-small --head sed
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jobs.common import (
    MlflowMetricLogger,
    connect_ray,
    log_training_outcome,
    mlflow_run,
    preset_path,
    tracking_uri,
    workspace_dir,
)
from pipelines.tagger_training import DatasetSummary, TaggerTrainingConfig, train_tagger
from uss_core.config import load_yaml
from uss_core.ontology import LabelSet, load_label_set

METRIC_KEYS = ("train_loss", "val_loss", "val_mAP", "lr", "epoch_seconds")  # logged to MLflow per report
DEFAULT_PRESET = "tagger-cpu-small"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uss train-tagger",
        description="Train a Cnn14 audio tagger on weakly labelled clips with Ray Train, tracked in MLflow.",
    )
    p.add_argument("--clips", required=True, help="clips dataset (Parquet folder, local or s3://)")
    p.add_argument("--out", required=True, help="where to write the tagger checkpoint (folder or s3:// prefix)")
    p.add_argument(
        "--preset", default=DEFAULT_PRESET, help="preset name in jobs/presets or a YAML path (default %(default)s)"
    )
    p.add_argument("--labels-csv", help="label set the clips were ingested with (default: the AudioSet label set)")
    p.add_argument("--metadata-dir", help="folder with AudioSet class_labels_indices.csv (without --labels-csv)")
    o = p.add_argument_group("overrides of the preset")
    o.add_argument("--head", choices=("sed", "clip"), help="sed: Cnn14_DecisionLevelMax (frame-wise); clip: Cnn14")
    o.add_argument("--epochs", type=int)
    o.add_argument("--max-steps-per-epoch", type=int, help="cut epochs short (smoke runs)")
    o.add_argument("--batch-size", type=int, help="global batch size")
    o.add_argument("--lr", type=float)
    o.add_argument("--num-workers", type=int, help="Ray Train workers")
    o.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker (fractional allowed)")
    o.add_argument("--torch-threads", type=int, help="torch threads per worker")
    o.add_argument("--seed", type=int)
    p.add_argument("--run-name", help="MLflow / Ray Train run name")
    p.add_argument("--storage", help="Ray Train run storage, local or s3:// (default <workspace>/ray_results)")
    return p


def load_config(args: argparse.Namespace) -> TaggerTrainingConfig:
    config = load_yaml(TaggerTrainingConfig, preset_path(args.preset, "tagger"))
    overrides = {
        name: getattr(args, name)
        for name in (
            "head",
            "epochs",
            "max_steps_per_epoch",
            "batch_size",
            "lr",
            "num_workers",
            "cpus_per_worker",
            "torch_threads",
            "seed",
        )
        if getattr(args, name) is not None
    }
    return dataclasses.replace(config, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    config = load_config(args)
    labels = LabelSet.from_csv(args.labels_csv) if args.labels_csv else load_label_set(args.metadata_dir)
    connect_ray()
    import mlflow

    with mlflow_run("train_tagger", config, run_name=args.run_name) as run:
        mlflow.log_params(
            {"data.clips_uri": args.clips, "data.out_uri": args.out, "data.num_classes": len(labels), "preset": args.preset}
        )

        def on_summary(summary: DatasetSummary) -> None:
            mlflow.log_params(
                {
                    "data.train_clips": summary.train_clips,
                    "data.validation_clips": summary.validation_clips,
                    "data.train_rows_per_epoch": summary.train_rows_per_epoch,
                    "data.clip_samples": summary.clip_samples,
                }
            )
            print(
                f"[train_tagger] {args.clips}: {summary.train_clips} training clips "
                f"({summary.train_rows_per_epoch} rows per epoch after class balancing), "
                f"{summary.validation_clips} validation clips, {len(labels)} classes",
                flush=True,
            )

        print(
            f"[train_tagger] {config.head} head, {config.epochs} epochs, {config.num_workers} workers x "
            f"{config.cpus_per_worker} CPU, batch {config.batch_size}; MLflow run {run.info.run_id} at {tracking_uri()}",
            flush=True,
        )
        result = train_tagger(
            config,
            args.clips,
            args.out,
            labels,
            storage_path=args.storage or workspace_dir() / "ray_results",
            run_name=args.run_name,
            on_epoch=MlflowMetricLogger(tracking_uri(), run.info.run_id, METRIC_KEYS, "epoch"),
            on_summary=on_summary,
        )
        log_training_outcome(
            {
                "final_val_mAP": result.final_val_mAP,
                "best_val_mAP": result.best_val_mAP,
                "exported_val_mAP": result.exported_val_mAP,
                "wall_seconds": result.wall_seconds,
            },
            {"exported_epoch": result.exported_epoch, "checkpoint_uri": result.checkpoint_uri},
            result.ray_checkpoint,
        )
        artifacts = mlflow.get_artifact_uri("checkpoint")
    print(
        f"[train_tagger] done in {result.wall_seconds:.0f} s: val mAP {result.final_val_mAP:.4f} (last epoch), "
        f"exported epoch {result.exported_epoch} (val mAP {result.exported_val_mAP:.4f}) to {result.checkpoint_uri}; "
        f"MLflow artifacts at {artifacts}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    from jobs.cli import run_main

    sys.exit(run_main(main, None))
