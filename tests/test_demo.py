"""`uss demo --quick`, the README's main command in its smoke form, end to end in a fresh process
(its own local Ray and embedded MLflow store in a temporary workspace). Slow: about 3 minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_uss_demo_quick_runs_every_stage(tmp_path, audioset_dir):
    env = {**os.environ, "USS_WORKSPACE": str(tmp_path), "USS_METADATA_DIR": str(audioset_dir)}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--quick"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    root = tmp_path / "demo-quick"
    summary = json.loads((root / "summary.json").read_text())
    assert set(summary["stage_seconds"]) == {"corpus", "ingest", "train_tagger", "mine", "mix", "train",
                                             "evaluate", "separate"}
    for key in ("evaluation", "evaluation_true_sources"):
        assert summary[f"{key}_pairs"] > 0
        assert {"sdri", "si_sdri", "irm_sdri"} <= set(summary[key])
    assert 0.0 <= summary["anchor_accuracy"]["max_area"] <= 1.0
    assert (root / "evaluation-true-sources" / "classes.csv").is_file()
    report = (root / "report.md").read_text()
    assert "| train_tagger |" in report and "**total**" in report
    # The class-average row: weak-label SDRi, IRM, then true-source SDRi, SI-SDRi, IRM, in bold.
    # The summary keeps 3 decimals, the report 2 of the unrounded value: compare as numbers.
    row = next(line for line in report.splitlines() if "**class average**" in line)
    bold = [float(cell.strip(" *")) for cell in row.split("|")[3:] if cell.strip().startswith("**")]
    assert bold[0] == pytest.approx(summary["evaluation"]["sdri"], abs=0.006)
    assert bold[2] == pytest.approx(summary["evaluation_true_sources"]["sdri"], abs=0.006)
    manifests = list(Path(summary["separated_example"]).glob("manifest.json"))
    assert manifests and "stems" in json.loads(manifests[0].read_text())
    assert (tmp_path / "mlflow.db").is_file()
    assert "true-source targets: class-averaged SDRi" in done.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in done.stdout
