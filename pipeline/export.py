"""Export a network, optionally with trained weights, to ONNX (dynamic batch axis).

    frnet export --checkpoint runs/demo/models/demo.pt --onnx out/frnet.onnx
    frnet export --arch mobilenet-v1 --width 0.5 --checkpoint mb05_120x120.pth --onnx mb05.onnx
    frnet export --arch mobile-frnet --onnx fresh.onnx        # freshly initialised, for latency work

``--checkpoint``: a model file of this project (its network and width are read from it; flags
may only repeat them), or weights that do not say what they are for, which need ``--arch`` (and
``--width`` if not 1.0): for ``mobilenet-v1`` a 3DDFA_V2 checkpoint or a state dict, for the
others a state dict or ``{"model": state_dict}``. Read with ``weights_only=True``. The file holds
the network's inference form (the same outputs in a graph ONNX Runtime runs faster,
``models/inference_form.py``); ``--as-trained`` exports the modules as they were trained.
Figures: arch, width, params, MACs, FLOPs, opset, the ONNX file and its size.

Exit status: 0; 2 when the command cannot start as given (a missing ``--arch``, a flag that
disagrees with the model file, weights that cannot be read or do not fit the network).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models.architectures import count_complexity, load_model
from models.frame import CROP_SIZE
from models.onnx_export import export_onnx
from pipeline.runtime.console import run_main
from pipeline.runtime.paths import input_path
from pipeline.runtime.stage_tools import (
    add_arch_arguments,
    resolve_arch,
    setup_logging,
    stage_parser,
    write_json,
)

LOG = logging.getLogger("frnet.export")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser("frnet export", __doc__, inputs_rule=True)
    add_arch_arguments(parser, from_file=True)
    parser.add_argument("--checkpoint", type=Path, help="weights to export (see above)")
    parser.add_argument("--onnx", type=Path, required=True, help="output .onnx file")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--input-size", type=int, default=CROP_SIZE, help="square input side")
    parser.add_argument("--as-trained", action="store_true",
                        help="export the modules as trained rather than the inference form "
                             "(the same outputs in a slower graph; see models/inference_form.py)")
    parser.add_argument("--json", type=Path, help="write the figures here (default: not written)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    try:
        if args.checkpoint is not None:
            args.checkpoint = input_path(args.checkpoint, "--checkpoint")
        args.arch, args.width = resolve_arch(args.arch, args.width, args.checkpoint)
        model = load_model(args.arch, args.width, args.checkpoint)
    except ValueError as err:  # a ConfigError too: the command cannot start as given
        LOG.error("%s", err)
        return 2
    complexity = count_complexity(model, args.input_size)
    onnx_path = export_onnx(model, args.onnx, opset=args.opset, input_size=args.input_size,
                            inference=not args.as_trained)
    size = onnx_path.stat().st_size
    LOG.info("%s (width %s, %s) -> %s: %.2f MB, %.3f M params, %.1f M MACs", args.arch,
             args.width, args.checkpoint or "untrained", onnx_path, size / 1e6,
             complexity["params"] / 1e6, complexity["macs"] / 1e6)
    write_json(args.json, {
        "arch": args.arch, "width": args.width, **complexity, "opset": args.opset,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "onnx": str(onnx_path), "onnx_bytes": size, "inference_form": not args.as_trained,
    })
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
