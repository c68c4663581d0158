r"""Instance heatmaps in the original image's coordinates, and the pointing game.

The network sees the *preprocessed* image (breast mask, crop, optional flip, resize to ``(H, W)``,
227 x 227 in the paper) and returns an ``(h', w')`` grid of instance logits (6 x 6 for 227). This
module maps that grid back onto the original mammogram with the ``Geometry`` that
``data_pipeline.preprocess.preprocess_file`` returns, and scores localisation.

Receptive-field approximation. Instance ``(r, c)`` of an ``(h', w')`` grid is taken to cover the
preprocessed rows ``[r * H / h', (r + 1) * H / h')`` and columns ``[c * W / w', (c + 1) * W / w')``:
the image is tiled into ``h' x w'`` equal, non-overlapping patches. The true receptive field of an
AlexNet ``pool5`` unit is larger (195 pixels of a 227 image) and centred on its cell, so this is the
usual "grid of patches" reading of the paper's Fig. 3, not the exact support of the instance.

Coordinates. Points are ``(y, x)`` with pixel centres at integers (pixel ``i`` spans
``[i - 0.5, i + 0.5]``), as in ``Geometry``, the INbreast XML outlines and matplotlib's ``imshow``.
A patch box is ``(y0, x0, y1, x1)`` in *edge* coordinates, where pixel ``i`` spans ``[i, i + 1)``,
so that the patch of the original image is ``image[y0:y1, x0:x1]`` after rounding
(:func:`box_to_pixel_slice`). Boxes of masses (``Examples.mass_boxes``) are in the centre
convention, as ``Geometry.box_from_original`` returns them.

No JAX here: the functions take numpy arrays and a ``Geometry`` (anything with ``original_shape``,
``size``, ``crop``, ``flipped``, ``from_original`` and ``to_original``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.special

__all__ = [
    "LESION_CELL_COVERAGE",
    "box_to_original",
    "cell_coverage",
    "cell_lesion_labels",
    "heatmap_iou",
    "localisation",
    "box_to_pixel_slice",
    "cell_box",
    "downsample",
    "instance_map_to_original",
    "patch_hits_boxes",
    "pointing_game",
    "render_heatmap",
    "bag_probability",
    "sigmoid",
    "top_cell",
]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function in float64 (scipy's ``expit``, stable for large |x|)."""
    return scipy.special.expit(np.asarray(x, dtype=np.float64))


def bag_probability(instance_logits: np.ndarray) -> np.ndarray:
    """(N, ...) instance logits -> (N,) image probabilities: the sigmoid of each image's largest
    instance logit, the bag prediction of max-pooling MIL (the paper's schemes; a model with its
    own pooling gives its bag logit, ``DeepMIL.instances_and_bag``)."""
    z = np.asarray(instance_logits)
    return sigmoid(z.max(axis=tuple(range(1, z.ndim))))


def top_cell(instance_logits: np.ndarray) -> tuple[int, int]:
    """(row, col) of the highest-scoring instance of an ``(h', w')`` map (first one on ties)."""
    z = np.asarray(instance_logits)
    if z.ndim != 2:
        raise ValueError(f"instance_logits must be (h', w'), got shape {z.shape}")
    row, col = divmod(int(np.argmax(z)), z.shape[1])
    return row, col


def cell_box(
    row: int, col: int, grid_shape: Sequence[int], image_shape: Sequence[int]
) -> np.ndarray:
    """Edge-coordinate box ``(y0, x0, y1, x1)`` float64 of instance (row, col) in the preprocessed
    image: rows ``[row * H / h', (row + 1) * H / h')``, columns likewise (see the module docstring
    for this approximation of the receptive field)."""
    gh, gw = (int(v) for v in grid_shape)
    H, W = (float(v) for v in image_shape)
    if not (0 <= row < gh and 0 <= col < gw):
        raise ValueError(f"cell ({row}, {col}) is outside a {gh}x{gw} grid")
    return np.array([row * H / gh, col * W / gw, (row + 1) * H / gh, (col + 1) * W / gw])


def box_to_original(box: np.ndarray, geometry: Any) -> np.ndarray:
    """Edge-coordinate box(es) ``(..., 4)`` in preprocessed pixels -> the same in original pixels.

    Undoes the resize, the flip and the crop of ``geometry``; the result is again
    ``(y0, x0, y1, x1)`` with ``y0 <= y1`` and ``x0 <= x1`` (a flip swaps the x edges).
    """
    # pragma: no mutate start (dtype=None only rounds a float32 box in float32, < 1e-6 pixel)
    b = np.asarray(box, dtype=np.float64)
    # pragma: no mutate end
    # Edge coordinate e is the centre-convention point e - 0.5; map the two corners and back.
    corners = np.stack([b[..., 0:2], b[..., 2:]], axis=-2) - 0.5  # (..., 2, 2) (y, x)
    orig = geometry.to_original(corners) + 0.5
    lo = orig.min(axis=-2)
    hi = orig.max(axis=-2)
    return np.concatenate([lo, hi], axis=-1)


def box_to_pixel_slice(box: np.ndarray, shape: Sequence[int]) -> tuple[int, int, int, int]:
    """Integer ``(y0, x0, y1, x1)`` of the pixels whose centres lie in an edge-coordinate box,
    clipped to an image of ``shape`` (H, W): ``image[y0:y1, x0:x1]`` is the patch."""
    y0, x0, y1, x1 = (float(v) for v in box)
    H, W = (int(v) for v in shape[:2])
    # Pixel i (centre at edge coordinate i + 0.5) is inside [e0, e1) iff ceil(e0 - 0.5) <= i <
    # ceil(e1 - 0.5).
    r0, r1 = math.ceil(y0 - 0.5), math.ceil(y1 - 0.5)
    c0, c1 = math.ceil(x0 - 0.5), math.ceil(x1 - 0.5)
    return (min(max(r0, 0), H), min(max(c0, 0), W), min(max(r1, 0), H), min(max(c1, 0), W))


def instance_map_to_original(values: np.ndarray, geometry: Any, *, stride: int = 1) -> np.ndarray:
    """Paint an ``(h', w')`` instance map onto the original image's pixel grid.

    Args:
      values: ``(h', w')`` per-instance values (probabilities, logits, ...).
      geometry: the preprocessing ``Geometry`` of the image.
      stride: sample every ``stride``-th original pixel: output pixel ``(i, j)`` stands for the
        block of original pixels ``[i * stride, (i + 1) * stride)`` (its centre is
        ``(i + 0.5) * stride - 0.5``), which matches :func:`downsample`.

    Returns:
      ``(ceil(H / stride), ceil(W / stride))`` float64: the value of the instance whose patch holds
      the pixel (nearest-patch, no interpolation), NaN outside the crop (no instance covers it).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must be (h', w'), got shape {v.shape}")
    gh, gw = v.shape
    H, W = geometry.original_shape
    hp, wp = geometry.size
    # Patch boundaries (edge coordinates) mapped to the original; the mapping is separable (crop,
    # flip and resize act on each axis alone) and monotone (decreasing in x if flipped). A pixel
    # belongs to the patch whose half-open original interval [a, b) holds its centre, exactly as
    # in box_to_pixel_slice.
    ky, kx = np.arange(gh + 1) * hp / gh, np.arange(gw + 1) * wp / gw
    by = geometry.to_original(np.stack([ky - 0.5, np.zeros_like(ky)], axis=1))[:, 0] + 0.5
    bx = geometry.to_original(np.stack([np.zeros_like(kx), kx - 0.5], axis=1))[:, 1] + 0.5
    centres_y = (np.arange(math.ceil(H / stride)) + 0.5) * stride
    centres_x = (np.arange(math.ceil(W / stride)) + 0.5) * stride
    rows, row_ok = _interval_index(by, centres_y, reverse=False)  # pragma: no mutate (None)
    cols, col_ok = _interval_index(bx, centres_x, reverse=bool(geometry.flipped))
    return np.where(row_ok[:, None] & col_ok[None, :], v[np.ix_(rows, cols)], np.nan)


def _interval_index(
    bounds: np.ndarray, points: np.ndarray, *, reverse: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Index k of the interval between bounds[k] and bounds[k + 1] (increasing, or decreasing if
    ``reverse``) holding each point, half-open on the lower side in original coordinates; and
    validity."""
    n = len(bounds) - 1
    ordered = bounds[::-1] if reverse else bounds
    k = np.searchsorted(ordered, points, side="right") - 1
    ok = (k >= 0) & (k < n)
    k = np.clip(k, 0, n - 1)
    return (n - 1 - k if reverse else k), ok


def downsample(image: np.ndarray, max_side: int = 1024) -> tuple[np.ndarray, int]:
    """Block-average ``image`` (H, W) by the smallest integer stride that brings its longer side to
    at most ``max_side``; edge pixels are repeated to fill the last block.

    Returns:
      (``(ceil(H / stride), ceil(W / stride))`` float32, stride).
    """
    image = np.asarray(image, dtype=np.float32)
    H, W = image.shape
    stride = max(1, -(-max(H, W) // max_side))
    if stride == 1:
        return image, 1
    ph, pw = -(-H // stride) * stride, -(-W // stride) * stride
    padded = np.pad(image, ((0, ph - H), (0, pw - W)), mode="edge")
    small = padded.reshape(ph // stride, stride, pw // stride, stride).mean(axis=(1, 3))
    return small.astype(np.float32), stride


# ---------------------------------------------------------------------------------------------
# Rendering


def render_heatmap(
    path: str | os.PathLike,
    image: np.ndarray,
    probabilities: np.ndarray,
    geometry: Any,
    *,
    outlines: Sequence[np.ndarray] = (),
    top_box: np.ndarray | None = None,
    title: str | None = None,
    max_side: int = 1024,
    alpha: float = 0.45,
    cmap: str = "jet",
) -> None:
    """Write a PNG: the original mammogram with the instance probabilities overlaid.

    Args:
      path: output PNG.
      image: ``(H, W)`` original image in [0, 1] (``data_pipeline.preprocess.read_image``).
      probabilities: ``(h', w')`` instance probabilities in [0, 1] (colour scale fixed to [0, 1]).
      geometry: the ``Geometry`` of the preprocessing, to undo crop, flip and resize.
      outlines: annotated mass outlines, each ``(P, 2)`` (y, x) in original pixels (drawn dashed).
      top_box: edge-coordinate box ``(y0, x0, y1, x1)`` in original pixels to frame (the most
        suspicious patch), or None.
      title: figure title.
      max_side: the picture is block-averaged to at most this many pixels on its longer side; the
        axes keep full-resolution original pixel coordinates.
      alpha: opacity of the overlay.
      cmap: matplotlib colormap of the overlay.
    """
    # pragma: no mutate block, drawing only (colours, widths, layout); the geometry it draws is
    # instance_map_to_original's, which is mutation-tested
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    H, W = geometry.original_shape
    if tuple(np.shape(image)) != (H, W):
        raise ValueError(f"image has shape {np.shape(image)}, the geometry says {(H, W)}")
    small, stride = downsample(image, max_side)
    heat = np.ma.masked_invalid(instance_map_to_original(probabilities, geometry, stride=stride))
    extent = (-0.5, small.shape[1] * stride - 0.5, small.shape[0] * stride - 0.5, -0.5)

    height_in = 6.0
    dpi = float(np.clip(small.shape[0] / height_in, 72, 200))
    fig = Figure(figsize=(height_in * W / H + 1.6, height_in + 0.5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(small, cmap="gray", vmin=0.0, vmax=1.0, extent=extent, interpolation="antialiased")
    shown = ax.imshow(
        heat, cmap=cmap, vmin=0.0, vmax=1.0, alpha=alpha, extent=extent, interpolation="nearest"
    )
    handles = []
    for outline in outlines:
        o = np.asarray(outline, dtype=np.float64).reshape(-1, 2)
        closed = np.concatenate([o, o[:1]], axis=0)
        ax.plot(closed[:, 1], closed[:, 0], color="lime", lw=1.2, ls="--")
    if len(outlines):
        handles.append(Line2D([], [], color="lime", lw=1.2, ls="--", label="annotated mass"))
    if top_box is not None:
        y0, x0, y1, x1 = (float(v) - 0.5 for v in top_box)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", lw=1.5))
        handles.append(Line2D([], [], color="white", lw=1.5, label="most suspicious patch"))
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.6)
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_xlabel("x (original pixels)", fontsize=8)
    ax.set_ylabel("y (original pixels)", fontsize=8)
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    bar = fig.colorbar(shown, ax=ax, fraction=0.05, pad=0.02)
    bar.set_label("instance malignancy probability", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(os.fspath(path))


# ---------------------------------------------------------------------------------------------
# Localisation: the pointing game


def patch_hits_boxes(
    row: int, col: int, grid_shape: Sequence[int], image_shape: Sequence[int], boxes: np.ndarray
) -> bool:
    """Whether instance (row, col)'s patch overlaps any of ``boxes``.

    Args:
      row, col: the instance (e.g. the highest-scoring one).
      grid_shape: (h', w') of the instance map.
      image_shape: (H, W) of the preprocessed image.
      boxes: ``(b, 4)`` mass boxes ``(y0, x0, y1, x1)`` in preprocessed pixels, pixel-centre
        convention (``Examples.mass_boxes``, ``Geometry.box_from_original``).

    The patch is the half-open edge-coordinate box of :func:`cell_box`; a mass box covers the edge
    coordinates ``[y0 + 0.5, y1 + 0.5]`` (closed). They overlap when the intervals meet on both
    axes: ``mass_lo < patch_hi`` and ``mass_hi >= patch_lo``. A mass that only touches the patch's
    far (exclusive) edge belongs to the next patch.
    """
    # pragma: no mutate start (equivalent: dtype=None differs in float32 rounding only, numpy
    # reads reshape(-2, 4) as reshape(-1, 4), and without the shortcut no box still gives False)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return False
    # pragma: no mutate end
    py0, px0, py1, px1 = cell_box(row, col, grid_shape, image_shape)
    my0, mx0, my1, mx1 = (boxes[:, i] + 0.5 for i in range(4))
    hit = (my0 < py1) & (my1 >= py0) & (mx0 < px1) & (mx1 >= px0)
    return bool(hit.any())


def pointing_game(
    top_cells: Mapping[str, tuple[int, int]],
    mass_boxes: Mapping[str, np.ndarray],
    labels: Mapping[str, int],
    *,
    grid_shape: Sequence[int],
    image_shape: Sequence[int],
) -> dict[str, float | int]:
    """Fraction of positive images with annotated masses whose top patch overlaps a mass box.

    Args:
      top_cells: {file_id: (row, col)} of each image's highest-scoring instance.
      mass_boxes: {file_id: (b, 4)} mass boxes in preprocessed pixels (centre convention).
      labels: {file_id: 0/1}.
      grid_shape: (h', w') of the instance maps; image_shape: (H, W) of the preprocessed images.

    Returns:
      ``{"hits", "evaluated", "score"}``: images scored (label 1 with at least one box), those whose
      top patch overlaps a box, and their ratio (NaN when none is scored).
    """
    hits = evaluated = 0
    for file_id, (row, col) in top_cells.items():
        # pragma: no mutate start (patch_hits_boxes converts the boxes itself; any empty default)
        boxes = np.asarray(mass_boxes.get(file_id, np.zeros((0, 4))), dtype=np.float64)
        # pragma: no mutate end
        if int(labels[file_id]) != 1 or boxes.size == 0:
            continue
        evaluated += 1
        hits += patch_hits_boxes(int(row), int(col), grid_shape, image_shape, boxes)
    return {
        "hits": hits,
        "evaluated": evaluated,
        "score": hits / evaluated if evaluated else math.nan,
    }


# ---------------------------------------------------------------------------------------------
# Localisation against lesion masks: instance AUC and the heatmap's intersection over union

# A cell holds lesion when at least this fraction of its area lies inside a mass outline (1%, about
# 14 pixels of a 38 x 38 cell of a 227 image: a sliver where an outline grazes a cell does not make
# it a lesion cell). A cell with no lesion pixel at all is a negative; a cell in between (a lesion
# covers less than 1% of it) is left out of the instance AUC, as neither.
LESION_CELL_COVERAGE = 0.01


def _overlaps(n: int, cells: int) -> np.ndarray:
    """(cells, n): the length of pixel ``i``'s span ``[i, i + 1)`` inside cell ``c``'s span
    ``[c * n / cells, (c + 1) * n / cells)`` (edge coordinates, as in :func:`cell_box`)."""
    edges = np.arange(cells + 1) * (n / cells)
    pixels = np.arange(n)
    lo = np.maximum(edges[:-1, None], pixels[None, :])
    hi = np.minimum(edges[1:, None], pixels[None, :] + 1.0)
    return np.clip(hi - lo, 0.0, None)


def cell_coverage(mask: np.ndarray, grid_shape: Sequence[int]) -> np.ndarray:
    """``(h', w')`` float64: the fraction of each instance cell's area inside a lesion.

    Args:
      mask: ``(H, W)`` uint8 lesion mask of a preprocessed image, 255 x the fraction of each pixel
        inside an outline (``Examples.mass_masks``, ``data_pipeline.lesions.mass_mask``).
      grid_shape: ``(h', w')`` of the instance map; cell ``(r, c)`` is :func:`cell_box`'s.

    Pixels cut by a cell boundary count with the part of their area inside the cell.
    """
    m = np.asarray(mask) / 255.0
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    gh, gw = (int(v) for v in grid_shape)
    H, W = m.shape
    covered = _overlaps(H, gh) @ m @ _overlaps(W, gw).T
    return covered / ((H / gh) * (W / gw))


def cell_lesion_labels(coverage: np.ndarray) -> np.ndarray:
    """Instance ground truth of a coverage map: 1 where at least ``LESION_CELL_COVERAGE`` of the
    cell is lesion, 0 where none of it is, -1 (left out) in between."""
    c = np.asarray(coverage)
    return np.where(c >= LESION_CELL_COVERAGE, 1, np.where(c > 0.0, -1, 0))


def _cell_of_pixel(n: int, cells: int) -> np.ndarray:
    """The cell of each pixel along one axis: the one holding the pixel's centre ``i + 0.5``."""
    # (n - 0.5) * cells / n < cells: never past the last cell
    return ((np.arange(n) + 0.5) * cells / n).astype(int)


def heatmap_iou(instance_logits: np.ndarray, mask: np.ndarray) -> float:
    """Intersection over union of the thresholded heatmap with the lesion, in preprocessed pixels.

    The heatmap is the instance map painted onto the preprocessed image (each pixel takes the
    cell holding its centre), thresholded at instance probability 0.5 (logit 0: the instance
    classifier calls the patch malignant); the lesion is the pixels at least half inside an outline
    (``mask >= 128``). NaN when both are empty.
    """
    z = np.asarray(instance_logits)
    m = np.asarray(mask)
    if z.ndim != 2 or m.ndim != 2:
        raise ValueError(f"need (h', w') logits and an (H, W) mask, got {z.shape} and {m.shape}")
    rows = _cell_of_pixel(m.shape[0], z.shape[0])
    cols = _cell_of_pixel(m.shape[1], z.shape[1])
    hot = (z >= 0.0)[rows[:, None], cols[None, :]]
    lesion = m >= 128
    union = np.count_nonzero(hot | lesion)
    return np.count_nonzero(hot & lesion) / union if union else math.nan


def localisation(
    instance_logits: np.ndarray,
    mass_masks: np.ndarray,
    mass_boxes: Sequence[np.ndarray],
    labels: np.ndarray,
) -> dict[str, float | int]:
    """The localisation scores of a set of predictions against its lesion outlines.

    Only positive images (label 1) with an outlined lesion are scored: their outlined masses are
    taken as the malignant lesions.

    Args:
      instance_logits: ``(N, h', w')``.
      mass_masks: ``(N, H, W)`` uint8 (``Examples.mass_masks``) of the same images.
      mass_boxes: N ``(b, 4)`` mass boxes (``Examples.mass_boxes``), for the pointing game.
      labels: ``(N,)`` 0/1.

    Returns:
      ``instance_auc``: ROC AUC of the instance logits of the scored images' cells against "the
      cell holds lesion" (:func:`cell_lesion_labels`; the cells of all scored images pooled);
      ``instance_cells`` and ``lesion_cells``: the cells it ranks and the positives among them;
      ``iou``: the mean over scored images of :func:`heatmap_iou`; ``localised_images``: the
      images scored (a positive image with at least one lesion cell); ``pointing_game`` and
      ``pointing_hits``/``pointing_images``: :func:`pointing_game` with the mass boxes. NaN where
      nothing can be scored.
    """
    from sklearn.metrics import roc_auc_score

    z = np.asarray(instance_logits)
    sizes = (len(z), len(mass_masks), len(mass_boxes), len(labels))
    if len(set(sizes)) != 1:
        raise ValueError(
            "localisation needs one instance map, mask, box list and label per image, got "
            "{} maps, {} masks, {} box lists and {} labels".format(*sizes)
        )
    grid = z.shape[1:]
    cells, truth, ious = [], [], []
    # the lengths are checked above: strict=False is equivalent
    for logits, mask, label in zip(z, mass_masks, labels, strict=True):  # pragma: no mutate
        if int(label) != 1:
            continue
        lesion = cell_lesion_labels(cell_coverage(mask, grid))
        if not (lesion == 1).any():
            continue
        keep = lesion >= 0
        cells.append(logits[keep])
        truth.append(lesion[keep])
        ious.append(heatmap_iou(logits, mask))
    instance_cells = sum(t.size for t in truth)
    lesion_cells = sum(int(t.sum()) for t in truth)
    pointing = pointing_game(
        {str(i): top_cell(logits) for i, logits in enumerate(z)},
        {str(i): boxes for i, boxes in enumerate(mass_boxes)},
        {str(i): label for i, label in enumerate(labels)},
        grid_shape=grid,
        image_shape=np.asarray(mass_masks).shape[1:],
    )
    return {
        "instance_auc": (
            float(roc_auc_score(np.concatenate(truth), np.concatenate(cells)))
            if lesion_cells < instance_cells  # both classes (a scored image has a lesion cell)
            else math.nan
        ),
        "instance_cells": instance_cells,
        "lesion_cells": lesion_cells,
        "iou": float(np.nanmean(ious)) if ious else math.nan,
        "localised_images": len(ious),
        "pointing_game": pointing["score"],
        "pointing_hits": pointing["hits"],
        "pointing_images": pointing["evaluated"],
    }
