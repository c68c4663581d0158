"""Tests of data_pipeline.input_pipeline: augmentation geometry, determinism, sharding, coverage."""

import itertools
import math

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline.errors import DataError
from data_pipeline.input_pipeline import (
    AugmentConfig,
    apply_transform,
    augment,
    eval_dataset,
    to_float,
    train_dataset,
    transform_matrix,
)

ONLY_FLIP = AugmentConfig(flip=True, max_shift=0.0, max_rotation=0.0, box_size=0)
ONLY_BOX = AugmentConfig(flip=False, max_shift=0.0, max_rotation=0.0, box_size=50)


def _forward_numpy(points_xy, h, w, flip, angle, shift_y, shift_x):
    """Reference forward map (input pixel -> output pixel): flip, rotate about the centre, shift."""
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    p = np.array(points_xy, dtype=np.float64)
    if flip:
        p[..., 0] = (w - 1) - p[..., 0]
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return c + (p - c) @ rotation.T + np.array([shift_x, shift_y])


def _indexed_images(n, h=8, w=8):
    """uint16 images whose every pixel holds the image's index, to recover it from a batch."""
    return np.broadcast_to(np.arange(n, dtype=np.uint16)[:, None, None], (n, h, w)).copy()


def _recover_index(batch_images):
    values = np.round(np.asarray(batch_images)[:, 0, 0, 0] * 65535.0).astype(np.int64)
    return values


@pytest.mark.parametrize(
    "flip,angle,shift_y,shift_x", [(False, 0.3, 0.0, 0.0), (True, -0.7, 4.5, -6.0), (True, 0, 0, 0)]
)
def test_transform_matrix_inverts_the_numpy_forward_map(flip, angle, shift_y, shift_x):
    h, w = 48, 64
    rng = np.random.default_rng(0)
    points = rng.uniform(0, [w - 1, h - 1], size=(20, 2))
    out = _forward_numpy(points, h, w, flip, angle, shift_y, shift_x)
    m = transform_matrix(h, w, flip=flip, angle=angle, shift_y=shift_y, shift_x=shift_x).numpy()
    assert m.shape == (8,) and m[6] == 0 and m[7] == 0
    back_x = m[0] * out[:, 0] + m[1] * out[:, 1] + m[2]
    back_y = m[3] * out[:, 0] + m[4] * out[:, 1] + m[5]
    np.testing.assert_allclose(np.stack([back_x, back_y], 1), points, atol=1e-4)


def test_a_bright_spot_lands_where_numpy_says():
    h, w = 64, 80
    y, x = np.mgrid[0:h, 0:w]
    spot_x, spot_y = 22.0, 17.0
    image = np.exp(-((x - spot_x) ** 2 + (y - spot_y) ** 2) / (2 * 1.5**2)).astype(np.float32)
    flip, angle, shift_y, shift_x = True, math.radians(30), 5.0, -7.0
    m = transform_matrix(h, w, flip=flip, angle=angle, shift_y=shift_y, shift_x=shift_x)
    out = apply_transform(tf.constant(image[:, :, None]), m).numpy()[:, :, 0]
    centroid = np.array([(out * x).sum(), (out * y).sum()]) / out.sum()
    expected = _forward_numpy([spot_x, spot_y], h, w, flip, angle, shift_y, shift_x)
    np.testing.assert_allclose(centroid, expected, atol=0.1)
    assert out.sum() == pytest.approx(image.sum(), rel=0.02)  # nothing fell off the edge


def test_flip_is_exact_and_both_outcomes_occur():
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, size=(64, 48, 1)).astype(np.float32)
    outcomes = set()
    for s in range(16):
        out = augment(tf.constant(image), tf.constant([s, 3], tf.int64), ONLY_FLIP).numpy()
        if np.array_equal(out, image):
            outcomes.add("same")
        elif np.array_equal(out, image[:, ::-1]):
            outcomes.add("flipped")
        else:
            pytest.fail("a flip-only augmentation changed pixel values")
    assert outcomes == {"same", "flipped"}


@pytest.mark.parametrize("h,w,box", [(64, 64, (14, 14)), (227, 227, (50, 50)), (64, 96, (14, 21))])
def test_zero_box_is_exactly_one_scaled_box(h, w, box):
    assert ONLY_BOX.box_shape(h, w) == box
    rng = np.random.default_rng(2)
    image = rng.uniform(0.1, 1.0, size=(h, w, 1)).astype(np.float32)
    corners = set()
    for s in range(6):
        out = augment(tf.constant(image), tf.constant([7, s], tf.int64), ONLY_BOX).numpy()
        zero = out[:, :, 0] == 0
        rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
        assert zero.sum() == box[0] * box[1]
        assert (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) == box
        np.testing.assert_array_equal(out[~zero], image[~zero])
        corners.add((rows[0], cols[0]))
    assert len(corners) > 1


def test_augment_is_deterministic_for_a_seed_bounded_and_shape_preserving():
    rng = np.random.default_rng(3)
    image = tf.constant(rng.uniform(0, 1, size=(64, 64, 1)).astype(np.float32))
    a = augment(image, tf.constant([1, 2], tf.int64)).numpy()
    b = augment(image, tf.constant([1, 2], tf.int64)).numpy()
    c = augment(image, tf.constant([1, 3], tf.int64)).numpy()
    assert a.shape == (64, 64, 1) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert (a == 0).sum() >= 14 * 14  # the zero box (plus any fill at the edges)


def _take(ds, k):
    return [{key: v.numpy() for key, v in batch.items()} for batch in ds.take(k)]


def test_train_stream_deterministic_for_a_seed_and_bounded():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 65536, size=(20, 64, 64), dtype=np.uint16)
    labels = rng.integers(0, 2, size=20)
    a = _take(train_dataset(images, labels, batch_size=4, seed=5), 3)
    b = _take(train_dataset(images, labels, batch_size=4, seed=5), 3)
    c = _take(train_dataset(images, labels, batch_size=4, seed=6), 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    for batch in a:
        assert batch["image"].shape == (4, 64, 64, 1) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
        assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
    # Augmentation is keyed by the example's position in the stream, not by the batching.
    d = _take(train_dataset(images, labels, batch_size=2, seed=5), 6)
    np.testing.assert_array_equal(
        np.concatenate([x["image"] for x in a]), np.concatenate([x["image"] for x in d])
    )


def test_train_stream_without_augmentation_gives_each_example_once_per_epoch():
    n = 12
    images = _indexed_images(n)
    labels = np.arange(n) % 2
    batches = _take(train_dataset(images, labels, batch_size=4, seed=0, augment=False), 6)
    seen = np.concatenate([_recover_index(b["image"]) for b in batches])
    for epoch in seen.reshape(2, n):
        assert sorted(epoch) == list(range(n))
    assert not np.array_equal(seen[:n], seen[n:])  # reshuffled every epoch
    labels_seen = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels_seen, labels[seen])


@pytest.mark.parametrize("n,process_count", [(50, 3), (16, 4)])
def test_train_shards_are_disjoint_across_processes(n, process_count):
    images = _indexed_images(n)
    labels = np.zeros(n)
    per_epoch = n // process_count
    local_batch = 2
    steps = per_epoch // local_batch  # whole batches within the first epoch
    shards = []
    for p in range(process_count):
        ds = train_dataset(
            images,
            labels,
            batch_size=local_batch * process_count,
            seed=9,
            augment=False,
            process_index=p,
            process_count=process_count,
        )
        seen = np.concatenate([_recover_index(b["image"]) for b in _take(ds, steps)])
        assert len(set(seen)) == seen.size
        shards.append(set(seen))
    for a, b in itertools.combinations(shards, 2):
        assert not a & b
    assert sum(len(s) for s in shards) == steps * local_batch * process_count


@pytest.mark.parametrize(
    "n,batch_size,process_count",
    [(10, 4, 1), (8, 4, 1), (10, 4, 2), (7, 6, 3), (1, 4, 2), (12, 4, 4), (13, 8, 2), (3, 8, 4)],
)
def test_eval_stream_covers_every_example_exactly_once(n, batch_size, process_count):
    images = _indexed_images(n)
    labels = (np.arange(n) * 7) % 3 == 0
    steps = -(-n // batch_size)
    per_process = []
    for p in range(process_count):
        ds = eval_dataset(
            images, labels, batch_size=batch_size, process_index=p, process_count=process_count
        )
        batches = _take(ds, 1000)
        assert len(batches) == steps
        per_process.append(batches)
    seen = []
    for step in range(steps):
        for p in range(process_count):
            batch = per_process[p][step]
            mask, index = batch["mask"], batch["index"]
            assert mask.dtype == np.bool_ and index.dtype == np.int64
            assert batch["image"].shape == (batch_size // process_count, 8, 8, 1)
            np.testing.assert_array_equal(_recover_index(batch["image"])[mask], index[mask])
            np.testing.assert_array_equal(batch["label"][mask], labels[index[mask]])
            assert np.all(index[~mask] == -1) and np.all(batch["image"][~mask] == 0)
            seen.extend(index[mask].tolist())
    assert seen == list(range(n))  # in order, each once


def test_float_images_pass_through_unscaled():
    rng = np.random.default_rng(5)
    images = rng.uniform(0, 1, size=(3, 16, 16)).astype(np.float32)
    batch = _take(eval_dataset(images, np.zeros(3), batch_size=4), 1)[0]
    np.testing.assert_array_equal(batch["image"][:3, :, :, 0], images)
    assert to_float(tf.constant(np.array([65535], np.uint16))).numpy()[0] == 1.0


def test_bad_arguments_are_data_errors():
    images = np.zeros((4, 8, 8), np.uint16)
    with pytest.raises(DataError, match="multiple"):
        train_dataset(images, np.zeros(4), batch_size=3, seed=0, process_count=2)
    with pytest.raises(DataError, match="dtype"):
        eval_dataset(images.astype(np.int32), np.zeros(4), batch_size=2)
    with pytest.raises(DataError, match="one label per image"):
        eval_dataset(images, np.zeros(3), batch_size=2)
    with pytest.raises(DataError, match="process_index"):
        eval_dataset(images, np.zeros(4), batch_size=2, process_index=2, process_count=2)
    with pytest.raises(DataError, match="at least one"):
        train_dataset(images, np.zeros(4), batch_size=8, seed=0, process_index=0, process_count=8)


def _spot(h, w, spot_x, spot_y):
    y, x = np.mgrid[0:h, 0:w]
    image = np.exp(-((x - spot_x) ** 2 + (y - spot_y) ** 2) / (2 * 1.5**2)).astype(np.float32)
    return image, x, y


def _centroid(out, x, y):
    return np.array([(out * x).sum(), (out * y).sum()]) / out.sum()


def test_random_shift_and_rotation_stay_within_the_papers_limits():
    h, w = 60, 80
    image, x, y = _spot(h, w, 39.5, 29.5)  # the centre
    only_shift = AugmentConfig(flip=False, max_shift=0.1, max_rotation=0.0, box_size=0)
    shifts = []
    for s in range(12):
        out = augment(tf.constant(image[:, :, None]), tf.constant([s, 0]), only_shift).numpy()
        shifts.append(_centroid(out[:, :, 0], x, y) - [39.5, 29.5])
    shifts = np.abs(np.array(shifts))
    assert shifts[:, 0].max() <= 0.1 * w + 0.05 and shifts[:, 1].max() <= 0.1 * h + 0.05
    assert shifts[:, 0].max() > 0.05 * w and shifts[:, 1].max() > 0.05 * h

    image, x, y = _spot(h, w, 59.5, 29.5)  # 20 pixels right of the centre
    only_rotation = AugmentConfig(flip=False, max_shift=0.0, max_rotation=45.0, box_size=0)
    angles = []
    for s in range(12):
        out = augment(tf.constant(image[:, :, None]), tf.constant([s, 1]), only_rotation).numpy()
        dx, dy = _centroid(out[:, :, 0], x, y) - [39.5, 29.5]
        assert math.hypot(dx, dy) == pytest.approx(20.0, abs=0.1)
        angles.append(math.degrees(math.atan2(dy, dx)))
    assert max(abs(a) for a in angles) <= 45.1 and max(abs(a) for a in angles) > 20


# The paper (Sec. 3): "horizontal flip, shift of up to 0.1 of the width and height, rotation up
# to 45 degrees, and a 50x50 box set to 0" at 227x227.
PAPER = AugmentConfig(flip=True, max_shift=0.1, max_rotation=45.0, box_size=50, reference_size=227)


def _zero_square(image):
    """(top, left, height, width) of the zero pixels if they form one filled axis-aligned
    rectangle, else None."""
    zero = np.asarray(image)[..., 0] == 0
    if not zero.any():
        return None
    rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    if zero.sum() != h * w:
        return None
    return int(rows[0]), int(cols[0]), int(h), int(w)


def test_defaults_are_the_papers_augmentation():
    import inspect

    assert AugmentConfig() == PAPER
    assert AugmentConfig().box_shape(227, 227) == (50, 50)
    assert inspect.signature(augment).parameters["config"].default == PAPER
    assert inspect.signature(train_dataset).parameters["config"].default == PAPER


def test_default_stream_holds_one_50x50_zero_box_per_image():
    """With the paper's box and flip (rotation and shift, whose fill also leaves zeros, off), every
    training image of a constant non-zero value holds exactly one 50x50 zero square."""
    import dataclasses

    n = 6
    images = np.full((n, 227, 227), 0.6, np.float32)
    config = dataclasses.replace(AugmentConfig(), max_shift=0.0, max_rotation=0.0)
    batches = _take(train_dataset(images, np.zeros(n), batch_size=3, seed=1, config=config), 4)
    corners = set()
    for batch in batches:
        for image in batch["image"]:
            square = _zero_square(image)
            assert square is not None and square[2:] == (50, 50), square
            assert np.all((image == 0) | (image == np.float32(0.6)))
            corners.add(square[:2])
    assert len(corners) > 1


def test_each_image_is_augmented_differently_in_each_epoch():
    """The augmentation seed follows the position in the stream, not the example: the same image
    gets a new box (and flip, rotation, shift) every epoch."""
    n = 10
    values = (np.arange(n, dtype=np.float32) + 1) / (n + 1)
    images = np.broadcast_to(values[:, None, None], (n, 64, 64)).copy()
    box_only = AugmentConfig(flip=False, max_shift=0.0, max_rotation=0.0, box_size=50)
    batches = _take(train_dataset(images, np.zeros(n), batch_size=5, seed=3, config=box_only), 4)
    stream = np.concatenate([b["image"] for b in batches])  # 2 epochs of 10
    corners = {}
    for image in stream:
        example = int(np.argmin(np.abs(values - image.max())))
        square = _zero_square(image)
        assert square is not None and square[2:] == (14, 14)
        corners.setdefault(example, []).append(square[:2])
    assert sorted(corners) == list(range(n))
    for example, seen in corners.items():
        assert len(seen) == 2 and seen[0] != seen[1], (example, seen)
    # The full augmentation too: image 0 of epoch 1 differs from the same image in epoch 2.
    random_images = np.random.default_rng(6).uniform(0, 1, (n, 32, 32)).astype(np.float32)
    plain = _take(
        train_dataset(random_images, np.arange(n), batch_size=5, seed=3, augment=False), 4
    )
    full = _take(train_dataset(random_images, np.arange(n), batch_size=5, seed=3), 4)
    order = np.concatenate([b["label"] for b in plain])
    augmented = np.concatenate([b["image"] for b in full])
    for example in range(n):
        first, second = np.flatnonzero(order == example)
        assert not np.allclose(augmented[first], augmented[second]), example


def test_box_shape_by_hand():
    # round(50 * h / 227) and round(50 * w / 227), at least 1 pixel and at most the image
    assert AugmentConfig().box_shape(100, 300) == (22, 66)  # 22.03, 66.08
    assert AugmentConfig().box_shape(4, 3) == (1, 1)  # 0.88 and 0.66 round to 1
    assert AugmentConfig().box_shape(2, 500) == (1, 110)  # 0.44 -> at least 1
    assert AugmentConfig(box_size=300).box_shape(227, 100) == (227, 100)  # 300, 132 clipped
    assert AugmentConfig(box_size=1).box_shape(227, 227) == (1, 1)  # the smallest box
    assert AugmentConfig(box_size=0).box_shape(227, 227) == (0, 0)
    assert AugmentConfig(box_size=-5).box_shape(227, 227) == (0, 0)


def test_float64_images_are_augmented_as_float32():
    image = np.random.default_rng(8).uniform(0, 1, size=(32, 32, 1))
    seed = tf.constant([4, 5], tf.int64)
    out = augment(image, seed).numpy()
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, augment(image.astype(np.float32), seed).numpy())


def _blobs(out, threshold=0.05):
    """Centroids (x, y) and peak values of the connected bright regions of an (h, w) image."""
    from scipy import ndimage

    labels, count = ndimage.label(out > threshold)
    y, x = np.mgrid[0 : out.shape[0], 0 : out.shape[1]]
    found = []
    for i in range(1, count + 1):
        weight = np.where(labels == i, out, 0.0)
        centroid = np.array([(weight * x).sum(), (weight * y).sum()]) / weight.sum()
        found.append((centroid, weight.max()))
    return found


def test_flip_and_rotation_are_drawn_independently_and_both_ways():
    """A spot 20 pixels right of the centre lands left of it when flipped, and at the rotation's
    angle: every combination of flip and rotation direction occurs."""
    h = w = 64
    image, _, _ = _spot(h, w, 51.5, 31.5)
    config = AugmentConfig(flip=True, max_shift=0.0, max_rotation=45.0, box_size=0)
    seen, angles = set(), []
    for s in range(24):
        out = augment(tf.constant(image[:, :, None]), tf.constant([s, 2]), config).numpy()
        ((centroid, _),) = _blobs(out[:, :, 0])
        dx, dy = centroid - [31.5, 31.5]
        flipped = dx < 0
        angle = math.degrees(math.atan2(-dy, -dx) if flipped else math.atan2(dy, dx))
        assert abs(angle) <= 45.1
        seen.add((bool(flipped), angle > 0))
        angles.append(angle)
    assert seen == {(False, False), (False, True), (True, False), (True, True)}
    assert np.ptp(angles) > 45  # spread over the range, not one angle


def test_shift_is_drawn_per_axis_both_ways_and_independently_of_the_rotation():
    """Two spots, a bright one at the centre and a dim one 20 pixels right of it: the bright one
    moves by the shift, the line between them turns by the rotation."""
    h, w = 64, 80
    centre = np.array([39.5, 31.5])
    bright, _, _ = _spot(h, w, *centre)
    dim, _, _ = _spot(h, w, centre[0] + 20, centre[1])
    image = (bright + 0.5 * dim)[:, :, None]
    config = AugmentConfig(flip=False, max_shift=0.1, max_rotation=45.0, box_size=0)
    shifts, signs = [], set()
    for s in range(24):
        out = augment(tf.constant(image), tf.constant([s, 6]), config).numpy()[:, :, 0]
        (a, peak_a), (b, peak_b) = _blobs(out)
        if peak_a < peak_b:
            a, b = b, a
        shift = a - centre
        angle = math.atan2(b[1] - a[1], b[0] - a[0])
        assert abs(shift[0]) <= 0.1 * w + 0.05 and abs(shift[1]) <= 0.1 * h + 0.05
        shifts.append(shift / [w, h])
        signs.add((angle > 0, bool(shift[1] > 0)))
    shifts = np.array(shifts)
    for axis in (0, 1):  # both ways on each axis, over most of the range
        assert shifts[:, axis].min() < -0.05 and shifts[:, axis].max() > 0.05
    assert np.abs(shifts[:, 0] - shifts[:, 1]).max() > 0.05  # x and y drawn apart
    assert signs == {(False, False), (False, True), (True, False), (True, True)}


def test_zero_box_is_placed_independently_of_the_shift():
    """With shift and box only, a constant image shows the shift as zero rows at the top (moved
    down) or bottom (moved up), and the box as the other zeros: all four combinations of shift
    direction and box half occur."""
    h = w = 64
    image = np.full((h, w, 1), 0.5, np.float32)
    config = AugmentConfig(flip=False, max_shift=0.1, max_rotation=0.0, box_size=50)
    seen = set()
    for s in range(40):
        out = augment(tf.constant(image), tf.constant([s, 9]), config).numpy()[:, :, 0]
        zero = out == 0
        full_rows, full_cols = zero.all(axis=1), zero.all(axis=0)
        if full_rows[0] == full_rows[-1]:
            continue  # a shift of under a pixel: no full zero row
        box = zero & ~full_rows[:, None] & ~full_cols[None, :]
        if not box.any():
            continue  # the box fell in the fill
        seen.add((bool(full_rows[0]), np.flatnonzero(box.any(axis=1)).mean() > h / 2))
    assert seen == {(False, False), (False, True), (True, False), (True, True)}


def test_zero_box_takes_every_position_that_fits():
    h, w = 8, 10
    bh, bw = ONLY_BOX.box_shape(h, w)
    assert (bh, bw) == (2, 2)  # round(50 * 8 / 227), round(50 * 10 / 227)
    image = tf.ones((h, w, 1), tf.float32)
    rows, cols = [], []
    for s in range(200):
        zero = augment(image, tf.constant([s, 11]), ONLY_BOX).numpy()[:, :, 0] == 0
        top, left = np.argwhere(zero).min(axis=0)
        assert zero.sum() == bh * bw and zero[top : top + bh, left : left + bw].all()
        rows.append(top)
        cols.append(left)
    # every corner from the first row (column) to the last where the box fits, each about as often
    np.testing.assert_array_equal(np.unique(rows), np.arange(h - bh + 1))
    np.testing.assert_array_equal(np.unique(cols), np.arange(w - bw + 1))
    assert np.bincount(rows).min() > 200 / (h - bh + 1) / 2
    assert np.bincount(cols).min() > 200 / (w - bw + 1) / 2


@pytest.mark.parametrize("shape", [(None, 64, 1), (64, None, 1)])
def test_zero_box_needs_a_static_height_and_width(shape):
    traced = tf.function(
        lambda x: augment(x, tf.constant([1, 2]), ONLY_BOX),
        input_signature=[tf.TensorSpec(shape, tf.float32)],
    )
    with pytest.raises(ValueError, match="static image height and width"):
        traced.get_concrete_function()


def test_transform_matrix_defaults_to_the_identity():
    # x_in = 1 x + 0 y + 0, y_in = 0 x + 1 y + 0: no flip, rotation or shift
    np.testing.assert_allclose(
        transform_matrix(48, 64).numpy(), [1, 0, 0, 0, 1, 0, 0, 0], atol=1e-6
    )
    flip_only = transform_matrix(48, 64, flip=True).numpy()  # x_in = 63 - x
    np.testing.assert_allclose(flip_only, [-1, 0, 63, 0, 1, 0, 0, 0], atol=1e-5)


def test_seeds_are_taken_modulo_two_to_the_63():
    images = _indexed_images(12)
    labels = np.zeros(12)

    def first_epoch(seed):
        ds = train_dataset(images, labels, batch_size=12, seed=seed, augment=False)
        return _recover_index(_take(ds, 1)[0]["image"])

    np.testing.assert_array_equal(first_epoch(2**63 + 5), first_epoch(5))
    np.testing.assert_array_equal(first_epoch(2**64 + 5), first_epoch(2**63 + 5))
    assert not np.array_equal(first_epoch(5), first_epoch(5 + 126))


def test_the_processes_streams_interleave_to_the_one_process_stream():
    """Process p's j-th example of an epoch is the one-process stream's (j * P + p)-th, augmented
    the same way (its seed follows the global position)."""
    n, batch, steps = 12, 4, 6  # 2 epochs
    rng = np.random.default_rng(10)
    images = rng.uniform(0, 1, size=(n, 24, 24)).astype(np.float32)
    labels = np.arange(n) % 2
    one = _take(train_dataset(images, labels, batch_size=batch, seed=4), steps)
    two = [
        _take(
            train_dataset(
                images, labels, batch_size=batch, seed=4, process_index=p, process_count=2
            ),
            steps,
        )
        for p in range(2)
    ]
    for step in range(steps):
        for key in ("image", "label"):
            woven = np.stack([two[0][step][key], two[1][step][key]], axis=1)
            np.testing.assert_array_equal(woven.reshape(one[step][key].shape), one[step][key])


def test_streams_are_in_order_with_static_batch_shapes():
    images = _indexed_images(10)
    train = train_dataset(images, np.zeros(10), batch_size=4, seed=0)
    evaluation = eval_dataset(images, np.zeros(10), batch_size=4)
    for ds in (train, evaluation):
        assert ds.options().deterministic is True  # parallel map, results in order
        assert ds.element_spec["image"].shape == (4, 8, 8, 1)  # a fixed batch size for jit
        assert ds.element_spec["label"].shape == (4,)


def test_augment_clips_to_zero_one():
    image = np.random.default_rng(12).uniform(0, 1, size=(32, 32, 1)).astype(np.float32)
    config = AugmentConfig(box_size=0)
    high = augment(tf.constant(2.0 * image), tf.constant([1, 1]), config).numpy()
    low = augment(tf.constant(image - 0.5), tf.constant([1, 1]), config).numpy()
    assert high.max() == 1.0 and low.min() == 0.0


def test_one_image_batches_and_an_empty_set():
    images = _indexed_images(3)
    batch = _take(train_dataset(images, np.zeros(3), batch_size=1, seed=0, augment=False), 1)[0]
    assert batch["image"].shape == (1, 8, 8, 1)
    assert len(_take(eval_dataset(images, np.zeros(3), batch_size=1), 10)) == 3
    with pytest.raises(DataError, match="No images"):
        eval_dataset(np.zeros((0, 8, 8), np.float32), np.zeros(0), batch_size=2)
