"""``python -m jobs.mix``: mix anchors into training mixtures (and an evaluation set).

    python -m jobs.mix --anchors /data/anchors-max_area --out /data/mixtures --seed 0 \\
        --eval-out /data/eval-mixtures --eval-per-class 10

Groups of ``--mix-num`` anchors whose clips share no label, partners energy-matched to the target
(gain clamped to [0.02, 50], as the reference), written as ``MIXTURE_SCHEMA`` Parquet; same
anchors and seed -> byte-identical files (see :mod:`pipelines.mixing` for the pairing rule and the
evaluation hold-out). One MLflow run: the config as parameters; anchors, mixtures, dropped
targets, evaluation pairs and seconds as metrics; the output locations as tags.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from pipelines.mixing import MixingConfig, mix_anchors


@dataclass(frozen=True)
class MixJobConfig:
    """Everything the mixing job was run with (logged to MLflow)."""

    anchors: str
    out: str
    eval_out: str | None
    mixing: MixingConfig


def build_parser() -> argparse.ArgumentParser:
    d = MixingConfig()
    p = argparse.ArgumentParser(prog="python -m jobs.mix", description=__doc__.split("\n\n")[0])
    p.add_argument("--anchors", required=True, help="anchors dataset folder (local or s3://)")
    p.add_argument("--out", required=True, help="training mixtures folder (local or s3://)")
    p.add_argument("--mix-num", type=int, default=d.mix_num, help="anchors per mixture (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="pairing seed (default %(default)s)")
    p.add_argument("--no-match-energy", action="store_true", help="sum partners at their own level")
    p.add_argument("--eval-out", help="evaluation mixtures folder; holds out clips by id hash")
    p.add_argument("--eval-per-class", type=int, default=10, help="evaluation pairs per class (default %(default)s)")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction, help="clips held out (default %(default)s)")
    p.add_argument("--mixtures-per-file", type=int, default=d.mixtures_per_file, help="rows per file (default %(default)s)")
    p.add_argument("--max-search", type=int, default=d.max_search, help="candidates scanned per partner (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    import mlflow

    from jobs.common import connect_ray, mlflow_run

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    mixing = MixingConfig(
        mix_num=args.mix_num,
        seed=args.seed,
        match_energy=not args.no_match_energy,
        mixtures_per_file=args.mixtures_per_file,
        max_search=args.max_search,
        eval_per_class=args.eval_per_class if args.eval_out else 0,
        eval_fraction=args.eval_fraction,
    )
    config = MixJobConfig(args.anchors, args.out, args.eval_out, mixing)
    connect_ray()
    with mlflow_run("mix", config):
        mlflow.set_tags({"uss.output": args.out, **({"uss.eval_output": args.eval_out} if args.eval_out else {})})
        result = mix_anchors(args.anchors, args.out, mixing, eval_uri=args.eval_out)
        metrics = {
            "anchors": result.num_anchors,
            "mixtures": result.num_mixtures,
            "dropped_targets": result.dropped["train"],
            "seconds": result.seconds,
        }
        if args.eval_out:
            counts = list(result.eval_counts.values())
            metrics.update(
                {
                    "eval_mixtures": result.num_eval,
                    "eval_classes": len(counts),
                    "eval_min_per_class": min(counts) if counts else 0,
                    "eval_dropped_targets": result.dropped["eval"],
                }
            )
        mlflow.log_metrics(metrics)
    print(
        f"mix: {result.num_anchors} anchors -> {result.num_mixtures} mixtures at {result.mixtures_uri} "
        f"({result.dropped['train']} targets without a partner) in {result.seconds:.1f} s"
    )
    if args.eval_out:
        counts = result.eval_counts
        print(
            f"  evaluation: {result.num_eval} pairs at {result.eval_uri}, {len(counts)} classes, "
            f"{min(counts.values()) if counts else 0}-{max(counts.values()) if counts else 0} per class"
        )
    return 0


if __name__ == "__main__":
    from jobs.cli import run_main

    sys.exit(run_main(main, None))
