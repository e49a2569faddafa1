"""``python -m jobs.train`` (``uss train``): train the separator with Ray Train, tracked in MLflow.

    python -m jobs.train --mixtures runs/mixtures --anchors runs/anchors-max_area --eval runs/eval-mixtures \\
        --condition-tagger runs/tagger-sed --labels-csv runs/corpus/labels.csv \\
        --preset separator-cpu-small --out runs/separator --run-name sep-1

Reads the mixing stage's mixtures (and, with ``remix``, the mining stage's anchors for fresh
mixtures every step) from local paths or ``s3://``; see :mod:`pipelines.separator_training`.
The MLflow run logs the config and dataset locations and sizes as parameters, ``train_loss`` /
``val_sdri`` / ``val_si_sdri`` over steps, the final checkpoint as the ``checkpoint`` artifact,
and registers it in the model registry as ``--register-as`` (default ``uss-separator``), so
``uss separate --checkpoint models:/uss-separator/<version>`` works.

Resuming: Ray Train keeps the run under ``--storage`` (default ``<workspace>/ray_results``) by
``--run-name``; rerunning the same command with the same ``--run-name`` continues from the
latest checkpoint (step count and optimizer state), e.g. after the job was killed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
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
from pipelines.model_store import register_checkpoint
from pipelines.separator_training import (
    LOSSES,
    SEPARATOR_DIR,
    DatasetSummary,
    SeparatorTrainingConfig,
    TrainingData,
    train_separator,
)
from uss_core.config import load_yaml
from uss_core.models.query_nets import CONDITION_TYPES
from uss_core.ontology import LabelSet, load_label_set

METRIC_KEYS = ("train_loss", "lr", "examples_per_second", "val_sdri", "val_si_sdri", "val_irm_sdri")  # logged to MLflow per report
DEFAULT_PRESET = "separator-cpu-small"
DEFAULT_MODEL_NAME = "uss-separator"
# Command-line overrides of preset fields: (flag dest, field name).
OVERRIDES = (
    ("steps", "max_steps"),
    ("batch_size", "batch_size"),
    ("lr", "lr"),
    ("loss", "loss"),
    ("condition_type", "condition_type"),
    ("num_workers", "num_workers"),
    ("cpus_per_worker", "cpus_per_worker"),
    ("torch_threads", "torch_threads"),
    ("use_gpu", "use_gpu"),
    ("remix", "remix"),
    ("checkpoint_every", "checkpoint_every"),
    ("eval_every", "eval_every"),
    ("seed", "seed"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uss train", description=__doc__.split("\n\n")[0])
    p.add_argument("--mixtures", required=True, help="training mixtures (jobs.mix output; Parquet folder, local or s3://)")
    p.add_argument("--anchors", help="anchors dataset (jobs.mine output), for remix: fresh mixtures every step")
    p.add_argument("--eval", help="evaluation pairs (jobs.mix --eval-out) for validation SDRi during training")
    p.add_argument("--condition-tagger", help="the Cnn14 tagger the anchors' conditions came from (not needed for hard)")
    p.add_argument("--out", required=True, help="where to write the separator checkpoint (folder or s3:// prefix)")
    p.add_argument("--preset", default=DEFAULT_PRESET, help="preset name in jobs/presets or a YAML path (default %(default)s)")
    p.add_argument("--labels-csv", help="label set the clips were ingested with (default: the AudioSet label set)")
    p.add_argument("--metadata-dir", help="folder with AudioSet class_labels_indices.csv (without --labels-csv)")
    p.add_argument("--run-name", help="Ray Train / MLflow run name; the same name resumes a killed run")
    p.add_argument("--storage", help="Ray Train run storage, local or s3:// (default <workspace>/ray_results)")
    p.add_argument("--register-as", default=DEFAULT_MODEL_NAME,
                   help="MLflow registered model name (default %(default)s; '' to skip registering)")
    o = p.add_argument_group("overrides of the preset")
    o.add_argument("--steps", type=int, help="optimizer steps in all")
    o.add_argument("--batch-size", type=int, help="global batch size")
    o.add_argument("--lr", type=float)
    o.add_argument("--loss", choices=LOSSES, help="training loss (module docs of pipelines.separator_training)")
    o.add_argument("--condition-type", choices=CONDITION_TYPES)
    o.add_argument("--num-workers", type=int, help="Ray Train workers")
    o.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker (fractional allowed)")
    o.add_argument("--torch-threads", type=int, help="torch threads per worker")
    o.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None, help="one GPU per worker")
    o.add_argument("--remix", action=argparse.BooleanOptionalAction, default=None, help="fresh mixtures from --anchors")
    o.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    o.add_argument("--eval-every", type=int, help="steps between validations")
    o.add_argument("--seed", type=int)
    return p


def load_config(args: argparse.Namespace) -> SeparatorTrainingConfig:
    config = load_yaml(SeparatorTrainingConfig, preset_path(args.preset, "separator"))
    overrides = {name: getattr(args, dest) for dest, name in OVERRIDES if getattr(args, dest) is not None}
    return dataclasses.replace(config, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    config = load_config(args)
    labels = LabelSet.from_csv(args.labels_csv) if args.labels_csv else load_label_set(args.metadata_dir)
    data = TrainingData(args.mixtures, args.anchors, args.eval)
    connect_ray()
    import mlflow

    with mlflow_run("train", config, run_name=args.run_name) as run:
        mlflow.log_params({
            "data.mixtures_uri": args.mixtures, "data.anchors_uri": args.anchors or "", "data.eval_uri": args.eval or "",
            "data.out_uri": args.out, "data.num_classes": len(labels), "condition_tagger": args.condition_tagger or "",
            "preset": args.preset,
        })

        def on_summary(summary: DatasetSummary) -> None:
            mlflow.log_params({f"data.{k}": v for k, v in dataclasses.asdict(summary).items()})
            source = f"remixed from {summary.train_anchors} anchors" if config.remix else f"{summary.mixtures} fixed mixtures"
            print(f"[train] {source}, {summary.eval_pairs} evaluation pairs, {len(labels)} classes", flush=True)

        print(
            f"[train] {config.condition_type} condition, {config.max_steps} steps, batch {config.batch_size} on "
            f"{config.num_workers} worker(s) x {config.cpus_per_worker} CPU{' + GPU' if config.use_gpu else ''}; "
            f"MLflow run {run.info.run_id} at {tracking_uri()}",
            flush=True,
        )
        result = train_separator(
            config, data, args.out, labels, args.condition_tagger,
            storage_path=args.storage or workspace_dir() / "ray_results",
            run_name=args.run_name,
            on_report=MlflowMetricLogger(tracking_uri(), run.info.run_id, METRIC_KEYS, "step"),
            on_summary=on_summary,
        )
        final = {name: result.last(name) for name in ("train_loss", "val_sdri", "val_si_sdri", "val_irm_sdri")}
        log_training_outcome({f"final_{k}": v for k, v in final.items()} | {"wall_seconds": result.wall_seconds},
                             {"steps_done": result.steps, "checkpoint_uri": result.checkpoint_uri},
                             result.ray_checkpoint, SEPARATOR_DIR)
        version = None
        if args.register_as:
            version = register_checkpoint(run.info.run_id, "checkpoint", args.register_as)
    registered = f"; registered as models:/{version.name}/{version.version}" if version else ""
    validation = "no validation set" if math.isnan(final["val_sdri"]) else f"validation SDRi {final['val_sdri']:.2f} dB"
    print(
        f"[train] done in {result.wall_seconds:.0f} s at step {result.steps}: {validation}; "
        f"checkpoint {result.checkpoint_uri}{registered}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    from jobs.cli import run_main

    sys.exit(run_main(main, None))
