"""Print and write a network's size: parameters, MACs and FLOPs at 120x120.

    frnet info --arch mobile-frnet --json runs/info.json
    python -m pipeline.info --arch mobilenet-v1 --width 0.5

MACs count the multiply-adds of convolutions and matrix products once; FLOPs = 2 MACs (see
:mod:`models.architectures` for how these relate to the papers' figures).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from models.architectures import build_model, count_complexity
from models.frame import CROP_SIZE
from pipeline.runtime.console import run_main
from pipeline.runtime.stage_tools import add_arch_arguments, setup_logging, stage_parser, write_json

LOG = logging.getLogger("frnet.info")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("frnet info", __doc__)
    add_arch_arguments(parser)
    parser.add_argument("--input-size", type=int, default=CROP_SIZE, help="square input side")
    parser.add_argument("--json", type=Path, help="write the figures here (default: not written)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        model = build_model(args.arch, args.width)
        complexity = count_complexity(model, args.input_size)
    except ValueError as err:
        LOG.error("%s", err)
        return 2
    figures = {"arch": args.arch, "width": args.width, **complexity}
    LOG.info("%s (width %s): %.3f M params, %.1f M MACs at %dx%d", args.arch, args.width,
             complexity["params"] / 1e6, complexity["macs"] / 1e6, args.input_size,
             args.input_size)
    print(json.dumps(figures, indent=2, sort_keys=True))
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
