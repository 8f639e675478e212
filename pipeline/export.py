"""Export a network, optionally with trained weights, to ONNX (dynamic batch axis).

    frnet export --arch mobile-frnet --checkpoint runs/x/model.pt --onnx out/frnet.onnx
    frnet export --arch mobilenet-v1 --width 0.5 --checkpoint mb05_120x120.pth --onnx mb05.onnx

``--checkpoint``: for ``mobilenet-v1`` a 3DDFA_V2 checkpoint or a state dict; for the others a
state dict or ``{"model": state_dict}``; read with ``weights_only=True``. Without it the
network is exported freshly initialised (for latency work). Figures: arch, width, params, MACs,
FLOPs, opset, the ONNX file and its size.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models.frame import CROP_SIZE
from models.onnx_export import export_onnx
from models.registry import count_complexity, load_model
from pipeline.common import add_arch_arguments, setup_logging, write_json

LOG = logging.getLogger("frnet.export")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="frnet export", description=__doc__.split("\n\n")[0])
    add_arch_arguments(parser)
    parser.add_argument("--checkpoint", type=Path, help="weights to export (see above)")
    parser.add_argument("--onnx", type=Path, required=True, help="output .onnx file")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--input-size", type=int, default=CROP_SIZE, help="square input side")
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        model = load_model(args.arch, args.width, args.checkpoint)
    except ValueError as err:
        LOG.error("%s", err)
        return 2
    complexity = count_complexity(model, args.input_size)
    onnx_path = export_onnx(model, args.onnx, opset=args.opset, input_size=args.input_size)
    size = onnx_path.stat().st_size
    LOG.info("%s (width %s, %s) -> %s: %.2f MB, %.3f M params, %.1f M MACs", args.arch,
             args.width, args.checkpoint or "untrained", onnx_path, size / 1e6,
             complexity["params"] / 1e6, complexity["macs"] / 1e6)
    write_json(args.json, {
        "arch": args.arch, "width": args.width, **complexity, "opset": args.opset,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "onnx": str(onnx_path), "onnx_bytes": size,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
