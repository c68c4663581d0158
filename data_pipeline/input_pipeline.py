"""tf.data input: the paper's augmentation, the training stream and the evaluation stream.

Images are held in memory (as prepared by ``data_pipeline.datasets.prepare``): ``(n, h, w)``
uint16 (scaled by 1/65535) or float32 in [0, 1]. Batches are dicts of numpy-convertible tensors:

* training: ``{"image": (B, h, w, 1) float32 in [0, 1], "label": (B,) int32}``, infinite;
* evaluation: the same plus ``"mask": (B,) bool`` (False on padding) and ``"index": (B,) int64``
  (position of the example in ``images``; -1 on padding), finite.

``B = batch_size // process_count`` is the per-process batch: every JAX process builds its own
stream from ``process_index`` and ``process_count`` (parameters, so this module needs no JAX).

Augmentation (paper, Sec. 3: "horizontal flip, shift of up to 0.1 of the width and height,
rotation up to 45 degrees, and a 50x50 box set to 0") runs in TF ops; flip, rotation and shift
are one affine transform applied by ``ImageProjectiveTransformV3`` (bilinear, fill 0). Every
random choice is a stateless op keyed by the seed and the example's position in the stream, so a
seed gives the same batches on every run.

At import this module hides the GPUs from TensorFlow (``hide_gpus``, also called by
``data_pipeline.datasets``) so that TensorFlow never takes accelerator memory that JAX needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from absl import logging

from data_pipeline.errors import DataError

__all__ = [
    "AugmentConfig",
    "augment",
    "apply_transform",
    "eval_dataset",
    "hide_gpus",
    "to_float",
    "train_dataset",
    "transform_matrix",
]


def hide_gpus() -> None:
    """Keeps TensorFlow off the GPUs: JAX owns them. Call it before TensorFlow runs anything.

    On a machine whose CUDA driver cannot start, TensorFlow logs "failed call to cuInit" here
    (it looks for GPUs to hide); only ``TF_CPP_MIN_LOG_LEVEL=3``, set before TensorFlow is
    imported, silences that line.
    """
    # pragma: no mutate block (device placement, no number; test machines have no GPU to hide)
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as error:  # TF already initialised its devices.
        if tf.config.get_visible_devices("GPU"):
            logging.warning("Could not hide the GPUs from TensorFlow: %s", error)


hide_gpus()

_UINT16_MAX = 65535.0


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the paper's training augmentation (defaults: the paper's values).

    Attributes:
      flip: random horizontal flip with probability 1/2.
      max_shift: shift by up to this fraction of the width (x) and of the height (y), uniform.
      max_rotation: rotation by up to this many degrees either way, uniform, about the centre.
      box_size: side in pixels of the one box set to 0, at ``reference_size``; scaled by
        ``h / reference_size`` and ``w / reference_size`` for other image sizes; 0 disables it.
      reference_size: the image size at which ``box_size`` is given (the paper's 227).
    """

    flip: bool = True
    max_shift: float = 0.1
    max_rotation: float = 45.0
    box_size: int = 50
    reference_size: int = 227

    def box_shape(self, height: int, width: int) -> tuple[int, int]:
        """(box height, box width) in pixels for an image of ``height x width``."""
        if self.box_size <= 0:
            return 0, 0
        bh = round(self.box_size * height / self.reference_size)
        bw = round(self.box_size * width / self.reference_size)
        return max(1, min(bh, height)), max(1, min(bw, width))


def to_float(images: tf.Tensor) -> tf.Tensor:
    """uint16 images scaled by 1/65535, or float images as they are, as float32 in [0, 1]."""
    if images.dtype == tf.uint16:
        return tf.cast(images, tf.float32) * (1.0 / _UINT16_MAX)
    return tf.cast(images, tf.float32)


def transform_matrix(
    height: int | tf.Tensor,
    width: int | tf.Tensor,
    *,
    flip: bool | tf.Tensor = False,
    angle: float | tf.Tensor = 0.0,
    shift_y: float | tf.Tensor = 0.0,
    shift_x: float | tf.Tensor = 0.0,
) -> tf.Tensor:
    """The 8 parameters of ``ImageProjectiveTransformV3`` for flip, then rotation, then shift.

    Pixel ``(x, y)`` = (column, row), pixel centres at integers, centre
    ``c = ((w - 1) / 2, (h - 1) / 2)``. The forward map of an input point ``p`` is::

        q = F(p);  r = c + R(angle) (q - c);  out = r + (shift_x, shift_y)

    with ``F`` the horizontal flip ``x -> w - 1 - x`` (if ``flip``) and
    ``R(a) = [[cos a, -sin a], [sin a, cos a]]`` (angle in radians, in these y-down coordinates).
    ``ImageProjectiveTransformV3`` wants the inverse map (output pixel -> input point), which is
    what the returned ``(8,)`` float32 vector ``[a0, a1, a2, b0, b1, b2, 0, 0]`` encodes:
    ``x_in = a0 x + a1 y + a2``, ``y_in = b0 x + b1 y + b2``.
    """
    dtype = tf.float32
    h = tf.cast(height, dtype)
    w = tf.cast(width, dtype)
    cx = (w - 1.0) / 2.0
    cy = (h - 1.0) / 2.0
    angle = tf.cast(angle, dtype)
    tx = tf.cast(shift_x, dtype)
    ty = tf.cast(shift_y, dtype)
    s = tf.where(tf.cast(flip, tf.bool), -1.0, 1.0)
    cos = tf.cos(angle)
    sin = tf.sin(angle)
    # Inverse: u = out - shift - c; v = R(-angle) u; q = c + v; p = F(q) = c + s (q - c) in x.
    a0 = s * cos
    a1 = s * sin
    a2 = cx - s * (cos * (tx + cx) + sin * (ty + cy))
    b0 = -sin
    b1 = cos
    b2 = cy + sin * (tx + cx) - cos * (ty + cy)
    zero = tf.zeros([], dtype)  # pragma: no mutate (float32 is also the default)
    return tf.stack([a0, a1, a2, b0, b1, b2, zero, zero])


def apply_transform(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """Resamples ``image`` (h, w, c) float32 by the inverse map ``matrix`` (8,).

    Bilinear interpolation; points that fall outside the image read 0.
    """
    size = tf.shape(image)[:2]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[tf.newaxis],
        transforms=tf.reshape(tf.cast(matrix, tf.float32), [1, 8]),
        output_shape=size,
        fill_value=tf.constant(0.0, tf.float32),  # pragma: no mutate (float32: the default)
        interpolation="BILINEAR",
        fill_mode="CONSTANT",  # pragma: no mutate (CONSTANT: the op's default)
    )
    return out[0]


def augment(
    image: tf.Tensor, seed: tf.Tensor, config: AugmentConfig = AugmentConfig()
) -> tf.Tensor:
    """The paper's augmentation of one image.

    Args:
      image: ``(h, w, 1)`` float32 in [0, 1].
      seed: ``(2,)`` int32/int64 stateless seed; the same seed gives the same output.
      config: which operations run and how strongly (defaults: the paper's).

    Returns:
      ``(h, w, 1)`` float32 in [0, 1]: randomly flipped, rotated by up to ``max_rotation``
      degrees, shifted by up to ``max_shift`` of the height and width (one bilinear resampling,
      fill 0), then one ``box_shape`` rectangle at a uniform position set to 0.
    """
    image = tf.convert_to_tensor(image, tf.float32)
    # a split into more seeds starts with the same four (counter-based): num=5 is the same
    seeds = tf.random.experimental.stateless_split(seed, num=4)  # pragma: no mutate
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    if config.flip or config.max_rotation or config.max_shift:  # all off: no resampling
        flip = False
        if config.flip:
            draw = tf.random.stateless_uniform([], seed=seeds[0])
            flip = draw < 0.5  # pragma: no mutate (draw == 0.5 has probability 0)
        angle = 0.0
        # a range of 0 degrees (or shift) draws 0, the same as no draw: ">= 0" is no change
        if config.max_rotation > 0:  # pragma: no mutate
            limit = math.radians(config.max_rotation)
            angle = tf.random.stateless_uniform([], seed=seeds[1], minval=-limit, maxval=limit)
        shift_y = shift_x = 0.0
        if config.max_shift > 0:  # pragma: no mutate
            fraction = tf.random.stateless_uniform(
                [2],  # pragma: no mutate (a longer draw starts with the same two values)
                seed=seeds[2],
                minval=-config.max_shift,
                maxval=config.max_shift,
            )
            shift_y = fraction[0] * tf.cast(h, tf.float32)
            shift_x = fraction[1] * tf.cast(w, tf.float32)
        matrix = transform_matrix(h, w, flip=flip, angle=angle, shift_y=shift_y, shift_x=shift_x)
        image = apply_transform(image, matrix)
    if config.box_size:  # box_shape is (0, 0) for a size <= 0: no box
        static_h, static_w = image.shape[0], image.shape[1]
        if static_h is None or static_w is None:
            raise ValueError("augment needs a static image height and width for the zero box.")
        bh, bw = config.box_shape(static_h, static_w)
        # Top-left corner uniform over the positions where the box fits inside the image.
        room = tf.constant([static_h - bh + 1, static_w - bw + 1])  # int32
        uniform = tf.random.stateless_uniform([2], seed=seeds[3])
        corner = tf.cast(uniform * tf.cast(room, tf.float32), tf.int32)
        # uniform < 1, so corner < room: the cap only guards against float rounding up
        corner = tf.minimum(corner, room - 1)  # pragma: no mutate
        rows = tf.range(static_h)
        cols = tf.range(static_w)
        in_rows = (rows >= corner[0]) & (rows < corner[0] + bh)
        in_cols = (cols >= corner[1]) & (cols < corner[1] + bw)
        box = in_rows[:, tf.newaxis, tf.newaxis] & in_cols[tf.newaxis, :, tf.newaxis]
        image = tf.where(box, tf.zeros_like(image), image)
    return tf.clip_by_value(image, 0.0, 1.0)


def _check_arrays(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 3:
        raise DataError(f"images must be (n, h, w), got shape {images.shape}.")
    if images.dtype != np.uint16 and images.dtype != np.float32:
        raise DataError(
            f"images have dtype {images.dtype}; give uint16 (scaled by 1/65535) or float32 in "
            "[0, 1] (e.g. Examples.images from data_pipeline.datasets.prepare)."
        )
    if labels.shape != (images.shape[0],):
        raise DataError(
            f"labels have shape {labels.shape} but there are {images.shape[0]} images; give one "
            "label per image."
        )
    if images.shape[0] == 0:
        raise DataError("No images: the dataset (or the chosen fold part) is empty.")
    return images, labels.astype(np.int32)


def _per_process_batch(batch_size: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(
            f"process_index={process_index} and process_count={process_count} do not fit; need "
            "0 <= process_index < process_count."
        )
    if batch_size < 1 or batch_size % process_count:
        raise DataError(
            f"batch_size={batch_size} must be a positive multiple of the number of processes "
            f"({process_count}); it is the global batch size."
        )
    return batch_size // process_count


def _table(array: np.ndarray) -> tf.Variable:
    """The array as a CPU variable: tf.data functions capture it by reference, whereas a captured
    constant is copied into the dataset's graph (slow, and twice the memory for a large set)."""
    # pragma: no mutate block (placement and trainability: no number changes)
    with tf.device("/CPU:0"):
        return tf.Variable(array, trainable=False)


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


def train_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    augment: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    config: AugmentConfig = AugmentConfig(),
) -> tf.data.Dataset:
    """The infinite, shuffled, augmented training stream of one process.

    Each epoch draws a permutation of all ``n`` examples (keyed by ``seed`` and the epoch),
    keeps its first ``(n // process_count) * process_count`` entries and deals them out in turn, so
    process ``p`` gets entries ``p, p + P, p + 2P, ...``: within an epoch the processes see
    disjoint examples, and every process has the same number per epoch. The example at global
    stream position ``t`` (``epoch * m * P + j * P + p``) is augmented with a seed folded from
    ``(seed, t)``, so the stream is the same on every run for a seed.

    Args:
      images: ``(n, h, w)`` uint16 or float32 in [0, 1].
      labels: ``(n,)`` 0/1 labels.
      batch_size: global batch size; each process yields ``batch_size // process_count``.
      seed: seed of the shuffling and the augmentation.
      augment: apply the paper's augmentation (``config``); False gives shuffled raw images.
      process_index: this process (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).
      config: augmentation parameters (default: the paper's).

    Returns:
      A ``tf.data.Dataset`` of ``{"image": (B, h, w, 1) float32, "label": (B,) int32}``.
    """
    images, labels = _check_arrays(images, labels)
    local_batch = _per_process_batch(batch_size, process_index, process_count)
    n = images.shape[0]
    per_epoch = n // process_count
    if per_epoch == 0:
        raise DataError(
            f"{n} training examples cannot be shared among {process_count} processes; each "
            "process needs at least one."
        )
    height, width = images.shape[1:]
    image_table, label_table = _table(images), _table(labels)
    seed = seed % (2**63)  # any Python int, as an int64
    # another dtype or constant gives another, equally random stream
    base = tf.constant([seed, 0x5EED], tf.int64)  # pragma: no mutate
    keys = tf.random.experimental.stateless_split(base, num=2)  # pragma: no mutate (2: default)
    shuffle_key, augment_key = tf.unstack(keys)
    stride = process_count
    used = per_epoch * process_count

    def epoch_slice(epoch: tf.Tensor) -> tf.data.Dataset:
        key = tf.random.experimental.stateless_fold_in(shuffle_key, epoch)
        # not mutated: an int32 range gives another, equally random order for the same seed
        indices = tf.range(n, dtype=tf.int64)  # pragma: no mutate
        order = tf.random.experimental.stateless_shuffle(indices, seed=key)
        mine = order[process_index:used:stride]
        positions = epoch * used + tf.range(per_epoch, dtype=tf.int64) * stride + process_index
        return tf.data.Dataset.from_tensor_slices((mine, positions))

    def load(index: tf.Tensor, position: tf.Tensor) -> dict[str, tf.Tensor]:
        image = to_float(tf.gather(image_table, index))[:, :, tf.newaxis]
        image = tf.ensure_shape(image, (height, width, 1))
        if augment:
            example_seed = tf.random.experimental.stateless_fold_in(augment_key, position)
            image = _augment(image, example_seed, config)
        return {"image": image, "label": tf.gather(label_table, index)}

    ds = tf.data.Dataset.counter(dtype=tf.int64).flat_map(epoch_slice)
    # in parallel (speed only); in order, as _options asks
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)  # pragma: no mutate
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())  # pragma: no mutate (speed)


_augment = augment  # train_dataset's ``augment`` flag shadows the function inside it.


def eval_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """The finite evaluation stream of one process: every example exactly once over all processes.

    With ``B = batch_size // process_count`` and ``S = ceil(n / batch_size)`` steps, global step
    ``s`` covers positions ``[s * batch_size, (s + 1) * batch_size)`` and process ``p`` takes the
    ``B`` positions starting at ``s * batch_size + p * B``, so concatenating the processes' batches
    in process order gives the examples in order. Positions ``>= n`` are padding: image 0,
    label 0, ``mask`` False, ``index`` -1. Every process yields exactly ``S`` batches.

    Args:
      images: ``(n, h, w)`` uint16 or float32 in [0, 1].
      labels: ``(n,)`` 0/1 labels.
      batch_size: global batch size.
      process_index: this process.
      process_count: number of processes.

    Returns:
      A ``tf.data.Dataset`` of ``{"image": (B, h, w, 1) float32, "label": (B,) int32,
      "mask": (B,) bool, "index": (B,) int64}``.
    """
    images, labels = _check_arrays(images, labels)
    local_batch = _per_process_batch(batch_size, process_index, process_count)
    n = images.shape[0]
    steps = math.ceil(n / batch_size)
    positions = (
        np.arange(steps)[:, None] * batch_size
        + process_index * local_batch
        + np.arange(local_batch)[None, :]
    ).ravel()
    positions = positions.astype(np.int64)
    valid = positions < n
    index = np.where(valid, positions, -1)
    height, width = images.shape[1:]
    image_table, label_table = _table(images), _table(labels)

    def load(index: tf.Tensor, mask: tf.Tensor) -> dict[str, tf.Tensor]:
        safe = tf.maximum(index, 0)
        batch = to_float(tf.gather(image_table, safe))[..., tf.newaxis]
        batch = tf.ensure_shape(batch, (local_batch, height, width, 1))
        batch = tf.where(mask[:, None, None, None], batch, tf.zeros_like(batch))
        label = tf.where(mask, tf.gather(label_table, safe), tf.zeros_like(index, tf.int32))
        return {"image": batch, "label": label, "mask": mask, "index": index}

    ds = tf.data.Dataset.from_tensor_slices((index, valid)).batch(local_batch, drop_remainder=True)
    # not mutated: parallelism and prefetching change speed only (_options fixes the order)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)  # pragma: no mutate
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())  # pragma: no mutate
