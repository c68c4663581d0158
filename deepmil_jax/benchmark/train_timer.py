"""The train part: ``Trainer.step_on_devices`` on a fixed batch already on the devices, its FLOPs
(XLA's cost analysis) and model FLOPs utilisation; PyTorch's step, when given, in alternation."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from deepmil_jax.benchmark import peaks
from deepmil_jax.benchmark.settings import Setup
from deepmil_jax.benchmark.timing import Figures, interleave, median
from deepmil_jax.config import scheme_configs
from deepmil_jax.steps import Trainer, lower_train_step


class TrainSteps:
    """Calls of the Trainer's public train step, numbered on from one call to the next."""

    def __init__(self, trainer: Trainer, batch: int):
        self.trainer, self.batch, self.step = trainer, batch, 0

    def on_devices(self, images: jax.Array, labels: jax.Array, n: int) -> int:
        """``n`` steps on a batch sharded over the mesh, waited for at the end; images done."""
        loss = None  # n = 0 (--warmup=0): nothing to wait for
        for _ in range(n):
            loss = self.trainer.step_on_devices(images, labels, self.step)["loss"]
            self.step += 1
        jax.block_until_ready(loss)
        return n * self.batch

    def from_host(self, next_batch: Callable[[], dict[str, np.ndarray]], n: int) -> int:
        """``n`` steps on numpy batches (copied to the devices by ``train_step``), each loss read
        back as the training loop does; returns the images done."""
        for _ in range(n):
            out = self.trainer.train_step(next_batch(), self.step)
            self.step += 1
            float(out["loss"])
        return n * self.batch


def train_program(trainer: Trainer, images: jax.Array, labels: jax.Array) -> tuple[float, int]:
    """FLOPs of one train step over all devices, from XLA's cost analysis of the compiled step
    (``deepmil_jax.steps.lower_train_step``: the program ``train_step`` runs), and the bytes one
    device holds while it runs, from XLA's buffer assignment: arguments, outputs and
    temporaries, less the outputs written over donated arguments (state in, state out)."""
    batch = {"image": images, "label": labels}
    compiled = lower_train_step(trainer.context, trainer.state, batch, 0).compile()
    memory = compiled.memory_analysis()
    held = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return peaks.cost_flops(compiled) * trainer.mesh.devices.size, int(held)


def time_train(
    setup: Setup,
    steps: TrainSteps,
    images: jax.Array,
    labels: jax.Array,
    torch_steps: Callable[[int], int] | None = None,
) -> Figures:
    """``train_images_per_sec`` (median, best), FLOPs, the step's device memory, peak and mfu;
    with ``torch_steps`` (n steps -> images done) also ``torch_train_images_per_sec``, timed in
    alternation with JAX."""
    s = setup.settings
    n_dev = setup.mesh.devices.size
    flops, held = train_program(steps.trainer, images, labels)
    peak = peaks.device_peak(setup.device, setup.precision)
    steps.on_devices(images, labels, s.warmup)
    bodies = {"train_images_per_sec": lambda: steps.on_devices(images, labels, s.steps_per_repeat)}
    if torch_steps is not None:
        torch_steps(s.warmup)
        bodies["torch_train_images_per_sec"] = lambda: torch_steps(s.steps_per_repeat)
    logging.info("Timing the train step%s", " against PyTorch, interleaved" if torch_steps else "")
    figures = Figures.of_rates(interleave(bodies, s.repeats))
    rate = figures.values["train_images_per_sec"]
    figures.values.update(
        train_flops_per_step=flops,
        train_step_memory_mib=held / 2**20,
        peak_flops_per_sec=peak.flops_per_sec * n_dev,
        peak_source=peak.source,
        mfu=flops * rate / setup.batch / (peak.flops_per_sec * n_dev),
        # The best repeat estimates the speed on an idle machine (load only ever slows a repeat).
        train_images_per_sec_best=max(figures.per_repeat["train_images_per_sec"]),
    )
    return figures


def time_schemes(
    setup: Setup, steps: TrainSteps, images: jax.Array, labels: jax.Array, entries: list[str]
) -> Figures:
    """The train step of each of ``entries`` (evaluate's ``--schemes`` syntax: ``max_pooling``,
    ``label_assign:k=3``) on the same batch, timed in alternation with the benchmark's own
    ``--scheme`` (``steps``). ``step_time_vs_scheme``: ``{name: median step time / the
    --scheme's}`` (1.0 for an entry that is the --scheme itself)."""
    s, reference = setup.settings, setup.config
    bodies = {"reference": lambda: steps.on_devices(images, labels, s.steps_per_repeat)}
    configs = scheme_configs(reference, entries, "--compare")
    for name, config in configs.items():
        config = config.canonical()
        config.validate()
        if config == reference:
            continue
        logging.info("Compiling the %s train step", name)
        other = TrainSteps(Trainer(config, setup.mesh), setup.batch)
        other.on_devices(images, labels, 1 + s.warmup)
        bodies[name] = lambda other=other: other.on_devices(images, labels, s.steps_per_repeat)
    logging.info("Timing %d schemes' train steps, interleaved", len(bodies))
    rates = interleave(bodies, s.repeats)
    ratios = {
        name: median(rates["reference"]) / median(rates.get(name, rates["reference"]))
        for name in configs
    }
    per_repeat = {f"train_images_per_sec[{name}]": r for name, r in rates.items()}
    return Figures({"step_time_vs_scheme": ratios}, per_repeat)
