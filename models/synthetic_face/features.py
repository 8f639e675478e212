"""Where the facial features lie: eyelids, mouth, lips, eyebrows (chart units) and the hairline.

Every later stage (vertex sampling, the surface, landmarks, colours, expression modes) reads the
features from these curves, so they sit in one place. Paired features are given for the
image-left side (x < 0); the other side is their mirror image.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from models.synthetic_face.chart import smoothstep


class LidMargin(NamedTuple):
    """One eyelid margin: ``height * sin(pi * tau^skew)^fullness`` off the corner line."""

    height: float  # peak distance from the line through the corners, chart units
    skew: float  # exponent of tau: > 1 moves the peak toward the inner corner, < 1 toward the temple
    fullness: float  # exponent of the sine: < 1 flattens the arc


class LipProfile(NamedTuple):
    """Vermilion height across the mouth: ``height * (1 - r^taper)^fullness``, r = |a| / MOUTH_OUTER."""

    height: float  # at the midline, chart units
    taper: float
    fullness: float


class BowCurve(NamedTuple):
    """A term of the cupid's bow: ``height * exp(-((|a| - centre) / width)^2)``."""

    height: float
    centre: float  # |a| of its extreme
    width: float


class BrowPoint(NamedTuple):
    """A point of the image-left eyebrow's centre line, which runs through one landmark."""

    landmark: int  # iBUG index (0-based)
    a: float
    b: float
    half_thickness: float


# Eyes: the image-left one (x < 0); corners as chart (a, b).
_EYE_OUTER = np.array([-43500.0, 27000.0])  # outer corner
_EYE_INNER = np.array([-19500.0, 25800.0])  # inner corner
_UPPER_LID = LidMargin(5600.0, 1.15, 0.85)  # peaks a little toward the nose
_LOWER_LID = LidMargin(3600.0, 0.9, 0.9)  # dips a little toward the temple
EYE_SAMPLES = 19  # vertices along each lid row, corners included
EYE_FRACTIONS = (0.2, 0.4, 0.6, 0.8)  # rows inside the opening, from lower to upper margin

# Mouth: inner-lip corners at a = +-MOUTH_INNER, outer corners at +-MOUTH_OUTER.
MOUTH_INNER = 24000.0
MOUTH_OUTER = 26000.0
_MOUTH_LINE = -43500.0  # chart b of the line where the lips meet, at the midline
_MOUTH_CORNER_RISE = 2000.0  # how much higher that line is at the inner corners
_MOUTH_GAP = 3600.0  # chart height of the inner-mouth band at the midline (collapsed in the mean)
_MOUTH_GAP_POWER = 0.35  # exponent of the band's height profile toward the corners
_MOUTH_WARP = 8000.0  # how far above and below the band its collapse is spread out
MOUTH_SAMPLES = 31  # vertex columns across the mouth, inner corners included
BAND_FRACTIONS = (0.0, 0.12, 0.5, 0.88, 1.0)  # band rows: upper inner lip ... lower inner lip

_UPPER_LIP = LipProfile(7600.0, 2.2, 0.7)
_LOWER_LIP = LipProfile(10000.0, 2.0, 0.8)
_BOW_DIP = BowCurve(1300.0, 0.0, 2600.0)  # the upper lip's notch under the philtrum
_BOW_PEAKS = BowCurve(700.0, 5800.0, 3000.0)  # the two peaks either side of it

# The image-left eyebrow, outer -> inner; the mirror image runs through landmarks 26 ... 22.
BROW_POINTS = (
    # landmark, a, b, half-thickness
    BrowPoint(17, -58000.0, 37000.0, 2400.0),
    BrowPoint(18, -47500.0, 43500.0, 3200.0),
    BrowPoint(19, -36000.0, 46500.0, 3600.0),
    BrowPoint(20, -24000.0, 46000.0, 3900.0),
    BrowPoint(21, -12000.0, 42500.0, 4300.0),
)

# Hairline: lowest elevation of scalp hair (degrees) against |azimuth| from the face (degrees).
_HAIRLINE = (
    # |azimuth|, elevation
    (0.0, 46.0), (25.0, 44.0), (45.0, 38.0), (60.0, 30.0), (72.0, 20.0), (80.0, 5.0), (85.0, 8.0),
    (92.0, 26.0), (100.0, 26.0), (110.0, 10.0), (120.0, -20.0), (150.0, -35.0), (180.0, -40.0),
)
_HAIRLINE_SOFTNESS = 2.0  # degrees either side of the hairline over which hair fades in


def eye_rows(side: float) -> dict[str, np.ndarray]:
    """Lid rows of one eye (side -1: x < 0), outer -> inner corner, each (EYE_SAMPLES,).

    Returns: ``a``, and the chart b of the ``lower`` and ``upper`` lid margins.
    """
    tau = np.linspace(0.0, 1.0, EYE_SAMPLES)
    outer, inner = _EYE_OUTER, _EYE_INNER
    a = outer[0] + tau * (inner[0] - outer[0])
    base = outer[1] + tau * (inner[1] - outer[1])
    upper = base + _UPPER_LID.height * np.sin(np.pi * tau ** _UPPER_LID.skew) ** _UPPER_LID.fullness
    lower = base - _LOWER_LID.height * np.sin(np.pi * tau ** _LOWER_LID.skew) ** _LOWER_LID.fullness
    return {"a": a if side < 0 else -a, "lower": lower, "upper": upper}


def mouth_line(a: np.ndarray) -> np.ndarray:
    """Chart b where the lips meet, at chart a."""
    return _MOUTH_LINE + _MOUTH_CORNER_RISE * (a / MOUTH_INNER) ** 2


def mouth_gap(a: np.ndarray) -> np.ndarray:
    """Chart height of the inner-mouth band at chart a (0 beyond the inner corners)."""
    return _MOUTH_GAP * np.clip(1.0 - (a / MOUTH_INNER) ** 2, 0.0, None) ** _MOUTH_GAP_POWER


def _lip_height(a: np.ndarray, lip: LipProfile) -> np.ndarray:
    r = np.clip(np.abs(a) / MOUTH_OUTER, 0.0, 1.0)
    return lip.height * (1.0 - r**lip.taper) ** lip.fullness


def _bow(a: np.ndarray, curve: BowCurve) -> np.ndarray:
    return curve.height * np.exp(-(((np.abs(a) - curve.centre) / curve.width) ** 2))


def upper_lip_height(a: np.ndarray) -> np.ndarray:
    """Vermilion height of the upper lip above the mouth line, with a cupid's bow."""
    return _lip_height(a, _UPPER_LIP) - _bow(a, _BOW_DIP) + _bow(a, _BOW_PEAKS)


def lower_lip_height(a: np.ndarray) -> np.ndarray:
    """Vermilion height of the lower lip below the mouth line."""
    return _lip_height(a, _LOWER_LIP)


def mouth_warp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chart b after collapsing the inner-mouth band onto the mouth line (monotone in b)."""
    line = mouth_line(a)
    half = 0.5 * mouth_gap(a)
    above = b - (line + half)
    below = (line - half) - b
    falloff_above = np.clip(1.0 - above / _MOUTH_WARP, 0.0, 1.0) ** 2
    falloff_below = np.clip(1.0 - below / _MOUTH_WARP, 0.0, 1.0) ** 2
    out = np.where(above >= 0, b - half * falloff_above, line)
    return np.where(below >= 0, b + half * falloff_below, out)


def brow_curve(side: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eyebrow centre line (a, b) and half-thickness, each (5,), outer -> inner."""
    a = np.array([point.a for point in BROW_POINTS])
    b = np.array([point.b for point in BROW_POINTS])
    thickness = np.array([point.half_thickness for point in BROW_POINTS])
    return (a if side < 0 else -a), b, thickness


def hair_weight(dirs: np.ndarray) -> np.ndarray:
    """Soft scalp-hair membership (N,) in [0, 1] of directions (N, 3) from CENTRE."""
    azimuth = np.degrees(np.abs(np.arctan2(dirs[:, 0], dirs[:, 2])))
    elevation = np.degrees(np.arcsin(np.clip(dirs[:, 1], -1.0, 1.0)))
    line = np.interp(azimuth, *zip(*_HAIRLINE, strict=True))
    return smoothstep(elevation - line, -_HAIRLINE_SOFTNESS, _HAIRLINE_SOFTNESS)
