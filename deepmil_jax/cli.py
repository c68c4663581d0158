"""The programs' command lines: absl flags derived from the settings dataclasses, and running a
program's body with the project's errors as one line.

``define_flags(cls)`` turns the fields of a ``deepmil_jax.config`` dataclass into absl flags (when a
program starts, never on import), ``from_flags(cls)`` builds the dataclass from the parsed flags,
and ``run_main(body, *classes)`` does both around ``body``. Importing this module loads neither
JAX nor TensorFlow: a program calls ``parse_flags_early`` before its heavy imports, so ``--help``
and a misspelt flag are answered at once.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging

from deepmil_jax.config import Launch
from deepmil_jax.errors import ConfigError, DeepMILError


def define_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one absl flag per field of the dataclass ``cls`` (default and help from the
    field). Field types: str (an enum when the field has choices), int, float, bool, their
    ``| None`` forms, and tuples (comma-separated lists). A field another class defined already
    (``batch_size`` of two settings) is defined once."""
    # The program's own flags, so that --help lists them (absl lists the main module's).
    owner = {"module_name": sys.argv[0]}
    for f in dataclasses.fields(cls):
        if f.name in flag_values:
            continue
        kind, default, help_text = str(f.type), f.default, f.metadata["help"]
        if f.metadata.get("choices"):
            flags.DEFINE_enum(
                f.name, default, f.metadata["choices"], help_text, flag_values=flag_values, **owner
            )
        elif kind.startswith("tuple"):
            flags.DEFINE_list(
                f.name, [str(v) for v in default], help_text, flag_values=flag_values, **owner
            )
        elif kind.startswith("bool"):
            flags.DEFINE_bool(f.name, default, help_text, flag_values=flag_values, **owner)
        elif kind.startswith("int"):
            flags.DEFINE_integer(f.name, default, help_text, flag_values=flag_values, **owner)
        elif kind.startswith("float") and "str" not in kind:
            flags.DEFINE_float(f.name, default, help_text, flag_values=flag_values, **owner)
        else:  # str, or a number or a word (--k=6, --k=auto): text, parsed by the dataclass
            text = default if default is None or isinstance(default, str) else str(default)
            flags.DEFINE_string(f.name, text, help_text, flag_values=flag_values, **owner)


def from_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> Any:
    """The dataclass ``cls`` from parsed flags (ConfigError naming a flag that cannot be read)."""
    values = {}
    for f in dataclasses.fields(cls):
        value = flag_values[f.name].value
        if str(f.type).startswith("tuple[int"):
            try:
                value = tuple(int(v) for v in value)
            except ValueError:
                raise ConfigError(
                    f"--{f.name}: {','.join(value)} is not a list of integers."
                ) from None
        elif str(f.type).startswith("tuple"):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


def initialize_distributed(launch: Launch) -> None:
    """Joins the other processes of a multi-host run (--distributed or --coordinator_address)."""
    import jax

    if launch.coordinator_address:
        jax.distributed.initialize(
            launch.coordinator_address, launch.num_processes, launch.process_id
        )
    elif launch.distributed:
        jax.distributed.initialize()


def _quiet_libraries(record) -> bool:
    """Keeps the libraries' INFO chatter (Orbax, TFDS, JAX's search for TPUs and GPUs) out of
    the program's log (30: WARNING)."""
    noisy = ("orbax", "tensorflow_datasets", "etils", "xla_bridge")
    return record.levelno >= 30 or not any(n in record.pathname for n in noisy)


def run_main(body: Callable[..., Any], *classes: type, positional: bool = False) -> None:
    """Defines the flags of ``classes``, then runs ``body`` under absl, turning the project's
    errors into one clear line and exit status 1. ``body()`` takes the settings dataclasses built
    from the flags, in the order of ``classes`` (with ``positional``, the command line's
    positional arguments first)."""
    for cls in classes:
        define_flags(cls)

    def main(argv):
        if not positional and len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
        logging.get_absl_handler().addFilter(_quiet_libraries)
        try:
            settings = [from_flags(cls) for cls in classes]
            if positional:
                body(argv, *settings)
            else:
                body(*settings)
        except DeepMILError as e:  # one line on stderr, no traceback
            raise SystemExit(f"error: {e}") from None

    app.run(main)


def parse_flags_early(*classes: type) -> None:
    """Defines the flags of ``classes`` and parses ``sys.argv`` with absl's usage handling, so
    that ``--help`` and a misspelt flag are answered before a program's heavy imports; the
    program's ``run_main`` parses the same command line again."""
    import sys

    for cls in classes:
        define_flags(cls)
    app.define_help_flags()
    app.parse_flags_with_usage(sys.argv)
