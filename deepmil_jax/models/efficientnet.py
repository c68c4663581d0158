"""EfficientNet-Lite0/1/2 features in Flax NNX (NHWC, TensorFlow "SAME" padding).

::

    stem 3x3/2 32 -> BN -> ReLU6 -> MBConv blocks (see ``architecture.efficientnet``)
    -> head 1x1 1280 -> BN -> ReLU6                                  features (N, h, w, 1280)
    [-> global average pool -> fc 1000]                              ImageNet logits (classify)

An MBConv block is ``[1x1 expand -> BN -> ReLU6] -> kxk depthwise -> BN -> ReLU6 -> 1x1 project
-> BN [+ input]``, with no squeeze-and-excitation. The map has ``ceil(H / 32) x ceil(W / 32)``
cells (``architecture.efficientnet.grid``) for any input size and aspect ratio: each convolution
pads as TensorFlow's SAME does for its actual input size, so the weights converted from the TF
lite checkpoints see the borders they were trained with.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from deepmil_jax.architecture import efficientnet as arch
from deepmil_jax.errors import ConfigError, WeightsError
from deepmil_jax.models.frozen_batch_norm import FrozenBatchNorm
from deepmil_jax.models.grey import with_offset_channel

_DN = ("NHWC", "HWIO", "NHWC")


def relu6(x: jax.Array) -> jax.Array:
    """``min(max(x, 0), 6)``."""
    return jnp.clip(x, 0, arch.RELU6_MAX)


def _same_pads(x: jax.Array, kernel: int, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return (
        arch.same_padding(x.shape[1], kernel, stride),
        arch.same_padding(x.shape[2], kernel, stride),
    )


def normalize(images: jax.Array, kind: str = arch.NORMALIZATION_NAME) -> jax.Array:
    """RGB ``(N, H, W, 3)`` on [0, 1] -> ``(x * 255 - 127) / 128`` (about [-1, 1]), float."""
    if kind not in arch.NORMALIZATIONS:
        raise ConfigError(
            f"unknown normalization {kind!r}; choose one of {list(arch.NORMALIZATIONS)}"
        )
    spec = arch.NORMALIZATIONS[kind]
    x = jnp.asarray(images)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ConfigError(f"images must be (N, H, W, 3) RGB; got shape {x.shape}")
    if spec.bgr:
        x = x[..., ::-1]
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    return ((x * spec.scale - mean) / std).astype(x.dtype)


class Conv(nnx.Module):
    """Bias-free convolution with TF SAME padding (HWIO ``kernel``); depthwise when ``groups``
    equals the channel count (kernel ``(k, k, 1, channels)``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel: int,
        stride: int = 1,
        *,
        groups: int = 1,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        shape = (kernel, kernel, in_features // groups, out_features)
        init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
        self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype))
        self.kernel_size = kernel
        self.stride = stride
        self.groups = groups
        self.dtype = dtype

    def __call__(self, x: jax.Array, multiplier: jax.Array | None = None) -> jax.Array:
        """``x`` -> float32 output; with ``multiplier`` (per output channel), the output times it,
        computed as the convolution with the kernel times it (a frozen batch norm folded in)."""
        pads = _same_pads(x, self.kernel_size, self.stride)
        kernel = self.kernel[...]
        if multiplier is not None:
            kernel = kernel.astype(jnp.float32) * multiplier
        if self.groups > 1 and self.groups == x.shape[-1]:
            return depthwise_conv(x.astype(self.dtype), kernel, self.stride, pads)
        if self.kernel_size == 1 and self.stride == 1:  # a matrix product over the channels
            kernel = kernel[0, 0].astype(self.dtype)
            return jnp.dot(x.astype(self.dtype), kernel, preferred_element_type=jnp.float32)
        return lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (self.stride, self.stride),
            pads,
            dimension_numbers=_DN,
            feature_group_count=self.groups,
            preferred_element_type=jnp.float32,  # accumulate in float32 (bf16 compute too)
        )


Pads = tuple[tuple[int, int], tuple[int, int]]


def _taps(
    xp: jax.Array, k: int, stride: int, out_h: int, out_w: int
) -> Iterator[tuple[int, int, jax.Array]]:
    """``(i, j, xp[:, i::stride, j::stride][:, :out_h, :out_w])`` for the k*k taps."""
    n, _, _, c = xp.shape
    for i in range(k):
        for j in range(k):
            end = (n, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, c)
            yield i, j, lax.slice(xp, (0, i, j, 0), end, (1, stride, stride, 1))


def _shift_sum(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads) -> jax.Array:
    k = kernel.shape[0]
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_h = (xp.shape[1] - k) // stride + 1
    out_w = (xp.shape[2] - k) // stride + 1
    w = kernel[:, :, 0, :].astype(jnp.float32)
    y = None
    for i, j, tap in _taps(xp, k, stride, out_h, out_w):
        term = tap.astype(jnp.float32) * w[i, j]
        y = term if y is None else y + term
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads) -> jax.Array:
    """A depthwise convolution, NHWC ``x`` and ``(k, k, 1, C)`` ``kernel`` -> float32, as the sum
    of the k*k strided shifts of the padded input times each tap's per-channel weight.

    The same numbers as ``lax.conv_general_dilated(..., feature_group_count=C)``, computed with
    elementwise operations: XLA's CPU grouped convolution, and above all its gradient, is several
    times slower (the benchmark's train step of EfficientNet-Lite0). The gradient is written out
    (``_depthwise_bwd``) rather than derived: derived, XLA keeps each of the k*k shifted copies
    of the input for the kernel's gradient, tripling the train step's temporary memory (7.5 GB at
    512x512, batch 8), whose pages the CPU runtime faults in afresh at every step.
    """
    return _shift_sum(x, kernel, stride, pads)


def _depthwise_fwd(x, kernel, stride, pads):
    return _shift_sum(x, kernel, stride, pads), (x, kernel)


def _depthwise_bwd(stride: int, pads: Pads, residuals, g: jax.Array):
    """The input's gradient, a shift-sum of the (stride-dilated) padded output gradient with the
    flipped kernel; the kernel's, the k*k sums of tap * g in one multi-output reduction."""
    x, kernel = residuals
    k = kernel.shape[0]
    n, h, width, c = x.shape
    (top, bottom), (left, right) = pads
    w = kernel[:, :, 0, :].astype(jnp.float32)
    g = g.astype(jnp.float32)
    out_h, out_w = g.shape[1], g.shape[2]
    # g dilated by the stride, k - 1 zeros before and up to the padded input's size after:
    # dx_padded[p] = sum_i g_dilated[p - i] * w[i], cropped to x's rows and columns.
    spread = (
        (0, 0, 0),
        (k - 1, h + top + bottom - stride * (out_h - 1) - 1, stride - 1),
        (k - 1, width + left + right - stride * (out_w - 1) - 1, stride - 1),
        (0, 0, 0),
    )
    gp = lax.pad(g, jnp.zeros((), g.dtype), spread)
    dx = None
    for i in range(k):
        for j in range(k):
            start = (0, k - 1 - i + top, k - 1 - j + left, 0)
            tap = lax.slice(gp, start, (n, start[1] + h, start[2] + width, c))
            dx = tap * w[i, j] if dx is None else dx + tap * w[i, j]
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    products = [t.astype(jnp.float32) * g for _, _, t in _taps(xp, k, stride, out_h, out_w)]
    # One pass over x and g for all k*k sums. Reducing the batch axis only (large maps) or batch
    # and rows (small ones) first keeps XLA's reduction loops on contiguous memory.
    axes = (0,) if out_h >= 128 else (0, 1)
    zeros = [jnp.zeros((), jnp.float32)] * len(products)
    sums = lax.reduce(products, zeros, lambda a, b: tuple(map(jnp.add, a, b)), axes)
    rest = tuple(range(3 - len(axes)))
    dw = jnp.stack([p.sum(rest) for p in sums]).reshape(k, k, 1, c)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


class MBConv(nnx.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation (see ``arch.BlockSpec``)."""

    def __init__(self, spec: arch.BlockSpec, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        mid = spec.mid_features
        self.spec = spec
        if spec.expand_ratio != 1:
            self.expand_conv = Conv(spec.in_features, mid, 1, **kw, rngs=rngs)
            self.expand_bn = FrozenBatchNorm(mid, eps=arch.BN_EPS, **kw)
        else:
            self.expand_conv = None
            self.expand_bn = None
        self.depthwise_conv = Conv(mid, mid, spec.kernel, spec.stride, groups=mid, **kw, rngs=rngs)
        self.depthwise_bn = FrozenBatchNorm(mid, eps=arch.BN_EPS, **kw)
        self.project_conv = Conv(mid, spec.out_features, 1, **kw, rngs=rngs)
        self.project_bn = FrozenBatchNorm(spec.out_features, eps=arch.BN_EPS, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        if self.expand_conv is not None:
            y = relu6(self.expand_bn.after(self.expand_conv, y))
        y = relu6(self.depthwise_bn.after(self.depthwise_conv, y))
        y = self.project_bn.after(self.project_conv, y)
        return y + x.astype(y.dtype) if self.spec.residual else y


def _copy(var: nnx.Variable, value: Any, name: str, kind: str, model: str) -> None:
    if value is None or tuple(np.shape(value)) != var.shape:
        got = "no array" if value is None else f"shape {tuple(np.shape(value))}"
        raise WeightsError(f"the pretrained {name} {kind} has {got}; {model} needs {var.shape}")
    var.set_value(jnp.asarray(value, dtype=var.dtype))


class EfficientNetLite(nnx.Module):
    """EfficientNet-Lite convolutional features (and the ImageNet classifier, for checks).

    Calling it maps *normalised* images ``(N, H, W, 3)`` (or grey ``(N, H, W, 1)``, treated as
    the image in all three channels) to ``(N, ceil(H/32), ceil(W/32), 1280)``, after the head
    convolution, its batch norm and ReLU6. ``forward_raw`` takes raw images on [0, 1] and applies
    ``self.normalization`` itself; ``classify`` adds global average pooling and the 1000-way
    ``fc``.

    Batch norm is frozen: every batch norm uses the ImageNet statistics (``nnx.BatchStat``
    variables that are never updated, in training too), while its scale and bias are trainable
    ``nnx.Param``. Batches of 8-32 whole mammograms give too noisy batch statistics to train with.

    Attributes:
      variant: ``"lite0"``, ``"lite1"`` or ``"lite2"``.
      normalization: the input normalisation (``"efficientnet_lite"``: ``(x * 255 - 127) / 128``).
      out_features: 1280.
      stride: 32 (the output stride; the map is ``ceil(H / 32) x ceil(W / 32)``).
      classifier: whether the ImageNet ``fc`` exists.
    """

    def __init__(
        self,
        variant: str = "lite0",
        *,
        normalization: str | None = None,
        classifier: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        arch.check_variant(variant)
        normalization = normalization or arch.NORMALIZATION_NAME
        if normalization not in arch.NORMALIZATIONS:
            raise ConfigError(
                f"unknown normalization {normalization!r} for EfficientNet-Lite; choose one of "
                f"{list(arch.NORMALIZATIONS)}"
            )
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.variant = variant
        self.normalization = normalization
        self.out_features = arch.HEAD_FEATURES
        self.stride = arch.OUTPUT_STRIDE
        self.dtype = dtype
        self.classifier = classifier
        specs = arch.block_specs(variant)
        self.stem_conv = Conv(
            3, arch.STEM_FEATURES, arch.STEM_KERNEL, arch.STEM_STRIDE, **kw, rngs=rngs
        )
        self.stem_bn = FrozenBatchNorm(arch.STEM_FEATURES, eps=arch.BN_EPS, **kw)
        self.blocks = nnx.List([MBConv(s, **kw, rngs=rngs) for s in specs])
        self.head_conv = Conv(specs[-1].out_features, arch.HEAD_FEATURES, 1, **kw, rngs=rngs)
        self.head_bn = FrozenBatchNorm(arch.HEAD_FEATURES, eps=arch.BN_EPS, **kw)
        if classifier:
            self.fc = nnx.Linear(arch.HEAD_FEATURES, arch.NUM_CLASSES, **kw, rngs=rngs)
        else:
            self.fc = None

    # -- pretrained weights ------------------------------------------------------------------

    @classmethod
    def from_converted(
        cls,
        params: Mapping[str, Mapping[str, Any]],
        metadata: Mapping[str, Any],
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
    ) -> EfficientNetLite:
        """The EfficientNet-Lite named in ``metadata`` (``variant``, optional ``normalization``)
        holding ``params`` (the canonical tree of ``arch.expected_shapes``; ``fc`` optional).

        Built abstractly (no random initialisation is computed), then filled.
        """
        if "variant" not in metadata:
            raise WeightsError(
                f"the pretrained metadata names no EfficientNet-Lite variant (found keys "
                f"{sorted(metadata)}); expected one of {list(arch.VARIANTS)}"
            )
        model = nnx.eval_shape(
            lambda: cls(
                metadata["variant"],
                normalization=metadata.get("normalization"),
                classifier="fc" in params,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=nnx.Rngs(0),
            )
        )
        model.load_params(params)
        return model

    def _layers(self) -> dict[str, nnx.Module]:
        layers: dict[str, nnx.Module] = {"stem_conv": self.stem_conv, "stem_bn": self.stem_bn}
        for i, block in enumerate(self.blocks):
            for part in ("expand_conv", "expand_bn", "depthwise_conv", "depthwise_bn"):
                if getattr(block, part) is not None:
                    layers[f"block{i}_{part}"] = getattr(block, part)
            layers[f"block{i}_project_conv"] = block.project_conv
            layers[f"block{i}_project_bn"] = block.project_bn
        layers["head_conv"] = self.head_conv
        layers["head_bn"] = self.head_bn
        if self.fc is not None:
            layers["fc"] = self.fc
        return layers

    def load_params(self, params: Mapping[str, Mapping[str, Any]]) -> None:
        """Copy the canonical tree (``arch.expected_shapes``) into the layers.

        ``fc`` is needed only when the model has its classifier. Raises WeightsError naming the
        layer for a missing layer or array or a mis-shaped one.
        """
        model = f"EfficientNet-{self.variant.capitalize()}"
        for name, layer in self._layers().items():
            if name not in params:
                raise WeightsError(
                    f"the pretrained weights have no layer {name!r} ({len(params)} layers "
                    f"found); {model} needs it"
                )
            kinds = arch.BN_KINDS if isinstance(layer, FrozenBatchNorm) else ("kernel",)
            if name == "fc":
                kinds = ("kernel", "bias")
            for kind in kinds:
                _copy(getattr(layer, kind), params[name].get(kind), name, kind, model)

    # -- forward -------------------------------------------------------------------------------

    def _after_stem(self, y: jax.Array) -> jax.Array:
        x = relu6(self.stem_bn(y))
        for block in self.blocks:
            x = block(x)
        return relu6(self.head_bn.after(self.head_conv, x))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalised ``(N, H, W, 3)`` or grey ``(N, H, W, 1)`` -> ``(N, h, w, 1280)``."""
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ConfigError(
                f"EfficientNet-Lite expects (N, H, W, 3) or (N, H, W, 1); got {x.shape}"
            )
        if x.shape[-1] == 3:
            return self._after_stem(self.stem_conv(x))
        kernel = self.stem_conv.kernel[...].sum(axis=2, keepdims=True)  # fold the 3 channels
        return self._after_stem(self._stem(x, kernel))

    def _stem(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (arch.STEM_STRIDE, arch.STEM_STRIDE),
            _same_pads(x, arch.STEM_KERNEL, arch.STEM_STRIDE),
            dimension_numbers=_DN,
            preferred_element_type=jnp.float32,
        )

    def forward_raw(self, images: jax.Array) -> jax.Array:
        """Raw images on [0, 1] -> features, applying ``self.normalization`` exactly.

        RGB ``(N, H, W, 3)`` goes through :func:`normalize`. Grey ``(N, H, W, 1)`` gives exactly
        what the grey image repeated in three channels and normalised per channel gives, as one
        SAME-padded stem convolution of the image and a channel of ones
        (:func:`deepmil_jax.models.grey.with_offset_channel`).
        """
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ConfigError(f"images must be (N, H, W, 1) or (N, H, W, 3); got {images.shape}")
        if images.shape[-1] == 3:
            return self(normalize(images, self.normalization))
        x, kernel = with_offset_channel(
            images, self.stem_conv.kernel[...], arch.NORMALIZATIONS[self.normalization]
        )
        y = self._stem(x, kernel)
        return self._after_stem(y)

    def classify(self, x: jax.Array) -> jax.Array:
        """Normalised images -> ImageNet logits ``(N, 1000)`` (global average pool, ``fc``)."""
        if self.fc is None:
            raise ConfigError("this EfficientNet-Lite was built without its ImageNet classifier")
        features = self(x)
        pooled = features.astype(jnp.float32).mean(axis=(1, 2))
        return self.fc(pooled.astype(self.dtype))


__all__ = ["Conv", "EfficientNetLite", "MBConv", "normalize", "relu6"]
