"""The benchmark as one function: resolve the settings, then each requested part's timer."""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from deepmil_jax.benchmark import (
    eval_timer,
    pipeline_timer,
    preprocess_timer,
    torch_timer,
    train_timer,
)
from deepmil_jax.benchmark.settings import PARTS, Settings, describe, resolve
from deepmil_jax.benchmark.timing import Figures
from deepmil_jax.config import Config
from deepmil_jax.steps import Trainer


def run_benchmark(
    settings: Settings,
    *,
    parts: frozenset[str] = frozenset(PARTS),
    base_config: Config | None = None,
    compare: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Measures the figures of the package docstring; returns the JSON object.

    Args:
      settings: what to measure and how long.
      parts: which of train (always measured), eval, pipeline, overlap, preprocess, torch.
      base_config: the training configuration to take the remaining fields from (learning rate,
        mu, ...); default ``Config()``.
      compare: schemes whose train step is timed against the settings' scheme
        (``train_timer.time_schemes``).
    """
    setup = resolve(settings, base_config)
    result = describe(setup)
    c = setup.config
    logging.info(
        "Compiling the %s train step (batch %d, %dx%d, %s)",
        *(c.scheme, setup.batch, c.image_size, c.image_size, setup.precision),
    )
    trainer = Trainer(c, setup.mesh)
    steps = train_timer.TrainSteps(trainer, setup.batch)
    images, labels = trainer.to_global(setup.images), trainer.to_global(setup.labels)
    torch = torch_timer.torch_steps(setup) if "torch" in parts else None
    figures = train_timer.time_train(setup, steps, images, labels, torch and torch[0])
    if torch is not None:
        result.update(torch[1])
        figures.update(torch_timer.compare(figures))
    if compare:
        figures.update(train_timer.time_schemes(setup, steps, images, labels, list(compare)))
    if "eval" in parts:
        figures.update(eval_timer.time_eval(setup, trainer, images))
    if parts & {"pipeline", "overlap"}:
        stream = pipeline_timer.make_stream(setup)
        if "pipeline" in parts:
            figures.update(pipeline_timer.time_pipeline(setup, stream))
        if "overlap" in parts:
            figures.update(pipeline_timer.time_overlap(setup, steps, stream))
    if "preprocess" in parts:
        figures.update(preprocess_timer.time_preprocess(setup))
    return _finish(result, figures, setup.settings)


def _finish(result: dict[str, Any], figures: Figures, s: Settings) -> dict[str, Any]:
    result.update(figures.values)
    result["load_average_end"] = os.getloadavg()[0]
    result["repeats"] = s.repeats
    result["steps_per_repeat"] = s.steps_per_repeat
    result["per_repeat"] = figures.per_repeat
    return result
