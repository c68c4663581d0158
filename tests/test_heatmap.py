"""Tests of deepmil_jax.heatmap: patch geometry by hand, brute-force references for the maps."""

import math

import numpy as np
import pytest

from data_pipeline.preprocess import Geometry
from deepmil_jax import heatmap as hm

# no score may come with a warning (an empty mean, a one-class AUC): such cases give NaN quietly
pytestmark = pytest.mark.filterwarnings("error")


def test_sigmoid_is_the_logistic_function_and_stable():
    x = np.array([-5.0, -1.0, 0.0, 0.5, 3.0])
    np.testing.assert_allclose(hm.sigmoid(x), 1.0 / (1.0 + np.exp(-x)), rtol=1e-12)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        big = hm.sigmoid(np.array([-1000.0, 1000.0]))
    np.testing.assert_array_equal(big, [0.0, 1.0])
    assert hm.sigmoid(np.float32(2.0)).dtype == np.float64


def test_top_cell_is_the_first_maximum_in_row_major_order():
    z = np.zeros((3, 4))
    z[1, 2] = 5.0
    assert hm.top_cell(z) == (1, 2)
    z[2, 0] = 5.0  # a tie later in row-major order does not win
    assert hm.top_cell(z) == (1, 2)
    z[0, 3] = 5.0  # ... an earlier one does
    assert hm.top_cell(z) == (0, 3)
    assert hm.top_cell(np.arange(12.0).reshape(2, 6)) == (1, 5)
    with pytest.raises(ValueError, match="h', w'"):
        hm.top_cell(np.zeros(4))


def test_cell_box_by_hand():
    np.testing.assert_allclose(
        hm.cell_box(1, 2, (6, 6), (227, 227)), [227 / 6, 2 * 227 / 6, 2 * 227 / 6, 3 * 227 / 6]
    )
    # a non-square grid on a non-square image: rows from H and h', columns from W and w'
    np.testing.assert_array_equal(hm.cell_box(2, 1, (3, 4), (90, 200)), [60, 50, 90, 100])
    np.testing.assert_array_equal(hm.cell_box(0, 3, (3, 4), (90, 200)), [0, 150, 30, 200])
    for row, col in [(3, 0), (0, 4), (-1, 0), (0, -1)]:
        with pytest.raises(ValueError, match="outside"):
            hm.cell_box(row, col, (3, 4), (90, 200))


def _geometry(flipped):
    # crop 300 x 300 at (100, 50), preprocessed to 100 x 100: 3 original pixels per pixel
    return Geometry(
        original_shape=(500, 400), crop=(100, 50, 400, 350), flipped=flipped, size=(100, 100)
    )


def test_box_to_original_by_hand():
    unflipped, flipped = _geometry(False), _geometry(True)
    np.testing.assert_allclose(hm.box_to_original([0, 0, 100, 100], unflipped), [100, 50, 400, 350])
    np.testing.assert_allclose(
        hm.box_to_original([10, 20, 30, 40], unflipped), [130, 110, 190, 170]
    )
    # flipped: preprocessed x in [20, 40) is unflipped x in [60, 80), original 50 + 3 * [60, 80)
    np.testing.assert_allclose(hm.box_to_original([10, 20, 30, 40], flipped), [130, 230, 190, 290])
    stacked = hm.box_to_original(np.array([[0, 0, 10, 20], [10, 20, 30, 40]]), flipped)
    np.testing.assert_allclose(stacked, [[100, 290, 130, 350], [130, 230, 190, 290]])


def _slice_by_brute_force(box, shape):
    y0, x0, y1, x1 = box
    rows = [i for i in range(shape[0]) if y0 <= i + 0.5 < y1]
    cols = [j for j in range(shape[1]) if x0 <= j + 0.5 < x1]
    r = (rows[0], rows[-1] + 1) if rows else None
    c = (cols[0], cols[-1] + 1) if cols else None
    return r, c


def test_box_to_pixel_slice_by_hand_and_by_brute_force():
    assert hm.box_to_pixel_slice((0.5, 0.4, 2.5, 3.6), (10, 10)) == (0, 0, 2, 4)
    assert hm.box_to_pixel_slice((1.0, 1.5, 3.0, 3.5), (10, 10)) == (1, 1, 3, 3)
    assert hm.box_to_pixel_slice((-5.0, -2.0, 20.0, 30.0), (10, 12)) == (0, 0, 10, 12)
    assert hm.box_to_pixel_slice((12.0, 13.0, 20.0, 30.0), (10, 12)) == (10, 12, 10, 12)
    rng = np.random.default_rng(0)
    for _ in range(300):
        y0, x0 = rng.uniform(-3, 14, size=2).round(2)
        y1, x1 = y0 + rng.uniform(0, 9), x0 + rng.uniform(0, 9)
        box = (y0, x0, y1, x1)
        ry0, rx0, ry1, rx1 = hm.box_to_pixel_slice(box, (11, 13))
        r, c = _slice_by_brute_force(box, (11, 13))
        if r is not None:
            assert (ry0, ry1) == r
        else:
            assert ry0 == ry1
        if c is not None:
            assert (rx0, rx1) == c
        else:
            assert rx0 == rx1


def _map_by_brute_force(values, geometry, stride):
    """Each block's centre -> preprocessed coordinates -> the grid cell whose patch holds it."""
    gh, gw = values.shape
    H, W = geometry.original_shape
    hp, wp = geometry.size
    i, j = np.meshgrid(np.arange(-(-H // stride)), np.arange(-(-W // stride)), indexing="ij")
    centres = np.stack([(i + 0.5) * stride - 0.5, (j + 0.5) * stride - 0.5], axis=-1)
    edge = geometry.from_original(centres) + 0.5  # edge coordinates, one point per block
    py, px = edge[..., 0], edge[..., 1]
    inside = (py >= 0) & (py < hp) & (px >= 0) & (px < wp)
    rows = np.clip(np.floor(py * gh / hp).astype(int), 0, gh - 1)
    cols = np.clip(np.floor(px * gw / wp).astype(int), 0, gw - 1)
    return np.where(inside, values[rows, cols], np.nan)


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("stride", [1, 3])
def test_instance_map_to_original_matches_brute_force(flipped, stride):
    # 303 x 411 crop, 5 x 7 grid: no patch edge falls on a pixel centre, so no tie to break
    geometry = Geometry(
        original_shape=(360, 470), crop=(20, 31, 323, 442), flipped=flipped, size=(227, 227)
    )
    values = np.arange(35.0).reshape(5, 7)
    out = hm.instance_map_to_original(values, geometry, stride=stride)
    assert out.shape == (-(-360 // stride), -(-470 // stride))
    np.testing.assert_array_equal(out, _map_by_brute_force(values, geometry, stride))
    if stride == 1:  # a hand check: the crop's corners and the NaN border
        left, right = (6.0, 0.0) if flipped else (0.0, 6.0)
        assert out[20, 31] == left and out[322, 441] == 28.0 + right
        assert np.isnan(out[19, 100]) and np.isnan(out[100, 30]) and np.isnan(out[323, 100])
        assert np.isnan(out[100, 442]) and not np.isnan(out[100, 441])
    with pytest.raises(ValueError, match="h', w'"):
        hm.instance_map_to_original(np.zeros(3), geometry)


@pytest.mark.parametrize("flipped", [False, True])
def test_instance_map_of_a_single_instance_covers_the_crop(flipped):
    # the `alexnet` scheme's map is one instance: its value on the whole crop, NaN outside
    geometry = Geometry(original_shape=(50, 40), crop=(5, 3, 45, 30), flipped=flipped, size=(9, 9))
    out = hm.instance_map_to_original(np.array([[0.25]], np.float32), geometry)
    assert out.dtype == np.float64
    inside = np.zeros((50, 40), bool)
    inside[5:45, 3:30] = True
    np.testing.assert_array_equal(out, np.where(inside, 0.25, np.nan))


def test_downsample_is_a_block_mean_with_edge_padding():
    rng = np.random.default_rng(1)
    image = rng.uniform(size=(7, 10)).astype(np.float32)
    same, stride = hm.downsample(image, max_side=10)
    assert stride == 1 and same is not None
    np.testing.assert_array_equal(same, image)
    small, stride = hm.downsample(image, max_side=4)  # ceil(10 / 4) = 3
    assert stride == 3 and small.shape == (3, 4) and small.dtype == np.float32
    padded = np.pad(image, ((0, 2), (0, 2)), mode="edge")
    for i in range(3):
        for j in range(4):
            block = padded[3 * i : 3 * i + 3, 3 * j : 3 * j + 3]
            assert small[i, j] == pytest.approx(block.mean(), rel=1e-6)
    assert hm.downsample(image, max_side=5)[1] == 2
    tall, stride = hm.downsample(np.ones((9, 2)), max_side=3)
    assert stride == 3 and tall.shape == (3, 1)


def test_patch_hits_boxes_at_the_edges():
    grid, image = (2, 2), (10, 10)  # cell (0, 0) is edges [0, 5) x [0, 5)
    # a mass box (centre convention) covers edges [y0 + 0.5, y1 + 0.5]
    assert hm.patch_hits_boxes(0, 0, grid, image, [[1, 1, 2, 2]])
    assert not hm.patch_hits_boxes(0, 0, grid, image, [[4.5, 1, 6, 2]])  # starts at edge 5
    assert hm.patch_hits_boxes(0, 0, grid, image, [[4.4, 1, 6, 2]])
    assert not hm.patch_hits_boxes(0, 0, grid, image, [[1, 4.5, 2, 6]])
    assert hm.patch_hits_boxes(0, 0, grid, image, [[1, 4.4, 2, 6]])
    assert hm.patch_hits_boxes(1, 1, grid, image, [[0, 0, 4.5, 4.5]])  # ends at edge 5: closed
    assert not hm.patch_hits_boxes(1, 1, grid, image, [[0, 0, 4.4, 9]])
    assert not hm.patch_hits_boxes(1, 1, grid, image, [[0, 0, 9, 4.4]])
    assert not hm.patch_hits_boxes(0, 1, grid, image, [[1, 1, 2, 2]])  # right rows, wrong columns
    assert not hm.patch_hits_boxes(1, 0, grid, image, [[1, 1, 2, 2]])  # right columns, wrong rows
    assert hm.patch_hits_boxes(0, 1, grid, image, [[1, 1, 2, 2], [1, 7, 2, 8]])  # any box
    assert not hm.patch_hits_boxes(0, 0, grid, image, np.zeros((0, 4)))
    assert hm.patch_hits_boxes(0, 0, grid, image, np.array([1, 1, 2, 2]))  # one box, flat


def test_pointing_game_by_hand():
    grid, image = (2, 2), (10, 10)
    box = np.array([[1.0, 1.0, 2.0, 2.0]])  # in cell (0, 0)
    # skipped images (negative, no box, empty box list) come first: they must not end the count
    top = {"negative": (0, 0), "no_box": (0, 0), "empty": (0, 0), "hit": (0, 0), "miss": (1, 1)}
    boxes = {"hit": box, "miss": box, "negative": box, "empty": np.zeros((0, 4))}
    labels = {"hit": 1, "miss": 1, "negative": 0, "no_box": 1, "empty": 1}
    result = hm.pointing_game(top, boxes, labels, grid_shape=grid, image_shape=image)
    assert result == {"hits": 1, "evaluated": 2, "score": 0.5}
    two_hits = hm.pointing_game(
        {"a": (0, 0), "b": (0, 0), "c": (1, 0)},
        {"a": box, "b": box, "c": box},
        {"a": 1, "b": 1, "c": 1},
        grid_shape=grid,
        image_shape=image,
    )
    assert two_hits == {"hits": 2, "evaluated": 3, "score": pytest.approx(2 / 3)}
    none = hm.pointing_game({"negative": (0, 0)}, boxes, labels, grid_shape=grid, image_shape=image)
    assert none["hits"] == 0 and none["evaluated"] == 0 and math.isnan(none["score"])


def test_render_heatmap_writes_a_png(tmp_path):
    geometry = _geometry(True)
    image = np.random.default_rng(2).uniform(size=(500, 400)).astype(np.float32)
    path = tmp_path / "heat.png"
    hm.render_heatmap(
        path,
        image,
        np.full((6, 6), 0.3),
        geometry,
        outlines=[np.array([[150.0, 100.0], [200.0, 100.0], [200.0, 160.0]])],
        top_box=np.array([100.0, 50.0, 150.0, 100.0]),
        title="t",
        max_side=200,
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="geometry says"):
        hm.render_heatmap(path, image[:10], np.zeros((6, 6)), geometry)


def test_box_to_pixel_slice_takes_an_image_shape_with_channels():
    box = (0.5, 0.4, 2.5, 30.0)
    assert hm.box_to_pixel_slice(box, (10, 12, 3)) == hm.box_to_pixel_slice(box, (10, 12))
    assert hm.box_to_pixel_slice(box, (10, 12, 3)) == (0, 0, 2, 12)


def test_downsample_default_and_dtype():
    wide = np.ones((1, 2049), np.float64)
    small, stride = hm.downsample(wide)  # default max_side 1024: ceil(2049 / 1024) = 3
    assert stride == 3 and small.shape == (1, 683) and small.dtype == np.float32
    same, stride = hm.downsample(np.ones((4, 4), np.float64))
    assert stride == 1 and same.dtype == np.float32


def _png_size(path):
    data = path.read_bytes()
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_render_heatmap_default_max_side_is_1024(tmp_path):
    geometry = Geometry(
        original_shape=(2049, 60), crop=(0, 0, 2049, 60), flipped=False, size=(6, 6)
    )
    image = np.zeros((2049, 60), np.float32)
    probs = np.full((2, 2), 0.5)
    hm.render_heatmap(tmp_path / "a.png", image, probs, geometry)
    hm.render_heatmap(tmp_path / "b.png", image, probs, geometry, max_side=1024)
    hm.render_heatmap(tmp_path / "c.png", image, probs, geometry, max_side=1025)
    assert _png_size(tmp_path / "a.png") == _png_size(tmp_path / "b.png")
    assert _png_size(tmp_path / "a.png") != _png_size(tmp_path / "c.png")


def test_box_to_original_of_stacked_boxes_is_box_by_box():
    geometry = Geometry(
        original_shape=(500, 400), crop=(100, 50, 400, 350), flipped=True, size=(60, 100)
    )
    boxes = np.array([[0, 0, 10, 20], [10, 20, 30, 40], [5, 70, 55, 95]], np.float64)
    stacked = hm.box_to_original(boxes, geometry)
    assert stacked.shape == (3, 4)
    for box, got in zip(boxes, stacked, strict=True):
        np.testing.assert_allclose(got, hm.box_to_original(box, geometry))
    np.testing.assert_allclose(hm.box_to_original(boxes[None], geometry)[0], stacked)


def test_instance_map_pixel_centre_on_a_patch_edge_goes_to_the_upper_patch():
    """Half-open patches [a, b) in original coordinates: with stride 4 the block centred on the
    edge between the two patches (original coordinate 6) belongs to the patch starting there."""
    values = np.array([[0.0, 1.0], [2.0, 3.0]])
    plain = Geometry(original_shape=(12, 12), crop=(0, 0, 12, 12), flipped=False, size=(12, 12))
    out = hm.instance_map_to_original(values, plain, stride=4)
    np.testing.assert_array_equal(out, [[0, 1, 1], [2, 3, 3], [2, 3, 3]])
    # flipped: original x in [6, 12) is preprocessed x in [0, 6), the first column of patches
    flipped = Geometry(original_shape=(12, 12), crop=(0, 0, 12, 12), flipped=True, size=(12, 12))
    out = hm.instance_map_to_original(values, flipped, stride=4)
    np.testing.assert_array_equal(out, [[1, 0, 0], [3, 2, 2], [3, 2, 2]])


def test_instance_map_of_integer_values_and_default_stride():
    geometry = Geometry(original_shape=(12, 10), crop=(2, 2, 10, 8), flipped=False, size=(8, 6))
    values = np.array([[1, 2], [3, 4]])  # integers: the map is float so that NaN fits
    out = hm.instance_map_to_original(values, geometry)
    assert out.shape == (12, 10) and out.dtype == np.float64
    np.testing.assert_array_equal(out, hm.instance_map_to_original(values, geometry, stride=1))
    assert out[2, 2] == 1 and out[9, 7] == 4 and np.isnan(out[0, 0]) and np.isnan(out[11, 9])


def test_instance_map_with_a_stride_that_does_not_divide_the_image():
    geometry = Geometry(original_shape=(13, 10), crop=(0, 0, 13, 10), flipped=False, size=(6, 6))
    out = hm.instance_map_to_original(np.zeros((2, 2)), geometry, stride=4)
    assert out.shape == (4, 3)  # ceil(13 / 4), ceil(10 / 4): the last blocks are partial


# ---------------------------------------------------------------------------------------------
# Coverage, instance AUC and IoU against brute force and hand counts


def test_cell_coverage_is_the_area_fraction_of_each_cell_even_across_fractional_edges():
    # 10 x 8 mask on a 3 x 3 grid: cell edges at 10/3 and 8/3 pixels cut pixels. Reference:
    # repeat every pixel 3 times per axis (30 x 24, where every cell is exactly 10 x 8 sub-pixels)
    # and average each cell's block.
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 256, size=(10, 8)).astype(np.uint8)
    fine = np.repeat(np.repeat(mask / 255.0, 3, axis=0), 3, axis=1)
    reference = fine.reshape(3, 10, 3, 8).mean(axis=(1, 3))
    np.testing.assert_allclose(hm.cell_coverage(mask, (3, 3)), reference, atol=1e-12)
    full = np.full((227, 227), 255, np.uint8)
    np.testing.assert_allclose(hm.cell_coverage(full, (6, 6)), np.ones((6, 6)), atol=1e-12)


def test_cell_lesion_labels_split_at_one_percent_and_leave_slivers_out():
    coverage = np.array([[0.0, 0.004], [0.01, 0.6]])
    np.testing.assert_array_equal(hm.cell_lesion_labels(coverage), [[0, -1], [1, 1]])


def test_heatmap_iou_counts_pixels_by_hand():
    # 4 x 4 image, 2 x 2 grid: each cell is a 2 x 2 block. Hot cells (logit >= 0): (0, 0), (1, 1).
    logits = np.array([[0.0, -1.0], [-2.0, 3.0]])
    mask = np.zeros((4, 4), np.uint8)
    mask[0:2, 0:4] = 255  # lesion = the top two cells (8 pixels)
    mask[3, 3] = 127  # under half a pixel: not lesion
    mask[3, 0] = 128  # half or more: lesion (outside the hot cells)
    # hot = 8 pixels (cells (0,0), (1,1)); intersection = cell (0,0) = 4; union = 8 + 9 - 4 = 13
    assert hm.heatmap_iou(logits, mask) == pytest.approx(4 / 13)
    assert math.isnan(hm.heatmap_iou(-np.ones((2, 2)), np.zeros((4, 4), np.uint8)))
    for bad in [(np.zeros(4), mask), (logits, mask[None])]:  # either one of the wrong rank
        with pytest.raises(ValueError, match="need"):
            hm.heatmap_iou(*bad)


def test_localisation_scores_positive_images_with_lesions_by_hand():
    # 2 x 2 grid on 4 x 4 images; each image's lesion fills whole cells (coverage 0 or 1).
    def mask_of(cells):
        m = np.zeros((4, 4), np.uint8)
        for r, c in cells:
            m[2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = 255
        return m

    logits = np.array(
        [
            [[3.0, 1.0], [0.5, -1.0]],  # positive, lesion in (0, 0): top cell hits
            [[2.0, -0.5], [0.2, 1.5]],  # positive, lesion in (1, 1): top cell (0, 0) misses
            [[5.0, 5.0], [5.0, 5.0]],  # negative: not scored
            [[1.0, 0.0], [0.0, 0.0]],  # positive without outline: not scored
        ]
    )
    masks = np.stack([mask_of([(0, 0)]), mask_of([(1, 1)]), mask_of([(0, 0)]), mask_of([])])
    boxes = [
        np.array([[0.0, 0.0, 1.0, 1.0]]),
        np.array([[2.0, 2.0, 3.0, 3.0]]),
        np.array([[0.0, 0.0, 1.0, 1.0]]),
        np.zeros((0, 4)),
    ]
    out = hm.localisation(logits, masks, boxes, np.array([1, 1, 0, 1]))
    # Cells of images 0 and 1: lesion logits {3.0, 1.5}, others {1.0, 0.5, -1.0, 2.0, -0.5, 0.2}.
    # Pairs (lesion > other): 3.0 beats all 6, 1.5 beats 1.0, 0.5, -1.0, -0.5, 0.2 (5): 11 of 12.
    assert out["instance_auc"] == pytest.approx(11 / 12)
    assert (out["instance_cells"], out["lesion_cells"], out["localised_images"]) == (8, 2, 2)
    # IoU: image 0 hot cells (0,0), (0,1), (1,0) vs lesion (0,0): 4 / 12; image 1 hot (0,0),
    # (1,0), (1,1) vs (1,1): 4 / 12.
    assert out["iou"] == pytest.approx(4 / 12)
    assert (out["pointing_hits"], out["pointing_images"]) == (1, 2)
    assert out["pointing_game"] == pytest.approx(0.5)
    none = hm.localisation(logits[2:3], masks[2:3], boxes[2:3], np.array([0]))
    assert math.isnan(none["instance_auc"]) and none["localised_images"] == 0


def _localisation_by_brute_force(logits, masks, boxes, labels):
    """localisation's scores written out directly, for images whose cells are whole pixel blocks:
    a cell's coverage is the mean of its block, the heatmap repeats each cell over its block, the
    AUC counts lesion-over-other pairs (ties half) and the pointing game compares intervals."""
    _, gh, gw = logits.shape
    bh, bw = masks.shape[1] // gh, masks.shape[2] // gw
    lesion_logits, other_logits, ious = [], [], []
    hits = pointed = 0
    for z, m, b, y in zip(logits, masks, boxes, labels, strict=True):
        if y != 1:
            continue
        if len(b):
            r, c = divmod(int(np.argmax(z)), gw)
            pointed += 1
            hits += any(
                y0 + 0.5 < (r + 1) * bh
                and y1 + 0.5 >= r * bh
                and x0 + 0.5 < (c + 1) * bw
                and x1 + 0.5 >= c * bw
                for y0, x0, y1, x1 in b
            )
        cover = m.reshape(gh, bh, gw, bw).astype(float).mean(axis=(1, 3)) / 255
        if not (cover >= 0.01).any():
            continue
        lesion_logits += list(z[cover >= 0.01])
        other_logits += list(z[cover == 0])
        hot = np.repeat(np.repeat(z >= 0, bh, axis=0), bw, axis=1)
        lesion = m >= 128
        union = (hot | lesion).sum()
        ious.append((hot & lesion).sum() / union if union else math.nan)
    pairs = [(p > q) + 0.5 * (p == q) for p in lesion_logits for q in other_logits]
    return {
        "instance_auc": float(np.mean(pairs)) if pairs else math.nan,
        "instance_cells": len(lesion_logits) + len(other_logits),
        "lesion_cells": len(lesion_logits),
        "iou": float(np.nanmean(ious)) if ious else math.nan,
        "localised_images": len(ious),
        "pointing_game": hits / pointed if pointed else math.nan,
        "pointing_hits": hits,
        "pointing_images": pointed,
    }


@pytest.mark.parametrize("seed", range(4))
def test_localisation_matches_a_brute_force_count_on_random_images(seed):
    # 9 x 8 images on a 3 x 4 grid: cells of 3 x 2 pixels (rows and columns differ, so a swapped
    # axis shows). Lesions: a rectangle of 255, a faint region (under 128: lesion cells without a
    # lesion pixel) and single faint pixels (under 1% of a cell: cells left out).
    rng = np.random.default_rng(seed)
    n, (gh, gw), (H, W) = 14, (3, 4), (9, 8)
    logits = np.round(rng.normal(size=(n, gh, gw)), 1)  # rounded: ties in the ranking
    masks = np.zeros((n, H, W), np.uint8)
    boxes = []
    for m in masks:
        y0, x0 = rng.integers(0, H - 1), rng.integers(0, W - 1)
        m[y0 : y0 + rng.integers(1, 4), x0 : x0 + rng.integers(1, 4)] = 255
        if rng.random() < 0.5:
            m[rng.integers(0, H), :] = 90
        m[rng.integers(0, H, 3), rng.integers(0, W, 3)] = np.maximum(m[0, 0], 1)
        k = rng.integers(0, 3)
        corner = rng.uniform(0, [H, W, H, W], size=(k, 4))
        boxes.append(np.concatenate([corner[:, :2], corner[:, :2] + 1.5], axis=1))
    masks[0] = 0  # a positive image without a lesion: scored by neither
    masks[1] = 60  # lesion cells everywhere, no lesion pixel: its IoU is NaN with a cold map
    logits[1] = -1.0
    labels = np.resize([1, 1, 0, 1, 1], n)
    got = hm.localisation(logits.astype(np.float32), masks, boxes, labels)
    want = _localisation_by_brute_force(logits, masks, boxes, labels)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, nan_ok=True), key


def test_localisation_with_every_scored_cell_a_lesion_or_nothing_to_score():
    logits = np.array([[[1.0, -2.0], [0.5, 3.0]]])
    full = np.full((1, 4, 4), 255, np.uint8)
    box = [np.array([[0.0, 0.0, 3.0, 3.0]])]
    out = hm.localisation(logits, full, box, np.array([1]))
    # no negative cell: no AUC, but the IoU (hot 3 cells = 12 of 16 lesion pixels) and the pointing
    # game are scored
    assert math.isnan(out["instance_auc"])
    assert (out["instance_cells"], out["lesion_cells"], out["localised_images"]) == (4, 4, 1)
    assert out["iou"] == pytest.approx(12 / 16)
    assert (out["pointing_hits"], out["pointing_images"], out["pointing_game"]) == (1, 1, 1.0)
    none = hm.localisation(logits, full, box, np.array([0]))
    assert math.isnan(none["instance_auc"]) and math.isnan(none["iou"])
    assert math.isnan(none["pointing_game"])
    assert (none["instance_cells"], none["lesion_cells"], none["localised_images"]) == (0, 0, 0)
    assert (none["pointing_hits"], none["pointing_images"]) == (0, 0)


@pytest.mark.parametrize("short", ["masks", "boxes", "labels"])
def test_localisation_refuses_inputs_of_different_lengths(short):
    args = {
        "instance_logits": np.zeros((2, 2, 2)),
        "mass_masks": np.zeros((2, 4, 4), np.uint8),
        "mass_boxes": [np.zeros((0, 4))] * 2,
        "labels": np.ones(2, int),
    }
    key = {"masks": "mass_masks", "boxes": "mass_boxes", "labels": "labels"}[short]
    args[key] = args[key][:1]
    counts = {"masks": "2 maps, 1 masks, 2 box", "boxes": "2 maps, 2 masks, 1 box"}
    with pytest.raises(ValueError, match=counts.get(short, "2 box lists and 1 labels")):
        hm.localisation(**args)


def test_bag_probability_is_the_sigmoid_of_each_images_largest_instance():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(5, 3, 4)) * 3
    want = np.array([1.0 / (1.0 + math.exp(-max(image.ravel()))) for image in z])
    np.testing.assert_allclose(hm.bag_probability(z), want, rtol=1e-12)
    np.testing.assert_allclose(hm.bag_probability(z.reshape(5, 12)), want, rtol=1e-12)
    np.testing.assert_allclose(hm.bag_probability(z[:, :1, :1]), 1 / (1 + np.exp(-z[:, 0, 0])))


def test_cell_boxes_map_back_through_flip_crop_and_resize_by_hand():
    # Original 100 x 80; crop rows 10..90, cols 20..60 (80 x 40); flipped; resized to 40 x 20
    # (scale 1/2 on both axes); a 4 x 2 grid of 10 x 10 preprocessed patches.
    g = Geometry(original_shape=(100, 80), crop=(10, 20, 90, 60), flipped=True, size=(40, 20))
    # Cell (0, 0): preprocessed rows [0, 10), cols [0, 10) -> unflipped cols [10, 20) -> original
    # rows 10 + [0, 20), cols 20 + [20, 40).
    box = hm.box_to_original(hm.cell_box(0, 0, (4, 2), (40, 20)), g)
    np.testing.assert_allclose(box, [10, 40, 30, 60], atol=1e-9)
    # Cell (3, 1): rows [30, 40), cols [10, 20) -> unflipped [0, 10) -> original
    # [70, 90) x [20, 40).
    box = hm.box_to_original(hm.cell_box(3, 1, (4, 2), (40, 20)), g)
    np.testing.assert_allclose(box, [70, 20, 90, 40], atol=1e-9)
    assert hm.box_to_pixel_slice(box, (100, 80)) == (70, 20, 90, 40)
    # Not flipped: cell (0, 0) is on the left of the crop.
    g2 = Geometry(original_shape=(100, 80), crop=(10, 20, 90, 60), flipped=False, size=(40, 20))
    np.testing.assert_allclose(
        hm.box_to_original(hm.cell_box(0, 0, (4, 2), (40, 20)), g2), [10, 20, 30, 40]
    )


@pytest.mark.parametrize("flipped", [False, True])
def test_painted_map_agrees_with_the_boxes(flipped):
    # A map painted with each cell's index must show each cell exactly on its box, NaN elsewhere.
    g = Geometry(original_shape=(103, 77), crop=(7, 11, 98, 70), flipped=flipped, size=(24, 24))
    ids = np.arange(12, dtype=float).reshape(3, 4)
    painted = hm.instance_map_to_original(ids, g)
    assert painted.shape == (103, 77)
    covered = np.zeros((103, 77), bool)
    for r in range(3):
        for c in range(4):
            y0, x0, y1, x1 = hm.box_to_pixel_slice(
                hm.box_to_original(hm.cell_box(r, c, (3, 4), (24, 24)), g), (103, 77)
            )
            block = painted[y0:y1, x0:x1]
            assert block.size and np.all(block == ids[r, c]), (r, c)
            assert np.count_nonzero(painted == ids[r, c]) == block.size
            covered[y0:y1, x0:x1] = True
    # The crop (and only the crop) is covered.
    expected = np.zeros((103, 77), bool)
    expected[7:98, 11:70] = True
    np.testing.assert_array_equal(covered, expected)
    np.testing.assert_array_equal(np.isnan(painted), ~expected)
    # Column order: cell column 0 is at the chest wall, on the right of the original if flipped.
    left_id = painted[50, 12]
    assert left_id == (ids[1, 3] if flipped else ids[1, 0])
    # A strided (downsampled) map samples the same cells at the blocks' centres.
    small = hm.instance_map_to_original(ids, g, stride=4)
    assert small.shape == (26, 20)
    np.testing.assert_array_equal(small[10, 5], painted[10 * 4 + 1, 5 * 4 + 1])


def test_patch_hits_boxes_hand_computed():
    grid, size = (2, 2), (100, 100)  # patches [0, 50) and [50, 100) on each axis
    small = np.array([[10, 10, 20, 20]])  # edges [10.5, 20.5]: inside patch (0, 0) only
    assert hm.patch_hits_boxes(0, 0, grid, size, small)
    assert not hm.patch_hits_boxes(0, 1, grid, size, small)
    assert not hm.patch_hits_boxes(1, 1, grid, size, small)
    central = np.array([[40, 40, 60, 60]])  # straddles all four patches
    assert all(hm.patch_hits_boxes(r, c, grid, size, central) for r in range(2) for c in range(2))
    on_edge = np.array([[49.5, 10, 49.5, 10]])  # a point at edge y = 50: the second row's
    assert not hm.patch_hits_boxes(0, 0, grid, size, on_edge)
    assert hm.patch_hits_boxes(1, 0, grid, size, on_edge)
    just_before = np.array([[48.9, 10, 48.9, 10]])  # edge y = 49.4: first row
    assert hm.patch_hits_boxes(0, 0, grid, size, just_before)
    two = np.array([[80, 80, 90, 90], [5, 60, 8, 70]])  # the second box is in patch (0, 1)
    assert hm.patch_hits_boxes(0, 1, grid, size, two)
    assert not hm.patch_hits_boxes(1, 0, grid, size, two)
    assert not hm.patch_hits_boxes(0, 0, grid, size, np.zeros((0, 4)))
    # 6 x 6 on 227: patch (2, 3) covers [75.67, 113.5) x [113.5, 151.33).
    assert hm.patch_hits_boxes(2, 3, (6, 6), (227, 227), np.array([[100, 150, 105, 160]]))
    assert not hm.patch_hits_boxes(2, 3, (6, 6), (227, 227), np.array([[100, 151, 105, 160]]))


def test_pointing_game_counts_only_positives_with_masses():
    boxes = {
        "hit": np.array([[10, 10, 20, 20]]),
        "miss": np.array([[70, 70, 80, 80]]),
        "neg": np.array([[10, 10, 20, 20]]),
        "nobox": np.zeros((0, 4)),
    }
    top = {"hit": (0, 0), "miss": (0, 0), "neg": (1, 1), "nobox": (0, 0), "unknown": (0, 0)}
    labels = {"hit": 1, "miss": 1, "neg": 0, "nobox": 1, "unknown": 1}
    out = hm.pointing_game(top, boxes, labels, grid_shape=(2, 2), image_shape=(100, 100))
    assert out == {"hits": 1, "evaluated": 2, "score": 0.5}
    empty = hm.pointing_game({}, {}, {}, grid_shape=(2, 2), image_shape=(100, 100))
    assert empty["evaluated"] == 0 and math.isnan(empty["score"])
