"""The ablation command's preset, validation and table (the runs themselves are `uss ablate`)."""

import csv

import pytest

from jobs import ablate
from jobs.ablate import AblationConfig, AblationVariant
from jobs.common import preset_path
from uss_core.config import load_yaml
from uss_core.errors import ConfigError


def test_the_preset_covers_every_axis_of_the_paper_with_one_change_per_variant():
    config = load_yaml(AblationConfig, preset_path("ablation", "ablation"))
    default = AblationVariant(name="x", axis="x")
    conditions = {v.condition_type for v in config.variants}
    assert conditions == {"hard", "at_soft", "embedding", "adaptive"}
    assert {v.anchors for v in config.variants} == {"max_area", "random"}
    assert len({v.separator_preset for v in config.variants}) >= 2
    for v in config.variants:
        changed = [f for f in ("anchors", "condition_type", "separator_preset") if getattr(v, f) != getattr(default, f)]
        assert len(changed) <= 1, f"{v.name} changes {changed}"
        preset_path(v.separator_preset, "separator")  # every separator preset exists


def test_bad_variants_and_missing_demo_data_are_user_errors(tmp_path):
    with pytest.raises(ConfigError, match="anchors must be one of"):
        AblationVariant(name="v", axis="a", anchors="best")
    with pytest.raises(ConfigError, match="its own name"):
        AblationConfig(variants=(AblationVariant("v", "a"), AblationVariant("v", "b")))
    with pytest.raises(ConfigError, match="run `uss demo` first"):
        ablate.run_ablation(AblationConfig(variants=(AblationVariant("v", "a"),)), tmp_path)
    with pytest.raises(ConfigError, match="unknown variants"):
        ablate.main(["--demo-root", str(tmp_path), "--only", "nope"])


def test_table_is_written_as_markdown_and_csv(tmp_path):
    rows = [{"variant": "default (at_soft)", "axis": "baseline", "anchors": "max_area", "condition_type": "at_soft",
             "separator_preset": "separator-cpu-small", "sdri": 6.5, "si_sdri": 4.25, "irm_sdri": 12.0, "pairs": 10,
             "train_seconds": 100.4, "true_source_sdri": 7.125, "true_source_si_sdri": 5.0, "true_source_irm_sdri": 13.0,
             "true_source_pairs": 9},
            {"variant": "random anchors", "axis": "anchor mining", "anchors": "random", "condition_type": "hard",
             "separator_preset": "separator-cpu-small", "sdri": 3.0, "si_sdri": 1.0, "irm_sdri": 12.0, "pairs": 10,
             "train_seconds": 99.0, "true_source_sdri": float("nan"), "true_source_si_sdri": float("nan"),
             "true_source_irm_sdri": float("nan"), "true_source_pairs": 0}]
    ablate.write_table(rows, tmp_path, 300)
    table = (tmp_path / "ablation.md").read_text()
    assert "| default (at_soft) | baseline | 6.50 | 4.25 | 12.00 | 10 | 7.12 | 5.00 | 13.00 | 9 | 100 s |" in table
    assert "| random anchors | anchor mining | 3.00 | 1.00 | 12.00 | 10 | - | - | - | 0 | 99 s |" in table
    with open(tmp_path / "ablation.csv", newline="") as f:
        first, second = list(csv.DictReader(f))
    assert first["variant"] == "default (at_soft)" and float(first["sdri"]) == 6.5
    assert float(first["true_source_sdri"]) == 7.125 and second["true_source_pairs"] == "0"
