"""Bag poolings: the paper's max pooling (Eq. 2-3) and the poolings to compare it with, as
``bag_logits``; attention pooling (its parameters live in ``deepmil_jax.models``); and the bag
cross-entropy ``bag_loss``. Conventions (logit space, the mask): ``deepmil_jax.losses``."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from deepmil_jax.losses._shared import _bce, _flatten, _sorted_desc, _valid_counts
from deepmil_jax.losses.paper import num_top_instances

Pooling = Literal["max", "mean", "topk_mean", "lse", "noisy_or"]
POOLINGS: tuple[str, ...] = ("max", "mean", "topk_mean", "lse", "noisy_or")


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
