"""Reader of ``torchvision.models.alexnet``'s state_dict (``alexnet-owt-*.pth``).

Filters 64-192-384-256-256, no groups, no LRN. Read with ``torch.load(weights_only=True)``, so
torch is needed (the ``torch`` extra). Kernels are ``(out, in, kh, kw)`` cross-correlations.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from deepmil_jax.architecture import CONV_SPECS, FC_GRID, FC_SIZE
from deepmil_jax.weights.common import (
    Params,
    chw_rows_to_hwc,
    f32,
)
from deepmil_jax.weights.pth import import_torch, load_state_dict, state_array

_CONV_KEYS = {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 10}
_FC_KEYS = {"fc6": 1, "fc7": 4}


def _load_state(torch: Any, where: str) -> dict[str, Any]:
    return load_state_dict(
        torch, where, "--format=torchvision expects torchvision's alexnet-owt-*.pth"
    )


def _get(
    torch: Any, state: Mapping[str, Any], key: str, shape: tuple[int, ...], where: str
) -> np.ndarray:
    missing = f"found keys {sorted(state)[:20]}; is this torchvision's AlexNet state_dict?"
    return state_array(torch, state, key, shape, where, note="torchvision AlexNet", missing=missing)


def read_torchvision(path: str | os.PathLike) -> Params:
    """Read a ``torchvision.models.alexnet`` state_dict (``alexnet-owt-*.pth``).

    Keys ``features.{0,3,6,8,10}.{weight,bias}`` (kernels ``(out, in, kh, kw)``) and, if present,
    ``classifier.{1,4}.{weight,bias}`` (``(out, in)``, fc6 inputs in (C, H, W) order).
    """
    where = str(path)
    torch = import_torch(where, "a torchvision .pth file")
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
