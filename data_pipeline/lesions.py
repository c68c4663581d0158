"""Lesion masks in the preprocessed frame: the instance-level ground truth.

A mass outline (``Record.masses``: (P, 2) (y, x) points in ORIGINAL pixels, pixel centres at
integers) is carried through the preprocessing ``Geometry`` (crop, flip, resize) and rasterised in
the preprocessed image: each pixel gets the fraction of its area that lies inside the union of the
outlines, measured on a ``supersample`` x ``supersample`` grid of sample points per pixel. The
fraction is stored as uint8 (``round(255 * fraction)``) next to the image in the prepared dataset
(``Examples.mass_masks``); ``deepmil_jax.heatmap.cell_coverage`` turns it into the fraction of each
instance cell covered by lesion.

The masks hold every "Mass" outline of an image, whatever its label. Which of them are malignant is
decided with the image's label: the localisation metrics use the masks of positive images only (an
INbreast image with BI-RADS >= 4 whose outlined masses are taken as its malignant lesions; the
synthetic sets outline only malignant lesions as "Mass").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import skimage.draw

from data_pipeline.preprocess import Geometry

__all__ = ["SUPERSAMPLE", "mass_mask"]

# Sample points per pixel side when rasterising an outline (16 samples per pixel: the stored
# fraction is exact to 1/16 at edges, far below the cell sizes it is averaged over).
SUPERSAMPLE = 4


def mass_mask(
    geometry: Geometry, outlines: Sequence[np.ndarray], *, supersample: int = SUPERSAMPLE
) -> np.ndarray:
    """(h, w) uint8: 255 x the fraction of each preprocessed pixel inside any of ``outlines``.

    Args:
      geometry: the image's preprocessing geometry (``preprocess_file``'s second result).
      outlines: (P, 2) (y, x) polygons in original pixels (pixel centres at integers), as the
        readers give them; give the outlines that belong to the image
        (``preprocess.outlines_inside``). An outline of fewer than three points (no area) marks the
        pixels its points fall in.
      supersample: sample points per pixel side.
    """
    h, w = geometry.size
    s = int(supersample)
    covered = np.zeros((h * s, w * s), dtype=bool)
    for outline in outlines:
        points = geometry.from_original(np.asarray(outline, np.float64).reshape(-1, 2))
        # Sample k of a pixel row spans [i - 0.5, i + 0.5] in s steps: centre (k + 0.5) / s - 0.5.
        fine = (points + 0.5) * s - 0.5
        if len(fine) >= 3:
            rows, cols = skimage.draw.polygon(fine[:, 0], fine[:, 1], shape=covered.shape)
            covered[rows, cols] = True
            continue
        for y, x in np.floor(points + 0.5).astype(int):  # no area: the points' own pixels
            if 0 <= y < h and 0 <= x < w:
                covered[y * s : (y + 1) * s, x * s : (x + 1) * s] = True
    fraction = covered.reshape(h, s, w, s).mean(axis=(1, 3))
    return np.round(fraction * 255).astype(np.uint8)
