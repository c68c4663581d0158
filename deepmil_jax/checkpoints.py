"""The checkpoints of a training run: save, verify, fall back.

One Orbax ``CheckpointManager`` over ``<workdir>/checkpoints/<step>/``. Each checkpoint holds three
items: ``state`` (parameters and optimiser state), ``meta`` (the loop's position, the history of
epochs and which step is the best so far) and ``checksums`` (a SHA-256 of every array of
``state``, with its dtype and shape). The protocol:

* **save** writes one step (Orbax writes into a temporary folder and renames it when complete, so
  a kill mid-save leaves no half checkpoint that looks whole). Saving a step that already exists
  is idempotent: an intact copy with the same checksums is kept, anything else is replaced.
  After a save, steps that are neither among the newest two nor the best are deleted; a kill
  during that clean-up only leaves extra (older) steps, which the next save deletes.
* **restore** verifies the checksums of what it read. Without a step it takes the newest intact
  step and warns, naming each newer step it skipped and why; when no step is intact it raises a
  ``CheckpointError`` of one line. With a step (the best, for testing and prediction) it takes
  that step or raises: another step would silently be another model.

``<workdir>/checkpoints/latest`` and ``best`` were the layout of deepmil-jax 0.1.0 before this
protocol; such a workdir is refused with a message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from deepmil_jax.config import Config
from deepmil_jax.errors import ConfigError, DeepMILError
from deepmil_jax.steps import config_optimizer, create_model
from deepmil_jax.workdir import read_config

KEEP_NEWEST = 2  # newest steps kept besides the best: a damaged newest step has a fallback


class _RestoreLoop(asyncio.SelectorEventLoop):
    """The event loop of one synchronous Orbax call. When a restore fails on a damaged array,
    TensorStore finishes the step's other reads in its own threads and hands each result to this
    loop after it was closed; those results have no reader any more, so they are dropped here
    instead of printing an "Event loop is closed" traceback after the one-line refusal."""

    def call_soon_threadsafe(self, callback, *args, context=None):
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():
                return None
            raise


def _run_sync_via_new_loop(coro):
    """Orbax's runner of a synchronous call's coroutine in a fresh event loop (a `_RestoreLoop`),
    which on closing the loop also cancels and awaits the tasks still pending in it, so that none
    is logged as "Task exception was never retrieved" or "Exception ignored in <coroutine>"."""
    loop = _RestoreLoop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:  # their exceptions retrieved, so that none is logged as unretrieved
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _drain_orbax_loops() -> None:
    """Installs `_run_sync_via_new_loop` in Orbax (0.12.8: asyncio_utils.run_sync calls it by its
    module-level name); an Orbax without it is left as it is."""
    try:
        from orbax.checkpoint._src import asyncio_utils
    except ImportError:  # pragma: no cover - another Orbax layout
        return
    if callable(getattr(asyncio_utils, "_run_sync_via_new_loop", None)):
        asyncio_utils._run_sync_via_new_loop = _run_sync_via_new_loop


_drain_orbax_loops()


class CheckpointError(DeepMILError):
    """No usable checkpoint where one is needed (all damaged, or the one asked for)."""


def checksums(tree: Any) -> dict[str, str]:
    """SHA-256 of each array leaf (dtype, shape and bytes), keyed by its path in ``tree``.

    Replicated or multi-process arrays are hashed from this process's first shard, which holds
    the whole array when it is replicated (as the training state is).
    """
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, jax.Array):
            leaf = leaf.addressable_data(0)
        array = np.ascontiguousarray(np.asarray(leaf))
        digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
        out[jax.tree_util.keystr(path)] = digest.hexdigest()
    return out


def _first_difference(saved: dict[str, str], now: dict[str, str]) -> str | None:
    if saved.keys() != now.keys():
        missing = sorted(saved.keys() ^ now.keys())
        return f"arrays differ from the model's: {', '.join(missing[:3])}"
    for key in saved:
        if saved[key] != now[key]:
            return f"checksum mismatch in {key}"
    return None


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


class RunCheckpoints:
    """The checkpoints of one run directory (``<workdir>/checkpoints``)."""

    def __init__(self, directory: str | Path, *, create: bool = True):
        directory = Path(directory).expanduser().absolute()  # Orbax refuses relative paths
        old = [p for p in ("latest", "best") if (directory / p).is_dir()]
        if old:
            raise CheckpointError(
                f"{directory} has the checkpoint layout of an older deepmil-jax "
                f"({'/'.join(old)}/); give a new --workdir (or move this one away) and retrain."
            )
        self.directory = directory
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=create)
        self._manager = ocp.CheckpointManager(directory, options=options)

    def steps(self) -> list[int]:
        """The saved steps, newest first (damaged ones included)."""
        self._manager.reload()
        return sorted(self._manager.all_steps(), reverse=True)

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves ``state`` and ``meta`` as ``step``, then deletes the steps no longer needed
        (``meta["best_step"]``, if set, is kept by the clean-up)."""
        sums = checksums(state)
        if step in self.steps():
            existing = self._read(step, state)
            if isinstance(existing, tuple) and existing[2] == sums and existing[1] == meta:
                self._prune(meta)
                return
            self._manager.delete(step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(meta),
                checksums=ocp.args.JsonSave(sums),
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        self._prune(meta)

    def _prune(self, meta: dict[str, Any]) -> None:
        """Deletes every step but the newest ``KEEP_NEWEST`` and the best step each of those
        names, so that a fallback to the second newest step still finds its best."""
        steps = self.steps()
        keep = set(steps[:KEEP_NEWEST]) | {meta.get("best_step")}
        for step in steps[1:KEEP_NEWEST]:
            try:
                older = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )["meta"]
                keep.add(older.get("best_step"))
            except Exception:  # a damaged step: it keeps nothing
                pass
        for step in steps:
            if step not in keep:
                self._manager.delete(step)

    def _read(self, step: int, like: Any) -> tuple[Any, dict, dict] | str:
        """(state, meta, checksums) of an intact ``step``, or why it is not intact."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract),
                    meta=ocp.args.JsonRestore(),
                    checksums=ocp.args.JsonRestore(),
                ),
            )
            state, meta, saved = restored["state"], restored["meta"], restored["checksums"]
            if not isinstance(meta, dict) or not isinstance(saved, dict):
                return "its metadata is not a JSON object"
            now = checksums(state)
        except Exception as error:  # Orbax, TensorStore, JSON: a damaged step in any way
            return _reason(error)
        difference = _first_difference(saved, now)
        return difference if difference else (state, meta, saved)

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict, int] | None:
        """(state, meta, step) of ``step``, or of the newest intact step; None if none is saved.

        Raises:
          CheckpointError: ``step`` is damaged or missing, or every saved step is damaged.
        """
        steps = self.steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"{self.directory}: step {step} is missing (saved steps: "
                    f"{', '.join(map(str, steps)) or 'none'}); retrain in a new --workdir."
                )
            read = self._read(step, like)
            if isinstance(read, str):
                raise CheckpointError(
                    f"{self.directory / str(step)} is damaged ({read}); retrain in a new --workdir."
                )
            return read[0], read[1], step
        skipped = []
        for candidate in steps:
            read = self._read(candidate, like)
            if isinstance(read, str):
                skipped.append(f"step {candidate} ({read})")
                continue
            if skipped:
                logging.warning(
                    "Skipped damaged checkpoint(s) in %s: %s; using step %d.",
                    self.directory,
                    "; ".join(skipped),
                    candidate,
                )
            return read[0], read[1], candidate
        if skipped:
            raise CheckpointError(
                f"No intact checkpoint in {self.directory}: {'; '.join(skipped)}. Delete the "
                "folder to train from the start, or give a new --workdir."
            )
        return None

    def restore_best(self, like: Any) -> tuple[Any, dict, int] | None:
        """The best step named by the newest intact checkpoint (strict: never another step)."""
        newest = self.restore(like)
        if newest is None:
            return None
        best = newest[1].get("best_step")
        if best is None or best == newest[2]:
            return newest
        return self.restore(like, best)

    def close(self) -> None:
        self._manager.close()


# ---------------------------------------------------------------------------------------------
# A trained run's parameters, for --init=checkpoint: and predict


def restore_params(path: str, like_state) -> Any:
    """Parameters of another run's best checkpoint, for --init=checkpoint:PATH (a training
    workdir, or its checkpoints/ folder)."""
    root = Path(path).expanduser().absolute()
    directory = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    store = RunCheckpoints(directory, create=False)
    try:
        restored = store.restore_best(like_state)
    except CheckpointError as e:
        raise ConfigError(
            f"--init=checkpoint:{path}: {e} If the run used another --backbone or --head_hidden, "
            "its parameters cannot fit this model."
        ) from None
    finally:
        store.close()
    if restored is None:
        raise ConfigError(
            f"--init=checkpoint:{path}: no checkpoint found; give a training workdir "
            "(with checkpoints/) of a run that finished at least one epoch."
        )
    return restored[0]["params"]


def load_trained(workdir: str | os.PathLike, *, which: str = "best") -> tuple[Config, nnx.Module]:
    """The config and the model (in eval mode) of a training workdir's best or latest checkpoint
    (checksums verified; ``latest`` falls back to the newest intact step with a warning)."""
    workdir = Path(workdir).expanduser().absolute()
    config = read_config(workdir)
    model = create_model(dataclasses.replace(config, init="random"), nnx.Rngs(0), warn=False)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    # the optimiser state's structure, not its warm-up length, has to match the checkpoint's
    like = {"params": params, "opt_state": config_optimizer(config, 1).init(params)}
    store = RunCheckpoints(workdir / "checkpoints", create=False)
    try:
        restored = store.restore_best(like) if which == "best" else store.restore(like)
    finally:
        store.close()
    if restored is None:
        raise ConfigError(f"{workdir / 'checkpoints'} holds no checkpoint yet.")
    # named always: after a damaged newest step, the step used is not the newest (nor, for
    # "best", the step restore's warning names: that one only said which step is best)
    logging.info("Using the %s checkpoint: step %d of %s.", which, restored[2], store.directory)
    nnx.update(model, restored[0]["params"])
    model.eval()
    return config, model
