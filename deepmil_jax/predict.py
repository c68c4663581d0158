r"""Predict mammograms with a trained model: probabilities, the most suspicious patch, heatmaps.

    python -m deepmil_jax.predict --checkpoint=runs/label_assign_fold0 --output=predictions \
        scans/ more/22678622_x_MG_R_CC_ANON.dcm

Each file (DICOM, PNG, TIFF, PGM/PPM or JPEG; folders are searched recursively) goes through the
preprocessing of training (``data_pipeline.preprocess.preprocess_file`` with the run's
``image_size``), then the network, in batches. The image's malignancy probability is the sigmoid
of the model's bag logit: the largest instance logit for the paper's schemes (max-pooling MIL,
Eq. 2-3), the scheme's own pooling for the others (attention, log-sum-exp, ...). The output
folder receives

* ``predictions.csv``, one row per input: ``file, probability, top_patch_row, top_patch_col,
  center_y, center_x, box_y0, box_x0, box_y1, box_x1, flipped, top_patch_mass_coverage, mass_iou,
  heatmap, error``. The most
  suspicious patch is the highest-scoring instance ``(top_patch_row, top_patch_col)`` of the
  ``h' x w'`` grid; ``center_y, center_x`` is its centre in full-resolution *original* pixels
  (pixel centres at integers) and ``original[box_y0:box_y1, box_x0:box_x1]`` is the patch (crop,
  flip and resize undone); for an image with an INbreast XML (below), ``top_patch_mass_coverage`` is
  the fraction of that patch inside the mass outlines and ``mass_iou`` the intersection over union
  of the patches of instance probability >= 0.5 with them (``deepmil_jax.heatmap``), blank
  without; ``heatmap`` is relative to the output folder. A file that cannot be
  read has only ``file`` and ``error`` filled in.
* ``heatmaps/<name>.png``: the original mammogram (block-averaged to at most ``--max_side``
  pixels) with the instance probabilities overlaid, the top patch framed and, when an INbreast
  XML (``AllXML/<id>.xml`` near the image, ``id`` = the file name up to the first ``_``) exists,
  the annotated mass outlines dashed.

Instance ``(r, c)`` of an ``(h', w')`` grid is taken to cover the preprocessed rows
``[r * H / h', (r + 1) * H / h')`` and the columns likewise (``deepmil_jax.heatmap``): an
approximation of its receptive field, which is larger and overlaps its neighbours'.

Unreadable files are reported (log and ``error`` column) and the others go on; the CSV is written
either way, and the exit status is non-zero when any file could not be predicted.
"""

from __future__ import annotations

if __name__ == "__main__":  # flags and --help are answered before JAX and TensorFlow load
    from deepmil_jax import cli as _cli
    from deepmil_jax import config as _settings

    _cli.parse_flags_early(_settings.Predict)

import csv
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from absl import logging
from tqdm import tqdm

from data_pipeline.errors import DataError
from data_pipeline.inbreast import file_id_of, read_mass_outlines
from data_pipeline.inbreast import image_files as find_images
from data_pipeline.lesions import mass_mask
from data_pipeline.preprocess import (
    Geometry,
    PreprocessConfig,
    outlines_inside,
    preprocess_file,
    read_image,
)
from deepmil_jax import heatmap
from deepmil_jax.cli import run_main
from deepmil_jax.config import Predict
from deepmil_jax.errors import ConfigError

__all__ = [
    "CSV_COLUMNS",
    "Prediction",
    "find_images",
    "find_mass_xml",
    "model_predict_fn",
    "predict_files",
    "write_csv",
]

CSV_COLUMNS = (
    "file",
    "probability",
    "top_patch_row",
    "top_patch_col",
    "center_y",
    "center_x",
    "box_y0",
    "box_x0",
    "box_y1",
    "box_x1",
    "flipped",
    "top_patch_mass_coverage",
    "mass_iou",
    "heatmap",
    "error",
)

# (N, H, W, 1) float32 images in [0, 1] -> (N, h', w') instance logits, or the pair
# ((N, h', w') instance scores, (N,) bag logits) for a model with its own pooling.
PredictFn = Callable[[np.ndarray], np.ndarray | tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class Prediction:
    """The result for one input file; everything but ``file`` and ``error`` is None on failure.

    Attributes:
      file: the input path.
      probability: sigmoid of the largest instance logit.
      instance_logits: ``(h', w')`` float32.
      top_patch: (row, col) of the largest instance logit.
      center: (y, x) of that patch's centre in original pixels (pixel centres at integers).
      box: (y0, x0, y1, x1) ints, ``original[y0:y1, x0:x1]`` is the patch.
      geometry: the preprocessing geometry.
      outlines: the image's mass outlines (original pixels) from its INbreast XML, if any.
      top_patch_mass_coverage: the fraction of the top patch inside those outlines
        (``heatmap.cell_coverage``); None without outlines.
      mass_iou: the thresholded heatmap's intersection over union with them
        (``heatmap.heatmap_iou``); None without outlines.
      heatmap: path of the heatmap PNG, if one was drawn.
      error: why the file could not be predicted.
    """

    file: str
    probability: float | None = None
    instance_logits: np.ndarray | None = None
    top_patch: tuple[int, int] | None = None
    center: tuple[float, float] | None = None
    box: tuple[int, int, int, int] | None = None
    geometry: Geometry | None = None
    outlines: tuple[np.ndarray, ...] = ()
    top_patch_mass_coverage: float | None = None
    mass_iou: float | None = None
    heatmap: str | None = None
    error: str | None = None

    def row(self, relative_to: str | os.PathLike | None = None) -> dict[str, str]:
        """The CSV row (``CSV_COLUMNS``); the heatmap path relative to ``relative_to`` if given."""
        if self.error is not None or self.probability is None:
            return {**dict.fromkeys(CSV_COLUMNS, ""), "file": self.file, "error": self.error or ""}
        return {
            "file": self.file,
            "probability": f"{self.probability:.6f}",
            "top_patch_row": str(self.top_patch[0]),
            "top_patch_col": str(self.top_patch[1]),
            "center_y": f"{self.center[0]:.1f}",
            "center_x": f"{self.center[1]:.1f}",
            "box_y0": str(self.box[0]),
            "box_x0": str(self.box[1]),
            "box_y1": str(self.box[2]),
            "box_x1": str(self.box[3]),
            "flipped": str(int(self.geometry.flipped)),
            "top_patch_mass_coverage": _optional(self.top_patch_mass_coverage),
            "mass_iou": _optional(self.mass_iou),
            "heatmap": (
                os.path.relpath(self.heatmap, relative_to)
                if self.heatmap and relative_to is not None
                else self.heatmap or ""
            ),
            "error": "",
        }


def _optional(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def find_mass_xml(
    image: str | os.PathLike, xml_dir: str | os.PathLike | None = None
) -> Path | None:
    """The INbreast XML of an image: ``<xml_dir>/<id>.xml`` if ``xml_dir`` is given, else
    ``AllXML/<id>.xml`` in the image's folder or up to three folders above it (or ``<id>.xml``
    beside the image); ``id`` is the file name up to the first ``_`` (INbreast's numeric id)."""
    image = Path(image)
    file_id = file_id_of(image)
    if xml_dir is not None:
        candidates = [Path(xml_dir) / f"{file_id}.xml"]
    else:
        folders = [image.parent, *list(image.parent.parents)[:3]]
        candidates = [image.parent / f"{file_id}.xml"] + [
            f / "AllXML" / f"{file_id}.xml" for f in folders
        ]
    return next((c for c in candidates if c.is_file()), None)


def _mass_outlines(
    image: Path, xml_dir: str | os.PathLike | None, shape: tuple[int, int]
) -> tuple[np.ndarray, ...]:
    """The image's mass outlines, without those mostly outside its ``shape`` (with a warning)."""
    xml = find_mass_xml(image, xml_dir)
    if xml is None:
        return ()
    try:
        return outlines_inside(read_mass_outlines(xml), shape, where=str(xml))
    except DataError as e:
        logging.warning("%s; drawing the heatmap without outlines.", e)
        return ()


def model_predict_fn(model, batch_size: int) -> PredictFn:
    """A jitted numpy function of an NNX model (in eval mode): ``(N, H, W, 1)`` images ->
    (``(N, h', w')`` instance scores, ``(N,)`` bag logits of the model's own pooling).

    Batches are padded to ``batch_size`` so that one compilation serves every batch.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, images):
        instance_logits, bag_logits = nnx.merge(graphdef, state).instances_and_bag(images)
        return instance_logits.astype(jnp.float32), bag_logits.astype(jnp.float32)

    def predict(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        outs, bags = [], []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pad = batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
            instance_logits, bag_logits = run(state, chunk)
            outs.append(np.asarray(instance_logits)[: batch_size - pad])
            bags.append(np.asarray(bag_logits)[: batch_size - pad])
        return np.concatenate(outs), np.concatenate(bags)

    return predict


def _unique_name(stem: str, used: set[str]) -> str:
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return name


def predict_files(
    predict_fn: PredictFn,
    files: Sequence[str | os.PathLike],
    *,
    image_size: int | tuple[int, int],
    output_dir: str | os.PathLike | None = None,
    batch_size: int = 8,
    heatmaps: bool = True,
    max_side: int = 1024,
    xml_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[Prediction]:
    """Predict every file; bad files (``DataError``) become predictions with ``error`` set.

    Args:
      predict_fn: ``(N, H, W, 1)`` float32 images in [0, 1] -> ``(N, h', w')`` instance logits
        (the bag logit is then their maximum), or a pair (instance scores, ``(N,)`` bag logits)
        (``model_predict_fn(model, batch_size)``, or any function, e.g. a test's fake).
      files: image paths.
      image_size: the training run's ``image_size`` (the preprocessed side, or (H, W)).
      output_dir: heatmaps go to ``output_dir/heatmaps/``; needed when ``heatmaps``.
      batch_size: images preprocessed and sent to ``predict_fn`` at a time.
      heatmaps: draw the heatmap PNGs.
      max_side: longest side of the pictures, in pixels (the coordinates stay full-resolution).
      xml_dir: where INbreast XML outlines are (default: looked for near each image).
      progress: show a tqdm progress bar.

    Returns:
      One ``Prediction`` per file, in the order of ``files``.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    config = PreprocessConfig(size=size)
    if heatmaps:
        if output_dir is None:
            raise ValueError("heatmaps=True needs an output_dir")
        heat_dir = Path(output_dir) / "heatmaps"
        heat_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    results: list[Prediction] = []
    bar = tqdm(total=len(files), desc="predict", unit="image", disable=not progress)
    for start in range(0, len(files), batch_size):
        batch = [Prediction(file=str(p)) for p in files[start : start + batch_size]]
        images = []
        for pred in batch:
            try:
                image, pred.geometry = preprocess_file(pred.file, config)
                images.append(image)
            except DataError as e:
                pred.error = str(e)
                logging.warning("Skipping %s", e)
        good = [p for p in batch if p.error is None]
        if good:
            logits, bags = _run(predict_fn, images)
            for pred, z, bag in zip(good, logits, bags, strict=True):
                _finish(pred, z, size, bag)
                _score_outlines(pred, xml_dir)
                if heatmaps:
                    name = _unique_name(Path(pred.file).stem, used)
                    pred.heatmap = str(heat_dir / f"{name}.png")
                    _draw(pred, max_side)
        results.extend(batch)
        bar.update(len(batch))
    bar.close()
    return results


def _run(predict_fn: PredictFn, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(instance logits (n, h', w'), bag logits (n,)) of the preprocessed ``images``."""
    out = predict_fn(np.stack(images)[..., None])
    logits, bags = out if isinstance(out, tuple) else (out, None)
    logits = np.asarray(logits, np.float32)
    if logits.ndim != 3 or logits.shape[0] != len(images):
        raise ValueError(
            f"predict_fn returned shape {logits.shape}; expected "
            f"({len(images)}, h', w') instance logits"
        )
    if bags is None:  # instance logits alone: max pooling, the paper's bag prediction
        bags = logits.reshape(len(images), -1).max(axis=1)
    return logits, np.asarray(bags)


def _score_outlines(pred: Prediction, xml_dir: str | os.PathLike | None) -> None:
    """The image's mass outlines (INbreast XML, if found) and, with them, the top patch's coverage
    and the heatmap's IoU."""
    pred.outlines = _mass_outlines(Path(pred.file), xml_dir, pred.geometry.original_shape)
    if pred.outlines:
        mask = mass_mask(pred.geometry, pred.outlines)
        coverage = heatmap.cell_coverage(mask, pred.instance_logits.shape)
        pred.top_patch_mass_coverage = float(coverage[pred.top_patch])
        pred.mass_iou = heatmap.heatmap_iou(pred.instance_logits, mask)


def _finish(pred: Prediction, logits: np.ndarray, size: tuple[int, int], bag: float) -> None:
    """Probability (the sigmoid of the bag logit) and the top patch in original coordinates."""
    pred.instance_logits = logits
    pred.probability = float(heatmap.sigmoid(bag))
    pred.top_patch = heatmap.top_cell(logits)
    edges = heatmap.box_to_original(
        heatmap.cell_box(*pred.top_patch, logits.shape, size), pred.geometry
    )
    pred.center = (float(edges[0] + edges[2]) / 2 - 0.5, float(edges[1] + edges[3]) / 2 - 0.5)
    pred.box = heatmap.box_to_pixel_slice(edges, pred.geometry.original_shape)


def _draw(pred: Prediction, max_side: int) -> None:
    try:
        original = read_image(pred.file)
    except DataError as e:  # read a moment ago by preprocess_file, so unlikely
        logging.warning("No heatmap for %s", e)
        pred.heatmap = None
        return
    y0, x0, y1, x1 = pred.box
    heatmap.render_heatmap(
        pred.heatmap,
        original,
        heatmap.sigmoid(pred.instance_logits),
        pred.geometry,
        outlines=pred.outlines,
        top_box=np.array([y0, x0, y1, x1], np.float64),
        title=f"{Path(pred.file).name}\nmalignancy probability {pred.probability:.3f}",
        max_side=max_side,
    )


def write_csv(predictions: Sequence[Prediction], path: str | os.PathLike) -> None:
    """``predictions.csv``: one row per prediction, columns ``CSV_COLUMNS``; heatmap paths are
    relative to the CSV's folder."""
    folder = Path(path).parent
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        out.writeheader()
        for p in predictions:
            out.writerow(p.row(relative_to=folder))


# ---------------------------------------------------------------------------------------------
# Command line (the flags are defined only when this module is the program, so importing it as
# a library leaves absl's global flags alone).


def main(argv: Sequence[str], settings: Predict) -> None:
    from deepmil_jax import checkpoints

    settings.validate()
    if len(argv) < 2:
        raise ConfigError(
            "No input: give image files or folders after the flags, e.g. "
            "python -m deepmil_jax.predict --checkpoint=runs/label_assign_fold0 "
            "scans/."
        )
    output = Path(settings.output).expanduser()
    files = find_images(argv[1:], exclude=output)
    if not files:
        raise DataError(
            f"No image files (DICOM, PNG, TIFF, PGM/PPM, JPEG) in {' '.join(argv[1:])}."
        )
    # Absolute: Orbax refuses relative checkpoint paths.
    checkpoint = Path(settings.checkpoint).expanduser().absolute()
    config, model = checkpoints.load_trained(checkpoint, which=settings.which)
    logging.info(
        "Loaded %s (%s, image_size %d); predicting %d file(s).",
        checkpoint,
        config.scheme,
        config.image_size,
        len(files),
    )
    output.mkdir(parents=True, exist_ok=True)
    predictions = predict_files(
        model_predict_fn(model, settings.batch_size),
        files,
        image_size=config.image_size,
        output_dir=output,
        batch_size=settings.batch_size,
        heatmaps=settings.heatmaps,
        max_side=settings.max_side,
        xml_dir=settings.xml_dir or None,
    )
    write_csv(predictions, output / "predictions.csv")
    bad = [p for p in predictions if p.error is not None]
    logging.info(
        "%d of %d file(s) predicted; results in %s.",
        len(predictions) - len(bad),
        len(predictions),
        output / "predictions.csv",
    )
    if bad:
        logging.warning(
            "%d file(s) could not be read (see the error column):\n%s",
            len(bad),
            "\n".join(f"  {p.error}" for p in bad),
        )
    if bad:
        raise DataError(
            f"{len(bad)} of the {len(files)} file(s) could not be predicted; the reasons are "
            f"in the error column of {output / 'predictions.csv'}."
        )


if __name__ == "__main__":
    run_main(main, Predict, positional=True)
