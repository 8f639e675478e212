"""Pictures and tables of benchmark reports: the cumulative error distribution, NME by |yaw|
bin, landmark overlays of the best, median and worst faces, and the NME table as text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.fs as pafs

from models.frame import crop_image, image_to_crop
from models.metrics import YAW_BIN_LABELS
from pipeline.evaluation.scoring import FacePredictions
from preprocessing.datasets import SampleRef, read_image
from preprocessing.overlay import LANDMARK_BGR, TRUTH_BGR, caption, draw_landmarks, enlarge, legend, tile

OVERLAY_PER_ROW = 3
OVERLAY_SCALE = 3
REPORT_TITLES = {
    "aflw2000": "AFLW2000-3D, 68 points, original annotation",
    "aflw2000_reannotated": "AFLW2000-3D, 68 points, reannotated",
    "aflw21": "AFLW2000-3D, 21 points",
    "reconstruction_3d": "AFLW2000-3D, 3D reconstruction",
    "aflw": "AFLW, 21 points",
}


def plot_cumulative_errors(reports: dict[str, dict[str, Any]], path: Path) -> None:
    """Cumulative error distribution: fraction of images (y) with NME at most x %, one curve a report."""
    from matplotlib.figure import Figure  # only when pictures are drawn

    figure = Figure(figsize=(6.4, 4.4), dpi=120)
    axes = figure.subplots()
    upper = 1.0
    for key, report in reports.items():
        errors = np.sort(np.array(list(report["per_image"].values()))) * 100.0
        fraction = np.arange(1, len(errors) + 1) / len(errors)
        axes.step(np.concatenate([[0.0], errors]), np.concatenate([[0.0], fraction]), where="post",
                  label=f"{REPORT_TITLES[key]} (per-image mean {report['nme_per_sample_mean'] * 100:.2f} %)")
        upper = max(upper, float(np.percentile(errors, 99)) * 1.1)
    axes.set(xlim=(0.0, upper), ylim=(0.0, 1.0), xlabel="NME (%)", ylabel="fraction of images",
             title="Cumulative error distribution")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def plot_yaw_bins(reports: dict[str, dict[str, Any]], path: Path) -> None:
    """One bar chart per report: mean NME % of each |yaw| bin, its image count on the bar."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.2 * len(reports), 3.6), dpi=120)
    for axes, (key, report) in zip(np.atleast_1d(figure.subplots(1, len(reports))), reports.items(),
                                   strict=True):
        means = [row["mean"] * 100.0 if row["mean"] is not None else 0.0 for row in report["bins"]]
        bars = axes.bar(YAW_BIN_LABELS, means, color=["#4c72b0", "#dd8452", "#c44e52"])
        for bar, row in zip(bars, report["bins"], strict=True):
            axes.annotate(f"n={row['count']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8)
        axes.set(xlabel="|yaw| (degrees)", ylabel="NME (%)",
                 title=f"{REPORT_TITLES[key]}\nmean of the bins {report['nme_mean_of_bins'] * 100:.2f} %, "
                       f"their std {report['nme_std_of_bins'] * 100:.2f}")
        axes.title.set_fontsize(8)
        axes.margins(y=0.15)
    figure.tight_layout()
    figure.savefig(path)



def overlay_sheet(
    predictor_name: str, filesystem: pafs.FileSystem, refs: list[SampleRef],
    predictions: FacePredictions, errors: np.ndarray, path: Path,
) -> None:
    """Crops of the best, median and worst faces (one row each), the ground truth and the
    prediction in the colours the legend above them names."""
    order = np.argsort(errors, kind="stable")
    count = min(OVERLAY_PER_ROW, len(order))
    middle = max(0, min(len(order) // 2 - count // 2, len(order) - count))
    rows = (("best", order[:count]), ("median", order[middle:middle + count]), ("worst", order[-count:]))
    tiles = []
    for label, indices in rows:
        for i in indices:
            box = predictions.boxes[i]
            canvas = enlarge(crop_image(read_image(filesystem, refs[i]), box), OVERLAY_SCALE)
            marked = ((predictions.truth[i], TRUTH_BGR), (predictions.predicted[i], LANDMARK_BGR))
            for points, colour in marked:
                canvas = draw_landmarks(canvas, image_to_crop(points[:2], box), colour, OVERLAY_SCALE)
            cv2.putText(canvas, f"{label} {predictions.stems[i]} {errors[i] * 100:.2f}%", (4, 14),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(canvas)
    sheet = legend(tile(tiles, columns=count), [("ground truth", TRUTH_BGR), (predictor_name, LANDMARK_BGR)])
    sheet = caption(sheet, ["Best, median and worst faces by NME (rows); each crop's NME in its corner"])
    if not cv2.imwrite(str(path), sheet):
        raise OSError(f"{path}: could not write the overlay sheet")


def format_table(key: str, report: dict[str, Any]) -> str:
    """The NME table of one report, in %."""
    lines = [REPORT_TITLES[key], f"  {'|yaw|':<10}{'images':>8}{'NME %':>9}"]
    for row in report["bins"]:
        mean = f"{row['mean'] * 100:9.3f}" if row["mean"] is not None else f"{'-':>9}"
        lines.append(f"  {row['range']:<10}{row['count']:>8}{mean}")
    lines.append(f"  {'mean':<18}{report['nme_mean_of_bins'] * 100:9.3f}   (of the bin means)")
    lines.append(f"  {'std':<18}{report['nme_std_of_bins'] * 100:9.3f}")
    overall = report["nme_per_sample_mean"] * 100
    lines.append(f"  {'all images':<10}{len(report['per_image']):>8}{overall:9.3f}")
    return "\n".join(lines)


