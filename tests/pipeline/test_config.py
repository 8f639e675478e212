from dataclasses import dataclass, field

import pytest
import yaml

from pipeline.runtime.config import ConfigError, from_dict, load_config, to_plain
from preprocessing.synth import SynthConfig
from tests.conftest import REPO_ROOT


@dataclass(frozen=True)
class Inner:
    rate: float = 0.1
    name: str = "x"


@dataclass(frozen=True)
class Outer:
    steps: int
    inner: Inner = field(default_factory=Inner)
    pair: tuple[float, float] = (0.0, 1.0)
    tag: str | None = None


def test_nested_values_and_defaults():
    config = from_dict(Outer, {"steps": 3, "inner": {"rate": 2}, "pair": [1, 2.5]})
    assert config == Outer(steps=3, inner=Inner(rate=2.0), pair=(1.0, 2.5))
    assert isinstance(config.inner.rate, float)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"steps": 1, "inner": {"rte": 1.0}}, "unknown key 'inner.rte'"),
        ({"steps": "3"}, "'steps' must be int, got '3'"),
        ({"steps": True}, "'steps' must be int, got True"),
        ({"steps": 1, "pair": [1.0]}, "'pair' must hold 2 values, got 1"),
        ({"steps": 1, "inner": {"rate": "fast"}}, "'inner.rate' must be a number"),
        ({}, "required key 'steps' is missing"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=f"^cfg.yaml: {message}"):
        from_dict(Outer, data, source="cfg.yaml")


def test_yaml_file_with_overrides_and_validation(tmp_path):
    path = tmp_path / "synth.yaml"
    path.write_text("layout: aflw2000-3d\nn: 5\n")
    assert load_config(path, SynthConfig, {"seed": 7}) == SynthConfig("aflw2000-3d", 5, seed=7)
    path.write_text("layout: aflw2000-3d\nn: -1\n")
    with pytest.raises(ConfigError, match="synth.yaml: 'n' must be >= 1, got -1"):
        load_config(path, SynthConfig)
    path.write_text("layout: [unclosed\n")
    with pytest.raises(ConfigError, match="synth.yaml: not valid YAML"):
        load_config(path, SynthConfig)


def test_shipped_synth_config_loads():
    config = load_config(REPO_ROOT / "configs" / "synth.yaml", SynthConfig)
    assert config.layout == "300w-lp" and config.flip


def test_resources_per_worker_reach_the_trial(tmp_path):
    """Custom node resources per worker: checked where they are set, carried into each trial."""
    from pipeline.sweeps.config import SweepConfig
    from pipeline.sweeps.run import SweepContext, trial_config
    from pipeline.training.config import TrainConfig

    path = tmp_path / "train.yaml"
    for value, message in (
            ({"GPU": 1}, "scaling: resources_per_worker: set GPU with gpus_per_worker"),
            ({"trial_slot": -1}, r"'scaling.resources_per_worker.trial_slot' must be a finite number >= 0, "
                                 r"got -1.0")):
        path.write_text(yaml.safe_dump({"scaling": {"resources_per_worker": value}}))
        with pytest.raises(ConfigError, match=f"train.yaml: {message}"):
            load_config(path, TrainConfig)
    sweep = from_dict(SweepConfig, {"trial": {"num_workers": 1, "resources_per_worker": {"trial_slot": 1}}})
    context = SweepContext(name="s", run_dir=str(tmp_path), storage=str(tmp_path / "ray"),
                           base=to_plain(TrainConfig()), sweep=to_plain(sweep), tracking_uri="",
                           experiment_id="0", parent_run_id="")
    config = trial_config(context, {"loss.lambda2": 0.1}, "t1")
    assert config.scaling.resources_per_worker == {"trial_slot": 1.0}
    assert config.scaling.num_workers == 1 and config.loss.lambda2 == 0.1


def test_the_learning_rate_follows_the_global_batch():
    from pipeline.training.config import DataConfig, OptimConfig, ScalingConfig, TrainConfig

    def config(workers: int, batch: int, scaling: str) -> TrainConfig:
        return TrainConfig(optim=OptimConfig(lr=0.02, reference_batch=256, lr_scaling=scaling),
                           data=DataConfig(batch_size=batch), scaling=ScalingConfig(num_workers=workers))

    assert config(2, 128, "linear").lr == 0.02  # the batch it was tuned for
    assert config(4, 128, "linear").lr == pytest.approx(0.04) and config(4, 128, "linear").global_batch == 512
    assert config(2, 8, "linear").lr == pytest.approx(0.02 * 16 / 256)
    assert config(4, 128, "none").lr == 0.02
    shipped = load_config(REPO_ROOT / "configs" / "train.yaml", TrainConfig)
    assert shipped.optim.lr_scaling == "linear" and shipped.lr == shipped.optim.lr  # 2 x 128 = 256
    with pytest.raises(ConfigError, match="lr_scaling' must be one of"):
        from_dict(TrainConfig, {"optim": {"lr_scaling": "sqrt"}})


def test_the_read_ahead_bound_reaches_ray_train():
    """``data.read_ahead_mib`` becomes the object-store limit of Ray Train's ingest; null leaves
    Ray's own; below 1 is refused."""
    import ray.data

    from pipeline.training.config import DataConfig, TrainConfig
    from pipeline.training.trainer import ingest_options

    assert ingest_options(DataConfig(read_ahead_mib=512)).resource_limits.object_store_memory == 512 * 2**20
    ray_default = ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory
    assert ingest_options(DataConfig(read_ahead_mib=None)).resource_limits.object_store_memory == ray_default
    shipped = load_config(REPO_ROOT / "configs" / "train.yaml", TrainConfig)
    assert shipped.data.read_ahead_mib == 2048
    with pytest.raises(ConfigError, match="^config: 'data.read_ahead_mib' must be >= 1 or null, got 0$"):
        from_dict(TrainConfig, {"data": {"read_ahead_mib": 0}})
