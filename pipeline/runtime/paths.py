"""Where a relative input path points, wherever a stage runs.

A stage may run from any folder: ``ray submit`` runs a copy of the script from the head node's
home folder, ``ray job submit --working-dir .`` from an uploaded copy of the checkout. One rule
holds for every input a command line or a config file names (config files, search spaces,
dataset and shard folders, morphable-model folders): an absolute path is used as it is; a
relative one is looked up in the current folder and then in the project checkout (the folder
that holds ``pipeline/``); an input found in neither is an error that names both paths tried.
URIs (``s3://...``) are used as they are. Outputs are written relative to the current folder.
"""

from __future__ import annotations

from pathlib import Path

from models.face_models import map_paths
from pipeline.runtime.config import ConfigError

CHECKOUT = Path(__file__).resolve().parents[2]
# For every stage's --help.
RULE = (f"Relative input paths (config files, data folders, paths inside configs) are looked up in "
        f"the current folder, then in the project checkout ({CHECKOUT}); outputs go to the current folder.")


def input_path(path: str | Path, what: str) -> Path:
    """The absolute path of an input named ``path`` (``what``: the flag or key, for the error)."""
    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [Path.cwd() / given, CHECKOUT / given]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    tried = " or ".join(str(candidate) for candidate in dict.fromkeys(candidates))
    raise ConfigError(f"{what} {path}: not found (tried {tried})")


def input_location(location: str, what: str) -> str:
    """``input_path`` for a folder that may also be given as a URI (kept as it is)."""
    return location if "://" in location else str(input_path(location, what))


SHARDS_HINT = ("shards are what `frnet preprocess --output DIR` writes (`make demo` makes a small set in "
               "runs/demo/data/shards): give their folder with --shards DIR")


def shards_location(location: str, flag_given: bool, config: Path | str) -> str:
    """``input_location`` for a training config's ``data.shards``; a missing folder is refused
    naming where the value came from (the flag, or the key in ``config``) and what makes shards."""
    what = "--shards" if flag_given else f"data.shards (from {config})"
    try:
        return input_location(location, what)
    except ConfigError as err:
        raise ConfigError(f"{err}; {SHARDS_HINT}") from err


def model_source(source: str, what: str) -> str:
    """A morphable-model source (:mod:`models.face_models`) with its paths made absolute."""
    return map_paths(source, lambda path: str(input_path(path, what)))
