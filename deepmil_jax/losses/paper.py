"""The losses of Zhu et al., MICCAI 2017: deep MIL with max pooling (Eq. 4), with label
assignment (Eq. 5-6) and sparse deep MIL (Eq. 7), each without the lambda term; the weight-decay
term itself (``l2_penalty``); and the paper's k as a count per image (``num_top_instances``).
Conventions (logit space, the mask, the batch mean): ``deepmil_jax.losses``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from deepmil_jax.losses._shared import _assign_top, _bce, _flatten, _sorted_desc, _valid_counts
from deepmil_jax.losses.adaptive import _AUTO_METHODS, AUTO_K, adaptive_label_assign_loss


def num_top_instances(k: int | float, counts: jax.Array, m: int) -> jax.Array:
    """The k of the paper per bag: an int k, or ceil(k * valid count) for a fraction k in (0, 1).

    Args:
      k: positive int (at most m), or a float in (0, 1): that fraction of each bag's valid
        instances, rounded up, and at least 1 (GMIC's top-t% pooling is the same idea but
        rounds to the nearest count).
      counts: (N,) int, valid instances per bag.
      m: the static number of instance slots per bag.

    Returns:
      (N,) int32, never more than a bag's valid count.
    """
    if isinstance(k, bool) or not isinstance(k, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"k must be a positive int, a float in (0, 1) or one of {AUTO_K}; got {k!r}."
        )
    if isinstance(k, (int, np.integer)):
        if k < 1:
            raise ValueError(f"k must be at least 1; got {k}.")
        if k > m:
            raise ValueError(
                f"k={k} is larger than the number of instances per bag m={m}; "
                f"choose k <= {m}, or a fraction in (0, 1)."
            )
        return jnp.minimum(jnp.int32(k), counts)
    if not 0.0 < k < 1.0:
        raise ValueError(
            f"a fractional k must lie in (0, 1); got {k}. Use an int for a count of instances."
        )
    # The small tolerance keeps exact products (0.1 * 30 = 3.0000000000000004) from rounding up.
    top = jnp.ceil(k * counts - 1e-4).astype(jnp.int32)  # a Python float k: float32 product
    return jnp.clip(top, 1, counts)


def max_pooling_loss(
    instance_logits: jax.Array, labels: jax.Array, *, mask: jax.Array | None = None
) -> jax.Array:
    """Deep MIL with max pooling, paper Eq. 4 without the lambda term.

    The bag probability is the largest instance probability p_n = max_j r_nj (Eq. 2-3); the loss is
    its cross-entropy against the image label, averaged over the N images:

        L = -1/N sum_n [ y_n log p_n + (1 - y_n) log(1 - p_n) ]

    Args:
      instance_logits: (N, m) or (N, H, W) float pre-sigmoid instance scores.
      labels: (N,) image labels, 0 or 1 (1 = malignant, BI-RADS >= 4).
      mask: optional bool of the logits' shape, False for padding instances.

    Returns:
      Scalar loss.

    Example:
      >>> z = jnp.array([[-2.0, 3.0], [-1.0, -4.0]])
      >>> float(max_pooling_loss(z, jnp.array([1, 0])))  # BCE of max logits 3 and -1
      0.18...
    """
    logits, labels, mask = _flatten(instance_logits, labels, mask)
    return jnp.mean(_bce(_sorted_desc(logits, mask)[:, 0], labels))


def label_assign_loss(
    instance_logits: jax.Array,
    labels: jax.Array,
    k: int | float,
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Deep MIL with label assignment, paper Eq. 5-6 without the lambda term.

    The instance scores of each image are sorted in decreasing order; the top ``k`` instances take
    the image label and the others are labelled negative (Eq. 5). The loss is the instance
    cross-entropy averaged over all valid instances of the batch (m * N without padding):

        L = -1/(mN) sum_n sum_j [ t_nj log r'_nj + (1 - t_nj) log(1 - r'_nj) ],
        t_nj = y_n if j <= k else 0,    r'_n = r_n sorted in decreasing order.

    Args:
      instance_logits: (N, m) or (N, H, W) float pre-sigmoid instance scores.
      labels: (N,) image labels, 0 or 1.
      k: positive int (the paper used k=6 of m=36 at 227x227), or a float in (0, 1): that fraction
        of each image's valid instances, rounded up. An int k larger than m is an error; with a
        mask, k is capped at each image's valid count. ``"auto"``, ``"auto_soft"`` or
        ``"auto_relative"``: k chosen per image by the model, ``adaptive_label_assign_loss``
        with ``method="extent"``, ``"soft"`` (its default temperature) or ``"relative"``.
      mask: optional bool of the logits' shape, False for padding instances.

    Returns:
      Scalar loss.

    Example:
      >>> z = jax.random.normal(jax.random.key(0), (8, 6, 6))  # 8 images, 6x6 patches
      >>> y = jnp.array([1, 0, 0, 1, 0, 0, 0, 1])
      >>> loss, grads = jax.value_and_grad(label_assign_loss)(z, y, 6)
    """
    if isinstance(k, str) and k in AUTO_K:
        method = _AUTO_METHODS[k]
        return adaptive_label_assign_loss(instance_logits, labels, method=method, mask=mask)
    logits, labels, mask = _flatten(instance_logits, labels, mask)
    counts = _valid_counts(logits, mask)
    top = num_top_instances(k, counts, logits.shape[1])
    return _assign_top(logits, labels, top, counts, mask)


def sparse_loss(
    instance_logits: jax.Array,
    labels: jax.Array,
    mu: float,
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Sparse deep MIL, paper Eq. 7 without the lambda term.

    Max-pooling cross-entropy plus an L1 penalty on the sorted instance probabilities of each
    image, which pushes all but a few instances towards 0 (masses are small):

        L = 1/N sum_n [ -y_n log r'_n1 - (1 - y_n) log(1 - r'_n1) + mu ||r'_n||_1 ]

    Args:
      instance_logits: (N, m) or (N, H, W) float pre-sigmoid instance scores.
      labels: (N,) image labels, 0 or 1.
      mu: weight of the sparsity term (the paper used 1e-5); mu=0 gives ``max_pooling_loss``.
      mask: optional bool of the logits' shape, False for padding instances.

    Returns:
      Scalar loss.

    Example:
      >>> z = jnp.zeros((2, 36))  # every r = 0.5
      >>> y = jnp.array([1, 0])
      >>> bool(jnp.isclose(sparse_loss(z, y, 0.1), max_pooling_loss(z, y) + 0.1 * 18))
      True
    """
    logits, labels, mask = _flatten(instance_logits, labels, mask)
    ranked = _sorted_desc(logits, mask)
    probabilities = jax.nn.sigmoid(ranked)  # sigmoid(-inf) = 0, so padding adds nothing
    l1 = jnp.sum(probabilities, axis=1)
    return jnp.mean(_bce(ranked[:, 0], labels) + mu * l1)


def l2_penalty(params) -> jax.Array:
    """The weight-decay term ||theta||^2 / 2 over every floating-point leaf of a pytree.

    Multiply by lambda (the paper: 1e-5; 5e-6 for sparse MIL) and add it to a loss for the paper's
    L2-in-the-loss, or use a decoupled decay such as ``optax.adamw`` instead. Select the leaves
    first (e.g. kernels only) if biases should not decay.

    Args:
      params: any pytree of arrays (e.g. ``nnx.state(model, nnx.Param)``).

    Returns:
      Scalar, in float32 at least.
    """
    leaves = [
        x for x in jax.tree.leaves(params) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
    ]
    if not leaves:
        return jnp.zeros((), jnp.float32)  # pragma: no mutate (dtype None is float32 too)
    # pragma: no mutate start (astype(None) is float32 too, JAX's default without x64)
    squares = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves]
    # pragma: no mutate end
    return 0.5 * sum(squares)
