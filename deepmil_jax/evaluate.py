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

Next to AUC the report gives a localisation score, the pointing game: of the positive test images
with annotated masses, the fraction whose highest-scoring instance (its patch of the preprocessed
image, ``deepmil_jax.heatmap.cell_box``) overlaps a mass box. The mass boxes come from the dataset
(``Examples.mass_boxes``), the top instance from each run's ``test_predictions.csv``. The
``alexnet`` baseline has a single instance covering the whole image, so it gets none.
"""

from __future__ import annotations

if __name__ == "__main__":  # flags and --help are answered before JAX and TensorFlow load
    from deepmil_jax import config as _settings

    _settings.parse_flags_early(_settings.Config, _settings.Launch, _settings.CrossValidation)

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
from absl import logging

from deepmil_jax import heatmap, report, train
from deepmil_jax.config import (
    SCHEMES,
    Config,
    CrossValidation,
    Launch,
    from_flags,
    initialize_distributed,
    run_main,
)
from deepmil_jax.errors import ConfigError
from deepmil_jax.report import (  # noqa: F401 (evaluate.NAMES etc. kept for callers)
    NAMES,
    PAPER_AUC,
    plot_reliability,
    plot_roc,
    write_report,
)
from deepmil_jax.workdir import finished_config


def cross_validate(config: Config, schemes: list[str], folds: list[int], workdir: Path) -> dict:
    """Runs (or reuses) every scheme x fold and returns the per-fold test results by scheme."""
    results: dict[str, list[dict]] = {}
    for scheme in schemes:
        results[scheme] = []
        for fold in folds:
            run_dir = workdir / scheme / f"fold{fold}"
            done = run_dir / "results.json"
            run_config = dataclasses.replace(config, scheme=scheme, fold=fold).canonical()
            if finished_config(run_dir) == run_config.to_json():
                logging.info("Reusing %s", done)
                result = json.loads(done.read_text())
            else:  # trains, resumes, or refuses a run with other settings (naming the flag)
                logging.info("Training %s on fold %d in %s", scheme, fold, run_dir)
                result = train.train_and_evaluate(run_config, run_dir)
            results[scheme].append({"fold": fold, "run_dir": str(run_dir), **result})
    return results


def localization(
    run_dir: str | Path,
    mass_boxes: dict[str, np.ndarray],
    *,
    grid_shape: tuple[int, int],
    image_size: int,
) -> dict[str, float | int]:
    """Pointing game of one run: ``heatmap.pointing_game`` over its ``test_predictions.csv``.

    Args:
      run_dir: a training workdir with ``test_predictions.csv`` (file_id, label, top_patch_row,
        top_patch_col, ...).
      mass_boxes: {file_id: (b, 4)} mass boxes in preprocessed pixels (``Examples.mass_boxes``).
      grid_shape: (h', w') of the run's instance maps; image_size: its preprocessed side.

    Returns:
      ``{"hits", "evaluated", "score"}``.
    """
    with (Path(run_dir) / "test_predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    top = {r["file_id"]: (int(r["top_patch_row"]), int(r["top_patch_col"])) for r in rows}
    labels = {r["file_id"]: int(r["label"]) for r in rows}
    return heatmap.pointing_game(
        top, mass_boxes, labels, grid_shape=grid_shape, image_shape=(image_size, image_size)
    )


def add_localization(config: Config, results: dict[str, list[dict]]) -> None:
    """Adds ``"localization"`` (``localization``'s dict, or None for the alexnet scheme, which has
    one instance) to every run of ``results``, loading the dataset's mass boxes once."""
    examples = None
    grids: dict[tuple, tuple[int, int]] = {}
    for scheme, runs in results.items():
        for run in runs:
            if scheme == "alexnet":
                run["localization"] = None
                continue
            run_config = dataclasses.replace(config, scheme=scheme, fold=run["fold"])
            if examples is None:
                examples = train.load_examples(config)
                boxes = dict(zip(examples.file_ids.tolist(), examples.mass_boxes, strict=True))
            key = (scheme, run_config.backbone, run_config.image_size, run_config.head_hidden)
            if key not in grids:
                grids[key] = train.grid_shape(run_config)
            run["localization"] = localization(
                run["run_dir"], boxes, grid_shape=grids[key], image_size=run_config.image_size
            )


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Mean and sample standard deviation over folds of each test metric, by scheme.

    Runs carrying ``"localization"`` (``add_localization``) also give ``"localization"``: the
    pointing-game score's mean, standard deviation and per-fold values, and the hits and images
    scored over all folds (None for a scheme without instances).

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
        if any("localization" in r for r in runs):
            scored = [r["localization"] for r in runs if r.get("localization")]
            if scored:
                values = np.array([s["score"] for s in scored], float)
                finite = values[np.isfinite(values)]
                row["localization"] = {
                    "mean": float(finite.mean()) if finite.size else float("nan"),
                    "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
                    "per_fold": values.tolist(),
                    "hits": int(sum(s["hits"] for s in scored)),
                    "evaluated": int(sum(s["evaluated"] for s in scored)),
                }
            else:
                row["localization"] = None
        table[scheme] = row
    for scheme, pooled in report.pooled_statistics(results).items():
        table[scheme]["pooled"] = pooled
    return table


def _main() -> None:
    launch = from_flags(Launch)
    initialize_distributed(launch)
    config, chosen = from_flags(Config), from_flags(CrossValidation)
    unknown = [s for s in chosen.schemes if s not in SCHEMES]
    if unknown:
        raise ConfigError(f"--schemes: unknown {unknown}; choose from {', '.join(SCHEMES)}.")
    folds = list(chosen.folds) or list(range(config.num_folds))
    for scheme in chosen.schemes:  # every flag checked before the first run trains
        dataclasses.replace(config, scheme=scheme).canonical().validate()
    for fold in folds:
        dataclasses.replace(config, fold=fold).validate()
    # Absolute: Orbax refuses relative checkpoint paths.
    workdir = Path(launch.workdir or "runs/cv").expanduser().absolute()
    results = cross_validate(config, list(chosen.schemes), folds, workdir)
    add_localization(config, results)
    table = summarize(results)
    write_report(table, results, workdir)
    print((workdir / "report.md").read_text())


if __name__ == "__main__":
    run_main(_main)
