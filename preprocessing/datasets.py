"""Listing and reading 300W-LP trees and AFLW2000-3D folders, locally or on object storage.

A dataset root is a local path or any URI pyarrow understands (``s3://bucket/300W_LP``,
``gs://...``, ``file:///data/300W_LP``). Listing never reads file contents; reading one sample
raises a typed :class:`~preprocessing.errors.DatasetError` for a bad or missing file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from preprocessing.annotations import MatAnnotation, decode_image, parse_mat, parse_pts_mat
from preprocessing.errors import DatasetError, MissingFileError

SUBSETS_300W_LP = ("AFW", "HELEN", "IBUG", "LFPW")
FLIP_SUFFIX = "_Flip"
_AFLW2000_NAME = re.compile(r"^image\d{5}$")


def resolve(root: str | Path) -> tuple[pafs.FileSystem, str]:
    """A local path or filesystem URI -> (pyarrow filesystem, path inside it)."""
    text = str(root)
    if "://" in text:
        try:
            return pafs.FileSystem.from_uri(text)
        except (ValueError, OSError) as err:
            raise ValueError(f"{text}: not a filesystem URI pyarrow can open ({err})") from err
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    """Whole file contents; a missing file raises :class:`MissingFileError`."""
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as err:
        raise MissingFileError(path, "file does not exist") from err
    except OSError as err:
        if "not found" in str(err).lower() or "no such file" in str(err).lower():
            raise MissingFileError(path, "file does not exist") from err
        raise DatasetError(path, f"cannot read ({err})") from err


def _files_under(filesystem: pafs.FileSystem, folder: str) -> list[str]:
    info = filesystem.get_file_info(folder)
    if info.type != pafs.FileType.Directory:
        return []
    selector = pafs.FileSelector(folder, recursive=False)
    return sorted(f.path for f in filesystem.get_file_info(selector) if f.type == pafs.FileType.File)


def _pairs(paths: Iterable[str]) -> dict[str, dict[str, str]]:
    """Group files by stem: ``{stem: {".jpg": path, ".mat": path}}`` (other files ignored)."""
    grouped: dict[str, dict[str, str]] = {}
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        stem, dot, ext = name.rpartition(".")
        if dot and ext.lower() in ("jpg", "mat"):
            grouped.setdefault(stem, {})[f".{ext.lower()}"] = path
    return grouped


@dataclass(frozen=True)
class SampleRef:
    """One sample of a dataset: an image and its annotation, before anything is read.

    ``subject_id`` names the source face: every profile view and flip of one face shares it, so a
    split by subject keeps them together. For AFLW2000-3D it is the file stem.
    """

    dataset: str  # "300w-lp" or "aflw2000-3d"
    stem: str
    subset: str  # AFW / HELEN / IBUG / LFPW, or AFLW2000
    flipped: bool
    subject_id: str
    image_path: str
    mat_path: str
    landmarks_path: str | None = None


def subject_of_300w_lp(stem: str) -> str:
    """``AFW_134212_1_7`` -> ``AFW_134212_1``: the stem without its profile-view index."""
    head, _, view = stem.rpartition("_")
    if not head or not view.isdigit():
        raise ValueError(f"{stem}: not a 300W-LP file name (expected <face>_<view index>)")
    return head


def list_300w_lp(root: str | Path) -> tuple[pafs.FileSystem, list[SampleRef]]:
    """Every sample of a 300W-LP tree (AFW, HELEN, IBUG, LFPW and their ``_Flip`` folders).

    A .jpg without its .mat (or the reverse) is still listed, so that reading it fails loudly and
    counts reconcile: every stem found is one input.
    """
    filesystem, base = resolve(root)
    if filesystem.get_file_info(base).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{root}: no such folder")
    refs: list[SampleRef] = []
    found_subsets = []
    for subset in SUBSETS_300W_LP:
        for flipped in (False, True):
            folder_name = subset + (FLIP_SUFFIX if flipped else "")
            folder = f"{base}/{folder_name}"
            files = _files_under(filesystem, folder)
            if not files:
                continue
            found_subsets.append(folder_name)
            for stem, paths in sorted(_pairs(files).items()):
                landmarks = None if flipped else f"{base}/landmarks/{subset}/{stem}_pts.mat"
                refs.append(SampleRef(
                    dataset="300w-lp", stem=stem, subset=subset, flipped=flipped,
                    subject_id=subject_of_300w_lp(stem),
                    image_path=paths.get(".jpg", f"{folder}/{stem}.jpg"),
                    mat_path=paths.get(".mat", f"{folder}/{stem}.mat"),
                    landmarks_path=landmarks,
                ))
    if not found_subsets:
        raise FileNotFoundError(
            f"{root}: not a 300W-LP tree (none of {', '.join(SUBSETS_300W_LP)} or their "
            f"{FLIP_SUFFIX} folders holds files)"
        )
    return filesystem, refs


def list_aflw2000(root: str | Path) -> tuple[pafs.FileSystem, list[SampleRef]]:
    """Every ``imageNNNNN`` sample of an AFLW2000-3D folder, in sorted (protocol) order."""
    filesystem, base = resolve(root)
    if filesystem.get_file_info(base).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{root}: no such folder")
    pairs = {s: p for s, p in _pairs(_files_under(filesystem, base)).items() if _AFLW2000_NAME.match(s)}
    if not pairs:
        raise FileNotFoundError(f"{root}: not an AFLW2000-3D folder (no imageNNNNN.jpg/.mat files)")
    refs = [
        SampleRef(
            dataset="aflw2000-3d", stem=stem, subset="AFLW2000", flipped=False, subject_id=stem,
            image_path=paths.get(".jpg", f"{base}/{stem}.jpg"),
            mat_path=paths.get(".mat", f"{base}/{stem}.mat"),
        )
        for stem, paths in sorted(pairs.items())
    ]
    return filesystem, refs


def read_annotation(filesystem: pafs.FileSystem, ref: SampleRef) -> MatAnnotation:
    return parse_mat(read_bytes(filesystem, ref.mat_path), ref.mat_path,
                     require_pt3d=ref.dataset == "aflw2000-3d")


def read_image(filesystem: pafs.FileSystem, ref: SampleRef) -> np.ndarray:
    return decode_image(read_bytes(filesystem, ref.image_path), ref.image_path)


def read_landmarks(filesystem: pafs.FileSystem, ref: SampleRef) -> dict[str, np.ndarray]:
    """The ``landmarks/`` folder's 2D/3D-contour landmarks of a non-flipped 300W-LP sample."""
    if ref.landmarks_path is None:
        raise MissingFileError(ref.image_path, "300W-LP ships landmark files for unflipped images only")
    return parse_pts_mat(read_bytes(filesystem, ref.landmarks_path), ref.landmarks_path)
