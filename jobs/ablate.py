"""``uss ablate``: the paper's ablation axes on the demo data, one command, one comparison table.

    uss demo                      # builds the data once (corpus, tagger, both anchor sets, mixtures)
    uss ablate                    # every variant of jobs/presets/ablation.yaml on it

Axes (each variant changes one thing from the default, like the paper's tables): the condition
type (``hard`` / ``at_soft`` / ``embedding`` / ``adaptive``), the anchor mining (``max_area`` vs
``random`` anchors, the random ones mixed by the same mixing stage) and the separator's depth.
Every variant trains with the same steps and seed (``jobs.train``, remixing its anchors) and is
scored on the same held-out evaluation pairs (``jobs.evaluate``; the max-area evaluation set of
the demo, with its weak-label targets and, where the demo wrote it, its true-source targets), so
the rows differ only by the axis. Writes ``<demo root>/ablation/ablation.md`` and ``ablation.csv``
(class-averaged SDRi, SI-SDRi and the IRM ceiling on both target sets, training time) and prints
the table; every training and evaluation is an MLflow run of its own.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.common import connect_ray, preset_path, workspace_dir
from pipelines.schemas import ANCHOR_MODES
from uss_core.config import load_yaml
from uss_core.errors import ConfigError, UssError
from uss_core.models.query_nets import CONDITION_TYPES


@dataclass(frozen=True)
class AblationVariant:
    """One row: what it changes from the default (anchors, condition type, separator preset)."""

    name: str
    axis: str
    anchors: str = "max_area"
    condition_type: str = "hard"  # the demo separator's (separator-cpu-small)
    separator_preset: str = "separator-cpu-small"

    def __post_init__(self) -> None:
        if self.anchors not in ANCHOR_MODES:
            raise ConfigError(f"ablation variant {self.name!r}: anchors must be one of {ANCHOR_MODES}")
        if self.condition_type not in CONDITION_TYPES:
            raise ConfigError(f"ablation variant {self.name!r}: condition_type must be one of {CONDITION_TYPES}")


@dataclass(frozen=True)
class AblationConfig:
    """The variants and the training budget each gets (``jobs/presets/ablation.yaml``)."""

    steps: int = 300
    seed: int = 0
    variants: tuple[AblationVariant, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError("ablation steps must be >= 1")
        names = [v.name for v in self.variants]
        if not names or len(set(names)) != len(names):
            raise ConfigError("the ablation needs at least one variant, each with its own name")


COLUMNS = ("variant", "axis", "anchors", "condition_type", "separator_preset", "sdri", "si_sdri", "irm_sdri",
           "pairs", "true_source_sdri", "true_source_si_sdri", "true_source_irm_sdri", "true_source_pairs",
           "train_seconds")
TRUE_SOURCE_EVAL = "eval-true-sources"  # the demo's true-source evaluation set (uss corpus true-sources)


def _run(module_main, argv: list) -> None:
    status = module_main([str(a) for a in argv])
    if status:
        raise UssError(f"ablation step failed (exit status {status}): {' '.join(map(str, argv))}")


def _mixtures_for(root: Path, anchors: str, seed: int) -> Path:
    """The training mixtures of an anchor set: the demo's, or (random anchors) made once here."""
    from jobs import mix

    if anchors == "max_area":
        return root / "mixtures"
    out = root / "ablation" / f"mixtures-{anchors}"
    if not out.exists():
        _run(mix.main, ["--anchors", root / f"anchors-{anchors}", "--out", out, "--seed", seed])
    return out


def run_ablation(config: AblationConfig, root: Path) -> list[dict]:
    """Train and evaluate every variant on the demo data under ``root``; returns the table rows."""
    from jobs import evaluate, train

    labels_csv = root / "corpus" / "labels.csv"
    needed = [root / "tagger-sed", root / "eval-mixtures", labels_csv] + [
        root / f"anchors-{v.anchors}" for v in config.variants
    ]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise ConfigError(f"the ablation runs on the demo's data, missing: {', '.join(missing)}; run `uss demo` first "
                          "(with mine_random: true for the random-anchor variant)")
    out = root / "ablation"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, variant in enumerate(config.variants, 1):
        print(f"\n[ablate {i}/{len(config.variants)}] {variant.name}", flush=True)
        slug = "".join(c if c.isalnum() else "-" for c in variant.name.lower()).strip("-")
        mixtures = _mixtures_for(root, variant.anchors, config.seed)
        checkpoint = out / f"separator-{slug}"
        started = time.perf_counter()
        _run(train.main, [
            "--mixtures", mixtures, "--anchors", root / f"anchors-{variant.anchors}", "--remix",
            "--condition-tagger", root / "tagger-sed", "--labels-csv", labels_csv, "--preset", variant.separator_preset,
            "--condition-type", variant.condition_type, "--steps", config.steps, "--seed", config.seed,
            "--checkpoint-every", config.steps, "--out", checkpoint,
            "--run-name", f"ablation-{slug}-{time.strftime('%Y%m%d-%H%M%S')}", "--register-as", "",
        ])
        train_seconds = time.perf_counter() - started
        result = evaluate.evaluate(checkpoint, root / "eval-mixtures", out / f"evaluation-{slug}")
        row = {
            "variant": variant.name, "axis": variant.axis, "anchors": variant.anchors,
            "condition_type": variant.condition_type, "separator_preset": variant.separator_preset,
            "sdri": result.averages["sdri"], "si_sdri": result.averages["si_sdri"],
            "irm_sdri": result.averages["irm_sdri"], "pairs": result.num_pairs, "train_seconds": train_seconds,
            "true_source_sdri": math.nan, "true_source_si_sdri": math.nan, "true_source_irm_sdri": math.nan,
            "true_source_pairs": 0,
        }
        if (root / TRUE_SOURCE_EVAL).exists():
            true = evaluate.evaluate(checkpoint, root / TRUE_SOURCE_EVAL, out / f"evaluation-true-sources-{slug}")
            row.update(true_source_sdri=true.averages["sdri"], true_source_si_sdri=true.averages["si_sdri"],
                       true_source_irm_sdri=true.averages["irm_sdri"], true_source_pairs=true.num_pairs)
        rows.append(row)
        write_table(rows, out, config.steps)  # after every variant: a cut-off run keeps what it measured
    return rows


def table_markdown(rows: list[dict], steps: int) -> str:
    """The rows as Markdown: both target sets' class-averaged scores (dB), "-" where not measured."""
    from pipelines.evaluation import format_db

    def db(value: float) -> str:
        return format_db(value, missing="-")

    lines = [
        "| variant | axis | weak: SDRi | SI-SDRi | IRM SDRi | pairs | true source: SDRi | SI-SDRi | IRM SDRi | pairs "
        f"| training ({steps} steps) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['axis']} | {db(r['sdri'])} | {db(r['si_sdri'])} | {db(r['irm_sdri'])} | {r['pairs']} "
            f"| {db(r['true_source_sdri'])} | {db(r['true_source_si_sdri'])} | {db(r['true_source_irm_sdri'])} "
            f"| {r['true_source_pairs']} | {r['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def write_table(rows: list[dict], out: Path, steps: int) -> None:
    with open(out / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "ablation.md").write_text(table_markdown(rows, steps) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uss ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--demo-root", help="the demo's output folder (default: <workspace>/demo)")
    p.add_argument("--preset", default="ablation", help="ablation preset in jobs/presets or a YAML path")
    p.add_argument("--steps", type=int, help="training steps per variant (default: the preset's)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these variants")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    config = load_yaml(AblationConfig, preset_path(args.preset, "ablation"))
    if args.steps:
        config = dataclasses.replace(config, steps=args.steps)
    if args.only:
        unknown = sorted(set(args.only) - {v.name for v in config.variants})
        if unknown:
            raise ConfigError(f"unknown variants {unknown}; the preset has {[v.name for v in config.variants]}")
        config = dataclasses.replace(config, variants=tuple(v for v in config.variants if v.name in args.only))
    root = Path(args.demo_root).resolve() if args.demo_root else workspace_dir() / "demo"
    connect_ray()
    rows = run_ablation(config, root)
    print("\n" + table_markdown(rows, config.steps), flush=True)
    print(f"\nablation table: {root / 'ablation' / 'ablation.md'} (and ablation.csv)", flush=True)
    return 0


if __name__ == "__main__":
    from jobs.cli import run_main

    sys.exit(run_main(main, None))
