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
            log_x_axis(axis)
        axis.set_xlabel(key)
        axis.ticklabel_format(axis="y", useOffset=False)  # NMEs as they are, not "+2.286e1"
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("best validation NME (%)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Validation NME against each searched key")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_x_axis(axis: Any) -> None:
    """A log x scale labelled at 1, 2 and 5 of each decade in plain numbers (0.02, 0.05, 0.1), with
    no labels on the minor ticks, where matplotlib's defaults run into each other."""
    axis.set_xscale("log")
    axis.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def plot_curves(rows: list[TrialRow], path: Path, named: int = 8) -> None:
    """Validation NME per epoch of every trial, a marker at every epoch (a trial ASHA stopped after
    one epoch is a point); the best ``named`` in colour with their names in the legend, any others
    grey. A hollow last marker: the trial was stopped early."""
    fig, axis = plt.subplots(figsize=(6.4, 4.0))
    ordered = [row for row in ranked(rows) if row.curve]
    for rank, row in reversed(list(enumerate(ordered))):
        finite = [(epoch, value) for epoch, value in row.curve if math.isfinite(value)]
        if not finite:  # diverged from the start
            continue
        epochs, values = zip(*finite, strict=True)
        percent = [100 * v for v in values]
        colour = f"C{rank % 10}" if rank < named else "0.65"
        stopped = ", stopped" if row.state == STOPPED else ""
        label = f"{row.trial_id} (best {100 * row.best[1]:.2f}%{stopped})" if rank < named else None
        axis.plot(epochs, percent, marker="o", ms=4, color=colour, lw=1.2, label=label)
        if row.state == STOPPED:
            axis.plot(epochs[-1:], percent[-1:], marker="o", ms=8, color=colour, fillstyle="none", lw=0)
    axis.set_xlabel("epoch")
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.set_ylabel("validation NME (%)")
    axis.ticklabel_format(axis="y", useOffset=False)
    others = len(ordered) - named
    axis.set_title(f"Validation curves of all {len(ordered)} trials"
                   + (f" (grey: the {others} after the best {named})" if others > 0 else ""))
    axis.grid(alpha=0.3)
    if ordered:
        handles, labels = axis.get_legend_handles_labels()
        axis.legend(handles[::-1], labels[::-1], fontsize=7)  # drawn worst first, listed best first
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
