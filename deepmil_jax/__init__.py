"""deepmil-jax: Deep Multi-instance Networks with Sparse Label Assignment (Zhu et al., MICCAI 2017).

The MIL losses are re-exported here (``dm.label_assign_loss``, ...); the models live in
``deepmil_jax.models`` and the programs users run are ``python -m deepmil_jax.train``,
``evaluate``, ``predict``, ``convert_weights`` and ``benchmark``. The losses are loaded on first
use, so that a program answers ``--help`` before JAX is imported.
"""

import os as _os

# TensorFlow (tf.data only; data_pipeline hides the GPUs from it) would log its own search for
# CUDA ("failed call to cuInit") at ERROR level when it is imported: its C++ log stays quiet
# unless the user sets the variable. Set here, before any module of the package imports JAX,
# which would set it to 1 (warnings and errors). Its Python errors are raised as usual.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__all__ = [
    "AUTO_K",
    "POOLINGS",
    "adaptive_label_assign_loss",
    "attention_pooling",
    "bag_logits",
    "bag_loss",
    "extent_k",
    "relative_extent_k",
    "l2_penalty",
    "label_assign_loss",
    "max_pooling_loss",
    "num_top_instances",
    "soft_top_k",
    "sparse_loss",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        from deepmil_jax import losses

        return getattr(losses, name)
    raise AttributeError(f"module 'deepmil_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
