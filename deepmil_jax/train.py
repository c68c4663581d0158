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
    from deepmil_jax import config as _settings

    _settings.parse_flags_early(_settings.Config, _settings.Launch)

import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from absl import app, logging

# TensorFlow is used for tf.data only: keep it off the accelerators before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from tqdm import tqdm  # noqa: E402

from deepmil_jax import checkpoints, heatmap, losses  # noqa: E402
from deepmil_jax.config import DATASETS, SCHEMES, Config, Launch, from_flags  # noqa: E402, F401
from deepmil_jax.errors import ConfigError, DeepMILError  # noqa: E402
from deepmil_jax.metrics import binary_metrics, choose_threshold  # noqa: E402
from deepmil_jax.models import build_model  # noqa: E402


class TrainingDiverged(DeepMILError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Loss of each scheme


def scheme_loss(config: Config, instance_logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The data term of the paper's Eq. 4, 6 or 7 for ``config.scheme``; (N, h, w) logits."""
    if config.scheme in ("alexnet", "max_pooling"):  # alexnet: one instance, so plain BCE
        return losses.max_pooling_loss(instance_logits, labels)
    if config.scheme == "label_assign":
        return losses.label_assign_loss(instance_logits, labels, config.k)
    return losses.sparse_loss(instance_logits, labels, config.mu)


# ---------------------------------------------------------------------------------------------
# Data


def load_examples(config: Config):
    """Prepares (once) and loads the dataset named by the config into memory."""
    from data_pipeline import datasets

    data_dir = Path(config.data_dir).expanduser()
    if config.dataset == "synthetic":  # written by the first prepare() if missing
        source = "synthetic"
        manual_dir = data_dir / f"synthetic_inbreast_n{config.synthetic_images}"
        tfds_dir = data_dir / f"tfds_synthetic_n{config.synthetic_images}"
    else:
        source, manual_dir = config.dataset, Path(config.manual_dir).expanduser().resolve()
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
# Model, state and the jitted steps


def create_model(config: Config, rngs: nnx.Rngs, *, warn: bool = True) -> nnx.Module:
    """The model of ``config.scheme``, with ImageNet weights when --init=imagenet:PATH."""
    pretrained = None
    if config.init.startswith("imagenet:"):
        from deepmil_jax import weights

        # the MIL schemes use only the convolutions: do not read the 150 MB of fc6
        path = config.init.split(":", 1)[1]
        pretrained = weights.load_converted(path, fc=config.scheme == "alexnet")
    if warn and config.init == "random" and jax.process_index() == 0:
        logging.warning(
            "Training from random initialisation; the paper fine-tuned ImageNet weights "
            "(see python -m deepmil_jax.convert_weights and --init=imagenet:PATH)."
        )
    return build_model(
        config.scheme,
        backbone=config.backbone,
        head_hidden=config.head_hidden,
        pretrained=pretrained,
        dtype=jnp.bfloat16 if config.precision == "bf16" else jnp.float32,
        rngs=rngs,
    )


def grid_shape(config: Config) -> tuple[int, int]:
    """(h', w') of the instance grid of ``config``'s model at ``config.image_size``."""
    from deepmil_jax.models.grid import grid_shape as shape

    return shape(config.scheme, config.backbone, config.image_size, config.head_hidden)


def cpu_compiler_options() -> dict[str, str] | None:
    """XLA options for the jitted steps on CPU: convolutions through XLA's own (Eigen) kernels
    instead of YNNPACK, which jax 0.10 uses by default and whose filter gradients are slow
    (measured on 2 cores: the caffe AlexNet-MIL train step 1.2-1.3x faster; the same results up
    to float rounding). YNNPACK keeps the matrix products and the reductions (bias gradients),
    where it is fast. None on accelerators, when XLA_FLAGS already sets the option, or when this
    XLA does not know it (the option is experimental)."""
    key = "xla_cpu_experimental_ynn_fusion_type"
    if jax.default_backend() != "cpu" or key in os.environ.get("XLA_FLAGS", ""):
        return None
    options = {key: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.zeros(())).compile()
    except jax.errors.JaxRuntimeError:
        return None
    return options


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What the jitted steps need besides arrays, passed as their static argument: the model's
    structure in training and in evaluation mode, the optimiser and the run's settings."""

    train_graph: Any
    eval_graph: Any
    optimizer: optax.GradientTransformation
    config: Config


def loss_fn(
    context: StepContext, params, rest, images: jax.Array, labels: jax.Array, step
) -> tuple[jax.Array, jax.Array]:
    """(the paper's objective: data term + lambda/2 ||theta||^2, the data term alone) of a
    training batch ``images`` (N, H, W, 1), ``labels`` (N,); dropout is seeded by ``step``."""
    config = context.config
    dropout_key = jax.random.fold_in(jax.random.key(config.seed + 2), step)
    model = nnx.merge(context.train_graph, params, rest, copy=True)
    nnx.reseed(model, dropout=dropout_key)
    logits = model(images).astype(jnp.float32)
    data_loss = scheme_loss(config, logits, labels)
    return data_loss + config.weight_decay * losses.l2_penalty(params), data_loss


def _train_step(context: StepContext, state: dict, batch: dict, step):
    (loss, data_loss), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
        context, state["params"], state["rest"], batch["image"], batch["label"], step
    )
    updates, opt_state = context.optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "rest": state["rest"]}
    return new_state, {"loss": loss, "data_loss": data_loss}


def _eval_step(context: StepContext, state: dict, images: jax.Array) -> jax.Array:
    model = nnx.merge(context.eval_graph, state["params"], state["rest"])
    return model(images).astype(jnp.float32)


@functools.cache
def _jitted(fn, donate_state: bool):
    """``fn`` jitted once per process (on first use, when the backend is known); the context is
    static, the state replicated and the batch sharded as the arrays passed in already are."""
    return jax.jit(
        fn,
        static_argnums=0,
        donate_argnums=(1,) if donate_state else (),
        compiler_options=cpu_compiler_options(),
    )


def train_step(context: StepContext, state: dict, batch: dict, step) -> tuple[dict, dict]:
    """One Adam step on ``loss_fn``: ``state`` = {"params", "opt_state", "rest"} (replicated; it is
    donated), ``batch`` = {"image" (N, H, W, 1), "label" (N,)} sharded over the mesh's data axis.
    Returns the new state and {"loss", "data_loss"} (not waited for)."""
    return _jitted(_train_step, True)(context, state, batch, step)


def eval_step(context: StepContext, state: dict, images: jax.Array) -> jax.Array:
    """(N, h', w') float32 instance logits of ``images`` (N, H, W, 1), the model in eval mode."""
    return _jitted(_eval_step, False)(context, state, images)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The sharding of the state: a full copy on every device."""
    return NamedSharding(mesh, P())


def sharded_batch(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The sharding of a batch: split along its first axis over the mesh's "data" axis."""
    return NamedSharding(mesh, P("data"))


def checkpointed(state: dict) -> dict:
    """The part of the state a checkpoint holds (the model's other variables, its dropout RNG
    state, are rebuilt from the seed)."""
    return {"params": state["params"], "opt_state": state["opt_state"]}


class Trainer:
    """The state of one run on one device mesh, and the loop's use of the steps: host batches
    in, the process's share of each evaluation out."""

    def __init__(self, config: Config, mesh: jax.sharding.Mesh):
        self.config = config = config.canonical()
        self.mesh = mesh
        model = create_model(config, nnx.Rngs(params=config.seed, dropout=config.seed + 1))
        model.train()
        train_graph, params, rest = nnx.split(model, nnx.Param, ...)
        model.eval()
        optimizer = optax.adam(config.learning_rate)
        self.context = StepContext(train_graph, nnx.graphdef(model), optimizer, config)
        state = {"params": params, "opt_state": optimizer.init(params), "rest": rest}
        self.state = jax.device_put(state, replicated(mesh))

    def to_global(self, batch: np.ndarray) -> jax.Array:
        """This process's part of a batch -> one array sharded over the mesh's data axis."""
        return jax.make_array_from_process_local_data(sharded_batch(self.mesh), batch)

    def restore(self, saved: dict) -> None:
        """Takes ``checkpointed`` arrays (a checkpoint's) as the state's."""
        self.state = self.state | jax.device_put(saved, replicated(self.mesh))

    def train_step(self, batch: dict[str, np.ndarray], step: int) -> dict[str, jax.Array]:
        """One optimiser step on this process's part of a batch (numpy); returns the losses."""
        images = self.to_global(batch["image"])
        labels = self.to_global(batch["label"].astype(np.int32))
        return self.step_on_devices(images, labels, step)

    def step_on_devices(
        self, images: jax.Array, labels: jax.Array, step: int
    ) -> dict[str, jax.Array]:
        """``train_step`` on a batch already sharded over the mesh (``to_global``): updates the
        state, returns ``{"loss", "data_loss"}`` without waiting for them."""
        batch = {"image": images, "label": labels}
        self.state, out = train_step(self.context, self.state, batch, step)
        return out

    def predict(self, batches) -> dict[str, np.ndarray]:
        """Instance logits of every real (unmasked) example of an eval stream, by index."""
        indices, instance = [], []
        for batch in batches:
            logits = eval_step(self.context, self.state, self.to_global(batch["image"]))
            gathered = multihost_utils.process_allgather(
                {
                    "logits": logits,
                    "mask": self.to_global(batch["mask"]),
                    "index": self.to_global(batch["index"]),
                },
                tiled=True,
            )
            keep = np.asarray(gathered["mask"])
            indices.append(np.asarray(gathered["index"])[keep])
            instance.append(np.asarray(gathered["logits"])[keep])
        order = np.argsort(np.concatenate(indices))
        instance_logits = np.concatenate(instance)[order]
        return {
            "index": np.concatenate(indices)[order],
            "instance_logits": instance_logits,
            "probability": heatmap.bag_probability(instance_logits),
        }


# ---------------------------------------------------------------------------------------------
# Checkpoints (the protocol is deepmil_jax.checkpoints)


def restore_params(path: str, like_state) -> Any:
    """Parameters of another run's best checkpoint, for --init=checkpoint:PATH (a training
    workdir, or its checkpoints/ folder)."""
    root = Path(path).expanduser().absolute()
    directory = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    store = checkpoints.RunCheckpoints(directory, create=False)
    try:
        restored = store.restore_best(like_state)
    except checkpoints.CheckpointError as e:
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


def read_config(workdir: Path) -> Config:
    """The canonical Config saved in a training workdir's config.json (ConfigError if unusable)."""
    config_file = workdir / "config.json"
    if not config_file.exists():
        raise ConfigError(
            f"{workdir} is not a training workdir (no config.json); give the --workdir of a "
            "python -m deepmil_jax.train run."
        )
    try:
        fields = json.loads(config_file.read_text())
        if not isinstance(fields, dict):
            raise TypeError("not a JSON object")
        known = {f.name for f in dataclasses.fields(Config)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"unknown settings {', '.join(unknown)}")
        fields["head_hidden"] = tuple(fields.get("head_hidden", ()))
        return Config(**fields).canonical()
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"{config_file} cannot be read ({e}); it was not written by this version of "
            "deepmil_jax.train or was edited. Restore it, or retrain in a new --workdir."
        ) from None


def load_trained(workdir: str | os.PathLike, *, which: str = "best") -> tuple[Config, nnx.Module]:
    """The config and the model (in eval mode) of a training workdir's best or latest checkpoint
    (checksums verified; ``latest`` falls back to the newest intact step with a warning)."""
    workdir = Path(workdir).expanduser().absolute()
    config = dataclasses.replace(read_config(workdir), init="random")
    model = create_model(config, nnx.Rngs(0), warn=False)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    like = {"params": params, "opt_state": optax.adam(config.learning_rate).init(params)}
    store = checkpoints.RunCheckpoints(workdir / "checkpoints", create=False)
    try:
        restored = store.restore_best(like) if which == "best" else store.restore(like)
    finally:
        store.close()
    if restored is None:
        raise ConfigError(f"{workdir / 'checkpoints'} holds no checkpoint yet.")
    nnx.update(model, restored[0]["params"])
    model.eval()
    return config, model


# ---------------------------------------------------------------------------------------------
# The loop


class _Preempted:
    """Turns SIGTERM (a preempted Cloud TPU VM) into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: no handler, no preemption saving
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    tmp.replace(path)


def _write_predictions(path: Path, examples, indices, probs, instance_logits) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(
            [
                "file_id",
                "patient_id",
                "label",
                "birads",
                "probability",
                "top_patch_row",
                "top_patch_col",
            ]
        )
        for i, p, z in zip(indices, probs, instance_logits, strict=True):
            row, col = heatmap.top_cell(z)
            out.writerow(
                [
                    examples.file_ids[i],
                    examples.patient_ids[i],
                    int(examples.labels[i]),
                    examples.birads[i],
                    f"{p:.6f}",
                    row,
                    col,
                ]
            )
    tmp.replace(path)


def _check_same_run(workdir: Path, config: Config) -> None:
    """Refuses a workdir that holds a run with other settings (only --epochs may grow).

    Settings are compared canonically (paths absolute and normalised). A workdir whose run never
    saved a checkpoint holds nothing to resume and is taken over."""
    if not (workdir / "config.json").exists():
        return
    saved = read_config(workdir).to_json()
    current = config.to_json()
    changed = sorted(k for k in current if k != "epochs" and saved.get(k) != current[k])
    has_run = (workdir / "results.json").exists() or any((workdir / "checkpoints").glob("[0-9]*"))
    if changed and has_run:
        details = ", ".join(f"--{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(
            f"{workdir} holds a run with other settings ({details}); re-run with the same flags to "
            "resume it, or give a new --workdir."
        )


def _check_epochs(workdir: Path, config: Config, done: int) -> None:
    if done > config.epochs:
        raise ConfigError(
            f"--epochs={config.epochs}: {workdir} has already trained {done} epochs; give "
            f"--epochs={done} or more (more continues training), or a new --workdir."
        )


def make_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((jax.device_count(),), ("data",))


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
    sum of this epoch's step losses, so that a mid-epoch resume reports the whole epoch's mean."""
    return {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "loss_sum": 0.0,
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
    and restores the newest intact checkpoint. Writes nothing into the workdir."""
    from data_pipeline import folds

    mesh = make_mesh()
    n_dev = mesh.devices.size
    for name in ("batch_size", "eval_batch_size"):
        if getattr(config, name) % n_dev:
            raise ConfigError(
                f"--{name}={getattr(config, name)} cannot be split evenly over {n_dev} devices; "
                f"use a multiple of {n_dev}."
            )
    _check_same_run(workdir, config)
    if (workdir / "results.json").exists():
        finished = json.loads((workdir / "results.json").read_text()).get("config", {})
        _check_epochs(workdir, config, int(finished.get("epochs", 0)))
    examples = load_examples(config)
    split = folds.make_split(
        examples.labels,
        examples.patient_ids,
        num_folds=config.num_folds,
        fold=config.fold,
        split=config.split,
        seed=config.seed,
    )
    trainer = Trainer(config, mesh)
    if config.init.startswith("checkpoint:"):
        like = checkpointed(trainer.state)
        params = restore_params(config.init.split(":", 1)[1], like)
        trainer.restore(like | {"params": params})
    store = checkpoints.RunCheckpoints(workdir / "checkpoints")
    meta, saved_step = _new_meta(), None
    resumed = store.restore(checkpointed(trainer.state))
    if resumed is not None:
        trainer.restore(resumed[0])
        meta, saved_step = _new_meta() | resumed[1], resumed[2]
        _check_epochs(workdir, config, meta["epoch"])
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
    _write_json(run.workdir / "config.json", run.config.to_json())
    folds.write_split(run.split, run.examples.file_ids, run.workdir / "split.json")
    _rewrite_metrics(run.workdir, run.meta["history"])
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

    def account(loss: jax.Array, step: int) -> float:
        value = _finite_loss(
            loss, step, epoch=epoch, workdir=run.workdir, saved=run.saved_step or 0
        )
        meta["loss_sum"] += value
        meta["loss_steps"] += 1
        return value

    # A step's loss is read (a host sync) only after the next step is dispatched, so the device
    # never waits for the host between steps.
    previous: tuple[jax.Array, int] | None = None
    with contextlib.closing(bar):
        while meta["step_in_epoch"] < run.steps_per_epoch:
            out = run.trainer.train_step(next(stream), meta["global_step"])
            meta["step_in_epoch"] += 1
            meta["global_step"] += 1
            seen += config.batch_size
            bar.update(1)
            if previous is not None:
                loss = account(*previous)
                rate = seen / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}")
            previous = (out["loss"], meta["step_in_epoch"])
            if preempted.requested and meta["step_in_epoch"] < run.steps_per_epoch:
                account(*previous)
                run.save()
                run.store.close()
                logging.warning(
                    "SIGTERM: saved the state at epoch %d step %d; re-run the same command to "
                    "resume.",
                    epoch + 1,
                    meta["step_in_epoch"],
                )
                raise SystemExit(0)
        if previous is not None:
            account(*previous)
    return time.perf_counter() - start, seen


def _end_epoch(run: _Run, train_seconds: float, seen: int, summary) -> None:
    """Validates, records the epoch and saves the checkpoint (marking it best if it is)."""
    meta, epoch = run.meta, run.meta["epoch"]
    val, val_labels = run.evaluate(run.split.validation)
    at_half = binary_metrics(val_labels, val["probability"], 0.5)
    record = {
        "epoch": epoch + 1,
        "train_loss": meta["loss_sum"] / meta["loss_steps"] if meta["loss_steps"] else None,
        "train_images_per_sec": seen / train_seconds if seen else None,
        "validation_auc": at_half["auc"],
        "validation_accuracy": at_half["accuracy"],
    }
    meta["history"].append(record)
    meta.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, loss_steps=0)
    auc = record["validation_auc"]
    if meta["best_epoch"] is None or (np.isfinite(auc) and auc > meta["best_auc"]):
        meta["best_epoch"] = epoch + 1
        meta["best_step"] = meta["global_step"]
        meta["best_auc"] = float(auc) if np.isfinite(auc) else -1.0
    run.save()
    if run.lead:
        _rewrite_metrics(run.workdir, meta["history"])
        _write_summary(summary, record)
        logging.info(
            "epoch %d: loss %.4f, validation AUC %.3f, accuracy %.3f",
            epoch + 1,
            record["train_loss"] or float("nan"),
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
    if run.lead:
        for name, out in (("validation", val), ("test", test)):
            _write_predictions(
                run.workdir / f"{name}_predictions.csv",
                run.examples,
                out["index"],
                out["probability"],
                out["instance_logits"],
            )
        _write_json(run.workdir / "results.json", results)
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
    sensitivity, specificity, threshold}}``, the threshold chosen on the validation set.
    Re-running with the same settings resumes (bit-identically on CPU) from the newest intact
    checkpoint; other settings are refused, naming the flag.
    """
    config = config.canonical()
    config.validate()
    workdir = Path(workdir).expanduser().absolute()
    run = _prepare(config, workdir)
    try:
        _start(run)
        summary = _summary_writer(workdir) if run.lead else None
        with _Preempted() as preempted:
            while run.meta["epoch"] < config.epochs:
                seconds, seen = _train_epoch(run, preempted)
                _end_epoch(run, seconds, seen, summary)
                if preempted.requested:
                    logging.warning(
                        "SIGTERM: stopped after epoch %d; re-run to resume.", run.meta["epoch"]
                    )
                    raise SystemExit(0)
        return _test(run)
    finally:
        run.store.close()


def _rewrite_metrics(workdir: Path, history: list[dict]) -> None:
    tmp = workdir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    tmp.replace(workdir / "metrics.jsonl")


def _summary_writer(workdir: Path):
    import tensorflow as tf

    return tf.summary.create_file_writer(str(workdir / "tensorboard"))


def _write_summary(writer, record: dict) -> None:
    import tensorflow as tf

    with writer.as_default(step=record["epoch"]):
        for key, value in record.items():
            if key != "epoch" and value is not None:
                tf.summary.scalar(key, value)
    writer.flush()


# ---------------------------------------------------------------------------------------------
# Command line


def initialize_distributed(launch: Launch) -> None:
    """Joins the other processes of a multi-host run (--distributed or --coordinator_address)."""
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


def run_main(body, *, positional: bool = False) -> None:
    """Runs ``body`` under absl, turning the project's errors into one clear line and exit status
    1. ``body()`` takes no arguments, or with ``positional`` the command line's ``argv``."""

    def main(argv):
        if not positional and len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
        logging.get_absl_handler().addFilter(_quiet_libraries)
        try:
            if positional:
                body(argv)
            else:
                body()
        except DeepMILError as e:
            logging.error("%s", e)
            raise SystemExit(f"error: {e}") from None

    app.run(main)


def _main() -> None:
    launch = from_flags(Launch)
    initialize_distributed(launch)
    config = from_flags(Config)
    train_and_evaluate(config, launch.workdir or f"runs/{config.scheme}_fold{config.fold}")


if __name__ == "__main__":
    run_main(_main)
