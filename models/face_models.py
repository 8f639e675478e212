"""Morphable models by name, as configs and command lines give them.

    synthetic                         the procedural synthetic head (the embedded default)
    bfm68:FOLDER                      3DDFA's 68-landmark bases (u_base.txt, w_shp_base.txt, ...)
    3ddfa:PATH                        3DDFA-style arrays: an .npz or a folder of .npy files
    dense:NPZ+bfm68:FOLDER            a dense subset whose landmarks come from the 68-point bases

A bare path is read by its contents: a folder with ``u_base.txt`` is ``bfm68``, anything else
``3ddfa``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from models.morphable import MorphableModel, MorphableModelError

SYNTHETIC = "synthetic"
KINDS = ("bfm68", "3ddfa", "dense")


def map_paths(source: str, convert: Callable[[str], str]) -> str:
    """``source`` with every file or folder path in it replaced by ``convert(path)``."""
    if source == SYNTHETIC:
        return source
    kind, sep, rest = source.partition(":")
    if not sep or kind not in KINDS:
        return convert(source)
    if kind != "dense":
        return f"{kind}:{convert(rest)}"
    dense_path, plus, keypoints = rest.partition("+")
    if not plus:
        return source  # malformed: load_face_model says how
    return f"{kind}:{convert(dense_path)}+{map_paths(keypoints, convert)}"


def load_face_model(source: str) -> MorphableModel:
    """The morphable model a source string names (see the module docstring)."""
    if source == SYNTHETIC:
        from models.synthetic_face import build_synthetic_head

        return build_synthetic_head().model
    kind, sep, rest = source.partition(":")
    if not sep or kind not in KINDS:
        path = Path(source)
        if not path.exists():
            raise MorphableModelError(
                f"{source}: not a morphable model source (expected 'synthetic', 'bfm68:FOLDER', "
                "'3ddfa:PATH', 'dense:NPZ+bfm68:FOLDER' or an existing path)"
            )
        kind, rest = ("bfm68" if (path / "u_base.txt").exists() else "3ddfa"), source
    if kind == "bfm68":
        return MorphableModel.from_bfm68_dir(Path(rest))
    if kind == "3ddfa":
        return MorphableModel.from_3ddfa_arrays(Path(rest))
    dense_path, plus, keypoints = rest.partition("+")
    if not plus:
        raise MorphableModelError(f"{source}: a dense source reads 'dense:NPZ+bfm68:FOLDER'")
    return MorphableModel.from_dense_subset(Path(dense_path), load_face_model(keypoints))
