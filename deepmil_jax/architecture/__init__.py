"""The architecture tables: plain data (no JAX, no numpy), one module a backbone family, shared
by the Flax models, the weight readers and the PyTorch references.

``alexnet`` is re-exported here: the five convolutions of each variant, the fully connected
layers, the LRN flavours and the input normalisations.
"""

from deepmil_jax.architecture.alexnet import (
    CONV_LAYERS,
    CONV_SPECS,
    DEFAULTS,
    FC_GRID,
    FC_LAYERS,
    FC_SIZE,
    LRN,
    LRNS,
    NORMALIZATIONS,
    ConvSpec,
    Normalization,
    VariantDefaults,
    check_variant,
    expected_shapes,
)

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
