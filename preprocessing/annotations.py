"""Reading one 300W-LP / AFLW2000-3D sample: the .mat annotation and the image.

A bad file raises a :class:`~preprocessing.errors.DatasetError` subclass naming the file and the
reason; nothing is silently skipped here (callers decide whether to quarantine or stop).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

from models.params import NUM_EXPRESSION, NUM_SHAPE
from preprocessing.errors import (
    CorruptAnnotationError,
    CorruptImageError,
    InvalidValueError,
    MissingFieldError,
)

# Fields the 62-d label is built from, with the minimum shape each must have.
LABEL_FIELDS = {"Pose_Para": 7, "Shape_Para": NUM_SHAPE, "Exp_Para": NUM_EXPRESSION}
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
# A complete JPEG ends with EOI; some writers append a few padding bytes after it.
_JPEG_TAIL_SEARCH = 64
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG frame headers (SOF0..SOF15) carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0..7, SOI, EOI.
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xDA)})
_JPEG_SOS = 0xDA
# Largest image side decoded by default. 300W-LP and AFLW2000-3D images are 450x450; a side of
# 8,000 px (192 MB decoded as BGR) admits any camera photo of a face and refuses the headers that
# claim tens of thousands of pixels to make a decoder allocate gigabytes.
MAX_IMAGE_SIDE_PX = 8000


@dataclass(frozen=True)
class MatAnnotation:
    """The fields of a 300W-LP / AFLW2000-3D .mat file that the project uses.

    Attributes:
        path: where it was read from.
        pose_para: (7,) pitch, yaw, roll [rad], tx, ty, tz, scale (image coordinates, y up).
        shape_para: (S,) identity coefficients, S >= 40 (199 in the real files).
        exp_para: (E,) expression coefficients, E >= 10 (29 in the real files).
        pt2d: (2, K) 2D landmarks in 1-based image pixels (68 in 300W-LP, 21 in AFLW2000-3D;
            -1 marks a missing point), or None.
        pt3d_68: (3, 68) 3D landmarks in image coordinates (AFLW2000-3D), or None.
        roi: (4,) the dataset's own face box, or None.
    """

    path: str
    pose_para: np.ndarray
    shape_para: np.ndarray
    exp_para: np.ndarray
    pt2d: np.ndarray | None = None
    pt3d_68: np.ndarray | None = None
    roi: np.ndarray | None = None

    @property
    def scale(self) -> float:
        return float(self.pose_para[6])


def parse_mat(data: bytes, path: str, require_pt3d: bool = False) -> MatAnnotation:
    """Parse the bytes of a .mat file into a validated :class:`MatAnnotation`."""
    if not data:
        raise CorruptAnnotationError(path, "empty file")
    try:
        raw = scipy.io.loadmat(io.BytesIO(data))
    except (MatReadError, ValueError, TypeError, OSError, EOFError, IndexError, KeyError,
            NotImplementedError, zlib.error) as err:  # NotImplementedError: a v7.3 (HDF5) file
        raise CorruptAnnotationError(path, f"not a readable MAT file ({type(err).__name__}: {err})") from err
    fields: dict[str, np.ndarray] = {}
    for key, min_size in LABEL_FIELDS.items():
        if key not in raw:
            raise MissingFieldError(path, f"field '{key}' is missing")
        value = _numeric(path, key, raw[key]).reshape(-1)
        if value.size < min_size:
            raise _invalid(path, f"field '{key}' has {value.size} values, expected >= {min_size}")
        fields[key] = value
    pose = fields["Pose_Para"][:7]
    if pose[6] == 0:
        raise _invalid(path, "field 'Pose_Para' has scale 0")
    optional = {}
    for key, rows in (("pt2d", 2), ("pt3d_68", 3)):
        if key in raw:
            value = _numeric(path, key, raw[key])
            if value.ndim != 2 or value.shape[0] != rows:
                raise _invalid(path, f"field '{key}' has shape {value.shape}, expected ({rows}, K)")
            optional[key] = value
    if require_pt3d and "pt3d_68" not in optional:
        raise MissingFieldError(path, "field 'pt3d_68' is missing")
    if "pt3d_68" in optional and optional["pt3d_68"].shape != (3, 68):
        shape = optional["pt3d_68"].shape
        raise _invalid(path, f"field 'pt3d_68' has shape {shape}, expected (3, 68)")
    roi = _numeric(path, "roi", raw["roi"]).reshape(-1)[:4] if "roi" in raw else None
    return MatAnnotation(
        path=path, pose_para=pose, shape_para=fields["Shape_Para"], exp_para=fields["Exp_Para"],
        pt2d=optional.get("pt2d"), pt3d_68=optional.get("pt3d_68"), roi=roi,
    )


def _invalid(path: str, reason: str) -> InvalidValueError:
    """A bad value found while reading the file (the quarantine's ``read`` stage)."""
    return InvalidValueError(path, reason, stage="read")


def _numeric(path: str, key: str, value: object) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "iuf":
        raise _invalid(path, f"field '{key}' is not numeric (dtype {array.dtype})")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise _invalid(path, f"field '{key}' holds NaN or inf")
    return array


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, walking the marker segments before it."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            at += 2
            continue
        if marker == _JPEG_SOS:  # the scan starts: no frame header came before it
            return None
        (length,) = struct.unpack(">H", data[at + 2:at + 4])
        if marker in _JPEG_SOF_MARKERS:
            if at + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return width, height
        if length < 2:
            return None
        at += 2 + length
    return None


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG (frame header) or PNG (IHDR) claims, read without decoding; None
    for any other format or a header that does not parse."""
    if data[:2] == _JPEG_SOI:
        return _jpeg_size(data)
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    return None


def check_image_header(data: bytes, path: str, max_side: int = MAX_IMAGE_SIDE_PX) -> tuple[int, int]:
    """The (width, height) of a JPEG or PNG, from its header alone; a CorruptImageError for an
    empty, truncated or unknown file, a header without a size, or a side beyond ``max_side``."""
    if not data:
        raise CorruptImageError(path, "empty file")
    if data[:2] == _JPEG_SOI and _JPEG_EOI not in data[-_JPEG_TAIL_SEARCH:]:
        raise CorruptImageError(path, "truncated JPEG (no end-of-image marker)")
    size = image_header_size(data)
    if size is None:
        kind = "a JPEG without a frame header" if data[:2] == _JPEG_SOI else \
            "a PNG without an IHDR header" if data[:8] == _PNG_SIGNATURE else \
            f"neither JPEG nor PNG (starts with {data[:8]!r})"
        raise CorruptImageError(path, f"not a decodable image ({kind})")
    width, height = size
    if min(width, height) == 0:
        raise CorruptImageError(path, f"not a decodable image (header gives a {width}x{height} px size)")
    if max(width, height) > max_side:
        raise CorruptImageError(path, f"image header claims {width}x{height} px, beyond the ceiling of "
                                      f"{max_side} px a side (max_image_side); not decoded")
    return width, height


def decode_image(data: bytes, path: str, max_side: int = MAX_IMAGE_SIDE_PX) -> np.ndarray:
    """Decode JPEG or PNG bytes to (H, W, 3) uint8 BGR, after :func:`check_image_header`.

    Every decoder failure is a CorruptImageError. EXIF orientation is ignored: the annotations
    were made on the stored pixel array (MATLAB's ``imread`` does not rotate), and the decoded size
    is then the header's.
    """
    width, height = check_image_header(data, path, max_side)
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8),
                             cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise CorruptImageError(path, f"not a decodable image (OpenCV: {reason})") from err
    if image is None:
        raise CorruptImageError(path, "not a decodable image")
    if image.shape[:2] != (height, width):
        raise CorruptImageError(path, f"decodes to {image.shape[1]}x{image.shape[0]} px but its header "
                                      f"says {width}x{height} px")
    return image


def parse_pts_mat(data: bytes, path: str) -> dict[str, np.ndarray]:
    """A 300W-LP ``landmarks/*_pts.mat`` file -> ``{"pts_2d": (2, 68), "pts_3d": (2, 68)}``."""
    try:
        raw = scipy.io.loadmat(io.BytesIO(data))
    except (MatReadError, ValueError, TypeError, OSError, EOFError, IndexError, KeyError,
            zlib.error) as err:
        raise CorruptAnnotationError(path, f"not a readable MAT file ({type(err).__name__}: {err})") from err
    out = {}
    for key in ("pts_2d", "pts_3d"):
        if key not in raw:
            raise MissingFieldError(path, f"field '{key}' is missing")
        value = _numeric(path, key, raw[key])
        if value.shape != (68, 2):
            raise _invalid(path, f"field '{key}' has shape {value.shape}, expected (68, 2)")
        out[key] = value.T
    return out
