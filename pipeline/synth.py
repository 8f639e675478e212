"""Render a synthetic dataset in the real 300W-LP or AFLW2000-3D layout.

    frnet synth --layout 300w-lp --n 400 --seed 0 --out data/synth/300W_LP
    python pipeline/synth.py --layout aflw2000-3d --n 200 --seed 1 --out data/synth/AFLW2000 --json f.json
    frnet synth --config configs/synth.yaml --out data/synth/300W_LP     # flags override the file

The folder is read by the same readers as the real download. Figures: images, seconds, images/s.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.runtime.config import ConfigError, from_dict, load_config
from pipeline.runtime.console import run_main
from pipeline.runtime.stage_tools import progress_logger, setup_logging, stage_parser, write_json
from preprocessing.synth import LAYOUTS, SynthConfig, generate

LOG = logging.getLogger("frnet.synth")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("frnet synth", __doc__)
    parser.add_argument("--config", type=Path, help="YAML with SynthConfig's keys (configs/synth.yaml)")
    parser.add_argument("--layout", choices=LAYOUTS)
    parser.add_argument("--n", type=int,
                        help="images (300W-LP: in the unflipped folders; the _Flip folders double it)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", required=True, help="output folder or URI (s3://bucket/prefix)")
    parser.add_argument("--views", type=int, help="300W-LP: profile views per source face (default 4)")
    parser.add_argument("--no-flip", action="store_true", help="300W-LP: skip the _Flip folders")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument("--json", type=Path, help="write the figures here (default: not written)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    overrides = {key: value for key, value in (
        ("layout", args.layout), ("n", args.n), ("seed", args.seed), ("views_per_face", args.views),
        ("flip", False if args.no_flip else None)) if value is not None}
    try:
        if args.config:
            config = load_config(args.config, SynthConfig, overrides)
        else:
            config = from_dict(SynthConfig, overrides, source="command line")
    except ConfigError as err:
        LOG.error("%s", err)
        return 2
    LOG.info("rendering a synthetic %s folder into %s (seed %d)", config.layout, args.out, config.seed)
    figures = generate(config, args.out, workers=args.workers,
                       progress=progress_logger(LOG, "rendered"))
    LOG.info("%d images in %.1f s: %.1f images/s (%.1f per worker, %d workers)", figures["images"],
             figures["seconds"], figures["images_per_second"], figures["images_per_second_per_worker"],
             figures["workers"])
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
