"""``python -m deepmil_jax.benchmark``: the command line of the benchmark (see the package
docstring for what each figure means).

--scheme, --backbone, --batch_size, --image_size, --k, --precision (and --mu, --head_hidden,
--learning_rate, --seed, ...) are deepmil_jax.train's own flags, so the benchmark measures the
step that the same training command would run. Unlike training, an absent --batch_size means 32 on
CPU and 256 on GPU/TPU, and an absent --precision fp32 on CPU and bf16 on GPU/TPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from absl import flags, logging

from deepmil_jax import cli
from deepmil_jax.benchmark.settings import PARTS, Settings
from deepmil_jax.cli import from_flags, run_main
from deepmil_jax.config import Config, scheme_variants
from deepmil_jax.errors import ConfigError

_S = Settings()
cli.define_flags(Config)
for _name in ("scheme", "backbone", "batch_size", "image_size", "k", "precision", "head_hidden"):
    flags.declare_key_flag(_name, flag_values=flags.FLAGS)
flags.declare_key_flag("seed", flag_values=flags.FLAGS)
flags.DEFINE_string("json", None, "Also write the figures as one JSON object to this file.")
flags.DEFINE_integer("repeats", _S.repeats, "Timed repeats; every figure is the median over them.")
flags.DEFINE_integer("steps_per_repeat", _S.steps_per_repeat, "Train/eval steps per repeat.")
flags.DEFINE_integer("warmup", _S.warmup, "Untimed steps after compilation.")
flags.DEFINE_integer(
    "preprocess_images",
    _S.preprocess_images,
    "Full-size (4084x3328, 16-bit) DICOMs preprocessed in the timed part.",
)
flags.DEFINE_integer(
    "preprocess_workers",
    None,
    "Preprocessing processes, each a fresh interpreter (default: CPU count).",
)
flags.DEFINE_bool(
    "torch",
    True,
    "Time the same step in PyTorch (deepmil_jax.benchmark.torch_reference), "
    "interleaved with JAX; needs the torch extra.",
)
flags.DEFINE_bool(
    "torch_channels_last", _S.torch_channels_last, "PyTorch in the channels_last memory format."
)
flags.DEFINE_list(
    "compare",
    [],
    "Also time the train step of these schemes on the same batch, in alternation with "
    "--scheme's, and report each one's step time relative to it (evaluate's --schemes "
    "syntax: max_pooling,label_assign:k=3,label_assign:k=auto,attention).",
)
flags.DEFINE_list("parts", list(PARTS), f"What to measure, a subset of {','.join(PARTS)}.")
flags.DEFINE_bool(
    "quick",
    False,
    "Smoke test: 131x131 images (3x3 instances), k=2, batch 4, "
    "2 repeats, small DICOMs; the figures mean little.",
)


def show_device_defaults() -> None:
    """--help: an absent --batch_size or --precision is chosen by the device, not train's
    default."""
    f = flags.FLAGS
    f.set_default("batch_size", None)
    f["batch_size"].help = (
        "Global batch, split over all devices; a multiple of the device count "
        "(absent: 32 on CPU, 256 on GPU/TPU)."
    )
    f.set_default("precision", None)
    f["precision"].help = (
        "bf16: bfloat16 compute with float32 parameters and optimiser state "
        "(absent: fp32 on CPU, bf16 on GPU/TPU)."
    )


if __name__ == "__main__":  # flags and --help are answered before JAX and TensorFlow load
    show_device_defaults()
    cli.parse_flags_early()

from deepmil_jax.benchmark.report import format_table
from deepmil_jax.benchmark.run import run_benchmark

_OVERRIDABLE = (
    "batch_size",
    "image_size",
    "k",
    "precision",
    "repeats",
    "steps_per_repeat",
    "warmup",
    "preprocess_images",
    "preprocess_workers",
)


def settings_from_flags(base_config: Config) -> Settings:
    """The benchmark's settings from the command line (``--quick`` changes the defaults) and the
    training configuration the flags give (``base_config``)."""
    f = flags.FLAGS
    base = Settings.quick() if f.quick else Settings()
    if f.quick and f.scheme == "alexnet":  # its fully connected layers need the 6x6 map of 227
        base = dataclasses.replace(base, image_size=227)
    overrides: dict[str, Any] = {
        "scheme": f.scheme,
        "backbone": f.backbone,
        "torch_channels_last": f.torch_channels_last,
        "seed": f.seed,
        "head_hidden": base_config.head_hidden,
        "torch": f.torch,
    }
    overrides.update({name: getattr(f, name) for name in _OVERRIDABLE if f[name].present})
    settings = dataclasses.replace(base, **overrides)
    for name in ("repeats", "steps_per_repeat", "preprocess_images", "image_size", "batch_size"):
        if getattr(settings, name) is not None and getattr(settings, name) < 1:
            raise ConfigError(f"--{name} must be positive; got {getattr(settings, name)}.")
    if settings.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0; got {settings.warmup}.")
    return settings


def main() -> None:
    f = flags.FLAGS
    unknown = set(f.parts) - set(PARTS)
    if unknown:
        raise ConfigError(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    base_config = from_flags(Config)
    settings = settings_from_flags(base_config)
    parts = frozenset(f.parts) - (frozenset() if settings.torch else {"torch"})
    if "torch" in parts:  # on a GPU, leave room for PyTorch (read when JAX's backend starts)
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    scheme_variants(f.compare, "--compare")  # refused before anything is compiled
    result = run_benchmark(settings, parts=parts, base_config=base_config, compare=tuple(f.compare))
    print(format_table(result))
    if f.json:
        Path(f.json).expanduser().write_text(json.dumps(result, indent=2, default=float) + "\n")
        logging.info("Wrote %s", f.json)


if __name__ == "__main__":
    run_main(main)
