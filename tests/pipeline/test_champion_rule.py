"""`champion` moves only between versions measured on the same evaluation set: `frnet register`
in-process against the project's sqlite registry, with a worse and a better model file and a
synthetic AFLW2000-3D folder of six faces and a one-face subset of it."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pytest
import torch

from models.architectures import build_model
from models.checkpoint import ModelBundle, save_bundle
from models.face_models import load_face_model
from models.frame import landmark_crop_box
from models.params import ParamStats
from pipeline import register
from pipeline.evaluation.scoring import SCORING_PROTOCOL, SET_TAGS, EvaluationSet
from pipeline.registration.gate import Scored, champion_decision
from pipeline.runtime.tracking import CHAMPION, RANKING_TAG
from preprocessing.datasets import list_aflw2000, read_annotation
from preprocessing.labels import label_from_annotation
from preprocessing.synth import SynthConfig, generate

NAME = "frnet-champion-rule"


def model_file(path, folder, offset: float):
    """Mobile-FRNet whitened by the folder's labels, its 1x1 head zeroed but for a bias of
    ``offset`` standard deviations: 0 predicts the mean face everywhere, more is further from it."""
    filesystem, refs = list_aflw2000(folder)
    labels = []
    for ref in refs:
        annotation = read_annotation(filesystem, ref)
        labels.append(label_from_annotation(annotation, landmark_crop_box(annotation.pt3d_68), 450))
    torch.manual_seed(0)
    network = build_model("mobile-frnet", 0.25)
    with torch.no_grad():
        network.head.weight.zero_()
        network.head.bias.fill_(offset)
    bundle = ModelBundle("mobile-frnet", 0.25, network.state_dict(), ParamStats.from_params(np.array(labels)),
                         "synthetic", load_face_model("synthetic").identity)
    save_bundle(path, bundle)
    return path


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("champion")
    full = root / "AFLW2000"
    generate(SynthConfig("aflw2000-3d", 6, seed=3), full)
    return {"root": root, "full": full, "worse": model_file(root / "worse.pt", full, 1.5),
            "better": model_file(root / "better.pt", full, 0.0)}


@pytest.fixture
def registry(tmp_path):
    previous = mlflow.get_tracking_uri()
    yield tmp_path / "run"
    mlflow.set_tracking_uri(previous)


def frnet_register(model, folder, run_dir, json_path, capsys) -> tuple[dict, list[str]]:
    assert register.main(["--checkpoint", str(model), "--aflw2000", str(folder), "--run-dir", str(run_dir),
                          "--name", NAME, "--batch-size", "8", "--json", str(json_path)]) == 0
    return json.loads(json_path.read_text()), capsys.readouterr().out.splitlines()


def test_champion_moves_only_on_the_same_set(setting, registry, tmp_path, capsys):
    client = mlflow.MlflowClient(f"sqlite:///{registry / 'mlflow.db'}")

    def champion() -> str:
        return str(client.get_model_version_by_alias(NAME, CHAMPION).version)

    # The first scored version becomes champion, with its set as tags.
    first, lines = frnet_register(setting["worse"], setting["full"], registry, tmp_path / "1.json", capsys)
    full_set = first["evaluation_set"]
    assert first["champion"] and champion() == "1"
    assert full_set["images"] == 6 and full_set["protocol"] == f"{SCORING_PROTOCOL} crops=images yaw=mat"
    assert "registered version 1 as the champion (the first scored version): NME " in lines[1]
    tags = client.get_model_version(NAME, "1").tags
    assert tags[SET_TAGS["digest"]] == full_set["digest"] and tags[SET_TAGS["images"]] == "6"

    # The better model on one face of the six, its best: a lower NME, but not on the champion's set.
    scored = register.score(register.read_model_file(setting["better"]),
                            register.parse_args(["--checkpoint", "x", "--aflw2000", str(setting["full"])]))
    best_face = min(scored[0]["per_image"], key=scored[0]["per_image"].get)
    one = tmp_path / "AFLW2000-one"
    one.mkdir()
    for suffix in (".jpg", ".mat"):
        shutil.copy(setting["full"] / f"{best_face}{suffix}", one)
    small, lines = frnet_register(setting["better"], one, registry, tmp_path / "2.json", capsys)
    assert small["aflw2000"]["nme_mean_of_bins"] < first["aflw2000"]["nme_mean_of_bins"]  # the trap is set
    assert not small["champion"] and champion() == "1"
    small_set = small["evaluation_set"]
    assert small_set["images"] == 1 and small_set["digest"] != full_set["digest"]
    assert lines[1] == (f"registered version 2 without promoting: evaluated on 1 image (set "
                        f"{small_set['digest'][:12]}) but the champion (version 1) on 6 (set "
                        f"{full_set['digest'][:12]}); evaluate both on one set to compare")
    assert small["champion_reason"] == lines[1]

    # The better model on the champion's six faces: the same set, a lower NME, so it moves.
    same, lines = frnet_register(setting["better"], setting["full"], registry, tmp_path / "3.json", capsys)
    assert same["evaluation_set"] == full_set
    assert same["aflw2000"]["nme_mean_of_bins"] < first["aflw2000"]["nme_mean_of_bins"]
    assert same["champion"] and champion() == "3"
    assert lines[1].startswith("registered version 3 as the champion: NME ")
    assert "beats version 1's" in lines[1]
    assert lines[1].endswith(f"on the same set (6 images, set {full_set['digest'][:12]})")

    # The worse one again on that set: it does not beat the champion.
    worse, lines = frnet_register(setting["worse"], setting["full"], registry, tmp_path / "4.json", capsys)
    assert not worse["champion"] and champion() == "3"
    assert "registered version 4 without promoting: NME " in lines[1]
    assert "does not beat the champion (version 3)" in lines[1]

    # A champion registered before sets were recorded is not comparable, whatever the NME.
    for tag in SET_TAGS.values():
        client.delete_model_version_tag(NAME, "3", tag)
    legacy, lines = frnet_register(setting["better"], setting["full"], registry, tmp_path / "5.json", capsys)
    assert not legacy["champion"] and champion() == "3"
    assert lines[1].startswith("registered version 5 without promoting: the champion (version 3) carries "
                               "no evaluation-set tags")
    assert f"set_registered_model_alias('{NAME}', 'champion', '5')" in lines[1]


def test_another_protocol_on_the_same_faces_is_not_compared():
    faces = EvaluationSet("ab" * 32, 12, f"{SCORING_PROTOCOL} crops=images yaw=mat")
    champion = Scored("2", 0.05, faces)
    shards = EvaluationSet(faces.digest, 12, f"{SCORING_PROTOCOL} crops=shards:jpeg yaw=mat")
    promoted, reason = champion_decision(Scored("3", 0.01, shards), champion, NAME)
    assert not promoted
    assert reason == (f"registered version 3 without promoting: scored by '{shards.protocol}' but the "
                      f"champion (version 2) by '{faces.protocol}' on the same set {faces.short}; evaluate "
                      "both on one set to compare")
    assert champion_decision(Scored("3", 0.01, faces), champion, NAME)[0]
    unscored = champion_decision(Scored("3", None, None), champion, NAME)
    assert unscored == (False, "registered version 3 unscored (the champion stays version 2): only a version "
                               "scored on AFLW2000-3D becomes champion")
    assert Scored.from_tags("2", {RANKING_TAG: "0.05", **faces.tags()}) == champion
