"""A small z-buffered software rasteriser for synthetic faces (numpy + OpenCV only).

Coordinates follow the 300W-LP .mat convention. :func:`render_mesh` takes vertices already in
image space, ``(x_img, y_img, z)`` with ``x_img = X_x``, ``y_img = H + 1 - X_y`` (1-based: the
centre of array pixel ``[r, c]`` is at ``(c + 1, r + 1)``) and ``z = X_z``, larger = closer to the
camera, where ``X = f R S + t`` is the posed model in a right-handed frame (x right, y up, z
toward the viewer). Lighting is given in that camera frame. Projection is orthographic.

Rasterisation: triangles are culled when they face away (the meshes rendered here are closed),
grouped by the size of their pixel bounding box and tested against every pixel centre of the box
at once; each pixel keeps its nearest fragment (a true per-pixel depth test, independent of
triangle order). Shading is Gouraud: ambient + Lambert diffuse + Blinn-Phong specular per vertex,
from area-weighted vertex normals of the posed mesh, interpolated with barycentric weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

# Bounding-box sides (pixels) that triangles are padded up to before being tested as one batch.
_BOX_SIDES = 2 ** np.arange(31)
# Candidate pixels tested at once at most (bounds memory when a few huge triangles cover a lot).
_BATCH_PIXELS = 1 << 21
# Triangles whose doubled projected area (pixels^2, camera frame) is below this are skipped.
_MIN_FACING = 1e-12


@dataclass(frozen=True, eq=False)
class Lighting:
    """One directional light plus ambient light, in the camera frame (x right, y up, z to viewer).

    Attributes:
        direction: (3,) unit vector pointing from the surface towards the light (normalised on
            construction); ``(0, 0, 1)`` lights the face from the camera.
        ambient: ambient intensity (multiplies albedo), >= 0.
        diffuse: Lambert intensity, >= 0.
        specular: Blinn-Phong intensity (added, not multiplied by albedo), >= 0.
        shininess: Blinn-Phong exponent, > 0.
        colour: (3,) BGR multiplier of the light, >= 0 (``(1, 1, 1)`` is white).
    """

    direction: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))
    ambient: float = 0.45
    diffuse: float = 0.6
    specular: float = 0.1
    shininess: float = 20.0
    colour: np.ndarray = field(default_factory=lambda: np.ones(3))

    def __post_init__(self) -> None:
        direction = np.asarray(self.direction, dtype=np.float64).reshape(-1)
        if direction.shape != (3,) or not np.all(np.isfinite(direction)):
            raise ValueError(f"Lighting.direction must be 3 finite numbers, got {self.direction!r}")
        norm = float(np.linalg.norm(direction))
        if norm == 0.0:
            raise ValueError(f"Lighting.direction must not be zero, got {self.direction!r}")
        colour = np.asarray(self.colour, dtype=np.float64).reshape(-1)
        if colour.shape != (3,) or not np.all(np.isfinite(colour)) or np.any(colour < 0):
            raise ValueError(f"Lighting.colour must be 3 finite numbers >= 0, got {self.colour!r}")
        for name in ("ambient", "diffuse", "specular"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"Lighting.{name} must be finite and >= 0, got {value!r}")
        if not np.isfinite(self.shininess) or self.shininess <= 0:
            raise ValueError(f"Lighting.shininess must be finite and > 0, got {self.shininess!r}")
        object.__setattr__(self, "direction", direction / norm)
        object.__setattr__(self, "colour", colour)


def random_lighting(rng: np.random.Generator) -> Lighting:
    """A plausible random light: mostly from the front and above, slightly tinted.

    Args:
        rng: the random generator (the only source of randomness).
    Returns:
        A :class:`Lighting` with azimuth within +-75 degrees of the camera axis, elevation in
        [-30, 70] degrees, ambient 0.2-0.6, diffuse 0.3-0.9, specular 0-0.25.
    """
    azimuth = np.deg2rad(rng.uniform(-75.0, 75.0))
    elevation = np.deg2rad(rng.uniform(-30.0, 70.0))
    direction = np.array([
        np.sin(azimuth) * np.cos(elevation), np.sin(elevation), np.cos(azimuth) * np.cos(elevation),
    ])
    tint = np.clip(1.0 + rng.normal(0.0, 0.06, 3), 0.8, 1.2)
    return Lighting(
        direction=direction,
        ambient=float(rng.uniform(0.2, 0.6)),
        diffuse=float(rng.uniform(0.3, 0.9)),
        specular=float(rng.uniform(0.0, 0.25)),
        shininess=float(rng.uniform(5.0, 40.0)),
        colour=tint / tint.max() * rng.uniform(0.9, 1.1),
    )


def random_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A cluttered random background, so a network cannot find the face by colour alone.

    A two-colour gradient, then filled and outlined rectangles, ellipses, polygons and lines in
    random colours (skin-like ones included), low-frequency colour blotches, fine noise and a
    mild blur.

    Args:
        rng: the random generator (the only source of randomness).
        height, width: image size in pixels, >= 1.
    Returns:
        (height, width, 3) uint8 BGR image.
    """
    if height < 1 or width < 1:
        raise ValueError(f"background size must be >= 1x1, got {height}x{width}")
    # Gradient plus low-frequency blotches, drawn on a coarse grid and upsampled smoothly (a
    # linear ramp survives the resize exactly, and the full-size image is touched only once).
    cells = int(rng.integers(3, 8))
    grid = np.linspace(-1.0, 1.0, cells)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = (np.cos(angle) * grid[None, :] + np.sin(angle) * grid[:, None]) * 0.5 + 0.5
    start, end = _random_colours(rng, 2)
    coarse = start + ramp[..., None] * (end - start) + rng.uniform(-40.0, 40.0, (cells, cells, 3))
    coarse = np.clip(coarse, 0, 255).astype(np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)

    scale = max(height, width)
    for _ in range(int(rng.integers(12, 40))):
        colour = tuple(int(c) for c in _random_colours(rng, 1)[0])
        kind = int(rng.integers(5))
        filled = rng.random() < 0.6
        thickness = -1 if filled else int(rng.integers(1, max(2, scale // 60)))
        centre = (int(rng.integers(-width // 8, width + width // 8)),
                  int(rng.integers(-height // 8, height + height // 8)))
        size = int(rng.integers(max(2, scale // 40), max(3, scale // 3)))
        if kind == 0:
            corner = (centre[0] + int(rng.integers(-size, size)),
                      centre[1] + int(rng.integers(-size, size)))
            cv2.rectangle(image, centre, corner, colour, thickness, cv2.LINE_AA)
        elif kind == 1:
            axes = (size, int(rng.integers(max(1, size // 4), size + 1)))
            cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, thickness,
                        cv2.LINE_AA)
        elif kind == 2:
            count = int(rng.integers(3, 7))
            points = np.array(centre) + rng.integers(-size, size + 1, (count, 2))
            points = points.astype(np.int32).reshape(-1, 1, 2)
            if filled:
                cv2.fillPoly(image, [points], colour, cv2.LINE_AA)
            else:
                cv2.polylines(image, [points], True, colour, thickness, cv2.LINE_AA)
        else:
            end_point = (centre[0] + int(rng.integers(-2 * size, 2 * size)),
                         centre[1] + int(rng.integers(-2 * size, 2 * size)))
            cv2.line(image, centre, end_point, colour, int(rng.integers(1, max(2, scale // 50))),
                     cv2.LINE_AA)

    # Texture: fine colour noise of random strength, with saturating uint8 arithmetic.
    amplitude = int(rng.integers(3, 16))
    noise = rng.integers(0, 2 * amplitude + 1, (height, width, 3), dtype=np.uint8)
    image = cv2.subtract(cv2.add(image, noise), np.full_like(image, amplitude))
    sigma = float(rng.uniform(0.3, 1.5))
    return cv2.GaussianBlur(image, (0, 0), sigma)


def _random_colours(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 3) BGR colours in [0, 255]: random ones of random saturation and, a third of the
    time, skin-like ones."""
    colours = rng.uniform(0.0, 255.0, (count, 3))
    grey = colours.mean(axis=1, keepdims=True)
    colours = grey + (colours - grey) * rng.uniform(0.2, 1.0, (count, 1))
    skin_like = rng.random(count) < 0.33
    if np.any(skin_like):
        base = np.array([0.55, 0.68, 0.88]) * 255.0
        shade = rng.uniform(0.35, 1.1, (count, 1))
        skin = np.clip(base * shade + rng.normal(0, 12, (count, 3)), 0, 255)
        colours[skin_like] = skin[skin_like]
    return colours


def render_mesh(
    vertices_image: np.ndarray,
    triangles: np.ndarray,
    vertex_colors: np.ndarray,
    background: np.ndarray,
    light: Lighting,
) -> tuple[np.ndarray, np.ndarray]:
    """Render a shaded triangle mesh over a background with a per-pixel depth test.

    Args:
        vertices_image: (3, N) float, rows ``x_img, y_img, z`` in 1-based image coordinates
            (pixel ``[r, c]`` centred at ``(c + 1, r + 1)``), z larger = nearer the camera.
        triangles: (T, 3) int vertex ids, counter-clockwise seen from outside in the y-up frame
            (so clockwise on screen, where y points down); back-facing ones are culled.
        vertex_colors: (N, 3) float BGR albedo in [0, 1].
        background: (H, W, 3) uint8 BGR image; not modified.
        light: the lighting, in the camera frame (x right, y up, z toward the viewer).
    Returns:
        ``(image, mask)``: (H, W, 3) uint8 BGR and (H, W) bool, True where the mesh covers a pixel
        centre. Silhouette pixels are softened by a small blur for anti-aliasing.
    """
    vertices, tris, colours, bg = _checked_inputs(vertices_image, triangles, vertex_colors, background, light)
    n = vertices.shape[1]
    height, width = bg.shape[:2]
    image = bg.copy()
    mask = np.zeros((height, width), dtype=bool)
    if tris.size == 0 or n == 0:
        return image, mask
    tris = tris.astype(np.int64, copy=False)

    # Pixel-centre coordinates, 0-based: pixel [r, c] is at (c, r).
    px = vertices[0] - 1.0
    py = vertices[1] - 1.0
    depth = vertices[2]
    corner_x, corner_y, normals = _face_geometry(px, py, depth, tris)
    shaded = _shade_vertices(tris, *normals, colours, light, n)
    boxes = _visible_boxes(corner_x, corner_y, normals[2], height, width)
    if boxes is None:
        return image, mask
    ids, side_w, side_h, start_col, start_row = boxes
    corners = tris[ids]  # (K, 3)
    coef = _edge_coefficients(px[corners].T, py[corners].T)
    zbuffer, best_tri, best_w0, best_w1 = _depth_test(
        coef, depth[corners].T, side_w, side_h, start_col, start_row, height, width)
    covered = np.flatnonzero(zbuffer > -np.inf)
    if covered.size == 0:
        return image, mask
    _paint_covered(image, covered, corners[best_tri[covered]], best_w0[covered], best_w1[covered], shaded)
    mask.reshape(-1)[covered] = True
    return _soften_silhouette(image, mask), mask


def _checked_inputs(
    vertices_image: np.ndarray, triangles: np.ndarray, vertex_colors: np.ndarray, background: np.ndarray,
    light: Lighting,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The arguments of :func:`render_mesh` as arrays, after checking their shapes, types and values.

    Returns:
        ``(vertices, triangles, colours, background)``: (3, N) float64, (T, 3) integer as given,
        (N, 3) float32 and (H, W, 3) uint8. Raises ValueError naming the offending value.
    """
    vertices = np.asarray(vertices_image, dtype=np.float64)
    if vertices.ndim != 2 or vertices.shape[0] != 3 or not np.all(np.isfinite(vertices)):
        raise ValueError(f"vertices_image must be finite with shape (3, N), got {vertices.shape}")
    n = vertices.shape[1]
    tris = np.asarray(triangles)
    if tris.ndim != 2 or tris.shape[1] != 3 or not np.issubdtype(tris.dtype, np.integer):
        raise ValueError(
            f"triangles must be integer with shape (T, 3), got {tris.shape} {tris.dtype}")
    if tris.size and (tris.min() < 0 or tris.max() >= n):
        raise ValueError(
            f"triangles hold vertex ids outside [0, {n}): [{tris.min()}, {tris.max()}]")
    colours = np.asarray(vertex_colors, dtype=np.float32)
    if colours.shape != (n, 3):
        raise ValueError(f"vertex_colors must have shape ({n}, 3), got {colours.shape}")
    bg = np.asarray(background)
    if bg.ndim != 3 or bg.shape[2] != 3 or bg.dtype != np.uint8:
        raise ValueError(f"background must be (H, W, 3) uint8, got {bg.shape} {bg.dtype}")
    if not isinstance(light, Lighting):
        raise ValueError(f"light must be a Lighting, got {type(light).__name__}")
    return vertices, tris, colours, bg


def _face_geometry(
    px: np.ndarray, py: np.ndarray, depth: np.ndarray, tris: np.ndarray,
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Each triangle's corners and unnormalised face normal in the y-up camera frame.

    Args:
        px, py: (N,) 0-based pixel-centre coordinates of the vertices (y down).
        depth: (N,) vertex depths, larger = nearer the camera.
        tris: (T, 3) int64 vertex ids.
    Returns:
        ``(corner_x, corner_y, normal)``: the corners' x and y (y up, i.e. ``-py``), three (T,)
        arrays each, and the normal's x, y and z components (T,); z > 0 faces the camera.
    """
    x0, x1, x2 = px[tris[:, 0]], px[tris[:, 1]], px[tris[:, 2]]
    y0, y1, y2 = -py[tris[:, 0]], -py[tris[:, 1]], -py[tris[:, 2]]
    z0, z1, z2 = depth[tris[:, 0]], depth[tris[:, 1]], depth[tris[:, 2]]
    ax, ay, az = x1 - x0, y1 - y0, z1 - z0
    bx, by, bz = x2 - x0, y2 - y0, z2 - z0
    normal_x = ay * bz - az * by
    normal_y = az * bx - ax * bz
    normal_z = ax * by - ay * bx
    return (x0, x1, x2), (y0, y1, y2), (normal_x, normal_y, normal_z)


def _visible_boxes(
    corner_x: tuple[np.ndarray, ...], corner_y: tuple[np.ndarray, ...], normal_z: np.ndarray,
    height: int, width: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The triangles left after culling, with the padded pixel box each is tested over.

    Back faces, degenerate ones and those whose pixel-centre box is empty or off-image are
    culled. Each remaining box is padded to a power-of-two side (at most the image size) and
    moved back inside the image where it would stick out; pixels outside the true box fail the
    edge tests anyway, so no pixel index needs clipping.

    Args:
        corner_x, corner_y: the triangles' corners, three (T,) arrays each, y up.
        normal_z: (T,) z of the unnormalised face normals.
        height, width: image size in pixels.
    Returns:
        ``(ids, side_w, side_h, start_col, start_row)``, (K,) each: the kept triangles' ids and
        their padded boxes' sizes and top-left pixels; None when no triangle is kept.
    """
    x0, x1, x2 = corner_x
    y0, y1, y2 = corner_y
    col_lo = np.ceil(np.minimum(np.minimum(x0, x1), x2))
    col_hi = np.floor(np.maximum(np.maximum(x0, x1), x2))
    row_lo = np.ceil(-np.maximum(np.maximum(y0, y1), y2))
    row_hi = np.floor(-np.minimum(np.minimum(y0, y1), y2))
    np.maximum(col_lo, 0, out=col_lo)
    np.minimum(col_hi, width - 1, out=col_hi)
    np.maximum(row_lo, 0, out=row_lo)
    np.minimum(row_hi, height - 1, out=row_hi)
    keep = (normal_z > _MIN_FACING) & (col_lo <= col_hi) & (row_lo <= row_hi)
    if not np.any(keep):
        return None
    ids = np.flatnonzero(keep)
    box_w = (col_hi[ids] - col_lo[ids]).astype(np.int64) + 1
    box_h = (row_hi[ids] - row_lo[ids]).astype(np.int64) + 1
    side_w = np.minimum(_BOX_SIDES[np.searchsorted(_BOX_SIDES, box_w)], width)
    side_h = np.minimum(_BOX_SIDES[np.searchsorted(_BOX_SIDES, box_h)], height)
    start_col = np.minimum(col_lo[ids].astype(np.int64), width - side_w)
    start_row = np.minimum(row_lo[ids].astype(np.int64), height - side_h)
    return ids, side_w, side_h, start_col, start_row


def _edge_coefficients(sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """The three edge functions of each triangle on screen (x right, y down), E_i >= 0 inside.

    Each is written as (A*x + B*y) + C with the same operations for a shared edge in either
    direction, so two neighbours' values are exact negatives of each other and no pixel centre
    falls in a crack.

    Args:
        sx, sy: (3, K) screen coordinates of the triangles' corners.
    Returns:
        (3, 3, K) coefficients indexed (edge, A/B/C, triangle); edge i is opposite corner i.
    """
    coef = np.empty((3, 3, sx.shape[1]))
    for i in range(3):  # edge opposite vertex i runs from vertex i+1 to vertex i+2
        j, k = (i + 1) % 3, (i + 2) % 3
        # Front-facing (CCW in y-up) is clockwise on screen: negated so that inside is >= 0.
        coef[i, 0] = -(sy[j] - sy[k])
        coef[i, 1] = -(sx[k] - sx[j])
        coef[i, 2] = -(sx[j] * sy[k] - sx[k] * sy[j])
    return coef


def _batches(side_w: np.ndarray, side_h: np.ndarray, height: int) -> list[np.ndarray]:
    """Triangle indices grouped by equal padded box size, split so that no batch tests more than
    about ``_BATCH_PIXELS`` candidate pixels (a batch holds at least one triangle)."""
    group_key = side_w * (height + 1) + side_h
    order = np.argsort(group_key, kind="stable")
    bounds = np.flatnonzero(np.diff(group_key[order])) + 1
    batches = []
    for group in np.split(order, bounds):
        per_batch = max(1, _BATCH_PIXELS // int(side_w[group[0]] * side_h[group[0]]))
        batches.extend(group[i:i + per_batch] for i in range(0, group.size, per_batch))
    return batches


def _depth_test(
    coef: np.ndarray, tri_depth: np.ndarray, side_w: np.ndarray, side_h: np.ndarray,
    start_col: np.ndarray, start_row: np.ndarray, height: int, width: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The nearest fragment at every pixel, found batch by batch with a running z-buffer.

    Each pixel keeps its nearest fragment so far (largest z) with its triangle and barycentric
    weights; ties go to either. Independent of triangle order, and memory stays bounded by one
    batch of candidates.

    Args:
        coef: (3, 3, K) edge coefficients from :func:`_edge_coefficients`.
        tri_depth: (3, K) depths of the triangles' corners.
        side_w, side_h, start_col, start_row: (K,) the padded boxes from :func:`_visible_boxes`.
        height, width: image size in pixels.
    Returns:
        ``(zbuffer, best_tri, best_w0, best_w1)``, (H * W,) each over the flattened image: the
        nearest depth (-inf where nothing covers the pixel), its triangle's index into the K
        kept ones and its barycentric weights for corners 0 and 1.
    """
    zbuffer = np.full(height * width, -np.inf)
    best_tri = np.zeros(height * width, dtype=np.int64)
    best_w0 = np.zeros(height * width)
    best_w1 = np.zeros(height * width)
    for members in _batches(side_w, side_h, height):
        bw = int(side_w[members[0]])
        bh = int(side_h[members[0]])
        # Pixel-centre coordinates of every box, (G, 1, bw) and (G, bh, 1).
        cols = (start_col[members, None] + np.arange(bw))[:, None, :].astype(np.float64)
        rows = (start_row[members, None] + np.arange(bh))[:, :, None].astype(np.float64)
        c = coef[:, :, members, None, None]
        e0 = c[0, 0] * cols + c[0, 1] * rows
        e0 += c[0, 2]
        e1 = c[1, 0] * cols + c[1, 1] * rows
        e1 += c[1, 2]
        e2 = c[2, 0] * cols + c[2, 1] * rows
        e2 += c[2, 2]
        g, r, q = np.nonzero((e0 >= 0) & (e1 >= 0) & (e2 >= 0))
        if g.size == 0:
            continue
        v0, v1, v2 = e0[g, r, q], e1[g, r, q], e2[g, r, q]
        total = v0 + v1 + v2
        total[total == 0] = 1.0  # only for a degenerate sliver's edge pixels
        w0 = v0 / total
        w1 = v1 / total
        local = members[g]
        z2 = tri_depth[2, local]
        frag_depth = z2 + w0 * (tri_depth[0, local] - z2) + w1 * (tri_depth[1, local] - z2)
        pixel = (start_row[local] + r) * width + (start_col[local] + q)
        np.maximum.at(zbuffer, pixel, frag_depth)
        nearest = frag_depth == zbuffer[pixel]
        target = pixel[nearest]
        best_tri[target] = local[nearest]
        best_w0[target] = w0[nearest]
        best_w1[target] = w1[nearest]
    return zbuffer, best_tri, best_w0, best_w1


def _paint_covered(
    image: np.ndarray, covered: np.ndarray, tri: np.ndarray, w0: np.ndarray, w1: np.ndarray,
    shaded: np.ndarray,
) -> None:
    """Write the Gouraud-interpolated colour into each covered pixel of ``image``, in place.

    The shaded corner colours are interpolated one channel at a time (1-D gathers are much
    cheaper than gathering (P, 3, 3) blocks).

    Args:
        image: (H, W, 3) uint8 BGR, C-contiguous; modified.
        covered: (P,) flat indices of the covered pixels.
        tri: (P, 3) vertex ids of the triangle seen at each covered pixel.
        w0, w1: (P,) float64 barycentric weights of that triangle's corners 0 and 1.
        shaded: (N, 3) float32 per-vertex colours from :func:`_shade_vertices`.
    """
    a = w0.astype(np.float32)
    b = w1.astype(np.float32)
    flat = image.reshape(-1, 3)
    for channel in range(3):
        plane = np.ascontiguousarray(shaded[:, channel])
        c2 = plane[tri[:, 2]]
        value = c2 + a * (plane[tri[:, 0]] - c2) + b * (plane[tri[:, 1]] - c2)
        value *= 255.0
        value += 0.5
        np.clip(value, 0.0, 255.0, out=value)
        flat[covered, channel] = value.astype(np.uint8)


def _shade_vertices(
    tris: np.ndarray, normal_x: np.ndarray, normal_y: np.ndarray, normal_z: np.ndarray,
    albedo: np.ndarray, light: Lighting, n: int,
) -> np.ndarray:
    """Per-vertex Gouraud colours (n, 3) float32 BGR in [0, 1] from area-weighted normals."""
    flat = tris.reshape(-1)
    normals = np.empty((n, 3))
    for axis, component in enumerate((normal_x, normal_y, normal_z)):
        # Unnormalised face normals are area-weighted already.
        normals[:, axis] = np.bincount(flat, weights=np.repeat(component, 3), minlength=n)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    normals /= np.where(length > 0, length, 1.0)
    lambert = np.clip(normals @ light.direction, 0.0, None)
    half = light.direction + np.array([0.0, 0.0, 1.0])
    half_norm = np.linalg.norm(half)
    half = half / half_norm if half_norm > 0 else np.array([0.0, 0.0, 1.0])
    highlight = np.clip(normals @ half, 0.0, None) ** light.shininess * (lambert > 0)
    colour = light.colour.astype(np.float32)
    intensity = (light.ambient + light.diffuse * lambert)[:, None] * colour
    shaded = albedo * intensity.astype(np.float32)
    shaded += (light.specular * highlight)[:, None].astype(np.float32) * colour
    return shaded


def _soften_silhouette(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Replace pixels along the mask's border by a 3x3 blur of the composite (cheap AA)."""
    mask_u8 = mask.view(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    border = cv2.dilate(mask_u8, kernel) != cv2.erode(mask_u8, kernel)
    if np.any(border):
        blurred = cv2.GaussianBlur(image, (3, 3), 0.8)
        image[border] = blurred[border]
    return image
