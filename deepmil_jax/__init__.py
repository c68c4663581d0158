"""deepmil-jax: Deep Multi-instance Networks with Sparse Label Assignment (Zhu et al., MICCAI 2017).

The MIL losses are re-exported here; the models live in ``deepmil_jax.models`` and the programs
users run are ``python -m deepmil_jax.train``, ``evaluate``, ``predict``, ``convert_weights`` and
``benchmark``.
"""

from deepmil_jax.losses import (
    POOLINGS,
    bag_logits,
    l2_penalty,
    label_assign_loss,
    max_pooling_loss,
    num_top_instances,
    sparse_loss,
)

__all__ = [
    "POOLINGS",
    "bag_logits",
    "l2_penalty",
    "label_assign_loss",
    "max_pooling_loss",
    "num_top_instances",
    "sparse_loss",
]
__version__ = "0.1.0"
