"""cluster.yaml: the schema the ray package itself ships (what `ray up` validates), and what users
of the AWS cluster rely on: Ray's image at the pinned version, no local state synced, S3 access on
the workers, an MLflow server on the head, and GPU training configs that load."""

import copy
import json
import re
import shlex
import shutil
import subprocess
import warnings
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import ray.autoscaler
import yaml

from pipeline.runtime.config import ConfigError, load_config
from pipeline.runtime.paths import input_path
from pipeline.sweeps.config import base_train_config, load_sweep_config
from pipeline.sweeps.search import plan_concurrency
from pipeline.train import load_train_config, parse_args
from preprocessing.dataflow import PreprocessConfig
from tests.conftest import REPO_ROOT

SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
CLUSTER_PATH = REPO_ROOT / "cluster.yaml"
HEAD_COMMANDS = ("setup_commands", "head_setup_commands", "head_start_ray_commands")
# Never synced to the nodes: environments, history, outputs, data and MLflow's local stores.
LOCAL_STATE = (".venv", ".git", "runs", "data", "mlruns", "mlartifacts")


@pytest.fixture(scope="module")
def schema():
    return json.loads(SCHEMA_PATH.read_text())


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER_PATH.read_text())


def pinned(requirement: str) -> str:
    """The version pyproject.toml pins a dependency to (``name[extras]==X``)."""
    found = re.search(rf'"{requirement}(\[[^\]]*\])?==([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert found, f"pyproject.toml pins no version of {requirement}"
    return found.group(2)


def header_configs() -> list[str]:
    """The config files the comment block at the top of cluster.yaml runs stages with."""
    header = []
    for line in CLUSTER_PATH.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    return re.findall(r"--config (configs/\S+\.yaml)", "\n".join(header))


def program_options(command: str, program: list[str]) -> dict[str, str | bool]:
    """The ``--flag value`` / ``--flag=value`` options given to ``program`` (e.g. ``mlflow server``)
    in a shell command line; a flag followed by another flag or nothing is True."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    starts = [i for i in range(len(tokens)) if tokens[i:i + len(program)] == program]
    assert starts, f"no `{' '.join(program)}` in {command!r}"
    options: dict[str, str | bool] = {}
    rest = tokens[starts[0] + len(program):]
    for i, token in enumerate(rest):
        if re.fullmatch(r"[<>&|;()]+", token):
            break
        if token.startswith("--"):
            name, equals, value = token.partition("=")
            following = rest[i + 1] if i + 1 < len(rest) else "--"
            plain = not following.startswith("-") and not re.fullmatch(r"[<>&|;()]+", following)
            options[name] = value if equals else (following if plain else True)
    return options


def unknown_flags(options: dict[str, str | bool], program: str) -> list[str]:
    """Flags the installed ``mlflow server`` or ``ray start`` (its click command) does not take."""
    tool, command = program.split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # importing the CLIs warns about their own dependencies
        if tool == "mlflow":
            from mlflow.cli import cli
        else:
            from ray.scripts.scripts import cli
    known = {opt for param in cli.commands[command].params for opt in param.opts}
    return sorted(set(options) - known)


def node_command(cluster: dict, keys: tuple[str, ...], program: str) -> str:
    commands = [cmd for key in keys for cmd in cluster.get(key, []) if program in cmd]
    assert len(commands) == 1, f"expected one `{program}` command in {keys}, found {commands}"
    return commands[0]


def mlflow_server_options(cluster: dict) -> dict[str, str | bool]:
    return program_options(node_command(cluster, HEAD_COMMANDS, "mlflow server"), ["mlflow", "server"])


def bucket(uri: str) -> str:
    assert uri.startswith("s3://"), uri
    return urlparse(uri).netloc


def cluster_train_config():
    return load_train_config(parse_args(["--config", "configs/cluster/train.yaml"]))


def gpu_worker_types(cluster: dict) -> dict[str, dict]:
    return {name: node for name, node in cluster["available_node_types"].items()
            if name != cluster["head_node_type"]}


# -- the schema -----------------------------------------------------------------------------------

def test_cluster_yaml_matches_rays_schema(schema, cluster):
    jsonschema.validate(cluster, schema)
    assert cluster["head_node_type"] in cluster["available_node_types"]


def test_rays_own_preparation_accepts_it(cluster):
    """What `ray up` does with the file before it contacts AWS: defaults filled in, checked again."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["head_setup_commands"][:len(cluster["setup_commands"])] == cluster["setup_commands"]


@pytest.mark.parametrize(("where", "key"), [
    ((), "max_wrokers"),
    (("docker",), "pull_befor_run"),
    (("available_node_types", "gpu_worker"), "min_wrokers"),
])
def test_the_schema_check_catches_a_misspelled_key(schema, cluster, where, key):
    broken = copy.deepcopy(cluster)
    section = broken
    for name in where:
        section = section[name]
    section[key] = 3
    with pytest.raises(jsonschema.ValidationError, match=key):
        jsonschema.validate(broken, schema)


# -- the image and what is installed in it --------------------------------------------------------

def test_the_image_is_rays_own_at_the_ray_version_pyproject_pins(cluster):
    docker = cluster["docker"]
    found = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py3(?P<minor>\d+)-(gpu|cu\d+)", docker["image"])
    assert found, docker["image"]
    assert found["ray"] == pinned("ray")
    requires = re.search(r'requires-python = ">=3\.(\d+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert int(found["minor"]) >= int(requires.group(1)), "the image's Python is older than requires-python"
    assert not {"head_image", "worker_image"} & set(docker), "one image on every node"
    assert docker["pull_before_run"] is True and docker["container_name"]
    assert "--ulimit nofile=65536:65536" in docker["run_options"]
    assert "--gpus all" in docker["worker_run_options"]
    for node in cluster["available_node_types"].values():
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", node["node_config"]["ImageId"]), "a pinned AMI id"


def test_every_node_installs_the_tested_torch_then_this_project(cluster):
    """The torch the cluster image gets is the release the test suite runs (the Makefile's
    TORCH_SPEC), installed before the project so that pip keeps it."""
    assert cluster["file_mounts"] == {"~/mobile-frnet": "."}
    tested = re.search(r"^TORCH_SPEC \?= (torch==\S+)$", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE)
    assert tested, "the Makefile names no pinned TORCH_SPEC"
    setup = cluster["setup_commands"]
    torch = [i for i, cmd in enumerate(setup) if cmd == f"pip install {tested.group(1)}"]
    project = [i for i, cmd in enumerate(setup) if cmd == "pip install -e ~/mobile-frnet"]
    assert torch and project and torch[0] < project[0], setup


# -- what is synced ----------------------------------------------------------------------------------

def test_local_state_is_never_synced(cluster):
    excluded = {pattern.strip("/") for pattern in cluster["rsync_exclude"]}
    assert set(LOCAL_STATE) <= excluded
    assert cluster["rsync_filter"] == [".gitignore"]
    ignored = {line.strip("/") for line in (REPO_ROOT / ".gitignore").read_text().splitlines()}
    assert {"data", "runs", ".venv", "mlruns", "mlartifacts"} <= ignored


@pytest.mark.ray  # runs rsync: a subprocess, so not in the unit tier
@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")
def test_rsync_with_the_files_options_sends_the_code_only(cluster, tmp_path):
    source = tmp_path / "checkout"
    kept = ["pipeline/train.py", "configs/cluster/train.yaml", "pyproject.toml"]
    dropped = [f"{name}/x" for name in LOCAL_STATE] + ["pipeline/__pycache__/train.pyc",
                                                       "mobile_frnet.egg-info/PKG-INFO", "dist/x.whl"]
    for name in kept + dropped:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("x")
    shutil.copy(REPO_ROOT / ".gitignore", source / ".gitignore")
    # The options as Ray's command runner passes them to rsync.
    options = [arg for pattern in cluster["rsync_exclude"] for arg in ("--exclude", pattern)]
    options += [arg for name in cluster["rsync_filter"] for arg in ("--filter", f"dir-merge,- {name}")]
    listing = subprocess.run(["rsync", "-a", "--dry-run", "--out-format=%n", *options, f"{source}/",
                              str(tmp_path / "node")], capture_output=True, text=True, check=True).stdout
    sent = {line for line in listing.splitlines() if not line.endswith("/")}
    assert set(kept) <= sent
    assert not {name for name in sent if name in dropped}, sent


# -- S3, MLflow and Ray on the nodes --------------------------------------------------------------

def test_workers_reach_s3_through_an_instance_profile(cluster):
    workers = gpu_worker_types(cluster)
    assert workers
    for name, node in workers.items():
        profile = node["node_config"].get("IamInstanceProfile", {})
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", profile.get("Arn", "")), name


def test_the_head_starts_a_durable_mlflow_server_with_artifacts_in_s3(cluster):
    command = node_command(cluster, HEAD_COMMANDS, "mlflow server")
    options = mlflow_server_options(cluster)
    assert unknown_flags(options, "mlflow server") == []
    assert str(options["--artifacts-destination"]).startswith("s3://")
    assert options["--serve-artifacts"] is True
    assert int(options["--port"]) == 5000
    store = str(options["--backend-store-uri"])
    assert store.startswith("sqlite:////"), "an absolute sqlite path"
    folder = str(Path(store.removeprefix("sqlite:///")).parent)
    head_options = cluster["docker"]["head_run_options"]
    mounts = [option.split()[-1] for option in head_options if option.startswith("-v ")]
    assert any(mount.endswith(f":{folder}") for mount in mounts), "the database outside the container"
    assert "nohup" in command and command.rstrip(" )").endswith("&")


def test_a_misspelled_mlflow_flag_is_caught():
    options = program_options("nohup mlflow server --artifact-destination s3://b/a --port 5000 &",
                              ["mlflow", "server"])
    assert options == {"--artifact-destination": "s3://b/a", "--port": "5000"}
    assert unknown_flags(options, "mlflow server") == ["--artifact-destination"]


def test_ray_start_commands_as_rays_aws_examples(cluster):
    head = node_command(cluster, ("head_start_ray_commands",), "ray start")
    worker = node_command(cluster, ("worker_start_ray_commands",), "ray start")
    first = {cluster["head_start_ray_commands"][0], cluster["worker_start_ray_commands"][0]}
    assert [command.split() for command in first] == [["ray", "stop"]]
    head_options = program_options(head, ["ray", "start"])
    assert head_options == {"--head": True, "--port": "6379", "--dashboard-host": "127.0.0.1",
                            "--autoscaling-config": "~/ray_bootstrap_config.yaml"}
    worker_options = program_options(worker, ["ray", "start"])
    assert worker_options == {"--address": "$RAY_HEAD_IP:6379"}
    assert unknown_flags(head_options, "ray start") == unknown_flags(worker_options, "ray start") == []


# -- the configs the cluster runs ------------------------------------------------------------------

def test_the_header_names_the_cluster_training_config():
    assert "configs/cluster/train.yaml" in header_configs()
    for name in header_configs():
        assert (REPO_ROOT / name).is_file(), name


def test_the_cluster_training_config_trains_on_every_gpu_worker_with_s3_and_the_head_server(cluster):
    config = cluster_train_config()
    assert config.scaling.use_gpu is True and config.scaling.gpus_per_worker == 1.0
    workers = gpu_worker_types(cluster)
    assert config.scaling.num_workers == sum(node["max_workers"] for node in workers.values())
    assert config.scaling.num_workers <= cluster["max_workers"]
    server = mlflow_server_options(cluster)
    the_bucket = bucket(str(server["--artifacts-destination"]))
    assert bucket(config.run.storage_path) == bucket(config.data.shards) == the_bucket
    tracking = urlparse(config.mlflow.tracking_uri)
    assert tracking.scheme == "http" and tracking.port == int(server["--port"])
    # Loopback: only processes on the head write, and users reach it through an SSH forward.
    assert tracking.hostname == "localhost" and server["--host"] == "127.0.0.1"


def test_the_cluster_sweep_and_preprocessing_configs_load(cluster):
    path = input_path("configs/cluster/tune.yaml", "--config")
    sweep = load_sweep_config(path)
    assert base_train_config(path, sweep, {}) == cluster_train_config()
    assert sweep.trial.gpus_per_worker > 0 and sweep.storage_path.startswith("s3://")
    workers = sum(node["max_workers"] for node in gpu_worker_types(cluster).values())
    nodes = [{"CPU": 8.0}] + [{"CPU": 4.0, "GPU": 1.0}] * workers  # the head and every GPU worker
    plan = plan_concurrency(sweep, nodes, total_trials=24)
    assert plan.trials > workers and plan.trials == sweep.max_concurrent_trials  # several trials a GPU
    preprocess = load_config(input_path("configs/cluster/preprocess.yaml", "--config"), PreprocessConfig)
    # data/ is not synced: the driver reads the morphable model from an absolute path on the head.
    assert re.fullmatch(r"bfm68:/home/ray/\S+", preprocess.morphable_model), preprocess.morphable_model


def test_a_misspelled_key_in_the_cluster_config_is_refused(tmp_path):
    text = (REPO_ROOT / "configs" / "cluster" / "train.yaml").read_text()
    broken = tmp_path / "train.yaml"
    broken.write_text(text.replace("  use_gpu: true", "  use_gpus: true"))
    with pytest.raises(ConfigError, match="unknown key 'scaling.use_gpus'"):
        load_train_config(parse_args(["--config", str(broken)]))
