"""The quiet console: Ray's own INFO lines dropped where they reach the console, its warnings
and errors kept, the project's lines kept; a Ray failure ends with one line of advice; the
sweep's log axes and the pictures' legends read."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import ray.exceptions

from pipeline.runtime import console


def record(pathname: str, level: int, name: str = "x") -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, "message", None, None)


def test_ray_info_lines_are_dropped_and_its_warnings_kept():
    ray_file = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "context.py")
    keep = console.RayInfoFilter()
    assert not keep.filter(record(ray_file, logging.INFO, name=ray_file))
    assert keep.filter(record(ray_file, logging.WARNING)) and keep.filter(record(ray_file, logging.ERROR))
    assert keep.filter(record("/work/project/pipeline/training/worker.py", logging.INFO, "frnet.train"))


def test_quiet_libraries_sets_the_levels_and_verbose_leaves_them(monkeypatch):
    for name in (*console.LIBRARY_LOGGERS, *console.QUIET_WARNINGS_LOGGERS):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    console.quiet_libraries(verbose=True)
    assert logging.getLogger("ray.train").level == logging.NOTSET
    console.quiet_libraries(verbose=False)
    assert logging.getLogger("ray.train").level == logging.WARNING
    assert logging.getLogger("mlflow").level == logging.WARNING
    assert logging.getLogger("ray.data._internal.progress").level == logging.ERROR
    assert logging.getLogger("frnet").level == logging.NOTSET  # the project's own


@pytest.mark.parametrize("error, is_ray", [
    (ray.exceptions.RaySystemError("the raylet died"), True),
    (RuntimeError("training failed"), False),
])
def test_a_ray_failure_ends_with_one_line_of_advice(error, is_ray, capsys, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "0")

    def main(argv):
        try:
            raise error
        except Exception as inner:
            raise ValueError("the stage stopped") from inner  # Ray's error as the cause counts too

    if not is_ray:
        with pytest.raises(ValueError, match="the stage stopped"):
            console.run_main(main, [])
        return
    assert console.run_main(main, []) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: ValueError: the stage stopped", console.RAY_ADVICE]


def test_log_axis_labels_are_plain_numbers_without_minor_labels(tmp_path):
    import matplotlib.pyplot as plt

    from pipeline.sweeps.report import log_x_axis

    figure, axis = plt.subplots()
    axis.scatter([0.012, 0.05, 0.21], [1, 2, 3])
    log_x_axis(axis)
    figure.canvas.draw()
    major = [label.get_text() for label in axis.get_xticklabels() if label.get_text()]
    minor = [label.get_text() for label in axis.get_xticklabels(minor=True) if label.get_text()]
    plt.close(figure)
    assert major and set(major) <= {"0.01", "0.02", "0.05", "0.1", "0.2", "0.5"} and minor == []


def test_a_legend_names_every_colour_inside_the_frame():
    from preprocessing.overlay import FLAGGED_BGR, TRUTH_BGR, legend

    canvas = np.zeros((50, 120, 3), np.uint8)
    out = legend(canvas, [("ground truth", TRUTH_BGR), ("a long label that wraps", FLAGGED_BGR)])
    band = out[:-50]
    assert out.shape[1] == 120 and np.array_equal(out[-50:], canvas)
    for colour in (TRUTH_BGR, FLAGGED_BGR):  # each swatch is drawn
        assert np.all(band == np.array(colour, np.uint8), axis=-1).sum() > 20
    assert band.shape[0] > 30  # two rows: the second entry did not fit beside the first


# Ray 2.60's housekeeping lines as they reach the driver, and lines that must pass.
PREEMPTION = ("(TrainController pid=19822) [2026-12-07 13:11:26,994 E 19822 19859] core_worker.cc:2465: "
              "Actor with class name: 'PreemptionWatcher' and ID: 'bfd801dbe5454d3ceb337e7201000000' has "
              "constructor arguments in the object store and max_restarts > 0. If the arguments in the "
              "object store go out of scope or are lost, the actor restart will fail. See "
              "https://github.com/ray-project/ray/issues/53727 for more details.")
CLEANER = ("(PlacementGroupCleaner pid=19869) Detected that the Ray Train controller actor "
           "(39424f51ac0ef3735d64e8ad01000000) is dead. Cleaning up placement group = "
           "[PlacementGroupID(841b326a23f076b80b1892c379c001000000)] created by this run.")
BARS_OFF = ("(SplitCoordinator pid=30938) Progress bars disabled. To enable, set "
            "`ray.data.DataContext.get_current().enable_progress_bars = True`.")
KEPT = ["(RayTrainWorker pid=19934) epoch 1/2  loss 0.5367  val NME 22.792%",
        "(TrainController pid=19822) [2026-12-07 13:11:27,000 E 19822 19859] core_worker.cc:100: Actor with "
        "class name: 'RayTrainWorker' died unexpectedly",
        "(RayTrainWorker pid=19934) RuntimeError: the shard broke"]


def test_forwarded_housekeeping_lines_are_dropped_and_errors_kept(monkeypatch):
    """Through Ray's own dispatcher of forwarded worker output: the two notices are left out of
    a batch, every other line reaches the console's handler as Ray sent it."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from pipeline.runtime.ray_internals import drop_forwarded_lines

    printed = []
    monkeypatch.setattr(dispatcher, "handlers", [("ray_print_logs", lambda data: printed.append(data))])
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    console.quiet_forwarded_lines()
    drop_forwarded_lines(console.is_forwarded_notice)  # a second call wraps nothing twice
    dispatcher.emit({"pid": 1, "is_err": True, "lines": [PREEMPTION, KEPT[0], CLEANER, *KEPT[1:]]})
    dispatcher.emit({"pid": 2, "is_err": False, "lines": [CLEANER, BARS_OFF]})
    assert [data["lines"] for data in printed] == [KEPT]


def test_the_token_notice_is_dropped_and_other_authentication_warnings_kept(monkeypatch, caplog):
    name = "ray._private.authentication.authentication_token_setup"
    monkeypatch.setattr(logging.getLogger(name), "filters", [])
    console.quiet_libraries(verbose=False)
    logger = logging.getLogger(name)
    logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ...")
    logger.warning("Token authentication is disabled: anyone with network access to the cluster can run code")
    kept = [record.getMessage()[:37] for record in caplog.records]
    assert kept == ["Token authentication is disabled: any"]


def test_worker_progress_bars_are_off_unless_verbose(monkeypatch):
    names = ("RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_DATA_LOG_LEVEL", "RAY_AIR_NEW_OUTPUT", "RAY_COLOR_PREFIX",
             console.VERBOSE_ENV)
    for name in names:
        monkeypatch.delenv(name, raising=False)
    console.setup_console(verbose=True)
    assert "RAY_DATA_DISABLE_PROGRESS_BARS" not in console.worker_environment()
    console.setup_console(verbose=False)
    assert console.worker_environment()["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"


def test_a_secret_key_never_reaches_the_console(monkeypatch, capsys):
    """A message that quotes the S3 secret (as Ray's runtime-env conflict error quotes a job's
    environment) is printed with the secret's value replaced, in a log line and in a Ray failure."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")
    quoted = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value", "AWS_ACCESS_KEY_ID": "key-id"}
    line = logging.LogRecord("frnet.train", logging.ERROR, __file__, 1, "merge failed: %s", (quoted,), None)
    assert console.SecretFilter().filter(line)
    assert "s3cr3t-value" not in line.getMessage() and "***" in line.getMessage()
    assert "key-id" in line.getMessage()  # the key's id names the account; only the secret is hidden

    def failing(argv):
        raise ray.exceptions.RaySystemError("runtime env {'AWS_SECRET_ACCESS_KEY': 's3cr3t-value'}")

    assert console.run_main(failing, []) == 1
    assert "s3cr3t-value" not in capsys.readouterr().err


def test_a_failed_training_run_names_the_storage_error_and_the_command_that_resumes_it(monkeypatch):
    """Ray Train's ControllerError holds the storage's error in ``controller_failure``: the
    reason is that error's first line (the secret key taken out), and the closing lines give
    the checkpoint saved, the MLflow run's state and the resume command."""
    from ray.train import ControllerError

    from pipeline.train import interrupted
    from pipeline.training.run import TrainingFailed, failure_reason

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    storage = OSError("When uploading part for key 'ray/run/x.json' in bucket 'b': AWS Error "
                      "NETWORK_CONNECTION (key s3cr3t-value)\nsecond line")
    reason = failure_reason(ControllerError(storage))
    assert reason == "OSError: When uploading part for key 'ray/run/x.json' in bucket 'b': AWS Error " \
        "NETWORK_CONNECTION (key ***)"
    argv = ["--config", "train.yaml", "--storage", "s3://b/ray"]
    folder = "s3://b/ray/run"
    saved = interrupted(TrainingFailed("run", "abc", (f"{folder}/checkpoint_1", 3), reason, folder), argv,
                        Path("runs/x"))
    assert saved == ("failed: run 'run' stopped; saved: the checkpoint of epoch 3 in "
                     "s3://b/ray/run/checkpoint_1; MLflow run abc marked FAILED\nresume with: frnet train "
                     "--config train.yaml --storage s3://b/ray --run-dir runs/x --name run --resume")
    unknown = interrupted(TrainingFailed("run", "abc", OSError("no answer\nmore"), reason, folder), argv,
                          Path("runs/x"))
    assert unknown.startswith("failed: run 'run' stopped; saved: not known (looking it up failed: "
                              "no answer);")
