"""``python -m jobs.anchor_accuracy``: how often mined anchors hold their class (demo corpus).

    python -m jobs.anchor_accuracy --anchors /data/anchors-max_area /data/anchors-random \\
        --events /data/demo/events.parquet

An anchor is correct if it overlaps a true event of its class in its clip by at least half its
length (:func:`pipelines.anchors.anchor_accuracy`); the anchors' clip ids are
``"<shard stem>/<key>"``, events.parquet has the key and the shard apart: both are joined on.
Also the share of anchor time that holds the anchor's class and another class of its clip.
Each ``--anchors`` dataset is scored on its own (two max-area sets mined differently are two
lines): one line per dataset and anchor mode, and ``--json`` writes the same numbers keyed by
dataset and mode. Reads with pyarrow
alone (no Ray); ``s3://`` through the standard AWS environment.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.anchors import anchor_accuracy
from pipelines.schemas import SAMPLE_RATE, read_table

ANCHOR_COLUMNS = ["clip_id", "class_mid", "start_sample", "end_sample", "mode"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.anchor_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--anchors", required=True, nargs="+", metavar="URI", help="anchors dataset folder(s)")
    p.add_argument("--events", required=True, help="events.parquet of the demo corpus (true event times)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    events = read_table(args.events)
    numbers: dict[str, dict] = {}
    for uri in args.anchors:
        for r in anchor_accuracy(read_table(uri, columns=ANCHOR_COLUMNS), events, SAMPLE_RATE):
            print(f"{uri} ({r.mode}): {r.correct}/{r.total} anchors correct, accuracy {100 * r.accuracy:.1f}%"
                  + (f" ({r.unmatched} with no event of their class in the clip)" if r.unmatched else "")
                  + f"; anchor time holding its class {100 * r.own_class_share:.1f}%, "
                  f"another class of the clip {100 * r.other_class_share:.1f}%")
            numbers.setdefault(uri, {})[r.mode] = {
                "total": r.total, "correct": r.correct, "unmatched": r.unmatched, "accuracy": r.accuracy,
                "own_class_share": r.own_class_share, "other_class_share": r.other_class_share,
            }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=2)
    return 0


if __name__ == "__main__":
    from jobs.cli import run_main

    sys.exit(run_main(main, None))
