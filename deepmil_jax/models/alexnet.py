"""AlexNet features in Flax NNX: the paper's Caffe/BVLC variant and torchvision's variant.

Both are fully convolutional and NHWC: a 227x227 input gives a 6x6x256 map, a larger one a larger
grid (about 454x454 gives 13x13), each cell one instance of the multi-instance network.

``caffe`` (Krizhevsky et al. 2012 as trained by BVLC, and the convnets-keras port the paper used)::

    conv1 11x11/4 96 relu -> [pool 3/2 -> LRN] -> conv2 5x5 pad 2 256 (2 groups) relu
    -> [pool 3/2 -> LRN] -> conv3 3x3 pad 1 384 relu -> conv4 3x3 pad 1 384 (2 groups) relu
    -> conv5 3x3 pad 1 256 (2 groups) relu -> pool 3/2

with the pooling/LRN pair in convnets-keras' order and constants (``lrn="keras"``, the default:
pool, then ``x / (2 + 1e-4 * sum_5 x^2) ** 0.75``) or in Caffe's (``lrn="caffe"``: LRN, then
pool, ``x / (1 + 1e-4 / 5 * sum_5 x^2) ** 0.75``) for the original BVLC weights.

``torchvision`` (``torchvision.models.alexnet().features``)::

    conv1 11x11/4 pad 2 64 relu -> pool 3/2 -> conv2 5x5 pad 2 192 relu -> pool 3/2
    -> conv3 3x3 pad 1 384 relu -> conv4 3x3 pad 1 256 relu -> conv5 3x3 pad 1 256 relu -> pool 3/2

(its adaptive average pooling only matters for the classifier: at 227 or 224 the map is 6x6).
Pooling is floor-mode ("VALID") as in Keras, TensorFlow and PyTorch; Caffe's ceil mode gives one
more row/column at sizes where a pooled map has an even size (never at 227, 291 or 454).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from deepmil_jax.architecture import (
    CONV_SPECS,
    DEFAULTS,
    LRN,
    LRNS,
    NORMALIZATIONS,
    Normalization,
    check_variant,
)
from deepmil_jax.errors import ConfigError, WeightsError
from deepmil_jax.models.grey import grey_kernels


def _normalization(kind: str) -> Normalization:
    if kind not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalization {kind!r}; choose one of {list(NORMALIZATIONS)}")
    return NORMALIZATIONS[kind]


def normalize(images: jax.Array, kind: str) -> jax.Array:
    """Normalise raw images on [0, 1] as the weights of ``kind`` expect.

    Args:
      images: ``(N, H, W, 3)`` RGB or ``(N, H, W, 1)`` grey, float on [0, 1].
      kind: ``"keras"`` (RGB x 255 minus (123.68, 116.779, 103.939)), ``"caffe"`` (channels
        reversed to BGR, x 255 minus (104.007, 116.669, 122.679)) or ``"torchvision"`` (RGB,
        ``(x - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)``).

    Returns:
      The same shape, float. For grey input the three channel means and stds are averaged, which
      is an approximation: a grey image fed three times would see a different mean per channel.
      ``AlexNet.forward_raw`` (used by ``DeepMIL``) instead folds the exact per-channel statistics
      into conv1, so use it rather than this function for grey images.
    """
    spec = _normalization(kind)
    x = jnp.asarray(images)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    if x.shape[-1] == 3:
        if spec.bgr:
            x = x[..., ::-1]
    elif x.shape[-1] == 1:
        mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    else:
        raise ConfigError(f"images must have 1 or 3 channels (N, H, W, C); got shape {x.shape}")
    return ((x * spec.scale - mean) / std).astype(x.dtype)


def _channel_window_sum(v: jax.Array, n: int) -> jax.Array:
    """``sum_{|c'-c| <= n//2} v[..., c']`` over the last axis, zero beyond the ends."""
    half, c = n // 2, v.shape[-1]
    padded = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(half, half)])
    window = padded[..., 0:c]
    for i in range(1, n):  # n shifted slices: XLA fuses them into one loop
        window = window + padded[..., i : i + c]
    return window


# The LRN's gradient is written by hand: with s = k + alpha * W(x^2) (W the channel window sum,
# which is its own transpose) and y = x * s^-beta,
#     dx = g * s^-beta - 2 * alpha * beta * x * W(g * x * s^-beta / s).
# Autodiff of the forward gives the same values but transposes the n shifted slices into n pads
# and recomputes the power in each, which is slower on CPU (see the README, "Benchmark").
@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _lrn(x: jax.Array, lrn: LRN) -> jax.Array:
    return _lrn_fwd(x, lrn)[0]


def _lrn_fwd(x: jax.Array, lrn: LRN) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    s = lrn.k + lrn.alpha * _channel_window_sum(jnp.square(x), lrn.n)
    t = s**-lrn.beta
    return x * t, (x, s, t)


def _lrn_bwd(lrn: LRN, res: tuple[jax.Array, ...], g: jax.Array) -> tuple[jax.Array]:
    x, s, t = res
    back = _channel_window_sum(g * x * t / s, lrn.n)
    return (g * t - (2 * lrn.alpha * lrn.beta) * x * back,)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


def local_response_norm(x: jax.Array, lrn: LRN) -> jax.Array:
    """Cross-channel LRN over the last axis of NHWC ``x`` (computed in float32)."""
    return _lrn(x.astype(jnp.float32), lrn).astype(x.dtype)


# How grouped convolutions are lowered: "auto" splits them into one convolution per group on CPU,
# where XLA's grouped convolution (its backward pass above all) is slower than convolutions on the
# halves, and uses feature_group_count elsewhere (cuDNN and TPUs handle groups natively). "native"
# or "split" force one way. The parameters are the same either way.
GROUPED_CONV = "auto"


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Any,
    padding: Any,
    *,
    feature_group_count: int = 1,
    dimension_numbers: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """``lax.conv_general_dilated`` that may compute a grouped convolution group by group."""
    split = GROUPED_CONV == "split" or (GROUPED_CONV == "auto" and jax.default_backend() == "cpu")
    if feature_group_count == 1 or not split:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            feature_group_count=feature_group_count,
            dimension_numbers=dimension_numbers,
            **kwargs,
        )
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    lhs_parts = jnp.split(lhs, feature_group_count, axis=dn.lhs_spec[1])
    rhs_parts = jnp.split(rhs, feature_group_count, axis=dn.rhs_spec[0])
    outs = [
        lax.conv_general_dilated(a, b, window_strides, padding, dimension_numbers=dn, **kwargs)
        for a, b in zip(lhs_parts, rhs_parts, strict=True)
    ]
    return jnp.concatenate(outs, axis=dn.out_spec[1])


# How max pooling is differentiated: "auto" uses the custom gradient below on CPU and XLA's own
# elsewhere; "custom" or "xla" force one way. Both give the same gradient (up to the order of
# float additions). XLA:CPU differentiates reduce_window(max) through a variadic reduce-window
# that records four iota index arrays, then a scatter-add, which is slow on CPU. The custom
# gradient compares each of the 9 taps of the 3x3/2 windows with the pooled value and adds the
# output gradient back with a strided pad; like XLA it gives each window's gradient to its first
# maximum in row-major order.
POOL_GRADIENT = "auto"


def _max_pool_xla(x: jax.Array) -> jax.Array:
    # a Python scalar init lets JAX recognise the max monoid (and differentiate it)
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


def _pool_tap(x: jax.Array, i: int, j: int, out_h: int, out_w: int) -> jax.Array:
    """``x[:, i::2, j::2, :]`` cut to the pooled size: tap (i, j) of every 3x3/2 window."""
    n, _, _, c = x.shape
    return lax.slice(x, (0, i, j, 0), (n, i + 2 * out_h - 1, j + 2 * out_w - 1, c), (1, 2, 2, 1))


@jax.custom_vjp
def _max_pool_custom(x: jax.Array) -> jax.Array:
    return _max_pool_xla(x)


def _max_pool_custom_fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    y = _max_pool_xla(x)
    return y, (x, y)


def _max_pool_custom_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
    x, y = res
    _, h, w, _ = x.shape
    out_h, out_w = y.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    taken = jnp.zeros(y.shape, jnp.bool_)
    dx = jnp.zeros(x.shape, g.dtype)
    for i in range(3):
        for j in range(3):
            hit = (_pool_tap(x, i, j, out_h, out_w) == y) & ~taken  # the first maximum wins
            taken = taken | hit
            # back to rows i, i + 2, ... and columns j, j + 2, ...: a pad with interior 1
            rows, cols = (i, h - i - 2 * out_h + 1, 1), (j, w - j - 2 * out_w + 1, 1)
            pads = ((0, 0, 0), rows, cols, (0, 0, 0))
            dx = dx + lax.pad(jnp.where(hit, g, zero), zero, pads)
    return (dx,)


_max_pool_custom.defvjp(_max_pool_custom_fwd, _max_pool_custom_bwd)


def max_pool(x: jax.Array) -> jax.Array:
    """3x3 max pooling with stride 2, no padding (floor mode), NHWC."""
    if POOL_GRADIENT not in ("auto", "custom", "xla"):
        raise ConfigError(f"POOL_GRADIENT must be auto, custom or xla; got {POOL_GRADIENT!r}")
    if POOL_GRADIENT == "custom" or (POOL_GRADIENT == "auto" and jax.default_backend() == "cpu"):
        return _max_pool_custom(x)
    return _max_pool_xla(x)


def copy_params(
    layer: nnx.Module, params: Mapping[str, Mapping[str, Any]], name: str, model: str
) -> None:
    """Set ``layer.kernel`` and ``layer.bias`` to ``params[name]``'s arrays (canonical layout).

    Raises WeightsError, naming the layer and the shape ``model`` needs, for a missing layer or
    array or a mis-shaped one; nothing is read from files here.
    """
    if name not in params:
        raise WeightsError(
            f"the pretrained weights have no layer {name!r} (found {sorted(params)}); "
            f"{model} needs it"
        )
    for kind in ("kernel", "bias"):
        var = getattr(layer, kind)
        value = params[name].get(kind)
        if value is None or tuple(np.shape(value)) != var.shape:
            got = "no array" if value is None else f"shape {tuple(np.shape(value))}"
            raise WeightsError(f"the pretrained {name} {kind} has {got}; {model} needs {var.shape}")
        var.set_value(jnp.asarray(value, dtype=var.dtype))


class AlexNet(nnx.Module):
    """AlexNet convolutional features.

    Calling it maps *normalised* images ``(N, H, W, 3)`` (channels in the weights' order) or
    ``(N, H, W, 1)`` to the map after the last pooling, ``(N, h, w, 256)``. A one-channel image is
    treated as that image fed in all three channels, computed with conv1's kernel summed over
    its input channels (exactly equal, a third of conv1's work). ``forward_raw`` takes raw images
    on [0, 1] and applies ``self.normalization`` itself.

    Attributes:
      variant: ``"caffe"`` or ``"torchvision"``.
      lrn: ``"keras"``, ``"caffe"`` (see ``LRNS``) or None (torchvision).
      normalization: the input normalisation the weights expect (a key of ``NORMALIZATIONS``).
    """

    def __init__(
        self,
        variant: str = "caffe",
        *,
        lrn: str | None = None,
        normalization: str | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_variant(variant)
        default_lrn, default_norm = DEFAULTS[variant]
        lrn = lrn if lrn is not None else default_lrn
        if variant == "torchvision" and lrn is not None:
            raise ConfigError("the torchvision AlexNet has no LRN; leave lrn=None")
        if lrn is not None and lrn not in LRNS:
            raise ConfigError(f"unknown lrn {lrn!r}; choose one of {list(LRNS)}")
        normalization = normalization or default_norm
        _normalization(normalization)
        self.variant = variant
        self.lrn = lrn
        self.normalization = normalization
        self.dtype = dtype
        self.out_features = CONV_SPECS[variant][-1].out_features
        for s in CONV_SPECS[variant]:
            conv = nnx.Conv(
                s.in_features,
                s.out_features,
                (s.kernel, s.kernel),
                strides=(s.stride, s.stride),
                padding=((s.padding, s.padding), (s.padding, s.padding)),
                feature_group_count=s.groups,
                dtype=dtype,
                param_dtype=param_dtype,
                conv_general_dilated=conv_general_dilated,
                rngs=rngs,
            )
            setattr(self, s.name, conv)

    # -- pretrained weights ------------------------------------------------------------------

    @classmethod
    def from_converted(
        cls,
        params: Mapping[str, Mapping[str, Any]],
        metadata: Mapping[str, Any],
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
    ) -> AlexNet:
        """The AlexNet named in ``metadata`` (variant, LRN, normalisation) holding ``params``.

        ``(params, metadata)`` is what ``deepmil_jax.weights.load_converted`` returns. Every
        parameter comes from ``params``, so the model is built abstractly (no random
        initialisation is computed) and then filled.
        """
        model = nnx.eval_shape(
            lambda: cls(
                metadata["variant"],
                lrn=metadata.get("lrn"),
                normalization=metadata["normalization"],
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=nnx.Rngs(0),
            )
        )
        model.load_params(params)
        return model

    def load_params(self, params: Mapping[str, Mapping[str, Any]]) -> None:
        """Copy canonical ``{"conv1": {"kernel", "bias"}, ...}`` arrays into the convolutions."""
        for s in CONV_SPECS[self.variant]:
            copy_params(getattr(self, s.name), params, s.name, f"the {self.variant} AlexNet")

    # -- forward -------------------------------------------------------------------------------

    def _conv(self, x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
        return lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (stride, stride),
            ((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    def _pool_stage(self, x: jax.Array) -> jax.Array:
        if self.lrn is None:
            return max_pool(x)
        lrn = LRNS[self.lrn]
        if lrn.before_pool:
            return max_pool(local_response_norm(x, lrn))
        return local_response_norm(max_pool(x), lrn)

    def _after_conv1(self, y: jax.Array) -> jax.Array:
        x = self._pool_stage(nnx.relu(y))
        x = self._pool_stage(nnx.relu(self.conv2(x)))
        x = nnx.relu(self.conv3(x))
        x = nnx.relu(self.conv4(x))
        x = nnx.relu(self.conv5(x))
        return max_pool(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalised ``(N, H, W, 3)`` or grey ``(N, H, W, 1)`` -> features ``(N, h, w, C)``."""
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ConfigError(f"AlexNet expects (N, H, W, 3) or (N, H, W, 1); got {x.shape}")
        if x.shape[-1] == 3:
            return self._after_conv1(self.conv1(x))
        s = CONV_SPECS[self.variant][0]
        kernel = self.conv1.kernel[...].sum(axis=2, keepdims=True)  # fold the 3 input channels
        y = self._conv(x, kernel, s.stride, s.padding) + self.conv1.bias[...].astype(self.dtype)
        return self._after_conv1(y)

    def forward_raw(self, images: jax.Array) -> jax.Array:
        """Raw images on [0, 1] -> features, applying ``self.normalization`` exactly.

        RGB ``(N, H, W, 3)`` goes through :func:`normalize`. Grey ``(N, H, W, 1)`` gives exactly
        what the grey image repeated in three channels and normalised per channel gives: with
        ``y_c = (g * scale - mean_c) / std_c``, conv1 of ``y`` is
        ``conv(g, sum_c W_c * scale / std_c) - conv(1_image, sum_c W_c * mean_c / std_c)``. The
        second term depends only on the image size (conv1's zero padding, in the normalised
        space, cuts it at the borders), so it is computed once for a single ones image; with no
        padding (the caffe variant) it is a constant per output channel, folded into the bias.
        """
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ConfigError(f"images must be (N, H, W, 1) or (N, H, W, 3); got {images.shape}")
        if images.shape[-1] == 3:
            return self(normalize(images, self.normalization))
        spec = _normalization(self.normalization)
        s = CONV_SPECS[self.variant][0]
        k_scale, k_mean = grey_kernels(self.conv1.kernel[...], spec)
        bias = self.conv1.bias[...].astype(jnp.float32)
        if s.padding == 0:
            offset = bias - k_mean.sum(axis=(0, 1, 2))  # (out,)
        else:
            ones = jnp.ones((1, *images.shape[1:3], 1), jnp.float32)
            offset = bias - lax.conv_general_dilated(
                ones,
                k_mean,
                (s.stride, s.stride),
                ((s.padding, s.padding), (s.padding, s.padding)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=lax.Precision.HIGHEST,
            )  # (1, h, w, out)
        y = self._conv(images, k_scale, s.stride, s.padding) + offset.astype(self.dtype)
        return self._after_conv1(y)
