"""``python -m jobs.ingest``: decode AudioSet-style sources into the clips and errors datasets.

    python -m jobs.ingest --format webdataset --input /data/demo/shards --out /data/clips \\
        --labels-csv /data/demo/labels.csv
    python -m jobs.ingest --format folder --input s3://bucket/audio --segments-csv \\
        s3://bucket/balanced_train_segments.csv --out s3://bucket/clips

Writes the clips (``CLIP_SCHEMA``) to ``--out`` and the items that could not be used
(``ERROR_SCHEMA``) to ``--errors-out`` (default: ``<out>-errors``, a sibling folder), both
Parquet folders, replaced on a rerun (see :func:`pipelines.sources.write_clips`). Labels resolve
against ``--labels-csv`` (class_labels_indices.csv format), else the AudioSet label list in the
metadata folder. ``s3://`` URIs use the standard AWS environment (``AWS_ENDPOINT_URL`` for a
non-AWS endpoint). One MLflow run: the config as parameters; clips, errors, seconds and clips per
second as metrics; the output locations as tags.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from pipelines.sources import FORMATS, ClipSourceConfig, write_clips
from uss_core.ontology import load_label_set


@dataclass(frozen=True)
class IngestJobConfig:
    """Everything the ingest job was run with (logged to MLflow)."""

    source: ClipSourceConfig
    out: str
    errors_out: str
    labels_csv: str | None = None
    metadata_dir: str | None = None


def default_errors_uri(out: str) -> str:
    """The errors folder beside ``out``: ``<out>-errors``."""
    return out.rstrip("/") + "-errors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("--format", required=True, choices=FORMATS, help="source format")
    p.add_argument("--input", required=True, nargs="+", metavar="URI", help="source files or folders (local or s3://)")
    p.add_argument("--segments-csv", help="AudioSet segments CSV with the labels (folder format only)")
    p.add_argument("--out", required=True, help="clips dataset folder (local or s3://)")
    p.add_argument("--errors-out", help="errors dataset folder (default: <out>-errors)")
    p.add_argument("--labels-csv", help="label set (class_labels_indices.csv format); default: AudioSet from the metadata folder")
    p.add_argument("--metadata-dir", help="folder with class_labels_indices.csv (default $USS_METADATA_DIR)")
    p.add_argument("--clip-seconds", type=float, default=10.0, help="clip length (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per decoded block (default %(default)s)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per decode task (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    import mlflow

    from jobs.common import connect_ray, mlflow_run

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    source = ClipSourceConfig(
        format=args.format,
        uris=tuple(args.input),
        segments_csv=args.segments_csv,
        clip_seconds=args.clip_seconds,
        batch_size=args.batch_size,
        num_cpus=args.num_cpus,
    )
    config = IngestJobConfig(
        source, args.out, args.errors_out or default_errors_uri(args.out), args.labels_csv, args.metadata_dir
    )
    labels = load_label_set(config.metadata_dir, config.labels_csv)
    connect_ray()
    with mlflow_run("ingest", config):
        mlflow.set_tags({"uss.output": config.out, "uss.errors_output": config.errors_out})
        t0 = time.perf_counter()
        result = write_clips(source, labels, config.out, config.errors_out)
        seconds = time.perf_counter() - t0
        mlflow.log_metrics(
            {
                "clips": result.num_clips,
                "errors": result.num_errors,
                "seconds": seconds,
                "clips_per_second": result.num_clips / seconds if seconds > 0 else 0.0,
            }
        )
    print(f"ingest: {result.num_clips} clips -> {result.clips_uri}, {result.num_errors} errors -> {result.errors_uri} ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    from jobs.cli import run_main

    sys.exit(run_main(main, None))
