"""The software rasteriser: coverage, depth test, culling, shading and the random scenes."""

import numpy as np
import pytest

from preprocessing.render import Lighting, random_background, random_lighting, render_mesh

FLAT = Lighting(direction=np.array([0.0, 0.0, 1.0]), ambient=1.0, diffuse=0.0, specular=0.0)


def image_vertices(points_xy_z: list[tuple[float, float, float]]) -> np.ndarray:
    """(3, N) vertices from (x_img, y_img, z) triples, 1-based image coordinates."""
    return np.array(points_xy_z, dtype=np.float64).T


def front_facing(vertices: np.ndarray, tris: np.ndarray) -> np.ndarray:
    """The triangles reordered where needed to face the camera (CCW with y up)."""
    tris = tris.copy()
    for t in tris:
        (x0, y0), (x1, y1), (x2, y2) = (vertices[:2, k] * [1, -1] for k in t)
        if (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0) < 0:
            t[[1, 2]] = t[[2, 1]]
    return tris


def brute_force_coverage(vertices: np.ndarray, tri: np.ndarray, height: int, width: int
                         ) -> np.ndarray:
    """Pixel centres (c + 1, r + 1) inside or on the triangle, tested one by one."""
    (x0, y0), (x1, y1), (x2, y2) = (vertices[:2, k] for k in tri)
    covered = np.zeros((height, width), dtype=bool)
    for r in range(height):
        for c in range(width):
            px, py = c + 1.0, r + 1.0
            d0 = (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)
            d1 = (x2 - x1) * (py - y1) - (y2 - y1) * (px - x1)
            d2 = (x0 - x2) * (py - y2) - (y0 - y2) * (px - x2)
            covered[r, c] = (d0 >= 0 and d1 >= 0 and d2 >= 0) or (d0 <= 0 and d1 <= 0 and d2 <= 0)
    return covered


def render(vertices, tris, colours, size=(40, 50), light=FLAT):
    background = np.full((*size, 3), 7, dtype=np.uint8)
    colours = np.asarray(colours, dtype=np.float32)
    return render_mesh(vertices, np.asarray(tris), colours, background, light)


@pytest.mark.parametrize("corners", [
    [(5, 6, 0), (30, 6, 0), (5, 36, 0)],  # integer corners: many pixel centres lie on edges
    [(4.3, 5.7, 0), (31.6, 5.7, 0), (4.3, 33.2, 0)],
])
def test_triangle_covers_exactly_the_pixel_centres_inside_it(corners):
    vertices = image_vertices(corners)
    tri = front_facing(vertices, np.array([[0, 1, 2]]))
    _, mask = render(vertices, tri, np.ones((3, 3)))
    expected = brute_force_coverage(vertices, tri[0], 40, 50)
    assert mask.sum() == expected.sum() > 300
    np.testing.assert_array_equal(mask, expected)


def test_two_triangles_sharing_an_edge_leave_no_crack():
    vertices = image_vertices([(3.2, 4.1, 0), (40.7, 6.3, 0), (38.9, 35.5, 0), (5.5, 33.8, 0)])
    tris = front_facing(vertices, np.array([[0, 1, 2], [0, 2, 3]]))
    _, mask = render(vertices, tris, np.ones((4, 3)))
    expected = (brute_force_coverage(vertices, tris[0], 40, 50)
                | brute_force_coverage(vertices, tris[1], 40, 50))
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_depth_test_keeps_the_nearer_triangle_whatever_the_order(order):
    near = [(5, 5, 10.0), (35, 5, 10.0), (5, 35, 10.0)]
    far = [(10, 10, -5.0), (45, 10, 5.0), (10, 38, 5.0)]  # sloped, but behind everywhere
    vertices = image_vertices(near + far)
    tris = front_facing(vertices, np.array([[0, 1, 2], [3, 4, 5]]))[list(order)]
    colours = [[0, 0, 1]] * 3 + [[0, 1, 0]] * 3  # near red, far green (BGR)
    image, mask = render(vertices, tris, colours)
    assert tuple(image[15, 15]) == (0, 0, 255)  # overlap: the near one
    assert tuple(image[11, 36]) == (0, 255, 0)  # only the far one
    assert mask[15, 15] and mask[11, 36] and not mask[38, 48]


def test_depth_test_follows_interpolated_depth_where_triangles_cross():
    tilted = [(5, 5, -10.0), (45, 5, 10.0), (5, 35, -10.0)]  # nearer toward the right
    flat = [(5, 5, 0.0), (45, 5, 0.0), (45, 35, 0.0)]
    vertices = image_vertices(tilted + flat)
    tris = front_facing(vertices, np.array([[0, 1, 2], [3, 4, 5]]))
    image, _ = render(vertices, tris, [[0, 0, 1]] * 3 + [[0, 1, 0]] * 3)
    assert tuple(image[8, 10]) == (0, 255, 0)  # left part: the flat one is nearer
    assert tuple(image[8, 38]) == (0, 0, 255)  # right part: the tilted one is nearer


def test_back_faces_are_culled_and_off_image_meshes_cover_nothing():
    vertices = image_vertices([(5, 5, 0), (35, 5, 0), (5, 35, 0)])
    tri = front_facing(vertices, np.array([[0, 1, 2]]))
    _, mask = render(vertices, tri[:, ::-1], np.ones((3, 3)))
    assert not mask.any()
    outside = vertices + np.array([[500.0], [0.0], [0.0]])
    image, mask = render(outside, tri, np.ones((3, 3)))
    assert not mask.any() and (image == 7).all()
    _, mask = render(vertices, np.zeros((0, 3), dtype=np.int64), np.ones((3, 3)))
    assert not mask.any()


def test_triangle_larger_than_the_image_fills_it():
    vertices = image_vertices([(-100, -100, 0), (300, -100, 0), (-100, 300, 0)])
    tri = front_facing(vertices, np.array([[0, 1, 2]]))
    _, mask = render(vertices, tri, np.ones((3, 3)))
    assert mask.all()


def test_light_facing_the_surface_makes_it_brighter():
    vertices = image_vertices([(5, 5, 0), (35, 5, 0), (5, 35, 0)])
    tri = front_facing(vertices, np.array([[0, 1, 2]]))
    colours = np.full((3, 3), 0.5)
    lit = Lighting(direction=np.array([0.0, 0.0, 1.0]), ambient=0.2, diffuse=0.8, specular=0.0)
    behind = Lighting(direction=np.array([0.0, 0.0, -1.0]), ambient=0.2, diffuse=0.8, specular=0.0)
    bright, _ = render(vertices, tri, colours, light=lit)
    dark, _ = render(vertices, tri, colours, light=behind)
    assert bright[10, 10, 0] == 128 and dark[10, 10, 0] == 26  # 0.5 * (0.2 + 0.8), 0.5 * 0.2


def test_render_is_deterministic_and_leaves_the_background_alone():
    rng = np.random.default_rng(0)
    vertices = np.vstack([rng.uniform(0, 60, (2, 40)), rng.uniform(-5, 5, (1, 40))])
    tris = rng.integers(0, 40, (60, 3))
    colours = rng.uniform(0, 1, (40, 3)).astype(np.float32)
    background = random_background(np.random.default_rng(1), 64, 64)
    kept = background.copy()
    light = random_lighting(np.random.default_rng(2))
    first = render_mesh(vertices, tris, colours, background, light)
    second = render_mesh(vertices, tris, colours, background, light)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(background, kept)


def test_random_scenes_are_seeded_and_varied():
    a = random_background(np.random.default_rng(5), 90, 120)
    assert a.shape == (90, 120, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, random_background(np.random.default_rng(5), 90, 120))
    assert not np.array_equal(a, random_background(np.random.default_rng(6), 90, 120))
    assert a.std() > 10  # cluttered, not flat
    lights = [random_lighting(np.random.default_rng(s)) for s in range(20)]
    directions = np.array([light.direction for light in lights])
    np.testing.assert_allclose(np.linalg.norm(directions, axis=1), 1.0)
    assert np.all(directions[:, 2] > 0) and directions[:, 0].std() > 0.2
    assert len({round(light.ambient, 6) for light in lights}) == 20


def test_bad_input_is_refused_with_the_value():
    vertices = image_vertices([(5, 5, 0), (35, 5, 0), (5, 35, 0)])
    good = dict(triangles=np.array([[0, 1, 2]]), vertex_colors=np.ones((3, 3), np.float32),
                background=np.zeros((10, 10, 3), np.uint8), light=FLAT)
    with pytest.raises(ValueError, match=r"\(3, N\)"):
        render_mesh(vertices[:2], **good)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        render_mesh(vertices, **{**good, "triangles": np.array([[0, 1, 3]])})
    with pytest.raises(ValueError, match="vertex_colors"):
        render_mesh(vertices, **{**good, "vertex_colors": np.ones((2, 3))})
    with pytest.raises(ValueError, match="uint8"):
        render_mesh(vertices, **{**good, "background": np.zeros((10, 10, 3))})
    with pytest.raises(ValueError, match="must not be zero"):
        Lighting(direction=np.zeros(3))
    with pytest.raises(ValueError, match="shininess"):
        Lighting(shininess=0.0)
    with pytest.raises(ValueError, match="0x5"):
        random_background(np.random.default_rng(0), 0, 5)
