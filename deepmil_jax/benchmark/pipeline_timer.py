"""The pipeline and overlap parts: the augmented ``tf.data`` stream alone, and feeding the train
step (in alternation with steps on a fixed host batch). TensorFlow is imported here only when a
stream is made, so that the train and eval parts run without it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from absl import logging

from deepmil_jax.benchmark.settings import Setup
from deepmil_jax.benchmark.timing import Figures, interleave
from deepmil_jax.benchmark.train_timer import TrainSteps


def make_stream(setup: Setup) -> Iterator[dict[str, np.ndarray]]:
    """``input_pipeline.train_dataset`` over random uint16 images with the paper's augmentation,
    its threads started and prefetch buffer filled."""
    from data_pipeline import input_pipeline

    s = setup.settings
    rng = np.random.default_rng(s.seed + 1)
    shape = (s.pipeline_images, s.image_size, s.image_size)
    pool = rng.integers(0, 65536, size=shape, dtype=np.uint16)
    pool_labels = (np.arange(s.pipeline_images) % 2).astype(np.int32)
    stream = input_pipeline.train_dataset(
        pool, pool_labels, batch_size=setup.batch, seed=s.seed, augment=True
    ).as_numpy_iterator()
    for _ in range(3):
        next(stream)
    return stream


def time_pipeline(setup: Setup, stream: Iterator[dict[str, np.ndarray]]) -> Figures:
    """``pipeline_images_per_sec``: batches drawn from the stream, nothing else."""
    s = setup.settings

    def batches() -> int:
        for _ in range(s.pipeline_batches):
            next(stream)
        return s.pipeline_batches * setup.batch

    logging.info("Timing the input pipeline alone")
    return Figures.of_rates(interleave({"pipeline_images_per_sec": batches}, s.repeats))


def time_overlap(
    setup: Setup, steps: TrainSteps, stream: Iterator[dict[str, np.ndarray]]
) -> Figures:
    """Train steps fed from the stream vs on a fixed host batch; ``pipeline_overlap`` = stream /
    fixed (1.0: the step never waits for data)."""
    s = setup.settings
    fixed = {"image": setup.images, "label": setup.labels}
    logging.info("Timing train steps fed from the input pipeline vs a fixed batch")
    bodies = {
        "train_fixed_batch_images_per_sec": lambda: steps.from_host(
            lambda: fixed, s.steps_per_repeat
        ),
        "train_from_pipeline_images_per_sec": lambda: steps.from_host(
            lambda: next(stream), s.steps_per_repeat
        ),
    }
    figures = Figures.of_rates(interleave(bodies, s.repeats))
    v = figures.values
    v["pipeline_overlap"] = (
        v["train_from_pipeline_images_per_sec"] / v["train_fixed_batch_images_per_sec"]
    )
    return figures
