"""What a sweep samples and how many of its trials run at once.

The searcher is Tune's random search (grid dimensions in order) or Optuna's TPE through Tune's
``OptunaSearch``; both are handed to Tune with the number of trials that may run at once. That
number follows from the cluster's resources: a trial is a Ray Train run whose workers Ray Train
asks for inside the trial, out of Tune's sight, so Tune alone would start every trial at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna
import ray.tune
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, Searcher
from ray.tune.search.optuna import OptunaSearch

from pipeline.sweeps.config import Dimension, SearchSpace, SweepConfig

# What a trial asks of Tune itself: it only waits on its Train run, whose workers hold the
# resources; Tune refuses an empty request, so a token share of a CPU.
TRIAL_DRIVER_CPU = 0.01
# 2.0 / 0.4 is 4.999... in floating point: five workers fit.
SLACK = 1e-9


def search_domain(dimension: Dimension) -> Any:
    """A space file's distribution as Tune's (OptunaSearch turns these into Optuna's own:
    loguniform -> FloatDistribution(log=True), randint -> IntDistribution, choice -> categorical)."""
    if dimension.distribution == "uniform":
        return ray.tune.uniform(dimension.low, dimension.high)
    if dimension.distribution == "loguniform":
        return ray.tune.loguniform(dimension.low, dimension.high)
    if dimension.distribution == "randint":
        return ray.tune.randint(int(dimension.low), int(dimension.high))
    if dimension.distribution == "choice":
        return ray.tune.choice(list(dimension.values))
    return ray.tune.grid_search(list(dimension.values))


def search_algorithm(space: SearchSpace, at_once: int) -> SearchAlgorithm | Searcher:
    """The space's searcher, seeded, suggesting a trial only while fewer than ``at_once`` run.
    Tune saves either with the sweep and restores it on ``--resume``: Optuna's study (every
    trial it was told of, its sampler's random state) continues where it stopped."""
    if space.searcher.name == "optuna":
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # constant_liar: trials still running count as bad guesses, so trials started together
        # are not all drawn at the same promising spot.
        sampler = optuna.samplers.TPESampler(seed=space.searcher.seed, constant_liar=True,
                                             n_startup_trials=space.searcher.startup_trials)
        return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=at_once)
    return BasicVariantGenerator(random_state=space.searcher.seed, max_concurrent=at_once)


@dataclass(frozen=True)
class Concurrency:
    """How many trials run at once, and the one-line reason printed with it."""

    trials: int
    reason: str


def worker_request(sweep: SweepConfig) -> dict[str, float]:
    """What one worker of a trial asks Ray for (as ``pipeline.training.trainer`` asks it)."""
    request = {**sweep.trial.resources_per_worker, "CPU": sweep.trial.cpus_per_worker}
    if sweep.trial.gpus_per_worker > 0:
        request["GPU"] = sweep.trial.gpus_per_worker
    return request


def plan_concurrency(sweep: SweepConfig, nodes: list[dict[str, float]], total_trials: int) -> Concurrency:
    """Trials at once: the workers each node holds (whole workers: a worker cannot span nodes;
    fractional GPUs pack several on one), in trials of ``trial.num_workers``; the cluster's CPUs
    less ``reserved_cpus`` for Ray Data; then at most ``max_concurrent_trials`` and the sweep's
    trials. ``nodes`` are the alive nodes' total resources."""
    request = worker_request(sweep)
    workers = sum(_workers_on(node, request) for node in nodes)
    cpus = sum(node.get("CPU", 0.0) for node in nodes)
    trial_cpus = sweep.trial.num_workers * sweep.trial.cpus_per_worker + TRIAL_DRIVER_CPU
    by_nodes = workers // sweep.trial.num_workers
    by_cpus = max(0, math.floor((cpus - sweep.reserved_cpus) / trial_cpus + SLACK))
    fit = min(by_nodes, by_cpus)
    asks = f"{sweep.trial.num_workers} worker(s) x {_describe(request)}"
    cluster = f"{_describe({key: sum(node.get(key, 0.0) for node in nodes) for key in request})} " \
              f"on {len(nodes)} node(s), {sweep.reserved_cpus:g} CPU kept for Ray Data"
    if fit == 0:
        trials = sweep.max_concurrent_trials or 1
        return Concurrency(trials, f"{_count(trials)} at once: a trial asks {asks}; the cluster ({cluster}) "
                           "holds none now, so its trials wait for nodes (an autoscaling cluster adds "
                           "them) and max_concurrent_trials (or 1) sets how many run at once")
    binding = "its CPUs" if by_cpus < by_nodes else "whole workers per node"
    reason = f"a trial asks {asks}; the cluster ({cluster}) holds {fit} (bound: {binding})"
    trials = fit
    if sweep.max_concurrent_trials is not None and sweep.max_concurrent_trials < trials:
        trials = sweep.max_concurrent_trials
        reason += f", capped at {trials} by max_concurrent_trials"
    if total_trials < trials:
        trials = total_trials
        reason += f"; the sweep has {total_trials} trial(s)"
    return Concurrency(trials, f"{_count(trials)} at once: {reason}")


def cluster_nodes() -> list[dict[str, float]]:
    """The alive nodes' total resources."""
    return [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]


def _workers_on(node: dict[str, float], request: dict[str, float]) -> int:
    fits = [math.floor(node.get(key, 0.0) / amount + SLACK) for key, amount in request.items() if amount > 0]
    return min(fits) if fits else 0


def _describe(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{key} {value:g}" for key, value in resources.items()) + "}"


def _count(trials: int) -> str:
    return f"{trials} trial{'s' if trials != 1 else ''}"

