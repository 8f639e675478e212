"""The evaluation gate: a trained model is scored on the AFLW2000-3D evaluation shards, logged to
the active MLflow run with its figures, registered, and made ``champion`` only if it was measured
on the champion's evaluation set (same faces, same annotations, same scoring protocol) and beats
it there (docs/evaluation.md, "The champion")."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import mlflow

from models.checkpoint import ModelBundle
from pipeline.evaluation.scoring import EvaluationSet, score_shards_on_set
from pipeline.runtime.tracking import CHAMPION, RANKING_TAG, log_dict, log_metrics, register_version
from preprocessing.manifest import Manifest

LOG = logging.getLogger("frnet.registration")
COMPARE_ADVICE = "evaluate both on one set to compare"


@dataclass(frozen=True)
class Scored:
    """A version's ranking figure (``RANKING_TAG``, a fraction) and the set it was measured on."""

    version: str
    nme: float | None
    evaluation_set: EvaluationSet | None

    @classmethod
    def from_tags(cls, version: str, tags: dict[str, str]) -> Scored:
        nme = tags.get(RANKING_TAG)
        return cls(version, None if nme is None else float(nme), EvaluationSet.from_tags(tags))


@dataclass(frozen=True)
class Registration:
    """A registered version: its number, whether it is now ``champion`` and the line saying why,
    and, for a scored version, its AFLW2000-3D report and the set it was measured on."""

    registered_model: str
    model_version: str
    champion: bool
    champion_reason: str
    aflw2000: dict[str, Any] | None = None
    evaluation_set: EvaluationSet | None = None

    def to_json(self) -> dict[str, Any]:
        figures: dict[str, Any] = {"registered_model": self.registered_model,
                                   "model_version": self.model_version, "champion": self.champion,
                                   "champion_reason": self.champion_reason}
        if self.aflw2000 is not None and self.evaluation_set is not None:
            figures.update(aflw2000=self.aflw2000, evaluation_set=self.evaluation_set.to_dict())
        return figures


def yaw_cells(report: dict[str, Any]) -> str:
    """An AFLW2000-3D report's NME by |yaw| bin (percent, count in brackets) and their mean, one line."""
    cells = [f"{b['range']}: " + ("-" if b["mean"] is None else f"{100 * b['mean']:.2f}") + f" ({b['count']})"
             for b in report["bins"]]
    return f"{'  '.join(cells)}  mean {100 * report['nme_mean_of_bins']:.2f}"


def registration_scope(registration: Registration) -> str:
    """Which faces a registration's figures come from, in a few words."""
    scored = registration.evaluation_set
    if scored is None:
        return "unscored"
    where = scored.crops
    source = f"the evaluation shards' stored crops ({where.split(':', 1)[1]})" if where.startswith("shards") \
        else "crops cut from the images"
    return f"{images(scored.images)}, {source}, set {scored.short}"


def images(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


def champion_decision(candidate: Scored, champion: Scored | None, registered_model: str) -> tuple[bool, str]:
    """Whether ``candidate`` takes ``champion``'s place, and the one line that says why."""
    ours = candidate.evaluation_set
    head = f"registered version {candidate.version}"
    if candidate.nme is None or ours is None:
        kept = "no champion yet" if champion is None else f"the champion stays version {champion.version}"
        return False, f"{head} unscored ({kept}): only a version scored on AFLW2000-3D becomes champion"
    measured = f"NME {100 * candidate.nme:.2f}% on {images(ours.images)} (set {ours.short})"
    if champion is None:
        return True, f"{head} as the champion (the first scored version): {measured}"
    theirs = champion.evaluation_set
    if theirs is None or champion.nme is None:
        return False, (
            f"{head} without promoting: the champion (version {champion.version}) carries no evaluation-set "
            f"tags (registered before they were recorded), so its NME cannot be compared with this one's "
            f"({measured}); {COMPARE_ADVICE}, then move the alias by hand if this one is better: "
            f"MlflowClient().set_registered_model_alias({registered_model!r}, {CHAMPION!r}, "
            f"{candidate.version!r})")
    if (ours.digest, ours.images) != (theirs.digest, theirs.images):
        return False, (f"{head} without promoting: evaluated on {images(ours.images)} (set {ours.short}) but "
                       f"the champion (version {champion.version}) on {theirs.images} (set {theirs.short}); "
                       f"{COMPARE_ADVICE}")
    if ours.protocol != theirs.protocol:
        return False, (f"{head} without promoting: scored by {ours.protocol!r} but the champion (version "
                       f"{champion.version}) by {theirs.protocol!r} on the same set {ours.short}; "
                       f"{COMPARE_ADVICE}")
    same = f"on the same set ({images(ours.images)}, set {ours.short})"
    if candidate.nme < champion.nme:
        return True, (f"{head} as the champion: NME {100 * candidate.nme:.2f}% beats version "
                      f"{champion.version}'s {100 * champion.nme:.2f}% {same}")
    return False, (f"{head} without promoting: NME {100 * candidate.nme:.2f}% does not beat the champion "
                   f"(version {champion.version}) at {100 * champion.nme:.2f}% {same}")


def evaluate_and_register(bundle: ModelBundle, shards: str, manifest: Manifest, registered_model: str,
                          model_uri: str, run_id: str) -> Registration:
    """Score ``bundle`` on the evaluation shards of ``shards``, then :func:`register_scored`."""
    report, evaluation_set = score_shards_on_set(bundle.predictor(), shards, manifest)
    LOG.info("AFLW2000-3D NME %.3f%% (mean of yaw bins; %s)", 100 * report["nme_mean_of_bins"],
             "synthetic faces" if manifest.morphable_model.synthetic else "real")
    registration = register_scored(report, evaluation_set, registered_model, model_uri, run_id)
    LOG.info("%s", registration.champion_reason)
    return registration


def register_scored(report: dict[str, Any] | None, evaluation_set: EvaluationSet | None,
                    registered_model: str, model_uri: str, run_id: str) -> Registration:
    """Log an AFLW2000-3D ``report`` measured on ``evaluation_set`` to the active run and register
    ``model_uri`` as a version of ``registered_model`` with its figures and set as tags; it
    becomes ``champion`` by :func:`champion_decision`, whose line is ``champion_reason``. Without
    a report the version is registered unscored and never made champion."""
    assert (report is None) == (evaluation_set is None), "a report comes with the set it was measured on"
    tags: dict[str, str] = {"run_id": run_id}
    nme = None
    if report is not None and evaluation_set is not None:
        log_dict(report, "evaluation/aflw2000.json")
        summary = {RANKING_TAG: report["nme_mean_of_bins"],
                   "aflw2000.nme_std_of_bins": report["nme_std_of_bins"],
                   "aflw2000.nme_per_sample_mean": report["nme_per_sample_mean"]}
        log_metrics(summary)
        # Full precision: the ranking tag is compared exactly.
        tags.update({key: repr(float(value)) for key, value in summary.items()}, **evaluation_set.tags())
        nme = report["nme_mean_of_bins"]
    client = mlflow.MlflowClient()
    version = register_version(model_uri, registered_model)
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, version, key, value)
    promoted, reason = champion_decision(Scored(version, nme, evaluation_set),
                                         current_champion(client, registered_model), registered_model)
    if promoted:
        client.set_registered_model_alias(registered_model, CHAMPION, version)
    return Registration(registered_model, version, promoted, reason, report, evaluation_set)


def current_champion(client: mlflow.MlflowClient, registered_model: str) -> Scored | None:
    """The version ``champion`` points at, with its figure and set, or None when there is none."""
    try:
        version = client.get_model_version_by_alias(registered_model, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None
    return Scored.from_tags(str(version.version), dict(version.tags))
