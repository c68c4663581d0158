"""The torchvision ResNet architecture table (ResNet-18/34/50, "v1.5"): plain data, shared by the
Flax model, the weight reader and the PyTorch reference. Imports neither JAX nor numpy.

Every variant is::

    conv1 7x7/2 pad 3 (64, no bias) -> bn1 -> relu -> max pool 3x3/2 pad 1
    -> layer1 (stride 1) -> layer2 (stride 2) -> layer3 (stride 2) -> layer4 (stride 2 or dilated)
    [-> global average pool -> fc (1000 ImageNet classes)]

with stage widths 64, 128, 256, 512. ``resnet18``/``resnet34`` stack BasicBlocks (two 3x3
convolutions, expansion 1), ``resnet50`` Bottlenecks (1x1 -> 3x3 -> 1x1, expansion 4) with the
stride on the 3x3 convolution, as torchvision does. The first block of a stage whose input and
output differ (stride or width) has a ``downsample`` shortcut: 1x1 convolution with the block's
stride, then batch norm. Every convolution is bias-free and followed by batch norm (eps 1e-5).

``output_stride=16`` replaces layer4's stride by dilation 2, as torchvision's
``replace_stride_with_dilation=[False, False, True]``: layer4's first block keeps dilation 1 (and
stride 1, its shortcut too), the later blocks dilate their 3x3 convolutions by 2 (padding 2).
torchvision refuses dilation in its BasicBlock; here the BasicBlock follows the same rule, both
of its 3x3 convolutions dilated in the later blocks.

Parameter names follow torchvision's state_dict prefixes (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0`` (conv), ``layer1.0.downsample.1`` (bn), ..., ``fc``); see
``expected_shapes``.
"""

from __future__ import annotations

from typing import NamedTuple

from deepmil_jax.architecture.alexnet import NORMALIZATIONS, Normalization
from deepmil_jax.errors import ConfigError


class Variant(NamedTuple):
    """A ResNet depth: its block kind, blocks per stage and channel expansion of a block."""

    block: str  # "basic" or "bottleneck"
    layers: tuple[int, int, int, int]
    expansion: int


VARIANTS: dict[str, Variant] = {
    "resnet18": Variant("basic", (2, 2, 2, 2), 1),
    "resnet34": Variant("basic", (3, 4, 6, 3), 1),
    "resnet50": Variant("bottleneck", (3, 4, 6, 3), 4),
}
STEM_FEATURES = 64
STEM_KERNEL, STEM_STRIDE, STEM_PADDING = 7, 2, 3
POOL_KERNEL, POOL_STRIDE, POOL_PADDING = 3, 2, 1
WIDTHS = (64, 128, 256, 512)  # the 3x3 convolutions' width in each stage
STAGE_STRIDES = (1, 2, 2, 2)
STAGES = ("layer1", "layer2", "layer3", "layer4")
BN_EPS = 1e-5
NUM_CLASSES = 1000
OUTPUT_STRIDES = (32, 16)
# torchvision's ImageNet normalisation: RGB on [0, 1], (x - mean) / std per channel.
NORMALIZATION_NAME = "torchvision"
NORMALIZATION: Normalization = NORMALIZATIONS[NORMALIZATION_NAME]


class ConvSpec(NamedTuple):
    """One bias-free convolution (square kernel, symmetric zero padding) and its batch norm."""

    name: str  # the convolution's parameter name, e.g. "layer2.0.conv2"
    bn: str  # its batch norm's, e.g. "layer2.0.bn2"
    kernel: int
    stride: int
    padding: int
    dilation: int
    in_features: int
    out_features: int


class BlockSpec(NamedTuple):
    """One residual block: its convolutions in order, and the shortcut's (None: identity)."""

    name: str  # "layer2.0"
    convs: tuple[ConvSpec, ...]
    downsample: ConvSpec | None
    in_features: int
    out_features: int


def check_variant(variant: str) -> None:
    """Raise ConfigError unless ``variant`` is a key of ``VARIANTS``."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown ResNet variant {variant!r}; choose one of {list(VARIANTS)}")


def check_output_stride(output_stride: int) -> None:
    """Raise ConfigError unless ``output_stride`` is 32 or 16."""
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(
            f"ResNet output_stride must be one of {list(OUTPUT_STRIDES)}; got {output_stride!r}"
        )


def out_features(variant: str) -> int:
    """Channels of layer4's output: 512 (resnet18/34) or 2048 (resnet50)."""
    check_variant(variant)
    return WIDTHS[-1] * VARIANTS[variant].expansion


def stem(variant: str) -> ConvSpec:
    """conv1 7x7/2 pad 3, 3 -> 64 channels, with bn1."""
    check_variant(variant)
    return ConvSpec("conv1", "bn1", STEM_KERNEL, STEM_STRIDE, STEM_PADDING, 1, 3, STEM_FEATURES)


def _conv(prefix: str, i: int, k: int, stride: int, dilation: int, cin: int, cout: int) -> ConvSpec:
    padding = dilation * (k // 2)
    return ConvSpec(f"{prefix}.conv{i}", f"{prefix}.bn{i}", k, stride, padding, dilation, cin, cout)


def blocks(variant: str, output_stride: int = 32) -> tuple[BlockSpec, ...]:
    """Every residual block of ``variant`` in order, layer1.0 first (see the module docstring)."""
    check_variant(variant)
    check_output_stride(output_stride)
    spec = VARIANTS[variant]
    result = []
    cin, dilation = STEM_FEATURES, 1
    for s, (stage, width, count) in enumerate(zip(STAGES, WIDTHS, spec.layers, strict=True)):
        stride, previous = STAGE_STRIDES[s], dilation
        if output_stride == 16 and stage == "layer4":
            dilation, stride = dilation * stride, 1
        cout = width * spec.expansion
        for b in range(count):
            prefix = f"{stage}.{b}"
            st, dil = (stride, previous) if b == 0 else (1, dilation)
            if spec.block == "basic":
                convs = (
                    _conv(prefix, 1, 3, st, dil, cin, width),
                    _conv(prefix, 2, 3, 1, dil, width, cout),
                )
            else:
                convs = (
                    _conv(prefix, 1, 1, 1, 1, cin, width),
                    _conv(prefix, 2, 3, st, dil, width, width),
                    _conv(prefix, 3, 1, 1, 1, width, cout),
                )
            down = None
            if st != 1 or cin != cout:
                down = ConvSpec(
                    f"{prefix}.downsample.0", f"{prefix}.downsample.1", 1, st, 0, 1, cin, cout
                )
            result.append(BlockSpec(prefix, convs, down, cin, cout))
            cin = cout
    return tuple(result)


def convolutions(variant: str) -> tuple[ConvSpec, ...]:
    """conv1 and every block's convolutions (shortcuts after their block's), in order."""
    convs = [stem(variant)]
    for block in blocks(variant):
        convs.extend(block.convs)
        if block.downsample is not None:
            convs.append(block.downsample)
    return tuple(convs)


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """PyTorch's convolution/pooling output size (floor mode)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def grid(variant: str, height: int, width: int, output_stride: int = 32) -> tuple[int, int]:
    """The ``(h, w)`` of layer4's map for a ``height x width`` input, from the conv/pool arithmetic.

    conv1 7x7/2 pad 3, max pool 3x3/2 pad 1, then a 3x3 pad 1 stride-2 convolution in layer2,
    layer3 and layer4 (layer4 keeps its size at ``output_stride=16``); floor divisions, as
    PyTorch. Raises ConfigError for an input too small to give a 1x1 map.
    """
    check_variant(variant)
    check_output_stride(output_stride)
    if height < 1 or width < 1:
        raise ConfigError(f"ResNet input must be at least 1x1; got {height}x{width}")
    out = []
    for size in (height, width):
        size = _out_size(size, STEM_KERNEL, STEM_STRIDE, STEM_PADDING)
        size = _out_size(size, POOL_KERNEL, POOL_STRIDE, POOL_PADDING)
        for stage, stride in zip(STAGES, STAGE_STRIDES, strict=True):
            if stride == 2 and not (stage == "layer4" and output_stride == 16):
                size = _out_size(size, 3, 2, 1)
        out.append(size)
    return out[0], out[1]


BN_KINDS = ("scale", "bias", "mean", "var")


def expected_shapes(variant: str, *, fc: bool = True) -> dict[str, dict[str, tuple[int, ...]]]:
    """Canonical shapes of a variant's parameters, keyed by torchvision's module names.

    Convolutions ``{"kernel": (k, k, in, out)}`` (HWIO, no bias); batch norms ``{"scale", "bias",
    "mean", "var"}`` each ``(C,)`` (weight, bias, running_mean, running_var); with ``fc``, also
    ``"fc": {"kernel": (out_features, 1000), "bias": (1000,)}``. The shapes do not depend on the
    output stride.
    """
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for c in convolutions(variant):
        shapes[c.name] = {"kernel": (c.kernel, c.kernel, c.in_features, c.out_features)}
        shapes[c.bn] = {kind: (c.out_features,) for kind in BN_KINDS}
    if fc:
        shapes["fc"] = {"kernel": (out_features(variant), NUM_CLASSES), "bias": (NUM_CLASSES,)}
    return shapes


__all__ = [
    "BN_EPS",
    "BN_KINDS",
    "NORMALIZATION",
    "NORMALIZATION_NAME",
    "NUM_CLASSES",
    "OUTPUT_STRIDES",
    "STAGES",
    "VARIANTS",
    "WIDTHS",
    "BlockSpec",
    "ConvSpec",
    "Variant",
    "blocks",
    "check_output_stride",
    "check_variant",
    "convolutions",
    "expected_shapes",
    "grid",
    "out_features",
    "stem",
]
