"""Mammogram decoding and preprocessing: one file in, one (h, w) float32 image in [0, 1] out.

The steps, shared by every data source, training and prediction (`preprocess_file`):

1. decode (`read_image`): DICOM through pydicom with the modality LUT (rescale) and the VOI LUT
   (window or LUT table), MONOCHROME1 inverted, any bit depth, uncompressed or compressed (JPEG
   baseline/extended/lossless, JPEG-LS, JPEG 2000 through pydicom's pylibjpeg plugins, RLE);
   or an image file: PNG, TIFF, binary PGM/PPM (8 or 16 bit; mini-MIAS's films) and JPEG, with
   colour converted to grey (luminance). The displayed values are rescaled so that the image's
   darkest value is 0 and its brightest is 1.
2. breast mask, on a downsampled copy (long side about `mask_size` pixels), robust to what
   scanned films add around the breast (`data_pipeline.synthetic_film` draws it):
   a. Otsu's threshold (see `_otsu`); when Otsu separates only a bright plateau (wide film edges
      and labels), Otsu's threshold within the darker class instead (`_threshold`);
   b. film edges dropped: bright, flat lines along a side of the image (`_drop_border_strips`);
   c. the breast detached: an opening (radius 1.5% of the long side) cuts thin strips and
      bridges that join labels and markers to the breast, its largest component is the breast,
      and the mask's pixels near it are put back (`_detach`);
   d. holes filled (background regions enclosed by the breast, or by it and the chest wall).
   Pixels outside the (slightly dilated) mask are set to 0. On a digital mammogram with a smooth
   outline and nothing joined to the breast this is the largest Otsu component with its holes
   filled, as before (the same crops on the synthetic INbreast sets); protrusions of a ragged
   outline thinner than the opening and longer than its radius are trimmed.
3. crop to the mask's bounding box (in original pixels).
4. optional horizontal flip, so that every breast has its chest wall on the LEFT of the image.
   The side is read from the image, never from metadata: the side whose outermost columns the
   breast covers more (the chest wall cuts it; the nipple side is its tip), or when that is
   close (a breast filling the frame) the half holding more breast tissue.
5. resize with anti-aliasing to `size` (227 x 227 in the paper): integer block averaging first,
   then `skimage.transform.resize` on the small remainder, which keeps full-size mammograms fast.

`Geometry` records the crop and the flip, and maps points exactly between original and preprocessed
pixel coordinates (pixel centres at integer coordinates; (y, x) order). `mass_boxes` turns lesion
outlines into boxes in the preprocessed image, dropping (with a warning) outlines that lie mostly
outside their image.

Limits (module constants): every decoder reads the image's dimensions from its header first and
refuses more than `MAX_PIXELS` (100 megapixels; a full-field mammogram is 10-40) before decoding,
so a small compressed file cannot expand into gigabytes (for compressed DICOM pixel data, both
the DICOM header's size and the codestream's own, which must agree); preprocessing refuses an
image with a side under `MIN_SIDE` (32 pixels; even 200-micron scans are over 1000 pixels a side,
and the synthetic data's reduced images are at least 64), which cannot be a mammogram.

Speed: for 16-bit DICOMs the LUTs are evaluated once per possible stored value (65536 entries) and
applied by table lookup, and only the crop is ever converted to float32 (measure it with
`python -m deepmil_jax.benchmark --parts=preprocess`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging as std_logging
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.pixels
import scipy.ndimage as ndi
import skimage.filters
import skimage.io
import skimage.measure
import skimage.morphology
import skimage.transform
from absl import logging

from data_pipeline.errors import DataError

__all__ = [
    "DICOM_SUFFIXES",
    "MAX_PIXELS",
    "MIN_OUTLINE_INSIDE",
    "MIN_SIDE",
    "RASTER_SUFFIXES",
    "Geometry",
    "PreprocessConfig",
    "mass_boxes",
    "outline_inside_fraction",
    "outlines_inside",
    "preprocess_file",
    "preprocess_image",
    "read_image",
]

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})
RASTER_SUFFIXES = frozenset({".png", ".tif", ".tiff", ".pgm", ".ppm", ".pnm", ".jpg", ".jpeg"})

# The most pixels (rows x columns) a decoder accepts, read from the file's header before any pixel
# data is decoded. Full-field mammograms are 10-40 megapixels (INbreast 4084 x 3328 = 13.6).
MAX_PIXELS = 100_000_000
# The least side (pixels) of an image that preprocessing accepts: smaller is no mammogram (a
# thumbnail, an icon, a 2 x 2 test image). The synthetic data's reduced images are at least 64.
MIN_SIDE = 32
# An outline is kept when at least this fraction of its bounding box (each point counting as its
# pixel) lies inside the original image; one mostly outside is a damaged or mismatched outline.
MIN_OUTLINE_INSIDE = 0.5

_DECODER_HELP = (
    "Install a decoder (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or "
    "pip install python-gdcm) or decompress the file first (gdcmconv --raw IN OUT, or "
    "dcmdjpeg IN OUT)."
)
# The packages (dependencies of this project) that decode each compressed transfer syntax that
# public mammography collections use, through pydicom's pylibjpeg plugin; RLE needs none.
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS Near Lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
}
# Start-of-frame markers of JPEG (SOF0-3, 5-7, 9-11, 13-15) and JPEG-LS (SOF55).
_JPEG_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC)}) | frozenset(
    {*range(0xCD, 0xD0), 0xF7}
)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a mammogram becomes a network input.

    Attributes:
      size: (h, w) of the output; the paper resizes every cropped breast to 227 x 227 (AlexNet's
        input).
      flip: flip horizontally so that the chest wall is on the LEFT of every image.
      mask_size: long side, in pixels, of the downsampled copy on which Otsu's threshold and the
        connected components are computed (4084-pixel mammograms use every 8th pixel).
    """

    size: tuple[int, int] = (227, 227)
    flip: bool = True
    mask_size: int = 512

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be two positive ints (h, w), got {self.size!r}")
        if self.mask_size < 16:
            raise ValueError(f"mask_size must be at least 16, got {self.mask_size}")


@dataclass(frozen=True)
class Geometry:
    """Where a preprocessed image came from in its original image.

    Coordinates are (y, x) with pixel centres at integers, in both images. A point at original
    (y, x) lands at preprocessed (py, px) with
        py = (y - y0 + 0.5) * h / (y1 - y0) - 0.5
        px = (x - x0 + 0.5) * w / (x1 - x0) - 0.5,  then px -> w - 1 - px if flipped.

    Attributes:
      original_shape: (H, W) of the decoded original image.
      crop: (y0, x0, y1, x1) of the crop box in original pixels, y1 and x1 exclusive.
      flipped: whether the crop was flipped left-right.
      size: (h, w) of the preprocessed image.
    """

    original_shape: tuple[int, int]
    crop: tuple[int, int, int, int]
    flipped: bool
    size: tuple[int, int]

    def _scales(self) -> tuple[float, float]:
        y0, x0, y1, x1 = self.crop
        return self.size[0] / (y1 - y0), self.size[1] / (x1 - x0)

    def from_original(self, points_yx: np.ndarray) -> np.ndarray:
        """Original pixel coordinates (..., 2) (y, x) -> preprocessed ones, (..., 2) float64."""
        p = _points(points_yx)
        sy, sx = self._scales()
        y0, x0, _, _ = self.crop
        py = (p[..., 0] - y0 + 0.5) * sy - 0.5
        px = (p[..., 1] - x0 + 0.5) * sx - 0.5
        if self.flipped:
            px = (self.size[1] - 1) - px
        return np.stack([py, px], axis=-1)

    def to_original(self, points_yx: np.ndarray) -> np.ndarray:
        """Preprocessed pixel coordinates (..., 2) (y, x) -> original ones, (..., 2) float64."""
        p = _points(points_yx)
        sy, sx = self._scales()
        y0, x0, _, _ = self.crop
        px = p[..., 1]
        if self.flipped:
            px = (self.size[1] - 1) - px
        y = (p[..., 0] + 0.5) / sy - 0.5 + y0
        x = (px + 0.5) / sx - 0.5 + x0
        return np.stack([y, x], axis=-1)

    def box_from_original(self, outline_yx: np.ndarray) -> np.ndarray:
        """Bounding box (4,) float32 (y0, x0, y1, x1) in preprocessed pixels of an outline (P, 2).

        The box is clipped to the image, [0, h - 1] x [0, w - 1].
        """
        q = self.from_original(outline_yx).reshape(-1, 2)  # pragma: no mutate (-2 reads as -1)
        if q.shape[0] == 0:
            raise ValueError("an outline needs at least one point")
        h, w = self.size
        lo = np.clip(q.min(axis=0), 0, [h - 1, w - 1])
        hi = np.clip(q.max(axis=0), 0, [h - 1, w - 1])
        return np.array([lo[0], lo[1], hi[0], hi[1]], dtype=np.float32)


def _points(points_yx: np.ndarray) -> np.ndarray:
    p = np.asarray(points_yx, dtype=np.float64)
    if p.ndim == 0 or p.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2) in (y, x) order, got {p.shape}")
    return p


def outline_inside_fraction(outline_yx: np.ndarray, shape: tuple[int, int]) -> float:
    """The fraction of an outline's bounding box that lies inside an image of `shape` (H, W).

    The box spans the outline's points, each counting as its pixel (half a pixel around the
    point), so a one-point outline has a 1 x 1 box; the image spans [-0.5, H - 0.5] x
    [-0.5, W - 0.5] (pixel centres at integers, as in `Geometry`).

    Args:
      outline_yx: (P, 2) points (y, x) in original image pixels, P >= 1.
      shape: (H, W) of the original image.
    """
    q = _points(outline_yx).reshape(-1, 2)  # pragma: no mutate (numpy reads -2 as -1 too)
    if q.shape[0] == 0:
        raise ValueError("an outline needs at least one point")
    lo, hi = q.min(axis=0) - 0.5, q.max(axis=0) + 0.5
    inside_lo = np.maximum(lo, -0.5)
    inside_hi = np.minimum(hi, np.asarray(shape) - 0.5)
    inside = np.prod(np.clip(inside_hi - inside_lo, 0.0, None))
    return float(inside / np.prod(hi - lo))


def outlines_inside(
    outlines: Sequence[np.ndarray],
    shape: tuple[int, int],
    *,
    where: str = "image",  # pragma: no mutate (the name in a warning)
) -> tuple[np.ndarray, ...]:
    """The outlines (each (P, 2) (y, x) in original pixels) that belong to an image of `shape`.

    An outline with no points is skipped; one whose bounding box lies mostly outside the image
    (less than `MIN_OUTLINE_INSIDE`, one half, of it inside; see `outline_inside_fraction`) is
    dropped with a warning naming `where`: it is damaged or belongs to another image, and
    clipping it would make a box in the image's corner or edge that marks no lesion.
    """
    kept = []
    for i, outline in enumerate(outlines):
        if len(outline) == 0:
            continue
        fraction = outline_inside_fraction(outline, shape)
        if fraction < MIN_OUTLINE_INSIDE:
            q = _points(outline).reshape(-1, 2)  # pragma: no mutate (numpy reads -2 as -1 too)
            logging.warning(
                "%s: dropped mass outline %d: only %.0f%% of its bounding box (y %.1f-%.1f, "
                "x %.1f-%.1f) lies inside the %d x %d image; is the outline file for another "
                "image?",
                where,
                i,
                100 * fraction,
                q[:, 0].min(),
                q[:, 0].max(),
                q[:, 1].min(),
                q[:, 1].max(),
                *shape,
            )
            continue
        kept.append(outline)
    return tuple(kept)


def mass_boxes(
    geometry: Geometry,
    outlines: Sequence[np.ndarray],
    *,
    where: str = "image",  # pragma: no mutate (the name in a warning)
) -> np.ndarray:
    """Boxes (K, 4) float32 (y0, x0, y1, x1) in preprocessed pixels of the outlines that fit.

    Each outline of `outlines_inside(outlines, geometry.original_shape, where=where)` becomes
    `Geometry.box_from_original` (clipped to the image); the others are dropped with a warning.
    """
    kept = outlines_inside(outlines, geometry.original_shape, where=where)
    boxes = [geometry.box_from_original(outline) for outline in kept]
    return np.array(boxes, np.float32).reshape(-1, 4)  # pragma: no mutate (-2 reads as -1)


# --------------------------------------------------------------------------------------------------
# Decoding. A decoded image is either integer stored values with a float32 lookup table that maps
# each possible value to its displayed intensity in [0, 1], or a float32 array in [0, 1].


@dataclass
class _Decoded:
    index: np.ndarray | None  # (H, W) uint8 or uint16, the LUT's index
    lut: np.ndarray | None  # (256,) or (65536,) float32 in [0, 1]
    image: np.ndarray | None  # (H, W) float32 in [0, 1] when there is no LUT

    @property
    def shape(self) -> tuple[int, int]:
        a = self.image if self.image is not None else self.index
        return int(a.shape[0]), int(a.shape[1])

    def region(self, rows: slice, cols: slice) -> np.ndarray:
        """image[rows, cols], float32 (a view of ``image`` when there is no LUT)."""
        if self.image is not None:
            return self.image[rows, cols]
        return np.take(self.lut, self.index[rows, cols])

    def block_mean(self, box: tuple[int, int, int, int], fy: int, fx: int) -> np.ndarray:
        """Means of the fy x fx blocks tiling box (y0, x0, y1, x1): (hb, wb) float32.

        Works through horizontal strips, so no float copy of the whole box is ever made. Sums
        over reshaped axes rather than ``skimage.measure.block_reduce``, which gives the same
        means but reduces over a strided view several times slower, on every image.
        """
        y0, x0, y1, x1 = box
        hb, wb = (y1 - y0) // fy, (x1 - x0) // fx
        out = np.empty((hb, wb), dtype=np.float32)
        step = max(1, 256 // fy)  # block rows per strip  # pragma: no mutate (strip size only)
        for j in range(0, hb, step):  # pragma: no mutate (strips of 1 row: the same values)
            k = min(step, hb - j)
            strip = self.region(slice(y0 + j * fy, y0 + (j + k) * fy), slice(x0, x1))
            # pragma: no mutate start (summing blocks of 1, or reshape(-2), gives the same values)
            if fy > 1:
                strip = strip.reshape(k, fy, -1).sum(axis=1)
            if fx > 1:
                # pragma: no mutate end
                strip = strip.reshape(k, wb, fx).sum(axis=2)
            out[j : j + k] = strip
        out *= 1.0 / (fy * fx)
        return out

    def full(self) -> np.ndarray:
        return self.region(slice(None), slice(None))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if first.endswith(":") and len(text) > 1:  # pydicom: "... all available plugins:", one a line
        first = f"{first} {text[1].strip()}"
    return f"{type(exc).__name__}: {first}".rstrip(": ")


def _is_dicom(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in RASTER_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        raise DataError(f"{path}: cannot open the file ({_describe(e)}); check the path.") from e
    if len(head) == 132 and head[128:] == b"DICM":
        return True
    raise DataError(
        f"{path}: unknown image type {suffix or '(no suffix)'!r}; use DICOM (.dcm) or "
        f"an image file ({', '.join(sorted(RASTER_SUFFIXES))}), 8 or 16 bit grayscale."
    )


def _check_pixels(path: Path, rows: int, cols: int) -> None:
    """Refuse, from the header's numbers and before decoding, more than MAX_PIXELS pixels."""
    if rows * cols > MAX_PIXELS:
        raise DataError(
            f"{path}: the image is {rows} x {cols} pixels ({rows * cols / 1e6:.0f} megapixels), "
            f"more than the {MAX_PIXELS // 10**6}-megapixel cap on a decoded image "
            "(data_pipeline.preprocess.MAX_PIXELS; mammograms are 10-40 megapixels). Downsample "
            "it, or check that the file is not damaged."
        )


def _check_size(path: Path, rows: int, cols: int, samples: int, frames: int) -> None:
    """Refuse, from the header's numbers and before decoding, more than MAX_PIXELS pixels, more
    than 4 samples per pixel or more than one frame."""
    _check_pixels(path, rows, cols)
    if samples > 4:
        raise DataError(
            f"{path}: {samples} samples per pixel; expected a grayscale image (1) or RGB (3). "
            "Save one grayscale image per file."
        )
    if frames > 1:
        raise DataError(
            f"{path}: holds {frames} images (pages or frames); expected one. Save one grayscale "
            "image per file."
        )


def _lut_from(values: np.ndarray, transform, vmin: float, vmax: float, where: Path) -> np.ndarray:
    """`transform` of every possible stored value, normalised by its range over [vmin, vmax]."""
    # pragma: no mutate start (a float32 table gives the same float32 LUT to rounding)
    table = np.asarray(transform(values), dtype=np.float64)
    # pragma: no mutate end
    if table.shape != values.shape or not np.all(np.isfinite(table)):
        raise DataError(f"{where}: the modality/VOI LUT gives non-finite or misshaped values.")
    present = np.arange(int(vmin), int(vmax) + 1).astype(values.dtype).view(_UNSIGNED[values.dtype])
    lo, hi = table[present].min(), table[present].max()
    if hi <= lo:
        raise DataError(
            f"{where}: the image is blank (every pixel shows the same value); "
            "remove it from the data or re-export it."
        )
    out = (table - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


_UNSIGNED = {
    np.dtype(np.uint8): np.uint8,
    np.dtype(np.int8): np.uint8,
    np.dtype(np.uint16): np.uint16,
    np.dtype(np.int16): np.uint16,
}


def _all_values(dtype: np.dtype) -> np.ndarray:
    """Every value of an 8/16-bit integer dtype, ordered by its unsigned bit pattern."""
    unsigned = _UNSIGNED[dtype]
    return np.arange(np.iinfo(unsigned).max + 1).astype(unsigned).view(dtype)


def _from_values(arr: np.ndarray, transform, invert: bool, where: Path) -> _Decoded:
    """Decoded image from stored integer values and a value -> intensity function."""
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise DataError(
            f"{where}: expected one 2-D grayscale image, got an array of shape {arr.shape}."
        )
    if arr.dtype in _UNSIGNED:
        vmin, vmax = int(arr.min()), int(arr.max())
        lut = _lut_from(_all_values(arr.dtype), transform, vmin, vmax, where)
        if invert:
            lut = 1.0 - lut
        return _Decoded(index=arr.view(_UNSIGNED[arr.dtype]), lut=lut, image=None)
    # Any other dtype (32-bit, float, bool): apply directly, in float32 where possible.
    values = np.asarray(transform(arr), dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        raise DataError(f"{where}: the image holds NaN or infinite values; re-export it.")
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise DataError(
            f"{where}: the image is blank (every pixel shows the same value); "
            "remove it from the data or re-export it."
        )
    values -= lo
    values *= 1.0 / (hi - lo)
    np.minimum(values, 1.0, out=values)  # (hi - lo) / (hi - lo) may round above 1
    if invert:
        np.subtract(1.0, values, out=values)
    return _Decoded(index=None, lut=None, image=values)


def _codestream_shape(data: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG, JPEG-LS or JPEG 2000 codestream's header, None if it is none
    of these (RLE's segments carry no size: its decoders fill the header's Rows x Columns)."""
    if data[:2] == b"\xff\xd8":  # JPEG and JPEG-LS: walk the segments to the start of frame
        offset = 2
        while offset + 9 <= len(data) and data[offset] == 0xFF:
            marker = data[offset + 1]
            if marker in _JPEG_SOF:  # length, precision, then height and width (big-endian)
                height, width = struct.unpack(">HH", data[offset + 5 : offset + 9])
                return height, width
            if marker == 0xFF:  # fill byte
                offset += 1
                continue
            (length,) = struct.unpack(">H", data[offset + 2 : offset + 4])
            offset += 2 + length
        return None
    # JPEG 2000: SOC then SIZ (maybe in JP2); Lsiz, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz
    start = data[:4096].find(b"\xff\x4f\xff\x51")
    if start >= 0 and start + 24 <= len(data):
        x, y, x_off, y_off = struct.unpack(">4I", data[start + 8 : start + 24])
        return y - y_off, x - x_off
    return None


# Bytes at a codestream's end searched for its end-of-image marker (padding may follow it).
_TAIL = 64


def _check_codestream(path: Path, pixel_data: bytes, rows: int, cols: int) -> None:
    """Refuse, before decoding, a compressed frame whose own header claims more than MAX_PIXELS
    or another size than the DICOM header (decoders allocate what the codestream says), or whose
    JPEG, JPEG-LS or JPEG 2000 codestream lacks its end-of-image marker (truncated)."""
    from pydicom.encaps import generate_fragments

    # The first fragment that starts a codestream (the basic offset table comes before it).
    fragments = generate_fragments(pixel_data)
    shape = None
    for fragment in fragments:
        # pragma: no mutate start (the headers lie within any first 64 KiB, 65537 bytes alike)
        shape = _codestream_shape(bytes(fragment[:65536]))
        # pragma: no mutate end
        if shape is not None:
            break
    if shape is None:
        return
    _check_pixels(path, *shape)
    if shape != (rows, cols):
        raise DataError(
            f"{path}: the compressed image is {shape[0]} x {shape[1]} pixels but the DICOM header "
            f"says {rows} x {cols} (Rows x Columns); the file is damaged or was edited. Export it "
            "again from the source."
        )
    # JPEG, JPEG-LS and JPEG 2000 codestreams end with an end-of-image (EOC) marker, FFD9, that
    # their coded data cannot hold; decoders fill a codestream cut short with garbage rows.
    raw = fragment[:2] in (b"\xff\xd8", b"\xff\x4f")  # not JP2-wrapped (boxes may follow)
    tail = bytes(fragment[-_TAIL:])
    for fragment in fragments:  # the frame's other fragments (one frame a file)
        tail = (tail + bytes(fragment[-_TAIL:]))[-_TAIL:]
    if raw and b"\xff\xd9" not in tail:
        raise DataError(
            f"{path}: the compressed image is truncated (its codestream ends without the "
            "end-of-image marker FFD9): the file was cut short or damaged. Copy it again from "
            "the source."
        )


def _is_image(ds: pydicom.Dataset) -> bool:
    """Whether a DICOM data set is, by its SOP class or image attributes, an image: one with no
    pixel data was cut short (pydicom reads a truncated file's elements up to the cut, silently).
    A file cut within its file meta or just after it has no elements at all."""
    for sop_class in (ds.get("SOPClassUID"), ds.file_meta.get("MediaStorageSOPClassUID")):
        if sop_class and "Image" in pydicom.uid.UID(str(sop_class)).name:  # maybe cut itself
            return True
    return len(ds) == 0 or any(k in ds for k in ("Rows", "Columns", "BitsAllocated"))


def _pixel_data_syntax(path: Path, ds: pydicom.Dataset) -> pydicom.uid.UID:
    """The transfer syntax of a DICOM that holds pixel data some installed decoder reads;
    DataError saying what to do otherwise (truncated, not an image, no syntax, no decoder)."""
    if "PixelData" not in ds and _is_image(ds):
        raise DataError(
            f"{path}: the DICOM file ends before its pixel data (tag PixelData): it is "
            "truncated (cut short). Copy it again from the source."
        )
    if "PixelData" not in ds:
        raise DataError(
            f"{path}: the DICOM file holds no pixel data (tag PixelData); it is not an image, "
            "remove it from the data folder."
        )
    syntax = ds.file_meta.get("TransferSyntaxUID")  # dcmread always gives a file_meta
    if syntax is None:
        raise DataError(
            f"{path}: the DICOM file names no transfer syntax (file meta element (0002,0010)), "
            "so its pixel data cannot be read; export it again with its file meta information."
        )
    if syntax.is_compressed:
        _check_decoder(path, syntax)
    return syntax


def _check_decoder(path: Path, syntax: pydicom.uid.UID) -> None:
    """DataError naming the package to install when no decoder reads the compressed ``syntax``."""
    try:
        decoder = pydicom.pixels.get_decoder(syntax)
        available = decoder.is_available
    except Exception:  # no decoder of any kind is known for this syntax
        available = False  # pragma: no mutate (None is as false)
    if not available:
        packages = _DECODER_PACKAGES.get(str(syntax))
        install = (
            f"Install its decoder: pip install {packages} (dependencies of deepmil-jax; "
            "reinstall with `bash setup.sh`), or decompress the file first (gdcmconv "
            "--raw IN OUT)."
            if packages
            else _DECODER_HELP
        )
        raise DataError(
            f"{path}: the pixel data is compressed ({syntax.name}) and no decoder for it "
            f"is installed. {install}"
        )


def _decode_dicom(path: Path) -> _Decoded:
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as e:  # pydicom raises many types on damaged files
        raise DataError(
            f"{path}: cannot read as DICOM ({_describe(e)}). The file is damaged, truncated or not "
            "DICOM; copy it again from the source."
        ) from e
    try:
        syntax = _pixel_data_syntax(path, ds)
        # PhotometricInterpretation, Rows, Columns and SamplesPerPixel are required to decode:
        # without one, pydicom cannot either (an AttributeError, reported below)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise DataError(
                f"{path}: PhotometricInterpretation is {photometric!r}; mammograms must be "
                "grayscale (MONOCHROME1 or MONOCHROME2). Convert it to grayscale first."
            )
        frames = ds.get("NumberOfFrames") or 1  # absent or empty: one
        if int(frames) > 1:
            raise DataError(
                f"{path}: {frames} frames; expected one image per file. Split the frames."
            )
        rows, cols = int(ds.Rows), int(ds.Columns)
        _check_size(path, rows, cols, int(ds.SamplesPerPixel), int(frames))
        if syntax.is_compressed:
            _check_codestream(path, ds.PixelData, rows, cols)
        arr = ds.pixel_array
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"{path}: cannot decode the pixel data ({_describe(e)}). The file may be truncated or "
            "damaged (copy it again), or compressed in a way no installed plugin reads. "
            f"{_DECODER_HELP}"
        ) from e

    def transform(values: np.ndarray) -> np.ndarray:
        out = pydicom.pixels.apply_modality_lut(values, ds)
        return pydicom.pixels.apply_voi_lut(out, ds)

    try:
        return _from_values(arr, transform, photometric == "MONOCHROME1", path)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"{path}: the modality or VOI LUT cannot be applied ({_describe(e)}); fix or remove "
            "the RescaleSlope/RescaleIntercept, WindowCenter/WindowWidth or LUT sequences."
        ) from e


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # TIFF and BigTIFF


def _pnm_header(path: Path) -> tuple[int, int, int, int, int] | None:
    """(rows, columns, samples, maxval, data offset) of a binary PGM (P5) or PPM (P6), from its
    header (whitespace-separated width, height and maxval, '#' comments to the end of a line,
    one whitespace byte before the pixels); None for any other file."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:2] not in (b"P5", b"P6"):
        return None
    fields: list[int] = []
    i = 2
    while len(fields) < 3:
        while head[i : i + 1].isspace():  # b"" past the end is no space
            i += 1
        if head[i : i + 1] == b"#":
            end = head.find(b"\n", i)
            if end == -1:
                raise ValueError("a PNM header comment runs past 4 KB")
            i = end + 1
            continue
        j = i
        while head[j : j + 1].isdigit():
            j += 1
        if j == i or not head[j : j + 1].isspace():  # b"" (the 4 KB ran out) is no space
            raise ValueError("the PNM header needs width, height and maxval")
        fields.append(int(head[i:j]))
        i = j
    width, height, maxval = fields
    if not (1 <= maxval <= 65535) or width < 1 or height < 1:
        raise ValueError(f"the PNM header gives {width} x {height} pixels, maxval {maxval}")
    return height, width, 3 if head[:2] == b"P6" else 1, maxval, i + 1


def _read_pnm(path: Path, header: tuple[int, int, int, int, int]) -> np.ndarray:
    """The pixels (H, W) or (H, W, 3) of a binary PGM/PPM: uint8, or uint16 when maxval > 255
    (big-endian in the file, as Netpbm specifies)."""
    rows, cols, samples, maxval, offset = header
    dtype = np.dtype(">u2") if maxval > 255 else np.dtype(np.uint8)
    count = rows * cols * samples
    data = np.fromfile(path, dtype=dtype, count=count, offset=offset)
    if data.size < count:
        raise ValueError(f"the file holds {data.size} of its {count} samples (truncated)")
    data = data.astype(dtype.newbyteorder("="), copy=False)  # pragma: no mutate (copy=None: same)
    return data.reshape((rows, cols, 3) if samples == 3 else (rows, cols))


def _raster_header(path: Path) -> tuple[int, int, int, int]:
    """(rows, columns, samples per pixel, images) of an image file, from its header alone."""
    pnm = _pnm_header(path)
    if pnm is not None:
        return pnm[0], pnm[1], pnm[2], 1
    with open(path, "rb") as f:
        head = f.read(4)
    if head in _TIFF_MAGIC:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            # not mutated: imagedepth is 1 but in volume TIFFs, which are refused as not 2-D
            samples = int(page.samplesperpixel) * int(page.imagedepth)  # pragma: no mutate
            return int(page.imagelength), int(page.imagewidth), samples, len(tif.pages)
    import warnings

    import PIL.Image

    with warnings.catch_warnings():  # PIL warns above 89 megapixels; MAX_PIXELS decides here
        # not mutated: ignoring every warning here (no category) changes no result
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # pragma: no mutate
        try:
            with PIL.Image.open(path) as image:  # reads the header, decodes nothing
                frames = int(getattr(image, "n_frames", 1))
                return image.height, image.width, len(image.getbands()), frames
        except PIL.Image.DecompressionBombError as e:
            raise DataError(
                f"{path}: more pixels than the {MAX_PIXELS // 10**6}-megapixel cap on a decoded "
                f"image ({e}); downsample it, or check that the file is not damaged."
            ) from e


def _decode_raster(path: Path) -> _Decoded:
    try:
        rows, cols, samples, frames = _raster_header(path)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"{path}: cannot read the image ({_describe(e)}); the file is damaged or not a "
            "supported image (DICOM, PNG, TIFF, PGM/PPM, JPEG). Export it again."
        ) from e
    _check_size(path, rows, cols, samples, frames)
    try:
        pnm = _pnm_header(path)
        # Binary PGM/PPM read here: Pillow reads a 16-bit PPM as 8 bits.
        arr = _read_pnm(path, pnm) if pnm is not None else np.asarray(skimage.io.imread(path))
    except Exception as e:
        raise DataError(
            f"{path}: cannot read the image ({_describe(e)}); the file is damaged or not a "
            "supported image (DICOM, PNG, TIFF, PGM/PPM, JPEG). Export it again."
        ) from e
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if (rgb == rgb[..., :1]).all():  # every channel equal to the first
            arr = np.ascontiguousarray(rgb[..., 0])  # pragma: no mutate (the channels are equal)
        else:
            # pragma: no mutate start (float64 here gives the same luminance to float32 rounding)
            weights = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)
            arr = rgb.astype(np.float32) @ weights
            # pragma: no mutate end
    elif arr.ndim == 3 and arr.shape[-1] in (1, 2):
        arr = np.ascontiguousarray(arr[..., 0])
    if arr.ndim != 2:
        raise DataError(
            f"{path}: expected a 2-D grayscale image, got an array of shape {arr.shape}; "
            "save one grayscale image per file."
        )
    return _from_values(arr, lambda v: v, False, path)  # pragma: no mutate (None: falsy too)


# pydicom and pylibjpeg log a traceback for each plugin that fails on a damaged file, which the
# program's log handler (absl's, on the root logger) prints; the DataError raised says it once.
_QUIET_LOGGERS = ("pydicom", "pylibjpeg", "openjpeg")
_quiet = {"depth": 0, "propagate": {}}
_quiet_lock = threading.Lock()


@contextlib.contextmanager
def _decoders_quiet():
    """Keep the DICOM decoders' log records from the root logger's handlers while one or more
    threads decode (their own handlers, such as pydicom.config.debug()'s, still print)."""
    with _quiet_lock:
        if _quiet["depth"] == 0:
            for name in _QUIET_LOGGERS:
                logger = std_logging.getLogger(name)
                _quiet["propagate"][name] = logger.propagate
                logger.propagate = False
        _quiet["depth"] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet["depth"] -= 1
            if _quiet["depth"] == 0:
                for name in _QUIET_LOGGERS:
                    std_logging.getLogger(name).propagate = _quiet["propagate"][name]


def _decode(path: str | os.PathLike) -> _Decoded:
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: no such file; check the path (relative paths are resolved from the CSV)."
        )
    if _is_dicom(path):
        with _decoders_quiet():
            return _decode_dicom(path)
    return _decode_raster(path)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode a mammogram to displayed intensities.

    DICOM: modality LUT (rescale), then VOI LUT (window or table), MONOCHROME1 inverted, any bit
    depth; compressed pixel data through pydicom's decoders (JPEG, JPEG-LS, JPEG 2000, RLE).
    PNG, TIFF, PGM/PPM (binary, 8 or 16 bit) and JPEG files: grayscale, or colour converted to
    grey with luminance weights (equal channels are taken as they are).

    Returns:
      (H, W) float32 in [0, 1]: the darkest displayed value is 0 and the brightest 1.

    Raises:
      DataError: the file is missing, damaged, truncated, compressed without an installed decoder,
        not grayscale, or blank.
    """
    return _decode(path).full()


# --------------------------------------------------------------------------------------------------
# Preprocessing.


def _largest_component(mask: np.ndarray) -> np.ndarray:
    # pragma: no mutate start (connectivity 2 is label's default in 2-D; the background's count
    # only matters when there is no foreground, and then every label is 0 anyway)
    labels = skimage.measure.label(mask, connectivity=2)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    # pragma: no mutate end
    return labels == int(np.argmax(counts))


def _fill_holes(mask: np.ndarray, chest_wall_left: bool | None) -> np.ndarray:
    """Fill the background regions the breast encloses: those that meet no image edge, or, with
    ``chest_wall_left`` True (False), only the left (right) edge, where the chest wall cuts the
    breast: a dark region there is fat inside the breast, not background. None: no such edge.
    """
    background = skimage.measure.label(~mask, connectivity=1)
    edges = [background[0], background[-1]]
    if chest_wall_left is not True:
        edges.append(background[:, 0])
    if chest_wall_left is not False:
        edges.append(background[:, -1])
    # the breast's own pixels (label 0) are in the mask whether or not they count as holes
    return mask | ~np.isin(background, np.concatenate(edges))


def _fit(lo: int, hi: int, factor: int, n: int) -> tuple[int, int]:
    """Adjust [lo, hi) to a multiple of `factor`: grow within [0, n) if possible, else shrink."""
    length = hi - lo
    target = -(-length // factor) * factor
    extra = target - length
    grow_hi = min(extra, n - hi)
    grow_lo = extra - grow_hi
    if grow_lo <= lo:
        return lo - grow_lo, hi + grow_hi
    return lo, lo + (length // factor) * factor


def _otsu(small: np.ndarray) -> float:
    """Otsu's threshold, moved to the midpoint of the two class means it separates.

    At Otsu's optimum the threshold is (nearly) that midpoint already; the step only matters when
    an empty gap between background and breast makes every threshold in the gap equally good, and
    `threshold_otsu` would return the gap's lowest edge, just above the background noise.
    """
    t = float(skimage.filters.threshold_otsu(small))
    above = small > t  # pragma: no mutate (a tie with Otsu's bin centre: measure zero)
    n_above = int(above.sum())
    if n_above > 0:  # (the minimum is never above Otsu's threshold)
        # pragma: no mutate start (float64 sums: float32 ones differ below the mask's resolution)
        total = float(small.sum(dtype=np.float64))
        upper = float(small[above].sum(dtype=np.float64))
        # pragma: no mutate end
        t = 0.5 * ((total - upper) / (small.size - n_above) + upper / n_above)
    return t


# Film-robust masking (module docstring, step 2). Sizes are fractions of the mask image's long side.
_DETACH = 0.015  # opening radius: bridges and strips thinner than twice this are cut
_STRIP_DEPTH = 0.1  # film edges are looked for this far in from each side
_STRIP_COVER = 0.9  # a film-edge line is bright over at least this fraction of its length


def _threshold(small: np.ndarray) -> float:
    """Otsu's threshold (`_otsu`), or, when Otsu split off only a bright plateau (film edges and
    labels at the brightest values, as on scanned films with wide unexposed borders: under a
    quarter of the image, its mean within 15% of the range from the maximum), Otsu's threshold
    within the darker class, which separates the breast from the background."""
    t = _otsu(small)
    upper = small[small > t]  # pragma: no mutate (a tie with the threshold: measure zero)
    lo, hi = float(small.min()), float(small.max())
    # (never empty: the image has contrast, `_breast_mask`)
    if upper.size < 0.25 * small.size and float(upper.mean()) >= hi - 0.15 * (hi - lo):
        lower = small[small <= t]  # pragma: no mutate (a tie with the threshold: measure zero)
        if float(lower.max()) > float(lower.min()):  # (over 3/4 of the pixels)
            t = _otsu(lower)
    return t


def _drop_border_strips(mask: np.ndarray, small: np.ndarray) -> np.ndarray:
    """Remove film edges: lines (rows or columns) next to a side of the image that are bright,
    flat and run along at least `_STRIP_COVER` of the side, up to `_STRIP_DEPTH` in from it.

    Bright means above the midpoint between the median and the maximum of the masked
    intensities; flat means that, averaged along the line over 1/16 of its length (which
    removes film grain, not tissue texture), the bright values spread (interquartile range)
    less than a quarter of the masked intensities do: an unexposed film edge has no texture.
    Lines less than half covered by the mask (background, a black band outside the film, a
    label, a thinner strip) are stepped over; the first other line ends the search.
    """
    # pragma: no mutate start (estimates: a neighbouring percentile or stride moves them by noise)
    values = small[mask][::4]  # every 4th: the same quantiles to within noise, 4 times faster
    q25, median, q75, top = np.percentile(values, [25, 50, 75, 100])
    # pragma: no mutate end
    bright = 0.5 * (median + top)
    flat = 0.25 * (q75 - q25)
    out = mask.copy()
    for axis in (0, 1):
        n = small.shape[axis]
        depth = max(1, int(_STRIP_DEPTH * n))
        for order in (range(depth), range(n - 1, n - 1 - depth, -1)):
            for i in order:
                line = small[i] if axis == 0 else small[:, i]
                on = mask[i] if axis == 0 else mask[:, i]
                lit = line > bright  # pragma: no mutate (a tie with `bright`: measure zero)
                if lit.mean() >= _STRIP_COVER:
                    # pragma: no mutate start (any window over 2 pixels evens out the grain)
                    smooth = ndi.uniform_filter1d(line, size=max(3, line.size // 16))
                    # pragma: no mutate end
                    # pragma: no mutate start (estimates, as above; None is stored as False)
                    l25, l75 = np.percentile(smooth[lit], [25, 75])
                    # pragma: no mutate end
                    if l75 - l25 <= flat:
                        if axis == 0:
                            out[i] = False  # pragma: no mutate
                        else:
                            out[:, i] = False  # pragma: no mutate
                        continue
                if on.mean() < 0.5:  # background, a black band, a thin strip or label
                    continue
                break
    return out


def _detach(mask: np.ndarray) -> np.ndarray:
    """The breast's component, cut free of whatever thin bridges join it to labels or markers.

    A morphological opening with a square of side 2k + 1 (k = `_DETACH` of the long side; the
    image border counts as background; separable minimum and maximum filters, which cost the
    same for any k) removes strips and bridges thinner than 2k + 1; the largest component of
    what remains is the breast. The mask's pixels within k + 1 of it (the same square measure)
    and connected to it are put back, so the breast's outline is unchanged except for the
    stumps of cut bridges.
    """
    k = max(1, round(_DETACH * max(mask.shape)))
    # Holes first: film grain leaves fatty tissue near the threshold full of pinholes, which
    # the opening would otherwise cut away with the bridges.
    # The zero padding is the border's background: a window reaching past the array holds it,
    # and the filters' default edge mode (mirroring) adds no value from outside the window.
    padded = np.pad(_fill_holes(mask, None), 1).view(np.uint8)
    core = ndi.minimum_filter(padded, size=2 * k + 1)
    if not core.any():
        return _largest_component(mask)
    opened = ndi.maximum_filter(core, size=2 * k + 1).view(bool)
    breast = _largest_component(opened)
    near = ndi.maximum_filter(breast.view(np.uint8), size=2 * k + 3)
    kept = padded.view(bool) & near.view(bool)
    labels, _ = ndi.label(kept, structure=np.ones((3, 3)))
    return np.isin(labels[1:-1, 1:-1], labels[breast])  # (kept holds the breast: no label 0)


def _chest_wall_left(small: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the chest wall is on the left: the side where the breast covers more of its
    outermost columns (a band of 1/20 of the width inside the mask's bounding box; the breast is
    cut by the chest-wall edge, while its far side ends in the nipple), or, when that is close,
    the half of the image holding more breast tissue (intensity in the mask)."""
    columns = np.flatnonzero(mask.any(axis=0))
    band = max(1, small.shape[1] // 20)  # pragma: no mutate (2 for 1: under 40 columns only)
    first, last = int(columns[0]), int(columns[-1]) + 1
    cover_left = float(mask[:, first : first + band].mean())
    cover_right = float(mask[:, max(first, last - band) : last].mean())
    if abs(cover_left - cover_right) >= 0.25:
        return cover_left > cover_right  # pragma: no mutate (>=: they differ by 0.25 here)
    weights = (small * mask).sum(axis=0)
    half = small.shape[1] / 2.0
    centres = np.arange(small.shape[1]) + 0.5
    return bool(weights[centres <= half].sum() >= weights[centres > half].sum())


def _breast_mask(small: np.ndarray, where: str) -> tuple[np.ndarray, bool]:
    """Threshold -> film edges dropped -> breast detached -> holes filled:
    (mask, chest wall on the left?)."""
    if float(small.max()) <= float(small.min()):
        raise DataError(f"{where}: the image is blank (no contrast); remove it from the data.")
    mask = small > _threshold(small)  # pragma: no mutate (a tie with the threshold: measure zero)
    if not mask.any():
        raise DataError(f"{where}: no breast found above Otsu's threshold; check the image.")
    stripped = _drop_border_strips(mask, small)
    # pragma: no mutate start (not pinned by a test: a fallback no test reaches; the strips are
    # brighter than the median masked value, so they are hardly ever the whole mask)
    mask = _detach(stripped if stripped.any() else mask)
    # pragma: no mutate end
    left = _chest_wall_left(small, mask)
    return _fill_holes(mask, left), left


def _preprocess(
    decoded: _Decoded, config: PreprocessConfig, where: str
) -> tuple[np.ndarray, Geometry]:
    H, W = decoded.shape
    if min(H, W) < MIN_SIDE:
        raise DataError(
            f"{where}: the image is {H} x {W} pixels, too small to be a mammogram (each side must "
            f"be at least {MIN_SIDE} pixels, data_pipeline.preprocess.MIN_SIDE); use the "
            "full-resolution image."
        )
    stride = max(1, -(-max(H, W) // config.mask_size))
    small = decoded.region(slice(None, None, stride), slice(None, None, stride))
    mask, chest_wall_left = _breast_mask(small, where)
    flipped = bool(config.flip and not chest_wall_left)

    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    # Small pixel i is original pixel i * stride, so each edge is known to within a stride.
    y0 = max(0, (int(rows[0]) - 1) * stride + 1)
    y1 = min(H, (int(rows[-1]) + 1) * stride)
    x0 = max(0, (int(cols[0]) - 1) * stride + 1)
    x1 = min(W, (int(cols[-1]) + 1) * stride)

    h, w = config.size
    fy = max(1, (y1 - y0) // (2 * h))
    fx = max(1, (x1 - x0) // (2 * w))
    y0, y1 = _fit(y0, y1, fy, H)
    x0, x1 = _fit(x0, x1, fx, W)

    crop = decoded.block_mean((y0, x0, y1, x1), fy, fx)
    # Zero everything outside the dilated breast mask, judged at each block's centre.
    # pragma: no mutate start (not pinned by a test: another margin shape, sampling points
    # shifted by under a block, or a clamp one row short zero the same pixels on the convex test
    # phantoms, whose edges the one-pixel margin covers either way)
    keep = skimage.morphology.dilation(mask, footprint=np.ones((3, 3), dtype=bool))
    centre_y = y0 + np.arange(crop.shape[0]) * fy + (fy - 1) / 2.0
    centre_x = x0 + np.arange(crop.shape[1]) * fx + (fx - 1) / 2.0
    ri = np.minimum(np.floor(centre_y / stride + 0.5).astype(np.intp), keep.shape[0] - 1)
    ci = np.minimum(np.floor(centre_x / stride + 0.5).astype(np.intp), keep.shape[1] - 1)
    # pragma: no mutate end
    crop *= keep[np.ix_(ri, ci)]
    # pragma: no mutate start (equivalent: order, anti_aliasing and preserve_range are what
    # resize does with a float image anyway; the resize is a convex combination of values in
    # [0, 1], so the clip only guards float rounding; copy flags)
    out = skimage.transform.resize(
        crop, (h, w), order=1, mode="edge", anti_aliasing=True, preserve_range=True
    ).astype(np.float32, copy=False)
    np.clip(out, 0.0, 1.0, out=out)
    # pragma: no mutate end
    if flipped:
        out = out[:, ::-1]
    out = np.ascontiguousarray(out)
    return out, Geometry(original_shape=(H, W), crop=(y0, x0, y1, x1), flipped=flipped, size=(h, w))


def preprocess_image(
    image: np.ndarray, config: PreprocessConfig = PreprocessConfig()
) -> tuple[np.ndarray, Geometry]:
    """Mask, crop, flip and resize a decoded mammogram (steps 2-5 of the module docstring).

    Args:
      image: (H, W) float in [0, 1], as `read_image` returns it.
      config: output size, flip and mask resolution.

    Returns:
      ((h, w) float32 in [0, 1], Geometry) where (h, w) = config.size; pixels outside the breast
      are 0.
    """
    image = np.asarray(image)
    if image.ndim != 2 or min(image.shape) < 2:
        raise DataError(f"image: expected a 2-D array (H, W), got shape {image.shape}.")
    if not np.issubdtype(image.dtype, np.floating):
        raise DataError(
            f"image: expected float intensities in [0, 1], got dtype {image.dtype}; decode files "
            "with read_image (or use preprocess_file)."
        )
    lo, hi = float(np.min(image)), float(np.max(image))
    if not (lo >= -1e-3 and hi <= 1.0 + 1e-3):  # NaN fails every comparison
        raise DataError(
            f"image: values must be finite and in [0, 1], got [{lo}, {hi}]; rescale it first."
        )
    # float32 arithmetic whatever the input's precision; the output is float32 either way
    image = image.astype(np.float32, copy=False)  # pragma: no mutate (see above)
    return _preprocess(_Decoded(index=None, lut=None, image=image), config, "image")


def preprocess_file(
    path: str | os.PathLike, config: PreprocessConfig = PreprocessConfig()
) -> tuple[np.ndarray, Geometry]:
    """The one preprocessing used by every source, training and prediction: file -> network input.

    Equivalent to `preprocess_image(read_image(path), config)`, but converts only the crop to float.

    Returns:
      ((h, w) float32 in [0, 1], Geometry).

    Raises:
      DataError: naming the file, the problem and the fix.
    """
    return _preprocess(_decode(path), config, str(path))


def _main(argv: Sequence[str]) -> None:
    # pragma: no mutate block (the command line's glue, run in a subprocess by the tests: its
    # errors, and its PNG against preprocess_file's image; mutmut cannot map them to it)
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {' '.join(argv[1:])}; give flags only")
    f = flags.FLAGS
    # Flags first, so that a mistake costs no decoding; then one line per error, no traceback.
    if not f.input:
        raise SystemExit("error: give --input=FILE (and --output=PNG)")
    if f.size < 1:
        raise SystemExit(
            f"error: --size={f.size}: the output side must be a positive number of pixels "
            "(227 in the paper)"
        )
    if f.output:
        output = Path(f.output)
        if output.suffix.lower() not in {".png", ".tif", ".tiff"}:
            raise SystemExit(f"error: --output={output}: give a .png (or .tif) file name")
        if not output.parent.is_dir():
            raise SystemExit(f"error: --output={output}: the folder {output.parent} does not exist")
    config = dataclasses.replace(PreprocessConfig(), size=(f.size, f.size), flip=f.flip)
    try:
        image, geometry = preprocess_file(f.input, config)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    print(geometry)
    if f.output:
        try:
            skimage.io.imsave(
                f.output, (image * 65535 + 0.5).astype(np.uint16), check_contrast=False
            )
        except OSError as e:
            raise SystemExit(f"error: --output={f.output}: cannot write it ({e})") from None


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("input", None, "A mammogram (DICOM, PNG or TIFF) to preprocess.")
    flags.DEFINE_string("output", None, "Where to write the preprocessed image as a 16-bit PNG.")
    flags.DEFINE_integer("size", 227, "Output height and width in pixels (227 in the paper).")
    flags.DEFINE_bool("flip", True, "Flip so that the chest wall is on the left.")
    app.run(_main)
