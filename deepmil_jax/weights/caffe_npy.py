"""Reader of ``bvlc_alexnet.npy`` (Caffe's BVLC AlexNet), with a restricted unpickler.

Guerzhoy & Frossard's conversion with caffe-tensorflow: an ``np.save`` of a dict
``{layer: [W, b]}``, ``W`` in HWIO layout (cross-correlation), grouped layers holding
``in/groups`` input channels. The file is a pickle; it is read without running any code it names.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deepmil_jax.architecture import expected_shapes
from deepmil_jax.errors import WeightsError
from deepmil_jax.weights.common import Params, check_shape, weights_array


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
        check_shape(
            where, f"layer {layer!r} W", w, shape["kernel"], "HWIO (kh, kw, in/groups, out)"
        )
        check_shape(where, f"layer {layer!r} b", b, shape["bias"], "bias")
        params[layer] = {
            "kernel": weights_array(where, f"layer {layer!r} W", w),
            "bias": weights_array(where, f"layer {layer!r} b", b),
        }
    return params
