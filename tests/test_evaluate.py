"""Cross-validation (deepmil_jax.evaluate) on fake runs: the summary and report of the localisation
scores, a finished run reused only with the same settings, and a k sweep, each k in its own
folder (training monkeypatched)."""

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import _fake_run

from deepmil_jax import config as config_module
from deepmil_jax import evaluate, report


def _scores(instance_auc, iou, hits, images):
    return {
        "instance_auc": instance_auc,
        "iou": iou,
        "pointing_game": hits / images if images else math.nan,
        "pointing_hits": hits,
        "pointing_images": images,
    }


def test_evaluate_reports_the_localisation_scores(tmp_path):

    fold0 = _fake_run(tmp_path / "label_assign" / "fold0", 0.8, _scores(0.7, 0.2, 1, 2))
    fold1 = _fake_run(tmp_path / "label_assign" / "fold1", 0.9, _scores(0.9, 0.4, 1, 1))
    fold2 = _fake_run(tmp_path / "label_assign" / "fold2", 0.9, _scores(math.nan, math.nan, 0, 0))
    results = {
        "alexnet": [{**_fake_run(tmp_path / "alexnet" / "fold0", 0.7, None), "fold": 0}],
        "label_assign": [{**r, "fold": f} for f, r in enumerate((fold0, fold1, fold2))],
    }
    table = evaluate.summarize(results)
    row = table["label_assign"]
    # a fold with nothing to score (NaN) is left out of the mean and standard deviation
    assert row["instance_auc"]["mean"] == pytest.approx(0.8)
    assert row["instance_auc"]["std"] == pytest.approx(np.std([0.7, 0.9], ddof=1))
    assert row["iou"]["mean"] == pytest.approx(0.3)
    assert row["pointing_game"]["mean"] == pytest.approx(0.75)
    assert (row["pointing_game"]["hits"], row["pointing_game"]["evaluated"]) == (2, 3)
    assert all(table["alexnet"][m] is None for m in ("instance_auc", "iou", "pointing_game"))
    report.write_report(table, results, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| Instance AUC | IoU | Pointing game |" in md
    assert "| 0.80 ± 0.14 | 0.30 ± 0.14 | 0.75 ± 0.35 (2/3) |" in md
    with (tmp_path / "report" / "report.csv").open() as f:
        by_scheme = {r["scheme"]: r for r in csv.DictReader(f)}
    assert float(by_scheme["label_assign"]["instance_auc_mean"]) == pytest.approx(0.8)
    assert by_scheme["alexnet"]["iou_mean"] == ""
    assert float(by_scheme["label_assign"]["auc_mean"]) == pytest.approx(np.mean([0.8, 0.9, 0.9]))
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["label_assign"]["iou"]["per_fold"][:2] == [0.2, 0.4]
    # The grid of the models: 2x2 for 99-pixel images, 6x6 for the paper's 227.
    assert config_module.Config(image_size=99).grid() == (2, 2)
    assert config_module.Config(image_size=227, scheme="sparse").grid() == (6, 6)


def test_evaluate_reuses_only_a_run_with_the_same_settings(tmp_path, monkeypatch):
    from deepmil_jax import train

    config = config_module.Config(scheme="label_assign", k=6, image_size=99, data_dir=str(tmp_path))
    run_dir = tmp_path / "cv" / "label_assign" / "fold0"
    run_dir.mkdir(parents=True)
    finished = {"config": config.canonical().to_json(), "test": {"auc": 0.9}}
    (run_dir / "results.json").write_text(json.dumps(finished))
    trained = []

    def fake_train(cfg, workdir):
        trained.append((cfg.k, Path(workdir)))
        return {"config": cfg.to_json(), "test": {"auc": 0.5}}

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    same = evaluate.cross_validate(config, ["label_assign"], [0], tmp_path / "cv")
    assert trained == [] and same["label_assign"][0]["test"]["auc"] == 0.9
    # --k=2 after a k=6 run: the k=6 numbers are not reported as k=2's
    other = evaluate.cross_validate(
        dataclasses.replace(config, k=2), ["label_assign"], [0], tmp_path / "cv"
    )
    assert trained == [(2.0, run_dir)] and other["label_assign"][0]["test"]["auc"] == 0.5


def test_evaluate_k_sweep_runs_each_k_in_its_own_folder(tmp_path, monkeypatch):
    """``--schemes=label_assign:k=3,...``: one run per entry, each with its own k, in
    <workdir>/<scheme>_k<k>; a plain entry takes --k; report titles name the k."""
    from deepmil_jax import train

    config = config_module.Config(k=6, image_size=99, data_dir=str(tmp_path))
    trained = []

    def fake_train(cfg, workdir):
        trained.append((cfg.scheme, cfg.k, Path(workdir).relative_to(tmp_path).as_posix()))
        return {"config": cfg.to_json(), "test": {"auc": 0.5}}

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    entries = ["sparse", "label_assign:k=3", "label_assign:k=0.25", "label_assign:k=auto"]
    results = evaluate.cross_validate(config, entries, [1], tmp_path)
    assert trained == [
        ("sparse", 6, "sparse/fold1"),
        ("label_assign", 3, "label_assign_k3/fold1"),
        ("label_assign", 0.25, "label_assign_k0.25/fold1"),
        ("label_assign", "auto", "label_assign_kauto/fold1"),
    ]
    assert list(results) == [
        "sparse",
        "label_assign_k3",
        "label_assign_k0.25",
        "label_assign_kauto",
    ]
    assert report.title("label_assign_k3") == "Deep MIL, label assignment, k=3"
    assert report.title("label_assign_kauto") == "Deep MIL, label assignment, k=auto"
    assert report.title("sparse") == "Deep MIL, sparse"
