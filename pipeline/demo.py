"""The whole pipeline on the embedded default: synthetic data, local Ray, local MLflow.

    make demo            # or: frnet demo --out runs/demo

Today it renders a synthetic 300W-LP training folder and a synthetic AFLW2000-3D test folder,
reads both back with the real readers, builds every 62-d label and checks that its landmarks
land back on the .mat's own landmarks, and draws a sheet of labelled crops. Everything it
writes goes under ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import cv2

from models.synthetic_face import build_synthetic_head
from pipeline.common import progress_logger, setup_logging, write_json
from preprocessing.overlay import draw_landmarks, tile
from preprocessing.synth import SynthConfig, generate
from preprocessing.verify import label_round_trip

LOG = logging.getLogger("frnet.demo")
# A round trip through float32 .mat fields and back must stay this close (pixels).
ROUND_TRIP_TOLERANCE_PX = 1e-4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="frnet demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory")
    parser.add_argument("--train-images", type=int, default=96,
                        help="synthetic 300W-LP images (unflipped; the _Flip folders double it)")
    parser.add_argument("--test-images", type=int, default=60, help="synthetic AFLW2000-3D images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="figures (default: OUT/demo.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    run_dir = args.out.resolve()
    data_dir = run_dir / "data"
    figures: dict = {"run_dir": str(run_dir), "synthetic": True}
    datasets = {
        "300w-lp": (SynthConfig("300w-lp", args.train_images, seed=args.seed), data_dir / "300W_LP"),
        "aflw2000-3d": (SynthConfig("aflw2000-3d", args.test_images, seed=args.seed + 1),
                        data_dir / "AFLW2000"),
    }
    model = build_synthetic_head().model
    crops: list = []
    for layout, (config, folder) in datasets.items():
        LOG.info("[%s] rendering into %s", layout, folder)
        figures[f"synth_{layout}"] = generate(config, folder, workers=args.workers,
                                              progress=progress_logger(LOG, f"[{layout}] rendered"))
        LOG.info("[%s] reading back, labelling, checking the round trip", layout)
        report = label_round_trip(model, layout, str(folder), crops=crops, max_crops=len(crops) + 8)
        figures[f"round_trip_{layout}"] = report.as_dict()
        LOG.info("[%s] %d of %d samples labelled; landmark round trip max error %.2e px",
                 layout, report.checked, report.inputs, report.max_error_px)
        if report.failed or report.max_error_px > ROUND_TRIP_TOLERANCE_PX:
            LOG.error("[%s] round trip failed: %s", layout, report.failed or report.max_error_px)
            write_json(args.json or run_dir / "demo.json", figures)
            return 1
    sheet_path = run_dir / "synthetic_crops.png"
    sheet = tile([draw_landmarks(image, points) for image, points in crops], columns=8)
    cv2.imwrite(str(sheet_path), sheet)
    figures["pictures"] = {"synthetic_crops": str(sheet_path)}
    write_json(args.json or run_dir / "demo.json", figures)
    print(f"\nSynthetic data (not real faces) in {data_dir}")
    for layout in datasets:
        trip = figures[f"round_trip_{layout}"]
        print(f"  {layout:<12} {trip['checked']:>5} images, label round trip max error "
              f"{trip['max_error_px']:.1e} px")
    print(f"Labelled 120x120 crops: {sheet_path}")
    print(f"Figures: {args.json or run_dir / 'demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
