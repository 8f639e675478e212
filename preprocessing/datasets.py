"""Listing and reading 300W-LP trees and AFLW2000-3D folders, locally or on object storage.

A dataset root is a local path or any URI pyarrow understands (``s3://bucket/300W_LP``,
``gs://...``, ``file:///data/300W_LP``). Listing never reads file contents; reading one sample
raises a typed :class:`~preprocessing.errors.DatasetError` for a bad or missing file.

A scan (:func:`scan_300w_lp`, :func:`scan_aflw2000`) accounts for every entry of the folders it
reads: samples (one per .jpg/.mat stem), files whose name is not the dataset's (quarantined by
the caller), and skipped entries (dangling or looping symbolic links, folders, other files).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from preprocessing.annotations import (
    MAX_IMAGE_SIDE_PX,
    MatAnnotation,
    check_image_header,
    decode_image,
    parse_mat,
    parse_pts_mat,
)
from preprocessing.errors import CorruptImageError, DatasetError, MissingFileError

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


SAMPLE_EXTENSIONS = ("jpg", "mat")


@dataclass(frozen=True)
class SkippedEntry:
    """A folder entry that is no sample's file, and why (kept in the manifest's ``skipped``)."""

    path: str
    reason: str


def _local_skip_reason(entry: os.DirEntry) -> str | None:
    """Why a local folder entry is no sample's file (following links), or None for a file."""
    try:
        mode = entry.stat().st_mode
    except OSError as err:
        if not entry.is_symlink():
            return f"unreadable ({err.strerror})"
        if err.errno == errno.ELOOP:
            return "symbolic link loop"
        if err.errno == errno.ENOENT:
            return f"dangling symbolic link (to {os.readlink(entry.path)}, which does not exist)"
        return f"unreadable symbolic link ({err.strerror})"
    if stat.S_ISREG(mode):
        return None
    return "a folder (subfolders are not read)" if stat.S_ISDIR(mode) else \
        "not a regular file (a pipe, socket or device)"


def _local_entries(folder: str) -> tuple[list[str], list[SkippedEntry]]:
    files, skipped = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            reason = _local_skip_reason(entry)
            if reason is None:
                files.append(entry.path)
            else:
                skipped.append(SkippedEntry(entry.path, reason))
    return files, skipped


def _folder_entries(filesystem: pafs.FileSystem, folder: str) -> tuple[list[str], list[SkippedEntry]]:
    """The regular files of a folder (sorted) and its other entries with the reason each is
    skipped. A local folder is read with ``os.scandir``: pyarrow's listing drops dangling and
    looping links without a word."""
    info = filesystem.get_file_info(folder)
    if info.type != pafs.FileType.Directory:
        return [], []
    if isinstance(filesystem, pafs.LocalFileSystem):
        files, skipped = _local_entries(folder)
    else:
        files, skipped = [], []
        for entry in filesystem.get_file_info(pafs.FileSelector(folder, recursive=False)):
            if entry.type == pafs.FileType.File:
                files.append(entry.path)
            else:
                reason = "a folder (subfolders are not read)" if entry.type == pafs.FileType.Directory \
                    else "not a regular file"
                skipped.append(SkippedEntry(entry.path, reason))
    samples = []
    for path in files:
        stem, dot, ext = path.rsplit("/", 1)[-1].rpartition(".")
        if dot and ext.lower() in SAMPLE_EXTENSIONS:
            samples.append(path)
        else:
            skipped.append(SkippedEntry(path, "not a .jpg or .mat file"))
    return sorted(samples), sorted(skipped, key=lambda entry: entry.path)


def _pairs(paths: Iterable[str]) -> dict[str, dict[str, str]]:
    """Group .jpg and .mat files by stem: ``{stem: {".jpg": path, ".mat": path}}``."""
    grouped: dict[str, dict[str, str]] = {}
    for path in paths:
        stem, _, ext = path.rsplit("/", 1)[-1].rpartition(".")
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


_300W_LP_NAME = "<face>_<view index>.jpg / .mat, e.g. AFW_134212_1_0.jpg"


def subject_of_300w_lp(stem: str) -> str:
    """``AFW_134212_1_7`` -> ``AFW_134212_1``: the stem without its profile-view index."""
    head, _, view = stem.rpartition("_")
    if not head or not view.isdigit():
        raise ValueError(f"{stem}: not a 300W-LP file name (expected {_300W_LP_NAME})")
    return head


@dataclass
class Scan:
    """Everything found in a dataset's folders: each stem or entry is one input.

    Attributes:
        refs: the samples, one per .jpg/.mat stem of a valid name (a half pair is listed, so that
            reading it fails by name).
        misnamed: one error per stem whose name is not the dataset's (stage ``list``).
        skipped: entries that are no sample's file, with the reason.
    """

    filesystem: pafs.FileSystem
    refs: list[SampleRef] = field(default_factory=list)
    misnamed: list[DatasetError] = field(default_factory=list)
    skipped: list[SkippedEntry] = field(default_factory=list)

    @property
    def inputs(self) -> int:
        return len(self.refs) + len(self.misnamed) + len(self.skipped)


def _misnamed(paths: dict[str, str], expected: str) -> DatasetError:
    path = paths.get(".jpg", paths.get(".mat"))
    return DatasetError(path, f"not {expected} file name (expected {_300W_LP_NAME})", stage="list")


def scan_300w_lp(root: str | Path) -> Scan:
    """Every sample of a 300W-LP tree (AFW, HELEN, IBUG, LFPW and their ``_Flip`` folders), the
    stems that are no 300W-LP name, and the entries skipped; see :class:`Scan`."""
    filesystem, base = resolve(root)
    if filesystem.get_file_info(base).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{root}: no such folder")
    scan = Scan(filesystem)
    found_subsets = []
    for subset in SUBSETS_300W_LP:
        for flipped in (False, True):
            folder_name = subset + (FLIP_SUFFIX if flipped else "")
            folder = f"{base}/{folder_name}"
            files, skipped = _folder_entries(filesystem, folder)
            scan.skipped += skipped
            if not files:
                continue
            found_subsets.append(folder_name)
            for stem, paths in sorted(_pairs(files).items()):
                try:
                    subject = subject_of_300w_lp(stem)
                except ValueError:
                    scan.misnamed.append(_misnamed(paths, "a 300W-LP"))
                    continue
                landmarks = None if flipped else f"{base}/landmarks/{subset}/{stem}_pts.mat"
                scan.refs.append(SampleRef(
                    dataset="300w-lp", stem=stem, subset=subset, flipped=flipped, subject_id=subject,
                    image_path=paths.get(".jpg", f"{folder}/{stem}.jpg"),
                    mat_path=paths.get(".mat", f"{folder}/{stem}.mat"),
                    landmarks_path=landmarks,
                ))
    if not found_subsets:
        raise FileNotFoundError(
            f"{root}: not a 300W-LP tree (none of {', '.join(SUBSETS_300W_LP)} or their "
            f"{FLIP_SUFFIX} folders holds files)"
        )
    return scan


def list_300w_lp(root: str | Path) -> tuple[pafs.FileSystem, list[SampleRef]]:
    """The samples of a 300W-LP tree (:func:`scan_300w_lp` without what it does not use).

    A .jpg without its .mat (or the reverse) is still listed, so that reading it fails loudly and
    counts reconcile: every stem found is one input.
    """
    scan = scan_300w_lp(root)
    return scan.filesystem, scan.refs


def scan_aflw2000(root: str | Path) -> Scan:
    """Every ``imageNNNNN`` sample of an AFLW2000-3D folder, in sorted (protocol) order; other
    entries are skipped (the folder of the download holds nothing else)."""
    filesystem, base = resolve(root)
    if filesystem.get_file_info(base).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{root}: no such folder")
    files, skipped = _folder_entries(filesystem, base)
    scan = Scan(filesystem, skipped=skipped)
    for stem, paths in sorted(_pairs(files).items()):
        if not _AFLW2000_NAME.match(stem):
            scan.skipped += [SkippedEntry(path, "not an AFLW2000-3D file name (imageNNNNN.jpg / .mat)")
                             for path in paths.values()]
            continue
        scan.refs.append(SampleRef(
            dataset="aflw2000-3d", stem=stem, subset="AFLW2000", flipped=False, subject_id=stem,
            image_path=paths.get(".jpg", f"{base}/{stem}.jpg"),
            mat_path=paths.get(".mat", f"{base}/{stem}.mat"),
        ))
    if not scan.refs:
        raise FileNotFoundError(f"{root}: not an AFLW2000-3D folder (no imageNNNNN.jpg/.mat files)")
    scan.skipped.sort(key=lambda entry: entry.path)
    return scan


def list_aflw2000(root: str | Path) -> tuple[pafs.FileSystem, list[SampleRef]]:
    """Every ``imageNNNNN`` sample of an AFLW2000-3D folder, in sorted (protocol) order."""
    scan = scan_aflw2000(root)
    return scan.filesystem, scan.refs


def read_annotation(filesystem: pafs.FileSystem, ref: SampleRef) -> MatAnnotation:
    return parse_mat(read_bytes(filesystem, ref.mat_path), ref.mat_path,
                     require_pt3d=ref.dataset == "aflw2000-3d")


def read_image(filesystem: pafs.FileSystem, ref: SampleRef) -> np.ndarray:
    return decode_image(read_bytes(filesystem, ref.image_path), ref.image_path)


@dataclass(frozen=True)
class EncodedImage:
    """A source image's file contents and the size its header claims (checked, not decoded)."""

    path: str
    data: bytes
    width: int
    height: int

    def decode(self) -> np.ndarray:
        """(height, width, 3) uint8 BGR; a CorruptImageError for a decoder failure or an image
        of one colour (nothing to crop, and a label on it would teach the network a blank)."""
        image = decode_image(self.data, self.path, max(self.width, self.height))
        lowest, highest = image.reshape(-1, 3).min(axis=0), image.reshape(-1, 3).max(axis=0)
        if np.array_equal(lowest, highest):
            colour = tuple(lowest.tolist())
            raise CorruptImageError(self.path, f"uniform image (every pixel is BGR {colour}): "
                                               "no face to crop")
        return image


def read_encoded_image(filesystem: pafs.FileSystem, ref: SampleRef,
                       max_side: int = MAX_IMAGE_SIDE_PX) -> EncodedImage:
    """A sample's image file with its header's size, refused (CorruptImageError) when the header
    is missing or claims a side beyond ``max_side``: nothing is decoded here."""
    data = read_bytes(filesystem, ref.image_path)
    width, height = check_image_header(data, ref.image_path, max_side)
    return EncodedImage(ref.image_path, data, width, height)


def read_landmarks(filesystem: pafs.FileSystem, ref: SampleRef) -> dict[str, np.ndarray]:
    """The ``landmarks/`` folder's 2D/3D-contour landmarks of a non-flipped 300W-LP sample."""
    if ref.landmarks_path is None:
        raise MissingFileError(ref.image_path, "300W-LP ships landmark files for unflipped images only")
    return parse_pts_mat(read_bytes(filesystem, ref.landmarks_path), ref.landmarks_path)
