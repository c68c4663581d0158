"""torchvision's ResNet-18/34/50 in Flax NNX, as a fully convolutional MIL backbone (NHWC).

A 224x224 input gives a 7x7 map (output stride 32), 512 channels (resnet18/34) or 2048
(resnet50); ``output_stride=16`` dilates layer4 instead of striding it (14x14 at 224), as
torchvision's ``replace_stride_with_dilation=[False, False, True]``. Any size and aspect ratio
works; ``deepmil_jax.architecture.resnet.grid`` gives the map size without building anything.

Batch norm is frozen: every batch norm normalises with its ImageNet running statistics
(``nnx.BatchStat``, never updated, in training too), only its scale and bias are trainable
``nnx.Param`` -- the batches of 8-32 mammograms the paper trains with give poor batch
statistics. The layer tables are ``deepmil_jax.architecture.resnet``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from deepmil_jax.architecture import resnet as arch
from deepmil_jax.errors import ConfigError, WeightsError
from deepmil_jax.models.alexnet import max_pool, normalize
from deepmil_jax.models.frozen_batch_norm import FrozenBatchNorm
from deepmil_jax.models.grey import with_offset_channel

# torchvision's initialisation (kaiming normal, fan out, relu gain) for training from scratch.
_KERNEL_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _bn(features: int, dtype: Any, param_dtype: Any) -> FrozenBatchNorm:
    return FrozenBatchNorm(features, eps=arch.BN_EPS, dtype=dtype, param_dtype=param_dtype)


def _conv(spec: arch.ConvSpec, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
    p, d = spec.padding, spec.dilation
    return nnx.Conv(
        spec.in_features,
        spec.out_features,
        (spec.kernel, spec.kernel),
        strides=(spec.stride, spec.stride),
        padding=((p, p), (p, p)),
        kernel_dilation=(d, d),
        use_bias=False,
        kernel_init=_KERNEL_INIT,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def _local(name: str) -> str:
    """``"layer2.0.conv1"`` -> ``"conv1"``: the attribute name inside a block."""
    return name.rsplit(".", 1)[-1]


class Block(nnx.Module):
    """A BasicBlock (two 3x3 convolutions) or a Bottleneck (1x1, 3x3, 1x1), with its shortcut.

    ``relu(bn_last(conv_last(... relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is the
    identity or ``downsample`` (1x1 convolution with the block's stride, then batch norm).
    Attributes are named as torchvision's (``conv1``, ``bn1``, ..., ``downsample``).
    """

    def __init__(self, spec: arch.BlockSpec, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.names = tuple((_local(c.name), _local(c.bn)) for c in spec.convs)
        for c in spec.convs:
            setattr(self, _local(c.name), _conv(c, dtype, param_dtype, rngs))
            setattr(self, _local(c.bn), _bn(c.out_features, dtype, param_dtype))
        down = spec.downsample
        self.downsample = (
            None
            if down is None
            else nnx.List(
                [
                    _conv(down, dtype, param_dtype, rngs),
                    _bn(down.out_features, dtype, param_dtype),
                ]
            )
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        for i, (conv, bn) in enumerate(self.names):
            y = getattr(self, bn)(getattr(self, conv)(y))
            if i < len(self.names) - 1:
                y = nnx.relu(y)
        shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        return nnx.relu(y + shortcut.astype(y.dtype))


def _set(var: nnx.Variable, params: Mapping[str, Mapping[str, Any]], name: str, kind: str) -> None:
    """``var`` := ``params[name][kind]``, refusing a missing or mis-shaped array (WeightsError)."""
    if name not in params:
        raise WeightsError(
            f"the pretrained weights have no layer {name!r} (found {len(params)} layers, e.g. "
            f"{sorted(params)[:5]}); the ResNet needs it"
        )
    value = params[name].get(kind)
    if value is None or tuple(jnp.shape(value)) != var.shape:
        got = "no array" if value is None else f"shape {tuple(jnp.shape(value))}"
        raise WeightsError(f"the pretrained {name} {kind} has {got}; the ResNet needs {var.shape}")
    var.set_value(jnp.asarray(value, dtype=var.dtype))


class ResNet(nnx.Module):
    """torchvision ResNet features (and optionally its ImageNet classifier).

    Calling it maps *normalised* images ``(N, H, W, 3)`` (RGB, torchvision's normalisation) or
    ``(N, H, W, 1)`` (that channel fed to all three) to layer4's map ``(N, h, w, out_features)``,
    ``(h, w) = architecture.resnet.grid(variant, H, W, output_stride)``. ``forward_raw`` takes raw
    images on [0, 1] and normalises them itself; ``classify`` gives the 1000 ImageNet logits
    (needs ``classifier=True``).

    Attributes:
      variant: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
      stride: the output stride, 32 or 16 (a model choice, not a property of the weights).
      out_features: layer4's channels, 512 or 2048.
      normalization: ``"torchvision"`` (a key of ``architecture.NORMALIZATIONS``).
    """

    def __init__(
        self,
        variant: str = "resnet50",
        *,
        output_stride: int = 32,
        classifier: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        arch.check_variant(variant)
        arch.check_output_stride(output_stride)
        self.variant = variant
        self.stride = output_stride
        self.out_features = arch.out_features(variant)
        self.normalization = arch.NORMALIZATION_NAME
        self.dtype = dtype
        stem = arch.stem(variant)
        self.conv1 = _conv(stem, dtype, param_dtype, rngs)
        self.bn1 = _bn(stem.out_features, dtype, param_dtype)
        specs = arch.blocks(variant, output_stride)
        for stage in arch.STAGES:
            kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
            layer = [Block(s, **kw) for s in specs if s.name.split(".")[0] == stage]
            setattr(self, stage, nnx.List(layer))
        self.fc = (
            nnx.Linear(
                self.out_features, arch.NUM_CLASSES, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
            if classifier
            else None
        )

    # -- pretrained weights ------------------------------------------------------------------

    @classmethod
    def from_converted(
        cls,
        params: Mapping[str, Mapping[str, Any]],
        metadata: Mapping[str, Any],
        *,
        output_stride: int = 32,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
    ) -> ResNet:
        """The ResNet of ``metadata["variant"]`` holding ``params`` (the canonical tree).

        The classifier is built when ``params`` has ``"fc"``. ``output_stride`` is chosen here:
        the same weights serve both strides. The model is built abstractly (no random
        initialisation is computed), then filled.
        """
        norm = metadata.get("normalization", arch.NORMALIZATION_NAME)
        if norm != arch.NORMALIZATION_NAME:
            raise WeightsError(
                f"ResNet weights must use the {arch.NORMALIZATION_NAME!r} normalization; "
                f"the metadata says {norm!r}"
            )
        model = nnx.eval_shape(
            lambda: cls(
                metadata["variant"],
                output_stride=output_stride,
                classifier="fc" in params,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=nnx.Rngs(0),
            )
        )
        model.load_params(params)
        return model

    def _layers(self) -> Iterator[tuple[str, nnx.Module]]:
        """``(canonical name, module)`` of every convolution and batch norm (and ``fc``)."""
        yield "conv1", self.conv1
        yield "bn1", self.bn1
        for stage in arch.STAGES:
            for b, block in enumerate(getattr(self, stage)):
                for conv, bn in block.names:
                    yield f"{stage}.{b}.{conv}", getattr(block, conv)
                    yield f"{stage}.{b}.{bn}", getattr(block, bn)
                if block.downsample is not None:
                    yield f"{stage}.{b}.downsample.0", block.downsample[0]
                    yield f"{stage}.{b}.downsample.1", block.downsample[1]
        if self.fc is not None:
            yield "fc", self.fc

    def load_params(self, params: Mapping[str, Mapping[str, Any]]) -> None:
        """Copy the canonical tree (``architecture.resnet.expected_shapes``) into the modules.

        Convolutions take ``kernel``; batch norms ``scale``, ``bias``, ``mean``, ``var``; ``fc``
        (only if this model has a classifier) ``kernel`` and ``bias``. Raises WeightsError for
        a missing or mis-shaped array.
        """
        for name, module in self._layers():
            kinds = arch.BN_KINDS if isinstance(module, FrozenBatchNorm) else ("kernel",)
            if isinstance(module, nnx.Linear):
                kinds = ("kernel", "bias")
            for kind in kinds:
                _set(getattr(module, kind), params, name, kind)

    # -- forward -------------------------------------------------------------------------------

    def _after_conv1(self, y: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(y))
        pad = arch.POOL_PADDING
        x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
        x = max_pool(x)  # 3x3/2 on the -inf padded map: PyTorch's MaxPool2d(3, 2, padding=1)
        for stage in arch.STAGES:
            for block in getattr(self, stage):
                x = block(x)
        return x

    def _conv1(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        s = arch.STEM_STRIDE
        p = arch.STEM_PADDING
        return lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (s, s),
            ((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalised ``(N, H, W, 3)`` or ``(N, H, W, 1)`` -> layer4 features ``(N, h, w, C)``."""
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ConfigError(f"ResNet expects (N, H, W, 3) or (N, H, W, 1); got {x.shape}")
        if x.shape[-1] == 3:
            return self._after_conv1(self.conv1(x))
        kernel = self.conv1.kernel[...].sum(axis=2, keepdims=True)  # fold the 3 input channels
        return self._after_conv1(self._conv1(x, kernel))

    def forward_raw(self, images: jax.Array) -> jax.Array:
        """Raw images on [0, 1] -> layer4 features, applying torchvision's normalisation exactly.

        RGB ``(N, H, W, 3)``: ``(x - mean) / std`` per channel. Grey ``(N, H, W, 1)`` gives exactly
        what the grey image repeated in three channels gives, as one conv1 of the image and a
        channel of ones (:func:`deepmil_jax.models.grey.with_offset_channel`).
        """
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ConfigError(f"images must be (N, H, W, 1) or (N, H, W, 3); got {images.shape}")
        if images.shape[-1] == 3:
            return self(normalize(images, self.normalization))
        x, kernel = with_offset_channel(images, self.conv1.kernel[...], arch.NORMALIZATION)
        y = self._conv1(x, kernel)
        return self._after_conv1(y)

    def classify(self, x: jax.Array) -> jax.Array:
        """Normalised ``(N, H, W, 3)`` -> the ImageNet logits ``(N, 1000)``: global average pool
        of layer4, then ``fc``, as torchvision's ``forward``."""
        if self.fc is None:
            raise ConfigError("this ResNet was built without its classifier (classifier=False)")
        features = self(x)
        pooled = features.astype(jnp.float32).mean(axis=(1, 2))
        return self.fc(pooled)
