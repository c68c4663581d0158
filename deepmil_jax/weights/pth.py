"""What the readers of PyTorch ``.pth`` state_dicts share: loading one safely
(``torch.load(weights_only=True)``) and taking its tensors out as checked float32 arrays. ``torch``
is passed in, so this module imports only numpy."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from deepmil_jax.errors import WeightsError
from deepmil_jax.weights.common import check_shape, one_line, weights_array


def import_torch(where: str, what: str) -> Any:
    """The ``torch`` module, or WeightsError naming the file and how to install it (``what``:
    "a torchvision .pth file", ...)."""
    try:
        import torch
    except ImportError as e:
        raise WeightsError(
            f"{where}: reading {what} needs PyTorch, which is not installed; install it with "
            "`pip install 'deepmil-jax[torch]'` (the CPU build is enough)"
        ) from e
    return torch


def torch_load_cause(e: BaseException) -> str:
    """The whole cause of a ``torch.load`` failure, on one line.

    For ``weights_only`` refusals torch wraps the cause ("WeightsUnpickler error: Unsupported
    global: ...") in advice to load with ``weights_only=False``, which we never give; keep only
    the cause.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\s*\n|$)", text, re.S)
    return f"{type(e).__name__}: {one_line(m.group(1) if m else text)}".rstrip(": ")


def load_state_dict(
    torch: Any, where: str, expects: str, *, folder: str | None = None
) -> dict[str, Any]:
    """The file's state_dict (unwrapped from ``{"state_dict": ...}``, ``module.`` prefixes cut).

    ``expects`` ends the message for a file torch cannot read ("--format=X expects ...");
    ``folder``, when given, is what a folder path is told instead of being opened.
    """
    if folder is not None and os.path.isdir(where):
        raise WeightsError(f"{where}: is a folder; {folder}")
    try:
        state = torch.load(where, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise WeightsError(f"{where}: no such file") from e
    except Exception as e:  # torch raises many kinds for a file that is not a state_dict
        raise WeightsError(
            f"{where}: cannot be read as a PyTorch state_dict with torch.load(weights_only=True) "
            f"({torch_load_cause(e)}); {expects}"
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


def state_array(
    torch: Any,
    state: Mapping[str, Any],
    key: str,
    shape: tuple[int, ...],
    where: str,
    *,
    note: str,
    missing: str,
) -> np.ndarray:
    """``state[key]`` as a finite float32 array of ``shape`` (the shape checked before any
    conversion). ``note`` names the model in shape messages; ``missing`` ends the message for an
    absent key."""
    if key not in state:
        raise WeightsError(f"{where}: key {key!r} is missing (expected shape {shape}); {missing}")
    value = state[key]
    if isinstance(value, torch.Tensor):
        check_shape(where, f"key {key!r}", value, shape, note)
        try:  # bfloat16, half, quantized or sparse tensors: to a dense float32 first
            value = value.detach().cpu()
            value = value.dequantize() if value.is_quantized else value
            value = value.to_dense() if value.layout != torch.strided else value
            if value.is_complex():  # torch would drop the imaginary part with a warning
                raise TypeError("complex values are not real weights")
            value = value.to(torch.float32).numpy()
        except Exception as e:
            raise WeightsError(
                f"{where}: key {key!r} is a {value.dtype} tensor that cannot be converted to "
                f"float32 ({one_line(f'{type(e).__name__}: {e}')})"
            ) from e
    else:
        value = weights_array(where, f"key {key!r}", value)
        check_shape(where, f"key {key!r}", value, shape, note)
    return weights_array(where, f"key {key!r}", value)
