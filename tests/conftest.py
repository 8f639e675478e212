"""Shared fixtures: the reference data folder (read in place, never copied) and small models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Reference files (BFM-derived arrays, AFLW2000-3D annotations, ...) live beside the checkout
# and are never part of it (licences); FRNET_SHARED_DATA points elsewhere if needed.
SHARED_DATA = Path(os.environ.get("FRNET_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """A path under the reference data folder, or a skip naming what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not found: {path} (set FRNET_SHARED_DATA to its folder)")
    return path


@pytest.fixture(scope="session")
def bfm68():
    from models.morphable import MorphableModel

    return MorphableModel.from_bfm68_dir(shared_path("bfm68"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs), shut down at the end."""
    import ray

    from pipeline.common import init_ray

    if not ray.is_initialized():
        init_ray(2, log_to_driver=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_head():
    from models.synthetic_face import build_synthetic_head

    return build_synthetic_head()
