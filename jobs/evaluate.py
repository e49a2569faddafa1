"""``python -m jobs.evaluate``: SDRi and SI-SDRi per class of a separator on an evaluation set.

    python -m jobs.evaluate --checkpoint models:/uss-separator/3 --eval s3://bucket/eval-mixtures \\
        --out runs/eval

The evaluation set is the mixing stage's evaluation Parquet (``jobs.mix --eval-out``) or a folder
of ``<name>,mixture.wav`` / ``<name>,source.wav`` pairs (the reference's ``class_id=N/`` layout,
or any layout with a ``labels.csv``; see :mod:`pipelines.evaluation`). Each pair's target class
conditions the model; the scores are medians per class, averaged over classes as the paper
reports, with the unprocessed mixture as the zero line and the ideal-ratio-mask oracle on the same
pairs as the ceiling. Writes ``classes.csv``, ``pairs.csv``, ``summary.json`` and
``sdri_per_class.png`` into ``--out``, prints the table, and logs one MLflow run (class-averaged
and per-class metrics ``class/<index>/<metric>``, the files as artifacts).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.evaluation import (
    CLASS_METRICS,
    CONDITION_SOURCES,
    ClassScores,
    ReportPaths,
    class_table_markdown,
    open_evaluation_set,
    score_evaluation_set,
    summarise,
    write_report,
)
from uss_core.separation import PRECISIONS


@dataclass(frozen=True)
class EvaluateJobConfig:
    """Everything an evaluation was run with (logged to MLflow)."""

    checkpoint: str
    eval: str
    out: str
    batch_size: int = 8
    device: str = "auto"
    conditions: str = "auto"
    metadata_dir: str | None = None  # AudioSet label set for an official USS .ckpt (which has none)
    # fp32 by default, unlike `uss separate`: scores should not depend on the machine's CPU.
    precision: str = "fp32"


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured and wrote."""

    classes: list[ClassScores]
    averages: dict[str, float]  # class-averaged CLASS_METRICS, dB
    num_pairs: int
    conditions: str  # where the conditions came from: "dataset" or "query-net"
    seconds: float
    paths: ReportPaths
    run_id: str | None  # the MLflow run, None when not tracked

    def markdown(self) -> str:
        """The per-class table with the class averages, as Markdown."""
        return class_table_markdown(self.classes, self.averages)


def _mlflow_metrics(result: EvaluationResult) -> dict[str, float]:
    metrics: dict[str, float] = {name: value for name, value in result.averages.items()}
    metrics.update(pairs=result.num_pairs, classes=len(result.classes), seconds=result.seconds)
    for row in result.classes:
        for name in CLASS_METRICS:
            metrics[f"class/{row.class_index}/{name}"] = getattr(row, name)
    # MLflow stores NaN, but a class without a finite score says nothing worth plotting.
    return {k: float(v) for k, v in metrics.items() if not math.isnan(v)}


def evaluate(
    checkpoint_uri: str | Path,
    eval_uri: str | Path,
    out_dir: str | Path,
    batch_size: int = 8,
    device: str = "auto",
    conditions: str = "auto",
    metadata_dir: str | None = None,
    precision: str = "fp32",
    filesystem: Any = None,
    track: bool = True,
) -> EvaluationResult:
    """Evaluate the separator at ``checkpoint_uri`` (local, ``s3://``, ``models:/``) on the
    evaluation set at ``eval_uri`` (local or ``s3://``), write the report into ``out_dir`` and,
    with ``track``, log an MLflow run.

    Args:
        batch_size: pairs per forward pass.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        conditions: ``auto`` (the set's precomputed conditions if it has them, else the query net),
            ``dataset`` or ``query-net`` (the model's query net on each target, as the reference).
        precision: the U-Net's arithmetic (:func:`uss_core.separation.resolve_precision`); compare
            ``fp32`` with ``bf16`` to see what faster arithmetic costs a model.
        filesystem: pyarrow or fsspec filesystem for ``s3://`` URIs (default: from the environment).
    """
    from pipelines.model_store import local_checkpoint
    from uss_core.checkpoints import load_model
    from uss_core.separation import SeparationConfig, Separator

    checkpoint_uri, eval_uri = str(checkpoint_uri), str(eval_uri)
    config = EvaluateJobConfig(
        checkpoint_uri, eval_uri, str(out_dir), batch_size, device, conditions, metadata_dir, precision
    )
    started = time.perf_counter()
    path, downloaded = local_checkpoint(checkpoint_uri, filesystem)
    try:
        loaded = load_model(path, metadata_dir=metadata_dir)
    finally:
        if downloaded is not None:
            downloaded.cleanup()
    # The Separator prepares the model for inference on the device (eval mode, CPU memory layout).
    separator = Separator(loaded, SeparationConfig(batch_size=batch_size, device=device, precision=precision))
    model = separator.model
    evaluation_set = open_evaluation_set(eval_uri, loaded.labels, filesystem)
    results = score_evaluation_set(model, evaluation_set, conditions, batch_size, separator.precision)
    source = results.condition_source
    classes, averages = summarise(results, loaded.labels)
    seconds = time.perf_counter() - started
    summary = {
        "checkpoint": checkpoint_uri,
        "eval": eval_uri,
        "conditions": source,
        "pairs": len(results.pair_ids),
        "classes": len(classes),
        "seconds": round(seconds, 3),
        "device": str(next(model.parameters()).device),
        "precision": separator.precision,
    }
    title = f"{Path(checkpoint_uri.rstrip('/')).name} on {Path(eval_uri.rstrip('/')).name}"
    paths = write_report(out_dir, results, classes, averages, summary, title)
    result = EvaluationResult(classes, averages, len(results.pair_ids), source, seconds, paths, None)
    if track:
        import mlflow

        from jobs.common import mlflow_run

        with mlflow_run("evaluate", config) as run:
            mlflow.set_tags({"uss.checkpoint": checkpoint_uri, "uss.eval": eval_uri, "uss.conditions": source})
            mlflow.log_metrics(_mlflow_metrics(result))
            for artifact in (paths.classes_csv, paths.pairs_csv, paths.summary_json, paths.plot_png):
                mlflow.log_artifact(str(artifact))
            result.run_id = run.info.run_id
    return result


def build_parser() -> argparse.ArgumentParser:
    d = EvaluateJobConfig("", "", "")
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="separator checkpoint: folder, .ckpt, s3:// or models:/ URI")
    p.add_argument(
        "--eval", required=True, help="evaluation set: mixtures Parquet or audio-pair folder (local or s3://)"
    )
    p.add_argument("--out", help="report folder (default: <workspace>/evaluation/<date-time>)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per forward pass (default %(default)s)")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto (default %(default)s)")
    p.add_argument(
        "--conditions",
        choices=CONDITION_SOURCES,
        default=d.conditions,
        help="conditions from the set's precomputed rows (dataset), the model's query net on each target "
        "(query-net), or dataset when the set has them (auto, the default)",
    )
    p.add_argument("--metadata-dir", help="AudioSet metadata folder (label set of an official USS .ckpt)")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="U-Net arithmetic, as `uss separate --precision` (default %(default)s: machine-independent scores)")
    return p


def main(argv: list[str] | None = None) -> int:
    from jobs.common import workspace_dir

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out or str(workspace_dir() / "evaluation" / time.strftime("%Y%m%d-%H%M%S"))
    result = evaluate(
        args.checkpoint, args.eval, out, args.batch_size, args.device, args.conditions, args.metadata_dir, args.precision
    )
    print(result.markdown())
    print(
        f"\nevaluate: {result.num_pairs} pairs, {len(result.classes)} classes, conditions from {result.conditions}, "
        f"{result.seconds:.1f} s; class-averaged SDRi {result.averages['sdri']:.2f} dB, SI-SDRi "
        f"{result.averages['si_sdri']:.2f} dB (IRM ceiling {result.averages['irm_sdri']:.2f} dB); report in {out}"
        + (f"; MLflow run {result.run_id}" if result.run_id else "")
    )
    return 0


if __name__ == "__main__":
    from jobs.cli import run_main

    sys.exit(run_main(main, None))
