"""Reader of convnets-keras' ``alexnet_weights.h5``, the weights the paper's code used.

Filters 96-256-384-384-256; conv2, conv4, conv5 in two groups, stored as separate layers
``conv_2_1``/``conv_2_2`` etc. Keras 1 with the Theano backend: kernels ``(out, in, kh, kw)`` and
Theano's ``conv2d`` is a *true* convolution (it flips the kernel), so every kernel is rotated by
180 degrees here to become the cross-correlation kernel that XLA applies.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from deepmil_jax.architecture import CONV_SPECS, FC_GRID, FC_SIZE, ConvSpec
from deepmil_jax.errors import WeightsError
from deepmil_jax.weights.common import (
    Params,
    check_shape,
    chw_rows_to_hwc,
    f32,
    one_line,
    weights_array,
)

# canonical layer -> convnets-keras layer names (two for the grouped convolutions)
_CONV_LAYERS = {
    "conv1": ("conv_1",),
    "conv2": ("conv_2_1", "conv_2_2"),
    "conv3": ("conv_3",),
    "conv4": ("conv_4_1", "conv_4_2"),
    "conv5": ("conv_5_1", "conv_5_2"),
}
_FC_LAYERS = {"fc6": "dense_1", "fc7": "dense_2"}


def theano_kernel_to_hwio(kernel: np.ndarray) -> np.ndarray:
    """Theano ``conv2d`` kernel ``(out, in, kh, kw)`` (true convolution) -> HWIO cross-correlation.

    Theano's ``conv2d`` (``filter_flip=True``, what Keras 1 used) computes
    ``y[o, i, j] = sum_{c, u, v} x[c, i + u, j + v] * W[o, c, kh - 1 - u, kw - 1 - v]``; XLA's
    convolution does not flip, so the kernel is rotated by 180 degrees before the transpose.
    """
    return np.ascontiguousarray(kernel[:, :, ::-1, ::-1].transpose(2, 3, 1, 0))


_HINT = "is this convnets-keras' AlexNet alexnet_weights.h5?"


def _weight_names(group: Any, layer: str, where: str) -> list[str]:
    """The names in a layer's ``weight_names`` attribute (bytes or str, one or a list)."""
    raw = group.attrs.get("weight_names")
    if raw is None:
        return []
    values = np.asarray(raw).reshape(-1)
    if values.dtype.kind == "S":
        return [v.decode("utf-8", errors="replace") for v in values]
    if values.dtype.kind == "U" or (
        values.dtype.kind == "O" and all(isinstance(v, (str, bytes)) for v in values)
    ):
        return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v for v in values]
    raise WeightsError(
        f"{where}: layer {layer!r} has a weight_names attribute of {values.dtype} values, not "
        f"dataset names; {_HINT}"
    )


def _layer_arrays(root: Any, layer: str, where: str) -> tuple[Any, Any] | None:
    """(kernel, bias) datasets of one Keras layer group (the 1-D one is the bias); None if empty.

    The datasets are returned unread, so that their shapes are checked before any data is read.
    """
    group = root[layer]
    if not isinstance(group, h5py.Group):
        raise WeightsError(
            f"{where}: {layer!r} is a {type(group).__name__}, not a layer group holding weight "
            f"datasets; {_HINT}"
        )
    names = _weight_names(group, layer, where)
    if not names:  # no attribute: every dataset under the group
        group.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
    datasets = []
    for n in names:
        try:
            obj = group.get(n)
        except Exception:  # a dangling external or soft link, a name h5py cannot use
            obj = None
        if not isinstance(obj, h5py.Dataset):
            what = "which does not exist" if obj is None else f"which is a {type(obj).__name__}"
            raise WeightsError(
                f"{where}: layer {layer!r} lists weight {n!r} in its weight_names attribute, "
                f"{what}, not a dataset; the file is damaged; {_HINT}"
            )
        datasets.append(obj)
    if not datasets:
        return None
    shapes = [tuple(d.shape or ()) for d in datasets]
    kernels = [d for d, s in zip(datasets, shapes, strict=True) if len(s) > 1]
    biases = [d for d, s in zip(datasets, shapes, strict=True) if len(s) == 1]
    if len(kernels) != 1 or len(biases) != 1:
        raise WeightsError(
            f"{where}: layer {layer!r} holds weights {names} of shapes {shapes}; expected one "
            "kernel and one bias"
        )
    return kernels[0], biases[0]


def read_keras_h5(path: str | os.PathLike) -> Params:
    """Read convnets-keras' ``alexnet_weights.h5`` (Keras 1 weights file, Theano layout).

    Layout: the root (or ``model_weights`` of a full-model file) has attribute ``layer_names``; each
    layer is a group whose ``weight_names`` attribute lists its datasets, e.g. ``conv_1/conv_1_W``
    ``(96, 3, 11, 11)`` and ``conv_1/conv_1_b`` ``(96,)``. Grouped layers are split in two:
    ``conv_2_1``/``conv_2_2`` ``(128, 48, 5, 5)``, ``conv_4_{1,2}`` ``(192, 192, 3, 3)``,
    ``conv_5_{1,2}`` ``(128, 192, 3, 3)``. ``dense_1`` ``(9216, 4096)`` (inputs in the (C, H, W)
    order of a Theano flatten) and ``dense_2`` ``(4096, 4096)`` are kept as fc6 and fc7.
    """
    where = str(path)
    if not Path(where).is_file():
        raise WeightsError(f"{where}: no such file")
    try:
        f = h5py.File(where, "r")
    except OSError as e:
        raise WeightsError(
            f"{where}: is not an HDF5 file ({e}); --format=keras_h5 expects convnets-keras' "
            "alexnet_weights.h5"
        ) from e
    with f:
        try:
            return _read_root(f, where)
        except WeightsError:
            raise
        except Exception as e:  # h5py raises OSError, KeyError, ValueError, ... on damaged files
            raise WeightsError(
                f"{where}: cannot read the HDF5 content ({one_line(f'{type(e).__name__}: {e}')}); "
                f"the file is damaged; {_HINT}"
            ) from e


def _read_root(f: Any, where: str) -> Params:
    root = f.get("model_weights", f) if "model_weights" in f else f
    if not isinstance(root, h5py.Group):
        raise WeightsError(
            f"{where}: 'model_weights' is a {type(root).__name__}, not a group of layers; {_HINT}"
        )
    layers = set(root.keys())
    params: Params = {s.name: _read_conv(root, layers, s, where) for s in CONV_SPECS["caffe"]}
    channels = CONV_SPECS["caffe"][-1].out_features
    fc_in = {"fc6": FC_GRID * FC_GRID * channels, "fc7": FC_SIZE}
    for name, layer in _FC_LAYERS.items():
        arrays = _layer_arrays(root, layer, where) if layer in layers else None
        if arrays is None:
            continue
        w, b = arrays
        kernel_name, bias_name = f"layer {layer!r} kernel", f"layer {layer!r} bias"
        check_shape(where, kernel_name, w, (fc_in[name], FC_SIZE), "Keras Dense (in, out)")
        check_shape(where, bias_name, b, (FC_SIZE,), "bias")
        w = weights_array(where, kernel_name, w)
        b = weights_array(where, bias_name, b)
        if name == "fc6":
            w = chw_rows_to_hwc(w, channels)
        params[name] = {"kernel": f32(w), "bias": b}
    return params


def _read_conv(root: Any, layers: set[str], spec: ConvSpec, where: str) -> dict[str, np.ndarray]:
    """One canonical conv layer from its one or two (grouped) convnets-keras layers."""
    g = spec.groups
    shape = (spec.out_features // g, spec.in_features // g, spec.kernel, spec.kernel)
    kernels, biases = [], []
    for part in _CONV_LAYERS[spec.name]:
        if part not in layers:
            raise WeightsError(
                f"{where}: layer {part!r} is missing (expected kernel {shape} and bias "
                f"({spec.out_features // g},)); found layers {sorted(layers)}; {_HINT}"
            )
        arrays = _layer_arrays(root, part, where)
        if arrays is None:
            raise WeightsError(
                f"{where}: layer {part!r} holds no weights (expected kernel {shape}); {_HINT}"
            )
        w, b = arrays
        kernel_name, bias_name = f"layer {part!r} kernel", f"layer {part!r} bias"
        check_shape(where, kernel_name, w, shape, "Theano layout (out, in, kh, kw)")
        check_shape(where, bias_name, b, (spec.out_features // g,), "bias")
        kernels.append(weights_array(where, kernel_name, w))
        biases.append(weights_array(where, bias_name, b))
    w = np.concatenate(kernels, axis=0)  # group i -> output channels of block i
    return {"kernel": f32(theano_kernel_to_hwio(w)), "bias": f32(np.concatenate(biases))}
