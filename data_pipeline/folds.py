"""K-fold cross-validation splits as in the paper (Zhu et al., MICCAI 2017, Sec. 3).

The examples are cut into ``num_folds`` folds stratified by label. For fold ``f``, fold ``f`` is the
test set, fold ``(f + 1) % num_folds`` the validation set and the remaining folds the training set.

Two protocols:

* ``split="patient"`` (default): folds are grouped by patient with sklearn's
  ``StratifiedGroupKFold``, so no patient appears in two of train / validation / test.
* ``split="image"``: the paper's image-level protocol, ``StratifiedKFold`` over images (images of
  one patient may fall into different parts).

Both shuffle with ``random_state=seed`` and are deterministic for a seed. A third,
``split="official"``, is for collections that come with their own train/test split (CBIS-DDSM,
VinDr-Mammo): the test set is the official test set, whatever the fold, and fold ``f`` of a
patient-grouped ``num_folds``-fold split of the official training set is the validation set.
``write_split`` writes the membership (file ids per part) to JSON so that results can be audited.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from absl import logging
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from data_pipeline.errors import DataError

__all__ = ["SPLIT_MODES", "Split", "assign_folds", "make_split", "write_split"]

SPLIT_MODES = ("patient", "image", "official")
_FOLD_MODES = ("patient", "image")  # the modes that cut the examples into folds


@dataclass(frozen=True)
class Split:
    """Indices (into the examples) of the three parts of one cross-validation fold.

    Each field is a sorted ``(k,)`` int64 array; the three are disjoint and together cover every
    example.
    """

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def _check_inputs(
    labels: np.ndarray, groups: np.ndarray | None, num_folds: int, split: str
) -> tuple[np.ndarray, np.ndarray | None]:
    if split not in _FOLD_MODES:
        raise DataError(
            f"split={split!r} is not a split mode that cuts folds; use one of {_FOLD_MODES}."
        )
    if not isinstance(num_folds, int | np.integer) or num_folds < 3:
        raise DataError(
            f"num_folds={num_folds!r}: need at least 3 folds (test, validation and training); "
            "the paper uses 5."
        )
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be a 1-D array, got shape {labels.shape}.")
    if labels.size == 0:
        raise DataError("No examples to split: the label array is empty.")
    if groups is None:
        if split == "patient":
            raise DataError(
                'split="patient" needs the patient id of every example (groups); pass them, '
                'or use split="image".'
            )
        return labels, None
    groups = np.asarray(groups)
    if groups.shape != labels.shape:
        raise DataError(
            f"groups has shape {groups.shape} but labels has shape {labels.shape}; "
            "give one patient id per example."
        )
    return labels, groups


def _check_enough(
    labels: np.ndarray, groups: np.ndarray | None, num_folds: int, split: str
) -> None:
    """Raises DataError when some fold would lack a patient, a positive or a negative."""
    classes, counts = np.unique(labels, return_counts=True)
    if classes.size < 2:
        raise DataError(
            f"All {labels.size} examples have label {classes[0].item()!r}; stratified folds "
            "need both positives and negatives. Check the dataset's labels."
        )
    if split == "image":
        # np.unique gives as many counts as classes, so strict= cannot matter
        for cls, count in zip(classes, counts, strict=True):  # pragma: no mutate
            if count < num_folds:
                raise DataError(
                    f"Only {count} examples with label {cls.item()!r} for {num_folds} folds: "
                    "every fold needs at least one. Use fewer folds (--num_folds) or more data."
                )
        return
    assert groups is not None
    num_patients = np.unique(groups).size
    if num_patients < num_folds:
        raise DataError(
            f"Only {num_patients} patients for {num_folds} folds: patient-grouped folds need at "
            'least one patient per fold. Use fewer folds (--num_folds) or split="image".'
        )
    for cls in classes:
        patients = np.unique(groups[labels == cls]).size
        if patients < num_folds:
            raise DataError(
                f"Only {patients} patients have examples with label {cls.item()!r} for {num_folds} "
                "folds: every fold needs at least one. Use fewer folds (--num_folds) or "
                'split="image".'
            )


def assign_folds(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str] | np.ndarray | None,
    *,
    num_folds: int = 5,
    split: str = "patient",
    seed: int = 0,
) -> np.ndarray:
    """Assigns every example to one of ``num_folds`` test folds.

    Args:
      labels: ``(n,)`` class labels (0/1), used for stratification.
      groups: ``(n,)`` patient ids; required for ``split="patient"``, ignored for ``"image"``.
      num_folds: K, at least 3.
      split: ``"patient"`` (StratifiedGroupKFold) or ``"image"`` (StratifiedKFold).
      seed: ``random_state`` of the shuffled splitter.

    Returns:
      ``(n,)`` int64 array with the fold (0..K-1) in which each example is the test set.
    """
    labels, groups = _check_inputs(np.asarray(labels), groups, num_folds, split)
    _check_enough(labels, groups, num_folds, split)
    n = labels.size
    placeholder = np.zeros((n, 1))  # pragma: no mutate (the splitters ignore X but its length)
    if split == "patient":
        splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
        folds = splitter.split(placeholder, labels, groups)
    else:
        splitter = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
        folds = splitter.split(placeholder, labels)
    # a sentinel every fold overwrites (checked below), in numpy 2's default int64
    assignment = np.full(n, -1, dtype=np.int64)  # pragma: no mutate
    for fold, (_, test_index) in enumerate(folds):
        if test_index.size == 0:
            raise DataError(
                f"Fold {fold} of {num_folds} came out empty; the data has too few patients for "
                "this many folds. Use fewer folds (--num_folds)."
            )
        assignment[test_index] = fold
    assert (assignment >= 0).all()
    return assignment


def make_split(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str] | np.ndarray | None,
    *,
    num_folds: int = 5,
    fold: int = 0,
    split: str = "patient",
    seed: int = 0,
    subsets: Sequence[str] | np.ndarray | None = None,
) -> Split:
    """The train / validation / test split of one fold (paper, Sec. 3: 5-fold cross-validation).

    Fold ``fold`` is the test set, fold ``(fold + 1) % num_folds`` the validation set, the other
    folds the training set. Stratified by label; grouped by patient unless ``split="image"``.

    Args:
      labels: ``(n,)`` 0/1 labels.
      groups: ``(n,)`` patient ids (may be None for ``split="image"``).
      num_folds: K (the paper: 5).
      fold: which fold is the test set, in ``[0, num_folds)``.
      split: ``"patient"``, ``"image"`` or ``"official"`` (the collection's own test set; the
        validation set is fold ``fold`` of a patient-grouped split of its training set).
      seed: seed of the shuffled fold assignment; the same seed gives the same split.
      subsets: for ``split="official"``, ``(n,)`` "train" or "test" per example.

    Returns:
      A ``Split`` of sorted int64 index arrays.

    Raises:
      DataError: bad arguments, or fewer patients / positives / negatives than folds; for
        ``"official"``, examples without an official subset.
    """
    if not isinstance(fold, int | np.integer) or not 0 <= fold < num_folds:
        raise DataError(f"fold={fold!r} is out of range; use 0 <= fold < num_folds={num_folds}.")
    if split == "official":
        return _official_split(labels, groups, subsets, num_folds=num_folds, fold=fold, seed=seed)
    assignment = assign_folds(labels, groups, num_folds=num_folds, split=split, seed=seed)
    validation_fold = (fold + 1) % num_folds
    index = np.arange(assignment.size, dtype=np.int64)  # pragma: no mutate (numpy 2: int64)
    test = index[assignment == fold]
    validation = index[assignment == validation_fold]
    train = index[(assignment != fold) & (assignment != validation_fold)]
    return Split(train=train, validation=validation, test=test)


def _official_split(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str] | np.ndarray | None,
    subsets: Sequence[str] | np.ndarray | None,
    *,
    num_folds: int,
    fold: int,
    seed: int,
) -> Split:
    """The collection's test set; validation: fold ``fold`` of its training set's folds."""
    labels = np.asarray(labels)
    subsets = np.asarray(subsets)  # None gives a 0-d array: refused here with the rest
    if subsets.shape != labels.shape or not np.isin(subsets, ("train", "test")).all():
        raise DataError(
            'split="official" needs the collection\'s own train/test split, and this dataset has '
            'none (only CBIS-DDSM and VinDr-Mammo have one). Use split="patient" (--split).'
        )
    index = np.arange(labels.size, dtype=np.int64)  # pragma: no mutate (numpy 2: int64)
    test = index[subsets == "test"]
    official_train = index[subsets == "train"]
    if test.size == 0 or official_train.size == 0:
        raise DataError(
            f"The official split has {official_train.size} training and {test.size} test "
            'examples; both are needed. Use split="patient" (--split).'
        )
    if groups is not None:
        groups = np.asarray(groups)
        both = np.intersect1d(groups[test], groups[official_train])
        if both.size:
            logging.warning(
                "The official split puts %d patient(s) in both its training and its test set "
                "(e.g. %s); their test images are not independent of training.",
                both.size,
                ", ".join(map(str, both[:3])),
            )
    train_groups = None if groups is None else groups[official_train]
    assignment = assign_folds(
        labels[official_train],
        train_groups,
        num_folds=num_folds,
        split="image" if groups is None else "patient",
        seed=seed,
    )
    validation = official_train[assignment == fold]
    train = official_train[assignment != fold]
    return Split(train=train, validation=validation, test=test)


def write_split(
    split: Split,
    file_ids: Sequence[str] | np.ndarray,
    path: str | Path,
    *,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Writes the fold membership as JSON: ``{"train": [file ids], "validation": [...],
    "test": [...], "counts": {...}, **metadata}``.

    Args:
      split: the split to record.
      file_ids: ``(n,)`` file id of every example (the index space of ``split``).
      path: JSON file to write (parent folders are created).
      metadata: extra JSON-serialisable entries (e.g. fold, num_folds, split mode, seed).

    Returns:
      The path written.
    """
    file_ids = np.asarray(file_ids)
    n = file_ids.shape[0]
    payload: dict[str, object] = {}
    for name in ("train", "validation", "test"):
        part = np.asarray(getattr(split, name))
        if part.size and (part.min() < 0 or part.max() >= n):
            raise DataError(
                f"The split's {name} indices go up to {int(part.max())} but only {n} file ids "
                "were given; pass the file ids of the examples the split was made for."
            )
        payload[name] = [str(file_ids[i]) for i in part]
    payload["counts"] = {name: len(payload[name]) for name in ("train", "validation", "test")}
    if metadata:
        payload.update({str(k): v for k, v in metadata.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
