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

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from models.face_models import map_paths
from pipeline.runtime.config import ConfigError
from preprocessing.datasets import resolve
from preprocessing.manifest import MANIFEST_FILE

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


def stored_file(location: str, what: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of the object at the URI ``location``, checked to be there (else a
    ConfigError saying why: no bucket, nothing there, a prefix, the endpoint's answer)."""
    try:
        filesystem, path = resolve(location)
        kind = filesystem.get_file_info(path).type
    except (OSError, ValueError):
        kind = None
    if kind != pafs.FileType.File:
        problem = uri_problem(location) if kind != pafs.FileType.Directory else None
        raise ConfigError(f"{what} {location}: {problem or 'a prefix (folder), not a file'}")
    return filesystem, path


def input_file(location: str | Path, what: str) -> str:
    """``input_location`` for one file: a URI must name an object that is there."""
    location = str(location)
    if "://" not in location:
        return str(input_path(location, what))
    stored_file(location, what)
    return location


_DOWNLOADS: list[Path] = []  # this process's folder of inputs copied from URIs


def local_file(location: str | Path, what: str) -> Path:
    """An input file on this machine, for code that reads local files only (``torch.load`` of a
    model file): :func:`input_file`'s path, or for a URI its object copied into a temporary
    folder of this process (as ``.../s3/BUCKET/KEY``), removed when the process exits."""
    location = str(location)
    if "://" not in location:
        return input_path(location, what)
    filesystem, path = stored_file(location, what)
    if not _DOWNLOADS:
        folder = Path(tempfile.mkdtemp(prefix="frnet-inputs-"))
        atexit.register(shutil.rmtree, folder, True)
        _DOWNLOADS.append(folder)
    scheme, _, rest = location.partition("://")
    target = _DOWNLOADS[0] / scheme / rest
    target.parent.mkdir(parents=True, exist_ok=True)
    with filesystem.open_input_stream(path) as source, target.open("wb") as sink:
        shutil.copyfileobj(source, sink)
    return target


def readable_location(location: str, what: str) -> str:
    """``input_location``, a URI checked to hold something (see :func:`uri_problem`): the
    commands' own check before Ray starts (loading a config never reaches the network)."""
    found = input_location(location, what)
    problem = uri_problem(found) if "://" in found else None
    if problem is not None:
        raise ConfigError(f"{what} {location}: {problem}")
    return found


def uri_problem(location: str) -> str | None:
    """Why nothing can be read at the URI ``location`` (None: an object or a prefix holding
    objects is there): no such bucket, nothing under the prefix, or the storage's own answer (an
    endpoint that does not answer, credentials it refuses). The endpoint is named, never a key."""
    try:
        filesystem, path = pafs.FileSystem.from_uri(location)
        if filesystem.get_file_info(path).type != pafs.FileType.NotFound:
            return None
        bucket = path.split("/", 1)[0]
        if isinstance(filesystem, pafs.S3FileSystem) and bucket != path \
                and filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
            return f"no bucket {bucket!r} at {s3_endpoint()}"
        return "nothing there"
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())
        if not location.startswith("s3://"):
            return reason
        if "ACCESS_DENIED" in reason or "InvalidAccessKeyId" in reason or "SignatureDoesNotMatch" in reason:
            return (f"{s3_endpoint()} refused the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                    f"or the instance profile): {reason}")
        return f"cannot be read at {s3_endpoint()}: {reason}"


# The variables that point S3 clients (pyarrow's, Ray's, MLflow's boto3) at an endpoint with a key
# pair, as the AWS tools read them.
STORAGE_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CA_BUNDLE",
                     "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_S3_IGNORE_TLS")


def storage_environment() -> dict[str, str]:
    """The driver's S3 variables, for every Ray worker of its job (the job's runtime environment):
    a node started without them reaches the same endpoint with the same keys. They live in the
    job's environment only, never in a log line, MLflow, a manifest or a checkpoint."""
    return {name: os.environ[name] for name in STORAGE_VARIABLES if name in os.environ}


def s3_endpoint() -> str:
    """Where ``s3://`` URIs go: the endpoint the AWS variables name, else AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


SHARDS_HINT = ("shards are what `frnet preprocess --output DIR` writes (`make demo` makes a small set in "
               "runs/demo/data/shards): give their folder with --shards DIR")


def shards_location(location: str, flag_given: bool, config: Path | str) -> str:
    """``input_location`` for a training config's ``data.shards``; a missing folder is refused
    naming where the value came from (the flag, or the key in ``config``) and what makes shards."""
    try:
        return input_location(location, shards_source(flag_given, config))
    except ConfigError as err:
        raise ConfigError(f"{err}; {SHARDS_HINT}") from err


def shards_source(flag_given: bool, config: Path | str) -> str:
    return "--shards" if flag_given else f"data.shards (from {config})"


def check_shards_readable(location: str, what: str) -> None:
    """Refuse (ConfigError) shards that cannot be read where they are said to be: a URI that
    holds nothing readable, or a location without a shard manifest."""
    try:
        readable_location(location, what)
        filesystem, root = resolve(location)
        if filesystem.get_file_info(f"{root}/{MANIFEST_FILE}").type != pafs.FileType.File:
            raise ConfigError(f"{what} {location}: no {MANIFEST_FILE} there (not a `frnet preprocess` "
                              "output)")
    except ConfigError as err:
        raise ConfigError(f"{err}; {SHARDS_HINT}") from err


def model_source(source: str, what: str) -> str:
    """A morphable-model source (:mod:`models.face_models`) with its paths made absolute."""
    return map_paths(source, lambda path: str(input_path(path, what)))
