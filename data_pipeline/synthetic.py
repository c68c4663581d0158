"""A synthetic INbreast: the same file layout, at a reduced size, with a signal only in the lesion.

    python -m data_pipeline.synthetic --out=DIR [--num_images=80] [--seed=0] [--style=easy|hard]

writes
    DIR/AllDICOMs/<id>_<patient>_MG_<L|R>_<CC|MLO>_ANON.dcm   16-bit DICOM (12 bits stored), some
                                                             MONOCHROME1 (inverted) as in practice
    DIR/AllXML/<id>.xml                                      OsiriX ROI plists: "Mass" outlines and
                                                             "Calcification" points
    DIR/INbreast.csv                                         the real table's format (';', CRLF)

Each woman has four images (L/R x CC/MLO). A breast is a textured half-ellipse against the left or
right edge (R breasts against the right edge, L against the left), with a pectoral muscle in MLO
views, a few bright calcification-like dots in every image, sometimes a faint, round, smooth benign
blob, and sometimes a bright marker outside the breast.

About 25% of the breasts carry a malignant-looking lesion in both views: a lobulated, textured blob,
clearly brighter than the tissue, covering about 2% of the breast area (as in the paper's Fig. 2),
outlined as a "Mass" in the XML; their BI-RADS is 4a, 4b, 4c, 5 or 6, the others' 1, 2 or 3.

The lesion is the only signal. The breast size and the tissue brightness are drawn from the same
stratified distribution in both classes, and each breast's mean intensity (lesion included) is set
to its drawn value, so that global statistics (mean intensity, breast area) sit at chance; the
benign findings occur independently of the label. Everything follows from the seed.

Two styles (`style=`, `--style=`): "easy" (the default, described above; its files are the same
bytes for the same seed as before the hard style existed) and "hard", a benchmark on
which only a careful model separates the classes:

- Every breast carries one to three findings (30%, 40%, 30%), in both classes and in both views.
  Each one's area is drawn log-uniform between 0.2% and 10% of the breast's area
  (`HARD_LESION_AREA`) and its peak brightness from `HARD_CONTRAST`, whatever it is. In a positive
  breast one up to all of them (uniformly; so 60% of the positive breasts have one lesion, 30% two
  and 10% three) are malignant lesions; in a negative breast the same draw makes them linear
  densities: thin bright strands (ducts, trabeculae) of the same area in all, with the same
  brightness distribution. The others are benign masses, drawn alike in both classes. About 30% of
  the breasts of either class carry one more linear density. So the sizes and brightness of the
  findings, and the image's histogram, say nothing of the label: a lesion is a compact bright
  blob, its stand-in is not, and a model must tell the shapes apart.
- A malignant lesion has a circumscribed (lobulated), spiculated (bright lines radiating from the
  core) or ill-defined (irregular, wide soft edge) margin, and a dome-shaped, finely mottled
  interior. A benign mass is an oval with a sharp edge, smoothly varying, 0.6 times as bright
  (`_BENIGN_GAIN`; the two ranges overlap), half of them with a dark halo.
- Breast density is drawn per breast (stratified within each class, so the same in both):
  glandular tissue covers 8% to 68% of the breast. A finding adds its brightness only where it is
  brighter than the glandular tissue under it, so dense tissue hides findings; a lesion lies in
  fatty tissue where it can. The ACR column of the table follows from the density (1-4).
- Every image has the easy style's scattered calcifications; about a third (in both classes)
  also have a cluster of 6-20 calcifications, outlined as a "Cluster" ROI.
- As in the easy style, each breast's mean intensity is set to a value drawn independently of
  the label, and the breast size is stratified within each class.

The XML (OsiriX ROI plist) of a hard image names its malignant lesions' outlines "Mass" (the only
ROIs `data_pipeline.inbreast.read_mass_outlines` reads, so they are the instance ground truth),
its benign masses' outlines "Benign Mass" (`BENIGN_MASS`) and its linear densities' strands
"Linear Density" (`LINEAR_DENSITY`, one rectangle a strand), neither ever read as masses; the
cluster's outline is "Cluster" and every calcification a "Calcification" point. An outline traces
the finding's core at half its edge's height; a spiculated lesion's spicules reach beyond it.

Calibration (the aim: AUC ~0.7-0.95 from random weights at the project's defaults): on
160 images (seed 0), max pooling (fold 0) and label assignment (fold 1) reached validation AUC
0.71-0.88 from the second epoch on (test AUC on one 32-image fold: 0.43 and 0.66). Variants whose
benign look-alikes were as bright and as compact as the lesions (margins, spicules and mottling the
only cue) stayed at chance; making the lesions brighter than every distractor instead let a
classifier on global statistics see them.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import plistlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage
import scipy.spatial
import scipy.special
import skimage.filters
import skimage.transform
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from data_pipeline.errors import DataError

__all__ = [
    "LINEAR_DENSITY",
    "BENIGN_MASS",
    "HARD_CONTRAST",
    "HARD_LESION_AREA",
    "MARGINS",
    "STYLES",
    "Finding",
    "SyntheticImage",
    "synthesize_hard_image",
    "synthesize_image",
    "write_dicom",
    "write_synthetic_inbreast",
]

_HEADER = [
    "Patient ID",
    "Patient age",
    "Laterality",
    "View",
    "Acquisition date",
    "File Name",
    "ACR",
    "Bi-Rads",
]
_MAMMOGRAPHY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
_UID_PREFIX = "1.2.826.0.1.3680043.10.1234."  # fixed, so that UIDs follow from the seed alone
_MAX_STORED = 4095  # 12 bits stored in 16 allocated, like many mammography systems
_CALC_LEVEL = 0.97  # brightness of calcifications; a marker (1.0) is the only brighter thing
_POSITIVE_BIRADS = (("4a", 0.1), ("4b", 0.1), ("4c", 0.2), ("5", 0.45), ("6", 0.15))
_NEGATIVE_BIRADS = (("1", 0.25), ("2", 0.6), ("3", 0.15))
_VIEWS = (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"))  # the order INbreast lists them

STYLES = ("easy", "hard")
# The hard style. The ROI name of a benign mass in the XML (malignant lesions are "Mass").
BENIGN_MASS = "Benign Mass"
# The ROI name of a linear density's strand (a benign stand-in for a negative breast's lesions).
LINEAR_DENSITY = "Linear Density"
# Area of a finding (malignant or benign) as a fraction of the breast's area: log-uniform in range.
HARD_LESION_AREA = (0.002, 0.10)
# Peak brightness a finding adds to the tissue (tissue 0.3-0.45 before the mean is set). With the
# constants below, tried at the project's defaults (see the module docstring's calibration).
HARD_CONTRAST = (0.15, 0.3)
# Brightness glandular tissue adds (it hides the findings that are dimmer than it).
_GLAND_BRIGHTNESS = (0.05, 0.12)
# How the findings look: brightness falls by _DOME from centre (or a strand's axis) to edge;
# mottling of relative amplitude _MOTTLE, fine (grain radius/8) in lesions and linear densities,
# coarse (radius/1.5) in benign masses, so that the brightness histograms agree; spicules as bright
# as _SPICULE_BRIGHTNESS x the contrast and _SPICULE_WIDTH x the radius wide; benign masses
# _BENIGN_GAIN as bright; a linear density's strands H/60 wide (about 4 pixels at 227 x 227, so
# that resizing keeps their brightness and with it the histogram's balance).
_DOME = 0.5
_MOTTLE = 0.35
_FINE_GRAIN = 8.0
_SPICULE_BRIGHTNESS = 1.0
_SPICULE_WIDTH = 0.1
_BENIGN_GAIN = 0.6
MARGINS = ("circumscribed", "spiculated", "ill-defined")
_MARGIN_WEIGHTS = (0.3, 0.4, 0.3)
_FINDINGS_PER_BREAST = ((1, 0.3), (2, 0.4), (3, 0.3))
_CLUSTER_PROBABILITY = 0.35
_EXTRA_LINEAR = 0.3


@dataclass(frozen=True)
class SyntheticImage:
    """One generated mammogram before it is written.

    Attributes:
      image: (H, W) float64 display intensities in [0, 1] (background near 0).
      breast: (H, W) bool, the breast.
      masses: malignant lesion outlines, each (P, 2) float64 (y, x) in pixels.
      calcifications: (C, 2) float64 (y, x) centres of the calcification-like dots.
      benign_masses: benign mass outlines (hard style), each (P, 2) float64 (y, x).
      clusters: calcification cluster outlines (hard style), each (P, 2) float64 (y, x).
      margins: the margin of each of `masses` (hard style: one of MARGINS; empty for easy).
      linear_densities: outlines of the strands of linear densities (hard style), each (4, 2).
    """

    image: np.ndarray
    breast: np.ndarray
    masses: tuple[np.ndarray, ...]
    calcifications: np.ndarray
    benign_masses: tuple[np.ndarray, ...] = ()
    clusters: tuple[np.ndarray, ...] = ()
    margins: tuple[str, ...] = ()
    linear_densities: tuple[np.ndarray, ...] = ()


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise, zero mean and unit standard deviation: (H, W) float64.

    Drawn at a coarser grid (sigma / 2 pixels per cell) and interpolated up, which is much faster
    than smoothing at full size and looks the same.
    """
    step = max(1, int(sigma // 2))
    coarse = (-(-shape[0] // step) + 1, -(-shape[1] // step) + 1)
    field = skimage.filters.gaussian(
        rng.standard_normal(coarse), sigma=sigma / step, mode="reflect"
    )
    if step > 1:
        big = (coarse[0] * step, coarse[1] * step)
        field = skimage.transform.resize(field, big, order=1, mode="edge")
    field = field[: shape[0], : shape[1]]
    field = field - field.mean()
    return field / (field.std() + 1e-12)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _window(centre: tuple[float, float], radius: float, shape: tuple[int, int]):
    """Slices of the square of half-side `radius` around `centre`, clipped to the image."""
    cy, cx = centre
    y0, y1 = max(0, int(cy - radius)), min(shape[0], int(cy + radius) + 2)
    x0, x1 = max(0, int(cx - radius)), min(shape[1], int(cx + radius) + 2)
    return slice(y0, y1), slice(x0, x1)


def synthesize_image(
    rng: np.random.Generator,
    *,
    shape: tuple[int, int] = (512, 416),
    laterality: str = "L",
    view: str = "CC",
    lesion: bool = False,
    size: float = 0.5,
    brightness: float = 0.5,
    marker: bool = False,
    faint_blob: bool = False,
) -> SyntheticImage:
    """Draw one synthetic mammogram.

    Args:
      rng: the source of every random choice.
      shape: (H, W) in pixels.
      laterality: "L" (chest wall on the left edge) or "R" (on the right edge).
      view: "CC" or "MLO" (MLO adds a pectoral muscle).
      lesion: add a malignant-looking lesion (about 2% of the breast area).
      size: in [0, 1): where the breast's size falls in its range (stratified by the caller).
      brightness: in [0, 1): where the breast's mean intensity falls in its range.
      marker: add a bright marker outside the breast.
      faint_blob: add a faint, round, smooth benign blob.
    """
    grid = _Grid.of(shape, laterality)
    body = _breast(rng, grid, size)
    image = _tissue(rng, grid, body)
    muscle = _pectoral_muscle(rng, grid, body) if view == "MLO" else np.zeros(shape, dtype=bool)
    image = image + 0.1 * muscle  # the muscle is brighter than the tissue
    area = float(body.breast.sum())
    ys, xs = np.nonzero(body.breast & ~muscle & (body.r < 0.62))  # where findings may go
    masses: list[np.ndarray] = []
    if lesion:
        outline, (ys, xs) = _add_lesion(rng, image, grid, (ys, xs), area)
        masses.append(outline)
    if faint_blob:
        _add_faint_blob(rng, image, grid, (ys, xs), area)

    # Set the breast's mean (lesion included) to its drawn brightness, independently of the label.
    target = 0.30 + 0.12 * brightness
    image += target - image[body.breast].mean()
    np.clip(image, 0.0, 0.9, out=image)
    calcifications = _add_calcifications(rng, image, grid, (ys, xs), body.breast)

    # Background: dim, slightly uneven, noisy; the skin line blends into it.
    H = shape[0]
    background = 0.012 + 0.006 * (grid.yy / H) + rng.uniform(0.0, 0.004, size=shape)
    image = background + (image - background) * body.skin
    if marker:
        _add_marker(rng, image, body.breast, laterality)
    return SyntheticImage(np.clip(image, 0.0, 1.0), body.breast, tuple(masses), calcifications)


@dataclass(frozen=True)
class _Grid:
    """Pixel coordinates of an (H, W) image: rows yy (H, 1), columns xx (1, W), and depth (1, W),
    the distance from the chest wall edge."""

    shape: tuple[int, int]
    yy: np.ndarray
    xx: np.ndarray
    depth: np.ndarray

    @classmethod
    def of(cls, shape: tuple[int, int], laterality: str) -> _Grid:
        yy = np.arange(shape[0], dtype=np.float64)[:, None]
        xx = np.arange(shape[1], dtype=np.float64)[None, :]
        depth = xx if laterality == "L" else (shape[1] - 1) - xx
        return cls(shape, yy, xx, depth)


@dataclass(frozen=True)
class _Breast:
    """The breast's outline: r (H, W), the elliptic radius (< 1 inside); breast (H, W) bool;
    skin (H, W) in [0, 1], the soft skin line; reach, how far it reaches from the chest wall."""

    r: np.ndarray
    breast: np.ndarray
    skin: np.ndarray
    reach: float


def _breast(rng: np.random.Generator, grid: _Grid, size: float) -> _Breast:
    """A half-ellipse against the chest wall with a slightly wavy skin line."""
    H, W = grid.shape
    a = W * (0.58 + 0.24 * size)  # how far it reaches from the chest wall
    b = H * (0.36 + 0.09 * size)  # half its height at the chest wall
    cy = H * rng.uniform(0.45, 0.55)
    theta = np.arctan2(grid.yy - cy, grid.depth)
    wave = 1.0 + 0.025 * np.sin(3 * theta + rng.uniform(0, 2 * np.pi))
    r = np.sqrt(((grid.yy - cy) / b) ** 2 + (grid.depth / a) ** 2) / wave
    skin = _smoothstep((1.0 - r) * (a / 3.0) + 0.5)  # a soft skin line about 3 pixels wide
    return _Breast(r=r, breast=r < 1.0, skin=skin, reach=a)


def _tissue(rng: np.random.Generator, grid: _Grid, body: _Breast) -> np.ndarray:
    """Textured tissue everywhere (the skin line cuts it later), brighter where it is thicker."""
    H = grid.shape[0]
    thickness = np.sqrt(np.clip(1.0 - body.r**2, 0.0, 1.0))
    texture = 0.75 * _smooth_noise(rng, grid.shape, H / 40)
    texture = texture + 0.45 * _smooth_noise(rng, grid.shape, H / 130)
    contrast = rng.uniform(0.035, 0.05)
    return 0.3 + 0.1 * np.sqrt(thickness) + contrast * texture * (0.5 + 0.5 * thickness)


def _pectoral_muscle(rng: np.random.Generator, grid: _Grid, body: _Breast) -> np.ndarray:
    """The MLO view's pectoral muscle: (H, W) bool, a triangle in the upper chest-wall corner."""
    p_h, p_w = grid.shape[0] * rng.uniform(0.35, 0.5), body.reach * rng.uniform(0.25, 0.4)
    return (grid.depth < p_w * (1.0 - grid.yy / p_h)) & body.breast


def _add_lesion(
    rng: np.random.Generator,
    image: np.ndarray,
    grid: _Grid,
    places: tuple[np.ndarray, np.ndarray],
    area: float,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Adds a lobulated, textured, bright blob of about 2% of the breast `area` to `image`.

    Its centre is one of `places` (ys, xs) far enough from the image's edges for the whole
    lesion to be in the image. Returns its outline (40, 2) (y, x) and those places (the other
    findings are drawn from them too).
    """
    H, W = grid.shape
    ys, xs = places
    r0 = math.sqrt(rng.uniform(0.016, 0.024) * area / math.pi)
    margin = 1.35 * r0
    ok = (ys >= margin) & (ys < H - margin) & (xs >= margin) & (xs < W - margin)
    ys, xs = ys[ok], xs[ok]
    k = int(rng.integers(len(ys)))
    ly, lx = float(ys[k]), float(xs[k])
    harmonics = [(h, rng.uniform(0.05, 0.11), rng.uniform(0, 2 * np.pi)) for h in (2, 3, 5)]

    def radius(angle: np.ndarray) -> np.ndarray:
        return r0 * (1.0 + sum(amp * np.sin(h * angle + ph) for h, amp, ph in harmonics))

    win = _window((ly, lx), 1.6 * r0, grid.shape)
    wy, wx = grid.yy[win[0]], grid.xx[:, win[1]]
    dist = np.hypot(wy - ly, wx - lx)
    inside = _smoothstep((radius(np.arctan2(wy - ly, wx - lx)) - dist) / (0.35 * r0) + 0.5)
    speckle = _smooth_noise(rng, inside.shape, max(1.0, r0 / 8))
    image[win] += rng.uniform(0.17, 0.23) * inside * (0.8 + 0.2 * speckle)
    t = np.linspace(0.0, 2 * np.pi, 40, endpoint=False)
    rr = radius(t)
    return np.stack([ly + rr * np.sin(t), lx + rr * np.cos(t)], axis=1), (ys, xs)


def _add_faint_blob(
    rng: np.random.Generator,
    image: np.ndarray,
    grid: _Grid,
    places: tuple[np.ndarray, np.ndarray],
    area: float,
) -> None:
    """Adds a benign-looking blob at one of `places`: round, smooth, faint and smaller."""
    ys, xs = places
    k = int(rng.integers(len(ys)))
    rb = math.sqrt(rng.uniform(0.004, 0.008) * area / math.pi)
    win = _window((ys[k], xs[k]), 4 * rb, grid.shape)
    d2 = (grid.yy[win[0]] - ys[k]) ** 2 + (grid.xx[:, win[1]] - xs[k]) ** 2
    image[win] += rng.uniform(0.05, 0.07) * np.exp(-d2 / (2 * rb**2))


def _add_calcifications(
    rng: np.random.Generator,
    image: np.ndarray,
    grid: _Grid,
    places: tuple[np.ndarray, np.ndarray],
    breast: np.ndarray,
) -> np.ndarray:
    """Adds 1 to 6 calcification-like dots, tiny, round, at one fixed brightness, clustered
    around one of `places`; returns their centres (C, 2) (y, x), C >= 1."""
    H, W = grid.shape
    ys, xs = places
    n_calc = int(rng.integers(1, 7))
    centre = int(rng.integers(len(ys)))
    spread = rng.uniform(4, 20)
    calcs = []
    for _ in range(n_calc):
        cyx = np.array([ys[centre], xs[centre]]) + rng.normal(0, spread, 2)
        cyx = np.clip(cyx, [0, 0], [H - 1, W - 1])
        iy, ix = int(round(cyx[0])), int(round(cyx[1]))
        if not breast[iy, ix]:
            continue
        rc = rng.uniform(0.8, 1.8)
        win = _window((cyx[0], cyx[1]), rc + 1, grid.shape)
        dot = (grid.yy[win[0]] - cyx[0]) ** 2 + (grid.xx[:, win[1]] - cyx[1]) ** 2 <= rc**2
        image[win][dot & breast[win]] = _CALC_LEVEL
        image[iy, ix] = _CALC_LEVEL
        calcs.append(cyx)
    if not calcs:  # at least one, so every image has the same brightest tissue value
        cyx = np.array([ys[centre], xs[centre]], dtype=np.float64)
        image[int(cyx[0]), int(cyx[1])] = _CALC_LEVEL
        calcs.append(cyx)
    return np.array(calcs, dtype=np.float64).reshape(-1, 2)


def _add_marker(rng: np.random.Generator, image: np.ndarray, breast: np.ndarray, side: str) -> None:
    """A bright letter-like block in a corner away from the chest wall, clear of the breast."""
    H, W = image.shape
    mh, mw = max(4, H // 22), max(6, W // 9)
    margin = max(2, H // 40)
    x0 = W - margin - mw if side == "L" else margin
    corners = [margin, H - margin - mh]
    rng.shuffle(corners)
    for y0 in corners:
        y_lo, y_hi = max(0, y0 - margin), min(H, y0 + mh + margin)
        x_lo, x_hi = max(0, x0 - margin), min(W, x0 + mw + margin)
        if breast[y_lo:y_hi, x_lo:x_hi].any():
            continue
        block = np.ones((mh, mw))
        block[mh // 3 : 2 * mh // 3, mw // 5 : 2 * mw // 5] = 0.2  # a gap, like a letter
        block[mh // 4 : 3 * mh // 4, 3 * mw // 5 : 4 * mw // 5] = 0.2
        image[y0 : y0 + mh, x0 : x0 + mw] = block
        return


# --------------------------------------------------------------------------------------------------
# The hard style.


@dataclass(frozen=True)
class Finding:
    """A finding of one breast, drawn once and shown in both of its views.

    Attributes:
      malignant: a malignant lesion ("Mass" in the XML), or benign.
      area: its area as a fraction of the breast's area (before it is fitted into the breast).
      margin: one of MARGINS for a malignant lesion; "benign" for a benign mass ("Benign Mass"),
        "linear" for a linear density ("Linear Density").
      contrast: the peak brightness it adds to the tissue.
    """

    malignant: bool
    area: float
    margin: str
    contrast: float


def synthesize_hard_image(
    rng: np.random.Generator,
    *,
    shape: tuple[int, int] = (512, 416),
    laterality: str = "L",
    view: str = "CC",
    size: float = 0.5,
    brightness: float = 0.5,
    density: float = 0.5,
    findings: Sequence[Finding] = (),
    marker: bool = False,
    cluster: bool = False,
) -> SyntheticImage:
    """Draw one mammogram of the hard style (see the module docstring).

    Args:
      rng: the source of every random choice.
      shape: (H, W) in pixels.
      laterality: "L" (chest wall on the left edge) or "R" (on the right edge).
      view: "CC" or "MLO" (MLO adds a pectoral muscle).
      size: in [0, 1): where the breast's size falls in its range.
      brightness: in [0, 1): where the breast's mean intensity falls in its range.
      density: in [0, 1): how much glandular tissue the breast holds (8% to 68% of it).
      findings: the findings to draw, each at its own place (malignant ones first, so that only
        a benign one is left out when the breast has no room for it).
      marker: add a bright marker outside the breast.
      cluster: add a cluster of 6-20 calcifications (outlined).

    Returns:
      The image; its `masses` are the malignant lesions' outlines.
    """
    grid = _Grid.of(shape, laterality)
    body = _breast(rng, grid, size)
    image = _tissue(rng, grid, body)
    gland = _glandular(rng, grid, body, density)
    dense = rng.uniform(*_GLAND_BRIGHTNESS) * gland  # the brightness glandular tissue adds
    image += dense
    muscle = _pectoral_muscle(rng, grid, body) if view == "MLO" else np.zeros(shape, dtype=bool)
    image += 0.1 * muscle
    masses, benign, margins, linear = _draw_findings(
        rng, image, grid, body, muscle, gland, dense, findings
    )
    # Set the breast's mean (findings included) to its drawn brightness, independently of the label.
    target = 0.30 + 0.12 * brightness
    image += target - image[body.breast].mean()
    np.clip(image, 0.0, 0.9, out=image)
    calcifications, clusters = _draw_calcifications(rng, image, grid, body, muscle, cluster)
    image = _on_background(rng, image, grid, body)
    if marker:
        _add_marker(rng, image, body.breast, laterality)
    return SyntheticImage(
        np.clip(image, 0.0, 1.0),
        body.breast,
        tuple(masses),
        calcifications,
        benign_masses=tuple(benign),
        clusters=tuple(clusters),
        margins=tuple(margins),
        linear_densities=tuple(linear),
    )


def _draw_findings(
    rng: np.random.Generator,
    image: np.ndarray,
    grid: _Grid,
    body: _Breast,
    muscle: np.ndarray,
    gland: np.ndarray,
    dense: np.ndarray,
    findings: Sequence[Finding],
) -> tuple[list[np.ndarray], list[np.ndarray], list[str], list[np.ndarray]]:
    """Adds `findings` to `image` in the breast outside the muscle, malignant ones first, each
    where it has room (a finding without room is left out): the outlines of the malignant
    lesions, of the benign masses, the malignant lesions' margins, and the linear densities."""
    area = float(body.breast.sum())
    room, step = _room(body.breast & ~muscle)
    masses, benign, margins, linear = [], [], [], []
    placed: list[tuple[float, float, float]] = []  # (y, x, reach) of each finding drawn
    order = sorted(range(len(findings)), key=lambda i: (not findings[i].malignant, i))
    for i in order:
        f = findings[i]
        if f.margin == "linear":
            linear += _add_linear(rng, image, grid, room, step, f, f.area * area, dense)
            continue
        unit, reach = _outline_shape(rng, f.margin)
        # Lesions lie in fatty tissue where they can.
        g = gland[::step, ::step][: room.shape[0], : room.shape[1]]
        prefer = (1.0 - g) ** 2 if f.malignant else None
        r0 = math.sqrt(f.area * area / math.pi)
        spot = _place(rng, room, step, placed, r0, reach, f.malignant, prefer)
        if spot is None:
            continue
        cy, cx, r0 = spot
        placed.append((cy, cx, reach * r0))
        outline = _add_finding(rng, image, grid, (cy, cx), r0, f, unit, reach, dense)
        if f.malignant:
            masses.append(outline)
            margins.append(f.margin)
        else:
            benign.append(outline)
    return masses, benign, margins, linear


def _draw_calcifications(
    rng: np.random.Generator,
    image: np.ndarray,
    grid: _Grid,
    body: _Breast,
    muscle: np.ndarray,
    cluster: bool,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Adds the scattered calcifications and, with `cluster`, a cluster of them to `image`, in
    the breast away from its skin line and outside the muscle: (every calcification's centre
    (C, 2) (y, x), the cluster's outline when it has one)."""
    ys, xs = np.nonzero(body.breast & ~muscle & (body.r < 0.8))
    calcifications = _add_calcifications(rng, image, grid, (ys, xs), body.breast)
    clusters = []
    if cluster:
        dots, hull = _add_cluster(rng, image, grid, (ys, xs), body.breast)
        calcifications = np.concatenate([calcifications, dots])
        if hull is not None:
            clusters.append(hull)
    return calcifications, clusters


def _on_background(
    rng: np.random.Generator, image: np.ndarray, grid: _Grid, body: _Breast
) -> np.ndarray:
    """`image` (H, W) inside the skin line on a dark, slightly uneven detector background."""
    H = grid.shape[0]
    background = 0.012 + 0.006 * (grid.yy / H) + rng.uniform(0.0, 0.004, size=grid.shape)
    return background + (image - background) * body.skin


def _glandular(rng: np.random.Generator, grid: _Grid, body: _Breast, density: float) -> np.ndarray:
    """Glandular (dense) tissue: (H, W) in [0, 1], patches covering about 8% (density 0) to 68%
    (density 1) of the image, fading towards the skin line."""
    field = _smooth_noise(rng, grid.shape, grid.shape[0] / 30)
    threshold = float(scipy.special.ndtri(1.0 - (0.08 + 0.6 * density)))  # field is ~N(0, 1)
    thickness = np.sqrt(np.clip(1.0 - body.r**2, 0.0, 1.0))
    return _smoothstep((field - threshold) / 0.8 + 0.5) * np.sqrt(thickness)


def _room(allowed: np.ndarray) -> tuple[np.ndarray, int]:
    """How far each pixel lies from the nearest pixel outside `allowed` (H, W) bool or outside the
    image, on a grid of every `step`-th pixel (about 128 rows): (h, w) float64 in pixels, step."""
    step = max(1, allowed.shape[0] // 128)
    small = np.pad(allowed[::step, ::step], 1)
    return scipy.ndimage.distance_transform_edt(small)[1:-1, 1:-1] * step - step, step


def _place(
    rng: np.random.Generator,
    room: np.ndarray,
    step: int,
    placed: list[tuple[float, float, float]],
    r0: float,
    reach: float,
    required: bool,
    prefer: np.ndarray | None = None,
) -> tuple[float, float, float] | None:
    """A centre (y, x) for a finding of radius `r0` (reaching `reach` * r0) that fits inside the
    breast and clear of the findings `placed`; the radius shrinks (to 85%, up to 10 times) until
    one is found. Returns (y, x, r0), or None when none fits and the finding is not `required`
    (a required one then goes to the roomiest place, overlapping others). `prefer` (like `room`,
    >= 0) weights the places where it fits (default: all alike)."""
    yy, xx = np.nonzero(room >= 0)
    free = room[yy, xx]
    weight = np.ones(len(yy)) if prefer is None else prefer[yy, xx] + 0.02
    cy, cx = yy * step, xx * step
    for _ in range(11):
        ok = free >= reach * r0
        for py, px, pr in placed:
            ok &= (cy - py) ** 2 + (cx - px) ** 2 >= (1.1 * (pr + reach * r0)) ** 2
        if ok.any():
            w = weight * ok
            k = rng.choice(len(w), p=w / w.sum())
            return float(cy[k]), float(cx[k]), r0
        r0 *= 0.85
    if not required:
        return None
    k = int(np.argmax(free))
    return float(cy[k]), float(cx[k]), max(1.0, min(r0, free[k] / reach))


def _outline_shape(
    rng: np.random.Generator, margin: str
) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """A finding's outline for radius 1: radius(angle) enclosing an area of pi, and how far it
    reaches at most. A benign mass is an oval; a malignant lesion is lobulated, more irregular
    when ill-defined."""
    if margin == "benign":  # an oval
        q, phi = rng.uniform(0.6, 1.0), rng.uniform(0.0, np.pi)  # semi-axes 1/sqrt(q), sqrt(q)

        def unit(t: np.ndarray) -> np.ndarray:
            return 1.0 / np.sqrt(q * np.cos(t - phi) ** 2 + np.sin(t - phi) ** 2 / q)

        return unit, 1.0 / math.sqrt(q)
    orders = (2, 3, 4, 5, 7) + ((9, 11, 13) if margin == "ill-defined" else ())
    top = 0.06 if margin == "spiculated" else 0.09
    harmonics = [(h, rng.uniform(0.02, top), rng.uniform(0, 2 * np.pi)) for h in orders]

    def lobulated(t: np.ndarray) -> np.ndarray:
        return 1.0 + sum(a * np.sin(h * t + p) for h, a, p in harmonics)

    t = np.linspace(0.0, 2 * np.pi, 256, endpoint=False)
    r = lobulated(t)
    scale = 1.0 / math.sqrt(float(np.mean(r**2)))  # the area, pi * mean(r^2), becomes pi

    def unit(t: np.ndarray) -> np.ndarray:
        return scale * lobulated(t)

    return unit, scale * float(r.max())


_EDGE = {
    "benign": 0.06,
    "circumscribed": 0.12,
    "spiculated": 0.18,
    "ill-defined": 0.5,
}


def _add_finding(
    rng: np.random.Generator,
    image: np.ndarray,
    grid: _Grid,
    centre: tuple[float, float],
    r0: float,
    finding: Finding,
    unit: Callable[[np.ndarray], np.ndarray],
    reach: float,
    dense: np.ndarray,
) -> np.ndarray:
    """Adds `finding` of radius `r0` at `centre` to `image`, which holds the brightness `dense`
    (H, W) of glandular tissue: where that is brighter than the finding, the finding adds nothing
    (dense tissue hides it). Returns its outline (48, 2) (y, x)."""
    cy, cx = centre
    edge = _EDGE[finding.margin] * r0 + 0.5
    spicule = rng.uniform(1.0, 2.2) * r0 if finding.margin == "spiculated" else 0.0
    win = _window(centre, reach * r0 + edge + spicule + 1, grid.shape)
    wy, wx = grid.yy[win[0]] - cy, grid.xx[:, win[1]] - cx
    dist = np.hypot(wy, wx)
    rad = r0 * unit(np.arctan2(wy, wx))
    inside = _smoothstep((rad - dist) / edge + 0.5)
    # Every kind is dome-shaped and mottled by the same amount (so that the image's histogram
    # does not tell lesions from linear densities): finely, or coarsely in a benign mass.
    grain = r0 / 1.5 if finding.margin == "benign" else r0 / _FINE_GRAIN
    speckle = _smooth_noise(rng, inside.shape, max(1.0, grain))
    dome = 1.0 - _DOME * np.clip(dist / rad, 0.0, 1.0) ** 2
    look = inside * dome * (1.0 + _MOTTLE * speckle) / (1.0 - _DOME / 2)
    if spicule:
        rays = _spicules(rng, wy, wx, r0, reach * r0 + spicule)
        look += _SPICULE_BRIGHTNESS * rays * (1.0 - inside)
    if finding.margin == "benign":
        look *= _BENIGN_GAIN
        if rng.random() < 0.5:  # a dark (fatty) halo around it
            look -= 0.25 * np.exp(-(((dist - rad - edge) / (0.1 * r0 + 1.0)) ** 2)) * (dist > rad)
    add, under = finding.contrast * look, dense[win]
    image[win] += np.where(add > 0, np.maximum(add, under) - under, add)
    t = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    rr = r0 * unit(t)
    return np.stack([cy + rr * np.sin(t), cx + rr * np.cos(t)], axis=1)


def _add_linear(
    rng: np.random.Generator,
    image: np.ndarray,
    grid: _Grid,
    room: np.ndarray,
    step: int,
    finding: Finding,
    pixels: float,
    dense: np.ndarray,
) -> list[np.ndarray]:
    """Adds a linear density: thin straight strands (ducts, trabeculae) inside the breast, of
    `pixels` area in all, each with the brightness distribution of a lesion of the same contrast
    (a profile falling by _DOME from its axis to its edges, the same fine mottling), hidden where
    `dense` is brighter. Returns the strands' outlines, (4, 2) (y, x) rectangles."""
    H = grid.shape[0]
    width = max(1.5, H / 60)
    half = width / 2
    ys, xs = np.nonzero(room >= half + 1)
    left, outlines = pixels / width, []  # the length still to draw
    for _ in range(60):
        if left < 2 * width or not len(ys):
            break
        k = int(rng.integers(len(ys)))
        y0, x0 = float(ys[k] * step), float(xs[k] * step)
        angle = rng.uniform(0.0, np.pi)
        c, s = math.cos(angle), math.sin(angle)
        t = np.arange(0.0, min(left, rng.uniform(0.1, 0.3) * H), step)
        iy, ix = (
            np.round((y0 + t * s) / step).astype(int),
            np.round((x0 + t * c) / step).astype(int),
        )
        fits = (iy >= 0) & (iy < room.shape[0]) & (ix >= 0) & (ix < room.shape[1])
        fits[fits] = room[iy[fits], ix[fits]] >= half + 1
        length = float(t[np.argmin(fits)] if not fits.all() else t[-1])
        if length < 2 * width:
            continue
        ends = np.array([[y0, x0], [y0 + length * s, x0 + length * c]])
        centre = ends.mean(axis=0)
        win = _window((centre[0], centre[1]), length / 2 + width + 1, grid.shape)
        wy, wx = grid.yy[win[0]] - y0, grid.xx[:, win[1]] - x0
        along, across = wx * c + wy * s, np.abs(wy * c - wx * s)
        inside = _smoothstep(half - across + 0.5) * (along >= 0) * (along <= length)
        speckle = _smooth_noise(rng, inside.shape, max(1.0, half))
        profile = 1.0 - _DOME * np.clip(across / half, 0.0, 1.0)
        add = finding.contrast * inside * profile * (1.0 + _MOTTLE * speckle) / (1.0 - _DOME / 2)
        under = dense[win]
        image[win] += np.where(add > 0, np.maximum(add, under) - under, add)
        normal = np.array([c, -s]) * half  # (y, x) across the strand
        outlines.append(
            np.array([ends[0] + normal, ends[1] + normal, ends[1] - normal, ends[0] - normal])
        )
        left -= length
    return outlines


def _spicules(
    rng: np.random.Generator, wy: np.ndarray, wx: np.ndarray, r0: float, length: float
) -> np.ndarray:
    """10-20 thin straight lines radiating from a lesion's core out to about `length` from its
    centre, fading outwards: (h, w) in [0, 1] over the window (wy (h, 1), wx (1, w) offsets)."""
    width = max(0.7, _SPICULE_WIDTH * r0)
    out = np.zeros(np.broadcast_shapes(wy.shape, wx.shape))
    for angle in rng.uniform(0.0, 2 * np.pi, int(rng.integers(10, 21))):
        c, s = math.cos(angle), math.sin(angle)
        along = wx * c + wy * s
        reach = rng.uniform(0.6, 1.0) * length
        fade = np.clip((reach - along) / (reach - 0.6 * r0), 0.0, 1.0) * (along > 0.6 * r0)
        np.maximum(out, np.exp(-((wy * c - wx * s) ** 2) / (2 * width**2)) * fade, out=out)
    return out


def _add_cluster(
    rng: np.random.Generator,
    image: np.ndarray,
    grid: _Grid,
    places: tuple[np.ndarray, np.ndarray],
    breast: np.ndarray,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Adds a cluster of 6-20 calcifications around one of `places`; returns their centres
    (C, 2) (y, x) and the cluster's outline (its convex hull, widened by 2 pixels), or None when
    fewer than three dots landed in the breast."""
    H, W = grid.shape
    ys, xs = places
    k = int(rng.integers(len(ys)))
    spread = rng.uniform(0.006, 0.02) * H
    dots = np.array([ys[k], xs[k]]) + rng.normal(0.0, spread, (int(rng.integers(6, 21)), 2))
    dots = np.clip(dots, [0, 0], [H - 1, W - 1])
    dots = dots[breast[np.round(dots[:, 0]).astype(int), np.round(dots[:, 1]).astype(int)]]
    for cyx in dots:
        rc = rng.uniform(0.3, 0.8) * max(1.0, H / 256)
        win = _window((cyx[0], cyx[1]), rc + 1, grid.shape)
        dot = (grid.yy[win[0]] - cyx[0]) ** 2 + (grid.xx[:, win[1]] - cyx[1]) ** 2 <= rc**2
        image[win][dot & breast[win]] = _CALC_LEVEL
        image[int(round(cyx[0])), int(round(cyx[1]))] = _CALC_LEVEL
    try:
        hull = dots[scipy.spatial.ConvexHull(dots).vertices]
    except (scipy.spatial.QhullError, ValueError):  # fewer than 3 dots, or all in a line
        return dots, None
    centre = hull.mean(axis=0)
    offset = hull - centre
    hull = centre + offset * (1.0 + 2.0 / np.maximum(np.hypot(*offset.T), 1e-9))[:, None]
    return dots, hull


def _stratified(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Values in [0, 1), evenly spread within each class (one per stratum), in random order."""
    out = np.empty(len(labels))
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        k = len(idx)
        out[idx] = (rng.permutation(k) + rng.random(k)) / max(k, 1)
    return out


def _choose(rng: np.random.Generator, table: Sequence[tuple[str, float]]) -> str:
    values, weights = zip(*table, strict=True)
    return str(rng.choice(values, p=np.array(weights) / sum(weights)))


def write_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    patient_id: str = "",
    laterality: str = "",
    view: str = "",
    uid_seed: str = "",
    **elements: object,
) -> Path:
    """Write a single-frame grayscale mammogram as an uncompressed DICOM file with proper file meta.

    Args:
      path: the file to write.
      pixels: (H, W) uint8, uint16, int8 or int16 stored values.
      photometric: "MONOCHROME2" (high values bright) or "MONOCHROME1" (high values dark).
      bits_stored: significant bits (default: all bits of the dtype).
      patient_id, laterality, view: written as PatientID, ImageLaterality, ViewPosition.
      uid_seed: UIDs are derived from it, so the same call writes the same bytes.
      **elements: further data elements by keyword, e.g. WindowCenter=1500, RescaleSlope=2.

    Returns:
      The path written.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16, np.int8, np.int16):
        raise ValueError(
            f"pixels must be (H, W) 8- or 16-bit integers, got {pixels.dtype} {pixels.shape}"
        )
    bits = pixels.dtype.itemsize * 8
    stored = bits if bits_stored is None else int(bits_stored)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _MAMMOGRAPHY_FOR_PRESENTATION
    name = Path(path).name
    meta.MediaStorageSOPInstanceUID = generate_uid(_UID_PREFIX, [uid_seed, name, "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _UID_PREFIX + "1"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(_UID_PREFIX, [patient_id or uid_seed + name, "study"])
    ds.SeriesInstanceUID = generate_uid(_UID_PREFIX, [uid_seed, name, "series"])
    ds.Modality = "MG"
    ds.PatientID = patient_id
    ds.PatientName = "Synthetic^Anonymous"
    ds.StudyDate = "20100101"
    if laterality:
        ds.ImageLaterality = laterality
    if view:
        ds.ViewPosition = view
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    ds.BitsStored = stored
    ds.HighBit = stored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def _roi(name: str, points_yx: np.ndarray, index: int, spacing: float) -> dict:
    pts = [f"({x:.6f}, {y:.6f})" for y, x in points_yx]
    mm = [f"({x * spacing:.6f}, {y * spacing:.6f}, 0.000000)" for y, x in points_yx]
    cy, cx = points_yx.mean(axis=0)
    if len(points_yx) >= 3:
        y, x = points_yx[:, 0], points_yx[:, 1]
        area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
    else:
        area = 0.0
    return {
        "Area": area * spacing**2,
        "Center": f"({cx * spacing:.6f}, {cy * spacing:.6f}, 0.000000)",
        "IndexInImage": index,
        "Name": name,
        "NumberOfPoints": len(pts),
        "Point_mm": mm,
        "Point_px": pts,
        "Type": 15 if len(points_yx) >= 3 else 19,
    }


def _write_xml(path: Path, shape: tuple[int, int], image: SyntheticImage, spacing: float) -> None:
    rois = [_roi("Mass", m, i, spacing) for i, m in enumerate(image.masses)]
    for c in image.calcifications:
        rois.append(_roi("Calcification", c[None, :], len(rois), spacing))
    for m in image.benign_masses:  # hard style only: the easy style's XML is as it was
        rois.append(_roi(BENIGN_MASS, m, len(rois), spacing))
    for m in image.clusters:
        rois.append(_roi("Cluster", m, len(rois), spacing))
    for m in image.linear_densities:
        rois.append(_roi(LINEAR_DENSITY, m, len(rois), spacing))
    plist = {
        "Images": [
            {
                "ImageHeight": shape[0],
                "ImageIndex": 0,
                "ImageWidth": shape[1],
                "NumberOfROIs": len(rois),
                "ROIs": rois,
            }
        ]
    }
    with open(path, "wb") as f:
        plistlib.dump(plist, f, fmt=plistlib.FMT_XML)


def _image_names(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.suffix.lower() in (".dcm", ".png", ".tif")]


def _foreign(out: Path, slots: list[_Slot]) -> str | None:
    """The first thing in `out` that writing `slots` there would not have written (named
    relative to `out`), None if there is none. Hidden files (.DS_Store) do not count. An
    INbreast.csv counts unless every image it names is one of `slots` and all of them are in
    AllDICOMs/ (a previous complete run's: it is written last)."""
    if not out.is_dir():
        return None
    own = {"AllDICOMs": {s.name for s in slots}, "AllXML": {f"{s.file_id}.xml" for s in slots}}
    for entry in sorted(out.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.name in own and entry.is_dir():
            extra = sorted(
                p.name
                for p in entry.iterdir()
                if not p.name.startswith(".") and (p.name not in own[entry.name] or p.is_dir())
            )
            if extra:
                return f"{entry.name}/{extra[0]}"
        elif entry.name != "INbreast.csv" or entry.is_dir():
            return entry.name
    table = out / "INbreast.csv"
    if table.exists():
        try:
            with open(table, newline="", encoding="utf-8") as f:
                names = {row.get("File Name") for row in csv.DictReader(f, delimiter=";")}
        except (OSError, UnicodeDecodeError, csv.Error):
            names = None
        dicoms = out / "AllDICOMs"
        complete = dicoms.is_dir() and own["AllDICOMs"] <= set(_image_names(dicoms))
        if names != {s.file_id for s in slots} or not complete:
            return "INbreast.csv"
    return None


def write_synthetic_inbreast(
    out_dir: str | os.PathLike,
    *,
    num_images: int = 80,
    seed: int = 0,
    image_shape: tuple[int, int] = (512, 416),
    style: str = "easy",
    overwrite: bool = False,
) -> Path:
    """Write a synthetic INbreast (AllDICOMs/, AllXML/, INbreast.csv) under `out_dir`.

    Args:
      out_dir: created if missing. What this call writes may be there already (a previous
        run's, complete or interrupted) and is overwritten; anything else in it (another file or
        folder, an INbreast.csv of other images) makes it refuse with DataError, and so do other
        images in its AllDICOMs/ (another seed, or real data), even with `overwrite`.
      num_images: images in all, four per woman (the last woman may have fewer).
      seed: every random choice follows from it; the same seed writes the same bytes.
      image_shape: (H, W) of each image (INbreast's are 4084 x 3328 or 3328 x 2560).
      style: "easy" (one bright lesion, the quick default) or "hard" (lesions of many sizes and
        margins among benign masses of the same size and brightness; see the module docstring).
      overwrite: write into a folder that holds files this call does not write, replacing its
        INbreast.csv.

    Returns:
      The folder, to pass to `data_pipeline.inbreast.read_inbreast` or as manual_dir.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    H, W = image_shape
    if min(H, W) < 64:
        raise ValueError(f"image_shape must be at least 64 x 64, got {image_shape}")
    out = Path(out_dir)
    dicoms, xmls = out / "AllDICOMs", out / "AllXML"
    rng = np.random.default_rng(seed)
    slots = _plan(rng, num_images)
    if style == "hard":  # drawn after the easy plan, which stays as it was
        slots = _plan_findings(rng, slots)
    others = sorted(set(_image_names(dicoms)) - {s.name for s in slots}) if dicoms.is_dir() else []
    if others:
        raise DataError(
            f"{dicoms}: holds {len(others)} image(s) this call would not write (e.g. {others[0]}), "
            "from another seed or size, or real data; write into an empty folder instead."
        )
    foreign = None if overwrite else _foreign(out, slots)
    if foreign is not None:
        raise DataError(
            f"{out}: holds {foreign}, which data_pipeline.synthetic did not write; write into an "
            "empty or new folder, or pass --overwrite (overwrite=True) to write there anyway."
        )
    dicoms.mkdir(parents=True, exist_ok=True)
    xmls.mkdir(parents=True, exist_ok=True)
    rows = [_write_image(out, slot, seed, i, (H, W), style) for i, slot in enumerate(slots)]
    with open(out / "INbreast.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=";", lineterminator="\r\n")
        writer.writerow(_HEADER)
        writer.writerows(rows)
    return out


@dataclass(frozen=True)
class _Slot:
    """One image to write: whose, which breast and view, its label and BI-RADS, and where its
    breast's size and brightness fall in their ranges."""

    file_id: str
    name: str
    patient: str
    laterality: str
    view: str
    label: int
    birads: str
    size: float
    brightness: float
    density: float = 0.0
    findings: tuple[Finding, ...] = ()


def _plan(rng: np.random.Generator, num_images: int) -> list[_Slot]:
    """Who is who: four images per woman; a lesion is in one breast (about a quarter of them),
    seen in both views; size and brightness stratified within each class."""
    n_patients = -(-num_images // 4)
    patients = [rng.bytes(8).hex() for _ in range(n_patients)]
    slots = [(p, lat, view) for p in range(n_patients) for lat, view in _VIEWS][:num_images]
    breasts = sorted({(p, lat) for p, lat, _ in slots})
    n_pos = max(1, round(0.25 * len(breasts))) if len(breasts) > 1 else 0
    positive = {breasts[i] for i in rng.permutation(len(breasts))[:n_pos]}
    labels = np.array([int((p, lat) in positive) for p, lat, _ in slots])
    birads_of = {
        b: _choose(rng, _POSITIVE_BIRADS if b in positive else _NEGATIVE_BIRADS) for b in breasts
    }
    size = _stratified(rng, labels)
    brightness = _stratified(rng, labels)
    first_id = 20000000 + int(rng.integers(0, 10**7))
    return [
        _Slot(
            file_id=str(first_id + 24 * i),
            name=f"{first_id + 24 * i}_{patients[p]}_MG_{lat}_{view}_ANON.dcm",
            patient=patients[p],
            laterality=lat,
            view=view,
            label=int(labels[i]),
            birads=birads_of[(p, lat)],
            size=float(size[i]),
            brightness=float(brightness[i]),
        )
        for i, (p, lat, view) in enumerate(slots)
    ]


def _plan_findings(rng: np.random.Generator, slots: list[_Slot]) -> list[_Slot]:
    """The hard style's plan per breast (both views share it): its density (stratified within
    each class) and its findings, whose count, sizes and brightness are drawn alike in both
    classes; in a positive breast the first one to three of them are malignant."""
    breasts = sorted({(s.patient, s.laterality): s.label for s in slots}.items())
    density = _stratified(rng, np.array([label for _, label in breasts]))
    lo, hi = HARD_LESION_AREA
    plan = {}
    for (breast, label), d in zip(breasts, density, strict=True):
        count = int(_choose(rng, _FINDINGS_PER_BREAST))
        special = int(rng.integers(1, count + 1))  # malignant if positive, else linear densities
        findings = []
        for i in range(count + int(rng.random() < _EXTRA_LINEAR)):
            area = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            contrast = rng.uniform(*HARD_CONTRAST)
            margin = str(rng.choice(MARGINS, p=_MARGIN_WEIGHTS))
            if i >= count:  # in both classes alike
                margin = "linear"
            elif i >= special:
                margin = "benign"
            elif not label:
                margin = "linear"
            findings.append(Finding(margin in MARGINS, area, margin, contrast))
        findings = tuple(findings)
        plan[breast] = (float(d), findings)
    return [
        dataclasses.replace(s, density=plan[s.patient, s.laterality][0], findings=f)
        for s in slots
        for f in [plan[s.patient, s.laterality][1]]
    ]


def _write_image(
    out: Path, slot: _Slot, seed: int, index: int, shape: tuple[int, int], style: str
) -> list:
    """Draws image `index` (its own generator, from the seed and the index), writes its DICOM
    and its XML (if it has findings) and returns its INbreast.csv row."""
    H, W = shape
    spacing = 0.07 * 4084 / H  # mm per pixel: INbreast's 70 microns at its 4084 rows
    image_rng = np.random.default_rng([seed, index])
    if style == "hard":
        image = synthesize_hard_image(
            image_rng,
            shape=shape,
            laterality=slot.laterality,
            view=slot.view,
            size=slot.size,
            brightness=slot.brightness,
            density=slot.density,
            findings=slot.findings,
            marker=bool(image_rng.random() < 0.4),
            cluster=bool(image_rng.random() < _CLUSTER_PROBABILITY),
        )
    else:
        image = synthesize_image(
            image_rng,
            shape=shape,
            laterality=slot.laterality,
            view=slot.view,
            lesion=bool(slot.label),
            size=slot.size,
            brightness=slot.brightness,
            marker=bool(image_rng.random() < 0.4),
            faint_blob=bool(image_rng.random() < 0.35),
        )
    stored = np.round(image.image * _MAX_STORED).astype(np.uint16)
    photometric = "MONOCHROME1" if image_rng.random() < 0.2 else "MONOCHROME2"
    if photometric == "MONOCHROME1":
        stored = _MAX_STORED - stored
    write_dicom(
        out / "AllDICOMs" / slot.name,
        stored,
        photometric=photometric,
        bits_stored=12,
        patient_id=slot.patient,
        laterality=slot.laterality,
        view=slot.view,
        uid_seed=f"{seed}-{slot.file_id}",
        PixelSpacing=[spacing, spacing],
    )
    if image.masses or len(image.calcifications) or image.benign_masses or image.clusters:  # noqa
        _write_xml(out / "AllXML" / f"{slot.file_id}.xml", (H, W), image, spacing)
    date = f"2010{int(image_rng.integers(1, 13)):02d}"
    acr = str(int(image_rng.integers(1, 5)))
    if style == "hard":  # ACR density 1-4 from the breast's drawn density
        acr = str(1 + min(3, int(4 * slot.density)))
    return ["removed", "removed", slot.laterality, slot.view, date, slot.file_id, acr, slot.birads]


def _main(argv: Sequence[str]) -> None:
    from absl import flags, logging

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    # Flags first; then one line per error, no traceback.
    if f.num_images < 1:
        raise SystemExit(f"error: --num_images={f.num_images}: write at least one image")
    for name in ("height", "width"):
        if f[name].value < 64:
            raise SystemExit(
                f"error: --{name}={f[name].value}: images must be at least 64 pixels a side"
            )
    if f.style not in STYLES:
        raise SystemExit(f"error: --style={f.style}: choose one of {', '.join(STYLES)}")
    try:
        out = write_synthetic_inbreast(
            f.out,
            num_images=f.num_images,
            seed=f.seed,
            image_shape=(f.height, f.width),
            style=f.style,
            overwrite=f.overwrite,
        )
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:
        raise SystemExit(f"error: --out={f.out}: cannot write there ({e})") from None
    logging.info("wrote %d synthetic mammograms to %s", f.num_images, out)
    print(out)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("out", None, "Folder to write AllDICOMs/, AllXML/ and INbreast.csv into.")
    flags.DEFINE_integer("num_images", 80, "Number of images (four per woman: L/R x CC/MLO).")
    flags.DEFINE_integer("seed", 0, "Seed of every random choice; the same seed, the same files.")
    flags.DEFINE_integer("height", 512, "Image height in pixels (INbreast: 4084).")
    flags.DEFINE_integer("width", 416, "Image width in pixels (INbreast: 3328).")
    flags.DEFINE_string(
        "style",
        "easy",
        "easy: one bright lesion per positive breast (the quick default); hard: lesions of many "
        "sizes and margins among benign masses alike in size and brightness, in both classes.",
    )
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Write into --out even if it holds files this program did not write (its INbreast.csv "
        "is replaced).",
    )
    flags.mark_flag_as_required("out")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(_main)
