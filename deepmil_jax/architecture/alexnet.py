"""The AlexNet architecture table: plain data, shared by the Flax model, the weight readers and the
PyTorch reference. Imports neither JAX nor numpy, so each of them can read it.

``CONV_SPECS`` lists the five convolutions of each variant, ``FC_SIZE``/``FC_GRID`` the fully
connected layers, ``LRNS`` the two cross-channel LRN flavours, ``NORMALIZATIONS`` the input
normalisation each weight source was trained with, and ``DEFAULTS`` the LRN and normalisation a
variant gets when none is named.
"""

from __future__ import annotations

from typing import NamedTuple

from deepmil_jax.errors import ConfigError


class ConvSpec(NamedTuple):
    """One convolution of the AlexNet features (square kernels, symmetric zero padding)."""

    name: str
    kernel: int
    stride: int
    padding: int
    in_features: int
    out_features: int
    groups: int


CONV_SPECS: dict[str, tuple[ConvSpec, ...]] = {
    # BVLC / convnets-keras AlexNet (the paper's); conv2, conv4, conv5 in two groups.
    "caffe": (
        ConvSpec("conv1", 11, 4, 0, 3, 96, 1),
        ConvSpec("conv2", 5, 1, 2, 96, 256, 2),
        ConvSpec("conv3", 3, 1, 1, 256, 384, 1),
        ConvSpec("conv4", 3, 1, 1, 384, 384, 2),
        ConvSpec("conv5", 3, 1, 1, 384, 256, 2),
    ),
    # torchvision.models.alexnet().features (the "one weird trick" variant).
    "torchvision": (
        ConvSpec("conv1", 11, 4, 2, 3, 64, 1),
        ConvSpec("conv2", 5, 1, 2, 64, 192, 1),
        ConvSpec("conv3", 3, 1, 1, 192, 384, 1),
        ConvSpec("conv4", 3, 1, 1, 384, 256, 1),
        ConvSpec("conv5", 3, 1, 1, 256, 256, 1),
    ),
}
CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_LAYERS = ("fc6", "fc7")
FC_SIZE = 4096
FC_GRID = 6  # the fully connected layers need the 6x6 map of a 227x227 input


class LRN(NamedTuple):
    """Cross-channel LRN ``x / (k + alpha * sum_{|c'-c| <= n//2} x_c'^2) ** beta``."""

    k: float
    alpha: float  # per squared element (Caffe's alpha / n)
    beta: float
    n: int
    before_pool: bool


LRNS: dict[str, LRN] = {
    "keras": LRN(2.0, 1e-4, 0.75, 5, False),  # convnets-keras crosschannelnormalization
    "caffe": LRN(1.0, 1e-4 / 5, 0.75, 5, True),  # Caffe LRNLayer, local_size 5, alpha 1e-4
}


class Normalization(NamedTuple):
    """``y[..., c] = (x[..., order[c]] * scale - mean[c]) / std[c]`` for RGB ``x`` on [0, 1].

    ``mean`` and ``std`` are listed in the channel order the weights expect (BGR when ``bgr``).
    """

    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool


NORMALIZATIONS: dict[str, Normalization] = {
    # convnets-keras preprocess_image_batch(color_mode="rgb"), the paper's code: RGB on 0-255.
    "keras": Normalization(255.0, (123.68, 116.779, 103.939), (1.0, 1.0, 1.0), False),
    # Caffe BVLC (and bvlc_alexnet.npy): BGR on 0-255 minus the ILSVRC-2012 mean image's
    # per-channel means, in BGR order.
    "caffe": Normalization(
        255.0, (104.00698793, 116.66876762, 122.67891434), (1.0, 1.0, 1.0), True
    ),
    # torchvision: RGB on [0, 1], ImageNet mean and std.
    "torchvision": Normalization(1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False),
}


class VariantDefaults(NamedTuple):
    """The LRN flavour (a key of ``LRNS``, or None) and normalisation a variant gets by default."""

    lrn: str | None
    normalization: str


DEFAULTS: dict[str, VariantDefaults] = {
    "caffe": VariantDefaults("keras", "keras"),  # the paper's convnets-keras weights
    "torchvision": VariantDefaults(None, "torchvision"),
}


def check_variant(variant: str) -> None:
    """Raise ConfigError unless ``variant`` is a key of ``CONV_SPECS``."""
    if variant not in CONV_SPECS:
        raise ConfigError(f"unknown AlexNet variant {variant!r}; choose one of {list(CONV_SPECS)}")


def expected_shapes(variant: str, *, fc: bool = True) -> dict[str, dict[str, tuple[int, ...]]]:
    """Canonical shapes of a variant's parameters: conv kernels HWIO ``(k, k, in/groups, out)``.

    With ``fc``, also ``fc6`` ``(6 * 6 * 256, 4096)`` (rows in NHWC-flatten order) and ``fc7``.
    """
    check_variant(variant)
    shapes = {
        s.name: {
            "kernel": (s.kernel, s.kernel, s.in_features // s.groups, s.out_features),
            "bias": (s.out_features,),
        }
        for s in CONV_SPECS[variant]
    }
    if fc:
        flat = FC_GRID * FC_GRID * CONV_SPECS[variant][-1].out_features
        shapes["fc6"] = {"kernel": (flat, FC_SIZE), "bias": (FC_SIZE,)}
        shapes["fc7"] = {"kernel": (FC_SIZE, FC_SIZE), "bias": (FC_SIZE,)}
    return shapes


__all__ = [
    "CONV_LAYERS",
    "CONV_SPECS",
    "DEFAULTS",
    "FC_GRID",
    "FC_LAYERS",
    "FC_SIZE",
    "LRN",
    "LRNS",
    "NORMALIZATIONS",
    "ConvSpec",
    "Normalization",
    "VariantDefaults",
    "check_variant",
    "expected_shapes",
]
