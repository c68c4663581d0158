"""The cross-validation report of ``deepmil_jax.evaluate``: statistics over the pooled test
predictions of all folds (bootstrap confidence interval of the AUC, Brier score, DeLong's test
against the first scheme), and the files: report.md, report.csv, report.json, roc_<scheme>.png and
reliability_<scheme>.png. Pure numpy/scipy/matplotlib; no JAX."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from deepmil_jax import heatmap, metrics, registry

BOOTSTRAP_RESAMPLES = 2000


def title(name: str) -> str:
    """A run name's title in reports: a scheme's registry title, with its own k for an entry
    ``scheme:k=K`` of evaluate's ``--schemes`` (run name ``<scheme>_k<K>``,
    ``config.scheme_variant``)."""
    for scheme in registry.k_schemes():
        k = _own_k(name, scheme)
        if k is not None:
            return f"{registry.SCHEMES[scheme].title}, k={k}"
    entry = registry.SCHEMES.get(name)
    return entry.title if entry else name


def _own_k(name: str, scheme: str) -> str | None:
    """The k, as text, of the run name ``<scheme>_k<k>``; None for another name."""
    prefix = f"{scheme}_k"
    return name[len(prefix) :] if name.startswith(prefix) else None


RELIABILITY_BINS = 10


def read_predictions(run_dir: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(file_ids, labels (N,), probabilities (N,))`` of a run's ``test_predictions.csv``."""
    with (Path(run_dir) / "test_predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    return (
        [r["file_id"] for r in rows],
        np.array([int(r["label"]) for r in rows], int),
        np.array([float(r["probability"]) for r in rows], float),
    )


def pooled_predictions(runs: list[dict]) -> dict[tuple, tuple[int, float]] | None:
    """``{(fold, file_id): (label, probability)}`` over every fold's test predictions, sorted
    by key, or None when a run has no ``test_predictions.csv``."""
    pooled = {}
    for run in runs:
        if not (Path(run["run_dir"]) / "test_predictions.csv").exists():
            return None
        ids, labels, probs = read_predictions(run["run_dir"])
        for file_id, label, prob in zip(ids, labels, probs, strict=True):
            pooled[(run.get("fold"), file_id)] = (int(label), float(prob))
    # sorted, so that the bootstrap's resamples do not depend on the order of the CSV rows
    return dict(sorted(pooled.items(), key=lambda item: (str(item[0][0]), item[0][1])))


def pooled_statistics(results: dict[str, list[dict]]) -> dict[str, dict | None]:
    """Per scheme, over the pooled test predictions of all folds: ``{"images", "auc",
    "auc_ci": [low, high], "brier", "delong"}``; None for a scheme without predictions.

    ``auc_ci`` is ``metrics.bootstrap_auc_ci`` (95%, 2000 stratified resamples, seed 0).
    ``delong`` (None for the first scheme) is ``metrics.paired_auc_test`` against the first
    scheme on the images both scored with the same label, matched by (fold, file_id):
    ``{"reference", "images", "auc", "reference_auc", "p_value"}``.
    """
    pooled = {scheme: pooled_predictions(runs) for scheme, runs in results.items()}
    reference = next(iter(results), None)
    out: dict[str, dict | None] = {}
    for scheme, preds in pooled.items():
        if preds is None:
            out[scheme] = None
            continue
        labels = np.array([y for y, _ in preds.values()], int)
        probs = np.array([p for _, p in preds.values()], float)
        auc = metrics.binary_metrics(labels, probs, 0.5)["auc"] if labels.size else math.nan
        ci = metrics.bootstrap_auc_ci(labels, probs, n=BOOTSTRAP_RESAMPLES, seed=0)
        out[scheme] = {
            "images": int(labels.size),
            "auc": auc,
            "auc_ci": list(ci),
            "brier": metrics.brier_score(labels, probs),
            "delong": None,
        }
        ref = pooled.get(reference)
        if scheme != reference and ref is not None:
            out[scheme]["delong"] = _delong_against(preds, ref, reference)
    return out


def _delong_against(preds: dict, ref: dict, reference: str) -> dict:
    """DeLong's test of ``preds`` against ``ref`` on their common (fold, file_id) images."""
    keys = [k for k in preds if k in ref and ref[k][0] == preds[k][0]]
    labels = np.array([preds[k][0] for k in keys], int)
    auc, ref_auc, p = metrics.paired_auc_test(
        labels, np.array([preds[k][1] for k in keys]), np.array([ref[k][1] for k in keys])
    )
    return {
        "reference": reference,
        "images": len(keys),
        "auc": auc,
        "reference_auc": ref_auc,
        "p_value": p,
    }


# the localisation scores of heatmap.localisation that the report shows, with their column names
LOCALISATION = {"instance_auc": "Instance AUC", "iou": "IoU", "pointing_game": "Pointing game"}


# the figures write_report draws (and removes before drawing a new report's)
PLOTS = ("roc_*.png", "reliability_*.png", "k_sweep.png")


def write_report(table: dict[str, dict], results: dict[str, list[dict]], workdir: Path) -> None:
    """report.md / report.csv / report.json, roc_<scheme>.png and reliability_<scheme>.png in
    ``workdir``, and k_sweep.png when label_assign ran with two or more fixed k of its own.
    The plots of an earlier report in ``workdir`` are removed first: a scheme left out this time
    (or a plot not drawn) leaves no figure beside a report that does not describe it."""
    workdir.mkdir(parents=True, exist_ok=True)
    for pattern in PLOTS:
        for old in workdir.glob(pattern):
            old.unlink()
    (workdir / "report.json").write_text(json.dumps(table, indent=2) + "\n")
    _write_csv(table, workdir / "report.csv")
    (workdir / "report.md").write_text("\n".join(_markdown(table)) + "\n")
    for scheme, runs in results.items():
        plot_roc(scheme, runs, workdir / f"roc_{scheme}.png")
        plot_reliability(scheme, runs, workdir / f"reliability_{scheme}.png")
    sweep = k_sweep(table)
    if len(sweep["fixed"]) >= 2:
        plot_k_sweep(sweep, workdir / "k_sweep.png")


def k_sweep(table: dict[str, dict], scheme: str = "label_assign") -> dict[str, dict]:
    """The rows of ``scheme``'s runs with their own k (``<scheme>_k<k>``): ``{"fixed": {k:
    row}}`` for counts and fractions, sorted by k, and ``{"chosen": {"auto": row, ...}}`` for k
    the model chooses."""
    fixed, chosen = {}, {}
    for name, row in table.items():
        k = _own_k(name, scheme)
        if k is None:
            continue
        try:
            fixed[float(k)] = row
        except ValueError:
            chosen[k] = row
    return {"fixed": dict(sorted(fixed.items())), "chosen": chosen}


def plot_k_sweep(sweep: dict[str, dict], path: Path) -> None:
    """AUC and instance AUC (fold mean ± standard deviation) against a fixed k, with each
    chosen-k variant (``--k=auto``, ...) as a horizontal line and band at its own values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(sweep["fixed"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=120, sharex=True)
    for ax, metric, label in ((axes[0], "auc", "AUC"), (axes[1], "instance_auc", "instance AUC")):
        stats = [row.get(metric) for row in sweep["fixed"].values()]
        if all(stats):
            mean = np.array([st["mean"] for st in stats])
            std = np.array([st["std"] for st in stats])
            ax.errorbar(ks, mean, yerr=std, fmt="o-", capsize=3, c="k", label="fixed k")
        for i, (k, row) in enumerate(sweep["chosen"].items()):
            st = row.get(metric)
            if not st:
                continue
            color = f"C{i}"
            ax.axhline(st["mean"], c=color, ls="--", lw=1.2, label=f"k={k}")
            ax.axhspan(st["mean"] - st["std"], st["mean"] + st["std"], color=color, alpha=0.12)
        ax.set(xscale="log", xlabel="k (instances per positive image)", ylabel=label, ylim=(0, 1))
        ax.set_xticks(ks, [f"{k:g}" for k in ks])
        ax.legend(fontsize=7)
    axes[0].set_title("label assignment: test AUC over folds")
    axes[1].set_title("localisation on positive test images")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_csv(table: dict[str, dict], path: Path) -> None:
    localised = [m for m in LOCALISATION if any(row.get(m) for row in table.values())]
    header = ["scheme", "folds"]
    for metric in ("accuracy", "auc", "sensitivity", "specificity"):
        header += [f"{metric}_mean", f"{metric}_std"]
    header += ["pooled_images", "pooled_auc", "pooled_auc_ci_low", "pooled_auc_ci_high"]
    header += ["brier", "delong_reference", "delong_p"]
    for metric in localised:
        header += [f"{metric}_mean", f"{metric}_std"]
    if "pointing_game" in localised:
        header += ["pointing_game_hits", "pointing_game_images"]
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        for scheme, row in table.items():
            line = [scheme, row["folds"]]
            for metric in ("accuracy", "auc", "sensitivity", "specificity"):
                line += [row[metric]["mean"], row[metric]["std"]]
            pooled = row.get("pooled")
            if pooled:
                delong = pooled["delong"] or {}
                line += [pooled["images"], pooled["auc"], *pooled["auc_ci"], pooled["brier"]]
                line += [delong.get("reference", ""), delong.get("p_value", "")]
            else:
                line += [""] * 7
            for metric in localised:
                stat = row.get(metric)
                line += [stat["mean"], stat["std"]] if stat else ["", ""]
            if "pointing_game" in localised:
                stat = row.get("pointing_game")
                line += [stat["hits"], stat["evaluated"]] if stat else ["", ""]
            out.writerow(line)


def _markdown(table: dict[str, dict]) -> list[str]:
    """The lines of report.md: Table 1, then the pooled statistics."""
    localised = [m for m in LOCALISATION if any(row.get(m) for row in table.values())]
    lines = [
        "| Method | Accuracy | AUC | Paper AUC (INbreast) |"
        + "".join(f" {LOCALISATION[m]} |" for m in localised),
        "|---|---|---|---|" + "---|" * len(localised),
    ]
    for scheme, row in table.items():
        auc = registry.SCHEMES[scheme].paper_auc if scheme in registry.SCHEMES else None
        paper = "-" if auc is None else f"{auc:.2f}"
        line = f"| {title(scheme)} | {_cell(row['accuracy'])} | {_cell(row['auc'])} |"
        line += f" {paper} |"
        for metric in localised:
            stat = row.get(metric)
            if not stat:
                line += " - |"
            elif metric == "pointing_game":
                line += f" {_cell(stat)} ({stat['hits']}/{stat['evaluated']}) |"
            else:
                line += f" {_cell(stat)} |"
        lines.append(line)
    folds = max(row["folds"] for row in table.values())
    lines += [
        "",
        f"Test-fold mean ± standard deviation over {folds} folds; accuracy at the "
        "threshold chosen on each fold's validation set. Paper: INbreast, Zhu et al. 2017, "
        "Table 1.",
    ]
    if localised:
        lines += [
            "",
            "Localisation, on the positive test images with outlined lesions, mean ± standard "
            "deviation over folds. Instance (r, c) of an h x w grid is the patch of rows "
            "[r H/h, (r+1) H/h) and columns likewise of the preprocessed image. Instance AUC: "
            "the instance logits of all such images' cells against 'the cell holds lesion' (at "
            f"least {100 * heatmap.LESION_CELL_COVERAGE:.0f}% of its area inside an outline; "
            "cells with less but some lesion are left out). IoU: the patches of instance "
            "probability >= 0.5 against the pixels inside an outline. Pointing game: the "
            "fraction whose highest-scoring patch overlaps a mass box (hits/images over all "
            "folds). The AlexNet baseline has one instance, so no score.",
        ]
    return lines + _markdown_pooled(table)


def _markdown_pooled(table: dict[str, dict]) -> list[str]:
    """The second table of report.md: statistics over the pooled test predictions."""
    rows = [(s, row, row.get("pooled")) for s, row in table.items()]
    if not any(pooled for _, _, pooled in rows):
        return []
    reference = next(iter(table))
    lines = [
        "",
        "| Method | Images | Pooled AUC [95% CI] | Brier | Sensitivity | Specificity "
        f"| DeLong p vs {title(reference)} |",
        "|---|---|---|---|---|---|---|",
    ]
    for scheme, row, pooled in rows:
        sens, spec = _cell(row["sensitivity"]), _cell(row["specificity"])
        if not pooled:
            lines.append(f"| {title(scheme)} | - | - | - | {sens} | {spec} | - |")
            continue
        low, high = pooled["auc_ci"]
        delong = pooled["delong"]
        p = f"{delong['p_value']:.3g} ({delong['images']} images)" if delong else "-"
        lines.append(
            f"| {title(scheme)} | {pooled['images']} | {pooled['auc']:.3f} "
            f"[{low:.3f}, {high:.3f}] | {pooled['brier']:.3f} | {sens} | {spec} | {p} |"
        )
    lines += [
        "",
        "Pooled: the test predictions of all folds together. 95% CI: percentile bootstrap "
        f"over images ({BOOTSTRAP_RESAMPLES} resamples, stratified by class). Brier: mean "
        "squared error of the probability. Sensitivity and specificity: at each fold's "
        "validation-chosen threshold (Youden's J), mean ± standard deviation over folds. "
        "DeLong p: two-sided test of the AUC difference from the first scheme on the images "
        "both scored (DeLong et al. 1988). Calibration: reliability_<scheme>.png.",
    ]
    return lines


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def plot_roc(scheme: str, runs: list[dict], path: Path) -> None:
    """One ROC curve per test fold, from each run's test_predictions.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    for run in runs:
        if not (Path(run["run_dir"]) / "test_predictions.csv").exists():
            continue
        _, labels, probs = read_predictions(run["run_dir"])
        if labels.size == 0 or labels.min() == labels.max():
            continue
        fpr, tpr, _ = roc_curve(labels, probs)
        ax.plot(fpr, tpr, lw=1.2, label=f"fold {run['fold']} (AUC {run['test']['auc']:.2f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(
        xlabel="1 - specificity",
        ylabel="sensitivity",
        title=title(scheme),
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reliability(scheme: str, runs: list[dict], path: Path) -> None:
    """Reliability diagram of the pooled test predictions (``metrics.reliability``, 10 bins):
    observed fraction of positives against mean predicted probability, and the bin counts."""
    pooled = pooled_predictions(runs)
    if not pooled:
        return
    labels = np.array([y for y, _ in pooled.values()], int)
    probs = np.array([p for _, p in pooled.values()], float)
    table = metrics.reliability(labels, probs, bins=RELIABILITY_BINS)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    filled = table["count"] > 0
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.5, 5.5), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfect calibration")
    top.plot(
        table["mean_predicted"][filled],
        table["observed"][filled],
        "o-",
        lw=1.2,
        label=f"Brier {metrics.brier_score(labels, probs):.3f}",
    )
    top.set(ylabel="fraction positive", title=title(scheme), xlim=(0, 1), ylim=(0, 1))
    top.legend(loc="upper left", fontsize=7)
    edges = table["edges"]
    bottom.bar(edges[:-1], table["count"], width=np.diff(edges), align="edge", color="grey")
    bottom.set(xlabel="predicted probability", ylabel="images")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
