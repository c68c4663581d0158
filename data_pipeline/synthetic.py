"""A synthetic INbreast: the same file layout, at a reduced size, with a signal only in the lesion.

    python -m data_pipeline.synthetic --out=DIR [--num_images=80] [--seed=0]

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
"""

from __future__ import annotations

import csv
import math
import os
import plistlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.filters
import skimage.transform
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from data_pipeline.errors import DataError

__all__ = ["SyntheticImage", "synthesize_image", "write_dicom", "write_synthetic_inbreast"]

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


@dataclass(frozen=True)
class SyntheticImage:
    """One generated mammogram before it is written.

    Attributes:
      image: (H, W) float64 display intensities in [0, 1] (background near 0).
      breast: (H, W) bool, the breast.
      masses: lesion outlines, each (P, 2) float64 (y, x) in pixels.
      calcifications: (C, 2) float64 (y, x) centres of the calcification-like dots.
    """

    image: np.ndarray
    breast: np.ndarray
    masses: tuple[np.ndarray, ...]
    calcifications: np.ndarray


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


def write_synthetic_inbreast(
    out_dir: str | os.PathLike,
    *,
    num_images: int = 80,
    seed: int = 0,
    image_shape: tuple[int, int] = (512, 416),
) -> Path:
    """Write a synthetic INbreast (AllDICOMs/, AllXML/, INbreast.csv) under `out_dir`.

    Args:
      out_dir: created if missing. Files of the same names are overwritten; other images in its
        AllDICOMs/ (another seed, or real data) make it refuse with DataError.
      num_images: images in all, four per woman (the last woman may have fewer).
      seed: every random choice follows from it; the same seed writes the same bytes.
      image_shape: (H, W) of each image (INbreast's are 4084 x 3328 or 3328 x 2560).

    Returns:
      The folder, to pass to `data_pipeline.inbreast.read_inbreast` or as manual_dir.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    H, W = image_shape
    if min(H, W) < 64:
        raise ValueError(f"image_shape must be at least 64 x 64, got {image_shape}")
    out = Path(out_dir)
    dicoms, xmls = out / "AllDICOMs", out / "AllXML"
    slots = _plan(np.random.default_rng(seed), num_images)
    others = sorted(set(_image_names(dicoms)) - {s.name for s in slots}) if dicoms.is_dir() else []
    if others:
        raise DataError(
            f"{dicoms}: holds {len(others)} image(s) this call would not write (e.g. {others[0]}), "
            "from another seed or size, or real data; write into an empty folder instead."
        )
    dicoms.mkdir(parents=True, exist_ok=True)
    xmls.mkdir(parents=True, exist_ok=True)
    rows = [_write_image(out, slot, seed, i, (H, W)) for i, slot in enumerate(slots)]
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


def _write_image(out: Path, slot: _Slot, seed: int, index: int, shape: tuple[int, int]) -> list:
    """Draws image `index` (its own generator, from the seed and the index), writes its DICOM
    and its XML (if it has findings) and returns its INbreast.csv row."""
    H, W = shape
    spacing = 0.07 * 4084 / H  # mm per pixel: INbreast's 70 microns at its 4084 rows
    image_rng = np.random.default_rng([seed, index])
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
    if image.masses or len(image.calcifications):
        _write_xml(out / "AllXML" / f"{slot.file_id}.xml", (H, W), image, spacing)
    date = f"2010{int(image_rng.integers(1, 13)):02d}"
    acr = str(int(image_rng.integers(1, 5)))
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
    try:
        out = write_synthetic_inbreast(
            f.out, num_images=f.num_images, seed=f.seed, image_shape=(f.height, f.width)
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
    flags.mark_flag_as_required("out")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(_main)
