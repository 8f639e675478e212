"""cluster.yaml against the schema the ray package itself ships (what `ray up` validates)."""

import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from tests.conftest import REPO_ROOT

SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def schema():
    return json.loads(SCHEMA_PATH.read_text())


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_rays_schema(schema, cluster):
    jsonschema.validate(cluster, schema)
    assert cluster["head_node_type"] in cluster["available_node_types"]


def test_every_node_gets_this_project(cluster):
    assert "." in cluster["file_mounts"].values()
    assert any("pip install -e ." in command for command in cluster["setup_commands"])


def test_the_schema_check_catches_a_bad_key(schema, cluster):
    broken = dict(cluster, max_wrokers=3)
    with pytest.raises(jsonschema.ValidationError, match="max_wrokers"):
        jsonschema.validate(broken, schema)
