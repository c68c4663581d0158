r"""Cross-validation over every fold and scheme, reported like the paper's Table 1.

    python -m deepmil_jax.evaluate --schemes=alexnet,max_pooling,label_assign,sparse \
        --workdir=runs/cv [any python -m deepmil_jax.train flag]

For each scheme and fold this trains (or, when ``<workdir>/<scheme>/fold<f>/results.json`` exists,
reuses) one run of ``deepmil_jax.train``, then writes ``report.md``, ``report.csv`` and
``report.json`` (test accuracy, AUC, sensitivity and specificity, mean +- standard deviation over
the folds; over the pooled test predictions of all folds, the AUC's bootstrap 95% confidence
interval, the Brier score and DeLong's test against the first scheme), one ROC plot and one
reliability diagram per scheme, ``roc_<scheme>.png`` and ``reliability_<scheme>.png``, in the
workdir (``deepmil_jax.report``).

Next to AUC the report gives the localisation scores each run computed on its positive test
images with outlined lesions (``deepmil_jax.heatmap.localisation``, in ``results.json``): the
instance AUC (instance logits against "the cell holds lesion"), the intersection over union of the
thresholded heatmap with the lesion, and the pointing game (the fraction whose highest-scoring
instance's patch overlaps a mass box). The ``alexnet`` baseline has a single instance covering the
whole image, so it gets none.
"""

from __future__ import annotations

if __name__ == "__main__":  # flags and --help are answered before JAX and TensorFlow load
    from deepmil_jax import cli as _cli
    from deepmil_jax import config as _settings

    _cli.parse_flags_early(_settings.Config, _settings.Launch, _settings.CrossValidation)

import dataclasses
import json
from pathlib import Path

import numpy as np
from absl import logging

from deepmil_jax import report, train
from deepmil_jax.cli import initialize_distributed, run_main
from deepmil_jax.config import Config, CrossValidation, Launch, scheme_configs
from deepmil_jax.errors import ConfigError
from deepmil_jax.report import LOCALISATION, write_report
from deepmil_jax.workdir import finished_config


def cross_validate(config: Config, schemes: list[str], folds: list[int], workdir: Path) -> dict:
    """Runs (or reuses) every scheme x fold and returns the per-fold test results by run name.

    ``schemes``: ``--schemes`` entries (``config.scheme_variant``): a scheme, or one with its own
    k (``label_assign:k=3``, run in ``<workdir>/label_assign_k3``)."""
    results: dict[str, list[dict]] = {}
    for name, run_config in scheme_configs(config, schemes).items():
        results[name] = []
        for fold in folds:
            run_dir = workdir / name / f"fold{fold}"
            done = run_dir / "results.json"
            fold_config = dataclasses.replace(run_config, fold=fold).canonical()
            if finished_config(run_dir) == fold_config.to_json():
                logging.info("Reusing %s", done)
                result = json.loads(done.read_text())
            else:  # trains, resumes, or refuses a run with other settings (naming the flag)
                logging.info("Training %s on fold %d in %s", name, fold, run_dir)
                result = train.train_and_evaluate(fold_config, run_dir)
            results[name].append({"fold": fold, "run_dir": str(run_dir), **result})
    return results


def _fold_statistics(values: list) -> dict | None:
    """Mean and sample standard deviation over the folds that scored (NaN: a fold with nothing
    to score), or None if any run lacks the metric or no fold scored (a dataset without
    outlines has no localisation to report)."""
    if not values or any(v is None for v in values):
        return None
    per_fold = np.array(values, float)
    finite = per_fold[np.isfinite(per_fold)]
    if not finite.size:
        return None
    return {
        "mean": float(finite.mean()),
        "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
        "per_fold": per_fold.tolist(),
    }


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Mean and sample standard deviation over folds of each test metric, by scheme.

    The localisation scores that ``train`` writes into a multi-instance run's results
    (``heatmap.localisation``: instance AUC, heatmap IoU, pointing game) are summarised the same
    way, under their names, with the pointing game's hits and images over all folds; a scheme
    without instances (alexnet), or runs finished by an older version, get None.

    ``"pooled"`` holds the statistics over the test predictions of all folds together
    (``report.pooled_statistics``): the AUC with its bootstrap 95% confidence interval, the
    Brier score, and DeLong's test against the first scheme.
    """
    table = {}
    for scheme, runs in results.items():
        row = {"folds": len(runs)}
        for metric in ("accuracy", "auc", "sensitivity", "specificity"):
            values = np.array([r["test"][metric] for r in runs], float)
            row[metric] = {
                "mean": float(np.nanmean(values)),
                "std": float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0,
                "per_fold": values.tolist(),
            }
        for metric in LOCALISATION:
            row[metric] = _fold_statistics([r["test"].get(metric) for r in runs])
        if row["pointing_game"] is not None:
            row["pointing_game"]["hits"] = int(sum(r["test"]["pointing_hits"] for r in runs))
            row["pointing_game"]["evaluated"] = int(sum(r["test"]["pointing_images"] for r in runs))
        table[scheme] = row
    for scheme, pooled in report.pooled_statistics(results).items():
        table[scheme]["pooled"] = pooled
    return table


def main(config: Config, launch: Launch, chosen: CrossValidation) -> None:
    """The program: every scheme on every fold, then the report (exit 0 when preempted)."""
    initialize_distributed(launch)
    if not chosen.schemes:
        raise ConfigError("--schemes: give at least one scheme, e.g. --schemes=max_pooling.")
    folds = list(chosen.folds) or list(range(config.num_folds))
    if config.split == "official" and not chosen.folds:
        # Every fold tests on the same official test set: pooling several folds' predictions
        # would count each test image several times (a too narrow confidence interval).
        folds = [0]
        logging.info(
            "--split=official: one run per scheme (fold 0), tested on the official test set; "
            "pass --folds to run others (their pooled statistics repeat the test images)."
        )
    for run_config in scheme_configs(config, list(chosen.schemes)).values():
        run_config.canonical().validate()  # every flag checked before the first run trains
    for fold in folds:
        dataclasses.replace(config, fold=fold).validate()
    # Absolute: Orbax refuses relative checkpoint paths.
    workdir = Path(launch.workdir or "runs/cv").expanduser().absolute()
    try:
        results = cross_validate(config, list(chosen.schemes), folds, workdir)
    except train.Preempted:
        return
    old = sorted(
        {
            s
            for s, runs in results.items()
            for r in runs
            if r["config"]["scheme"] != "alexnet" and "instance_auc" not in r["test"]
        }
    )
    if old:
        logging.warning(
            "Runs of %s were finished by an older version, without localisation scores; delete "
            "their folders under %s to train them again with them.",
            ", ".join(old),
            workdir,
        )
    table = summarize(results)
    write_report(table, results, workdir)
    print((workdir / "report.md").read_text())


if __name__ == "__main__":
    run_main(main, Config, Launch, CrossValidation)
