"""What `--resume` compares: the config against its checkpoint's, key for key, or, before the
first checkpoint, against the params the MLflow run logged (which MLflow will not let change)."""

from dataclasses import asdict

from pipeline.runtime.tracking import flatten
from pipeline.training.config import OptimConfig, TrainConfig
from pipeline.training.resume import differences, param_changes


def test_differences_name_each_changed_dotted_key():
    old = {"epochs": 5, "optim": {"lr": 0.02, "name": "adamw"}, "gone": 1}
    new = {"epochs": 5, "optim": {"lr": 0.04, "name": "adamw"}, "added": 2}
    assert differences(old, new) == ["added: (absent) -> 2", "gone: 1 -> (absent)", "optim.lr: 0.02 -> 0.04"]
    assert differences(old, old) == []


def test_param_changes_compare_the_params_logged_so_far():
    logged = flatten(asdict(TrainConfig()))
    changed = flatten(asdict(TrainConfig(optim=OptimConfig(lr=0.04))))
    assert param_changes(logged, changed) == [f"optim.lr: {TrainConfig().optim.lr} -> 0.04"]
    # A run killed while logging its params holds some of them: only those are compared.
    partial = {key: value for key, value in logged.items() if not key.startswith("optim.")}
    assert param_changes(partial, changed) == []
    assert param_changes(logged, logged) == []
