"""The evaluation gate: a trained model is scored on the AFLW2000-3D evaluation shards, logged to
the active MLflow run with its figures, registered, and made ``champion`` only if it beats the
current champion."""

from __future__ import annotations

import logging
from typing import Any

from models.checkpoint import ModelBundle
from pipeline.scoring import score_shards
from pipeline.tracking import RANKING_TAG, log_dict, log_metrics, register
from preprocessing.manifest import Manifest

LOG = logging.getLogger("frnet.registration")


def evaluate_and_register(bundle: ModelBundle, shards: str, manifest: Manifest, registered_model: str,
                          model_uri: str, run_id: str) -> dict[str, Any]:
    """Score ``bundle`` on the evaluation shards of ``shards``, then :func:`register_scored`."""
    report = score_shards(bundle.predictor(), shards, manifest)
    LOG.info("AFLW2000-3D NME %.3f%% (mean of yaw bins; %s)", 100 * report["nme_mean_of_bins"],
             "synthetic faces" if manifest.morphable_model.synthetic else "real")
    return register_scored(report, registered_model, model_uri, run_id)


def register_scored(report: dict[str, Any] | None, registered_model: str, model_uri: str,
                    run_id: str) -> dict[str, Any]:
    """Log an AFLW2000-3D ``report`` to the active run and register ``model_uri`` as a version of
    ``registered_model`` with its figures as tags (``champion`` if it beats the current one);
    without a report the version is registered unscored and never made champion."""
    summary: dict[str, float] = {}
    if report is not None:
        log_dict(report, "evaluation/aflw2000.json")
        summary = {RANKING_TAG: report["nme_mean_of_bins"],
                   "aflw2000.nme_std_of_bins": report["nme_std_of_bins"],
                   "aflw2000.nme_per_sample_mean": report["nme_per_sample_mean"]}
        log_metrics(summary)
    version, promoted = register(registered_model, model_uri, run_id, summary)
    figures = {"registered_model": registered_model, "model_version": version, "champion": promoted}
    return figures if report is None else {"aflw2000": report, **figures}
