"""Figures. Built with matplotlib's object API on an Agg canvas, never pyplot, so nothing changes
matplotlib's global backend or state for the rest of the process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from uss_core.files import atomic_path


def plot_activity(
    probabilities: np.ndarray,
    class_names: Sequence[str],
    segment_seconds: float,
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Write a PNG heat map of per-segment class probabilities, atomically; returns ``path``.

    Args:
        probabilities: ``(segments, classes)`` values in [0, 1]; segment ``i`` starts at
            ``i * segment_seconds``.
        class_names: ``(classes,)`` names for the y axis.
        segment_seconds: time between segment starts (the x axis is in seconds).
        path: the PNG to write (folders are created).
        title: optional figure title.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[0] == 0 or probabilities.shape[1] != len(class_names):
        raise ValueError(
            f"probabilities must be (segments >= 1, classes={len(class_names)}), got {probabilities.shape}"
        )
    num_segments, num_classes = probabilities.shape
    # About a quarter inch per class row so every name stays legible, within sane bounds.
    figure = Figure(figsize=(10, min(2.0 + 0.25 * num_classes, 80.0)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(
        probabilities.T,
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
        extent=(0.0, num_segments * segment_seconds, -0.5, num_classes - 0.5),
    )
    axes.set_yticks(range(num_classes))
    # '$' would start matplotlib mathtext inside a label.
    axes.set_yticklabels([name.replace("$", r"\$") for name in class_names], fontsize=8)
    axes.set_xlabel("time (s)")
    if title:
        axes.set_title(title.replace("$", r"\$"))
    figure.colorbar(image, ax=axes, label="probability")
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=100)
    return Path(path)
