"""Lesion masks in the preprocessed frame (data_pipeline.lesions) against independent references:
a hand-computed square and an outline rasterised in the original image, then cropped, flipped and
block-averaged by hand."""

import numpy as np
import pytest
import skimage.draw

from data_pipeline.lesions import mass_mask
from data_pipeline.preprocess import Geometry


def test_a_square_lands_where_crop_flip_and_resize_put_it():
    # Original 1000 x 800; crop rows 100..900, columns 0..400; flipped; resized to 200 x 100
    # (a factor 4 on both axes). A square with edges at rows 200..400 and columns 20..60 (its
    # corner points are pixel centres 199.5 .. 399.5) lands at rows (200-100)/4 .. (400-100)/4 =
    # 25..75 and columns 20/4 .. 60/4 = 5..15, flipped to 100-15 .. 100-5 = 85..95.
    geometry = Geometry(
        original_shape=(1000, 800), crop=(100, 0, 900, 400), flipped=True, size=(200, 100)
    )
    square = np.array([[199.5, 19.5], [199.5, 59.5], [399.5, 59.5], [399.5, 19.5]])
    expected = np.zeros((200, 100), np.uint8)
    expected[25:75, 85:95] = 255
    np.testing.assert_array_equal(mass_mask(geometry, [square]), expected)


def test_an_outline_matches_its_rasterisation_in_the_original_frame():
    # Reference: fill the polygon on the full-resolution original grid, crop, flip, and average
    # each 4 x 4 block (the resize's factor): the fraction of each preprocessed pixel inside it.
    rng = np.random.default_rng(0)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 40))
    radii = rng.uniform(60, 110, 40)
    outline = np.stack([500 + radii * np.sin(angles), 250 + radii * np.cos(angles)], axis=1)
    original = np.zeros((1000, 800), bool)
    rows, cols = skimage.draw.polygon(outline[:, 0], outline[:, 1], original.shape)
    original[rows, cols] = True
    for flipped in (False, True):
        geometry = Geometry(
            original_shape=(1000, 800), crop=(200, 40, 840, 520), flipped=flipped, size=(160, 120)
        )
        crop = original[200:840, 40:520]
        if flipped:
            crop = crop[:, ::-1]
        reference = crop.reshape(160, 4, 120, 4).mean(axis=(1, 3))
        got = mass_mask(geometry, [outline]) / 255.0
        # equal up to the supersampling of edge pixels (4 x 4 samples vs 4 x 4 original pixels:
        # the same sample positions, so only the uint8 rounding differs)
        assert np.abs(got - reference).max() <= 0.5 / 255 + 1e-9
        assert got.sum() == pytest.approx(reference.sum(), abs=0.01 * reference.sum())


def test_the_union_of_outlines_counts_overlap_once_and_a_point_marks_its_pixel():
    geometry = Geometry(
        original_shape=(100, 100), crop=(0, 0, 100, 100), flipped=False, size=(100, 100)
    )
    a = np.array([[9.5, 9.5], [9.5, 29.5], [29.5, 29.5], [29.5, 9.5]])  # rows/cols 10..30
    b = a + 10  # rows/cols 20..40, overlapping a in 20..30
    mask = mass_mask(geometry, [a, b])
    assert np.count_nonzero(mask == 255) == 400 + 400 - 100
    point = mass_mask(geometry, [np.array([[70.2, 50.4]])])
    assert np.argwhere(point).tolist() == [[70, 50]]
    assert not mass_mask(geometry, []).any()
