"""What every loss shares: the shape checks and flattening to (N, m), the valid-instance counts,
the descending sort, the cross-entropy, and the label assignment of Eq. 5-6 given each image's k.
Conventions (logit space, the mask, the batch mean): ``deepmil_jax.losses``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


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


def _bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise binary cross-entropy -[t log sigmoid(z) + (1 - t) log sigmoid(-z)] (optax's,
    which works in log-sigmoid space, so logits of +-1e4 stay finite)."""
    return optax.losses.sigmoid_binary_cross_entropy(logits, targets)


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
