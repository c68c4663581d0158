"""Synthetic scanned-film mammograms: the digital synthetic breast with what film scans add.

A scanned film (CBIS-DDSM, mini-MIAS) differs from a digital mammogram (INbreast) in what lies
around the breast, and that is what this generator draws, around a breast from
`data_pipeline.synthetic.synthesize_image`:

- a scanner background that is not black: film base and fog, uneven, with film grain;
- film edges: bright (unexposed) strips along one or two sides of the image, sometimes with a
  black band beyond them (the scanner bed outside the film), sometimes on the chest-wall side;
- labels: white stickers with dark text-like blocks, near a corner, some touching the border, and
  some joined to the breast by a thin bright strip that runs along the border (a film edge);
- markers: small bright letters (the "L"/"R" lead markers) in the background near the breast;
- tape: semi-transparent bright rectangles along a border;
- breasts that fill the frame: the breast is cut by the top, bottom and far edges, so that only
  the corners on the nipple side are background.

Every artefact is recorded as a mask, so tests can check that preprocessing removes it:
`FilmImage.labels` (labels, their connecting strips and markers: never part of the breast) and
`FilmImage.artefacts` (those and film edges and tape). Everything follows from the generator.

    python -m data_pipeline.synthetic_film --out=DIR [--num_images=40] [--seed=0]

writes DIR/<index>_<L|R>.pgm (8-bit, as mini-MIAS distributes its films) and DIR/truth.npz with
each image's breast, label and artefact masks and its laterality.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import skimage.transform

from data_pipeline.synthetic import _smooth_noise, synthesize_image

__all__ = ["FilmImage", "synthesize_film", "write_film_set", "write_pgm"]


@dataclass(frozen=True)
class FilmImage:
    """One synthetic scanned film.

    Attributes:
      image: (H, W) float64 display intensities in [0, 1].
      breast: (H, W) bool, the breast (where no film edge covers it).
      labels: (H, W) bool, labels, the strips that join them to the breast, and markers.
      artefacts: (H, W) bool, `labels` and the film edges, black bands and tape.
      laterality: "L" (chest wall on the left edge) or "R".
      fills_frame: whether the breast was drawn larger than the image (cut by three edges).
    """

    image: np.ndarray
    breast: np.ndarray
    labels: np.ndarray
    artefacts: np.ndarray
    laterality: str
    fills_frame: bool


def _breast(rng: np.random.Generator, shape, laterality, view, fills_frame):
    """The synthetic digital breast: (image, breast mask), cut to `shape` to fill the frame."""
    H, W = shape
    if not fills_frame:
        s = synthesize_image(
            rng, shape=shape, laterality=laterality, view=view, size=rng.uniform(0, 1)
        )
        return s.image, s.breast
    # Drawn on a larger canvas, then a window that cuts the breast at the top, bottom and far
    # edges is resized to `shape`: only the corners on the nipple side stay background.
    big = (int(H * 1.2), int(W * 1.8))
    s = synthesize_image(
        rng, shape=big, laterality=laterality, view=view, size=rng.uniform(0.3, 1.0)
    )
    rows_in, cols_in = np.flatnonzero(s.breast.any(axis=1)), np.flatnonzero(s.breast.any(axis=0))
    depth = cols_in[-1] - cols_in[0] + 1  # how far the breast reaches from the chest wall
    width = int(depth * rng.uniform(0.8, 0.9))
    height = int((rows_in[-1] - rows_in[0] + 1) * rng.uniform(0.8, 0.9))
    y0 = (rows_in[0] + rows_in[-1] + 1 - height) // 2
    x0 = 0 if laterality == "L" else big[1] - width
    window = (slice(y0, y0 + height), slice(x0, x0 + width))
    image = skimage.transform.resize(s.image[window], shape, order=1, anti_aliasing=True)
    breast = skimage.transform.resize(s.breast[window], shape, order=0, anti_aliasing=False)
    return image, breast.astype(bool)


def _far(mask: np.ndarray, gap: float) -> np.ndarray:
    """(H, W) bool: pixels at least `gap` pixels from every True pixel of `mask`."""
    if not mask.any():
        return np.ones_like(mask)
    return ndi.distance_transform_edt(~mask) >= gap


def _text_block(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A white sticker (h, w) with rows of dark, word-like blocks: values in [0, 1]."""
    block = np.full((h, w), rng.uniform(0.9, 1.0))
    lines = int(rng.integers(2, 4))
    line_h = max(1, h // (2 * lines + 1))
    for i in range(lines):
        y = (2 * i + 1) * line_h
        x = max(1, w // 12)
        while x < w - max(2, w // 12):
            word = int(rng.integers(max(2, w // 12), max(3, w // 4)))
            block[y : y + line_h, x : min(x + word, w - max(1, w // 12))] = rng.uniform(0.05, 0.3)
            x += word + max(1, w // 20)
    return block


def _letter(h: int, w: int, which: str) -> np.ndarray:
    """A bold "L" or "R"-like glyph (h, w) bool, strokes about a quarter of its width."""
    g = np.zeros((h, w), dtype=bool)
    t = max(1, w // 4)
    g[:, :t] = True  # the stem
    if which == "L":
        g[-t:, :] = True
    else:
        g[:t, :] = True
        g[: h // 2, -t:] = True
        g[h // 2 - t // 2 : h // 2 + (t + 1) // 2, :] = True
        for y in range(h // 2, h):  # the leg, a diagonal stroke
            x = t + (w - t) * (y - h // 2) // max(1, h - h // 2)
            g[y, max(0, x - t // 2) : x + t] = True
    return g


def synthesize_film(
    rng: np.random.Generator,
    *,
    shape: tuple[int, int] = (512, 416),
    laterality: str = "L",
    view: str = "CC",
    fills_frame: bool = False,
) -> FilmImage:
    """Draw one synthetic scanned film (see the module docstring for what it holds).

    Args:
      rng: the source of every random choice.
      shape: (H, W) in pixels, at least 128 a side.
      laterality: "L" (chest wall on the left edge) or "R".
      view: "CC" or "MLO".
      fills_frame: draw the breast larger than the image, cut by the top, bottom and far edges.
    """
    H, W = shape
    if min(H, W) < 128:
        raise ValueError(f"shape must be at least 128 x 128, got {shape}")
    digital, breast = _breast(rng, shape, laterality, view, fills_frame)
    breast = breast.copy()
    image, grain = _film_base(rng, digital)
    labels = np.zeros(shape, dtype=bool)
    artefacts = np.zeros(shape, dtype=bool)
    # Each step draws its artefacts into image and records them in the masks (in place).
    _add_film_edges(rng, image, breast, artefacts, laterality)
    _add_labels(rng, image, labels, breast, artefacts, laterality)
    artefacts |= labels
    _add_lead_marker(rng, image, labels, breast, artefacts, laterality)
    _add_tape(rng, image, breast, artefacts, laterality)
    image += rng.normal(0.0, grain, size=shape)
    return FilmImage(
        image=np.clip(image, 0.0, 1.0),
        breast=breast,
        labels=labels,
        artefacts=artefacts,
        laterality=laterality,
        fills_frame=fills_frame,
    )


def _chest_and_far_x(width: int, laterality: str) -> tuple[int, int]:
    """The columns of the chest-wall edge and of the far edge of an image `width` wide."""
    chest_x = 0 if laterality == "L" else width - 1
    far_x = width - 1 if laterality == "L" else 0
    return chest_x, far_x


def _film_base(rng: np.random.Generator, digital: np.ndarray) -> tuple[np.ndarray, float]:
    """Film: base and fog (not black, uneven) with the breast's densities `digital` (H, W) on
    top: (image (H, W) float64, the standard deviation of the grain to add everywhere)."""
    H, W = digital.shape
    yy, _ = np.mgrid[0:H, 0:W]
    base = rng.uniform(0.08, 0.2) + 0.03 * _smooth_noise(rng, digital.shape, max(H, W) / 4)
    base += rng.uniform(-0.03, 0.03) * (yy / H)
    image = base + (1.0 - base) * 0.95 * digital
    grain = rng.uniform(0.01, 0.03)
    return image, grain


def _add_film_edges(rng, image, breast, artefacts, laterality) -> None:
    """Film edges: bright strips along one or two sides, a black scanner band beyond some; each
    strip is added to `artefacts` and taken out of `breast`."""
    H, W = image.shape
    yy, xx = np.mgrid[0:H, 0:W]
    chest_x, far_x = _chest_and_far_x(W, laterality)
    sides = [s for s in ("top", "bottom", "chest", "far") if rng.random() < 0.3]
    for side in sides:
        across = H if side in ("top", "bottom") else W
        width = max(2, int(across * rng.uniform(0.006, 0.03)))
        band = max(1, int(across * rng.uniform(0.005, 0.02))) if rng.random() < 0.4 else 0
        level = rng.uniform(0.85, 1.0)
        if side == "top":
            strip, black = yy < band + width, yy < band
        elif side == "bottom":
            strip, black = yy >= H - band - width, yy >= H - band
        else:
            x = chest_x if side == "chest" else far_x
            dist = np.abs(xx - x)
            strip, black = dist < band + width, dist < band
        image[strip] = level
        image[black] = rng.uniform(0.0, 0.03)
        artefacts |= strip
        breast &= ~strip


def _add_labels(rng, image, labels, breast, artefacts, laterality) -> None:
    """Labels: one or two white stickers with text near a corner away from the breast (and the
    artefacts so far), recorded in `labels`; some touch the border, some are joined to the
    breast by a thin bright strip along the border."""
    H, W = image.shape
    chest_x, far_x = _chest_and_far_x(W, laterality)
    long_side = max(H, W)
    clear = _far(breast | artefacts, gap=0.04 * W)
    for _ in range(int(rng.integers(1, 3))):
        lh, lw = int(H * rng.uniform(0.05, 0.09)), int(W * rng.uniform(0.15, 0.3))
        touch = rng.random() < 0.5
        margin = 0 if touch else int(long_side * rng.uniform(0.01, 0.03))
        corners = [(margin, far_x), (H - lh - margin, far_x), (margin, chest_x)]
        corners += [(H - lh - margin, chest_x)]
        for k in rng.permutation(len(corners)):
            y0, edge_x = corners[k]
            x0 = margin if edge_x == 0 else W - lw - margin
            box = (slice(y0, y0 + lh), slice(x0, x0 + lw))
            if clear[box].all():
                break
        else:
            continue
        image[box] = _text_block(rng, lh, lw)
        labels[box] = True
        clear &= _far(labels, gap=0.03 * W)
        if touch and rng.random() < 0.6:
            _join_to_breast(rng, image, labels, breast, box, chest_x, long_side)


def _add_lead_marker(rng, image, labels, breast, artefacts, laterality) -> None:
    """Markers: sometimes a small bright letter ("L" or "R") in the background, clear of the
    breast and the labels; recorded in `labels` and `artefacts`."""
    H, W = image.shape
    if rng.random() < 0.6:
        mh = max(6, int(H * rng.uniform(0.03, 0.05)))
        glyph = _letter(mh, max(4, int(mh * 0.7)), laterality)
        ok = _far(breast | artefacts, gap=0.04 * W)
        ok = ndi.binary_erosion(ok, np.ones((mh + 2, glyph.shape[1] + 2), dtype=bool))
        ys, xs = np.nonzero(ok[: H - mh, : W - glyph.shape[1]])
        if len(ys):
            k = int(rng.integers(len(ys)))
            win = (slice(ys[k], ys[k] + mh), slice(xs[k], xs[k] + glyph.shape[1]))
            image[win][glyph] = rng.uniform(0.9, 1.0)
            labels[win] |= glyph
            artefacts |= labels


def _add_tape(rng, image, breast, artefacts, laterality) -> None:
    """Tape: sometimes a semi-transparent bright rectangle along a border on the far side, clear
    of the breast; recorded in `artefacts`."""
    H, W = image.shape
    if rng.random() < 0.35:
        th, tw = int(H * rng.uniform(0.06, 0.15)), int(W * rng.uniform(0.1, 0.25))
        y0 = 0 if rng.random() < 0.5 else H - th
        x0 = W - tw if laterality == "L" else 0
        box = (slice(y0, y0 + th), slice(x0, x0 + tw))
        if _far(breast, gap=0.04 * W)[box].all():
            image[box] += rng.uniform(0.15, 0.3)
            artefacts[box] = True


def _join_to_breast(rng, image, labels, breast, box, chest_x, long_side) -> None:
    """A thin bright strip from the label's border side along the border to the chest-wall edge,
    then along that edge until it meets the breast (a film edge joining the label to it)."""
    H, W = image.shape
    width = max(2, int(long_side * rng.uniform(0.004, 0.01)))
    level = rng.uniform(0.85, 1.0)
    rows = slice(0, width) if box[0].start == 0 else slice(H - width, H)
    if box[0].start != 0 and box[0].stop != H:
        return
    cols = slice(0, box[1].start + 1) if chest_x == 0 else slice(box[1].stop - 1, W)
    strip = np.zeros_like(labels)
    strip[rows, cols] = True
    # Down (or up) the chest-wall edge until the breast.
    edge = slice(0, width) if chest_x == 0 else slice(W - width, W)
    column = breast[:, edge].any(axis=1)
    hits = np.flatnonzero(column)
    if len(hits) == 0:
        return
    if rows.start == 0:
        strip[: hits[0] + 1, edge] = True
    else:
        strip[hits[-1] :, edge] = True
    strip &= ~breast
    image[strip] = level
    labels |= strip


def write_pgm(path: str | os.PathLike, pixels: np.ndarray) -> Path:
    """Write (H, W) uint8 or uint16 pixels as a binary PGM (P5; 16-bit big-endian, as Netpbm)."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"pixels must be (H, W) uint8 or uint16, got {pixels.dtype} {pixels.shape}"
        )
    maxval = 255 if pixels.dtype == np.uint8 else 65535
    header = f"P5\n{pixels.shape[1]} {pixels.shape[0]}\n{maxval}\n".encode("ascii")
    Path(path).write_bytes(header + pixels.astype(pixels.dtype.newbyteorder(">")).tobytes())
    return Path(path)


def film_plan(seed: int, num_images: int) -> list[tuple[str, str, bool]]:
    """(laterality, view, fills_frame) of each image: L/R and CC/MLO alternate, about a third
    fill the frame."""
    rng = np.random.default_rng([seed, 1])
    return [
        ("LR"[i % 2], ("CC", "MLO")[(i // 2) % 2], bool(rng.random() < 0.35))
        for i in range(num_images)
    ]


def film_images(seed: int, num_images: int, shape: tuple[int, int] = (512, 416)) -> list[FilmImage]:
    """`num_images` films, image i drawn from its own generator (seed, i)."""
    return [
        synthesize_film(
            np.random.default_rng([seed, i]),
            shape=shape,
            laterality=lat,
            view=view,
            fills_frame=fill,
        )
        for i, (lat, view, fill) in enumerate(film_plan(seed, num_images))
    ]


def write_film_set(
    out_dir: str | os.PathLike,
    *,
    num_images: int = 40,
    seed: int = 0,
    image_shape: tuple[int, int] = (512, 416),
) -> list[Path]:
    """Write films as 8-bit PGMs DIR/<index>_<L|R>.pgm and their truth DIR/truth.npz (breast,
    labels, artefacts: (N, H, W) bool; laterality (N,) str; files (N,) str)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    films = film_images(seed, num_images, image_shape)
    paths = []
    for i, film in enumerate(films):
        pixels = np.round(film.image * 255).astype(np.uint8)
        paths.append(write_pgm(out / f"{i:04d}_{film.laterality}.pgm", pixels))
    np.savez_compressed(
        out / "truth.npz",
        files=np.array([p.name for p in paths]),
        breast=np.stack([f.breast for f in films]),
        labels=np.stack([f.labels for f in films]),
        artefacts=np.stack([f.artefacts for f in films]),
        laterality=np.array([f.laterality for f in films]),
    )
    return paths


def _main(argv: Sequence[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {' '.join(argv[1:])}; give flags only")
    f = flags.FLAGS
    if f.num_images < 1:
        raise SystemExit(f"error: --num_images={f.num_images}: write at least one image")
    if min(f.height, f.width) < 128:
        raise SystemExit("error: --height and --width must be at least 128 pixels")
    try:
        paths = write_film_set(
            f.out, num_images=f.num_images, seed=f.seed, image_shape=(f.height, f.width)
        )
    except OSError as e:
        raise SystemExit(f"error: --out={f.out}: cannot write there ({e})") from None
    print(f"wrote {len(paths)} films to {f.out}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("out", None, "Folder to write the PGM films and truth.npz into.")
    flags.DEFINE_integer("num_images", 40, "Number of films.")
    flags.DEFINE_integer("seed", 0, "Seed of every random choice.")
    flags.DEFINE_integer("height", 512, "Image height in pixels (mini-MIAS: 1024).")
    flags.DEFINE_integer("width", 416, "Image width in pixels.")
    flags.mark_flag_as_required("out")
    app.run(_main)
