"""What the weight readers share: the canonical parameter tree, its validation, array checks."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from deepmil_jax.architecture import FC_GRID, expected_shapes
from deepmil_jax.errors import WeightsError

# {"conv1": {"kernel": (kh, kw, in/groups, out), "bias": (out,)}, ..., optionally "fc6", "fc7"}
Params = dict[str, dict[str, np.ndarray]]


def check_layers(
    params: Mapping[str, Mapping[str, Any]],
    expected: Mapping[str, Mapping[str, tuple[int, ...]]],
    where: str,
    network: str,
    optional: Collection[str] = ("fc",),
) -> None:
    """Raise WeightsError unless ``params`` has every layer of ``expected`` (layer -> kind ->
    shape) at its shapes; a layer in ``optional`` (the ImageNet classifier) may be absent, but is
    checked when present. ``where`` names the file, ``network`` the model ("the caffe AlexNet").
    """
    for layer, shapes in expected.items():
        if layer not in params:
            if layer in optional:
                continue
            raise WeightsError(
                f"{where}: layer {layer!r} is missing ({len(params)} layers found); {network} "
                "needs " + ", ".join(f"{kind} {shape}" for kind, shape in shapes.items())
            )
        for kind, shape in shapes.items():
            got = params[layer].get(kind)
            if got is None:
                raise WeightsError(f"{where}: layer {layer!r} has no {kind}; expected {shape}")
            if tuple(np.shape(got)) != shape:
                raise WeightsError(
                    f"{where}: layer {layer!r} {kind} has shape {tuple(np.shape(got))}, expected "
                    f"{shape} for {network}"
                )


def validate(params: Mapping[str, Mapping[str, Any]], variant: str, where: str) -> None:
    """Raise WeightsError unless ``params`` has every conv layer of ``variant`` at the right shape.

    ``fc6``/``fc7`` are optional, but checked when present. ``where`` names the file in messages.
    """
    shapes = expected_shapes(variant)
    fc = [layer for layer in shapes if layer.startswith("fc")]
    check_layers(params, shapes, where, f"the {variant} AlexNet", optional=fc)


def chw_rows_to_hwc(kernel: np.ndarray, channels: int) -> np.ndarray:
    """Reorder the rows of a (C*6*6, out) fc6 kernel from a (C, H, W) flatten to (H, W, C)."""
    out = kernel.shape[1]
    k = kernel.reshape(channels, FC_GRID, FC_GRID, out).transpose(1, 2, 0, 3)
    return k.reshape(FC_GRID * FC_GRID * channels, out)


def check_shape(where: str, name: str, array: Any, shape: tuple[int, ...], note: str) -> None:
    """Raise WeightsError unless ``array.shape == shape``; checked before any data is read."""
    if tuple(array.shape) != shape:
        raise WeightsError(
            f"{where}: {name} has shape {tuple(array.shape)}, expected {shape} ({note})"
        )


def f32(a: Any) -> np.ndarray:
    """``a`` as a C-contiguous float32 array."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def weights_array(where: str, name: str, value: Any) -> np.ndarray:
    """``value`` as a float32 array, refusing non-numbers and NaN/inf (a damaged or diverged file).

    ``name`` ("layer 'conv_1' kernel", "key 'features.0.weight'") is the file's own name for the
    weight, so the message points at it.
    """
    try:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{array.dtype} values")
        array = f32(array)
    except Exception as e:  # strings, objects, complex numbers, unreadable data
        detail = f"{type(e).__name__}: {e}".strip()
        raise WeightsError(
            f"{where}: {name} does not hold real numbers ({detail}); the file is damaged or not "
            "an AlexNet weights file"
        ) from e
    if not np.all(np.isfinite(array)):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise WeightsError(
            f"{where}: {name} holds {bad} NaN or infinite value(s); the file is damaged or was "
            "saved from a diverged model. Use an intact copy of the pretrained file"
        )
    return array


def one_line(text: str) -> str:
    """``text`` without terminal colour codes, its whitespace (newlines too) collapsed."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())
