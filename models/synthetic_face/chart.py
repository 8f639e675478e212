"""The head's frame, the face chart, and the smooth shapes the surface is made of.

The head is star-shaped around :data:`CENTRE`: every vertex is ``CENTRE + r * direction``. The
face chart names a direction by (a, b), the x and y where its ray leaves an ellipsoid lying close
to the face, so features are placed in roughly frontal x and y ("chart units", model units).
"""

from __future__ import annotations

import numpy as np

CENTRE = np.array([0.0, 15000.0, 0.0])  # the point in the skull every vertex direction starts at
CHART_CENTRE = np.array([0.0, -10000.0, 15000.0])  # centre of the chart ellipsoid
CHART_AXES = np.array([85000.0, 125000.0, 90000.0])  # its semi-axes (x, y, z)
Vec3 = tuple[float, float, float]  # a point or size in model (x, y, z)
SIDES = (-1.0, 1.0)  # image-left (x < 0) then image-right: every paired feature is built in this order

_CHART_RIM = 1e-6  # least (1 - u) under the chart's square root: points past the rim land on it
_RAY_REACH = 260000.0  # farthest a superellipsoid surface may lie from CENTRE
_RAY_SAMPLES = 64  # inside/outside tests along a ray before the bisection
_BISECTIONS = 24  # halvings of the last sampled interval (4000 units / 2^24: far below a unit)
_LEAST_TAPER = 0.2  # smallest scale a taper may give the x axis


def smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 below ``lo``, 1 above ``hi``, the cubic 3t^2 - 2t^3 in between."""
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth maximum: equals max(a, b) when they differ by more than k, rounded in between."""
    return np.maximum(a, b) + np.maximum(k - np.abs(a - b), 0.0) ** 2 / (4.0 * k)


def gauss(points: np.ndarray, centre: tuple[float, ...], sigma: tuple[float, ...]) -> np.ndarray:
    """exp(-|(p - c) / sigma|^2 / 2) over the leading rows of ``points`` (D, N)."""
    d = len(centre)
    offset = (points[:d] - np.reshape(centre, (d, 1))) / np.reshape(sigma, (d, 1))
    return np.exp(-0.5 * np.sum(offset**2, axis=0))


def direction(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Unit directions (N, 3); theta = azimuth from +z toward +x, phi = elevation."""
    return np.stack([np.cos(phi) * np.sin(theta), np.sin(phi), np.cos(phi) * np.cos(theta)], axis=1)


def ellipsoid_exit(dirs: np.ndarray, centre: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Distance (N,) from CENTRE along each direction to where it leaves an ellipsoid (0: misses)."""
    o = (CENTRE - centre) / axes
    d = dirs / axes
    qa = np.sum(d * d, axis=1)
    qb = 2.0 * d @ o
    qc = o @ o - 1.0
    disc = qb * qb - 4.0 * qa * qc
    root = (-qb + np.sqrt(np.maximum(disc, 0.0))) / (2.0 * qa)
    return np.where(disc > 0, np.maximum(root, 0.0), 0.0)


def sphere_exit(dirs: np.ndarray, centre: np.ndarray, radius: np.ndarray | float) -> np.ndarray:
    """Distance (N,) from CENTRE along each direction to where it leaves a sphere (0: misses)."""
    o = CENTRE - centre
    qb = dirs @ o
    disc = qb * qb - (o @ o - radius**2)
    return np.where(disc > 0, -qb + np.sqrt(np.maximum(disc, 0.0)), 0.0)


def superellipsoid_exit(
    dirs: np.ndarray, centre: Vec3, axes: Vec3, powers: Vec3, taper: float,
) -> np.ndarray:
    """Like :func:`ellipsoid_exit` for ``sum |(p - c) / axes|^powers = 1`` (convex: powers >= 1).

    ``taper`` widens x linearly with height: the x axis is ``axes[0] * (1 + taper * dy / axes[1])``.
    The last inside sample along the ray is refined by bisection; 0 where the ray misses.
    """
    centre_arr = np.asarray(centre)
    axes_arr = np.asarray(axes)
    powers_arr = np.asarray(powers)

    def level(t: np.ndarray) -> np.ndarray:  # t (N, S) -> implicit value (N, S)
        q = (CENTRE[None, None, :] + t[..., None] * dirs[:, None, :] - centre_arr) / axes_arr
        q[..., 0] /= np.maximum(1.0 + taper * q[..., 1], _LEAST_TAPER)
        return np.sum(np.abs(q) ** powers_arr, axis=-1)

    samples = np.linspace(0.0, _RAY_REACH, _RAY_SAMPLES + 1)[1:]
    values = level(np.broadcast_to(samples, (len(dirs), samples.size)))
    inside = values < 1.0
    hit = inside.any(axis=1)
    last = samples.size - 1 - np.argmax(inside[:, ::-1], axis=1)
    lo = samples[last]
    hi = np.where(last + 1 < samples.size, samples[np.minimum(last + 1, samples.size - 1)], _RAY_REACH)
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        is_in = level(mid[:, None])[:, 0] < 1.0
        lo = np.where(is_in, mid, lo)
        hi = np.where(is_in, hi, mid)
    return np.where(hit, 0.5 * (lo + hi), 0.0)


def chart_from_directions(dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, depth), each (N,), of directions (N, 3): where their rays leave the chart ellipsoid."""
    t = ellipsoid_exit(dirs, CHART_CENTRE, CHART_AXES)
    points = CENTRE + t[:, None] * dirs
    return points[:, 0], points[:, 1], points[:, 2]


def directions_from_chart(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unit directions (N, 3) toward chart points (a, b) on the front of the chart ellipsoid."""
    u = (a / CHART_AXES[0]) ** 2 + ((b - CHART_CENTRE[1]) / CHART_AXES[1]) ** 2
    z = CHART_CENTRE[2] + CHART_AXES[2] * np.sqrt(np.clip(1.0 - u, _CHART_RIM, None))
    p = np.stack([a, b, z], axis=1) - CENTRE
    return p / np.linalg.norm(p, axis=1, keepdims=True)
