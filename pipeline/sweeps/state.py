"""A sweep's own files in its storage, beside Tune's experiment state: what ``--resume`` needs
from any head given the same storage path.

``STORAGE/NAME/`` is Tune's experiment folder (trials, its searcher's saved state);
``STORAGE/NAME/frnet_sweep/`` holds the sweep's context (``sweep.json``: its base and sweep
configs, MLflow parent run), ``space.yaml``, ``tune.yaml``, ASHA's rungs, and once it ends
``results.csv`` and ``best_train.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from preprocessing.datasets import read_bytes, resolve
from preprocessing.errors import MissingFileError

SWEEP_FILES = "frnet_sweep"  # in the Tune experiment folder
ASHA_RUNGS = "asha_rungs.json"


def sweep_file_location(storage: str, name: str, file_name: str) -> str:
    """The location (path or URI) of one of the sweep's files in its storage."""
    return f"{storage.rstrip('/')}/{name}/{SWEEP_FILES}/{file_name}"


def write_text(location: str, text: str) -> None:
    filesystem, path = resolve(location)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode())


def read_text(location: str) -> str | None:
    """The file's text, or None where there is none."""
    filesystem, path = resolve(location)
    try:
        return read_bytes(filesystem, path).decode()
    except MissingFileError:
        return None


def store_sweep_files(storage: str, name: str, files: list[Path]) -> None:
    """Copies of local files into the sweep's storage (the same names)."""
    for path in files:
        write_text(sweep_file_location(storage, name, path.name), path.read_text())


class ResumableASHA(ASHAScheduler):
    """ASHA that keeps its rungs (each trial's result at each milestone) in the sweep's storage.
    Tune restores a resumed sweep's searcher but not its scheduler's rungs, so without it a trial
    after the interruption would be judged against only the trials that ran after it."""

    def __init__(self, state_path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state_path = state_path  # a path or URI (sweeps before storage held it: a local path)
        self.loaded = False

    def _rungs(self) -> list[list[dict[str, float]]]:
        return [[recorded for _, recorded in bracket._rungs] for bracket in self._brackets]

    def _load(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        text = read_text(self.state_path)
        if text is not None:
            for rungs, saved in zip(self._rungs(), json.loads(text), strict=True):
                for recorded, values in zip(rungs, saved, strict=True):
                    recorded.update(values)

    def _save(self) -> None:
        rungs = [[{trial: float(value) for trial, value in recorded.items()} for recorded in bracket]
                 for bracket in self._rungs()]
        write_text(self.state_path, json.dumps(rungs))

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()
