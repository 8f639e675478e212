"""The quiet console: Ray's own INFO lines dropped where they reach the console, its warnings
and errors kept, the project's lines kept; a Ray failure ends with one line of advice; the
sweep's log axes and the pictures' legends read."""

import logging
import os

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
