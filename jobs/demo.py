"""``uss demo``: the whole system end to end on the embedded demo corpus, on this machine.

    uss demo                 # about 9 minutes on 2 CPU cores, up to twice that on a slow day (see README)
    uss demo --quick         # a smoke run of about 3 minutes (tiny corpus, a few steps)

Stages, each the same job a user runs alone (same code, same MLflow run, same outputs):

1. ``uss corpus demo``: render the demo corpus (WebDataset shards, weak labels; true event times
   kept apart for evaluation);
2. ``jobs.ingest``: decode the shards into the clips dataset (Parquet);
3. ``jobs.train_tagger``: train the small sound event detector on the weak labels;
4. ``jobs.mine``: mine max-area anchors (and random ones, for comparison) and score both against
   the true event times (``jobs.anchor_accuracy``);
5. ``jobs.mix``: training mixtures and the held-out evaluation pairs, whose targets are weak-label
   anchors as in the paper; ``uss corpus true-sources`` writes the same pairs with the true sources
   (the target class's events alone, which the demo corpus can render) as targets;
6. ``jobs.train``: train the small separator (Ray Train), registered in MLflow;
7. ``jobs.evaluate``: SDRi / SI-SDRi per class next to the IRM ceiling, on both evaluation sets;
8. ``uss separate``: separate one held-out 10-s demo clip hierarchically (ontology levels 1-3).

Everything goes under ``<workspace>/demo`` (``$USS_WORKSPACE``, default ``./workspace``) on a
local Ray with the embedded MLflow store; ``summary.json`` there collects the figures and
``report.md`` the stage times and per-class tables; the last lines printed say where every result
is and how to open the MLflow UI. The stage settings are the presets ``jobs/presets/demo.yaml``
and ``demo-quick.yaml``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from jobs.common import connect_ray, preset_path, tracking_uri, workspace_dir
from uss_core.config import load_yaml
from uss_core.errors import UssError

@dataclass(frozen=True)
class DemoConfig:
    """What the demo builds and how long each stage trains (see ``jobs/presets/demo*.yaml``)."""

    num_clips: int = 400
    clips_per_shard: int = 100
    seed: int = 1234
    tagger_preset: str = "tagger-cpu-small"
    tagger_epochs: int | None = None  # None: the preset's
    mine_random: bool = True  # also mine random anchors to compare their accuracy
    other_label_penalty: float = 0.0  # max-area mining: 0 is the reference's (see jobs.mine)
    eval_per_class: int = 6
    eval_fraction: float = 0.15
    separator_preset: str = "separator-cpu-small"
    separator_steps: int | None = None  # None: the preset's
    separate_levels: tuple[int, ...] = (1, 2, 3)


@dataclass
class DemoPaths:
    """Where each stage writes, under one root."""

    root: Path

    def __getattr__(self, name: str) -> Path:
        layout = {
            "corpus": "corpus",
            "clips": "clips",
            "tagger": "tagger-sed",
            "anchors": "anchors-max_area",
            "random_anchors": "anchors-random",
            "anchor_scores": "anchor_accuracy.json",
            "mixtures": "mixtures",
            "eval_mixtures": "eval-mixtures",
            "true_source_eval": "eval-true-sources",
            "separator": "separator",
            "evaluation": "evaluation",
            "true_source_evaluation": "evaluation-true-sources",
            "example": "example",
            "separated": "separated",
            "ray_results": "ray_results",
        }
        if name not in layout:
            raise AttributeError(name)
        return self.root / layout[name]


class Stages:
    """Runs numbered stages, printing a header and the time each took."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def run(self, name: str, title: str, fn: Callable[[], object]) -> object:
        self.done += 1
        print(f"\n[demo {self.done}/{self.total}] {title}", flush=True)
        t0 = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"[demo {self.done}/{self.total}] {name} done in {self.seconds[name]:.0f} s "
              f"({time.perf_counter() - self.started:.0f} s so far)", flush=True)
        return result


def _job(module_main: Callable[[list[str]], int], argv: list[str]) -> None:
    status = module_main([str(a) for a in argv])
    if status:
        raise UssError(f"demo stage failed (exit status {status}): {' '.join(map(str, argv))}")


def _write_example(paths: DemoPaths, eval_fraction: float) -> Path:
    """A held-out 10-s clip with the most events, as a WAV file to separate."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipelines.mixing import is_held_out
    from pipelines.schemas import read_table
    from uss_core.audio import write_audio

    clips = read_table(paths.clips, columns=["clip_id", "label_indexes"])
    events = pq.read_table(paths.corpus / "events.parquet", columns=["shard", "clip_id"]).to_pylist()
    counts: dict[str, int] = {}
    for e in events:
        counts[f"{e['shard']}/{e['clip_id']}"] = counts.get(f"{e['shard']}/{e['clip_id']}", 0) + 1
    held_out = [c for c in clips.column("clip_id").to_pylist() if is_held_out(c, eval_fraction)]
    if not held_out:
        raise UssError("no held-out demo clip to separate; build a larger corpus (--num-clips)")
    clip_id = max(held_out, key=lambda c: (counts.get(c, 0), c))
    row = read_table(paths.clips).filter(pc.field("clip_id") == clip_id).to_pylist()[0]
    paths.example.mkdir(parents=True, exist_ok=True)
    out = paths.example / f"{clip_id.replace('/', '_')}.wav"
    write_audio(out, np.asarray(row["waveform"], dtype=np.float32), row["sample_rate"])
    return out


def run_demo(config: DemoConfig, root: Path) -> dict:
    """Run every stage into ``root``; returns the summary (also written to ``root/summary.json``)."""
    from jobs import anchor_accuracy, corpus, evaluate, ingest, mine, mix, separate_files, train, train_tagger

    paths = DemoPaths(root)
    root.mkdir(parents=True, exist_ok=True)
    # A rerun starts over: the Ray Train state of an earlier run would otherwise resume its
    # separator (trained on the earlier corpus and anchors) instead of training a new one.
    shutil.rmtree(paths.ray_results, ignore_errors=True)
    labels_csv = paths.corpus / "labels.csv"
    stages = Stages(8)
    summary: dict = {"config": asdict(config), "workspace": str(root), "mlflow_tracking_uri": tracking_uri()}

    stages.run("corpus", f"rendering {config.num_clips} demo clips", lambda: _job(corpus.main, [
        "demo", "--out", paths.corpus, "--num-clips", config.num_clips,
        "--clips-per-shard", config.clips_per_shard, "--seed", config.seed]))
    connect_ray()
    stages.run("ingest", "decoding the WebDataset shards into the clips dataset", lambda: _job(ingest.main, [
        "--format", "webdataset", "--input", paths.corpus / "shards", "--out", paths.clips,
        "--labels-csv", labels_csv]))
    tagger_args = ["--clips", paths.clips, "--out", paths.tagger, "--labels-csv", labels_csv,
                   "--preset", config.tagger_preset, "--head", "sed", "--run-name", "demo-tagger",
                   "--storage", paths.ray_results]
    if config.tagger_epochs:
        tagger_args += ["--epochs", config.tagger_epochs]
    stages.run("train_tagger", "training the sound event detector on weak labels", lambda: _job(train_tagger.main, tagger_args))

    def mine_all() -> None:
        modes = [("max_area", paths.anchors)] + ([("random", paths.random_anchors)] if config.mine_random else [])
        for mode, out in modes:
            penalty = ["--other-label-penalty", config.other_label_penalty] if mode == "max_area" else []
            _job(mine.main, ["--clips", paths.clips, "--out", out, "--sed-tagger", paths.tagger,
                             "--condition-tagger", paths.tagger, "--mode", mode, "--seed", config.seed, *penalty])
        _job(anchor_accuracy.main, ["--anchors", *[out for _, out in modes], "--events",
                                    paths.corpus / "events.parquet", "--json", paths.anchor_scores])
        numbers = json.loads(paths.anchor_scores.read_text())
        summary["anchor_accuracy"] = {mode: round(numbers[str(out)][mode]["accuracy"], 4) for mode, out in modes}

    stages.run("mine", "mining anchors (max-area; random for comparison) and scoring them", mine_all)

    def mix_all() -> None:
        _job(mix.main, ["--anchors", paths.anchors, "--out", paths.mixtures, "--seed", config.seed,
                        "--eval-out", paths.eval_mixtures, "--eval-per-class", config.eval_per_class,
                        "--eval-fraction", config.eval_fraction])
        _job(corpus.main, ["true-sources", "--corpus", paths.corpus, "--eval", paths.eval_mixtures,
                           "--anchors", paths.anchors, "--out", paths.true_source_eval])

    stages.run("mix", "mixing training mixtures and held-out evaluation pairs (weak and true targets)", mix_all)
    train_args = ["--mixtures", paths.mixtures, "--anchors", paths.anchors, "--eval", paths.eval_mixtures, "--condition-tagger", paths.tagger,
                  "--labels-csv", labels_csv, "--preset", config.separator_preset, "--out", paths.separator,
                  "--run-name", "demo-separator", "--storage", paths.ray_results]
    if config.separator_steps:
        train_args += ["--steps", config.separator_steps]
    stages.run("train", "training the separator", lambda: _job(train.main, train_args))

    results = {}

    def run_evaluation() -> None:
        for key, eval_set, out, title in (
            ("evaluation", paths.eval_mixtures, paths.evaluation, "targets: weak-label anchors (the paper's protocol)"),
            ("evaluation_true_sources", paths.true_source_eval, paths.true_source_evaluation,
             "targets: the true sources (the target class alone)"),
        ):
            result = results[key] = evaluate.evaluate(paths.separator, eval_set, out)
            print(f"\n{title}\n{result.markdown()}", flush=True)
            summary[key] = {k: round(v, 3) for k, v in result.averages.items()}
            summary[f"{key}_pairs"] = result.num_pairs

    stages.run("evaluate", "evaluating SDRi per class against the IRM ceiling", run_evaluation)

    def separate_example() -> None:
        example = _write_example(paths, config.eval_fraction)
        _job(separate_files.main, [example, "-o", paths.separated, "--checkpoint", paths.separator,
                                   "--labels-csv", labels_csv, "--levels", *config.separate_levels, "--quiet"])
        summary["separated_example"] = str(paths.separated / example.stem)

    stages.run("separate", "separating a held-out clip hierarchically (ontology levels)", separate_example)
    summary["stage_seconds"] = stages.seconds
    summary["total_seconds"] = round(time.perf_counter() - stages.started, 1)
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    (root / "report.md").write_text(report_markdown(summary, results["evaluation"], results["evaluation_true_sources"]))
    return summary


def report_markdown(summary: dict, weak, true_sources) -> str:
    """The run as Markdown (what the README shows): seconds per stage, then one per-class table of
    both evaluations (``weak``, ``true_sources``: ``jobs.evaluate.EvaluationResult``), medians per
    class with the class averages last."""
    from pipelines.evaluation import format_db

    def cell(value: float) -> str:
        return format_db(value, missing="-")

    lines = ["| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in summary["stage_seconds"].items()]
    lines += [f"| **total** | **{summary['total_seconds']:.0f}** |", ""]
    lines += [
        "| class | name | weak: pairs | SDRi | IRM SDRi | true source: pairs | SDRi | SI-SDRi | IRM SDRi |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    weak_rows = {row.class_index: row for row in weak.classes}
    true_rows = {row.class_index: row for row in true_sources.classes}
    for index in sorted(weak_rows.keys() | true_rows.keys()):
        w, t = weak_rows.get(index), true_rows.get(index)
        name = (w or t).name.replace("|", "\\|")
        weak_cells = [str(w.pairs), cell(w.sdri), cell(w.irm_sdri)] if w else ["0", "-", "-"]
        true_cells = [str(t.pairs), cell(t.sdri), cell(t.si_sdri), cell(t.irm_sdri)] if t else ["0", "-", "-", "-"]
        lines.append(f"| {index} | {name} | " + " | ".join(weak_cells + true_cells) + " |")
    wa, ta = weak.averages, true_sources.averages
    lines.append(
        f"| | **class average** ({len(weak_rows)} / {len(true_rows)} classes) | {weak.num_pairs} | "
        f"**{cell(wa['sdri'])}** | **{cell(wa['irm_sdri'])}** | {true_sources.num_pairs} | **{cell(ta['sdri'])}** | "
        f"**{cell(ta['si_sdri'])}** | **{cell(ta['irm_sdri'])}** |"
    )
    return "\n".join(lines) + "\n"


def _report(summary: dict, root: Path) -> str:
    acc = summary.get("anchor_accuracy", {})
    db = tracking_uri()
    nan = float("nan")
    lines = [
        "",
        f"demo finished in {summary['total_seconds']:.0f} s; everything is under {root}",
        "  anchor accuracy: " + ", ".join(f"{mode} {100 * a:.1f}%" for mode, a in acc.items()),
    ]
    for key, folder, targets in (
        ("evaluation", "evaluation", "weak-label targets"),
        ("evaluation_true_sources", "evaluation-true-sources", "true-source targets"),
    ):
        ev = summary.get(key, {})
        lines.append(
            f"  separator, {targets}: class-averaged SDRi {ev.get('sdri', nan):.2f} dB, SI-SDRi "
            f"{ev.get('si_sdri', nan):.2f} dB (IRM ceiling {ev.get('irm_sdri', nan):.2f} dB) on "
            f"{summary.get(key + '_pairs', 0)} held-out pairs; table and plot in {root / folder}"
        )
    artifacts = " --default-artifact-root " + str(workspace_dir() / "mlartifacts") if db.startswith("sqlite") else ""
    lines += [
        f"  separated example: {summary.get('separated_example')}",
        f"  checkpoints: {root / 'tagger-sed'}, {root / 'separator'}",
        f"  summary: {root / 'summary.json'}, {root / 'report.md'}",
        f"  MLflow UI: mlflow ui --backend-store-uri {db}{artifacts}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uss demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny corpus, few steps (about 3 minutes)")
    p.add_argument("--preset", help="a demo preset name in jobs/presets or a YAML path (default: demo, or demo-quick)")
    p.add_argument("--out", help="where the demo writes (default: <workspace>/demo or demo-quick)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    name = args.preset or ("demo-quick" if args.quick else "demo")
    path = preset_path(name, "demo")
    config = load_yaml(DemoConfig, path)
    root = Path(args.out).resolve() if args.out else workspace_dir() / path.stem
    summary = run_demo(config, root)
    print(_report(summary, root), flush=True)
    return 0


if __name__ == "__main__":
    from jobs.cli import run_main

    sys.exit(run_main(main, None))
