"""Converting pretrained AlexNet files into deepmil-jax parameters (numpy only; no Flax here).

Three sources are understood (``FORMATS``):

``torchvision``
    ``alexnet-owt-*.pth``, the ``state_dict`` of ``torchvision.models.alexnet`` (filters
    64-192-384-256-256, no groups, no LRN). Read with ``torch.load(weights_only=True)``, so
    torch is needed (the ``torch`` extra). Kernels are ``(out, in, kh, kw)`` cross-correlations.
``keras_h5``
    ``alexnet_weights.h5`` of heuritech/convnets-keras, the weights the paper's code used
    (filters 96-256-384-384-256; conv2, conv4, conv5 in two groups, stored as separate layers
    ``conv_2_1``/``conv_2_2`` etc.). Keras 1 with the Theano backend: kernels ``(out, in, kh,
    kw)`` and Theano's ``conv2d`` is a *true* convolution (it flips the kernel), so every kernel
    is rotated by 180 degrees here to become the cross-correlation kernel that XLA applies.
``caffe_npy``
    ``bvlc_alexnet.npy`` (Guerzhoy & Frossard's conversion of Caffe's BVLC AlexNet with
    caffe-tensorflow): an ``np.save`` of a dict ``{layer: [W, b]}``, ``W`` in HWIO layout
    (cross-correlation), grouped layers holding ``in/groups`` input channels.

Every reader returns the canonical parameter tree: ``{"conv1": {"kernel": (kh, kw, in/groups,
out), "bias": (out,)}, ..., "conv5": ..., optionally "fc6": {"kernel": (9216, 4096), "bias"},
"fc7": {"kernel": (4096, 4096), "bias"}}``, float32, with ``fc6`` rows in the (h, w, channel)
order of an NHWC flatten of the 6x6x256 map. ``fc8`` (1000 ImageNet classes) is not kept.

Each source also fixes the input normalisation and the LRN flavour that the weights were trained
with (see ``SOURCES``); both are written to ``metadata.json`` and read back by
``AlexNet.from_pretrained``:

============  ========  =============  ==================================================
source        variant   lrn            normalization
============  ========  =============  ==================================================
torchvision   torch.    none           ``torchvision``: RGB on [0, 1], mean (0.485, 0.456,
                                       0.406), std (0.229, 0.224, 0.225)
keras_h5      caffe     ``keras``      ``keras``: RGB on [0, 255] minus (123.68, 116.779,
                                       103.939) in RGB order (convnets-keras
                                       ``preprocess_image_batch``, ``color_mode='rgb'``)
caffe_npy     caffe     ``caffe``      ``caffe``: BGR on [0, 255] minus the BVLC ImageNet
                                       mean (104.007, 116.669, 122.679) in BGR order
============  ========  =============  ==================================================

The ``keras`` LRN is convnets-keras' ``crosschannelnormalization`` (after the max pooling,
``x / (2 + 1e-4 * sum_5 x^2) ** 0.75``), the ``caffe`` LRN is Caffe's (before the pooling,
``x / (1 + 1e-4 / 5 * sum_5 x^2) ** 0.75``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from deepmil_jax.errors import ConfigError, WeightsError

FORMATS = ("torchvision", "keras_h5", "caffe_npy")
METADATA_FILE = "metadata.json"
PARAMS_DIR = "params"
METADATA_VERSION = 1

Params = dict[str, dict[str, np.ndarray]]


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
FC_SIZE = 4096
FC_GRID = 6  # the fully connected layers need the 6x6 map of a 227x227 input


class Source(NamedTuple):
    variant: str
    lrn: str | None
    normalization: str
    description: str


SOURCES: dict[str, Source] = {
    "torchvision": Source(
        "torchvision", None, "torchvision", "torchvision.models.alexnet state_dict (.pth)"
    ),
    "keras_h5": Source("caffe", "keras", "keras", "convnets-keras alexnet_weights.h5 (Theano)"),
    "caffe_npy": Source("caffe", "caffe", "caffe", "bvlc_alexnet.npy (Caffe BVLC AlexNet)"),
}


def expected_shapes(variant: str, *, fc: bool = True) -> dict[str, dict[str, tuple[int, ...]]]:
    """Canonical shapes of a variant's parameters: conv kernels HWIO ``(k, k, in/groups, out)``."""
    if variant not in CONV_SPECS:
        raise ConfigError(f"unknown AlexNet variant {variant!r}; choose one of {list(CONV_SPECS)}")
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


def validate(params: Mapping[str, Mapping[str, Any]], variant: str, where: str) -> None:
    """Raise WeightsError unless ``params`` has every conv layer of ``variant`` at the right shape.

    ``fc6``/``fc7`` are optional, but checked when present. ``where`` names the file in messages.
    """
    for layer, shapes in expected_shapes(variant).items():
        if layer not in params:
            if layer.startswith("fc"):
                continue
            raise WeightsError(
                f"{where}: layer {layer!r} is missing (found {sorted(params)}); expected "
                f"kernel {shapes['kernel']} and bias {shapes['bias']} for the {variant} AlexNet"
            )
        for kind, shape in shapes.items():
            got = params[layer].get(kind)
            if got is None:
                raise WeightsError(f"{where}: layer {layer!r} has no {kind}; expected {shape}")
            if tuple(got.shape) != shape:
                raise WeightsError(
                    f"{where}: layer {layer!r} {kind} has shape {tuple(got.shape)}, expected "
                    f"{shape} for the {variant} AlexNet"
                )


def _chw_rows_to_hwc(kernel: np.ndarray, channels: int) -> np.ndarray:
    """Reorder the rows of a (C*6*6, out) fc6 kernel from a (C, H, W) flatten to (H, W, C)."""
    out = kernel.shape[1]
    k = kernel.reshape(channels, FC_GRID, FC_GRID, out).transpose(1, 2, 0, 3)
    return k.reshape(FC_GRID * FC_GRID * channels, out)


def _check(where: str, name: str, array: np.ndarray, shape: tuple[int, ...], note: str) -> None:
    if tuple(array.shape) != shape:
        raise WeightsError(
            f"{where}: {name} has shape {tuple(array.shape)}, expected {shape} ({note})"
        )


def _f32(a: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def _weights_array(where: str, name: str, value: Any) -> np.ndarray:
    """``value`` as a float32 array, refusing non-numbers and NaN/inf (a damaged or diverged file).

    ``name`` ("layer 'conv_1' kernel", "key 'features.0.weight'") is the file's own name for the
    weight, so the message points at it.
    """
    try:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{array.dtype} values")
        array = _f32(array)
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


def _one_line(text: str) -> str:
    """``text`` without terminal colour codes, its whitespace (newlines too) collapsed."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())


def _torch_load_cause(e: BaseException) -> str:
    """The whole cause of a ``torch.load`` failure, on one line.

    For ``weights_only`` refusals torch wraps the cause ("WeightsUnpickler error: Unsupported
    global: ...") in advice to load with ``weights_only=False``, which we never give; keep only
    the cause.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\s*\n|$)", text, re.S)
    return f"{type(e).__name__}: {_one_line(m.group(1) if m else text)}".rstrip(": ")


# ----------------------------------------------------------------------------- torchvision


_TV_CONV_KEYS = {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 10}
_TV_FC_KEYS = {"fc6": 1, "fc7": 4}


def read_torchvision(path: str | os.PathLike) -> Params:
    """Read a ``torchvision.models.alexnet`` state_dict (``alexnet-owt-*.pth``).

    Keys ``features.{0,3,6,8,10}.{weight,bias}`` (kernels ``(out, in, kh, kw)``) and, if present,
    ``classifier.{1,4}.{weight,bias}`` (``(out, in)``, fc6 inputs in (C, H, W) order).
    """
    where = str(path)
    try:
        import torch
    except ImportError as e:
        raise WeightsError(
            f"{where}: reading a torchvision .pth file needs PyTorch, which is not installed; "
            "install it with `pip install 'deepmil-jax[torch]'` (the CPU build is enough)"
        ) from e
    try:
        state = torch.load(where, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise WeightsError(f"{where}: no such file") from e
    except Exception as e:  # torch raises many kinds for a file that is not a state_dict
        raise WeightsError(
            f"{where}: cannot be read as a PyTorch state_dict with torch.load(weights_only=True) "
            f"({_torch_load_cause(e)}); --format=torchvision expects "
            "torchvision's alexnet-owt-*.pth"
        ) from e
    if (
        isinstance(state, Mapping)
        and "state_dict" in state
        and isinstance(state["state_dict"], Mapping)
    ):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{where}: holds a {type(state).__name__}, not a state_dict (a dict)")
    state = {str(k).removeprefix("module."): v for k, v in state.items()}

    def get(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in state:
            raise WeightsError(
                f"{where}: key {key!r} is missing (expected shape {shape}); found keys "
                f"{sorted(state)[:20]}; is this torchvision's AlexNet state_dict?"
            )
        value = state[key]
        if isinstance(value, torch.Tensor):
            _check(where, f"key {key!r}", value, shape, "torchvision AlexNet")
            try:  # bfloat16, half, quantized or sparse tensors: to a dense float32 first
                value = value.detach().cpu()
                value = value.dequantize() if value.is_quantized else value
                value = value.to_dense() if value.layout != torch.strided else value
                value = value.to(torch.float32).numpy()
            except Exception as e:
                raise WeightsError(
                    f"{where}: key {key!r} is a {value.dtype} tensor that cannot be converted to "
                    f"float32 ({_one_line(f'{type(e).__name__}: {e}')})"
                ) from e
        else:
            value = _weights_array(where, f"key {key!r}", value)
            _check(where, f"key {key!r}", value, shape, "torchvision AlexNet")
        return _weights_array(where, f"key {key!r}", value)

    params: Params = {}
    for spec in CONV_SPECS["torchvision"]:
        i = _TV_CONV_KEYS[spec.name]
        k = spec.kernel
        w = get(f"features.{i}.weight", (spec.out_features, spec.in_features, k, k))
        b = get(f"features.{i}.bias", (spec.out_features,))
        params[spec.name] = {"kernel": _f32(w.transpose(2, 3, 1, 0)), "bias": b}
    channels = CONV_SPECS["torchvision"][-1].out_features
    fc_in = {"fc6": FC_GRID * FC_GRID * channels, "fc7": FC_SIZE}
    for name, i in _TV_FC_KEYS.items():
        if f"classifier.{i}.weight" not in state:
            continue
        w = get(f"classifier.{i}.weight", (FC_SIZE, fc_in[name])).T
        if name == "fc6":
            w = _chw_rows_to_hwc(w, channels)
        params[name] = {"kernel": _f32(w), "bias": get(f"classifier.{i}.bias", (FC_SIZE,))}
    return params


# ----------------------------------------------------------------------------- keras_h5


# canonical layer -> convnets-keras layer names (two for the grouped convolutions)
_KERAS_CONV_LAYERS = {
    "conv1": ("conv_1",),
    "conv2": ("conv_2_1", "conv_2_2"),
    "conv3": ("conv_3",),
    "conv4": ("conv_4_1", "conv_4_2"),
    "conv5": ("conv_5_1", "conv_5_2"),
}
_KERAS_FC_LAYERS = {"fc6": "dense_1", "fc7": "dense_2"}


def theano_kernel_to_hwio(kernel: np.ndarray) -> np.ndarray:
    """Theano ``conv2d`` kernel ``(out, in, kh, kw)`` (true convolution) -> HWIO cross-correlation.

    Theano's ``conv2d`` (``filter_flip=True``, what Keras 1 used) computes
    ``y[o, i, j] = sum_{c, u, v} x[c, i + u, j + v] * W[o, c, kh - 1 - u, kw - 1 - v]``; XLA's
    convolution does not flip, so the kernel is rotated by 180 degrees before the transpose.
    """
    return np.ascontiguousarray(kernel[:, :, ::-1, ::-1].transpose(2, 3, 1, 0))


_KERAS_HINT = "is this convnets-keras' AlexNet alexnet_weights.h5?"


def _keras_weight_names(group: Any, layer: str, where: str) -> list[str]:
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
        f"dataset names; {_KERAS_HINT}"
    )


def _keras_layer_arrays(root: Any, layer: str, where: str) -> tuple[Any, Any] | None:
    """(kernel, bias) datasets of one Keras layer group (the 1-D one is the bias); None if empty.

    The datasets are returned unread, so that their shapes are checked before any data is read.
    """
    import h5py

    group = root[layer]
    if not isinstance(group, h5py.Group):
        raise WeightsError(
            f"{where}: {layer!r} is a {type(group).__name__}, not a layer group holding weight "
            f"datasets; {_KERAS_HINT}"
        )
    names = _keras_weight_names(group, layer, where)
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
                f"{what}, not a dataset; the file is damaged; {_KERAS_HINT}"
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
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is a dependency
        raise WeightsError("reading a Keras .h5 file needs h5py: `pip install h5py`") from e
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
            return _read_keras_root(f, where)
        except WeightsError:
            raise
        except Exception as e:  # h5py raises OSError, KeyError, ValueError, ... on damaged files
            raise WeightsError(
                f"{where}: cannot read the HDF5 content ({_one_line(f'{type(e).__name__}: {e}')}); "
                f"the file is damaged; {_KERAS_HINT}"
            ) from e


def _read_keras_root(f: Any, where: str) -> Params:
    import h5py

    root = f.get("model_weights", f) if "model_weights" in f else f
    if not isinstance(root, h5py.Group):
        raise WeightsError(
            f"{where}: 'model_weights' is a {type(root).__name__}, not a group of layers; "
            f"{_KERAS_HINT}"
        )
    layers = set(root.keys())
    params: Params = {}
    for spec in CONV_SPECS["caffe"]:
        parts = _KERAS_CONV_LAYERS[spec.name]
        k, g = spec.kernel, spec.groups
        kernels, biases = [], []
        for part in parts:
            shape = (spec.out_features // g, spec.in_features // g, k, k)
            if part not in layers:
                raise WeightsError(
                    f"{where}: layer {part!r} is missing (expected kernel {shape} and bias "
                    f"({spec.out_features // g},)); found layers {sorted(layers)}; "
                    "is this convnets-keras' AlexNet alexnet_weights.h5?"
                )
            arrays = _keras_layer_arrays(root, part, where)
            if arrays is None:
                raise WeightsError(
                    f"{where}: layer {part!r} holds no weights (expected kernel {shape}); "
                    "is this convnets-keras' AlexNet alexnet_weights.h5?"
                )
            w, b = arrays
            _check(where, f"layer {part!r} kernel", w, shape, "Theano layout (out, in, kh, kw)")
            _check(where, f"layer {part!r} bias", b, (spec.out_features // g,), "bias")
            kernels.append(_weights_array(where, f"layer {part!r} kernel", w))
            biases.append(_weights_array(where, f"layer {part!r} bias", b))
        w = np.concatenate(kernels, axis=0)  # group i -> output channels of block i
        params[spec.name] = {
            "kernel": _f32(theano_kernel_to_hwio(w)),
            "bias": _f32(np.concatenate(biases)),
        }
    channels = CONV_SPECS["caffe"][-1].out_features
    fc_in = {"fc6": FC_GRID * FC_GRID * channels, "fc7": FC_SIZE}
    for name, layer in _KERAS_FC_LAYERS.items():
        arrays = _keras_layer_arrays(root, layer, where) if layer in layers else None
        if arrays is None:
            continue
        w, b = arrays
        _check(where, f"layer {layer!r} kernel", w, (fc_in[name], FC_SIZE), "Keras Dense (in, out)")
        _check(where, f"layer {layer!r} bias", b, (FC_SIZE,), "bias")
        w = _weights_array(where, f"layer {layer!r} kernel", w)
        b = _weights_array(where, f"layer {layer!r} bias", b)
        if name == "fc6":
            w = _chw_rows_to_hwc(w, channels)
        params[name] = {"kernel": _f32(w), "bias": b}
    return params


# ----------------------------------------------------------------------------- caffe_npy


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """What Python 3 protocol-2 pickles call (as ``_codecs.encode``) to rebuild ``bytes``."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    from numpy._core import multiarray, numeric

    allowed = {
        "_reconstruct": multiarray._reconstruct,
        "scalar": multiarray.scalar,
        "_frombuffer": numeric._frombuffer,
    }
    table: dict[tuple[str, str], Any] = {}
    for prefix in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x pickles
        table[(f"{prefix}.multiarray", "_reconstruct")] = allowed["_reconstruct"]
        table[(f"{prefix}.multiarray", "scalar")] = allowed["scalar"]
        table[(f"{prefix}.numeric", "_frombuffer")] = allowed["_frombuffer"]
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    table[("_codecs", "encode")] = _latin1_encode
    return table


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays, dtypes and plain Python containers.

    Why this is safe: a pickle runs code only through the callables it names with the GLOBAL /
    STACK_GLOBAL / EXT opcodes, all of which are resolved by ``find_class`` (and
    ``persistent_load``, which the base class refuses). Here ``find_class`` returns objects from a
    fixed table (numpy's array reconstruction ``_reconstruct``, ``ndarray``, ``dtype``,
    ``scalar`` and ``_frombuffer``, which only allocate arrays and copy bytes into them, and a
    stand-in for ``_codecs.encode`` that only turns a str into latin-1 bytes) and
    refuses every other name without importing anything, so ``os.system``, ``builtins.eval``,
    ``subprocess.Popen`` or any other callable can never be reached. Lists, tuples, dicts, strings
    and numbers are built by opcodes that call nothing.
    """

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _numpy_globals()
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent ids")


def load_npy_pickle_safely(path: str | os.PathLike) -> Any:
    """Read an ``.npy`` file holding a pickled object (``np.save(allow_pickle=True)``) safely.

    ``np.load(allow_pickle=False)`` refuses such files and ``allow_pickle=True`` would run any code
    a malicious file names; this parses the ``.npy`` header itself and unpickles the payload with
    :class:`RestrictedUnpickler`. Python 2 pickles (the 2016 ``bvlc_alexnet.npy``) are read with
    ``encoding='latin1'``, as numpy recommends for arrays. Returns the 0-d array's item (a dict
    for ``bvlc_alexnet.npy``); a ``.npy`` without objects is refused (it cannot hold layers).
    """
    where = str(path)
    if not Path(where).is_file():
        raise WeightsError(f"{where}: no such file")
    with open(where, "rb") as fp:
        try:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except (ValueError, OSError) as e:
            raise WeightsError(
                f"{where}: is not a .npy file ({e}); --format=caffe_npy expects bvlc_alexnet.npy"
            ) from e
        if not dtype.hasobject:
            raise WeightsError(
                f"{where}: holds a plain {dtype} array of shape {shape}, not a pickled dict of "
                "layers; --format=caffe_npy expects bvlc_alexnet.npy"
            )
        try:
            obj = RestrictedUnpickler(fp, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise WeightsError(f"{where}: unsafe or unreadable pickle: {e}") from e
        except Exception as e:
            raise WeightsError(
                f"{where}: cannot unpickle its content ({type(e).__name__}: {e})"
            ) from e
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == ():
        return obj.item()
    return obj


def _key(k: Any) -> str:
    """A pickled dict key as text (Python 2 pickles give bytes, not always UTF-8)."""
    return k.decode("utf-8", errors="replace") if isinstance(k, bytes) else str(k)


def _caffe_pair(value: Any, layer: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(value, Mapping):  # newer caffe-tensorflow: {"weights": W, "biases": b}
        value = {_key(k): v for k, v in value.items()}
        value = [value.get("weights"), value.get("biases")]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise WeightsError(
            f"{where}: layer {layer!r} holds {type(value).__name__}, expected a pair [W, b]"
        )
    w, b = (np.asarray(v) if isinstance(v, np.ndarray) else v for v in value)
    if not (isinstance(w, np.ndarray) and isinstance(b, np.ndarray)):
        raise WeightsError(f"{where}: layer {layer!r} does not hold two numpy arrays [W, b]")
    return w, b


def read_caffe_npy(path: str | os.PathLike) -> Params:
    """Read ``bvlc_alexnet.npy``: ``{"conv1": [W (11, 11, 3, 96), b (96,)], ..., "fc8": ...}``.

    Kernels are HWIO cross-correlations, grouped ones with ``in/2`` input channels (conv2
    ``(5, 5, 48, 256)``, conv4 ``(3, 3, 192, 384)``, conv5 ``(3, 3, 192, 256)``); ``fc6``
    ``(9216, 4096)`` has rows in the (H, W, C) order of TensorFlow's flatten. Never executes code
    (see :func:`load_npy_pickle_safely`).
    """
    where = str(path)
    data = load_npy_pickle_safely(where)
    if not isinstance(data, Mapping):
        raise WeightsError(
            f"{where}: holds a {type(data).__name__}, not a dict of layers; --format=caffe_npy "
            "expects bvlc_alexnet.npy (a pickled dict {layer: [W, b]})"
        )
    data = {_key(k): v for k, v in data.items()}
    shapes = expected_shapes("caffe")
    params: Params = {}
    for layer, shape in shapes.items():
        if layer not in data:
            if layer.startswith("fc"):
                continue
            raise WeightsError(
                f"{where}: layer {layer!r} is missing (expected W {shape['kernel']} and b "
                f"{shape['bias']}); found layers {sorted(data)}; is this bvlc_alexnet.npy?"
            )
        w, b = _caffe_pair(data[layer], layer, where)
        _check(where, f"layer {layer!r} W", w, shape["kernel"], "HWIO (kh, kw, in/groups, out)")
        _check(where, f"layer {layer!r} b", b, shape["bias"], "bias")
        params[layer] = {
            "kernel": _weights_array(where, f"layer {layer!r} W", w),
            "bias": _weights_array(where, f"layer {layer!r} b", b),
        }
    return params


# ----------------------------------------------------------------------------- files


_READERS = {
    "torchvision": read_torchvision,
    "keras_h5": read_keras_h5,
    "caffe_npy": read_caffe_npy,
}


def read_weights(fmt: str, path: str | os.PathLike) -> tuple[Params, dict[str, Any]]:
    """Read a pretrained file of format ``fmt``; returns (canonical params, metadata dict)."""
    if fmt not in _READERS:
        raise ConfigError(f"unknown weights format {fmt!r}; choose one of {list(FORMATS)}")
    params = _READERS[fmt](path)
    source = SOURCES[fmt]
    validate(params, source.variant, str(path))
    metadata = {
        "metadata_version": METADATA_VERSION,
        "variant": source.variant,
        "source": fmt,
        "source_description": source.description,
        "input_file": Path(path).name,
        "normalization": source.normalization,
        "lrn": source.lrn,
        "layers": sorted(params),
    }
    return params, metadata


def save_converted(
    params: Params,
    metadata: Mapping[str, Any],
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``params`` as an Orbax checkpoint in ``output/params`` and ``output/metadata.json``.

    Refuses (ConfigError) a non-empty ``output`` unless ``overwrite``; then only ``params/`` and
    ``metadata.json`` are replaced, other files in the folder are left alone.
    """
    import orbax.checkpoint as ocp

    out = Path(output).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output={out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"--output={out} exists and is not empty; choose a new folder or pass --overwrite"
            )
        shutil.rmtree(out / PARAMS_DIR, ignore_errors=True)
        (out / METADATA_FILE).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out / PARAMS_DIR, {k: dict(v) for k, v in params.items()})
    (out / METADATA_FILE).write_text(json.dumps(dict(metadata), indent=2) + "\n")
    return out


def load_converted(
    path: str | os.PathLike, *, layers: Iterable[str] | None = None
) -> tuple[Params, dict[str, Any]]:
    """Read a ``convert_weights`` output folder: (canonical params as numpy, metadata dict).

    ``layers`` restricts the restore to those layers (those the folder lacks are skipped), so the
    features alone do not read the 150 MB of fc6.
    """
    import orbax.checkpoint as ocp

    root = Path(path).expanduser().absolute()
    meta_file = root / METADATA_FILE
    if not meta_file.is_file() or not (root / PARAMS_DIR).is_dir():
        raise WeightsError(
            f"{root}: is not a convert_weights output (no {METADATA_FILE} or {PARAMS_DIR}/); "
            "create one with `python -m deepmil_jax.convert_weights`"
        )
    try:
        metadata = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{meta_file}: is not valid JSON ({e})") from e
    for key in ("variant", "normalization", "layers"):
        if key not in metadata:
            raise WeightsError(f"{meta_file}: has no {key!r} entry")
    if metadata["variant"] not in CONV_SPECS:
        raise WeightsError(f"{meta_file}: unknown variant {metadata['variant']!r}")
    wanted = [n for n in metadata["layers"] if layers is None or n in set(layers)]
    item = {n: {"kernel": 0, "bias": 0} for n in wanted}
    restore_args = {
        n: {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in ("kernel", "bias")} for n in wanted
    }
    try:
        with ocp.PyTreeCheckpointer() as ckpt:
            restored = ckpt.restore(
                root / PARAMS_DIR,
                args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True
                ),
            )
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise WeightsError(f"{root / PARAMS_DIR}: cannot restore layers {wanted} ({e})") from e
    params = {
        layer: {kind: np.asarray(v, dtype=np.float32) for kind, v in arrays.items()}
        for layer, arrays in restored.items()
    }
    if layers is None or any(name.startswith("conv") for name in wanted):
        validate(params, metadata["variant"], str(root))
    return params, metadata


def convert(
    fmt: str, input_path: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Read ``input_path`` as ``fmt`` and write the converted folder ``output``; returns it."""
    if Path(output).expanduser().absolute() == Path(input_path).expanduser().absolute():
        raise ConfigError("--output must be a folder, not the input file")
    params, metadata = read_weights(fmt, input_path)
    return save_converted(params, metadata, output, overwrite=overwrite)


__all__ = [
    "CONV_SPECS",
    "FORMATS",
    "SOURCES",
    "ConvSpec",
    "RestrictedUnpickler",
    "convert",
    "expected_shapes",
    "load_converted",
    "load_npy_pickle_safely",
    "read_caffe_npy",
    "read_keras_h5",
    "read_torchvision",
    "read_weights",
    "save_converted",
    "theano_kernel_to_hwio",
    "validate",
]
