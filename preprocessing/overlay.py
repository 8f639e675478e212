"""Pictures: landmarks and boxes drawn on images, and images tiled into one sheet.

Points are given in the picture's own 1-based pixel coordinates (:mod:`models.frame`); a canvas
enlarged by :func:`enlarge` is drawn on with the same points and its ``scale``.
"""

from __future__ import annotations

import cv2
import numpy as np

from models.frame import drawing_positions

# The iBUG 68 groups drawn as polylines (0-based, end exclusive), closed where the shape is.
LANDMARK_GROUPS = ((0, 17, False), (17, 22, False), (22, 27, False), (27, 31, False),
                   (31, 36, False), (36, 42, True), (42, 48, True), (48, 60, True), (60, 68, True))
LANDMARK_BGR = (0, 255, 0)
BOX_BGR = (255, 128, 0)
FLAGGED_BGR = (0, 0, 255)
TRUTH_BGR = (255, 0, 255)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """``image`` (H, W, 3) resized ``scale`` times (bilinear), for drawing on at a finer grain."""
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)


def draw_landmarks(
    canvas: np.ndarray, landmarks: np.ndarray, colour: tuple[int, int, int] = LANDMARK_BGR,
    scale: int = 1,
) -> np.ndarray:
    """A copy of ``canvas`` with the 68 landmarks (2+, 68) drawn as points and outlines.

    ``landmarks`` are in 1-based pixels of the picture before it was enlarged ``scale`` times.
    """
    canvas = canvas.copy()
    points = drawing_positions(landmarks, scale)
    for start, end, closed in LANDMARK_GROUPS:
        polyline = np.round(points[start:end]).astype(np.int32)
        cv2.polylines(canvas, [polyline], closed, colour, 1, cv2.LINE_AA)
    for x, y in np.round(points).astype(np.int32):
        cv2.circle(canvas, (int(x), int(y)), 2, colour, -1, cv2.LINE_AA)
    return canvas


def draw_box(canvas: np.ndarray, box: np.ndarray, colour: tuple[int, int, int] = BOX_BGR,
             scale: int = 1) -> np.ndarray:
    """A copy of ``canvas`` with the box (sx, sy, ex, ey), 1-based pixels, drawn."""
    canvas = canvas.copy()
    corners = np.round(drawing_positions(np.reshape(box, (2, 2)).T, scale)).astype(int)  # (2, 2)
    cv2.rectangle(canvas, tuple(int(v) for v in corners[0]), tuple(int(v) for v in corners[1]), colour, 1)
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


def caption(canvas: np.ndarray, lines: list[str], colour: tuple[int, int, int] = (0, 0, 0),
            scale: float = 0.4) -> np.ndarray:
    """``canvas`` with a white band above it holding ``lines``, each wrapped to the canvas width
    (so the text stays inside the frame and covers nothing)."""
    width = canvas.shape[1]
    wrapped: list[str] = []
    for line in lines:
        words, current = line.split(), ""
        for word in words:
            trial = f"{current} {word}".strip()
            if current and cv2.getTextSize(trial, FONT, scale, 1)[0][0] > width - 8:
                wrapped.append(current)
                current = word
            else:
                current = trial
        wrapped.append(current)
    step = int(cv2.getTextSize("Ag", FONT, scale, 1)[0][1] * 1.8) + 2
    band = np.full((step * len(wrapped) + 4, width, 3), 255, np.uint8)
    for row, text in enumerate(wrapped):
        cv2.putText(band, text, (4, step * (row + 1)), FONT, scale, colour, 1, cv2.LINE_AA)
    return np.concatenate([band, canvas], axis=0)


def legend(canvas: np.ndarray, entries: list[tuple[str, tuple[int, int, int]]], scale: float = 0.4,
           ) -> np.ndarray:
    """``canvas`` with a white band above it naming each colour drawn on it: a swatch, then its
    label, entries wrapped to the canvas width."""
    width = canvas.shape[1]
    text_height = cv2.getTextSize("Ag", FONT, scale, 1)[0][1]
    swatch, step = text_height + 2, int(text_height * 1.8) + 4
    placed: list[tuple[int, int, str, tuple[int, int, int]]] = []  # row, x, label, colour
    row, x = 0, 4
    for label, colour in entries:
        needed = swatch + 4 + cv2.getTextSize(label, FONT, scale, 1)[0][0] + 12
        if x > 4 and x + needed > width:
            row, x = row + 1, 4
        placed.append((row, x, label, colour))
        x += needed
    band = np.full((step * (row + 1) + 4, width, 3), 255, np.uint8)
    for row, x, label, colour in placed:
        baseline = step * (row + 1)
        cv2.rectangle(band, (x, baseline - swatch + 1), (x + swatch, baseline), colour, -1)
        cv2.putText(band, label, (x + swatch + 4, baseline), FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, canvas], axis=0)

