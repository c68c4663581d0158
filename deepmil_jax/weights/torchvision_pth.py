"""Reader of ``torchvision.models.alexnet``'s state_dict (``alexnet-owt-*.pth``).

Filters 64-192-384-256-256, no groups, no LRN. Read with ``torch.load(weights_only=True)``, so
torch is needed (the ``torch`` extra). Kernels are ``(out, in, kh, kw)`` cross-correlations.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from deepmil_jax.architecture import CONV_SPECS, FC_GRID, FC_SIZE
from deepmil_jax.errors import WeightsError
from deepmil_jax.weights.common import (
    Params,
    check_shape,
    chw_rows_to_hwc,
    f32,
    one_line,
    weights_array,
)

_CONV_KEYS = {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 10}
_FC_KEYS = {"fc6": 1, "fc7": 4}


def _torch_load_cause(e: BaseException) -> str:
    """The whole cause of a ``torch.load`` failure, on one line.

    For ``weights_only`` refusals torch wraps the cause ("WeightsUnpickler error: Unsupported
    global: ...") in advice to load with ``weights_only=False``, which we never give; keep only
    the cause.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\s*\n|$)", text, re.S)
    return f"{type(e).__name__}: {one_line(m.group(1) if m else text)}".rstrip(": ")


def _load_state(torch: Any, where: str) -> dict[str, Any]:
    """The file's state_dict (unwrapped from ``{"state_dict": ...}``, ``module.`` prefixes cut)."""
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
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def _get(
    torch: Any, state: Mapping[str, Any], key: str, shape: tuple[int, ...], where: str
) -> np.ndarray:
    """``state[key]`` as a finite float32 array of ``shape`` (shape checked before conversion)."""
    if key not in state:
        raise WeightsError(
            f"{where}: key {key!r} is missing (expected shape {shape}); found keys "
            f"{sorted(state)[:20]}; is this torchvision's AlexNet state_dict?"
        )
    value = state[key]
    if isinstance(value, torch.Tensor):
        check_shape(where, f"key {key!r}", value, shape, "torchvision AlexNet")
        try:  # bfloat16, half, quantized or sparse tensors: to a dense float32 first
            value = value.detach().cpu()
            value = value.dequantize() if value.is_quantized else value
            value = value.to_dense() if value.layout != torch.strided else value
            value = value.to(torch.float32).numpy()
        except Exception as e:
            raise WeightsError(
                f"{where}: key {key!r} is a {value.dtype} tensor that cannot be converted to "
                f"float32 ({one_line(f'{type(e).__name__}: {e}')})"
            ) from e
    else:
        value = weights_array(where, f"key {key!r}", value)
        check_shape(where, f"key {key!r}", value, shape, "torchvision AlexNet")
    return weights_array(where, f"key {key!r}", value)


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
    state = _load_state(torch, where)
    params: Params = {}
    for spec in CONV_SPECS["torchvision"]:
        i, k = _CONV_KEYS[spec.name], spec.kernel
        w = _get(
            torch, state, f"features.{i}.weight", (spec.out_features, spec.in_features, k, k), where
        )
        b = _get(torch, state, f"features.{i}.bias", (spec.out_features,), where)
        params[spec.name] = {"kernel": f32(w.transpose(2, 3, 1, 0)), "bias": b}
    channels = CONV_SPECS["torchvision"][-1].out_features
    fc_in = {"fc6": FC_GRID * FC_GRID * channels, "fc7": FC_SIZE}
    for name, i in _FC_KEYS.items():
        if f"classifier.{i}.weight" not in state:
            continue
        w = _get(torch, state, f"classifier.{i}.weight", (FC_SIZE, fc_in[name]), where).T
        if name == "fc6":
            w = chw_rows_to_hwc(w, channels)
        b = _get(torch, state, f"classifier.{i}.bias", (FC_SIZE,), where)
        params[name] = {"kernel": f32(w), "bias": b}
    return params
