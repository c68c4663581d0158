"""Batch norm with frozen (pretrained) statistics, shared by the EfficientNet-Lite and ResNet
backbones: batches of 8-32 mammograms give poor batch statistics, so every batch norm
normalises with its ImageNet running statistics, in training too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


class FrozenBatchNorm(nnx.Module):
    """Batch norm in inference form: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    ``mean`` and ``var`` are float32 ``nnx.BatchStat`` (the pretrained statistics; read, never
    written), ``scale`` and ``bias`` are ``nnx.Param`` (trainable). The per-channel factors are
    computed in float32 and the result is cast to ``dtype``, the compute dtype.
    """

    def __init__(self, features: int, *, eps: float, dtype: Any, param_dtype: Any):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """``(multiplier, offset)`` per channel, float32: ``y = x * multiplier + offset``."""
        mean = lax.stop_gradient(self.mean[...].astype(jnp.float32))
        var = lax.stop_gradient(self.var[...].astype(jnp.float32))
        mult = self.scale[...].astype(jnp.float32) * lax.rsqrt(var + self.eps)
        return mult, self.bias[...].astype(jnp.float32) - mean * mult

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` (a convolution's output, any dtype) -> compute dtype."""
        mult, offset = self.factors()
        return (x.astype(jnp.float32) * mult + offset).astype(self.dtype)

    def after(self, conv: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array) -> jax.Array:
        """``self(conv(x))`` for a convolution that takes a per-output-channel kernel multiplier
        (``conv(x, multiplier)``): the multiplier is folded into the kernel, so one elementwise
        pass over the (large) output fewer, forward and backward."""
        mult, offset = self.factors()
        return (conv(x, mult) + offset).astype(self.dtype)
