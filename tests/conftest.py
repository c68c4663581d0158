"""Settings and helpers that several test modules share."""

from pathlib import Path

import jax
import numpy as np

from deepmil_jax import config as config_module

ROOT = Path(__file__).resolve().parents[1]

# A small, fast configuration: 99x99 images give a 2x2 grid of instances.
SMALL = config_module.Config(
    scheme="label_assign",
    k=1,
    image_size=99,
    batch_size=8,
    eval_batch_size=16,
    epochs=2,
    synthetic_images=48,
    num_folds=3,
    learning_rate=1e-4,
    seed=1,
)


def _fake_run(run_dir: Path, auc: float, localisation: dict | None) -> dict:
    test = {"auc": auc, "accuracy": 0.5, "sensitivity": 0.5, "specificity": 0.5, "threshold": 0.5}
    return {"run_dir": str(run_dir), "test": {**test, **(localisation or {})}}


def _params(state) -> dict[str, np.ndarray]:
    """A state's parameters as numpy arrays, keyed by their path in the tree."""
    return {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(state["params"])
    }
