"""TFDS builders for INbreast (also the synthetic dataset) and any folder of mammograms + CSV.

Preparing a dataset runs ``data_pipeline.preprocess.preprocess_file`` on every image once, in a
process pool, and writes the preprocessed images (16-bit PNG inside TFRecords) with their labels
and metadata. ``prepare`` keeps each prepared copy in its own TFDS data_dir,
``data_dir/<builder>_<config>_<digest>/<builder>/<config>/<version>/``, where ``<digest>`` hashes
the copy's fingerprint (its source files' paths, sizes and modification times, the tables'
bytes, the columns, image size, ``skip_bad`` and the preprocessing code; stored in its
``metadata.json``); a copy is loaded only while its fingerprint still matches, otherwise a new one
is prepared (and the log says in one line what changed). TFDS writes into an ``incomplete.*``
folder that is renamed only when everything is written, so an interrupted preparation is never
mistaken for a dataset: the next ``prepare`` call starts again, and the previous copy stays
usable until the new one is complete. Two files with identical pixels are one image (the second
is left out with a warning, or a DataError if they disagree on label or patient).

Builders (registered with TFDS when this module is imported):

* ``inbreast``: ``manual_dir`` is the INbreast folder (``AllDICOMs/``, ``AllXML/``,
  ``INbreast.csv``); the synthetic dataset has the same layout and uses the same builder (with its
  own ``data_dir``). Configs ``"227"`` and ``"454"`` (image side in pixels); any other size works as
  a custom config.
* ``mammogram_folder``: ``manual_dir`` holds a CSV listing images and labels
  (``data_pipeline.inbreast.read_folder``); the CSV's name and columns are part of the config.
* ``mias``, ``cbis_ddsm``, ``vindr_mammo``, ``cmmd``: ``manual_dir`` is the collection as
  downloaded (``data_pipeline.collections_sources``). CBIS-DDSM's and VinDr-Mammo's official
  train/test split is kept in the metadata (``official_split``) and loaded as
  ``Examples.subsets`` (for ``folds.make_split(split="official")``).

Each has one split, ``"train"``, holding every image (folds are chosen later by
``data_pipeline.folds``; TFDS reserves the split name ``"all"``). Features: ``image`` (h, w, 1)
uint16, ``label``, ``birads``, ``patient_id``, ``laterality``, ``view``, ``file_id``,
``mass_boxes`` (b, 4) float32, and the preprocessing geometry (``original_shape``, ``crop``,
``flipped``). Files left out with ``skip_bad`` are listed in the dataset's ``metadata.json``.

``prepare`` is the entry point used by training: it prepares once (a second call only loads) and
returns everything as numpy arrays in an ``Examples``. The builders also work through TFDS
directly, e.g. ``tfds.load("inbreast/227", data_dir=..., download_and_prepare_kwargs={
"download_config": tfds.download.DownloadConfig(manual_dir=...)})``.

Preparation preprocesses in ``os.cpu_count()`` worker processes started by a ``forkserver``
(TensorFlow is loaded in this process, so it is not forked) that import only
``data_pipeline.preprocess``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import multiprocessing
import os
import shutil
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from tqdm import tqdm

from data_pipeline import collections_sources as _collections
from data_pipeline import inbreast as _reader
from data_pipeline import lesions as _lesions
from data_pipeline import preprocess as _preprocess_module
from data_pipeline.errors import DataError
from data_pipeline.inbreast import (
    TABLE_NAMES,
    BadFile,
    Record,
    listed_images,
    read_folder,
    read_inbreast,
)
from data_pipeline.input_pipeline import hide_gpus
from data_pipeline.preprocess import (
    DICOM_SUFFIXES,
    RASTER_SUFFIXES,
    Geometry,
    PreprocessConfig,
    preprocess_file,
)
from data_pipeline.workers import die_with

__all__ = [
    "SOURCES",
    "Examples",
    "FolderConfig",
    "Inbreast",
    "MammogramConfig",
    "MammogramFolder",
    "get_builder",
    "prepare",
]

hide_gpus()

COLLECTIONS = ("mias", "cbis_ddsm", "vindr_mammo", "cmmd")  # data_pipeline.collections_sources
SOURCES = ("inbreast", "synthetic", "synthetic_hard", "folder", *COLLECTIONS)
# the synthetic sources: INbreast-layout data written by data_pipeline.synthetic in that style
SYNTHETIC_STYLES = {"synthetic": "easy", "synthetic_hard": "hard"}
_UINT16_MAX = 65535

_CITATION_INBREAST = """\
@article{moreira2012inbreast,
  title={INbreast: toward a full-field digital mammographic database},
  author={Moreira, In{\\^e}s C and Amaral, Igor and Domingues, In{\\^e}s and Cardoso, Ant{\\'o}nio
          and Cardoso, Maria Jo{\\~a}o and Cardoso, Jaime S},
  journal={Academic Radiology}, volume={19}, number={2}, pages={236--248}, year={2012}
}
@inproceedings{zhu2017deep,
  title={Deep Multi-instance Networks with Sparse Label Assignment for Whole Mammogram
         Classification},
  author={Zhu, Wentao and Lou, Qi and Vang, Yeeleng Scott and Xie, Xiaohui},
  booktitle={MICCAI}, pages={603--611}, year={2017}
}
"""


# --------------------------------------------------------------------------------------------------
# Configs and features.


@dataclasses.dataclass
class MammogramConfig(tfds.core.BuilderConfig):
    """A prepared dataset's preprocessing.

    Attributes:
      image_size: (h, w) of the stored images (the paper: 227 x 227).
      flip: flip every breast so that the chest wall is on the left (PreprocessConfig.flip).
    """

    image_size: tuple[int, int] = (227, 227)
    flip: bool = True

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig(size=tuple(self.image_size), flip=self.flip)


@dataclasses.dataclass
class FolderConfig(MammogramConfig):
    """Config of ``mammogram_folder``: which CSV under ``manual_dir`` and which of its columns."""

    csv_name: str = "labels.csv"
    image_column: str = "image"
    label_column: str = "label"
    patient_column: str | None = None


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int | np.integer):
        size = (int(image_size), int(image_size))
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 8:
        raise DataError(
            f"image_size={image_size!r}: give one int (square images, e.g. 227) or (h, w), at "
            "least 8 pixels."
        )
    return size


def _config_name(size: tuple[int, int]) -> str:
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


def _features(size: tuple[int, int]) -> tfds.features.FeaturesDict:
    h, w = size
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(
                shape=(h, w, 1),
                dtype=np.uint16,
                encoding_format="png",
                doc="Preprocessed mammogram (crop, flip, resize), intensity * 65535.",
            ),
            "label": tfds.features.ClassLabel(
                names=["negative", "positive"], doc="1 iff BI-RADS >= 4 (paper, Sec. 3)."
            ),
            "birads": tfds.features.Text(doc="BI-RADS assessment (1..6, 4a/4b/4c); '' if none."),
            "patient_id": tfds.features.Text(),
            "laterality": tfds.features.Text(doc="'L', 'R' or ''."),
            "view": tfds.features.Text(doc="'CC', 'MLO' or ''."),
            "file_id": tfds.features.Text(),
            "mass_boxes": tfds.features.Tensor(
                shape=(None, 4),
                dtype=np.float32,
                doc="Mass bounding boxes (y0, x0, y1, x1) in preprocessed pixel coordinates.",
            ),
            "mass_mask": tfds.features.Image(
                shape=(h, w, 1),
                dtype=np.uint8,
                encoding_format="png",
                doc="255 x each pixel's fraction inside mass outlines (data_pipeline.lesions).",
            ),
            "original_shape": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "crop": tfds.features.Tensor(
                shape=(4,), dtype=np.int32, doc="(y0, x0, y1, x1) in original pixels."
            ),
            "flipped": tfds.features.Scalar(dtype=np.bool_),
        }
    )


# --------------------------------------------------------------------------------------------------
# Generation: preprocessing in a bounded process pool, yielding examples one by one.


def _pixels(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * _UINT16_MAX).astype(np.uint16)


def _pixel_digest(pixels: np.ndarray, geometry: Geometry) -> str:
    """Identifies an image by its content: sha256 of the preprocessed uint16 pixels with the
    original shape, crop box and flip. Two files with the same decoded pixels give the same
    digest (preprocessing is deterministic); two different mammograms would have to agree on
    their original shape, breast box and every preprocessed pixel to collide. (Hashing the
    preprocessed image rather than the decoded one keeps ``preprocess_file`` as the workers'
    one job; a copy converted with a loss, e.g. DICOM to 8-bit PNG, is not detected.)"""
    digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes())
    digest.update(repr((geometry.original_shape, geometry.crop, geometry.flipped)).encode())
    return digest.hexdigest()


def _check_copies(kept: Record, copy: Record) -> None:
    """Raises DataError when two files with the same pixels disagree on label or patient.

    A patient id equal to the file id is the readers' stand-in for "unknown" (each image its own
    patient), so it does not disagree with anything."""
    problems = []
    if kept.label != copy.label:
        problems.append(f"label {kept.label} vs {copy.label}")
    known = [r.patient_id for r in (kept, copy) if r.patient_id != r.file_id]
    if kept.patient_id != copy.patient_id and len(known) == 2:
        problems.append(f"patient {kept.patient_id!r} vs {copy.patient_id!r}")
    if problems:
        raise DataError(
            f"{kept.path} (image {kept.file_id}) and {copy.path} (image {copy.file_id}) hold the "
            f"same pixels but disagree: {', '.join(problems)}. Correct the label or patient of "
            "one of them in the table, or remove one of the copies."
        )


def _example(record: Record, image: np.ndarray, geometry: Geometry) -> dict[str, Any]:
    pixels = _pixels(image)
    # Outlines mostly outside the image are dropped with a warning (preprocess.outlines_inside).
    outlines = _preprocess_module.outlines_inside(
        record.masses, geometry.original_shape, where=str(record.path)
    )
    boxes = _preprocess_module.mass_boxes(geometry, outlines)
    return {
        "image": pixels[:, :, None],
        "label": int(record.label),
        "birads": record.birads,
        "patient_id": record.patient_id,
        "laterality": record.laterality,
        "view": record.view,
        "file_id": record.file_id,
        "mass_boxes": boxes,
        "mass_mask": _lesions.mass_mask(geometry, outlines)[:, :, None],
        "original_shape": np.array(geometry.original_shape, np.int32),
        "crop": np.array(geometry.crop, np.int32),
        "flipped": bool(geometry.flipped),
    }


@contextlib.contextmanager
def _plain_main() -> Iterator[None]:
    """While worker processes start, ``__main__`` is an empty module.

    Python re-imports the program's main module in every ``spawn``/``forkserver`` worker (so
    ``python -m deepmil_jax.train`` would load JAX and TF in each); the workers run
    ``preprocess_file`` and need nothing from it.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def _executor(num_workers: int) -> ProcessPoolExecutor:
    """Worker processes that import only ``data_pipeline.preprocess``.

    This process has TensorFlow loaded (maybe JAX too), so workers are not forked from it: they
    come from a ``forkserver`` (``spawn`` where there is none). A ProcessPoolExecutor rather than
    a multiprocessing.Pool, so that a worker that dies (a decoder crash, out of memory) gives an
    error instead of a hang. The workers die with this process (``data_pipeline.workers``), so a
    killed preparation leaves no process behind.
    """
    methods = multiprocessing.get_all_start_methods()
    method = "forkserver" if "forkserver" in methods else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["data_pipeline.preprocess", "data_pipeline.workers"])
    # Each worker exits when this process dies, even by kill -9 (data_pipeline.workers).
    return ProcessPoolExecutor(
        max_workers=num_workers,
        mp_context=context,
        initializer=die_with,
        initargs=(os.getpid(),),
    )


def _preprocessed(
    records: Sequence[Record], config: PreprocessConfig, num_workers: int
) -> Iterator[tuple[Record, np.ndarray | None, Geometry | None, DataError | None]]:
    """(record, image, geometry, error) in the order of ``records``.

    Runs ``preprocess_file`` in ``num_workers`` processes (in this process if 0 or 1) with at most
    ``2 * num_workers`` images in flight, so memory stays bounded whatever the dataset's size:
    only the preprocessed images travel back, one full-size image is decoded per worker at a time.
    """
    if num_workers <= 1 or len(records) <= 1:
        for record in records:
            try:
                image, geometry = preprocess_file(record.path, config)
            except DataError as error:
                yield record, None, None, error
            else:
                yield record, image, geometry, None
        return
    executor = _executor(num_workers)
    pending: collections.deque[tuple[Record, Future]] = collections.deque()
    todo = iter(records)

    def submit() -> None:
        record = next(todo, None)
        if record is not None:
            with _plain_main():  # the executor starts its workers while submitting
                pending.append((record, executor.submit(preprocess_file, record.path, config)))

    try:
        for _ in range(2 * num_workers):
            submit()
        while pending:
            record, future = pending.popleft()
            try:
                image, geometry = future.result()
            except DataError as error:
                yield record, None, None, error
            except BrokenProcessPool as error:
                in_flight = [str(record.path)] + [str(r.path) for r, _ in pending]
                raise DataError(
                    "A preprocessing worker died (a crash in an image decoder, or out of memory) "
                    f"while reading one of: {', '.join(in_flight)}. Run with num_workers=0 to "
                    "find the file, or with fewer workers if memory is short."
                ) from error
            else:
                yield record, image, geometry, None
            submit()
    finally:
        executor.shutdown(wait=not pending, cancel_futures=True)


class _MammogramBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared generation; subclasses say how to read the records from ``manual_dir``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    # Nothing is downloaded, so there are no URL checksums. Setting this also avoids TFDS 4.9.10's
    # lookup of the builder's code path, which imports `importlib_resources` (not installed on
    # Python >= 3.9: tensorflow/datasets#11212).
    url_infos = None

    def _log_download_bytes(self) -> None:
        """Silent: TFDS would print "Downloading and preparing dataset Unknown size ..." (nothing
        is downloaded); ``prepare`` logs what it prepares, from where, in one line."""

    def _log_download_done(self) -> None:
        """Silent: TFDS would print "Dataset ... downloaded and prepared"."""

    def __init__(self, *, skip_bad: bool = False, num_workers: int | None = None, **kwargs: Any):
        """Args beyond TFDS's (``data_dir``, ``config``, ...), used only when preparing:

        skip_bad: leave out (and list in the metadata) files that cannot be read, instead of
          failing.
        num_workers: preprocessing processes; None: ``os.cpu_count()``; 0: in this process.
        """
        self._skip_bad = skip_bad
        self._num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        self._fingerprint: dict[str, Any] | None = None  # set by prepare(); kept in the metadata
        super().__init__(**kwargs)
        self._final_dir = Path(os.fspath(self.data_dir))  # TFDS writes to incomplete.* first

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._DESCRIPTION,
            features=_features(tuple(self.builder_config.image_size)),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep the records' order (sorted by file id)
            metadata=tfds.core.MetadataDict(),
            citation=_CITATION_INBREAST,
        )

    _DESCRIPTION = ""

    def _read_records(self, manual_dir: Path) -> tuple[list[Record], list[BadFile]]:
        raise NotImplementedError

    def _source_metadata(self, manual_dir: Path) -> dict[str, Any]:
        return {"manual_dir": str(manual_dir.resolve())}

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        manual_dir = Path(os.fspath(dl_manager.manual_dir))
        records, bad = self._read_records(manual_dir)
        self.info.metadata.update(self._source_metadata(manual_dir))
        if self._fingerprint is not None:
            self.info.metadata["fingerprint"] = self._fingerprint
        # One split holding every example (folds are chosen later). TFDS reserves the name "all"
        # (it means the union of all splits when reading), so the split is called "train".
        return {"train": self._generate_examples(records, list(bad))}

    def _generate_examples(
        self, records: list[Record], bad: list[BadFile]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        config = self.builder_config.preprocess_config()
        workers = min(self._num_workers, len(records))
        logging.info(
            "Preprocessing %d images to %s with %d worker(s).", len(records), config.size, workers
        )
        key = 0
        seen: dict[str, Record] = {}  # pixel digest -> the record kept
        duplicates: list[list[str]] = []
        stream = _preprocessed(records, config, workers)
        for record, image, geometry, error in tqdm(
            stream, total=len(records), desc=f"Preprocessing {self.name}", unit="image"
        ):
            if error is not None:
                if not self._skip_bad:
                    raise DataError(
                        f"{error} Or pass skip_bad=True (--skip_bad) to leave such files out."
                    ) from error
                logging.warning("left out %s: %s", record.path, error)
                bad.append(BadFile(str(record.path), str(error)))
                continue
            digest = _pixel_digest(_pixels(image), geometry)
            kept = seen.setdefault(digest, record)
            if kept is not record:
                _check_copies(kept, record)
                logging.warning(
                    "%s and %s hold the same image (identical pixels); keeping only %s.",
                    kept.path,
                    record.path,
                    kept.file_id,
                )
                duplicates.append([str(kept.path), str(record.path)])
                continue
            yield key, _example(record, image, geometry)
            key += 1
        if key == 0:
            raise DataError(
                f"No image of {len(records)} could be preprocessed; see the files listed in the "
                "log and fix them."
            )
        self.info.metadata["bad_files"] = [dataclasses.asdict(b) for b in bad]
        self.info.metadata["num_examples"] = key
        self.info.metadata["duplicates"] = duplicates
        if bad:
            logging.warning(
                "%d file(s) left out of %s (listed in %s/metadata.json): %s",
                len(bad),
                self.name,
                self._final_dir,  # not self.data_dir: the incomplete.* folder, renamed at the end
                "; ".join(f"{b.path}: {b.reason}" for b in bad[:5])
                + (" ..." if len(bad) > 5 else ""),
            )


class Inbreast(_MammogramBuilder):
    """INbreast (Moreira et al. 2012): 410 full-field digital mammograms, 115 patients."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    INbreast is distributed on request by its authors (see
    https://biokeanos.com/source/INBreast or the paper by Moreira et al., Academic Radiology 2012).
    Unpack it and give its folder as manual_dir (--manual_dir); it must hold
    `AllDICOMs/<id>_<patient>_MG_<L|R>_<CC|MLO>_ANON.dcm`, `AllXML/<id>.xml` and `INbreast.csv`
    (the distribution's INbreast.xls saved as CSV, semicolon- or comma-separated).
    The synthetic dataset (`python -m data_pipeline.synthetic --out=DIR`) has the same layout.
    """
    BUILDER_CONFIGS = [
        MammogramConfig(name="227", image_size=(227, 227), description="227 x 227 (paper)."),
        MammogramConfig(name="454", image_size=(454, 454), description="454 x 454."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "227"
    _DESCRIPTION = (
        "INbreast full-field digital mammograms, preprocessed as in Zhu et al. (MICCAI 2017): "
        "breast mask (Otsu), crop, flip to one side, resize. Label 1 iff BI-RADS >= 4."
    )

    def _read_records(self, manual_dir: Path) -> tuple[list[Record], list[BadFile]]:
        return read_inbreast(manual_dir, skip_bad=self._skip_bad)


class MammogramFolder(_MammogramBuilder):
    """Any folder of mammograms (DICOM, PNG, TIFF) listed with labels in a CSV."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put the images and a CSV into one folder and give the folder as manual_dir. The CSV (named in
    the config, default `labels.csv`) has a row per image with its path relative to the CSV
    (column `image`) and its label 0/1 (column `label`); optional columns: a patient id, `birads`,
    `laterality`, `view`.
    """
    _DESCRIPTION = "Mammograms listed in a CSV, preprocessed as in Zhu et al. (MICCAI 2017)."

    def _read_records(self, manual_dir: Path) -> tuple[list[Record], list[BadFile]]:
        config: FolderConfig = self.builder_config
        return read_folder(
            manual_dir / config.csv_name,
            image_column=config.image_column,
            label_column=config.label_column,
            patient_column=config.patient_column,
            skip_bad=self._skip_bad,
        )

    def _source_metadata(self, manual_dir: Path) -> dict[str, Any]:
        config: FolderConfig = self.builder_config
        return {
            "manual_dir": str(manual_dir.resolve()),
            "csv_name": config.csv_name,
            "columns": [config.image_column, config.label_column, config.patient_column],
        }


class _CollectionBuilder(_MammogramBuilder, skip_registration=True):
    """A public collection read as distributed (``data_pipeline.collections_sources``)."""

    _SOURCE = ""
    BUILDER_CONFIGS = [
        MammogramConfig(name="227", image_size=(227, 227), description="227 x 227 (paper)."),
        MammogramConfig(name="454", image_size=(454, 454), description="454 x 454."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "227"

    def _read_records(self, manual_dir: Path) -> tuple[list[Record], list[BadFile]]:
        records, bad = _collections.READERS[self._SOURCE](manual_dir, skip_bad=self._skip_bad)
        # the collection's own train/test split, for folds.make_split(split="official")
        self.info.metadata["official_split"] = {r.file_id: r.subset for r in records if r.subset}
        return records, bad


class Mias(_CollectionBuilder):
    """mini-MIAS (Suckling et al. 1994): 322 scanned-film MLO mammograms, 161 women."""

    _SOURCE = "mias"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download mini-MIAS (all-mias.tar.gz, http://peipa.essex.ac.uk/info/mias.html), unpack it and
    give its folder as manual_dir: it holds Info.txt and mdb001.pgm ... mdb322.pgm.
    """
    _DESCRIPTION = "mini-MIAS scanned-film mammograms; label 1 iff an abnormality is malignant."


class CbisDdsm(_CollectionBuilder):
    """CBIS-DDSM (Lee et al. 2017): scanned-film mammograms with biopsy-proven pathology."""

    _SOURCE = "cbis_ddsm"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download CBIS-DDSM from TCIA (https://www.cancerimagingarchive.net/collection/cbis-ddsm/): the
    images with the NBIA Data Retriever (its CBIS-DDSM/ folder, either directory layout) and the
    four case description CSVs (mass_case_description_train_set.csv, ..._test_set.csv,
    calc_case_description_train_set.csv, ..._test_set.csv). Give the folder holding both as
    manual_dir.
    """
    _DESCRIPTION = "CBIS-DDSM full mammograms; label 1 iff an abnormality is MALIGNANT."


class VindrMammo(_CollectionBuilder):
    """VinDr-Mammo (Nguyen et al. 2023): 20,000 full-field digital mammograms, 5,000 studies."""

    _SOURCE = "vindr_mammo"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download VinDr-Mammo from PhysioNet (https://physionet.org/content/vindr-mammo/1.0.0/, a
    credentialed download) and give its folder as manual_dir: it holds
    breast-level_annotations.csv, finding_annotations.csv and images/<study_id>/<image_id>.dicom.
    """
    _DESCRIPTION = "VinDr-Mammo mammograms; label 1 iff the breast's BI-RADS is 4 or more."


class Cmmd(_CollectionBuilder):
    """CMMD (Cui et al. 2021): 3,728 full-field digital mammograms of 1,775 Chinese patients."""

    _SOURCE = "cmmd"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download CMMD from TCIA (https://www.cancerimagingarchive.net/collection/cmmd/): the images
    with the NBIA Data Retriever (its CMMD/ folder) and CMMD_clinicaldata_revision.xlsx. Give the
    folder holding both as manual_dir.
    """
    _DESCRIPTION = "CMMD mammograms; label 1 iff the breast's classification is Malignant."


_COLLECTION_BUILDERS = {b._SOURCE: b for b in (Mias, CbisDdsm, VindrMammo, Cmmd)}


# --------------------------------------------------------------------------------------------------
# prepare(): prepare once, load into memory.


@dataclasses.dataclass
class Examples:
    """A whole prepared dataset in memory (n examples, in file-id order).

    Attributes:
      images: ``(n, h, w)`` uint16, intensity * 65535 (input_pipeline scales by 1/65535).
      labels: ``(n,)`` int32, 1 iff BI-RADS >= 4.
      birads, patient_ids, file_ids, laterality, view: ``(n,)`` str arrays ('' when unknown).
      mass_boxes: n arrays ``(b, 4)`` float32 (y0, x0, y1, x1) in preprocessed pixels.
      mass_masks: ``(n, h, w)`` uint8, 255 x the fraction of each preprocessed pixel inside a
        mass outline (``data_pipeline.lesions``); all zero for an image without outlines.
      bad_files: the files left out when the dataset was prepared with ``skip_bad=True``.
      geometries: n ``Geometry``: where each image came from in its original (for heatmaps).
      subsets: ``(n,)`` str, "train" or "test" in the collection's official split ('' where it
        has none; None when not loaded from a prepared dataset).
    """

    images: np.ndarray
    labels: np.ndarray
    birads: np.ndarray
    patient_ids: np.ndarray
    file_ids: np.ndarray
    laterality: np.ndarray
    view: np.ndarray
    mass_boxes: list[np.ndarray]
    mass_masks: np.ndarray
    bad_files: list[BadFile] = dataclasses.field(default_factory=list)
    geometries: list[Geometry] = dataclasses.field(default_factory=list)
    subsets: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _folder_csv(manual_dir: Path) -> tuple[Path, str]:
    """(folder, csv name) from ``manual_dir`` = a CSV file or a folder with exactly one CSV."""
    if manual_dir.is_file():
        return manual_dir.parent, manual_dir.name
    if not manual_dir.is_dir():
        raise DataError(f"{manual_dir}: no such folder or CSV file; check --manual_dir.")
    csvs = sorted(p.name for p in manual_dir.glob("*.csv"))
    if "labels.csv" in csvs:
        return manual_dir, "labels.csv"
    if len(csvs) != 1:
        raise DataError(
            f"{manual_dir}: found {len(csvs)} CSV files ({', '.join(csvs) or 'none'}); give "
            "the CSV file itself as manual_dir, or name it labels.csv."
        )
    return manual_dir, csvs[0]


def get_builder(
    source: str,
    *,
    manual_dir: str | os.PathLike | None,
    data_dir: str | os.PathLike,
    image_size: int | Sequence[int] = 227,
    skip_bad: bool = False,
    num_workers: int | None = None,
    image_column: str = "image",
    label_column: str = "label",
    patient_column: str | None = None,
) -> tuple[tfds.core.DatasetBuilder, Path | None]:
    """The TFDS builder for ``source`` and the manual_dir to prepare it from (see ``prepare``)."""
    if source not in SOURCES:
        raise DataError(f"source={source!r} is not a dataset source; use one of {SOURCES}.")
    size = _size(image_size)
    name = _config_name(size)
    manual = Path(manual_dir).expanduser() if manual_dir is not None else None
    kwargs = dict(data_dir=os.fspath(data_dir), skip_bad=skip_bad, num_workers=num_workers)
    if source == "folder":
        if manual is None:
            raise DataError('source="folder" needs manual_dir: the CSV or the folder holding it.')
        manual, csv_name = _folder_csv(manual)
        config = FolderConfig(
            name=name,
            image_size=size,
            csv_name=csv_name,
            image_column=image_column,
            label_column=label_column,
            patient_column=patient_column,
        )
        with _quiet_about_custom_configs():
            return MammogramFolder(config=config, **kwargs), manual
    builder_class = _COLLECTION_BUILDERS.get(source, Inbreast)
    predefined = builder_class.builder_configs.get(name)
    config = predefined or MammogramConfig(name=name, image_size=size)
    with _quiet_about_custom_configs():
        return builder_class(config=config, **kwargs), manual


@contextlib.contextmanager
def _quiet_about_custom_configs() -> Iterator[None]:
    """Without TFDS's warning "Using custom data configuration": every image size but 227 and
    454, and every folder CSV, is a custom config, and nothing is wrong with that."""

    def not_about_custom_configs(record: Any) -> bool:
        return not record.getMessage().startswith("Using custom data configuration")

    absl_logger = logging.get_absl_logger()
    absl_logger.addFilter(not_about_custom_configs)
    try:
        yield
    finally:
        absl_logger.removeFilter(not_about_custom_configs)


# --------------------------------------------------------------------------------------------------
# Fingerprints: a prepared dataset is reused only if it was made from the same inputs.

_FINGERPRINT_FORMAT = 1
_SOURCE_SUFFIXES = DICOM_SUFFIXES | RASTER_SUFFIXES | {".xml"}


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


@functools.cache
def _code_version() -> str:
    """Hash of the code that decides a prepared dataset's content: the source of
    ``data_pipeline.preprocess`` and of the readers (``data_pipeline.inbreast``), and of the
    example encoding here. Any edit there prepares datasets anew, so there is no version to bump.
    Computed once, when this module is imported: the code this process runs, even if the files
    are edited later."""
    digest = hashlib.sha256()
    for module in (_preprocess_module, _reader, _lesions, _collections):
        digest.update(Path(module.__file__).read_bytes())
    for function in (_pixels, _pixel_digest, _example, _features):
        digest.update(inspect.getsource(function).encode())
    digest.update(inspect.getsource(_MammogramBuilder._generate_examples).encode())
    return digest.hexdigest()[:16]


def _source_key(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _fingerprint(builder: _MammogramBuilder, manual: Path, skip_bad: bool) -> dict[str, Any]:
    """Everything that decides a prepared dataset's content, cheaply (stat, no image decoding).

    The source files (every image and XML under an INbreast-layout folder; every image a folder
    CSV lists) by path relative to ``manual`` with size and modification time in ns (None when
    missing), the tables' sha256, the config (image size, flip, CSV name and columns),
    ``skip_bad``, the builder's name and version, and the code version (``_code_version``).
    """
    config = builder.builder_config
    fingerprint: dict[str, Any] = {
        "format": _FINGERPRINT_FORMAT,
        "builder": builder.name,
        "version": str(builder.version),
        "image_size": [int(v) for v in config.image_size],
        "flip": bool(config.flip),
        "skip_bad": bool(skip_bad),
    }
    tables: dict[str, str | None] = {}
    if isinstance(config, FolderConfig):
        fingerprint.update(
            csv_name=config.csv_name,
            image_column=config.image_column,
            label_column=config.label_column,
            patient_column=config.patient_column,
        )
        csv_path = manual / config.csv_name
        tables[config.csv_name] = _sha256(csv_path)
        paths = listed_images(csv_path, config.image_column)
    else:
        source = getattr(builder, "_SOURCE", "")
        collection_tables = set(_collections.table_files(source, manual)) if source else set()
        paths = []
        for path in sorted(manual.rglob("*")):
            if path.name.lower() in TABLE_NAMES or path in collection_tables:
                tables[_source_key(path, manual)] = _sha256(path)
            elif path.suffix.lower() in _SOURCE_SUFFIXES:
                paths.append(path)
    files: dict[str, list[int] | None] = {}
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            files[_source_key(path, manual)] = None
        else:
            if not os.path.isdir(path):
                files[_source_key(path, manual)] = [int(stat.st_size), int(stat.st_mtime_ns)]
    fingerprint["tables"] = tables
    fingerprint["files"] = files
    fingerprint["code"] = _code_version()
    return fingerprint


_code_version()  # now, while the files are those that were imported


def _digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _difference(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """What changed between two fingerprints, in one line."""
    if not old:
        return "it carries no fingerprint (prepared by an older version)"
    parts = []
    for key in sorted((set(old) | set(new)) - {"tables", "files", "code"}):
        if old.get(key) == new.get(key):
            continue
        parts.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    if old.get("code") != new.get("code"):
        parts.append("preprocessing code changed")
    old_tables, new_tables = old.get("tables") or {}, new.get("tables") or {}
    for name in sorted(set(old_tables) | set(new_tables)):
        if old_tables.get(name) != new_tables.get(name):
            parts.append(f"table {name} changed")
    old_files, new_files = old.get("files") or {}, new.get("files") or {}
    changed = [k for k in new_files if k in old_files and old_files[k] != new_files[k]]
    added = [k for k in new_files if k not in old_files]
    removed = [k for k in old_files if k not in new_files]
    if changed or added or removed:
        first = sorted(changed + added + removed)[0]
        parts.append(
            f"{len(changed) + len(added) + len(removed)} source file(s) changed/added/removed "
            f"({len(changed)}/{len(added)}/{len(removed)}; first: {first})"
        )
    return "; ".join(parts) or "the fingerprint differs"


def _copy_prefix(builder: tfds.core.DatasetBuilder) -> str:
    return f"{builder.name}_{builder.builder_config.name}_"


def _version_dir(copy: Path, builder: tfds.core.DatasetBuilder) -> Path:
    return copy / builder.name / builder.builder_config.name / str(builder.version)


def _prepared_copies(data_dir: Path, builder: tfds.core.DatasetBuilder) -> list[Path]:
    """The complete prepared copies of ``builder``'s dataset and config under ``data_dir``
    (folders ``<builder>_<config>_<fingerprint digest>``), newest first."""
    if not data_dir.is_dir():
        return []
    found = []
    for copy in data_dir.glob(_copy_prefix(builder) + "*"):
        info = _version_dir(copy, builder) / "dataset_info.json"
        if info.is_file():
            found.append((info.stat().st_mtime_ns, copy))
    return [copy for _, copy in sorted(found, reverse=True)]


def _stored_fingerprint(version_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((version_dir / "metadata.json").read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    return (Path(os.fspath(builder.data_path)) / "dataset_info.json").exists()


def _ensure_synthetic(manual_dir: Path, num_images: int, style: str) -> None:
    if manual_dir.is_dir() and any(p.name.lower() == "inbreast.csv" for p in manual_dir.iterdir()):
        return
    from data_pipeline.synthetic import write_synthetic_inbreast

    logging.info(
        "No synthetic INbreast at %s; writing one (%s style, %d images, seed 0).",
        manual_dir,
        style,
        num_images,
    )
    if manual_dir.is_dir() and any(manual_dir.iterdir()):
        write_synthetic_inbreast(manual_dir, num_images=num_images, style=style)
        return
    # written aside and renamed, so that an interrupted run leaves no half-written dataset
    partial = manual_dir.with_name(manual_dir.name + ".partial")
    write_synthetic_inbreast(partial, num_images=num_images, style=style)
    partial.rename(manual_dir)


def _load(builder: tfds.core.DatasetBuilder) -> Examples:
    ds = builder.as_dataset(split="train", shuffle_files=False)
    fields: dict[str, list[Any]] = collections.defaultdict(list)
    text = ("birads", "patient_id", "file_id", "laterality", "view")
    for example in tfds.as_numpy(ds):
        fields["image"].append(example["image"][:, :, 0])
        fields["label"].append(int(example["label"]))
        for name in text:
            fields[name].append(example[name].decode("utf-8"))
        fields["mass_boxes"].append(np.asarray(example["mass_boxes"], np.float32).reshape(-1, 4))
        fields["mass_mask"].append(example["mass_mask"][:, :, 0])
        size = tuple(int(s) for s in example["image"].shape[:2])
        fields["geometry"].append(
            Geometry(
                original_shape=tuple(int(v) for v in example["original_shape"]),
                crop=tuple(int(v) for v in example["crop"]),
                flipped=bool(example["flipped"]),
                size=size,
            )
        )
    h, w = builder.builder_config.image_size
    metadata = builder.info.metadata or {}
    bad = [BadFile(**b) for b in metadata.get("bad_files", [])]
    official = metadata.get("official_split") or {}
    return Examples(
        images=np.stack(fields["image"]) if fields["image"] else np.zeros((0, h, w), np.uint16),
        labels=np.array(fields["label"], dtype=np.int32),
        birads=np.array(fields["birads"], dtype=str),
        patient_ids=np.array(fields["patient_id"], dtype=str),
        file_ids=np.array(fields["file_id"], dtype=str),
        laterality=np.array(fields["laterality"], dtype=str),
        view=np.array(fields["view"], dtype=str),
        mass_boxes=fields["mass_boxes"],
        mass_masks=(
            np.stack(fields["mass_mask"]) if fields["mass_mask"] else np.zeros((0, h, w), np.uint8)
        ),
        bad_files=bad,
        geometries=fields["geometry"],
        subsets=np.array([official.get(f, "") for f in fields["file_id"]], dtype=str),
    )


def prepare(
    source: str,
    *,
    manual_dir: str | os.PathLike | None,
    data_dir: str | os.PathLike,
    image_size: int | Sequence[int] = 227,
    skip_bad: bool = False,
    num_workers: int | None = None,
    image_column: str = "image",
    label_column: str = "label",
    patient_column: str | None = None,
    synthetic_images: int = 80,
) -> Examples:
    """Prepares a dataset once with TFDS, then loads all of it into memory.

    The first call preprocesses every image (``preprocess_file``, in ``num_workers`` processes,
    with a progress bar) and writes the TFDS dataset under
    ``data_dir/<builder>_<config>_<digest>/`` (a TFDS data_dir), where ``<digest>`` is a hash of
    the dataset's fingerprint: everything that decides its content (the source files' paths,
    sizes and modification times, the tables' bytes, the CSV columns, the image size,
    ``skip_bad`` and the preprocessing/reader code; see ``_fingerprint``). Every later call
    computes the fingerprint again (stat calls and one table hash: cheap) and only loads the copy
    when it matches; otherwise it logs in one line what changed and prepares anew into the new
    digest's folder. The old copy stays untouched and usable until the new one is complete
    (TFDS writes to an ``incomplete.*`` folder and renames it at the end), and is deleted then.
    An interrupted preparation leaves no dataset behind, so the next call prepares again. With
    ``manual_dir=None`` the newest prepared copy is loaded unchecked (with a warning).

    Args:
      source: ``"inbreast"`` (``manual_dir`` = the INbreast folder), ``"synthetic"`` or
        ``"synthetic_hard"`` (the same builder; if ``manual_dir`` holds no ``INbreast.csv`` yet,
        the synthetic dataset is written there first, in the easy or hard style of
        ``data_pipeline.synthetic``) or ``"folder"`` (``manual_dir`` = a CSV file, or a folder
        with one CSV or a ``labels.csv``; columns ``image_column``, ``label_column``,
        ``patient_column``), or a public collection as downloaded: ``"mias"``, ``"cbis_ddsm"``,
        ``"vindr_mammo"``, ``"cmmd"`` (``data_pipeline.collections_sources``).
      manual_dir: where the raw data is.
      data_dir: where TFDS datasets are written (use one per raw dataset: a second INbreast-layout
        folder prepared into the same ``data_dir`` would replace the first one's copy).
      image_size: side of the square images (227 in the paper) or (h, w).
      skip_bad: leave out unreadable files instead of failing; they are recorded in the dataset's
        metadata (``metadata.json``, ``Examples.bad_files``) and summarised in the log.
      num_workers: preprocessing processes (None: ``os.cpu_count()``; 0: in this process).
      synthetic_images: for the synthetic sources, how many images to write when ``manual_dir``
        holds none.

    Returns:
      ``Examples`` in file-id order.

    Raises:
      DataError: unknown source, missing/unreadable data (naming the file and the fix), two
        copies of one image (identical pixels) with different labels or patients.
    """
    builder_in = functools.partial(
        get_builder,
        source,
        manual_dir=manual_dir,
        image_size=image_size,
        skip_bad=skip_bad,
        num_workers=num_workers,
        image_column=image_column,
        label_column=label_column,
        patient_column=patient_column,
    )
    base, manual = builder_in(data_dir=data_dir)
    data_dir = Path(os.fspath(data_dir)).expanduser()
    if manual is None:
        return _load_unchecked(builder_in, base, data_dir)
    if source in SYNTHETIC_STYLES:
        _ensure_synthetic(manual, synthetic_images, SYNTHETIC_STYLES[source])
    if not manual.is_dir() or not any(manual.iterdir()):
        raise DataError(
            f"{manual}: no such folder, or it is empty; check manual_dir. "
            f"{base.MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    return _load_or_prepare(builder_in, base, source, manual, data_dir, skip_bad)


def _load_unchecked(
    builder_in: Callable[..., tuple[Any, Path | None]],
    base: tfds.core.DatasetBuilder,
    data_dir: Path,
) -> Examples:
    """The newest prepared copy under ``data_dir``, loaded without a fingerprint check (there
    is no manual_dir to check it against)."""
    copies = _prepared_copies(data_dir, base)
    if not copies and not _is_prepared(base):
        raise DataError(
            f"No prepared {base.name} dataset in {data_dir} and no manual_dir to prepare "
            f"it from. {base.MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    builder = builder_in(data_dir=copies[0])[0] if copies else base
    logging.warning(
        "Loading the prepared dataset %s from %s without checking it against its sources "
        "(no manual_dir given).",
        builder.name,
        builder.data_dir,
    )
    return _loaded(builder)


def _load_or_prepare(
    builder_in: Callable[..., tuple[Any, Path | None]],
    base: tfds.core.DatasetBuilder,
    source: str,
    manual: Path,
    data_dir: Path,
    skip_bad: bool,
) -> Examples:
    """Loads the copy whose fingerprint matches the sources in ``manual``; prepares it first
    when there is none, then deletes the outdated copies."""
    copies = _prepared_copies(data_dir, base)
    legacy = Path(os.fspath(base.data_path)) if _is_prepared(base) else None
    fingerprint = _fingerprint(base, manual, skip_bad)
    target = data_dir / (_copy_prefix(base) + _digest(fingerprint))
    builder, _ = builder_in(data_dir=target)
    if _is_prepared(builder) and _stored_fingerprint(Path(builder.data_dir)) == fingerprint:
        logging.info(
            "Loading the prepared dataset %s from %s (made from the same sources and settings).",
            builder.name,
            builder.data_dir,
        )
        return _loaded(builder)

    old = [c for c in copies if c != target]
    previous = _version_dir(old[0], base) if old else legacy
    _announce(builder, source, manual, fingerprint, previous)
    _build(builder, manual, fingerprint)
    for copy in old:
        logging.info("Deleting the outdated prepared copy %s.", copy)
        shutil.rmtree(copy, ignore_errors=True)
    if legacy is not None:
        logging.warning(
            "%s holds a copy prepared by an older version (without a fingerprint); it is not "
            "used any more and can be deleted.",
            legacy,
        )
    return _loaded(builder)


def _announce(
    builder: tfds.core.DatasetBuilder,
    source: str,
    manual: Path,
    fingerprint: dict[str, Any],
    previous: Path | None,
) -> None:
    """One log line: what is prepared (source, how many image files, from where), where to, and
    why again if an older copy (``previous``) exists; a warning about leftover incomplete.*
    folders of interrupted preparations."""
    images = sum(not name.lower().endswith(".xml") for name in fingerprint["files"])
    what = f"from {images} image files (source {source}, {manual})"
    if previous is not None:
        logging.warning(
            "Preparing %s again %s in %s: the prepared copy in %s was made from other inputs (%s).",
            builder.name,
            what,
            builder.data_dir,
            previous,
            _difference(_stored_fingerprint(previous), fingerprint),
        )
    else:
        logging.info("Preparing %s %s in %s.", builder.name, what, builder.data_dir)
    config_dir = Path(os.fspath(builder.data_path)).parent
    stale = sorted(config_dir.glob("incomplete.*")) if config_dir.is_dir() else []
    if stale:
        logging.warning(
            "%s holds %d folder(s) left by an interrupted preparation (%s); they are not used "
            "and can be deleted once no other process is preparing this dataset.",
            config_dir,
            len(stale),
            ", ".join(p.name for p in stale),
        )


def _build(builder: _MammogramBuilder, manual: Path, fingerprint: dict[str, Any]) -> None:
    """Runs TFDS's preparation (without its progress bars: ours counts the images). TFDS writes
    into an incomplete.* folder and renames it when done, so until then the old copies stay
    complete and usable."""
    if _is_prepared(builder):  # same digest, other fingerprint (cannot happen by chance)
        shutil.rmtree(builder.data_dir)
    builder._fingerprint = fingerprint
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual), try_download_gcs=False
    )
    with _tfds_progress_bars_off():
        builder.download_and_prepare(download_config=download_config)


@contextlib.contextmanager
def _tfds_progress_bars_off() -> Iterator[None]:
    was_on = getattr(tfds.core.utils.tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(was_on)


def _loaded(builder: tfds.core.DatasetBuilder) -> Examples:
    examples = _load(builder)
    if examples.bad_files:
        logging.warning(
            "%d file(s) were left out of this dataset when it was prepared: %s",
            len(examples.bad_files),
            json.dumps([b.path for b in examples.bad_files[:5]]),
        )
    return examples
