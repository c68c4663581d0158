"""Reader of ``torchvision.models.resnet{18,34,50}``'s state_dict (``resnet50-*.pth`` etc.).

Read with ``torch.load(weights_only=True)``, so torch is needed (the ``torch`` extra). The variant
is told by the keys (a ``conv3`` in the blocks: Bottleneck; blocks per stage: the depth) and every
array is checked against ``architecture.resnet.expected_shapes``. torchvision's keys map to the
canonical tree with the same layer names:

==========================================  ======================================================
torchvision key                             canonical
==========================================  ======================================================
``<conv>.weight`` ``(out, in, k, k)``       ``params[<conv>]["kernel"]`` ``(k, k, in, out)`` (HWIO)
``<bn>.weight`` / ``.bias``                 ``params[<bn>]["scale"]`` / ``["bias"]``
``<bn>.running_mean`` / ``.running_var``    ``params[<bn>]["mean"]`` / ``["var"]``
``<bn>.num_batches_tracked``                not kept
``fc.weight`` ``(1000, C)`` / ``fc.bias``   ``params["fc"]["kernel"]`` ``(C, 1000)`` / ``["bias"]``
==========================================  ======================================================

where ``<conv>`` is ``conv1``, ``layer1.0.conv1``, ..., ``layer1.0.downsample.0`` and ``<bn>``
``bn1``, ``layer1.0.bn1``, ..., ``layer1.0.downsample.1``. ``fc`` is optional; keys outside
this layout are refused, as ``load_state_dict(strict=True)`` would.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from deepmil_jax.architecture import resnet as arch
from deepmil_jax.errors import WeightsError
from deepmil_jax.weights.common import Params, check_layers, f32
from deepmil_jax.weights.pth import import_torch, load_state_dict, state_array

_BN_KEYS = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_NOTE = "torchvision ResNet"


def _load(torch: Any, where: str) -> dict[str, Any]:
    return load_state_dict(
        torch,
        where,
        "--format=torchvision_resnet expects torchvision's resnet18/34/50-*.pth",
        folder="give the ResNet .pth file itself",
    )


def _variant(state: Mapping[str, Any], where: str) -> str:
    """The variant whose block kind and blocks per stage the keys show."""
    if "conv1.weight" not in state or "layer1.0.conv1.weight" not in state:
        raise WeightsError(
            f"{where}: has no 'conv1.weight' or 'layer1.0.conv1.weight' (found keys "
            f"{sorted(state)[:10]}); is this torchvision's ResNet state_dict?"
        )
    kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    counts = []
    for stage in arch.STAGES:
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"{stage}\.(\d+)\.", k))}
        counts.append(len(blocks))
    for name, v in arch.VARIANTS.items():
        if v.block == kind and v.layers == tuple(counts):
            return name
    known = ", ".join(f"{n} ({v.block}, {v.layers})" for n, v in arch.VARIANTS.items())
    raise WeightsError(
        f"{where}: a ResNet with {kind} blocks {tuple(counts)} per stage is not one we know "
        f"({known})"
    )


def _get(torch: Any, state: Mapping[str, Any], key: str, shape: tuple[int, ...], where: str):
    missing = "the file is not a complete torchvision ResNet state_dict"
    return state_array(torch, state, key, shape, where, note=_NOTE, missing=missing)


def validate_resnet(params: Mapping[str, Mapping[str, Any]], variant: str, where: str) -> None:
    """Raise WeightsError unless ``params`` holds every layer of ``variant`` at its shape.

    ``fc`` is optional, checked when present; ``where`` names the file or folder in messages.
    """
    check_layers(params, arch.expected_shapes(variant), where, f"the {variant}")


def read_torchvision_resnet(path: str | os.PathLike) -> tuple[Params, str]:
    """Read a torchvision ResNet-18/34/50 state_dict; returns (canonical params, variant).

    The canonical tree is ``architecture.resnet.expected_shapes(variant)``'s, float32 numpy:
    ``{"conv1": {"kernel"}, "bn1": {"scale", "bias", "mean", "var"}, "layer1.0.conv1": ...,
    "fc": {"kernel": (C, 1000), "bias": (1000,)}}`` (``fc`` only if the file has it).
    """
    where = str(path)
    torch = import_torch(where, "a torchvision .pth file")
    state = _load(torch, where)
    variant = _variant(state, where)
    shapes = arch.expected_shapes(variant, fc="fc.weight" in state or "fc.bias" in state)
    used = set()
    params: Params = {}
    for layer, kinds in shapes.items():
        if layer != "fc" and "kernel" in kinds:  # a conv: (out, in, k, k) -> (k, k, in, out)
            k, _, cin, cout = kinds["kernel"]
            w = _get(torch, state, f"{layer}.weight", (cout, cin, k, k), where)
            params[layer] = {"kernel": f32(w.transpose(2, 3, 1, 0))}
            used.add(f"{layer}.weight")
        elif layer == "fc":
            c, n = kinds["kernel"]
            w = _get(torch, state, "fc.weight", (n, c), where)
            b = _get(torch, state, "fc.bias", (n,), where)
            params["fc"] = {"kernel": f32(w.T), "bias": b}
            used |= {"fc.weight", "fc.bias"}
        else:  # a batch norm
            params[layer] = {
                ours: _get(torch, state, f"{layer}.{theirs}", kinds[ours], where)
                for ours, theirs in _BN_KEYS.items()
            }
            if np.any(params[layer]["var"] < 0):
                raise WeightsError(
                    f"{where}: key '{layer}.running_var' holds negative variances; the file is "
                    "damaged"
                )
            used |= {f"{layer}.{theirs}" for theirs in _BN_KEYS.values()}
            used.add(f"{layer}.num_batches_tracked")
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise WeightsError(
            f"{where}: has keys a torchvision {variant} does not ({unexpected[:5]}"
            f"{', ...' if len(unexpected) > 5 else ''}); is this a modified ResNet?"
        )
    validate_resnet(params, variant, where)
    return params, variant
