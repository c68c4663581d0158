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

This module imports only JAX, optax and numpy (numpy to check Python arguments), so it composes
with any JAX model code.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

Pooling = Literal["max", "mean", "topk_mean", "lse", "noisy_or"]
POOLINGS: tuple[str, ...] = ("max", "mean", "topk_mean", "lse", "noisy_or")
# k chosen per image by the model (``adaptive_label_assign_loss``): k="auto" assigns the hard top
# round(extent) instances, k="auto_soft" a soft top-extent membership (see ``soft_top_k``),
# k="auto_relative" the hard top round(extent relative to the image's most probable instance).
AUTO_K: tuple[str, ...] = ("auto", "auto_soft", "auto_relative")
_AUTO_METHODS = {
    "auto": "extent",
    "auto_soft": "soft",
    "auto_relative": "relative",
}

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


def _flatten(
    instance_logits: jax.Array, labels: jax.Array | None, mask: jax.Array | None
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Checks shapes at trace time and returns logits and mask flattened to (N, m)."""
    logits = jnp.asarray(instance_logits)
    if logits.ndim not in (2, 3):
        raise ValueError(
            f"instance_logits must be shaped (N, m) or (N, H, W); got shape {logits.shape}."
        )
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"instance_logits must be a float array; got dtype {logits.dtype}.")
    n = logits.shape[0]
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != logits.shape:
            raise ValueError(
                f"mask must have the shape of instance_logits {logits.shape}; got {mask.shape}."
            )
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be boolean (False = padding); got dtype {mask.dtype}.")
        mask = mask.reshape(n, -1)
    if labels is not None:
        labels = jnp.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(
                f"labels must be shaped (N,) = ({n},) to match instance_logits {logits.shape}; "
                f"got {labels.shape}."
            )
        if not isinstance(labels, jax.core.Tracer):
            values = np.unique(np.asarray(labels))
            if not np.all(np.isin(values, (0, 1))):
                raise ValueError(f"labels must be 0 or 1; got values {values.tolist()}.")
        # (not mutated: 0 and 1 are exact in any float, and optax casts targets to the logits')
        labels = labels.astype(logits.dtype)  # pragma: no mutate
    return logits.reshape(n, -1), labels, mask


def _valid_counts(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Number of valid instances per bag, (N,) int32."""
    # (not mutated: without x64, JAX's default integer is int32 anyway)
    if mask is None:
        return jnp.full(logits.shape[:1], logits.shape[1], jnp.int32)  # pragma: no mutate
    return mask.sum(axis=1, dtype=jnp.int32)  # pragma: no mutate (int32 is also the default)


def _sorted_desc(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Logits of each bag sorted in decreasing order; padding instances sort last as -inf."""
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    return -jnp.sort(-logits, axis=1)  # pragma: no mutate (logits are (N, m): axis -1 is 1)


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


def _bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise binary cross-entropy -[t log sigmoid(z) + (1 - t) log sigmoid(-z)] (optax's,
    which works in log-sigmoid space, so logits of +-1e4 stay finite)."""
    return optax.losses.sigmoid_binary_cross_entropy(logits, targets)


def _log_softplus(z: jax.Array) -> jax.Array:
    """log(log(1 + e^z)), finite for very negative z where softplus underflows (then ~ z)."""
    # pragma: no mutate start (near -20 both branches agree to 2e-9, below float32 resolution, so
    # moving the switch by 1 or to <= changes nothing; a wrong sign is caught by the noisy-OR test
    # test_noisy_or_with_only_very_unlikely_instances_matches_float64)
    safe = jnp.where(z < -20.0, 0.0, z)
    return jnp.where(z < -20.0, z, jnp.log(jax.nn.softplus(safe)))
    # pragma: no mutate end


def _noisy_or_logit(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """logit(1 - prod_j (1 - r_j)) in logit space.

    With t = -sum_j log(1 - r_j) = sum_j softplus(z_j), the bag probability is 1 - e^-t and its
    logit is log(1 - e^-t) + t. For small t, log(1 - e^-t) ~ log t - t/2 with log t computed as
    logsumexp_j log softplus(z_j), which stays finite when every z_j is very negative.
    """
    t = jnp.sum(jax.nn.softplus(logits), axis=1, where=mask)
    log_t = jax.nn.logsumexp(_log_softplus(logits), axis=1, where=mask)
    # pragma: no mutate start (equivalent: t == 1e-3 exactly takes either branch to 4e-8, and
    # t_safe is any positive value where it is not used)
    small = t < 1e-3
    t_safe = jnp.where(small, 1.0, t)
    # pragma: no mutate end
    return jnp.where(small, log_t - t / 2, jnp.log(-jnp.expm1(-t_safe))) + t


def _mean_probability_logit(logits: jax.Array, where: jax.Array | None) -> jax.Array:
    """logit of the mean of sigmoid(z_j) over the selected instances, in logit space."""
    log_p = jax.nn.logsumexp(jax.nn.log_sigmoid(logits), axis=1, where=where)
    log_q = jax.nn.logsumexp(jax.nn.log_sigmoid(-logits), axis=1, where=where)
    return log_p - log_q


def bag_logits(
    instance_logits: jax.Array,
    *,
    mask: jax.Array | None = None,
    pooling: Pooling = "max",
    k: int | float = 0.1,
    temperature: float = 1.0,
) -> jax.Array:
    """Bag (image) logits from instance logits: the MIL pooling.

    The paper's bag probability is the largest instance probability, p_i = max_j r_ij (Eq. 2-3),
    so ``pooling="max"`` (the default) returns max_j z_ij. The other poolings are there to compare
    MIL methods; each returns the logit of a bag probability, computed stably in logit space:

    - ``"mean"``: logit of mean_j r_ij;
    - ``"topk_mean"``: logit of the mean r over the top ``k`` instances (int, or fraction of valid
      instances rounded up; GMIC's top-t% rounds to the nearest);
    - ``"lse"``: log-sum-exp pooling (1/T) log(mean_j exp(T z_ij)) with ``temperature`` T > 0,
      which moves from mean (T -> 0) to max (T -> inf) of the logits;
    - ``"noisy_or"``: logit of 1 - prod_j (1 - r_ij).

    Args:
      instance_logits: (N, m) or (N, H, W) float pre-sigmoid instance scores.
      mask: optional bool of the same shape, False for padding instances.
      pooling: one of ``POOLINGS``.
      k: for ``"topk_mean"`` only.
      temperature: for ``"lse"`` only: a positive Python number, or a JAX scalar (e.g. a learned
        ``exp(log_temperature)``, whose sign is then the caller's to guarantee).

    Returns:
      (N,) bag logits; ``jax.nn.sigmoid`` of them gives bag probabilities.

    Example:
      >>> z = jnp.array([[0.0, 2.0, -1.0]])
      >>> bag_logits(z)
      Array([2.], dtype=float32)
    """
    logits, _, mask = _flatten(instance_logits, None, mask)
    if pooling == "max":
        return _sorted_desc(logits, mask)[:, 0]
    if pooling == "mean":
        return _mean_probability_logit(logits, mask)
    if pooling == "topk_mean":
        top = num_top_instances(k, _valid_counts(logits, mask), logits.shape[1])
        ranked = _sorted_desc(logits, mask)
        in_top = jnp.arange(logits.shape[1])[None, :] < top[:, None]
        # any finite stand-in outside the top k works: _mean_probability_logit skips it
        return _mean_probability_logit(jnp.where(in_top, ranked, 0.0), in_top)  # pragma: no mutate
    if pooling == "lse":
        if isinstance(temperature, (int, float, np.number)) and not temperature > 0:
            raise ValueError(f"temperature must be positive; got {temperature}.")
        counts = _valid_counts(logits, mask).astype(logits.dtype)
        lse = jax.nn.logsumexp(temperature * logits, axis=1, where=mask)
        return (lse - jnp.log(counts)) / temperature
    if pooling == "noisy_or":
        return _noisy_or_logit(logits, mask)
    raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}.")


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


def _assign_top(
    logits: jax.Array, labels: jax.Array, top: jax.Array, counts: jax.Array, mask
) -> jax.Array:
    """Eq. 5-6 on flattened (N, m) logits with ``top`` (N,) int instances per image assigned
    the image label; the mean instance cross-entropy over the valid instances."""
    ranked = _sorted_desc(logits, mask)
    rank = jnp.arange(logits.shape[1])[None, :]
    targets = jnp.where(rank < top[:, None], labels[:, None], 0.0)
    valid = rank < counts[:, None]
    # any finite stand-in for the -inf padding works: its loss is dropped below
    per_instance = _bce(jnp.where(valid, ranked, 0.0), targets)  # pragma: no mutate
    return jnp.sum(jnp.where(valid, per_instance, 0.0)) / jnp.sum(counts)


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


# ---------------------------------------------------------------------------------------------
# k chosen per image (the paper's open problem: "an adaptive way to estimate the hyper-parameter k")


def extent_k(instance_logits: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """The model's own estimate of how many instances of each image are malignant.

    The expected number of positive instances under the instance probabilities,
    K_n = sum_j sigmoid(z_nj) over the valid instances, clipped to [1, m_n] (m_n: the image's
    valid count), with no gradient (it chooses labels; it is not a path for learning).

    Args:
      instance_logits: (N, m) or (N, H, W) float pre-sigmoid instance scores.
      mask: optional bool of the logits' shape, False for padding instances.

    Returns:
      (N,) real-valued counts in [1, m_n], float32 (float64 for float64 logits).

    Example:
      >>> extent_k(jnp.array([[0.0, 0.0, 10.0, -10.0]]))  # 0.5 + 0.5 + ~1 + ~0
      Array([2.], dtype=float32)
    """
    logits, _, mask = _flatten(instance_logits, None, mask)
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    # pragma: no mutate start (a sum of m_n probabilities never exceeds m_n: the clip's upper
    # bound never binds; its lower bound, the dtype and the missing gradient are tested)
    counts = _valid_counts(logits, mask).astype(dtype)
    # pragma: no mutate end
    probabilities = jax.nn.sigmoid(logits.astype(dtype))
    total = jnp.sum(probabilities, axis=1, where=mask)
    return jax.lax.stop_gradient(jnp.clip(total, 1.0, counts))  # pragma: no mutate


def relative_extent_k(instance_logits: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """The number of instances as probable as the image's most probable one.

    K_n = sum_j r_nj / max_j r_nj over the valid instances (r = sigmoid(z)), clipped to
    [1, m_n], without gradient. Unlike ``extent_k`` it does not depend on the overall level of
    the probabilities, only on how they compare with the top one: an image whose instances are
    all alike counts all of them (K = m_n, as at initialisation), one with a single instance far
    above the rest counts one. Computed as sum_j exp(log r_nj - log r_n,top), so finite however
    small every probability is.

    Args:
      instance_logits: (N, m) or (N, H, W) float pre-sigmoid instance scores.
      mask: optional bool of the logits' shape, False for padding instances.

    Returns:
      (N,) real-valued counts in [1, m_n], float32 (float64 for float64 logits).

    Example:
      >>> z = jnp.array([[0.0, 0.0, -40.0, -40.0]])  # 0.5 / 0.5 + 0.5 / 0.5 + ~0 + ~0
      >>> relative_extent_k(z)
      Array([2.], dtype=float32)
    """
    logits, _, mask = _flatten(instance_logits, None, mask)
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    # pragma: no mutate start (the top term is exp(0) = 1 and none exceeds 1, so the sum lies in
    # [1, m_n] and the clip never binds; its lower bound, dtype and missing gradient are tested)
    counts = _valid_counts(logits, mask).astype(dtype)
    # pragma: no mutate end
    log_r = jax.nn.log_sigmoid(logits.astype(dtype))
    top = jnp.max(log_r, axis=1, keepdims=True, where=mask, initial=-jnp.inf)
    total = jnp.sum(jnp.exp(log_r - top), axis=1, where=mask)
    return jax.lax.stop_gradient(jnp.clip(total, 1.0, counts))  # pragma: no mutate


def soft_top_k(
    instance_logits: jax.Array,
    k: float | jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    mask: jax.Array | None = None,
    iterations: int = 60,  # pragma: no mutate (61 halvings give the same float32 threshold)
) -> jax.Array:
    """Soft top-k membership: s_j = sigmoid((z_j - tau) / T) with tau chosen so that sum_j s_j = k.

    A relaxation of the top-k indicator of label assignment (Eq. 5): as the temperature T -> 0
    it tends to 1 on the k largest logits and 0 elsewhere (for an integer k and distinct logits);
    a fractional k gives the boundary instance the fraction. The threshold tau of each bag is
    found by bisection (``iterations`` halvings of a bracket around the logits: the sum is
    decreasing in tau), and differentiated implicitly: d tau / d z_j = s'_j / sum_i s'_i, with
    s' the sigmoid's derivative, so gradients flow to the logits, to k and to T without
    unrolling the search. (ott-jax's ``soft_sort.top_k`` solves a regularised optimal transport
    instead; this threshold form is exact in its sum, costs O(m) per halving, and needs no
    dependency beyond JAX.)

    Args:
      instance_logits: (N, m) or (N, H, W) float pre-sigmoid instance scores.
      k: scalar or (N,) real count per bag, in (0, m_n] (m_n: the bag's valid instances).
      temperature: T > 0 in logit units (scalar; may be a traced, learned value).
      mask: optional bool of the logits' shape, False for padding instances (membership 0).
      iterations: bisection halvings (60 reach float32 resolution for logits of +-1e4).

    Returns:
      Memberships in [0, 1] of the logits' shape, summing to k over each bag; float32 (float64
      for float64 logits).

    Example:
      >>> s = soft_top_k(jnp.array([[3.0, -1.0, 2.0, 0.0]]), 2, temperature=1e-3)
      >>> s.round(3)
      Array([[1., 0., 1., 0.]], dtype=float32)
    """
    shape = jnp.shape(instance_logits)
    logits, _, mask = _flatten(instance_logits, None, mask)
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    z = logits.astype(dtype)
    n, m = z.shape
    valid = jnp.ones(z.shape, bool) if mask is None else mask  # pragma: no mutate (1.0: True)
    k = jnp.broadcast_to(jnp.asarray(k, dtype), (n,))
    t = jnp.asarray(temperature, dtype)

    z0, k0, t0 = jax.lax.stop_gradient((z, k, t))
    # at tau = max z + margin every membership is below sigmoid(-log m - 20): the sum is < k;
    # at tau = min z - margin every one is above 1 - e^-20 / m: the sum is about the count >= k
    margin = t0 * (float(np.log(m)) + 20.0)  # pragma: no mutate (any wider bracket converges alike)
    lo = jnp.min(jnp.where(valid, z0, jnp.inf), axis=1) - margin
    hi = jnp.max(jnp.where(valid, z0, -jnp.inf), axis=1) + margin

    def total(tau, zz, tt):
        return jnp.sum(jnp.where(valid, jax.nn.sigmoid((zz - tau[:, None]) / tt), 0.0), axis=1)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        # more than k inside: the threshold must rise (not mutated: a sum exactly k may go either
        # way, to a float32 threshold as good)
        too_low = total(mid, z0, t0) > k0  # pragma: no mutate
        return jnp.where(too_low, mid, lo), jnp.where(too_low, hi, mid)

    # (not mutated: 59 halvings reach float32 resolution too, about 25 do for logits of +-1e4)
    lo, hi = jax.lax.fori_loop(0, iterations, halve, (lo, hi))  # pragma: no mutate
    tau0 = (lo + hi) / 2
    # Implicit differentiation in one Newton step from the solution: its value adds nothing
    # (it is subtracted again), its derivative is -(d residual) / (d residual / d tau).
    u0 = (z0 - tau0[:, None]) / t0
    slope = jnp.sum(
        jnp.where(valid, jnp.exp(jax.nn.log_sigmoid(u0) + jax.nn.log_sigmoid(-u0)), 0.0), axis=1
    )
    residual = total(tau0, z, t) - k
    step = t0 * residual / jnp.maximum(slope, 1e-30)
    tau = tau0 + (step - jax.lax.stop_gradient(step))
    safe = jnp.where(valid, z, 0.0)  # pragma: no mutate (any stand-in: no gradient through padding)
    member = jnp.where(valid, jax.nn.sigmoid((safe - tau[:, None]) / t), 0.0)
    return member.reshape(shape)


def adaptive_label_assign_loss(
    instance_logits: jax.Array,
    labels: jax.Array,
    *,
    method: Literal["extent", "soft", "relative"] = "extent",
    temperature: float = 0.25,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Label assignment (Eq. 5-6) with k chosen per image by the model: ``--k=auto``.

    The paper fixes one k for every mammogram and names the choice of k its open problem; here
    each image's k is the model's own estimate of the malignant extent, K_n = ``extent_k`` (the
    sum of its instance probabilities, clipped to [1, m_n], without gradient), or
    ``relative_extent_k``. Three assignments:

    - ``method="extent"`` (``--k=auto``): the top round(K_n) instances take the image label and
      the rest are negative, exactly Eq. 5 with a per-image k;
    - ``method="soft"`` (``--k=auto_soft``): instance j takes the target y_n s_nj with s_n =
      ``soft_top_k(z_n, K_n, temperature)``, a soft top-K membership summing to K_n (a
      sharpened copy of the instance probabilities with the same total); it tends to the hard
      assignment as ``temperature`` -> 0 (at T = 1 the targets would equal the probabilities);
    - ``method="relative"`` (``--k=auto_relative``): as ``"extent"`` with K_n =
      ``relative_extent_k``, the instances as probable as the image's top one, so that k starts
      at m (every instance alike) and shrinks as the top instances stand out, whatever the
      level of the background probability.

    As in Eq. 5, the assignment is a label: no gradient flows through it. Negative images are
    unaffected (every target is 0). The loss is the instance cross-entropy averaged over the
    valid instances of the batch, as ``label_assign_loss``.

    Args:
      instance_logits: (N, m) or (N, H, W) float pre-sigmoid instance scores.
      labels: (N,) image labels, 0 or 1.
      method: ``"extent"``, ``"soft"`` or ``"relative"``.
      temperature: for ``"soft"``: T > 0 of the soft top-k, in logit units.
      mask: optional bool of the logits' shape, False for padding instances.

    Returns:
      Scalar loss.

    Example:
      >>> z = jnp.array([[4.0, 3.0, -5.0, -6.0]])  # extent 0.98 + 0.95 + ~0 = 1.94 -> k = 2
      >>> bool(jnp.isclose(adaptive_label_assign_loss(z, jnp.array([1])),
      ...                  label_assign_loss(z, jnp.array([1]), 2)))
      True
    """
    if method not in _AUTO_METHODS.values():
        raise ValueError(f"method must be one of {tuple(_AUTO_METHODS.values())}; got {method!r}.")
    if isinstance(temperature, (int, float, np.number)) and not temperature > 0:
        raise ValueError(f"temperature must be positive; got {temperature}.")
    logits, labels, mask = _flatten(instance_logits, labels, mask)
    counts = _valid_counts(logits, mask)
    if method == "relative":
        extent = relative_extent_k(logits, mask=mask)
    else:
        extent = extent_k(logits, mask=mask)
    if method != "soft":
        # (not mutated: extent is in [1, m_n] already, and an int or a float top ranks alike)
        top = jnp.clip(jnp.round(extent).astype(jnp.int32), 1, counts)  # pragma: no mutate
        return _assign_top(logits, labels, top, counts, mask)
    member = jax.lax.stop_gradient(soft_top_k(logits, extent, temperature=temperature, mask=mask))
    targets = labels[:, None] * member.astype(logits.dtype)  # pragma: no mutate (optax casts it)
    per_instance = _bce(logits, targets)
    return jnp.sum(per_instance, where=mask) / jnp.sum(counts)


# ---------------------------------------------------------------------------------------------
# Poolings with parameters (their parameters live in deepmil_jax.models), and the bag loss


def attention_pooling(
    instance_logits: jax.Array,
    attention_logits: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention MIL pooling (Ilse, Tomczak & Welling, ICML 2018, Eq. 8-9) of instance logits.

    a_nj = softmax_j(attention_logits_nj) over the valid instances, bag logit = sum_j a_nj z_nj.
    With a linear instance head (the paper's logistic regression) this equals Ilse et al.'s
    classifier applied to the attention-weighted embedding sum_j a_j h_j, since the weights sum
    to 1; the attention logits come from ``deepmil_jax.models.AttentionPooling`` (w^T tanh(V h),
    or the gated w^T (tanh(V h) * sigmoid(U h))).

    Args:
      instance_logits: (N, m) or (N, H, W) float pre-sigmoid instance scores.
      attention_logits: unnormalised attention scores of the same shape.
      mask: optional bool of the logits' shape, False for padding instances (weight 0).

    Returns:
      ``(bag_logits (N,), weights)``: weights of the logits' shape, summing to 1 over each bag;
      float32 (float64 for float64 logits), whatever the logits' or the scores' precision.
    """
    shape = jnp.shape(instance_logits)
    logits, _, mask = _flatten(instance_logits, None, mask)
    scores, _, _ = _flatten(attention_logits, None, None)
    if scores.shape != logits.shape:
        raise ValueError(
            f"attention_logits must have the shape of instance_logits {shape}; got "
            f"{jnp.shape(attention_logits)}."
        )
    valid = jnp.ones(logits.shape, bool) if mask is None else mask  # pragma: no mutate (1.0: True)
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    # pragma: no mutate start (any finite stand-in for padding: its weight is 0; dtype is tested)
    scores = jnp.where(valid, scores.astype(dtype), 0.0)
    # pragma: no mutate end
    top = jax.lax.stop_gradient(jnp.max(jnp.where(valid, scores, -jnp.inf), axis=1, keepdims=True))
    e = jnp.where(valid, jnp.exp(scores - top), 0.0)
    weights = e / jnp.sum(e, axis=1, keepdims=True)
    # pragma: no mutate start (any finite stand-in for padding: its weight is 0; dtype is tested)
    bag = jnp.sum(weights * jnp.where(valid, logits.astype(dtype), 0.0), axis=1)
    # pragma: no mutate end
    return bag, weights.reshape(shape)


def bag_loss(bag_logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy of bag logits against image labels, averaged over the N images (Eq. 4 for
    any pooling: ``max_pooling_loss(z, y) == bag_loss(bag_logits(z), y)``).

    Args:
      bag_logits: (N,) float bag logits (from ``bag_logits``, ``attention_pooling``, ...).
      labels: (N,) image labels, 0 or 1.

    Returns:
      Scalar loss.
    """
    z = jnp.asarray(bag_logits)
    if z.ndim != 1:
        raise ValueError(f"bag_logits must be shaped (N,); got shape {z.shape}.")
    _, labels, _ = _flatten(z[:, None], labels, None)
    return jnp.mean(_bce(z, labels))


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
