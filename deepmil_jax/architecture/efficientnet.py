"""The EfficientNet-Lite architecture tables: plain data, shared by the Flax model, the weight
reader and the PyTorch reference. Imports neither JAX nor numpy.

EfficientNet-Lite (Tan & Le 2019, the TensorFlow "lite" models) is EfficientNet without
squeeze-and-excitation, with ReLU6 instead of swish, and with the stem (32 channels) and the head
(1280 channels) kept at their EfficientNet-B0 widths whatever the width multiplier; the first and
last stages keep their repeat count whatever the depth multiplier. Convolutions use TensorFlow's
"SAME" padding, batch norm ``eps = 1e-3``, and the input is RGB on [0, 255] mapped to [-1, 1) by
``(x - 127) / 128`` (``NORMALIZATION``).

``STAGES`` is EfficientNet-B0's stage table; ``VARIANTS`` the multipliers; ``block_specs`` the
blocks a variant expands to; ``grid`` the feature-map size for an input size; ``expected_shapes``
the canonical parameter tree.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from deepmil_jax.architecture.alexnet import Normalization
from deepmil_jax.errors import ConfigError


class StageSpec(NamedTuple):
    """One stage of MBConv blocks at EfficientNet-B0 width and depth.

    The first block of a stage has ``stride`` and maps ``in_features`` to ``out_features``; the
    other ``repeats - 1`` blocks have stride 1 and ``out_features`` in and out.
    """

    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    in_features: int
    out_features: int


class VariantSpec(NamedTuple):
    """The compound-scaling multipliers of one EfficientNet-Lite variant."""

    width: float
    depth: float
    image_size: int  # the resolution it was trained at (any size works for features)
    dropout: float  # of the ImageNet classifier (unused here: features and eval only)


class BlockSpec(NamedTuple):
    """One MBConv block: [1x1 expand -> BN -> ReLU6] -> kxk depthwise/stride -> BN -> ReLU6 ->
    1x1 project -> BN [-> + input when ``residual``]. No expand layer when ``expand_ratio == 1``.
    """

    kernel: int
    stride: int
    expand_ratio: int
    in_features: int
    out_features: int

    @property
    def mid_features(self) -> int:
        return self.in_features * self.expand_ratio

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_features == self.out_features


# efficientnet_lite_builder.py: r1_k3_s11_e1_i32_o16 ... r1_k3_s11_e6_i192_o320
STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)

VARIANTS: dict[str, VariantSpec] = {
    "lite0": VariantSpec(1.0, 1.0, 224, 0.2),
    "lite1": VariantSpec(1.0, 1.1, 240, 0.2),
    "lite2": VariantSpec(1.1, 1.2, 260, 0.3),
}

STEM_FEATURES = 32  # fixed in the lite models
STEM_KERNEL = 3
STEM_STRIDE = 2
HEAD_FEATURES = 1280  # fixed in the lite models
NUM_CLASSES = 1000
BN_EPS = 1e-3
DEPTH_DIVISOR = 8
OUTPUT_STRIDE = 32
RELU6_MAX = 6.0

# The official TF-lite preprocessing (MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3 on 0-255),
# as a ``Normalization`` on [0, 1]: ``(x * 255 - 127) / 128``, RGB.
NORMALIZATION_NAME = "efficientnet_lite"
NORMALIZATION = Normalization(255.0, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0), False)
NORMALIZATIONS: dict[str, Normalization] = {NORMALIZATION_NAME: NORMALIZATION}


def check_variant(variant: str) -> None:
    """Raise ConfigError unless ``variant`` is a key of ``VARIANTS``."""
    if variant not in VARIANTS:
        raise ConfigError(
            f"unknown EfficientNet-Lite variant {variant!r}; choose one of {list(VARIANTS)}"
        )


def round_filters(filters: int, width: float) -> int:
    """``filters * width`` rounded to a multiple of 8, never more than 10% below."""
    scaled = filters * width
    rounded = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += DEPTH_DIVISOR
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """``ceil(repeats * depth)``."""
    return int(math.ceil(repeats * depth))


def stage_specs(variant: str) -> tuple[StageSpec, ...]:
    """The stages of ``variant`` after the lite rules (stem/head and end stages' depth fixed)."""
    check_variant(variant)
    v = VARIANTS[variant]
    last = len(STAGES) - 1
    out = []
    for i, s in enumerate(STAGES):
        fixed_depth = i in (0, last)
        out.append(
            StageSpec(
                s.repeats if fixed_depth else round_repeats(s.repeats, v.depth),
                s.kernel,
                s.stride,
                s.expand_ratio,
                STEM_FEATURES if i == 0 else round_filters(s.in_features, v.width),
                round_filters(s.out_features, v.width),
            )
        )
    return tuple(out)


def block_specs(variant: str) -> tuple[BlockSpec, ...]:
    """Every MBConv block of ``variant`` in order (16 for lite0, 21 for lite1 and lite2)."""
    blocks = []
    for s in stage_specs(variant):
        blocks.append(BlockSpec(s.kernel, s.stride, s.expand_ratio, s.in_features, s.out_features))
        for _ in range(s.repeats - 1):
            blocks.append(BlockSpec(s.kernel, 1, s.expand_ratio, s.out_features, s.out_features))
    return tuple(blocks)


def strides(variant: str) -> tuple[int, ...]:
    """The strides of the spatial convolutions in order: the stem's, then each block's."""
    return (STEM_STRIDE, *(b.stride for b in block_specs(variant)))


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one axis: ``(before, after)``, the odd pixel after.

    ``total = max((ceil(size / stride) - 1) * stride + kernel - size, 0)``; the output has
    ``ceil(size / stride)`` samples.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def grid(variant: str, height: int, width: int) -> tuple[int, int]:
    """The feature map's ``(h, w)`` for an input of ``height x width`` (ceil division by each
    stride, as SAME padding gives); 224 -> 7, 512 -> 16, 227 -> 8.
    """
    if height < 1 or width < 1:
        raise ConfigError(f"the input must be at least 1x1; got {height}x{width}")
    h, w = height, width
    for s in strides(variant):
        h, w = -(-h // s), -(-w // s)
    return h, w


def layer_names(variant: str, *, fc: bool = True) -> tuple[str, ...]:
    """The canonical layer names of ``variant`` in forward order."""
    names = ["stem_conv", "stem_bn"]
    for i, b in enumerate(block_specs(variant)):
        if b.expand_ratio != 1:
            names += [f"block{i}_expand_conv", f"block{i}_expand_bn"]
        names += [f"block{i}_depthwise_conv", f"block{i}_depthwise_bn"]
        names += [f"block{i}_project_conv", f"block{i}_project_bn"]
    names += ["head_conv", "head_bn"]
    if fc:
        names.append("fc")
    return tuple(names)


BN_KINDS = ("scale", "bias", "mean", "var")


def _bn(features: int) -> dict[str, tuple[int, ...]]:
    return {kind: (features,) for kind in BN_KINDS}


def expected_shapes(variant: str, *, fc: bool = True) -> dict[str, dict[str, tuple[int, ...]]]:
    """Canonical shapes of ``variant``'s parameters, in forward order.

    Convolutions have only a ``kernel``, HWIO ``(k, k, in, out)``; a depthwise one is
    ``(k, k, 1, channels)`` (applied with ``feature_group_count = channels``). Batch norms have
    ``scale``, ``bias``, ``mean``, ``var`` ``(channels,)``. With ``fc``, also ``fc``:
    ``kernel (1280, 1000)``, ``bias (1000,)`` (the ImageNet classifier).
    """
    shapes: dict[str, dict[str, tuple[int, ...]]] = {
        "stem_conv": {"kernel": (STEM_KERNEL, STEM_KERNEL, 3, STEM_FEATURES)},
        "stem_bn": _bn(STEM_FEATURES),
    }
    blocks = block_specs(variant)
    for i, b in enumerate(blocks):
        mid = b.mid_features
        if b.expand_ratio != 1:
            shapes[f"block{i}_expand_conv"] = {"kernel": (1, 1, b.in_features, mid)}
            shapes[f"block{i}_expand_bn"] = _bn(mid)
        shapes[f"block{i}_depthwise_conv"] = {"kernel": (b.kernel, b.kernel, 1, mid)}
        shapes[f"block{i}_depthwise_bn"] = _bn(mid)
        shapes[f"block{i}_project_conv"] = {"kernel": (1, 1, mid, b.out_features)}
        shapes[f"block{i}_project_bn"] = _bn(b.out_features)
    shapes["head_conv"] = {"kernel": (1, 1, blocks[-1].out_features, HEAD_FEATURES)}
    shapes["head_bn"] = _bn(HEAD_FEATURES)
    if fc:
        shapes["fc"] = {"kernel": (HEAD_FEATURES, NUM_CLASSES), "bias": (NUM_CLASSES,)}
    return shapes


__all__ = [
    "BN_EPS",
    "BN_KINDS",
    "HEAD_FEATURES",
    "NORMALIZATION",
    "NORMALIZATIONS",
    "NORMALIZATION_NAME",
    "NUM_CLASSES",
    "OUTPUT_STRIDE",
    "RELU6_MAX",
    "STAGES",
    "STEM_FEATURES",
    "STEM_KERNEL",
    "STEM_STRIDE",
    "VARIANTS",
    "BlockSpec",
    "StageSpec",
    "VariantSpec",
    "block_specs",
    "check_variant",
    "expected_shapes",
    "grid",
    "layer_names",
    "round_filters",
    "round_repeats",
    "same_padding",
    "stage_specs",
    "strides",
]
