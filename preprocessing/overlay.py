"""Pictures: landmarks drawn on crops, and crops tiled into one sheet."""

from __future__ import annotations

import cv2
import numpy as np

# The iBUG 68 groups drawn as polylines (0-based, end exclusive), closed where the shape is.
LANDMARK_GROUPS = ((0, 17, False), (17, 22, False), (22, 27, False), (27, 31, False),
                   (31, 36, False), (36, 42, True), (42, 48, True), (48, 60, True), (60, 68, True))


def draw_landmarks(
    image: np.ndarray, landmarks: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0),
    upscale: int = 3,
) -> np.ndarray:
    """A copy of ``image`` (H, W, 3) enlarged ``upscale`` times with landmarks (2+, 68) drawn.

    Landmarks are in the image's 1-based pixel coordinates (see :mod:`preprocessing.geometry`).
    """
    canvas = cv2.resize(image, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_LINEAR)
    # Pixel centre (x, y) (1-based) sits at upscale * (x - 0.5) in the enlarged image.
    points = (np.asarray(landmarks[:2], dtype=np.float64).T - 0.5) * upscale
    for start, end, closed in LANDMARK_GROUPS:
        polyline = np.round(points[start:end]).astype(np.int32)
        cv2.polylines(canvas, [polyline], closed, colour, 1, cv2.LINE_AA)
    for x, y in np.round(points).astype(np.int32):
        cv2.circle(canvas, (int(x), int(y)), 2, colour, -1, cv2.LINE_AA)
    return canvas


def tile(images: list[np.ndarray], columns: int, gap: int = 4) -> np.ndarray:
    """Equal-sized (H, W, 3) images in a grid with ``columns`` columns on a white background."""
    if not images:
        raise ValueError("tile needs at least one image")
    height, width = images[0].shape[:2]
    rows = -(-len(images) // columns)
    sheet = np.full((rows * (height + gap) + gap, columns * (width + gap) + gap, 3), 255, np.uint8)
    for index, image in enumerate(images):
        if image.shape[:2] != (height, width):
            raise ValueError(f"image {index} is {image.shape[:2]}, expected {(height, width)}")
        r, c = divmod(index, columns)
        y, x = gap + r * (height + gap), gap + c * (width + gap)
        sheet[y:y + height, x:x + width] = image
    return sheet
