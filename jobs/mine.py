"""``python -m jobs.mine``: mine the anchors of a clips dataset (see :mod:`pipelines.anchors`).

    python -m jobs.mine --clips /data/clips --out /data/anchors-max_area \\
        --sed-tagger runs/tagger-sed --condition-tagger runs/tagger-clip --mode max_area

For every positive label of every clip one anchor (default 2 s): ``max_area`` (largest area under
the SED curve of the class, the paper's detector) or ``random`` (uniform over the clip, from
``--seed``). Writes ``ANCHOR_SCHEMA`` Parquet to ``--out`` (replaced on a rerun). One MLflow run:
the config as parameters; clips, anchors, seconds, clips/s and clips/s per CPU as metrics; the
output location as a tag. Tagger checkpoints: own-format folders or PANNs ``.pth`` (local or
``s3://``); a PANNs file carries no label set, so the AudioSet list is read from ``--labels-csv``
or the metadata folder.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace

from pipelines.anchors import MiningConfig, mine_anchors
from pipelines.schemas import ANCHOR_MODES


@dataclass(frozen=True)
class MineJobConfig:
    """Everything the mining job was run with (logged to MLflow)."""

    clips: str
    out: str
    mining: MiningConfig


def build_parser() -> argparse.ArgumentParser:
    d = MiningConfig("", "")
    p = argparse.ArgumentParser(prog="python -m jobs.mine", description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", required=True, help="clips dataset folder (local or s3://)")
    p.add_argument("--out", required=True, help="anchors dataset folder (local or s3://)")
    p.add_argument("--sed-tagger", required=True, help="sound event detection checkpoint (SED head)")
    p.add_argument("--condition-tagger", required=True, help="query-net tagger checkpoint (at_soft and embedding)")
    p.add_argument("--mode", choices=ANCHOR_MODES, default=d.mode, help="anchor placement (default %(default)s)")
    p.add_argument(
        "--other-label-penalty", type=float, default=d.other_label_penalty,
        help="max_area: subtract this times the other labels' SED area from each window's score, "
        "preferring stretches where the class sounds alone (default %(default)s: the reference's detector)",
    )
    p.add_argument("--anchor-seconds", type=float, default=d.anchor_seconds, help="anchor length (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of random placement (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="clips per actor call (default %(default)s)")
    p.add_argument("--model-batch-size", type=int, default=d.model_batch_size, help="items per forward pass (default %(default)s)")
    p.add_argument("--actors", type=int, default=d.actors, help="actor pool size (default %(default)s)")
    p.add_argument("--cpus-per-actor", type=float, default=d.cpus_per_actor, help="CPUs reserved per actor (default %(default)s)")
    p.add_argument("--torch-threads", type=int, default=d.torch_threads, help="torch threads per actor (default %(default)s)")
    p.add_argument("--labels-csv", help="label set of PANNs checkpoints (default: AudioSet from the metadata folder)")
    p.add_argument("--metadata-dir", help="folder with class_labels_indices.csv (default $USS_METADATA_DIR)")
    return p


def _panns_labels(args, paths: list[str]):
    """The AudioSet label set, only if a checkpoint is a PANNs file (carries none)."""
    from pathlib import Path

    from uss_core.ontology import load_label_set

    if all("://" in p or Path(p).is_dir() for p in paths) and not args.labels_csv:
        return None
    return load_label_set(args.metadata_dir, args.labels_csv)


def main(argv: list[str] | None = None) -> int:
    import mlflow

    from jobs.common import connect_ray, mlflow_run

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    mining = MiningConfig(
        sed_tagger=args.sed_tagger,
        condition_tagger=args.condition_tagger,
        mode=args.mode,
        anchor_seconds=args.anchor_seconds,
        other_label_penalty=args.other_label_penalty,
        seed=args.seed,
        batch_size=args.batch_size,
        model_batch_size=args.model_batch_size,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        torch_threads=args.torch_threads,
    )
    labels = _panns_labels(args, [args.sed_tagger, args.condition_tagger])
    if labels is not None:
        mining = replace(mining, audioset_labels=labels)
    config = MineJobConfig(args.clips, args.out, replace(mining, audioset_labels=None))
    connect_ray()
    with mlflow_run("mine", config, tags={"uss.anchor_mode": args.mode}):
        mlflow.set_tag("uss.output", args.out)
        result = mine_anchors(args.clips, args.out, mining)
        mlflow.log_metrics(
            {
                "clips": result.num_clips,
                "anchors": result.num_anchors,
                "seconds": result.seconds,
                "clips_per_second": result.clips_per_second,
                "clips_per_second_per_cpu": result.clips_per_second_per_cpu,
            }
        )
    print(
        f"mine ({args.mode}): {result.num_clips} clips -> {result.num_anchors} anchors at {result.anchors_uri} "
        f"in {result.seconds:.1f} s ({result.clips_per_second:.2f} clips/s, "
        f"{result.clips_per_second_per_cpu:.2f} clips/s per CPU)"
    )
    return 0


if __name__ == "__main__":
    from jobs.cli import run_main

    sys.exit(run_main(main, None))
