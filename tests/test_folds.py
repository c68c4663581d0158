"""Tests of data_pipeline.folds: patient-grouped and image-level stratified K-fold splits."""

import json

import numpy as np
import pytest

from data_pipeline.errors import DataError
from data_pipeline.folds import assign_folds, make_split, write_split


def _inbreast_like(num_patients=40, seed=0):
    """Patients with 2 or 4 images each (L/R x CC/MLO); ~25% positive images, clustered by
    patient as in INbreast (a positive breast gives two positive views)."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for p in range(num_patients):
        breasts = 2 if rng.random() < 0.7 else 1
        for _ in range(breasts):
            positive = int(rng.random() < 0.25)
            for _ in range(2):
                labels.append(positive)
                groups.append(f"patient{p:03d}")
    return np.array(labels), np.array(groups)


LABELS, GROUPS = _inbreast_like()
K = 5


@pytest.mark.parametrize("fold", range(K))
def test_parts_are_disjoint_by_patient_and_cover_everything(fold):
    split = make_split(LABELS, GROUPS, num_folds=K, fold=fold, seed=3)
    parts = [split.train, split.validation, split.test]
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(LABELS.size))
    patient_sets = [set(GROUPS[p]) for p in parts]
    assert not patient_sets[0] & patient_sets[1]
    assert not patient_sets[0] & patient_sets[2]
    assert not patient_sets[1] & patient_sets[2]
    for part in parts:
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)


@pytest.mark.parametrize("mode", ["patient", "image"])
def test_every_example_is_tested_once_and_validation_is_the_next_test_fold(mode):
    groups = GROUPS if mode == "patient" else None
    splits = [make_split(LABELS, groups, num_folds=K, fold=f, split=mode, seed=1) for f in range(K)]
    tested = np.concatenate([s.test for s in splits])
    assert np.array_equal(np.sort(tested), np.arange(LABELS.size))
    for f in range(K):
        assert np.array_equal(splits[f].validation, splits[(f + 1) % K].test)
        others = [splits[g].test for g in range(K) if g not in (f, (f + 1) % K)]
        assert np.array_equal(splits[f].train, np.sort(np.concatenate(others)))


def test_assign_folds_matches_make_split():
    assignment = assign_folds(LABELS, GROUPS, num_folds=K, seed=4)
    for f in range(K):
        split = make_split(LABELS, GROUPS, num_folds=K, fold=f, seed=4)
        assert np.array_equal(split.test, np.flatnonzero(assignment == f))


@pytest.mark.parametrize("mode", ["patient", "image"])
def test_positives_are_spread_over_the_folds(mode):
    groups = GROUPS if mode == "patient" else None
    assignment = assign_folds(LABELS, groups, num_folds=K, split=mode, seed=0)
    positives = np.bincount(assignment[LABELS == 1], minlength=K)
    sizes = np.bincount(assignment, minlength=K)
    total = int(LABELS.sum())
    assert positives.min() >= 1
    if mode == "image":
        # StratifiedKFold: per-fold counts differ by at most one.
        assert positives.max() - positives.min() <= 1
        assert sizes.max() - sizes.min() <= 1
    else:
        # Groups of 2-4 images: each fold's positives within a few images of its share.
        assert np.all(np.abs(positives - total / K) <= 4)
        assert np.all(np.abs(sizes - LABELS.size / K) <= 4)


def test_image_mode_is_plain_stratified_kfold():
    # One patient only: the image protocol ignores patients entirely.
    labels = np.array([0, 1] * 15)
    groups = np.array(["same"] * 30)
    split = make_split(labels, groups, num_folds=K, fold=2, split="image", seed=0)
    assert split.test.size == 6 and labels[split.test].sum() == 3
    with pytest.raises(DataError, match="patients"):
        make_split(labels, groups, num_folds=K, fold=2, split="patient", seed=0)


@pytest.mark.parametrize("mode", ["patient", "image"])
def test_deterministic_for_a_seed_and_seed_matters(mode):
    groups = GROUPS if mode == "patient" else None
    a = assign_folds(LABELS, groups, num_folds=K, split=mode, seed=7)
    b = assign_folds(LABELS, groups, num_folds=K, split=mode, seed=7)
    c = assign_folds(LABELS, groups, num_folds=K, split=mode, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_too_few_patients_or_positives_is_a_data_error():
    labels = np.array([0, 1, 0, 1, 0, 0, 1, 0])
    groups = np.array(["a", "a", "b", "b", "c", "c", "d", "d"])
    with pytest.raises(DataError, match="Only 4 patients for 5 folds"):
        make_split(labels, groups, num_folds=5)
    labels = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    groups = np.array([f"p{i}" for i in range(12)])
    with pytest.raises(DataError, match="Only 2 patients have examples with label 1"):
        make_split(labels, groups, num_folds=5)
    with pytest.raises(DataError, match="Only 2 examples with label 1"):
        make_split(labels, None, num_folds=5, split="image")
    with pytest.raises(DataError, match="both"):
        make_split(np.zeros(20), None, num_folds=5, split="image")
    with pytest.raises(DataError, match="fold=5"):
        make_split(LABELS, GROUPS, num_folds=5, fold=5)
    with pytest.raises(DataError, match="split mode"):
        make_split(LABELS, GROUPS, split="breast")
    with pytest.raises(DataError, match="groups"):
        make_split(LABELS, None, split="patient")


def test_write_split_records_file_ids(tmp_path):
    file_ids = np.array([f"{1000 + i}" for i in range(LABELS.size)])
    split = make_split(LABELS, GROUPS, num_folds=K, fold=1, seed=0)
    path = write_split(split, file_ids, tmp_path / "sub" / "split.json", metadata={"fold": 1})
    payload = json.loads(path.read_text())
    assert payload["test"] == [file_ids[i] for i in split.test]
    assert payload["validation"] == [file_ids[i] for i in split.validation]
    assert payload["train"] == [file_ids[i] for i in split.train]
    assert payload["counts"]["test"] == split.test.size and payload["fold"] == 1


def test_write_split_checks_indices_and_writes_readable_json(tmp_path):
    from pathlib import Path

    from data_pipeline.folds import Split

    ids = np.array(["a", "b", "c"])

    def split(*test):
        return Split(train=np.array([0]), validation=np.array([1]), test=np.array(test))

    with pytest.raises(DataError, match="go up to 3"):
        write_split(split(3), ids, tmp_path / "x.json")  # index n: one past the end
    with pytest.raises(DataError, match="file ids"):
        write_split(split(-1), ids, tmp_path / "x.json")  # negative, with max < n
    # deep folders are created, the file can be rewritten, and metadata need not be JSON types
    path = tmp_path / "runs" / "fold2" / "split.json"
    for _ in range(2):
        write_split(split(2), ids, path, metadata={"data_dir": Path("/d"), "seed": np.int64(3)})
    text = path.read_text()
    assert text.endswith("}\n") and text.splitlines()[1] == '  "train": ['
    payload = json.loads(text)
    assert payload["data_dir"] == "/d" and payload["seed"] == "3"
    assert payload["counts"] == {"train": 1, "validation": 1, "test": 1}


def test_fold_count_boundaries_and_defaults():
    # 3 folds (test, validation, training) is the least; 2, a float or 0 examples are errors
    for mode in ("patient", "image"):
        three = assign_folds(LABELS, GROUPS, num_folds=3, split=mode, seed=0)
        assert sorted(set(three.tolist())) == [0, 1, 2]
        four = make_split(LABELS, GROUPS, num_folds=4, fold=3, split=mode, seed=0)
        assigned = assign_folds(LABELS, GROUPS, num_folds=4, split=mode, seed=0)
        np.testing.assert_array_equal(four.test, np.flatnonzero(assigned == 3))
        np.testing.assert_array_equal(four.validation, np.flatnonzero(assigned == 0))
        assert four.train.dtype == np.int64
    with pytest.raises(DataError, match="at least 3"):
        assign_folds(LABELS, GROUPS, num_folds=2)
    with pytest.raises(DataError, match="at least 3"):
        assign_folds(LABELS, GROUPS, num_folds=5.0)
    with pytest.raises(DataError, match="empty"):
        assign_folds([], [], num_folds=3)
    # the paper's defaults: 5 folds, fold 0 tested, grouped by patient, seed 0
    default = make_split(LABELS, GROUPS)
    explicit = make_split(LABELS, GROUPS, num_folds=5, fold=0, split="patient", seed=0)
    for name in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(default, name), getattr(explicit, name))
    np.testing.assert_array_equal(
        assign_folds(LABELS, GROUPS), assign_folds(LABELS, GROUPS, num_folds=5, seed=0)
    )


def test_exactly_one_positive_or_patient_per_fold_is_enough():
    labels = np.array([1] * 3 + [0] * 6)
    groups = np.array([f"p{i}" for i in range(9)])
    assert sorted(set(assign_folds(labels, None, num_folds=3, split="image").tolist())) == [0, 1, 2]
    assert sorted(set(assign_folds(labels, groups, num_folds=3).tolist())) == [0, 1, 2]
    few_patients = np.array(["a", "a", "a", "b", "b", "b", "c", "c", "c"])
    mixed = np.array([1, 0, 0, 1, 0, 0, 1, 0, 0])
    assert sorted(set(assign_folds(mixed, few_patients, num_folds=3).tolist())) == [0, 1, 2]


def test_a_fold_of_one_example_is_not_empty():
    groups = np.array(["a", "b", "b", "b", "c", "c", "c", "d"])
    labels = np.array([1, 1, 0, 0, 1, 0, 0, 0])
    folds = assign_folds(labels, groups, num_folds=3, seed=1)
    assert np.bincount(folds).tolist() == [4, 3, 1]  # patient "a" alone tests fold 2
    assert make_split(labels, groups, num_folds=3, fold=2, seed=1).test.tolist() == [0]


def test_official_split_keeps_the_collections_test_set():
    # the official test set: every fourth patient's images (a hand-made choice, patient-wise)
    patients = np.unique(GROUPS)
    test_patients = set(patients[::4])
    subsets = np.array(["test" if g in test_patients else "train" for g in GROUPS])
    official_test = np.flatnonzero(subsets == "test")
    official_train = np.flatnonzero(subsets == "train")
    validations = []
    for fold in range(K):
        split = make_split(
            LABELS, GROUPS, num_folds=K, fold=fold, split="official", seed=3, subsets=subsets
        )
        np.testing.assert_array_equal(split.test, official_test)  # whatever the fold
        np.testing.assert_array_equal(
            np.sort(np.concatenate([split.train, split.validation])), official_train
        )
        assert not set(GROUPS[split.train]) & set(GROUPS[split.validation])
        assert set(LABELS[split.validation]) == {0, 1}
        validations.append(split.validation)
    # the validation sets of the K folds cut the official training set into K parts
    joined = np.concatenate(validations)
    np.testing.assert_array_equal(np.sort(joined), official_train)


@pytest.mark.parametrize("grouped", [True, False])
def test_official_split_validation_is_a_fold_of_the_official_training_set(grouped):
    # validation: fold `fold` of assign_folds' folds of the official training set, patient-grouped
    # when there are patient ids, image-wise without
    subsets = np.where(np.isin(GROUPS, np.unique(GROUPS)[1::4]), "test", "train")
    train = np.flatnonzero(subsets == "train")
    groups = GROUPS if grouped else None
    folds = assign_folds(
        LABELS[train],
        GROUPS[train] if grouped else None,
        num_folds=3,
        split="patient" if grouped else "image",
        seed=7,
    )
    for fold in range(3):
        split = make_split(
            LABELS, groups, num_folds=3, fold=fold, split="official", seed=7, subsets=list(subsets)
        )
        np.testing.assert_array_equal(split.validation, train[folds == fold])
        np.testing.assert_array_equal(split.train, train[folds != fold])
        np.testing.assert_array_equal(split.test, np.flatnonzero(subsets == "test"))


def test_official_split_with_one_training_example_says_what_assign_folds_says():
    subsets = np.array(["test"] * (LABELS.size - 1) + ["train"])
    with pytest.raises(DataError, match="All 1 examples have label"):
        make_split(LABELS, GROUPS, num_folds=3, split="official", subsets=subsets)


@pytest.mark.parametrize(
    "subsets",
    [
        None,
        ["train"] * LABELS.size,
        ["train", ""] * (LABELS.size // 2) + ["test"],
        ["train", "test"] * 3,  # valid names, but not one per example
    ],
)
def test_official_split_needs_an_official_split(subsets):
    subsets = subsets if subsets is None else subsets[: LABELS.size]
    with pytest.raises(DataError, match="official"):
        make_split(LABELS, GROUPS, num_folds=K, split="official", subsets=subsets)


def test_official_split_warns_about_patients_in_both_parts(caplog):
    subsets = np.array(["train"] * LABELS.size)
    subsets[-1] = "test"  # the last image's patient has other images in the training set
    subsets[:8] = "test"
    shared = {GROUPS[-1]} | ({GROUPS[7]} if GROUPS[7] == GROUPS[8] else set())
    with caplog.at_level("WARNING"):
        make_split(LABELS, GROUPS, num_folds=3, split="official", subsets=subsets)
    assert f"{len(shared)} patient(s) in both" in caplog.text
    caplog.clear()
    patient_wise = np.where(np.isin(GROUPS, GROUPS[:8]), "test", "train")
    with caplog.at_level("WARNING"):
        make_split(LABELS, GROUPS, num_folds=3, split="official", subsets=patient_wise)
    assert "in both" not in caplog.text
