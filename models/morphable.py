"""The 3D morphable model: mean shape plus 40 shape and 10 expression basis columns.

Vertices of a 62-d parameter ``p`` (see :mod:`models.params`)::

    S = mean + W_shp @ alpha_shp + W_exp @ alpha_exp       # (3, N), model units
    V = (f*R) @ S + t                                      # (3, N), crop coordinates, y up

Arrays are stored as (3, N) and (3, N, K) (x, y, z first) rather than 3DDFA's xyz-interleaved
vectors; the loaders convert. Everything works on numpy arrays and, unchanged, on torch tensors
(the bases are moved to the tensor's device and dtype once and cached).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.params import EXPRESSION_SLICE, NUM_EXPRESSION, NUM_PARAMS, NUM_SHAPE, SHAPE_SLICE

NUM_LANDMARKS = 68
# iBUG 68 left/right correspondence (0-based): landmark k of a mirrored face is landmark
# IBUG_MIRROR_IDS[k] of the original (jaw, brows, nose, eyes and lips each reversed).
IBUG_MIRROR_IDS = np.array(
    list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65]
)


class MorphableModelError(ValueError):
    """A morphable-model file or array that cannot be used; the message names file and array."""


def _interleaved_to_planar(vector: np.ndarray) -> np.ndarray:
    """3DDFA's xyz-interleaved (3N, ...) -> (3, N, ...)."""
    n = vector.shape[0] // 3
    return np.moveaxis(vector.reshape(n, 3, *vector.shape[1:]), 1, 0)


@dataclass(frozen=True, eq=False)
class MorphableModel:
    """A linear face model; see the module docstring for the formula.

    Attributes:
        name: short human-readable name (``bfm68``, ``synthetic-head``, ...).
        mean: (3, N) float64 mean shape (mean identity plus mean expression).
        shape_basis: (3, N, 40) float64 identity basis.
        expression_basis: (3, N, 10) float64 expression basis.
        landmark_indices: (68,) int64 vertex ids of the iBUG 68 landmarks, in iBUG order.
        triangles: optional (T, 3) int64 vertex ids, counter-clockwise seen from outside.
        mirror_ids: optional (N,) int64: the vertex each vertex becomes under a left/right mirror
            (an involution), e.g. the iBUG flip order for a 68-landmark model.
    """

    name: str
    mean: np.ndarray
    shape_basis: np.ndarray
    expression_basis: np.ndarray
    landmark_indices: np.ndarray
    triangles: np.ndarray | None = None
    mirror_ids: np.ndarray | None = None
    _array_cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64)
        if mean.ndim != 2 or mean.shape[0] != 3:
            raise MorphableModelError(f"{self.name}: mean must have shape (3, N), got {mean.shape}")
        n = mean.shape[1]
        expected = {"shape_basis": (3, n, NUM_SHAPE), "expression_basis": (3, n, NUM_EXPRESSION)}
        for attr, shape in expected.items():
            value = np.asarray(getattr(self, attr), dtype=np.float64)
            if value.shape != shape:
                raise MorphableModelError(f"{self.name}: {attr} must have shape {shape}, got {value.shape}")
            object.__setattr__(self, attr, value)
        object.__setattr__(self, "mean", mean)
        landmarks = np.asarray(self.landmark_indices, dtype=np.int64)
        if landmarks.shape != (NUM_LANDMARKS,) or landmarks.min() < 0 or landmarks.max() >= n:
            raise MorphableModelError(
                f"{self.name}: landmark_indices must be {NUM_LANDMARKS} vertex ids in [0, {n}), "
                f"got shape {landmarks.shape}"
            )
        object.__setattr__(self, "landmark_indices", landmarks)
        if self.triangles is not None:
            tris = np.asarray(self.triangles, dtype=np.int64)
            if tris.ndim != 2 or tris.shape[1] != 3 or tris.min() < 0 or tris.max() >= n:
                raise MorphableModelError(f"{self.name}: triangles must be (T, 3) vertex ids in [0, {n})")
            object.__setattr__(self, "triangles", tris)
        if self.mirror_ids is not None:
            mirror = np.asarray(self.mirror_ids, dtype=np.int64)
            if mirror.shape != (n,) or not np.array_equal(np.sort(mirror), np.arange(n)) \
                    or not np.array_equal(mirror[mirror], np.arange(n)):
                raise MorphableModelError(
                    f"{self.name}: mirror_ids must be an involution of the {n} vertices"
                )
            object.__setattr__(self, "mirror_ids", mirror)
        for attr in ("mean", "shape_basis", "expression_basis", "landmark_indices", "triangles",
                     "mirror_ids"):
            value = getattr(self, attr)
            if value is not None:
                if not np.all(np.isfinite(value)):
                    raise MorphableModelError(f"{self.name}: {attr} holds NaN or inf")
                value.setflags(write=False)

    @property
    def num_vertices(self) -> int:
        return self.mean.shape[1]

    @property
    def is_dense(self) -> bool:
        """True when the model has more vertices than its 68 landmarks."""
        return self.num_vertices > NUM_LANDMARKS

    @property
    def identity(self) -> str:
        """``name@sha256:...`` over every array: two models with the same identity are the same."""
        digest = hashlib.sha256()
        for array in (self.mean, self.shape_basis, self.expression_basis, self.landmark_indices):
            digest.update(np.ascontiguousarray(array).tobytes())
        for optional in (self.triangles, self.mirror_ids):
            if optional is not None:
                digest.update(np.ascontiguousarray(optional).tobytes())
        return f"{self.name}@sha256:{digest.hexdigest()[:16]}"

    def subset(self, vertex_ids: np.ndarray, name: str | None = None) -> MorphableModel:
        """A model over some vertices only (triangles dropped); landmarks must be among them."""
        vertex_ids = np.asarray(vertex_ids, dtype=np.int64)
        position = {int(v): i for i, v in enumerate(vertex_ids)}
        missing = [int(v) for v in self.landmark_indices if int(v) not in position]
        if missing:
            raise MorphableModelError(f"{self.name}: subset drops landmark vertices {missing[:5]}")
        return MorphableModel(
            name=name or f"{self.name}-subset{len(vertex_ids)}",
            mean=self.mean[:, vertex_ids],
            shape_basis=self.shape_basis[:, vertex_ids],
            expression_basis=self.expression_basis[:, vertex_ids],
            landmark_indices=np.array([position[int(v)] for v in self.landmark_indices]),
        )

    def landmark_model(self) -> MorphableModel:
        """The 68-vertex model of the landmarks alone (what 3DDFA calls the ``_base`` arrays)."""
        return replace(self.subset(self.landmark_indices, name=f"{self.name}-68"),
                       mirror_ids=IBUG_MIRROR_IDS, _array_cache={})

    def with_landmarks_from(self, other: MorphableModel, name: str | None = None) -> MorphableModel:
        """Append ``other``'s 68 landmark vertices to this model and use them as its landmarks.

        For a dense subset that does not contain the keypoint vertices itself (both models must
        share units and the same coefficient meaning, e.g. two cuts of one Basel Face Model).
        """
        keypoints = other.landmark_model()
        n = self.num_vertices
        return MorphableModel(
            name=name or f"{self.name}+{other.name}",
            mean=np.concatenate([self.mean, keypoints.mean], axis=1),
            shape_basis=np.concatenate([self.shape_basis, keypoints.shape_basis], axis=1),
            expression_basis=np.concatenate([self.expression_basis, keypoints.expression_basis], axis=1),
            landmark_indices=np.arange(n, n + NUM_LANDMARKS),
            triangles=self.triangles,
        )

    # -- geometry -------------------------------------------------------------------------------

    def _arrays(self, like: Any, vertex_ids: np.ndarray | None) -> tuple[Any, Any, Any]:
        """mean (3, M), shape basis (3, M, 40), expression basis (3, M, 10) as ``like``'s type."""
        key_ids = None if vertex_ids is None else np.asarray(vertex_ids, dtype=np.int64)
        sel = slice(None) if key_ids is None else key_ids
        if isinstance(like, np.ndarray):
            if key_ids is None:
                return self.mean, self.shape_basis, self.expression_basis
            # The 68 landmarks are asked for per crop in preprocessing: keep their rows gathered.
            return self._cached(("numpy", key_ids.tobytes()), lambda: (
                self.mean[:, sel], self.shape_basis[:, sel], self.expression_basis[:, sel]))
        import torch  # torch only when a tensor is passed in

        arrays = (self.mean, self.shape_basis, self.expression_basis)
        return self._cached(
            (like.device, like.dtype, None if key_ids is None else key_ids.tobytes()),
            lambda: tuple(torch.tensor(np.array(a[:, sel]), dtype=like.dtype, device=like.device)
                          for a in arrays))

    def _cached(self, key: Any, build: Callable[[], Any]) -> Any:
        cached = self._array_cache.get(key)
        if cached is None:
            cached = build()
            if len(self._array_cache) > 16:  # bounded: vertex samples change every batch in losses
                self._array_cache.clear()
            self._array_cache[key] = cached
        return cached

    def shapes(self, params: Any, vertex_ids: np.ndarray | None = None) -> Any:
        """Unposed shapes ``mean + W_shp a_shp + W_exp a_exp``: params (..., 62) -> (..., 3, M)."""
        params = params if not isinstance(params, (list, tuple)) else np.asarray(params)
        if isinstance(params, np.ndarray):
            params = params.astype(np.float64, copy=False)
        if params.shape[-1] != NUM_PARAMS:
            raise ValueError(f"expected parameters of shape (..., {NUM_PARAMS}), got {tuple(params.shape)}")
        mean, shape_basis, expression_basis = self._arrays(params, vertex_ids)
        if isinstance(params, np.ndarray):  # one matrix product per basis (einsum is slower here)
            lead = params.shape[:-1]
            return (
                mean
                + (params[..., SHAPE_SLICE] @ shape_basis.reshape(-1, NUM_SHAPE).T
                   ).reshape(*lead, *mean.shape)
                + (params[..., EXPRESSION_SLICE] @ expression_basis.reshape(-1, NUM_EXPRESSION).T
                   ).reshape(*lead, *mean.shape)
            )
        einsum = _torch_einsum()
        return (
            mean
            + einsum("dmk,...k->...dm", shape_basis, params[..., SHAPE_SLICE])
            + einsum("dmk,...k->...dm", expression_basis, params[..., EXPRESSION_SLICE])
        )

    def vertices(self, params: Any, vertex_ids: np.ndarray | None = None) -> Any:
        """Posed vertices ``(f*R) S + t`` in the parameter's frame: (..., 62) -> (..., 3, M)."""
        shapes = self.shapes(params, vertex_ids)
        camera = params[..., :12].reshape(*params.shape[:-1], 3, 4)
        return camera[..., :3] @ shapes + camera[..., 3:]

    def landmarks(self, params: Any) -> Any:
        """The 68 landmarks in the parameter's frame: (..., 62) -> (..., 3, 68)."""
        return self.vertices(params, self.landmark_indices)

    # -- loaders --------------------------------------------------------------------------------

    @classmethod
    def from_3ddfa_arrays(cls, path: Path, name: str | None = None) -> MorphableModel:
        """3DDFA-style arrays from an .npz file or a folder of .npy files.

        Keys: ``u`` (or ``u_shp`` + ``u_exp``) (3N,), ``w_shp`` (3N, >=40), ``w_exp`` (3N, >=10),
        ``keypoints`` (204 flat indices into the 3N vector, or 68 vertex ids), optional ``tri``
        ((T, 3) or (3, T), 0-based) and ``mirror`` ((N,) mirrored vertex ids). Extra basis
        columns beyond 40 / 10 are dropped. Files are read as plain arrays (``allow_pickle=False``).
        """
        path = Path(path)
        arrays = _load_named_arrays(path)
        if "u" not in arrays and {"u_shp", "u_exp"} <= arrays.keys():
            arrays["u"] = arrays["u_shp"].reshape(-1) + arrays["u_exp"].reshape(-1)
        for key in ("u", "w_shp", "w_exp", "keypoints"):
            if key not in arrays:
                raise MorphableModelError(f"{path}: array '{key}' is missing (found {sorted(arrays)})")
        u = arrays["u"].reshape(-1).astype(np.float64)
        if u.size % 3:
            raise MorphableModelError(f"{path}: array 'u' must hold 3N values, got {u.size}")
        n3 = u.size
        w_shp = _basis(path, "w_shp", arrays["w_shp"], n3, NUM_SHAPE)
        w_exp = _basis(path, "w_exp", arrays["w_exp"], n3, NUM_EXPRESSION)
        landmark_ids = _keypoint_vertex_ids(path, arrays["keypoints"], n3 // 3)
        triangles = arrays.get("tri")
        if triangles is not None:
            triangles = triangles.T if triangles.shape[0] == 3 and triangles.shape[1] != 3 else triangles
            if triangles.ndim != 2 or triangles.shape[1] != 3:
                raise MorphableModelError(f"{path}: array 'tri' must be (T, 3), got {triangles.shape}")
        return cls(
            name=name or path.stem,
            mean=_interleaved_to_planar(u),
            shape_basis=_interleaved_to_planar(w_shp),
            expression_basis=_interleaved_to_planar(w_exp),
            landmark_indices=landmark_ids,
            triangles=triangles,
            mirror_ids=arrays.get("mirror"),
        )

    @classmethod
    def from_bfm68_dir(cls, folder: Path, name: str = "bfm68") -> MorphableModel:
        """3DDFA's landmark-only bases: ``u_base.txt`` (204), ``w_shp_base.txt`` (204x40),
        ``w_exp_base.txt`` (204x10), xyz interleaved; the 68 vertices are the landmarks."""
        folder = Path(folder)
        expected = {"u_base.txt": (204,), "w_shp_base.txt": (204, 40), "w_exp_base.txt": (204, 10)}
        arrays = {}
        for filename, shape in expected.items():
            file_path = folder / filename
            try:
                values = np.loadtxt(file_path, dtype=np.float64, ndmin=1)
            except (OSError, ValueError) as err:
                raise MorphableModelError(f"{file_path}: cannot read: {err}") from err
            if values.shape != shape:
                raise MorphableModelError(f"{file_path}: expected shape {shape}, got {values.shape}")
            arrays[filename] = values
        return cls(
            name=name,
            mean=_interleaved_to_planar(arrays["u_base.txt"]),
            shape_basis=_interleaved_to_planar(arrays["w_shp_base.txt"]),
            expression_basis=_interleaved_to_planar(arrays["w_exp_base.txt"]),
            landmark_indices=np.arange(NUM_LANDMARKS),
            mirror_ids=IBUG_MIRROR_IDS,
        )

    @classmethod
    def from_dense_subset(
        cls, path: Path, landmarks_from: MorphableModel, name: str | None = None
    ) -> MorphableModel:
        """A dense subset .npz (``u``, ``w_shp``, ``w_exp``, interleaved; e.g. ``bfm_4096.npz``).

        When the file has ``keypoints`` they name its landmarks; otherwise the 68 landmark
        vertices of ``landmarks_from`` (a model of the same BFM, e.g. ``bfm68``) are appended.
        """
        path = Path(path)
        arrays = _load_named_arrays(path)
        if "keypoints" in arrays:
            return cls.from_3ddfa_arrays(path, name=name)
        for key in ("u", "w_shp", "w_exp"):
            if key not in arrays:
                raise MorphableModelError(f"{path}: array '{key}' is missing (found {sorted(arrays)})")
        u = arrays["u"].reshape(-1).astype(np.float64)
        if u.size % 3:
            raise MorphableModelError(f"{path}: array 'u' must hold 3N values, got {u.size}")
        dense = cls(
            name=name or path.stem,
            mean=_interleaved_to_planar(u),
            shape_basis=_interleaved_to_planar(_basis(path, "w_shp", arrays["w_shp"], u.size, NUM_SHAPE)),
            expression_basis=_interleaved_to_planar(
                _basis(path, "w_exp", arrays["w_exp"], u.size, NUM_EXPRESSION)
            ),
            landmark_indices=np.zeros(NUM_LANDMARKS, dtype=np.int64),
        )
        return dense.with_landmarks_from(landmarks_from, name=name or path.stem)

    def save_npz(self, path: Path) -> None:
        """Write the model as 3DDFA-style arrays readable by :meth:`from_3ddfa_arrays`."""
        arrays = {
            "u": _planar_to_interleaved(self.mean),
            "w_shp": _planar_to_interleaved(self.shape_basis),
            "w_exp": _planar_to_interleaved(self.expression_basis),
            "keypoints": self.landmark_indices,
        }
        if self.triangles is not None:
            arrays["tri"] = self.triangles
        if self.mirror_ids is not None:
            arrays["mirror"] = self.mirror_ids
        np.savez(Path(path), **arrays)


def _torch_einsum() -> Any:
    import torch

    return torch.einsum


def _planar_to_interleaved(array: np.ndarray) -> np.ndarray:
    """(3, N, ...) -> xyz-interleaved (3N, ...)."""
    return np.moveaxis(array, 0, 1).reshape(-1, *array.shape[2:])


def _load_named_arrays(path: Path) -> dict[str, np.ndarray]:
    """Arrays by name from an .npz or a folder of .npy files, never unpickling anything."""
    try:
        if path.is_dir():
            files = sorted(path.glob("*.npy"))
            if not files:
                raise MorphableModelError(f"{path}: no .npy files in this folder")
            return {f.stem: np.load(f, allow_pickle=False) for f in files}
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise MorphableModelError(f"{path}: expected an .npz archive of named arrays")
            return {key: data[key] for key in data.files}
    except MorphableModelError:
        raise
    except (OSError, ValueError, EOFError) as err:
        raise MorphableModelError(f"{path}: cannot read as numpy arrays ({err})") from err


def _basis(path: Path, key: str, array: np.ndarray, n3: int, columns: int) -> np.ndarray:
    if array.ndim != 2 or array.shape[0] != n3 or array.shape[1] < columns:
        raise MorphableModelError(
            f"{path}: array '{key}' must have shape ({n3}, >={columns}), got {array.shape}"
        )
    return array[:, :columns].astype(np.float64)


def _keypoint_vertex_ids(path: Path, keypoints: np.ndarray, num_vertices: int) -> np.ndarray:
    keypoints = np.asarray(keypoints).reshape(-1).astype(np.int64)
    if keypoints.size == 3 * NUM_LANDMARKS:  # 3DDFA's flat indices into the interleaved vector
        ids = keypoints[0::3] // 3
    elif keypoints.size == NUM_LANDMARKS:
        ids = keypoints
    else:
        raise MorphableModelError(
            f"{path}: array 'keypoints' must hold 68 vertex ids or 204 flat indices, got {keypoints.size}"
        )
    if ids.min() < 0 or ids.max() >= num_vertices:
        raise MorphableModelError(f"{path}: array 'keypoints' points outside the {num_vertices} vertices")
    return ids
