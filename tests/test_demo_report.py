"""`uss demo`'s report.md: the stage times and one per-class table of both evaluation sets."""

from types import SimpleNamespace

from jobs.demo import report_markdown
from pipelines.evaluation import ClassScores

NAN = float("nan")


def scores(index: int, name: str, pairs: int, sdri: float, si_sdri: float, irm_sdri: float) -> ClassScores:
    return ClassScores(index, f"/m/{index}", name, pairs, sdri, si_sdri, irm_sdri, irm_sdri, 0.0)


def test_report_joins_both_evaluations_per_class():
    weak = SimpleNamespace(
        classes=[scores(0, "Speech", 5, 3.5, 1.0, 9.0), scores(2, "Organ", 1, 1.25, -1.0, 7.0)],
        averages={"sdri": 2.375, "si_sdri": 0.0, "irm_sdri": 8.0}, num_pairs=6,
    )
    true_sources = SimpleNamespace(
        classes=[scores(0, "Speech", 4, 4.0, 2.0, 10.0), scores(5, "Pipe | organ", 2, NAN, NAN, 12.0)],
        averages={"sdri": 4.0, "si_sdri": 2.0, "irm_sdri": 11.0}, num_pairs=6,
    )
    summary = {"stage_seconds": {"corpus": 8.1, "train": 212.6}, "total_seconds": 220.7}
    report = report_markdown(summary, weak, true_sources).splitlines()
    assert report[:5] == ["| stage | seconds |", "| --- | ---: |", "| corpus | 8 |", "| train | 213 |", "| **total** | **221** |"]
    rows = report[report.index("") + 3 :]
    assert rows == [
        "| 0 | Speech | 5 | 3.50 | 9.00 | 4 | 4.00 | 2.00 | 10.00 |",
        "| 2 | Organ | 1 | 1.25 | 7.00 | 0 | - | - | - |",  # no true-source pair
        "| 5 | Pipe \\| organ | 0 | - | - | 2 | - | - | 12.00 |",  # no weak pair; NaN scores; '|' escaped
        "| | **class average** (2 / 2 classes) | 6 | **2.38** | **8.00** | 6 | **4.00** | **2.00** | **11.00** |",
    ]
