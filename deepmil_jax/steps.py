"""The model, the training state and the jitted steps over a ("data",) device mesh.

``train_step(context, state, batch, step)`` and ``eval_step(context, state, images)`` are pure
functions of a static ``StepContext`` (the model's structure, the optimiser and the few numbers the
loss reads: nothing of a run's fold, paths or epochs, so one program compiles each step once per
scheme and input shape), the state ``{"params", "opt_state", "rest"}`` (replicated) and a batch
(sharded along its first axis). ``Trainer`` holds one run's state on one mesh and feeds the steps
from host batches; the loop (``deepmil_jax.train``), the tests and the benchmark all call these
same functions.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepmil_jax import heatmap, losses, registry
from deepmil_jax.config import Config
from deepmil_jax.models import build_model

# ---------------------------------------------------------------------------------------------
# Loss of each scheme


class LossSpec(NamedTuple):
    """What the data term reads: the scheme's loss (``registry.Scheme.loss``), whether it takes
    instance or bag logits, the settings it takes (``(("k", 6),)``), lambda, and the dropout
    seed. Hashable: part of the jitted steps' static context."""

    loss: str
    loss_on: str
    loss_args: tuple[tuple[str, Any], ...]
    weight_decay: float
    dropout_seed: int
    freeze_backbone: bool = False

    @classmethod
    def of(cls, config: Config) -> LossSpec:
        """``config``'s (canonical) loss."""
        entry = registry.SCHEMES[config.scheme]
        args = tuple((name, getattr(config, name)) for name in entry.loss_args)
        # any fixed offset from the initialisation's seeds (seed, seed + 1) would do as well
        dropout_seed = config.seed + 2  # pragma: no mutate
        return cls(
            entry.loss,
            entry.loss_on,
            args,
            config.weight_decay,
            dropout_seed,
            config.freeze_backbone,
        )


def scheme_loss(
    spec: LossSpec,
    instance_logits: jax.Array,
    labels: jax.Array,
    bag_logits: jax.Array | None = None,
) -> jax.Array:
    """The data term of the scheme: for the paper's, Eq. 4, 6 or 7 of the (N, h, w) instance
    logits; the other MIL poolings are trained by the cross-entropy of the model's own (N,) bag
    logits (``model.instances_and_bag``), which they need."""
    loss = registry.resolve(spec.loss)
    if spec.loss_on == "instances":
        return loss(instance_logits, labels, **dict(spec.loss_args))
    if bag_logits is None:
        raise ValueError(f"{spec.loss} is a loss of bag logits; pass bag_logits")
    return loss(bag_logits, labels)


# ---------------------------------------------------------------------------------------------
# Model, state and the jitted steps


def create_model(config: Config, rngs: nnx.Rngs, *, warn: bool = True) -> nnx.Module:
    """The model of ``config.scheme``, with ImageNet weights when --init=imagenet:PATH."""
    pretrained = None
    if config.init.startswith("imagenet:"):
        from deepmil_jax import weights

        path = config.init.split(":", 1)[1]
        entry = registry.BACKBONES.get(path)
        if entry is not None and entry.pretrained is not None:  # weights a package ships
            path = weights.packaged(path, config.data_dir)
        # the MIL schemes use only the convolutions: do not read the 150 MB of fc6
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
        k=config.k if registry.SCHEMES[config.scheme].pooling == "topk_mean" else 6,
        output_stride=config.output_stride,
        dtype=jnp.bfloat16 if config.precision == "bf16" else jnp.float32,
        rngs=rngs,
    )


def _backbone_or_head(params):
    """The label of every parameter: "backbone" under the model's ``backbone``, else "head"."""

    def label(path, _):
        return "backbone" if getattr(path[0], "key", None) == "backbone" else "head"

    return jax.tree_util.tree_map_with_path(label, params)


def _stop_backbone_gradient(params):
    labels = _backbone_or_head(params)
    return jax.tree.map(
        lambda label, p: jax.lax.stop_gradient(p) if label == "backbone" else p, labels, params
    )


@functools.cache
def make_optimizer(
    learning_rate: float,
    head_learning_rate: float | None = None,
    warmup_steps: int = 0,
    freeze_backbone: bool = False,
) -> optax.GradientTransformation:
    """Adam (the paper's optimiser). With one learning rate, no warm-up and nothing frozen,
    plain ``optax.adam(learning_rate)`` (the paper's); otherwise the backbone's parameters at
    ``learning_rate`` (or frozen) and the instance head's and pooling's at
    ``head_learning_rate``, each warmed up linearly from 0 over ``warmup_steps``. Cached, so that
    runs with the same settings share one optimiser and the jitted steps compile once."""
    head_learning_rate = learning_rate if head_learning_rate is None else head_learning_rate
    if head_learning_rate == learning_rate and not warmup_steps and not freeze_backbone:
        return optax.adam(learning_rate)

    def rate(value: float):
        if not warmup_steps:
            return value
        return optax.linear_schedule(0.0, value, warmup_steps)

    backbone = optax.set_to_zero() if freeze_backbone else optax.adam(rate(learning_rate))
    return optax.multi_transform(
        {"backbone": backbone, "head": optax.adam(rate(head_learning_rate))},
        _backbone_or_head,
    )


def config_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """``make_optimizer`` of a canonical ``config``."""
    return make_optimizer(
        config.learning_rate,
        config.head_learning_rate,
        config.warmup_epochs * steps_per_epoch,
        config.freeze_backbone,
    )


def cpu_compiler_options() -> dict[str, str] | None:
    """XLA options for the jitted steps on CPU: convolutions through XLA's own (Eigen) kernels
    instead of YNNPACK, which jax 0.10 uses by default and whose filter gradients are slower
    (the benchmark measures the difference; the results are the same up to float rounding).
    YNNPACK keeps the matrix products and the reductions (bias gradients),
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
    structure in training and in evaluation mode, the optimiser and the loss. Equal contexts
    (another fold, workdir or epoch count of the same scheme) share the compiled steps."""

    train_graph: Any
    eval_graph: Any
    optimizer: optax.GradientTransformation
    loss: LossSpec


def loss_fn(
    context: StepContext, params, rest, images: jax.Array, labels: jax.Array, step
) -> tuple[jax.Array, jax.Array]:
    """(the paper's objective: data term + lambda/2 ||theta||^2, the data term alone) of a
    training batch ``images`` (N, H, W, 1), ``labels`` (N,); dropout is seeded by ``step``."""
    spec = context.loss
    dropout_key = jax.random.fold_in(jax.random.key(spec.dropout_seed), step)
    if spec.freeze_backbone:  # no gradient through the backbone: its backward pass is not run
        params = _stop_backbone_gradient(params)
    model = nnx.merge(context.train_graph, params, rest, copy=True)
    nnx.reseed(model, dropout=dropout_key)
    logits, bag_logits = model.instances_and_bag(images)
    logits = logits.astype(jnp.float32)  # pragma: no mutate (astype(None) is float32 as well)
    data_loss = scheme_loss(spec, logits, labels, bag_logits)
    return data_loss + spec.weight_decay * losses.l2_penalty(params), data_loss


def _train_step(context: StepContext, state: dict, batch: dict, step):
    (loss, data_loss), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
        context, state["params"], state["rest"], batch["image"], batch["label"], step
    )
    # pragma: no mutate start (Adam does not read the parameters: None changes nothing)
    updates, opt_state = context.optimizer.update(grads, state["opt_state"], state["params"])
    # pragma: no mutate end
    params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "rest": state["rest"]}
    return new_state, {"loss": loss, "data_loss": data_loss}


def _eval_step(context: StepContext, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(context.eval_graph, state["params"], state["rest"])
    instance_logits, bag_logits = model.instances_and_bag(images)
    # pragma: no mutate start (astype(None) casts to JAX's default float, float32, as well)
    return instance_logits.astype(jnp.float32), bag_logits.astype(jnp.float32)
    # pragma: no mutate end


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
    # pragma: no mutate start (donating the state saves memory only; the results are the same)
    return _jitted(_train_step, True)(context, state, batch, step)
    # pragma: no mutate end


def lower_train_step(context: StepContext, state: dict, batch: dict, step) -> jax.stages.Lowered:
    """``train_step`` lowered for these arguments (the very program it runs: options, donation),
    for cost analysis."""
    return _jitted(_train_step, True).lower(context, state, batch, step)


def eval_step(context: StepContext, state: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """((N, h', w') float32 instance scores, (N,) float32 bag logits of the scheme's pooling) of
    ``images`` (N, H, W, 1), the model in eval mode."""
    step = _jitted(_eval_step, False)  # pragma: no mutate (None donates nothing either)
    return step(context, state, images)


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

    def __init__(self, config: Config, mesh: jax.sharding.Mesh, steps_per_epoch: int = 1):
        self.config = config = config.canonical()
        self.mesh = mesh
        model = create_model(config, nnx.Rngs(params=config.seed, dropout=config.seed + 1))
        model.train()
        train_graph, params, rest = nnx.split(model, nnx.Param, ...)
        model.eval()
        optimizer = config_optimizer(config, steps_per_epoch)
        spec = LossSpec.of(config)
        self.context = StepContext(train_graph, nnx.graphdef(model), optimizer, spec)
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
        """Instance logits (scores) and the bag probability of the scheme's own pooling (the
        sigmoid of the model's bag logit) of every real (unmasked) example of an eval stream, by
        index."""
        indices, instance, bags = [], [], []
        for batch in batches:
            logits, bag = eval_step(self.context, self.state, self.to_global(batch["image"]))
            gathered = multihost_utils.process_allgather(
                {
                    "logits": logits,
                    "bag": bag,
                    "mask": self.to_global(batch["mask"]),
                    "index": self.to_global(batch["index"]),
                },
                tiled=True,  # pragma: no mutate (one process: tiled or stacked, the same rows)
            )
            keep = np.asarray(gathered["mask"])
            indices.append(np.asarray(gathered["index"])[keep])
            instance.append(np.asarray(gathered["logits"])[keep])
            bags.append(np.asarray(gathered["bag"])[keep])
        order = np.argsort(np.concatenate(indices))
        return {
            "index": np.concatenate(indices)[order],
            "instance_logits": np.concatenate(instance)[order],
            "probability": heatmap.sigmoid(np.concatenate(bags)[order]),
        }


def make_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((jax.device_count(),), ("data",))
