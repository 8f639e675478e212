"""``manifest.json``: what a ``frnet preprocess`` output holds, written and read only here.

The manifest names the shard files of each split, the whitening statistics of the training
labels, the morphable model that labelled them, the counts that reconcile every input, and the
config and code that made it. ``version`` says its layout; a reader refuses a layout it does not
know rather than guess at it (a manifest without the field is version 1, the layout it had
before the field existed). The ``skipped`` entries (and their count) came later within version 1:
a manifest without them skipped nothing. A reader also refuses counts that do not reconcile:
inputs = written + quarantined + skipped, with one quarantine row and one skipped entry per count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from models.face_models import SYNTHETIC
from models.params import ParamStats
from preprocessing.datasets import resolve
from preprocessing.shards import write_bytes_atomic

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")


class ManifestError(ValueError):
    """A manifest that is missing, unreadable, of an unknown version or lacks a field."""


@dataclass(frozen=True)
class LabelModel:
    """The morphable model the labels were computed with."""

    source: str  # a load_face_model source: "synthetic", "bfm68:DIR", ...
    identity: str  # its content digest
    flip_mirror_residual: float | None = None  # model units; None without flip augmentation

    @property
    def synthetic(self) -> bool:
        return self.source == SYNTHETIC


def check_counts(counts: dict[str, Any], quarantine: list, skipped: list, source: str) -> None:
    """Refuse (ManifestError, naming ``source``) counts that do not reconcile with each other or
    with the quarantine and skipped lists; a count missing from an older manifest is 0."""
    try:
        inputs, written, quarantined = (int(counts[key]) for key in ("inputs", "written", "quarantined"))
        skipped_count = int(counts.get("skipped", 0))
    except KeyError as err:
        raise ManifestError(f"{source}: the counts lack {err.args[0]!r}") from err
    except (TypeError, ValueError, AttributeError) as err:
        raise ManifestError(f"{source}: the counts have the wrong form ({err})") from err
    if inputs != written + quarantined + skipped_count:
        raise ManifestError(f"{source}: counts do not reconcile: inputs {inputs} != written {written} + "
                            f"quarantined {quarantined} + skipped {skipped_count}")
    if len(quarantine) != quarantined or len(skipped) != skipped_count:
        raise ManifestError(f"{source}: {len(quarantine)} quarantine rows and {len(skipped)} skipped entries "
                            f"for counts of {quarantined} quarantined and {skipped_count} skipped")


@dataclass(frozen=True)
class EvaluationShards:
    """The AFLW2000-3D evaluation shards beside the training shards."""

    input: str
    counts: dict[str, Any]
    quarantine: list[dict[str, str]]
    shards: tuple[str, ...]  # relative to the output folder
    skipped: list[dict[str, str]] = field(default_factory=list)  # file, reason


@dataclass(frozen=True)
class Manifest:
    """A preprocessing output; shard paths are relative to ``output``."""

    input: str
    output: str
    counts: dict[str, Any]  # inputs, written, quarantined, skipped, rows by split, by_subset
    quarantine: list[dict[str, str]]  # file, stage, reason
    splits: dict[str, tuple[str, ...]]
    whitening: ParamStats
    morphable_model: LabelModel
    image_format: str
    config: dict[str, Any]  # the PreprocessConfig as written
    config_digest: str
    code_version: str
    aflw2000: EvaluationShards | None = None
    version: int = field(default=MANIFEST_VERSION)
    skipped: list[dict[str, str]] = field(default_factory=list)  # file, reason: no sample's file

    def check_counts(self, source: str) -> None:
        """Refuse (ManifestError) counts that do not reconcile, here and in the AFLW2000-3D part."""
        check_counts(self.counts, self.quarantine, self.skipped, source)
        if self.aflw2000 is not None:
            check_counts(self.aflw2000.counts, self.aflw2000.quarantine, self.aflw2000.skipped,
                         f"{source} (aflw2000)")

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON-ready data (the file's layout)."""
        data = {
            "version": self.version, "input": self.input, "output": self.output, "counts": self.counts,
            "quarantine": self.quarantine, "skipped": self.skipped,
            "splits": {s: list(p) for s, p in self.splits.items()},
            "whitening": self.whitening.to_dict() | {"identity": self.whitening.identity},
            "morphable_model": {"source": self.morphable_model.source,
                                "identity": self.morphable_model.identity,
                                "flip_mirror_residual": self.morphable_model.flip_mirror_residual},
            "image_format": self.image_format, "config": self.config, "config_digest": self.config_digest,
            "code_version": self.code_version,
        }
        if self.aflw2000 is not None:
            data["aflw2000"] = {"input": self.aflw2000.input, "counts": self.aflw2000.counts,
                                "quarantine": self.aflw2000.quarantine, "skipped": self.aflw2000.skipped,
                                "shards": list(self.aflw2000.shards)}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> Manifest:
        """Read the file's layout; a ManifestError names ``source`` and what is wrong."""
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("version", 1)
        if version != MANIFEST_VERSION:
            raise ManifestError(f"{source}: manifest version {version!r} is not one this code reads "
                                f"(it reads version {MANIFEST_VERSION}); preprocess again with this version")
        try:
            aflw = data.get("aflw2000")
            manifest = cls(
                input=data["input"], output=data["output"], counts=data["counts"],
                quarantine=data["quarantine"], skipped=list(data.get("skipped", [])),
                splits={split: tuple(data["splits"][split]) for split in SPLITS},
                whitening=ParamStats.from_dict(data["whitening"]),
                morphable_model=LabelModel(**data["morphable_model"]),
                image_format=data["image_format"], config=data["config"],
                config_digest=data["config_digest"], code_version=data["code_version"],
                aflw2000=None if aflw is None else EvaluationShards(
                    aflw["input"], aflw["counts"], aflw["quarantine"], tuple(aflw["shards"]),
                    list(aflw.get("skipped", []))),
                version=version,
            )
        except KeyError as err:
            raise ManifestError(f"{source}: the manifest lacks the field {err.args[0]!r}") from err
        except (TypeError, ValueError) as err:
            raise ManifestError(f"{source}: a manifest field has the wrong form ({err})") from err
        manifest.check_counts(source)
        return manifest


def write_manifest(filesystem: pafs.FileSystem, output: str, manifest: Manifest) -> None:
    """Write ``output/manifest.json`` atomically."""
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(filesystem, f"{output}/{MANIFEST_FILE}", text.encode())


def find_manifest(filesystem: pafs.FileSystem, output: str) -> Manifest | None:
    """The manifest in ``output`` (a path on ``filesystem``), or None when there is none."""
    path = f"{output}/{MANIFEST_FILE}"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        text = stream.read()
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from err
    return Manifest.from_dict(data, path)


def read_manifest(shards: str) -> Manifest:
    """The manifest of a ``frnet preprocess`` output (path or URI)."""
    filesystem, root = resolve(shards)
    manifest = find_manifest(filesystem, root)
    if manifest is None:
        raise FileNotFoundError(f"{shards}: no {MANIFEST_FILE} (not a `frnet preprocess` output)")
    return manifest
