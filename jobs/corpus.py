"""``uss corpus``: build corpora. ``uss corpus demo --out DIR`` renders the embedded demo corpus;
``uss corpus true-sources`` rewrites a demo evaluation set with its true sources as targets.

The demo corpus (a mini-AudioSet of GM-soundfont instruments and effects plus eSpeak NG speech,
weakly labelled, in WebDataset shards) needs no download: see :mod:`pipelines.demo_corpus`.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.demo_corpus import (
    MIN_TRUE_SOURCE_SHARE,
    DemoCorpusConfig,
    build_demo_corpus,
    write_true_source_evaluation_set,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uss corpus", description="Build corpora for training and evaluation.")
    sub = p.add_subparsers(dest="corpus", required=True, metavar="{demo,true-sources}")
    defaults = DemoCorpusConfig()
    d = sub.add_parser(
        "demo",
        help="render the embedded demo corpus (no download needed)",
        description=(
            "Render the demo corpus: 10-s 32-kHz clips of 1-3 events (GM-soundfont instruments and "
            "effects, eSpeak NG speech) over quiet noise, with AudioSet labels, into WebDataset shards "
            "(DIR/shards/demo-NNNNN.tar), DIR/events.parquet (true event times, evaluation only), "
            "DIR/labels.csv, DIR/corpus.json and DIR/README.txt. Same seed, same bytes."
        ),
    )
    d.add_argument("--out", required=True, help="output folder (created; earlier demo shards in it are replaced)")
    d.add_argument("--num-clips", type=int, default=defaults.num_clips, help="number of clips (default %(default)s)")
    d.add_argument(
        "--clips-per-shard",
        type=int,
        default=defaults.clips_per_shard,
        help="clips per tar shard (default %(default)s)",
    )
    d.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default %(default)s)")
    d.add_argument(
        "--metadata-dir",
        help="folder with AudioSet class_labels_indices.csv (and ontology.json); default $USS_METADATA_DIR, "
        "else the `uss metadata fetch` folder if it has them, else built-in AudioSet ids of the demo classes",
    )
    d.add_argument("--workers", type=int, default=None, help="rendering processes (default: one per CPU)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    t = sub.add_parser(
        "true-sources",
        help="a demo evaluation set with the true sources as targets (instead of weak-label anchors)",
        description=(
            "Rewrite an evaluation set mixed from demo-corpus anchors (jobs.mix --eval-out) so that each "
            "target is the true source: the target class's events alone, re-rendered from the corpus seed "
            "and cut to the anchor. Mixtures and conditions stay; pairs whose true source holds under "
            f"{100 * MIN_TRUE_SOURCE_SHARE:g}%% of the anchor's energy (mining misses) are dropped. "
            "Score it with python -m jobs.evaluate like any evaluation set."
        ),
    )
    t.add_argument("--corpus", required=True, help="the demo corpus folder the clips were ingested from")
    t.add_argument("--eval", required=True, help="the evaluation set (jobs.mix --eval-out; local or s3://)")
    t.add_argument("--anchors", required=True, help="the anchors it was mixed from (local or s3://)")
    t.add_argument("--out", required=True, help="output folder (its Parquet files are replaced)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.corpus == "demo":
        config = DemoCorpusConfig(num_clips=args.num_clips, clips_per_shard=args.clips_per_shard, seed=args.seed)
        summary = build_demo_corpus(
            config, args.out, metadata_dir=args.metadata_dir, progress=not args.no_progress, num_workers=args.workers
        )
        print(summary)
    else:
        written = write_true_source_evaluation_set(args.corpus, args.eval, args.anchors, args.out)
        print(written)
    return 0


if __name__ == "__main__":
    from jobs.cli import run_main

    sys.exit(run_main(main, None))
