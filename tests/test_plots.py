"""The activity heat map."""

import matplotlib
import numpy as np
import pytest

from uss_core.plots import plot_activity


def test_plot_activity_writes_a_png_atomically(tmp_path):
    backend_before = matplotlib.get_backend()
    probabilities = np.random.default_rng(0).uniform(size=(12, 3))
    names = ["Speech", "Violin, fiddle", "Cost: $5 & 50%"]  # '$' must not start mathtext
    path = plot_activity(probabilities, names, 1.5, tmp_path / "out" / "activity.png", title="in.wav")
    assert path == tmp_path / "out" / "activity.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["activity.png"]
    assert matplotlib.get_backend() == backend_before


def test_plot_activity_checks_shapes(tmp_path):
    with pytest.raises(ValueError, match="classes=2"):
        plot_activity(np.zeros((4, 3)), ["a", "b"], 1.0, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
