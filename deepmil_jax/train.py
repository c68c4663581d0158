r"""Train a deep MIL mammogram classifier (Zhu et al., MICCAI 2017) on one cross-validation fold.

    python -m deepmil_jax.train --scheme=label_assign --k=6

Runs on every local accelerator (or the CPU) as a ("data",) device mesh: parameters replicated,
each batch split along the batch axis, one jitted train step. With --distributed, several hosts
(Cloud TPU pods, multi-node GPU) train together, each process feeding its own shard of the data.

The workdir receives: split.json (fold membership), metrics.jsonl and TensorBoard events (one line
and one point per epoch), checkpoints/<step> (deepmil_jax.checkpoints), results.json and the
validation and test predictions as CSV. Re-running with the same workdir resumes.
"""

from __future__ import annotations

if __name__ == "__main__":  # flags and --help are answered before JAX and TensorFlow load
    from deepmil_jax import cli as _cli
    from deepmil_jax import config as _settings

    _cli.parse_flags_early(_settings.Config, _settings.Launch)

import contextlib
import dataclasses
import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from deepmil_jax import checkpoints, heatmap, registry
from deepmil_jax import workdir as workdir_files
from deepmil_jax.cli import initialize_distributed, run_main
from deepmil_jax.config import Config, Launch
from deepmil_jax.errors import ConfigError, DeepMILError
from deepmil_jax.metrics import binary_metrics, choose_threshold
from deepmil_jax.steps import Trainer, checkpointed, make_mesh


class TrainingDiverged(DeepMILError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Preempted(Exception):
    """A SIGTERM (a preempted Cloud TPU VM or cluster job) stopped the run after saving it:
    re-running the same command resumes. Not an error: the programs exit 0 on it."""

    def __init__(self, workdir: Path):
        super().__init__(f"preempted; {workdir} was saved and resumes on the same command")
        self.workdir = workdir


# ---------------------------------------------------------------------------------------------
# Data


def load_examples(config: Config):
    """Prepares (once) and loads the dataset named by the config into memory."""
    from data_pipeline import datasets

    data_dir = Path(config.data_dir).expanduser()
    source = config.dataset
    if registry.DATASETS[source].synthetic:  # written by the first prepare() if missing
        manual_dir = data_dir / f"{source}_inbreast_n{config.synthetic_images}"
        tfds_dir = data_dir / f"tfds_{source}_n{config.synthetic_images}"
    else:
        manual_dir = Path(config.manual_dir).expanduser().resolve()
        # one TFDS folder per raw dataset, so two INbreast copies never share a prepared dataset
        digest = hashlib.sha1(str(manual_dir).encode()).hexdigest()[:10]
        tfds_dir = data_dir / f"tfds_{source}_{manual_dir.name}_{digest}"
    kwargs = dict(
        manual_dir=manual_dir,
        data_dir=tfds_dir,
        image_size=config.image_size,
        skip_bad=config.skip_bad,
        synthetic_images=config.synthetic_images,
    )
    if source == "folder":
        kwargs.update(
            image_column=config.image_column,
            label_column=config.label_column,
            patient_column=config.patient_column or None,
        )
    if jax.process_index() == 0:
        examples = datasets.prepare(source, **kwargs)
    multihost_utils.sync_global_devices("dataset prepared")
    if jax.process_index() != 0:
        examples = datasets.prepare(source, **kwargs)
    return examples


# ---------------------------------------------------------------------------------------------
# The loop


class _Preempted:
    """Whether the run must save and stop (a preempted Cloud TPU VM or cluster job: SIGTERM).

    ``due(step)`` is asked after every step by every process. With several processes it is JAX's
    preemption sync point (``multihost_utils.reached_preemption_sync_point``): the coordination
    service sees any host's SIGTERM and every host answers True at the same step, so all save the
    same state. Alone, a SIGTERM handler sets the flag (JAX's service only runs with
    ``jax.distributed``)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            self.requested = True

        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, handler)
            except ValueError:  # not the main thread: no handler, no preemption saving
                self._previous = None
        return self

    def due(self, step: int) -> bool:
        if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
            self.requested = True
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _finite_loss(loss: jax.Array, step: int, *, epoch: int, workdir: Path, saved: int) -> float:
    """The loss as a float (waits for its step), or TrainingDiverged if it is not finite."""
    value = float(loss)
    if not np.isfinite(value):
        raise TrainingDiverged(
            f"The loss became {value} at epoch {epoch + 1}, step {step}. The last good checkpoint "
            f"(step {saved}, verified) is kept in {workdir / 'checkpoints'}; lower "
            "--learning_rate or check the data, then re-run to resume from it."
        )
    return value


def _new_meta() -> dict[str, Any]:
    """The loop's position, saved with every checkpoint. ``loss_sum``/``loss_steps``: the running
    sum of this epoch's step losses (the objective, lambda/2 ||theta||^2 included), so that a
    mid-epoch resume reports the whole epoch's mean; ``data_loss_sum``: the same of the data term
    alone (with ImageNet weights the penalty can be most of the objective)."""
    return {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "loss_sum": 0.0,
        "data_loss_sum": 0.0,
        "loss_steps": 0,
        "best_epoch": None,
        "best_step": None,
        "best_auc": -1.0,
        "history": [],
    }


@dataclasses.dataclass
class _Run:
    """What the loop's named steps share."""

    config: Config
    workdir: Path
    examples: Any
    split: Any
    trainer: Trainer
    store: checkpoints.RunCheckpoints
    meta: dict[str, Any]
    lead: bool
    saved_step: int | None = None

    @property
    def steps_per_epoch(self) -> int:
        return max(1, -(-len(self.split.train) // self.config.batch_size))

    def evaluate(self, indices: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        from data_pipeline import input_pipeline

        stream = input_pipeline.eval_dataset(
            self.examples.images[indices],
            self.examples.labels[indices],
            batch_size=self.config.eval_batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ).as_numpy_iterator()
        out = self.trainer.predict(stream)
        out["index"] = indices[out["index"]]
        return out, self.examples.labels[out["index"]]

    def save(self) -> None:
        self.store.save(self.meta["global_step"], checkpointed(self.trainer.state), self.meta)
        self.saved_step = self.meta["global_step"]


def _prepare(config: Config, workdir: Path) -> _Run:
    """Checks the settings and the workdir, loads the data and the split, builds the trainer
    and restores the newest intact checkpoint. Writes nothing into the workdir but an empty
    checkpoints folder."""
    from data_pipeline import folds

    mesh = make_mesh()
    n_dev = mesh.devices.size
    for name in ("batch_size", "eval_batch_size"):
        if getattr(config, name) % n_dev:
            raise ConfigError(
                f"--{name}={getattr(config, name)} cannot be split evenly over {n_dev} devices; "
                f"use a multiple of {n_dev}."
            )
    workdir_files.check_same_run(workdir, config)
    finished = workdir_files.finished_config(workdir)
    if finished is not None:
        workdir_files.check_epochs(workdir, config, int(finished.get("epochs", 0)))
    examples = load_examples(config)
    split = folds.make_split(
        examples.labels,
        examples.patient_ids,
        num_folds=config.num_folds,
        fold=config.fold,
        split=config.split,
        seed=config.seed,
        subsets=examples.subsets,
    )
    trainer = Trainer(config, mesh, max(1, -(-len(split.train) // config.batch_size)))
    if config.init.startswith("checkpoint:"):
        like = checkpointed(trainer.state)
        params = checkpoints.restore_params(config.init.split(":", 1)[1], like)
        trainer.restore(like | {"params": params})
    store = checkpoints.RunCheckpoints(workdir / "checkpoints")
    meta, saved_step = _new_meta(), None
    resumed = store.restore(checkpointed(trainer.state))
    if resumed is not None:
        trainer.restore(resumed[0])
        meta, saved_step = _new_meta() | resumed[1], resumed[2]
        if "data_loss_sum" not in resumed[1] and meta["loss_steps"]:
            meta["data_loss_sum"] = float("nan")  # saved mid-epoch before it was kept: unknown
        workdir_files.check_epochs(workdir, config, meta["epoch"])
        logging.info(
            "Resuming from %s at epoch %d, step %d",
            workdir,
            meta["epoch"] + 1,
            meta["step_in_epoch"],
        )
    lead = jax.process_index() == 0
    return _Run(config, workdir, examples, split, trainer, store, meta, lead, saved_step)


def _start(run: _Run) -> None:
    """Writes config.json, split.json and the history so far: the run has started."""
    if not run.lead:
        return
    from data_pipeline import folds

    run.workdir.mkdir(parents=True, exist_ok=True)
    workdir_files.write_json(run.workdir / "config.json", run.config.to_json())
    folds.write_split(run.split, run.examples.file_ids, run.workdir / "split.json")
    workdir_files.rewrite_metrics(run.workdir, run.meta["history"])
    logging.info(
        "Fold %d: %d train, %d validation, %d test images on %d device(s)",
        run.config.fold,
        len(run.split.train),
        len(run.split.validation),
        len(run.split.test),
        run.trainer.mesh.devices.size,
    )


def _train_epoch(run: _Run, preempted: _Preempted) -> tuple[float, int]:
    """Trains the rest of the current epoch; returns its training seconds. On SIGTERM saves the
    state mid-epoch and exits (status 0)."""
    from data_pipeline import input_pipeline

    config, meta, epoch = run.config, run.meta, run.meta["epoch"]
    stream: Iterator = input_pipeline.train_dataset(
        run.examples.images[run.split.train],
        run.examples.labels[run.split.train],
        batch_size=config.batch_size,
        seed=config.seed * 100_003 + epoch,
        augment=config.augment,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ).as_numpy_iterator()
    for _ in range(meta["step_in_epoch"]):
        next(stream)
    bar = tqdm(
        total=run.steps_per_epoch,
        initial=meta["step_in_epoch"],
        disable=not run.lead,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        unit="step",
        leave=False,
    )
    start, seen = time.perf_counter(), 0

    def account(out: dict[str, jax.Array], step: int) -> tuple[float, float]:
        value = _finite_loss(
            out["loss"], step, epoch=epoch, workdir=run.workdir, saved=run.saved_step or 0
        )
        data = float(out["data_loss"])
        meta["loss_sum"] += value
        meta["data_loss_sum"] += data
        meta["loss_steps"] += 1
        return value, data

    # A step's loss is read (a host sync) only after the next step is dispatched, so the device
    # never waits for the host between steps.
    previous: tuple[dict[str, jax.Array], int] | None = None
    with contextlib.closing(bar):
        while meta["step_in_epoch"] < run.steps_per_epoch:
            out = run.trainer.train_step(next(stream), meta["global_step"])
            meta["step_in_epoch"] += 1
            meta["global_step"] += 1
            seen += config.batch_size
            bar.update(1)
            if previous is not None:
                loss, data = account(*previous)
                rate = seen / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{loss:.4f}", data=f"{data:.4f}", img_s=f"{rate:.1f}")
            previous = (out, meta["step_in_epoch"])
            if preempted.due(meta["global_step"]) and meta["step_in_epoch"] < run.steps_per_epoch:
                account(*previous)
                run.save()
                run.store.close()
                logging.warning(
                    "SIGTERM: saved the state at epoch %d step %d; re-run the same command to "
                    "resume.",
                    epoch + 1,
                    meta["step_in_epoch"],
                )
                raise Preempted(workdir=run.workdir)
        if previous is not None:
            account(*previous)
    return time.perf_counter() - start, seen


def _end_epoch(run: _Run, train_seconds: float, seen: int, summary) -> None:
    """Validates, records the epoch and saves the checkpoint (marking it best if it is)."""
    meta, epoch = run.meta, run.meta["epoch"]
    val, val_labels = run.evaluate(run.split.validation)
    at_half = binary_metrics(val_labels, val["probability"], 0.5)
    steps_seen = meta["loss_steps"]
    data_loss = meta["data_loss_sum"] / steps_seen if steps_seen else float("nan")
    record = {
        "epoch": epoch + 1,
        "train_loss": meta["loss_sum"] / steps_seen if steps_seen else None,
        "train_data_loss": data_loss if np.isfinite(data_loss) else None,
        "train_images_per_sec": seen / train_seconds if seen else None,
        "validation_auc": at_half["auc"],
        "validation_accuracy": at_half["accuracy"],
    }
    meta["history"].append(record)
    meta.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, data_loss_sum=0.0, loss_steps=0)
    auc = record["validation_auc"]
    if meta["best_epoch"] is None or (np.isfinite(auc) and auc > meta["best_auc"]):
        meta["best_epoch"] = epoch + 1
        meta["best_step"] = meta["global_step"]
        meta["best_auc"] = float(auc) if np.isfinite(auc) else -1.0
    run.save()
    if run.lead:
        workdir_files.rewrite_metrics(run.workdir, meta["history"])
        workdir_files.write_summary(summary, record)
        logging.info(
            "epoch %d: loss %.4f (data term %.4f), validation AUC %.3f, accuracy %.3f",
            epoch + 1,
            record["train_loss"] or float("nan"),
            data_loss,
            auc,
            record["validation_accuracy"],
        )


def _test(run: _Run) -> dict[str, Any]:
    """Restores the best epoch, tests it once and writes results.json and the predictions."""
    best = run.store.restore(checkpointed(run.trainer.state), run.meta["best_step"])
    run.trainer.restore(best[0])
    val, val_labels = run.evaluate(run.split.validation)
    test, test_labels = run.evaluate(run.split.test)
    threshold = choose_threshold(val_labels, val["probability"])
    val_metrics = binary_metrics(val_labels, val["probability"], threshold)
    results = {
        "config": run.config.to_json(),
        "best_epoch": run.meta["best_epoch"],
        "validation": {"auc": val_metrics["auc"], "accuracy": val_metrics["accuracy"]},
        "test": binary_metrics(test_labels, test["probability"], threshold),
    }
    if np.prod(test["instance_logits"].shape[1:]) > 1:  # the alexnet baseline has one instance
        results["test"].update(
            heatmap.localisation(
                test["instance_logits"],
                run.examples.mass_masks[test["index"]],
                [run.examples.mass_boxes[i] for i in test["index"]],
                test_labels,
            )
        )
    if run.lead:
        for name, out in (("validation", val), ("test", test)):
            workdir_files.write_predictions(
                run.workdir / f"{name}_predictions.csv",
                run.examples,
                out["index"],
                out["probability"],
                out["instance_logits"],
            )
        workdir_files.write_json(run.workdir / "results.json", results)
        logging.info(
            "Best epoch %d. Test AUC %.3f, accuracy %.3f (threshold %.3f from validation). "
            "Results in %s",
            results["best_epoch"],
            results["test"]["auc"],
            results["test"]["accuracy"],
            threshold,
            run.workdir / "results.json",
        )
    return results


def train_and_evaluate(config: Config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains ``config.scheme`` on one fold, keeps the best epoch by validation AUC, tests it.

    Returns the dictionary also written to ``workdir/results.json``:
    ``{"config", "best_epoch", "validation": {auc, accuracy, ...}, "test": {auc, accuracy,
    sensitivity, specificity, threshold, and for multi-instance schemes the localisation scores
    of ``heatmap.localisation``: instance_auc, iou, pointing_game, ...}}``, the threshold chosen on
    the validation set.
    Re-running with the same settings resumes (bit-identically on CPU) from the newest intact
    checkpoint; other settings are refused, naming the flag.
    """
    config = config.canonical()
    config.validate()
    workdir = Path(workdir).expanduser().absolute()
    run = _prepare(config, workdir)
    try:
        _start(run)
        summary = workdir_files.summary_writer(workdir) if run.lead else None
        with _Preempted() as preempted:
            while run.meta["epoch"] < config.epochs:
                seconds, seen = _train_epoch(run, preempted)
                _end_epoch(run, seconds, seen, summary)
                if preempted.requested:
                    logging.warning(
                        "SIGTERM: stopped after epoch %d; re-run to resume.", run.meta["epoch"]
                    )
                    raise Preempted(workdir=run.workdir)
        return _test(run)
    finally:
        run.store.close()


# ---------------------------------------------------------------------------------------------
# Command line


def main(config: Config, launch: Launch) -> None:
    """The program: one fold's run in ``--workdir`` (exit 0 when preempted after saving)."""
    initialize_distributed(launch)
    try:
        train_and_evaluate(config, launch.workdir or f"runs/{config.scheme}_fold{config.fold}")
    except Preempted:
        pass


if __name__ == "__main__":
    run_main(main, Config, Launch)
