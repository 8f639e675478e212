"""The model a benchmark or registration command is given: a project model file, a registered
model URI, or a bare network checkpoint with the morphable model and whitening statistics it lacks
(``frnet evaluate`` and ``frnet register`` share these flags)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.architectures import load_model
from models.checkpoint import ModelBundle, load_bundle
from models.face_models import load_face_model
from models.params import ParamStats
from models.predictor import FacePredictor
from pipeline.runtime.paths import local_file
from pipeline.runtime.tracking import bundle_from_model_uri


def check_model_args(args: argparse.Namespace) -> None:
    """``--morphable`` and ``--param-stats`` go with ``--arch`` (a bare checkpoint), both of them."""
    extras = [flag for flag, value in (("--morphable", args.morphable), ("--param-stats", args.param_stats))
              if value is not None]
    if args.arch is None and extras:
        raise ValueError(f"{' and '.join(extras)} only go with --arch (a model file carries its own)")
    if args.arch is not None and len(extras) < 2:
        raise ValueError("--arch needs --morphable SOURCE and --param-stats MEAN_FILE,STD_FILE")


def parse_param_stats(spec: str, locate: Callable[[str], Path] = Path) -> ParamStats:
    """``MEAN_FILE,STD_FILE`` -> the whitening statistics in those two text files (each path
    found by ``locate``)."""
    parts = spec.split(",")
    if len(parts) != 2 or not all(part.strip() for part in parts):
        raise ValueError(f"--param-stats {spec!r}: expected MEAN_FILE,STD_FILE (two paths, one comma)")
    return ParamStats.from_text_files(locate(parts[0].strip()), locate(parts[1].strip()))


def read_model_file(path: str | Path) -> ModelBundle:
    """The project's model file at ``path`` (a path, or an ``s3://`` URI checked to be there);
    a ValueError says why a file is not one."""
    location = str(path)
    path = local_file(location, "--checkpoint") if "://" in location else Path(location)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        bundle, _ = load_bundle(path)
    except ValueError as err:  # named as given, not as the copy of a URI's object
        raise ValueError(f"{str(err).replace(str(path), location)}; for a bare network checkpoint give "
                         "--arch, --morphable and --param-stats") from err
    return bundle


def load_predictor(args: argparse.Namespace) -> tuple[FacePredictor, dict[str, Any]]:
    """The predictor the arguments describe and a description of it for the JSON."""
    if args.model_uri is not None:
        if args.arch is not None:
            raise ValueError("--arch reads a bare checkpoint; a --model-uri carries its own")
        bundle = bundle_from_model_uri(args.model_uri, args.tracking_uri)
        predictor = bundle.predictor(args.device)
        return predictor, {"checkpoint": args.model_uri, "arch": bundle.arch, "width": bundle.width,
                           "morphable_model": predictor.model.identity,
                           "param_stats": predictor.stats.identity}
    if args.arch is None:
        bundle = read_model_file(args.checkpoint)
        try:
            predictor = bundle.predictor(args.device)
        except RuntimeError as err:  # load_state_dict(strict=True) on weights of another network
            raise ValueError(f"{args.checkpoint}: its weights do not fit {bundle.arch} "
                             f"(width {bundle.width}): {err}") from err
        arch, width = bundle.arch, bundle.width
    else:
        stats = parse_param_stats(args.param_stats)
        face_model = load_face_model(args.morphable)
        checkpoint = local_file(args.checkpoint, "--checkpoint") if "://" in args.checkpoint \
            else Path(args.checkpoint)
        if not checkpoint.is_file():
            raise ValueError(f"{args.checkpoint}: no such file")
        network = load_model(args.arch, args.width, checkpoint)  # ValueError names the file
        predictor = FacePredictor(network, stats, face_model, args.device)
        arch, width = args.arch, args.width
    return predictor, {
        "checkpoint": str(args.checkpoint), "arch": arch, "width": width,
        "morphable_model": predictor.model.identity, "param_stats": predictor.stats.identity,
    }
