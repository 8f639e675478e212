"""Benchmark sets beside the training data: AFLW2000-3D with 3DDFA's protocol arrays, and AFLW
in 3DDFA's test layout; and the batch of cropped faces that every scoring route consumes.

AFLW2000-3D's arrays are indexed in the dataset's sorted-file order, so they describe the whole
set (2000 faces) only, checked file by file. AFLW (21,080 faces) comes as crops already cut by
their ROI boxes (``AFLW_GT_crop/``, names in ``AFLW_GT_crop.list``) with ``AFLW_GT_pts21.npy``,
``AFLW_GT_crop_roi_box.npy``, ``AFLW_GT_crop_yaws.npy`` and optionally ``AFLW_GT_pts68.npy``.
Arrays are read without pickle.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow.fs as pafs

from models.frame import CROP_SIZE, crop_image, landmark_crop_box
from models.metrics import MISSING_POINT
from preprocessing.annotations import MatAnnotation, decode_image
from preprocessing.datasets import SampleRef, read_annotation, read_image
from preprocessing.errors import DatasetError, MissingFileError
from preprocessing.labels import canonical_angles

AFLW2000_ARRAYS = {
    "pts68": "AFLW2000-3D.pts68.npy",
    "reannotated": "AFLW2000-3D-Reannotated.pts68.npy",
    "yaw_original": "AFLW2000-3D.pose.npy",
    "yaw_new": "AFLW2000-3D-new.pose.npy",
    "pts21": "AFLW2000-3D.pts21.npy",
}
AFLW_CROPS = "AFLW_GT_crop"
AFLW_LIST = "AFLW_GT_crop.list"
AFLW_ARRAYS = {"pts21": "AFLW_GT_pts21.npy", "roi_box": "AFLW_GT_crop_roi_box.npy",
               "yaw": "AFLW_GT_crop_yaws.npy"}
AFLW_PTS68 = "AFLW_GT_pts68.npy"
# On the real set the .mat's pt3d_68 and the protocol's pts68 agree to 3e-5 px (float32 copies);
# a larger difference means the folder is not the one the arrays describe.
PROTOCOL_MATCH_TOLERANCE_PX = 0.01


@dataclass(frozen=True)
class FaceBatch:
    """Benchmark faces cropped by the benchmark rule, with their ground truth.

    Attributes: stems (B,); crops (B, 120, 120, 3) BGR uint8; boxes (B, 4) the crop boxes in
    the image; truth (B, 3, 68) landmarks in image pixels; yaw_deg (B,) degrees; annotations the
    faces' .mat records and image_heights their images' heights, where the batch was read from
    the image folder (empty from the shards).
    """

    stems: list[str]
    crops: np.ndarray
    boxes: np.ndarray
    truth: np.ndarray
    yaw_deg: np.ndarray
    annotations: tuple[MatAnnotation, ...] = ()
    image_heights: tuple[int, ...] = ()


def _load_array(path: Path, tail: tuple[int | None, ...]) -> np.ndarray:
    """A protocol array of shape (M, *tail) as float64, read without pickle; None in ``tail``
    matches any length."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npy array ({err})") from err
    fits = array.ndim == 1 + len(tail) and all(
        want in (None, got) for want, got in zip(tail, array.shape[1:], strict=True))
    if not fits:
        expected = ", ".join("K" if length is None else str(length) for length in tail)
        raise ValueError(f"{path}: expected shape (M, {expected}), got {array.shape}")
    return array.astype(np.float64)



@dataclass(frozen=True)
class Aflw2000Protocol:
    """3DDFA's AFLW2000-3D arrays; row i belongs to the i-th file in sorted order.

    Attributes: pts68 (M, 3, 68) and reannotated (M, 2, 68) landmarks in image pixels; yaw_original
    and yaw_new (M,) in degrees; pts21 (M, 2, 21), -1 where invisible.
    """

    folder: Path
    pts68: np.ndarray
    reannotated: np.ndarray
    yaw_original: np.ndarray
    yaw_new: np.ndarray
    pts21: np.ndarray

    @classmethod
    def load(cls, folder: Path) -> Aflw2000Protocol:
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"{folder}: no such folder (--protocol)")
        tails = {"pts68": (3, 68), "reannotated": (2, 68), "yaw_original": (), "yaw_new": (),
                 "pts21": (2, 21)}
        arrays = {key: _load_array(folder / AFLW2000_ARRAYS[key], tail) for key, tail in tails.items()}
        rows = {len(array) for array in arrays.values()}
        if len(rows) != 1:
            raise ValueError(f"{folder}: the arrays disagree on the number of faces ({sorted(rows)})")
        return cls(folder=folder, **arrays)

    def __len__(self) -> int:
        return len(self.pts68)



    def check_row(self, row: int, pt3d_68: np.ndarray, stem: str) -> None:
        """The file at sorted position ``row`` must carry the landmarks of that row."""
        difference = float(np.abs(pt3d_68 - self.pts68[row]).max())
        if difference > PROTOCOL_MATCH_TOLERANCE_PX:
            raise DatasetError(
                f"{stem}.mat",
                f"pt3d_68 differs from row {row} of {self.folder / AFLW2000_ARRAYS['pts68']} by "
                f"{difference:.3g} px: not the AFLW2000-3D set the arrays describe",
            )


def aflw2000_batches(filesystem: pafs.FileSystem, refs: list[SampleRef], batch_size: int,
                     protocol: Aflw2000Protocol | None = None) -> Iterator[FaceBatch]:
    """AFLW2000-3D image files cropped by the benchmark rule from their ``pt3d_68``, in batches.

    With ``protocol`` every file's pt3d_68 is checked against its row before its batch is read.
    """
    for start in range(0, len(refs), batch_size):
        batch = refs[start:start + batch_size]
        annotations = [read_annotation(filesystem, ref) for ref in batch]
        if protocol is not None:
            for row, annotation in enumerate(annotations, start=start):
                protocol.check_row(row, annotation.pt3d_68, batch[row - start].stem)
        images = [read_image(filesystem, ref) for ref in batch]
        boxes = [landmark_crop_box(annotation.pt3d_68) for annotation in annotations]
        yield FaceBatch(
            stems=[ref.stem for ref in batch],
            crops=np.stack([crop_image(image, box) for image, box in zip(images, boxes, strict=True)]),
            boxes=np.array(boxes),
            truth=np.array([annotation.pt3d_68 for annotation in annotations]),
            yaw_deg=np.array([np.rad2deg(canonical_angles(a.pose_para)[1]) for a in annotations]),
            annotations=tuple(annotations),
            image_heights=tuple(image.shape[0] for image in images),
        )


@dataclass(frozen=True)
class AflwSet:
    """AFLW in 3DDFA's test layout: crop names in array order and the protocol arrays.

    Attributes: names (M,) relative to ``crop_folder``; pts21 (M, 2, 21) image pixels, -1 where
    invisible; roi_box (M, 4) the crop boxes; yaw (M,) degrees; pts68 (M, 2+, 68) or None.
    """

    crop_folder: Path
    names: list[str]
    pts21: np.ndarray
    roi_box: np.ndarray
    yaw: np.ndarray
    pts68: np.ndarray | None
    normaliser: str

    @classmethod
    def open(cls, folder: Path, protocol_folder: Path | None) -> AflwSet:
        folder = Path(folder)
        protocol_folder = Path(protocol_folder) if protocol_folder is not None else folder
        for path in (folder / AFLW_CROPS, protocol_folder):
            if not path.is_dir():
                raise ValueError(f"{path}: no such folder (AFLW in 3DDFA's test layout)")
        list_path = folder / AFLW_LIST
        if not list_path.is_file():
            raise ValueError(f"{list_path}: no such file (the crop names, one a line)")
        names = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
        pts21 = _load_array(protocol_folder / AFLW_ARRAYS["pts21"], (2, 21))
        roi_box = _load_array(protocol_folder / AFLW_ARRAYS["roi_box"], (4,))
        yaw = _load_array(protocol_folder / AFLW_ARRAYS["yaw"], ())
        pts68_path = protocol_folder / AFLW_PTS68
        pts68 = _load_array(pts68_path, (None, 68))[:, :2] if pts68_path.is_file() else None
        sizes = {len(names), len(pts21), len(roi_box), len(yaw)}
        sizes |= {len(pts68)} if pts68 is not None else set()
        if len(sizes) != 1:
            raise ValueError(f"{list_path} lists {len(names)} crops but the arrays in {protocol_folder} "
                             f"hold {len(pts21)} / {len(roi_box)} / {len(yaw)} rows")
        if len(set(names)) != len(names):
            raise ValueError(f"{list_path}: a crop is listed twice")
        visible = (pts21[:, 0] != MISSING_POINT) & (pts21[:, 1] != MISSING_POINT)  # (M, 21)
        blind = np.flatnonzero(~visible.any(axis=1))
        if blind.size:
            raise ValueError(f"{protocol_folder / AFLW_ARRAYS['pts21']}: row {blind[0]} has no visible point")
        normaliser = (f"bbox of {pts68_path}" if pts68 is not None else
                      f"bbox of the visible 21 points ({AFLW_PTS68} not in {protocol_folder}; the papers "
                      "use the 68-point bbox, so figures are not comparable with theirs)")
        return cls(folder / AFLW_CROPS, names, pts21, roi_box, yaw, pts68, normaliser)



def read_crop(path: Path) -> np.ndarray:
    """A 3DDFA test crop as (120, 120, 3) BGR uint8 (resized if stored at another size)."""
    if not path.is_file():
        raise MissingFileError(str(path), "file does not exist")
    image = decode_image(path.read_bytes(), str(path))
    if image.shape[:2] != (CROP_SIZE, CROP_SIZE):
        # The crop spans the ROI box whatever its pixel size, so resizing keeps the mapping.
        image = cv2.resize(image, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LINEAR)
    return image




def aflw_batches(aflw: AflwSet, batch_size: int) -> Iterator[tuple[range, np.ndarray]]:
    """AFLW's crops in batches: (the rows of the arrays, crops (B, 120, 120, 3))."""
    for start in range(0, len(aflw.names), batch_size):
        rows = range(start, min(start + batch_size, len(aflw.names)))
        yield rows, np.stack([read_crop(aflw.crop_folder / aflw.names[i]) for i in rows])
