"""ImageNet weights that an installed package ships (``--init=imagenet:efficientnet_lite0``):
found through the backbone's registry entry, converted once into the usual converted folder under
the data directory, and reused only while they come from the same file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from absl import logging

from deepmil_jax import registry
from deepmil_jax.errors import ConfigError
from deepmil_jax.weights.converted import METADATA_FILE, read_weights, save_converted


def _stamp(backbone: str, source: Path, fmt: str) -> dict[str, Any]:
    """What a converted copy was made from: the package's file (path, size, SHA-256), its format
    and the backbone."""
    digest = hashlib.sha256()
    with source.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {
        "backbone": backbone,
        "format": fmt,
        "file": str(source),
        "size": source.stat().st_size,
        "sha256": digest.hexdigest(),
    }


def _stored_stamp(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / METADATA_FILE).read_text()).get("packaged")
    except (OSError, ValueError, AttributeError):
        return None


def packaged(backbone: str, data_dir: str | os.PathLike) -> Path:
    """The converted folder of ``backbone``'s packaged ImageNet weights under
    ``data_dir/weights/<backbone>``, converting the package's file the first time and again
    whenever the file differs from the one the folder was made from (another version of the
    package). The new copy is written aside and renamed when complete."""
    entry = registry.backbone(backbone)
    if entry.pretrained is None:
        raise ConfigError(
            f"--init=imagenet:{backbone}: no package ships {backbone} weights; convert a file "
            f"with python -m deepmil_jax.convert_weights and give --init=imagenet:FOLDER"
        )
    source = Path(registry.resolve(entry.pretrained)(entry.variant))
    fmt = entry.formats[0]
    stamp = _stamp(backbone, source, fmt)
    out = Path(data_dir).expanduser().absolute() / "weights" / backbone
    stored = _stored_stamp(out)
    if stored == stamp:
        return out
    if stored is not None or out.exists():
        logging.info("Converting %s anew: %s is not the file %s was made from", source, source, out)
    params, metadata = read_weights(fmt, source)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_converted(params, metadata | {"packaged": stamp}, partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    logging.info("Converted the %s ImageNet weights of %s into %s", backbone, source, out)
    return out
