"""What every node of a cluster sees: checked before any work starts, by asking each node.

On a cluster of more than one node, every folder a run reads or writes from Ray tasks (the
shards, the checkpoint storage, the preprocessing input and output, a morphable model's files)
must be the same folder on every node: an NFS path all nodes mount, or an ``s3://`` URI. A
folder on the driver's disk alone fails late and far from its cause (Ray Train refuses a
head-local checkpoint folder once a worker on another node saves into it). So the driver
writes a token file into each folder that must be writable, and a zero-CPU task pinned to every
alive node reads it back; for a folder that is only read, each node hashes the same file. A
folder some node does not see is refused with one line naming the setting and what to use.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from preprocessing.datasets import list_300w_lp, list_aflw2000, resolve
from preprocessing.manifest import MANIFEST_FILE

MARKER_PREFIX = ".frnet-node-check-"
ANSWER_TIMEOUT_S = 120
ADVICE = "use a folder every node mounts (NFS) or an s3:// URI"


class NotSharedError(ValueError):
    """A folder that some node of the cluster does not see."""


@dataclass(frozen=True)
class SharedFolder:
    """A folder every node must see: ``setting`` names it for the error; ``probe`` is a file in
    it that every node must read the same bytes of (None: the folder is written to, and a token
    file written by the driver is the probe)."""

    setting: str
    location: str
    probe: str | None = None


def _digest(location: str, name: str) -> str | None:
    """sha256 of LOCATION/NAME on this node, or None when it cannot be read here."""
    try:
        filesystem, root = resolve(location)
        with filesystem.open_input_stream(f"{root}/{name}") as stream:
            return hashlib.sha256(stream.read()).hexdigest()
    except (OSError, ValueError):
        return None


@ray.remote(num_cpus=0)
def _node_digests(probes: list[tuple[str, str]]) -> tuple[str, list[str | None]]:
    return ray.get_runtime_context().get_node_id(), [_digest(location, name) for location, name in probes]


def storage_location(configured: str, run_dir: Path) -> str:
    """Where Ray keeps a run's or a sweep's checkpoints: the configured storage, else RUN_DIR/ray
    (on the driver's node only)."""
    return configured or str((Path(run_dir) / "ray").resolve())


def training_folders(key: str, configured: str, run_dir: Path, shards: str) -> list[SharedFolder]:
    """What a training run's workers and Ray Data tasks touch: the checkpoint storage set by
    ``key`` (written) and the shards (read, probed by their manifest)."""
    setting = key if configured else f"{key} (empty: RUN_DIR/ray)"
    return [SharedFolder(setting, storage_location(configured, run_dir)),
            SharedFolder("data.shards", shards, MANIFEST_FILE)]


def preprocessing_folders(source: str, output: str, aflw2000: str | None) -> list[SharedFolder]:
    """What the shard tasks touch: the 300W-LP and AFLW2000-3D folders (read, probed by their
    first annotation file) and the output (written). Listed only on a cluster of several nodes."""
    if len(alive_nodes()) < 2:
        return []
    folders = [SharedFolder("--output", output)]
    inputs = (("--input", source, list_300w_lp), ("--aflw2000", aflw2000, list_aflw2000))
    for setting, location, lister in inputs:
        if location is None:
            continue
        _, root = resolve(location)
        _, refs = lister(location)
        if refs:
            probe = PurePosixPath(refs[0].mat_path).relative_to(root)
            folders.append(SharedFolder(setting, location, str(probe)))
    return folders


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]


def check_shared(folders: list[SharedFolder]) -> None:
    """Refuse (NotSharedError) a folder some alive node does not see; a no-op on one node."""
    nodes = alive_nodes()
    if len(nodes) < 2 or not folders:
        return
    token = secrets.token_hex(8)
    written: list[tuple[pafs.FileSystem, str]] = []
    try:
        probes = []
        for folder in folders:
            name = folder.probe
            if name is None:
                filesystem, root = resolve(folder.location)
                filesystem.create_dir(root, recursive=True)
                name = f"{MARKER_PREFIX}{token}"
                with filesystem.open_output_stream(f"{root}/{name}") as stream:
                    stream.write(token.encode())
                written.append((filesystem, f"{root}/{name}"))
            probes.append((folder.location, name))
        expected = [_digest(location, name) for location, name in probes]
        pinned = [NodeAffinitySchedulingStrategy(node["NodeID"], soft=False) for node in nodes]
        answers = ray.get([_node_digests.options(scheduling_strategy=strategy).remote(probes)
                           for strategy in pinned], timeout=ANSWER_TIMEOUT_S)
    finally:
        for filesystem, path in written:
            try:
                filesystem.delete_file(path)
            except OSError:
                pass
    addresses = {node["NodeID"]: node.get("NodeManagerAddress", "?") for node in nodes}
    for node_id, digests in answers:
        for folder, (_, name), want, got in zip(folders, probes, expected, digests, strict=True):
            if want is None or got != want:
                seen = "cannot read it" if got is None else "sees another copy"
                raise NotSharedError(
                    f"{folder.setting} {folder.location}: node {node_id[:12]} ({addresses[node_id]}) {seen} "
                    f"({name}); on a cluster of {len(nodes)} nodes {ADVICE}")
