r"""Cross-validation over every fold and scheme, reported like the paper's Table 1.

    python -m deepmil_jax.evaluate --schemes=alexnet,max_pooling,label_assign,sparse \
        --workdir=runs/cv [any python -m deepmil_jax.train flag]

For each scheme and fold this trains (or, when ``<workdir>/<scheme>/fold<f>/results.json`` exists,
reuses) one run of ``deepmil_jax.train``, then writes ``report.md``, ``report.csv`` and
``report.json`` (test accuracy and AUC, mean +- standard deviation over the folds) and one ROC
plot per scheme, ``roc_<scheme>.png``, in the workdir.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
from absl import flags, logging

from deepmil_jax import train
from deepmil_jax.errors import ConfigError

# The paper's Table 1 (INbreast, 5-fold cross-validation), for comparison in the report.
PAPER_AUC = {"alexnet": 0.79, "max_pooling": 0.83, "label_assign": 0.84, "sparse": 0.89}
NAMES = {
    "alexnet": "Pretrained AlexNet",
    "max_pooling": "Pretrained deep MIL (max pooling)",
    "label_assign": "Pretrained deep MIL, label assignment",
    "sparse": "Pretrained deep MIL, sparse",
}

flags.DEFINE_list("schemes", list(train.SCHEMES), "Schemes to cross-validate (--scheme is "
                  "ignored here).")
flags.DEFINE_list("folds", [], "Folds to run; default all of 0..num_folds-1.")
FLAGS = flags.FLAGS


def cross_validate(config: train.Config, schemes: list[str], folds: list[int],
                   workdir: Path) -> dict:
    """Runs (or reuses) every scheme x fold and returns the per-fold test results by scheme."""
    results: dict[str, list[dict]] = {}
    for scheme in schemes:
        results[scheme] = []
        for fold in folds:
            run_dir = workdir / scheme / f"fold{fold}"
            done = run_dir / "results.json"
            if done.exists():
                logging.info("Reusing %s", done)
                result = json.loads(done.read_text())
            else:
                logging.info("Training %s on fold %d in %s", scheme, fold, run_dir)
                result = train.train_and_evaluate(
                    dataclasses.replace(config, scheme=scheme, fold=fold), run_dir
                )
            results[scheme].append({"fold": fold, "run_dir": str(run_dir), **result})
    return results


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Mean and sample standard deviation over folds of each test metric, by scheme."""
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
        table[scheme] = row
    return table


def write_report(table: dict[str, dict], results: dict[str, list[dict]], workdir: Path) -> None:
    """report.md / report.csv / report.json and roc_<scheme>.png in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "report.json").write_text(json.dumps(table, indent=2) + "\n")
    with (workdir / "report.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["scheme", "folds", "accuracy_mean", "accuracy_std", "auc_mean", "auc_std"])
        for scheme, row in table.items():
            out.writerow([scheme, row["folds"], row["accuracy"]["mean"], row["accuracy"]["std"],
                          row["auc"]["mean"], row["auc"]["std"]])
    lines = [
        "| Method | Accuracy | AUC | Paper AUC (INbreast) |",
        "|---|---|---|---|",
    ]
    for scheme, row in table.items():
        cell = lambda m: f"{row[m]['mean']:.2f} ± {row[m]['std']:.2f}"  # noqa: E731
        paper = f"{PAPER_AUC[scheme]:.2f}" if scheme in PAPER_AUC else "-"
        lines.append(f"| {NAMES.get(scheme, scheme)} | {cell('accuracy')} | {cell('auc')} | "
                     f"{paper} |")
    folds = max(row["folds"] for row in table.values())
    lines += ["", f"Test-fold mean ± standard deviation over {folds} folds; accuracy at the "
              "threshold chosen on each fold's validation set. Paper: INbreast, Zhu et al. 2017, "
              "Table 1."]
    (workdir / "report.md").write_text("\n".join(lines) + "\n")
    for scheme, runs in results.items():
        plot_roc(scheme, runs, workdir / f"roc_{scheme}.png")


def plot_roc(scheme: str, runs: list[dict], path: Path) -> None:
    """One ROC curve per test fold, from each run's test_predictions.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    for run in runs:
        with (Path(run["run_dir"]) / "test_predictions.csv").open() as f:
            rows = list(csv.DictReader(f))
        labels = np.array([int(r["label"]) for r in rows])
        probs = np.array([float(r["probability"]) for r in rows])
        if labels.min() == labels.max():
            continue
        fpr, tpr, _ = roc_curve(labels, probs)
        ax.plot(fpr, tpr, lw=1.2, label=f"fold {run['fold']} (AUC {run['test']['auc']:.2f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=NAMES.get(scheme, scheme),
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _main() -> None:
    config = train.config_from_flags()
    unknown = [s for s in FLAGS.schemes if s not in train.SCHEMES]
    if unknown:
        raise ConfigError(f"--schemes: unknown {unknown}; choose from {', '.join(train.SCHEMES)}.")
    try:
        folds = [int(f) for f in FLAGS.folds] or list(range(config.num_folds))
    except ValueError as e:
        raise ConfigError(f"--folds: {FLAGS.folds} is not a list of integers.") from e
    workdir = Path(FLAGS.workdir or "runs/cv")
    results = cross_validate(config, FLAGS.schemes, folds, workdir)
    table = summarize(results)
    write_report(table, results, workdir)
    print((workdir / "report.md").read_text())


if __name__ == "__main__":
    train.run_main(_main)
