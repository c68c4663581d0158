"""The report's statistics over pooled test predictions (bootstrap CI, Brier, DeLong against the
first scheme, sensitivity/specificity over folds) and its files, on fake cross-validation runs."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import _fake_run
from sklearn.metrics import brier_score_loss, roc_auc_score

from deepmil_jax import evaluate, metrics, report


def _run(run_dir: Path, fold: int, ids, labels, probs, sens: float, spec: float) -> dict:
    run_dir.mkdir(parents=True)
    with (run_dir / "test_predictions.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["file_id", "patient_id", "label", "probability", "top_patch_row"])
        for i, y, p in zip(ids, labels, probs, strict=True):
            out.writerow([i, "p", y, p, 0])
    test = {
        "auc": roc_auc_score(labels, probs),
        "accuracy": 0.5,
        "sensitivity": sens,
        "specificity": spec,
        "threshold": 0.5,
    }
    return {"fold": fold, "run_dir": str(run_dir), "test": test}


@pytest.fixture
def cv(tmp_path):
    """Two folds of 50 images; the same images (listed in another order) for both schemes."""
    rng = np.random.default_rng(0)
    results = {"max_pooling": [], "sparse": []}
    pooled = {"labels": [], "max_pooling": [], "sparse": []}
    for fold, (sens, spec) in enumerate([(0.6, 0.9), (0.8, 0.7)]):
        ids = [f"img{fold}_{i}" for i in range(50)]
        labels = rng.integers(0, 2, 50)
        weak = np.clip(0.5 + 0.1 * (labels - 0.5) + rng.normal(0, 0.2, 50), 0, 1)
        strong = np.clip(0.5 + 0.6 * (labels - 0.5) + rng.normal(0, 0.15, 50), 0, 1)
        order = rng.permutation(50)
        for scheme, probs, idx in (("max_pooling", weak, order), ("sparse", strong, range(50))):
            idx = list(idx)
            results[scheme].append(
                _run(
                    tmp_path / scheme / f"fold{fold}",
                    fold,
                    [ids[i] for i in idx],
                    labels[idx],
                    probs[idx],
                    sens,
                    spec,
                )
            )
        pooled["labels"].append(labels)
        pooled["max_pooling"].append(weak)
        pooled["sparse"].append(strong)
    keys = [(fold, f"img{fold}_{i}") for fold in range(2) for i in range(50)]
    pooled["sorted"] = [sorted(range(100), key=lambda j: (str(keys[j][0]), keys[j][1]))]
    return results, {k: np.concatenate(v) for k, v in pooled.items()}


def test_summarize_pooled_statistics(cv):
    results, pooled = cv
    table = evaluate.summarize(results)
    labels = pooled["labels"]
    for scheme in ("max_pooling", "sparse"):
        stats = table[scheme]["pooled"]
        assert stats["images"] == 100
        assert stats["auc"] == pytest.approx(roc_auc_score(labels, pooled[scheme]))
        assert stats["brier"] == pytest.approx(brier_score_loss(labels, pooled[scheme]))
        # the bootstrap resamples the images sorted by (fold, file_id), whatever the CSV order
        ci = metrics.bootstrap_auc_ci(
            labels[pooled["sorted"]], pooled[scheme][pooled["sorted"]], n=2000, seed=0
        )
        assert stats["auc_ci"] == pytest.approx(list(ci))
        assert ci[0] < stats["auc"] < ci[1]
    assert table["max_pooling"]["pooled"]["delong"] is None
    delong = table["sparse"]["pooled"]["delong"]
    # matched by (fold, file_id) although the two schemes list their images in other orders
    want = metrics.paired_auc_test(labels, pooled["sparse"], pooled["max_pooling"])
    assert (delong["auc"], delong["reference_auc"], delong["p_value"]) == pytest.approx(want)
    assert delong["reference"] == "max_pooling" and delong["images"] == 100
    assert delong["p_value"] < 0.01
    sens = table["sparse"]["sensitivity"]
    assert sens["mean"] == pytest.approx(0.7) and sens["std"] == pytest.approx(math.sqrt(0.02))


def test_write_report_files(cv, tmp_path):
    results, _ = cv
    results["alexnet"] = [{**results["sparse"][0], "run_dir": str(tmp_path / "missing")}]
    table = evaluate.summarize(results)
    assert table["alexnet"]["pooled"] is None
    out = tmp_path / "report"
    report.write_report(table, results, out)
    for scheme in ("max_pooling", "sparse"):
        for kind in ("roc", "reliability"):
            assert (out / f"{kind}_{scheme}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    stats = table["sparse"]["pooled"]
    low, high = stats["auc_ci"]
    assert f"{stats['auc']:.3f} [{low:.3f}, {high:.3f}]" in md
    assert f"| {stats['brier']:.3f} | 0.70 ± 0.14 | 0.80 ± 0.14 |" in md
    assert f"{stats['delong']['p_value']:.3g} (100 images)" in md
    assert "DeLong p vs Deep MIL, max pooling" in md
    with (out / "report.csv").open() as f:
        rows = {r["scheme"]: r for r in csv.DictReader(f)}
    assert float(rows["sparse"]["pooled_auc_ci_low"]) == pytest.approx(low)
    assert float(rows["sparse"]["delong_p"]) == pytest.approx(stats["delong"]["p_value"])
    assert rows["sparse"]["delong_reference"] == "max_pooling"
    assert rows["max_pooling"]["delong_p"] == "" and rows["alexnet"]["pooled_auc"] == ""
    assert float(rows["sparse"]["specificity_mean"]) == pytest.approx(0.8)
    saved = json.loads((out / "report.json").read_text())
    assert saved["sparse"]["pooled"]["auc_ci"] == pytest.approx([low, high])


def test_no_localisation_columns_without_outlines(cv, tmp_path):
    """A dataset without outlines (a folder of images, CBIS-DDSM): every fold's localisation
    scores are NaN, so the report has no localisation columns, not NaN ones; where one fold
    scored, its scores are the statistics."""
    results, _ = cv
    for runs in results.values():
        for run in runs:
            run["test"].update(instance_auc=math.nan, iou=math.nan, pointing_game=math.nan)
            run["test"].update(pointing_hits=0, pointing_images=0)
    table = evaluate.summarize(results)
    assert all(table[s][m] is None for s in table for m in report.LOCALISATION)
    report.write_report(table, results, tmp_path / "none")
    md = (tmp_path / "none" / "report.md").read_text()
    assert "nan" not in md and "Instance AUC" not in md and "Pointing game" not in md
    results["sparse"][1]["test"].update(instance_auc=0.8, pointing_game=1.0)
    results["sparse"][1]["test"].update(pointing_hits=3, pointing_images=3)
    table = evaluate.summarize(results)
    assert table["sparse"]["instance_auc"]["mean"] == 0.8 and table["sparse"]["iou"] is None
    assert table["sparse"]["pointing_game"]["hits"] == 3 and table["max_pooling"]["iou"] is None
    report.write_report(table, results, tmp_path / "one")
    md = (tmp_path / "one" / "report.md").read_text()
    assert "| 0.80 ± 0.00 |" in md and "(3/3)" in md and "nan" not in md


def test_reliability_plot_skips_a_scheme_without_predictions(tmp_path):
    report.plot_reliability("sparse", [{"fold": 0, "run_dir": str(tmp_path)}], tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()


def test_k_sweep_orders_fixed_k_and_keeps_chosen_k_apart(tmp_path):
    def row(auc):
        return {"auc": {"mean": auc, "std": 0.1}, "instance_auc": {"mean": auc / 2, "std": 0.0}}

    table = {
        "max_pooling": row(0.9),
        "label_assign_k12": row(0.7),
        "label_assign_k3": row(0.8),
        "label_assign_kauto": row(0.75),
        "label_assign_k0.25": row(0.6),
        "topk_pooling_k3": row(0.5),
    }
    sweep = report.k_sweep(table)
    assert list(sweep["fixed"]) == [0.25, 3.0, 12.0]
    assert [r["auc"]["mean"] for r in sweep["fixed"].values()] == [0.6, 0.8, 0.7]
    assert sweep["chosen"] == {"auto": table["label_assign_kauto"]}
    assert list(report.k_sweep(table, "topk_pooling")["fixed"]) == [3.0]
    report.plot_k_sweep(sweep, tmp_path / "k_sweep.png")
    assert (tmp_path / "k_sweep.png").stat().st_size > 10_000


def test_report_removes_an_earlier_reports_plots(tmp_path):
    """A scheme left out of this report leaves no ROC plot behind; other files stay."""
    for name in ("roc_alexnet.png", "reliability_alexnet.png", "k_sweep.png", "notes.png"):
        (tmp_path / name).write_bytes(b"old")
    run_dir = tmp_path / "sparse" / "fold0"
    run_dir.mkdir(parents=True)
    rows = "".join(f"{i},{i % 2},{0.2 + 0.1 * i}\n" for i in range(6))
    (run_dir / "test_predictions.csv").write_text("file_id,label,probability\n" + rows)
    results = {"sparse": [{**_fake_run(run_dir, 0.8, None), "fold": 0}]}
    report.write_report(evaluate.summarize(results), results, tmp_path)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["notes.png", "reliability_sparse.png", "roc_sparse.png"]
