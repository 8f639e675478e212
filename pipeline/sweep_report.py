"""A finished sweep as people read it: one row per trial (CSV), validation NME against each
searched key, and the validation curves of the best trials (PNG)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

COMPLETED, STOPPED, FAILED = "completed", "stopped early", "failed"


@dataclass
class TrialRow:
    """One trial's outcome; ``curve`` is (epoch, validation NME) per reported epoch."""

    trial_id: str
    state: str
    searched: dict[str, Any]
    curve: list[tuple[int, float]] = field(default_factory=list)
    checkpoint_path: str = ""  # the checkpoint of the best epoch
    mlflow_run_id: str = ""
    error: str = ""

    @property
    def best(self) -> tuple[int, float] | None:
        return min(self.curve, key=lambda point: point[1]) if self.curve else None


def ranked(rows: list[TrialRow]) -> list[TrialRow]:
    """Trials with a validation NME first, best first; failed ones without figures last."""
    return sorted(rows, key=lambda row: (row.best is None, row.best[1] if row.best else 0.0, row.trial_id))


def write_table(rows: list[TrialRow], keys: list[str], path: Path) -> None:
    """The results table: trial, state, searched values, best NME (fraction) and its epoch."""
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["trial_id", "state", *keys, "best_val_nme", "best_epoch", "epochs_trained",
                         "mlflow_run_id", "error"])
        for row in ranked(rows):
            best = row.best
            writer.writerow([row.trial_id, row.state, *(row.searched.get(k, "") for k in keys),
                             f"{best[1]:.6g}" if best else "", best[0] if best else "",
                             len(row.curve), row.mlflow_run_id, row.error])


def plot_against_keys(rows: list[TrialRow], log_keys: dict[str, bool], path: Path) -> None:
    """Best validation NME of each trial against each searched key (hollow: stopped early)."""
    keys = list(log_keys)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        for state, filled in ((COMPLETED, True), (STOPPED, False)):
            points = [(row.searched[key], 100 * row.best[1]) for row in rows if row.state == state
                      and row.best and math.isfinite(row.best[1]) and _is_number(row.searched.get(key))]
            if points:
                xs, ys = zip(*points, strict=True)
                axis.scatter(xs, ys, s=28, label=state, facecolors="C0" if filled else "none",
                             edgecolors="C0")
        if log_keys[key]:
            axis.set_xscale("log")
        axis.set_xlabel(key)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("best validation NME (%)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Validation NME against each searched key")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(rows: list[TrialRow], path: Path, highlight: int = 3) -> None:
    """Validation NME per epoch of every trial (grey) and of the best few (coloured)."""
    fig, axis = plt.subplots(figsize=(6.4, 4.0))
    ordered = [row for row in ranked(rows) if row.curve]
    for rank, row in reversed(list(enumerate(ordered))):
        finite = [(epoch, value) for epoch, value in row.curve if math.isfinite(value)]
        if not finite:  # diverged from the start
            continue
        epochs, values = zip(*finite, strict=True)
        percent = [100 * v for v in values]
        if rank < highlight:
            axis.plot(epochs, percent, marker="o", ms=3, label=f"{row.trial_id} ({100 * row.best[1]:.2f}%)")
        else:
            axis.plot(epochs, percent, color="0.7", lw=1)
    axis.set_xlabel("epoch")
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.set_ylabel("validation NME (%)")
    axis.set_title("Validation curves (grey: the other trials)")
    axis.grid(alpha=0.3)
    if ordered:
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
