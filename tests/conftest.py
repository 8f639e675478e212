"""Shared fixtures: the reference data folder (read in place, never copied) and small models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Reference files (BFM-derived arrays, AFLW2000-3D annotations, ...) live beside the checkout
# and are never part of it (licences); FRNET_SHARED_DATA points elsewhere if needed.
SHARED_DATA = Path(os.environ.get("FRNET_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


# Ray Train's controller looks at its workers every 2 s by default, so each run of a few seconds
# waits up to that long at each step (workers up, each report, the end). The tests' runs, and the
# Ray sessions and `frnet` commands they start (which inherit this), look four times as often.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train watches for spot-instance preemption notices in an actor of its own each run (about
# 2 s of CPU to start); no test machine is preempted, so the tests' runs go without it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# With the suite spread over several pytest processes (make test), each process's thread pools
# (torch's, OpenMP's) get an even share of the cores, inherited by the commands it starts: pools
# sized for the whole machine in every process spin against each other.
if (PROCESSES := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // PROCESSES)))


def shared_path(*parts: str) -> Path:
    """A path under the reference data folder, or a skip naming what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not found: {path} (set FRNET_SHARED_DATA to its folder)")
    return path


def real_face_image():
    """AFLW2000-3D image00427 as in the dataset (450x450 BGR): its 256x256 ROI crop, from the
    reference data, pasted back at its ROI box (see NOTE.md there)."""
    import cv2
    import numpy as np

    crop = cv2.imread(str(shared_path("aflw2000-3d-image00427", "image00427_roi_crop_256.png")))
    sx, sy, ex, ey = np.load(shared_path("aflw2000-3d", "protocol", "AFLW2000-3D_crop.roi_box.npy"))[255]
    width, height = round(ex - sx), round(ey - sy)
    image = np.zeros((450, 450, 3), np.uint8)
    image[round(sy):round(sy) + height, round(sx):round(sx) + width] = cv2.resize(
        crop, (width, height), interpolation=cv2.INTER_LINEAR)
    return image


def tiny_shards(root: Path, seed: int) -> Path:
    """Small synthetic training shards with AFLW2000-3D shards (needs a running Ray): 8 images
    x 4 views and their flips, two crops each, 30% of faces for validation, 4 test images."""
    from preprocessing.augment import AugmentConfig
    from preprocessing.dataflow import PreprocessConfig
    from preprocessing.ray_preprocess import run_preprocess
    from preprocessing.synth import SynthConfig, generate

    generate(SynthConfig("300w-lp", n=8, seed=seed, views_per_face=4), root / "300W_LP")
    generate(SynthConfig("aflw2000-3d", n=4, seed=seed + 1), root / "AFLW2000")
    run_preprocess(str(root / "300W_LP"), str(root / "shards"),
                   PreprocessConfig(augment=AugmentConfig(copies=2), val_fraction=0.3),
                   aflw2000_root=str(root / "AFLW2000"))
    return root / "shards"


@pytest.fixture(scope="session")
def bfm68():
    from models.morphable import MorphableModel

    return MorphableModel.from_bfm68_dir(shared_path("bfm68"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs), shut down at the end."""
    import ray

    from pipeline.runtime.ray_session import start_ray

    if not ray.is_initialized():
        start_ray(2, log_to_driver=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shard_set(tmp_path_factory, ray_local):
    """The session's small synthetic shard set (:func:`tiny_shards`), made once: tests read it;
    one that edits shards works on a copy."""
    return tiny_shards(tmp_path_factory.mktemp("shard-set"), seed=31)


@pytest.fixture(scope="session")
def synthetic_head():
    from models.synthetic_face import build_synthetic_head

    return build_synthetic_head()


def box_iou(a, b) -> float:
    """Intersection over union of two boxes (x1, y1, x2, y2)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# -- test tiers --------------------------------------------------------------------------------
# unit: no Ray, no subprocess (make test-unit); ray: + a local Ray and `frnet` commands run as
# subprocesses (make test-ray); cluster: + several Ray nodes, the cluster launcher, the demo,
# clean environments (make test, what CI runs). A test that needs Ray through the ray_local
# fixture is marked ray without saying so; any other is marked in its module.
TIER_VARIABLE = "FRNET_TEST_TIER"


# The longest modules, longest first (their time in the full tier on 2 cores): run over several
# pytest processes a module at a time (make test), they start first, so that the last module to
# start is a short one. Every other module follows in its usual order.
LONGEST_MODULES = ("pipeline/test_tune.py", "pipeline/test_two_nodes.py", "pipeline/test_train_faults.py",
                   "pipeline/test_s3.py", "pipeline/test_onprem_cluster.py", "pipeline/test_cli.py",
                   "pipeline/test_train.py", "pipeline/test_batch_mixing.py",
                   "pipeline/test_train_processes.py", "preprocessing/test_preprocess.py",
                   "pipeline/test_registry_pull.py")


def module_rank(item) -> int:
    path = item.path.relative_to(Path(__file__).parent).as_posix()
    return LONGEST_MODULES.index(path) if path in LONGEST_MODULES else len(LONGEST_MODULES)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.ray)
    items.sort(key=module_rank)  # stable: each module's tests stay together, in their order


@pytest.fixture(autouse=True)
def unit_tier_guard(request, monkeypatch):
    """In the unit tier, a test that starts Ray or a subprocess fails saying how to mark it: the
    tier's promise (no Ray, no subprocess) is checked, not assumed."""
    if os.environ.get(TIER_VARIABLE) != "unit":
        yield
        return
    import subprocess

    import ray

    def refuse(what):
        def refused(*args, **kwargs):
            raise RuntimeError(f"{request.node.nodeid} {what} in the unit tier: mark it "
                               "@pytest.mark.ray (or cluster)")
        return refused

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("starts a subprocess"))
    monkeypatch.setattr(ray, "init", refuse("starts Ray"))
    yield
