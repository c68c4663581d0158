"""Reading a pretrained file by format, and the converted folder (Orbax params + metadata.json)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from deepmil_jax import registry
from deepmil_jax.errors import ConfigError, WeightsError
from deepmil_jax.weights.common import Params

FORMATS = tuple(registry.FORMATS)
METADATA_FILE = "metadata.json"
PARAMS_DIR = "params"
METADATA_VERSION = 1


def _variants() -> dict[str, str]:
    """{backbone variant: its family} over the registry's backbones."""
    return {b.variant: b.family for b in registry.BACKBONES.values()}


def validate_params(params: Mapping[str, Any], family: str, variant: str, where: str) -> None:
    """Raise WeightsError unless ``params`` is the canonical tree of ``variant`` (the family's
    check, ``registry.VALIDATORS``; the classifier layers are optional)."""
    registry.resolve(registry.VALIDATORS[family])(params, variant, where)


def read_weights(fmt: str, path: str | os.PathLike) -> tuple[Params, dict[str, Any]]:
    """Read a pretrained file of format ``fmt``; returns (canonical params, metadata dict)."""
    entry = registry.weights_format(fmt)
    if Path(path).expanduser().is_dir():
        raise WeightsError(
            f"{path}: is a folder; give the weights file itself ({entry.description})"
        )
    result = registry.resolve(entry.reader)(path)
    params, variant = result if isinstance(result, tuple) else (result, entry.variant)
    validate_params(params, entry.family, variant, str(path))
    metadata = {
        "metadata_version": METADATA_VERSION,
        "family": entry.family,
        "variant": variant,
        "source": fmt,
        "source_description": entry.description,
        "input_file": Path(path).name,
        "normalization": entry.normalization,
        "lrn": entry.lrn,
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


def _read_metadata(root: Path) -> dict[str, Any]:
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
    if metadata["variant"] not in _variants():
        raise WeightsError(f"{meta_file}: unknown variant {metadata['variant']!r}")
    return metadata


def load_converted(path: str | os.PathLike, *, fc: bool = True) -> tuple[Params, dict[str, Any]]:
    """Read a ``convert_weights`` output folder: (canonical params as numpy, metadata dict).

    ``fc=False`` restores only the convolutions, so that a model without the fully connected
    layers (the MIL schemes) does not read the 150 MB of fc6. Pass the result to
    ``deepmil_jax.models.build_model(..., pretrained=(params, metadata))``.
    """
    root = Path(path).expanduser().absolute()
    metadata = _read_metadata(root)
    wanted = [n for n in metadata["layers"] if fc or not n.startswith("fc")]
    try:
        with ocp.PyTreeCheckpointer() as ckpt:
            stored = ckpt.metadata(root / PARAMS_DIR).item_metadata.tree
            item = {n: {kind: 0 for kind in stored[n]} for n in wanted}
            restore_args = {
                n: {kind: ocp.RestoreArgs(restore_type=np.ndarray) for kind in stored[n]}
                for n in wanted
            }
            restored = ckpt.restore(
                root / PARAMS_DIR,
                args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True
                ),
            )
    except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
        raise WeightsError(f"{root / PARAMS_DIR}: cannot restore layers {wanted} ({e})") from e
    params = {
        layer: {kind: np.asarray(v, dtype=np.float32) for kind, v in arrays.items()}
        for layer, arrays in restored.items()
    }
    family = _variants()[metadata["variant"]]
    validate_params(params, family, metadata["variant"], str(root))
    return params, metadata


def convert(
    fmt: str, input_path: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Read ``input_path`` as ``fmt`` and write the converted folder ``output``; returns it."""
    if Path(output).expanduser().absolute() == Path(input_path).expanduser().absolute():
        raise ConfigError("--output must be a folder, not the input file")
    params, metadata = read_weights(fmt, input_path)
    return save_converted(params, metadata, output, overwrite=overwrite)
