"""k chosen per image by the model, the paper's open problem ("an adaptive way to estimate the
hyper-parameter k"): the extents ``extent_k`` and ``relative_extent_k``, the soft top-k
membership ``soft_top_k`` and the label assignment that uses them, ``adaptive_label_assign_loss``
(``label_assign_loss`` with k in ``AUTO_K``)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from deepmil_jax.losses._shared import _assign_top, _bce, _flatten, _valid_counts

# k chosen per image by the model (``adaptive_label_assign_loss``): k="auto" assigns the hard top
# round(extent) instances, k="auto_soft" a soft top-extent membership (see ``soft_top_k``),
# k="auto_relative" the hard top round(extent relative to the image's most probable instance).
AUTO_K: tuple[str, ...] = ("auto", "auto_soft", "auto_relative")
_AUTO_METHODS = {
    "auto": "extent",
    "auto_soft": "soft",
    "auto_relative": "relative",
}


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
