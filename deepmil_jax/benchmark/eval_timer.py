"""The eval part: the Trainer's jitted forward pass (``predict``'s step) on a batch on devices."""

from __future__ import annotations

import jax

from deepmil_jax.benchmark.settings import Setup
from deepmil_jax.benchmark.timing import Figures, interleave
from deepmil_jax.steps import Trainer, eval_step


def time_eval(setup: Setup, trainer: Trainer, images: jax.Array) -> Figures:
    """``eval_images_per_sec``: ``eval_step`` (the step ``Trainer.predict`` runs on each batch,
    without gathering the logits to the host) on a fixed batch sharded over the mesh."""
    s = setup.settings

    def eval_steps(n: int) -> int:
        for _ in range(n):
            logits = eval_step(trainer.context, trainer.state, images)
        jax.block_until_ready(logits)
        return n * setup.batch

    eval_steps(s.warmup)
    return Figures.of_rates(
        interleave({"eval_images_per_sec": lambda: eval_steps(s.steps_per_repeat)}, s.repeats)
    )
