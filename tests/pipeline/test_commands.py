"""What every stage's command line promises: defaults named in --help, one exit-status rule
(2: cannot start as given; 1: bad input content), paths checked before Ray starts, and nothing
written by a look-up that fails. Called in-process: each refusal returns before any work."""

import argparse
import importlib

import cv2
import numpy as np
import pytest
import ray

from pipeline import predict, preprocess, register, train, tune
from pipeline.cli import STAGES
from pipeline.runtime.stage_tools import EXIT_STATUS
from tests.pipeline.cluster_harness import free_ports

# Options that name where a stage writes; each either is required or says its default.
OUTPUT_OPTIONS = {"--out", "--output", "--run-dir", "--json", "--onnx"}


def stage_parser_of(stage: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a stage builds, caught at the moment it would parse."""
    caught = {}

    def catch(self, args=None, namespace=None):
        caught["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(SystemExit):
        importlib.import_module(f"pipeline.{stage}").parse_args([])
    return caught["parser"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_help_names_every_default_output_and_the_exit_statuses(stage, monkeypatch):
    parser = stage_parser_of(stage, monkeypatch)
    text = parser.format_help()
    assert " ".join(EXIT_STATUS.split()) in " ".join(text.split())
    for action in parser._actions:
        for option in set(action.option_strings) & OUTPUT_OPTIONS:
            help_text = parser._get_formatter()._get_help_string(action) % {"default": action.default}
            assert action.required or "(default: " in help_text, \
                f"frnet {stage} {option}: --help does not say where it writes by default ({help_text!r})"


def error_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "images" / "face.png"
    path.parent.mkdir()
    cv2.imwrite(str(path), np.full((64, 64, 3), 90, np.uint8))
    return path


def test_predict_without_a_store_writes_nothing(image, tmp_path, monkeypatch, caplog):
    """No --tracking-uri (and no MLFLOW_TRACKING_URI): refused, no ./mlflow.db; a sqlite store
    that does not exist: refused, not created. Exit 2, nothing under --out either."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "predictions"
    assert predict.main(["--model-uri", "models:/mobile-frnet@champion", str(image), "--out", str(out)]) == 2
    missing = tmp_path / "elsewhere" / "mlflow.db"
    assert predict.main(["--model-uri", "models:/mobile-frnet@champion", "--tracking-uri",
                         f"sqlite:///{missing}", str(image), "--out", str(out)]) == 2
    first, second = error_lines(caplog)
    assert first.startswith("--tracking-uri is needed with --model-uri")
    assert second == (f"--tracking-uri sqlite:///{missing}: no MLflow store there ({missing} does not "
                      "exist); nothing was created")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_predict_refuses_a_missing_image_or_model_file_before_any_work(image, tmp_path, caplog):
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(tmp_path / "none.pt"), str(image), "--out", str(out)]) == 2
    assert predict.main(["--checkpoint", str(image), str(tmp_path / "nothere.jpg"), "--out", str(out)]) == 2
    assert predict.main(["--checkpoint", str(image), str(image), "--out", str(out)]) == 2  # not a model
    first, second, third = error_lines(caplog)
    assert first.startswith("--checkpoint ") and "none.pt: not found" in first
    assert second.startswith("image ") and "nothere.jpg: not found" in second
    assert third.startswith(f"{image}: not a model file")
    assert not out.exists()


@pytest.mark.parametrize("case", ["out is a file", "json is a folder", "json is an input",
                                  "out replaces an input", "json is an output", "json under a file"])
def test_predict_refuses_outputs_that_would_replace_an_input_before_loading_the_model(case, image, tmp_path,
                                                                                      caplog):
    """Checked before the model file is looked at (it does not exist here, and the error is not
    about it): exit 2, one line naming the flag and the reason, nothing written or replaced."""
    out, summary = tmp_path / "out", None
    images = [image]
    if case == "out is a file":
        out.write_text("notes\n")
    elif case == "json is a folder":
        summary = tmp_path / "images"
    elif case == "json is an input":
        summary = image
    elif case == "out replaces an input":  # face.png's overlay would replace the input face_overlay.png
        images.append(image.with_name("face_overlay.png"))
        cv2.imwrite(str(images[-1]), np.full((64, 64, 3), 30, np.uint8))
        out = image.parent
    elif case == "json is an output":
        summary = out / "face.json"
    elif case == "json under a file":
        summary = image / "summary.json"
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    args = ["--checkpoint", str(tmp_path / "none.pt"), *map(str, images), "--out", str(out)]
    assert predict.main(args + (["--json", str(summary)] if summary else [])) == 2
    expected = {"out is a file": f"--out {out}: exists and is not a folder",
                "json is a folder": f"--json {summary}: is a folder; give the file to write",
                "json is an input": f"--json {summary}: is one of the input images; it would be replaced",
                "out replaces an input": f"--out {out}: an output would replace the input {images[-1]}; "
                                         "choose another --out",
                "json is an output": f"--json {summary}: is where an image's output goes; give another name",
                "json under a file": f"--json {summary}: {image} is a file, not a folder"}[case]
    assert error_lines(caplog) == [expected]
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize("case", ["plain folder", "sqlite text file", "sqlite folder", "closed port",
                                  "name with a path", "empty name"])
def test_register_refuses_a_bad_store_or_name_before_loading_anything(case, tmp_path, monkeypatch, caplog):
    """Checked before the model file is looked at (it does not exist here) and before any
    evaluation: exit 2 in one line naming the flag and the reason, nothing created in the
    store's place."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n")
    port = free_ports(1)[0]
    store, name = {"plain folder": (str(tmp_path), "m"), "sqlite text file": (f"sqlite:///{notes}", "m"),
                   "sqlite folder": (f"sqlite:///{tmp_path}", "m"),
                   "closed port": (f"http://127.0.0.1:{port}", "m"),
                   "name with a path": (f"sqlite:///{tmp_path}/mlflow.db", "a/../b"),
                   "empty name": (f"sqlite:///{tmp_path}/mlflow.db", "")}[case]
    status = register.main(["--checkpoint", str(tmp_path / "none.pt"), "--tracking-uri", store, "--name",
                            name, "--aflw2000", str(tmp_path / "no-such-folder")])
    assert status == 2
    reason = {"plain folder": "a folder is MLflow's file store, which MLflow 3 refuses unless "
                              "MLFLOW_ALLOW_FILE_STORE=true",
              "sqlite text file": f"{notes} is not an SQLite database",
              "sqlite folder": f"{tmp_path} is a folder, not an SQLite database file",
              "closed port": "no MLflow server answered within 10 s"}
    [line] = error_lines(caplog)
    if case in reason:
        assert line.startswith(f"--tracking-uri {store}: {reason[case]}"), line
        assert line.endswith("nothing was evaluated or registered"), line
    else:
        assert line.startswith("--name: must be a name of letters, digits"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert notes.read_text() == "not a database\n"


@pytest.mark.parametrize("stage", [train, tune, preprocess], ids=["train", "tune", "preprocess"])
def test_train_tune_and_preprocess_refuse_missing_paths_alike(stage, tmp_path, monkeypatch, caplog):
    """A config file or data folder that does not exist: exit 2, one line naming the flag and
    both places looked in, before Ray starts; the config flag has the same default rule."""
    monkeypatch.chdir(tmp_path)
    ray_before = ray.is_initialized()
    name = stage.__name__.rsplit(".", 1)[-1]
    data = ["--input", "no-such-input", "--output", "out"] if stage is preprocess else \
        ["--shards", "no-such-shards"] + (["--space", "tune_spaces/small.yaml"] if stage is tune else [])
    assert stage.main(["--config", "no-such.yaml", *data]) == 2
    assert stage.main(data) == 2  # the default configs/STAGE.yaml of the checkout is found
    config_error, data_error = error_lines(caplog)
    assert config_error.startswith("--config no-such.yaml: not found (tried ")
    flag = "--input no-such-input" if stage is preprocess else "--shards no-such-shards"
    assert data_error.startswith(f"{flag}: not found (tried {tmp_path}")
    assert stage_parser_of_default(stage, monkeypatch) == f"configs/{name}.yaml"
    assert ray.is_initialized() == ray_before
    assert list(tmp_path.iterdir()) == []


def stage_parser_of_default(stage, monkeypatch) -> str:
    parser = stage_parser_of(stage.__name__.rsplit(".", 1)[-1], monkeypatch)
    (config,) = [action for action in parser._actions if "--config" in action.option_strings]
    return str(config.default)


def ray_must_not_start(*args, **kwargs):
    raise AssertionError("Ray was started before the refusal")


def test_train_with_no_arguments_names_the_config_key_and_what_makes_shards(tmp_path, monkeypatch, caplog):
    """The checkout's configs/train.yaml names data/shards, which a new checkout lacks: the refusal
    says the value came from that file and which command writes shards, before Ray starts."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "start_ray", ray_must_not_start)
    assert train.main([]) == 2
    (line,) = error_lines(caplog)
    assert "data.shards (from configs/train.yaml) data/shards: not found" in line
    assert "frnet preprocess --output DIR" in line and "--shards DIR" in line


def test_a_space_whose_grace_period_outruns_the_trials_is_refused_before_ray(tmp_path, monkeypatch, caplog):
    """The demo's sweep config (2 epochs a trial) with the full space (grace period 5): one line
    naming both files and the space that fits, and no Ray started."""
    monkeypatch.setattr(tune, "start_ray", ray_must_not_start)
    shards = tmp_path / "shards"
    shards.mkdir()
    code = tune.main(["--config", "configs/demo/tune.yaml", "--space", "tune_spaces/default.yaml",
                      "--shards", str(shards), "--run-dir", str(tmp_path / "run")])
    assert code == 2
    (line,) = error_lines(caplog)
    assert "scheduler.grace_period 5 exceeds the 2 epochs per trial" in line
    assert "configs/demo/tune.yaml" in line and "tune_spaces/small.yaml" in line
    assert not (tmp_path / "run").exists()


def test_tune_with_no_arguments_names_the_spaces_that_go_with_the_configs(capsys):
    with pytest.raises(SystemExit) as stop:
        tune.main([])
    assert stop.value.code == 2
    message = capsys.readouterr().err
    assert "--space is required" in message and "tune_spaces/default.yaml with configs/tune.yaml" in message
    assert "tune_spaces/small.yaml with configs/demo/tune.yaml" in message
