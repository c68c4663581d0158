"""The instance grid a model gives at an image size, from shapes alone (nothing is computed)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from deepmil_jax.models.mil import build_model


@functools.cache
def grid_shape(
    scheme: str, backbone: str, image_size: int, head_hidden: tuple[int, ...] = ()
) -> tuple[int, int]:
    """(h', w') of the ``(N, h', w')`` instance logits of ``scheme``'s model on square images of
    ``image_size`` pixels; (0, 0) when the image is too small for the backbone. Cached: each
    program asks it for every scheme and fold it validates."""
    abstract = nnx.eval_shape(
        lambda: build_model(scheme, backbone=backbone, head_hidden=head_hidden, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    try:
        out = jax.eval_shape(
            lambda s, x: nnx.merge(graphdef, s)(x),
            state,
            jax.ShapeDtypeStruct((1, image_size, image_size, 1), jnp.float32),
        )
    except (ValueError, TypeError, IndexError):  # a feature map shrank to nothing
        return 0, 0
    return int(out.shape[1]), int(out.shape[2])
