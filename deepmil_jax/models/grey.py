"""The grey fold the backbones share: a grey image ``g`` fed to all three input channels and
normalised per channel, ``y_c = (g * scale - mean_c) / std_c``, gives a first convolution of

    conv(y, W) = conv(g, sum_c W_c * scale / std_c) - conv(1_image, sum_c W_c * mean_c / std_c)

exactly, with the same zero padding (which, in the normalised space, cuts the second term at the
borders)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from deepmil_jax.architecture import Normalization


def grey_kernels(kernel: jax.Array, spec: Normalization) -> tuple[jax.Array, jax.Array]:
    """``(k_scale, k_mean)``, float32 ``(kh, kw, 1, out)``, from a first convolution's
    ``(kh, kw, 3, out)`` kernel: the two kernels of the identity above."""
    std = jnp.asarray(spec.std, jnp.float32)
    k = kernel.astype(jnp.float32)
    exact = lax.Precision.HIGHEST  # tiny contractions; keep them float32 on TPUs too
    k_scale = jnp.einsum("hwco,c->hwo", k, spec.scale / std, precision=exact)
    k_mean = jnp.einsum(
        "hwco,c->hwo", k, jnp.asarray(spec.mean, jnp.float32) / std, precision=exact
    )
    return k_scale[:, :, None, :], k_mean[:, :, None, :]


def with_offset_channel(
    images: jax.Array, kernel: jax.Array, spec: Normalization
) -> tuple[jax.Array, jax.Array]:
    """``(images_and_ones, kernel2)``: the grey ``images`` with a second channel of ones and the
    ``(kh, kw, 2, out)`` kernel ``[k_scale, -k_mean]``, so that one convolution of the two gives
    both terms. Computing the second term apart instead costs a batch-sum of the convolution's
    output gradient for its kernel (XLA's CPU reduce: about 0.1 s a step for EfficientNet-Lite0
    at 512x512, batch 8)."""
    k_scale, k_mean = grey_kernels(kernel, spec)
    return (
        jnp.concatenate([images, jnp.ones_like(images)], -1),
        jnp.concatenate([k_scale, -k_mean], 2),
    )
