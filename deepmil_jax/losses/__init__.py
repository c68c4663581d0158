"""Multi-instance losses and bag poolings of Zhu et al., MICCAI 2017, as pure JAX functions.

Every function takes *instance logits*: the pre-sigmoid malignancy scores z_ij of the m patches of
each of N images, shaped ``(N, m)`` or ``(N, H, W)`` (the feature-map grid; it is flattened to
m = H * W). The paper's instance probability is r_ij = sigmoid(z_ij). Because sigmoid is monotonic,
sorting logits orders the probabilities the same way, and all log-probabilities are computed with
``jax.nn.log_sigmoid``, so logits of +-1e4 give finite losses and gradients.

An optional boolean ``mask`` of the logits' shape marks padding instances False; they take no part
in sorting, in the loss or in the instance count m. Every bag must keep at least one valid instance.

The losses are averaged over the N images of the batch (the paper writes sums; the mean keeps the
learning rate independent of batch size). The weight-decay term lambda/2 ||theta||^2 of Eq. 4, 6
and 7 is separate: add ``lam * l2_penalty(params)``, or use decoupled decay in the optimiser.

This package imports only JAX, optax and numpy (numpy to check Python arguments), so it composes
with any JAX model code. Its modules:

- ``paper``: the paper's losses, max pooling (Eq. 4), label assignment (Eq. 6) and sparse MIL
  (Eq. 7), the top-k count ``num_top_instances`` and ``l2_penalty``;
- ``poolings``: bag poolings (``bag_logits``, ``attention_pooling``) and ``bag_loss``;
- ``adaptive``: k chosen per image by the model (``extent_k``, ``relative_extent_k``,
  ``soft_top_k``, ``adaptive_label_assign_loss``, ``AUTO_K``);
- ``_shared``: the shape checks, counts, sort and cross-entropy they all use.

Every public name is re-exported here: use ``losses.bag_logits``, not the module it lives in.
"""

from __future__ import annotations

# jax and jnp: the docstrings' examples use them (help() and the doctests read this namespace)
import jax  # noqa: F401
import jax.numpy as jnp  # noqa: F401

from deepmil_jax.losses.adaptive import (
    AUTO_K,
    adaptive_label_assign_loss,
    extent_k,
    relative_extent_k,
    soft_top_k,
)
from deepmil_jax.losses.paper import (
    l2_penalty,
    label_assign_loss,
    max_pooling_loss,
    num_top_instances,
    sparse_loss,
)
from deepmil_jax.losses.poolings import (
    POOLINGS,
    Pooling,  # noqa: F401 (the type of bag_logits' pooling argument)
    attention_pooling,
    bag_logits,
    bag_loss,
)

__all__ = [
    "AUTO_K",
    "POOLINGS",
    "adaptive_label_assign_loss",
    "attention_pooling",
    "bag_logits",
    "bag_loss",
    "extent_k",
    "label_assign_loss",
    "l2_penalty",
    "max_pooling_loss",
    "num_top_instances",
    "relative_extent_k",
    "soft_top_k",
    "sparse_loss",
]
