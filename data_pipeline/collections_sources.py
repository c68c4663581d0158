"""Readers for the public mammography collections, each as its distribution is downloaded.

Each reader takes the folder the user downloaded (``root``) and returns ``(records, bad)`` like
``data_pipeline.inbreast.read_inbreast``: one ``SourceRecord`` per mammogram (a
``data_pipeline.inbreast.Record`` that also carries the collection's official split, if any) and
the files or table rows left out. Bad rows and files are collected and raised together in one
``DataError``, unless ``skip_bad=True``, which leaves them out and lists them. Files that no table
row names are not an error (an official download can hold images that a table leaves out, e.g. the
calcification cases when only the mass tables are given); they are left out with one warning.

mini-MIAS (``read_mias``; http://peipa.essex.ac.uk/info/mias.html)
    ``Info.txt`` and ``mdbNNN.pgm`` (1024 x 1024, 8-bit binary PGM). One Info.txt row per
    abnormality (several rows for an image with several), columns REFNUM, background tissue
    (F/G/D), CLASS (CALC, CIRC, SPIC, MISC, ARCH, ASYM, NORM), SEVERITY (B/M), X, Y, RADIUS; NORM
    rows stop after the class, and rows of widely spread calcifications have no X, Y, RADIUS.
    Label: 1 if any abnormality of the image has severity M (malignant). The distribution's README:
    the images come in pairs, the left (even number) and right (odd number) breast of one woman, so
    mdb001 and mdb002 are one patient; all are MLO views. X, Y are measured from the image's
    BOTTOM-left corner: an abnormality becomes a circular outline (64 points) centred at original
    pixel (y, x) = (height - Y, X) with the given radius (no outline where the location is
    omitted). No BI-RADS, no official split.

CBIS-DDSM (``read_cbis_ddsm``; https://www.cancerimagingarchive.net/collection/cbis-ddsm/)
    The TCIA download (``CBIS-DDSM/<case folder>/<study>/<series>/1-1.dcm`` in the Descriptive
    Directory Name layout, ``.../<UID>/<UID>/000000.dcm`` in the Classic one) and the four case
    tables ``mass_case_description_train_set.csv``, ``mass_case_description_test_set.csv``,
    ``calc_case_description_train_set.csv``, ``calc_case_description_test_set.csv`` (any subset of
    them), one row per abnormality: patient_id, left or right breast, image view, abnormality id,
    assessment, pathology (MALIGNANT, BENIGN, BENIGN_WITHOUT_CALLBACK), image file path, ... The
    first part of "image file path" names the full mammogram's case folder, e.g.
    ``Mass-Training_P_00001_LEFT_CC`` (ROI masks and crops are in ``..._CC_1``, ``..._CC_2``: not
    used). One record per breast and view (``P_00001_LEFT_CC``), also when the mass and the
    calcification tables both list it; label 1 if any of its abnormalities is MALIGNANT; BI-RADS is
    the highest assessment of its abnormalities. Official split: "train" for the *_train_set
    tables, "test" for the *_test_set ones ("test" if an image is in both).

VinDr-Mammo (``read_vindr_mammo``; https://physionet.org/content/vindr-mammo/1.0.0/)
    ``breast-level_annotations.csv`` (study_id, series_id, image_id, laterality, view_position,
    height, width, breast_birads "BI-RADS 1".."BI-RADS 5", breast_density, split "training"/"test"),
    ``finding_annotations.csv`` (the same plus finding_categories, finding_birads, xmin, ymin, xmax,
    ymax) and ``images/<study_id>/<image_id>.dicom`` beside them. Label: 1 iff breast_birads >= 4
    (the paper's rule for INbreast: 4, 5, 6 positive). Each finding with finding_birads >= 4 and a
    box becomes a rectangular outline. Patient: the study (VinDr gives no patient id; one study is
    one woman's four views). Official split: "train"/"test" from the split column.

CMMD (``read_cmmd``; https://www.cancerimagingarchive.net/collection/cmmd/)
    ``CMMD_clinicaldata_revision.xlsx`` (or a CSV export of it; columns ID1, LeftRight, Age,
    number, abnormality, classification Benign/Malignant, subtype; one row per breast) and the TCIA
    tree ``CMMD/<ID1>/<study>/<series>/1-1.dcm, 1-2.dcm, ...``. Each image's breast and view come
    from its DICOM header (ImageLaterality, and ViewCodeSequence's SNOMED code 399162004 = CC,
    399368009 = MLO, else ViewPosition); an image without ImageLaterality belongs to the patient's
    only listed breast, if only one is listed. Label per breast: 1 iff classification is Malignant.
    Images of a breast the table does not list are left out (with one warning). No official split.

Only reading happens here; the pixels are decoded later by ``preprocess.preprocess_file``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from absl import logging

from data_pipeline.errors import DataError
from data_pipeline.inbreast import (
    BadFile,
    Record,
    _column_key,
    _normalise_birads,
    _Problems,
    _read_csv_text,
    birads_label,
)

__all__ = [
    "READERS",
    "SourceRecord",
    "circle_outline",
    "read_cbis_ddsm",
    "read_cmmd",
    "read_mias",
    "read_vindr_mammo",
    "table_files",
]

OUTLINE_POINTS = 64
_LISTED = 5


@dataclass(frozen=True, eq=False)
class SourceRecord(Record):
    """A Record with the collection's official split.

    Attributes:
      subset: "train" or "test" in the distribution's own split; "" when it has none.
    """

    subset: str = ""


def _record(sort_key, **fields) -> tuple[object, SourceRecord]:
    return sort_key, SourceRecord(**fields)


def _sorted(keyed: Iterable[tuple[object, SourceRecord]]) -> list[SourceRecord]:
    return [r for _, r in sorted(keyed, key=lambda kr: kr[0])]


# --------------------------------------------------------------------------------------------------
# Shared helpers.


def _check_root(root: str | os.PathLike, what: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; give the folder holding {what}.")
    return root


def _shallowest(root: Path, matches, what: str, required: bool = True) -> Path | None:
    """The file under ``root`` whose name ``matches`` (a predicate on the lower-case name) that is
    nearest to ``root`` (a CSV before a spreadsheet: a CSV beside the .xlsx is the user's own
    export); DataError when two of one kind are equally near (or, if ``required``, none)."""
    found = sorted(
        (len(p.relative_to(root).parts), p.suffix.lower() != ".csv", str(p), p)
        for p in root.rglob("*")
        if matches(p.name.lower()) and p.is_file() and not p.name.startswith(".")
    )
    if not found:
        if required:
            raise DataError(f"{root}: no {what} under this folder; {_WHERE[what]}")
        return None
    if len(found) > 1 and found[1][:2] == found[0][:2]:
        raise DataError(
            f"{root}: two copies of {what} ({found[0][3]}, {found[1][3]}) at the same depth; "
            "keep one."
        )
    return found[0][3]


_WHERE = {
    "Info.txt": "mini-MIAS ships it beside the mdbNNN.pgm files (all-mias.tar.gz).",
    "breast-level_annotations.csv": "VinDr-Mammo ships it beside its images/ folder.",
    "CMMD_clinicaldata_revision.xlsx": "download it from the CMMD page on TCIA and put it into "
    "the folder that holds the CMMD image folder (a CSV export with the same name works too).",
}


def _header_index(path: Path, header: list[str], required: dict[str, str]) -> dict[str, int]:
    """{key: column index} of the columns (found by their letters and digits, case-insensitive);
    DataError naming the missing ones."""
    keys = [_column_key(c) for c in header]
    index = {k: keys.index(k) for k in dict.fromkeys(keys) if k}
    missing = [name for key, name in required.items() if key not in index]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header)}. Use the "
            "table as the collection distributes it."
        )
    return index


def _rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, cells)]) of a CSV table, blank rows left out."""
    rows = _read_csv_text(path)
    if not rows or not any(c.strip() for c in rows[0]):
        raise DataError(f"{path}: the table is empty; restore it from the distribution.")
    body = [(n, r) for n, r in enumerate(rows[1:], start=2) if any(c.strip() for c in r)]
    return rows[0], body


def _cell(row: list[str], index: dict[str, int], key: str) -> str:
    i = index.get(key)
    return row[i].strip() if i is not None and i < len(row) else ""


def _warn_unlisted(paths: list[Path], what: str) -> None:
    """One warning: ``what`` (e.g. "mini-MIAS images without an Info.txt row") are left out."""
    if paths:
        logging.warning(
            "%d %s, left out (no label): %s%s",
            len(paths),
            what,
            ", ".join(str(p) for p in paths[:_LISTED]),
            " ..." if len(paths) > _LISTED else "",
        )


def circle_outline(
    centre_yx: tuple[float, float], radius: float, points: int = OUTLINE_POINTS
) -> np.ndarray:
    """(points, 2) float64 (y, x) on the circle of ``radius`` around ``centre_yx``."""
    t = np.linspace(0.0, 2.0 * np.pi, points, endpoint=False)
    return np.stack(
        [centre_yx[0] + radius * np.sin(t), centre_yx[1] + radius * np.cos(t)], axis=1
    ).astype(np.float64)


def _box_outline(y0: float, x0: float, y1: float, x1: float) -> np.ndarray:
    """The four corners (y, x) of a rectangle, as an outline."""
    return np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], dtype=np.float64)


def table_files(source: str, root: str | os.PathLike) -> list[Path]:
    """The tables a collection's reader reads under ``root`` (for fingerprints); [] if none."""
    root = Path(root)
    if not root.is_dir():
        return []
    wanted = {
        "mias": _is_mias_table,
        "cbis_ddsm": _is_cbis_table,
        "vindr_mammo": _is_vindr_table,
        "cmmd": _is_cmmd_table,
    }[source]
    return sorted(p for p in root.rglob("*") if wanted(p.name.lower()) and p.is_file())


# --------------------------------------------------------------------------------------------------
# mini-MIAS.

MIAS_CLASSES = ("CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM", "NORM")
_MIAS_TISSUE = ("F", "G", "D")
_MIAS_ROW = re.compile(r"^mdb\d+$", re.IGNORECASE)
_MIAS_IMAGE = re.compile(r"^(mdb\d+)\.pgm$", re.IGNORECASE)


def _is_mias_table(name: str) -> bool:
    return name == "info.txt"


def _pgm_shape(path: Path) -> tuple[int, int]:
    """(height, width) from a binary or ASCII PGM header; DataError if it is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise DataError(f"cannot read the file ({e.strerror or e})") from e
    text = re.sub(rb"#[^\n\r]*", b" ", head)
    fields = text.split()
    if len(fields) < 4 or fields[0] not in (b"P5", b"P2"):
        raise DataError("not a PGM image (no P5/P2 header); restore it from the distribution")
    try:
        width, height = int(fields[1]), int(fields[2])
    except ValueError:
        raise DataError("damaged PGM header (size is not a number)") from None
    return height, width


def read_mias(
    root: str | os.PathLike, *, skip_bad: bool = False
) -> tuple[list[SourceRecord], list[BadFile]]:
    """Read mini-MIAS (``Info.txt`` and ``mdbNNN.pgm``) under ``root``; see the module docstring.

    Returns:
      (records sorted by number, bad files and rows).

    Raises:
      DataError: no Info.txt or no images; unless skip_bad, rows that cannot be read (unknown
        class or severity, a NORM row for an image with abnormalities), rows without an image and
        images with a damaged header, all listed in one message.
    """
    root = _check_root(root, "mini-MIAS (Info.txt and the mdbNNN.pgm files)")
    table = _shallowest(root, _is_mias_table, "Info.txt")
    images: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        m = _MIAS_IMAGE.match(p.name)
        if m and p.is_file():
            images.setdefault(m.group(1).lower(), p)
    if not images:
        raise DataError(f"{root}: no mdbNNN.pgm images under this folder (mini-MIAS's images).")
    problems = _Problems(skip_bad, str(root))
    rows, named = _mias_rows(table, problems)
    keyed = []
    omitted = 0
    for ref, entries in rows.items():
        path = images.get(ref)
        if path is None:
            problems.add(f"{table}:{entries[0][0]}", f"row for {ref} but no {ref}.pgm; add it")
            continue
        try:
            height, _ = _pgm_shape(path)
        except DataError as e:
            problems.add(path, str(e))
            continue
        number = int(ref[3:])
        masses = []
        for _, _, severity, location in entries:
            if location is None:
                omitted += severity != ""
                continue
            x, y, radius = location
            masses.append(circle_outline((height - y, x), radius))
        keyed.append(
            _record(
                number,
                file_id=ref,
                path=path,
                label=int(any(e[2] == "M" for e in entries)),
                birads="",
                patient_id=f"mias_{(number + 1) // 2:03d}",
                laterality="L" if number % 2 == 0 else "R",
                view="MLO",
                masses=tuple(masses),
            )
        )
    _warn_unlisted(
        [images[r] for r in sorted(set(images) - named)], "mini-MIAS images without an Info.txt row"
    )
    if omitted:
        logging.info(
            "%d mini-MIAS abnormalities have no centre and radius in %s (widely spread "
            "calcifications): their images have no outline for them.",
            omitted,
            table,
        )
    bad = problems.finish()
    if not keyed:
        raise DataError(f"{root}: no usable mini-MIAS images; see the problems listed above.")
    return _sorted(keyed), bad


def _mias_rows(table: Path, problems: _Problems) -> tuple[dict[str, list[tuple]], set[str]]:
    """({mdbNNN: [(line, class, severity, (x, y, radius) or None)]}, every mdbNNN the table
    names) from Info.txt. An image with a bad row is left out whole (its label is unknown)."""
    try:
        text = table.read_bytes().decode("latin-1")
    except OSError as e:
        raise DataError(f"{table}: cannot read it ({e.strerror or e}).") from e
    rows: dict[str, list[tuple]] = {}
    named: set[str] = set()
    dropped: set[str] = set()
    for line, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split()
        if not fields or not _MIAS_ROW.match(fields[0]):
            continue  # blank lines, a header or notes
        ref = fields[0].lower()
        named.add(ref)
        entry = _mias_entry(fields, line)
        if isinstance(entry, tuple):
            kinds = {e[1] == "NORM" for e in rows.get(ref, [])} | {entry[1] == "NORM"}
            if len(kinds) == 1:
                rows.setdefault(ref, []).append(entry)
                continue
            entry = "listed as NORM and with an abnormality; fix one"
        problems.add(f"{table}:{line}", f"{ref}: {entry} ({ref} left out)")
        dropped.add(ref)
    return {ref: e for ref, e in rows.items() if ref not in dropped}, named


def _mias_entry(fields: list[str], line: int) -> tuple | str:
    """(line, class, severity, location or None) of an Info.txt row, or what is wrong with it."""
    if len(fields) < 3:
        return "row without a class; expected REFNUM BG CLASS SEVERITY X Y RADIUS"
    tissue, kind = fields[1].upper(), fields[2].upper()
    if tissue not in _MIAS_TISSUE or kind not in MIAS_CLASSES:
        return (
            f"unknown tissue {fields[1]!r} or class {fields[2]!r}; expected "
            f"{'/'.join(_MIAS_TISSUE)} and one of {', '.join(MIAS_CLASSES)}"
        )
    if kind == "NORM":
        if len(fields) > 3:
            return "NORM row with a severity or location; correct it"
        return (line, kind, "", None)
    severity = fields[3].upper() if len(fields) > 3 else ""
    if severity not in ("B", "M"):
        return f"{kind} row with severity {severity or 'missing'}; use B or M"
    location = _mias_location(fields[4:])
    if isinstance(location, str):
        return location
    return (line, kind, severity, location)


def _mias_location(fields: list[str]) -> tuple[float, float, float] | None | str:
    """(X, Y, RADIUS) from the fields after the severity; None when they are omitted (none, or a
    note such as ``*NOTE 3*``: widely spread calcifications); what is wrong with them when they
    are not three numbers with a positive radius (``6O`` for ``60``: the lesion would lose its
    outline)."""
    if not fields or fields[0].startswith("*"):
        return None
    given = " ".join(fields[:3])
    try:
        x, y, radius = (float(v) for v in fields[:3])
    except ValueError:  # not numbers, or fewer than three
        return f"location {given!r} is not three numbers X Y RADIUS; correct it"
    if not all(math.isfinite(v) for v in (x, y, radius)) or radius <= 0:
        return f"location {given!r} is not finite with a positive RADIUS; correct it"
    return x, y, radius


# --------------------------------------------------------------------------------------------------
# CBIS-DDSM.

_CBIS_TABLE = re.compile(r"^(mass|calc)_case_description_(train|test)_set\.csv$")
_CBIS_CASE = re.compile(
    r"^(mass|calc)-(training|test)_(p_\d+)_(left|right)_(cc|mlo)$", re.IGNORECASE
)
_CBIS_COLUMNS = {
    "patientid": "patient_id",
    "leftorrightbreast": "left or right breast",
    "imageview": "image view",
    "pathology": "pathology",
    "imagefilepath": "image file path",
}
_PATHOLOGY = {"MALIGNANT": 1, "BENIGN": 0, "BENIGN_WITHOUT_CALLBACK": 0}


def _is_cbis_table(name: str) -> bool:
    return _CBIS_TABLE.match(name) is not None


def read_cbis_ddsm(
    root: str | os.PathLike, *, skip_bad: bool = False
) -> tuple[list[SourceRecord], list[BadFile]]:
    """Read CBIS-DDSM's full mammograms under ``root`` (the TCIA download and the case tables);
    see the module docstring.

    Returns:
      (records sorted by patient, breast and view, bad files and rows).

    Raises:
      DataError: no case table or no case folder; unless skip_bad, rows with an unknown pathology
        or a path that names no case folder, case folders without exactly one full mammogram, all
        listed in one message.
    """
    root = _check_root(root, "CBIS-DDSM (the CBIS-DDSM image folder and the case tables)")
    tables = _cbis_tables(root)
    folders = _cbis_case_folders(root)
    if not folders:
        raise DataError(
            f"{root}: no CBIS-DDSM case folders (Mass-Training_P_00001_LEFT_CC, ...) under this "
            "folder; put the TCIA download (its CBIS-DDSM folder) here."
        )
    problems = _Problems(skip_bad, str(root))
    images: dict[str, dict] = {}
    for name, table in sorted(tables.items()):
        subset = _CBIS_TABLE.match(name).group(2)
        _cbis_table_rows(table, subset, images, problems)
    keyed, both = _cbis_records(images, folders, problems)
    listed = {case.lower() for image in images.values() for case in image["cases"]}
    _warn_unlisted(
        [folders[c] for c in sorted(folders) if c not in listed],
        "CBIS-DDSM case folders that no case table lists",
    )
    if both:
        logging.warning(
            "%d CBIS-DDSM image(s) are in a training table and a test table (a mass and a "
            "calcification case); the official split counts them as test images.",
            both,
        )
    bad = problems.finish()
    if not keyed:
        raise DataError(f"{root}: no usable CBIS-DDSM images; see the problems listed above.")
    return _sorted(keyed), bad


def _cbis_tables(root: Path) -> dict[str, Path]:
    """{case table name, lower case: path} of the case tables under root (the shallowest of a
    name); a warning names the tables of the four that are missing."""
    tables: dict[str, Path] = {}
    for path in sorted(root.rglob("*"), key=lambda p: (len(p.parts), str(p))):
        if _CBIS_TABLE.match(path.name.lower()) and path.is_file():
            tables.setdefault(path.name.lower(), path)
    if not tables:
        raise DataError(
            f"{root}: no CBIS-DDSM case table (mass_case_description_train_set.csv, ...) under "
            "this folder; download the four case description CSVs from the CBIS-DDSM page on "
            "TCIA into it."
        )
    missing = sorted(
        f"{k}_case_description_{s}_set.csv"
        for k in ("mass", "calc")
        for s in ("train", "test")
        if f"{k}_case_description_{s}_set.csv" not in tables
    )
    if missing:
        logging.warning(
            "CBIS-DDSM: only %d of the 4 case tables under %s (missing %s); the images they "
            "describe are left out.",
            len(tables),
            root,
            ", ".join(missing),
        )
    return tables


def _cbis_records(
    images: dict[str, dict], folders: dict[str, Path], problems: _Problems
) -> tuple[list[tuple[object, SourceRecord]], int]:
    """The keyed record of each image whose rows are sound and whose case folder holds its full
    mammogram: (keyed records, how many of them are in a training and a test table)."""
    keyed, both = [], 0
    for key, image in images.items():
        if image["bad"] or not image["cases"]:
            continue  # a row of it is a listed problem
        path = _cbis_dicom(image["cases"], folders, problems)
        if path is None:
            continue
        both += len(image["subsets"]) > 1
        patient, side, view = key.rsplit("_", 2)
        keyed.append(
            _record(
                key,
                file_id=key,
                path=path,
                label=image["label"],
                birads=str(max(image["assessment"])) if image["assessment"] else "",
                patient_id=patient,
                laterality=side[0],
                view=view,
                subset="test" if "test" in image["subsets"] else "train",
            )
        )
    return keyed, both


def _cbis_case_folders(root: Path) -> dict[str, Path]:
    """{case folder name, lower case: path} of the full-mammogram case folders under root."""
    found: dict[str, Path] = {}
    for folder, dirs, _ in os.walk(root):
        dirs.sort()
        for d in dirs:
            if _CBIS_CASE.match(d):
                found.setdefault(d.lower(), Path(folder) / d)
    return found


def _cbis_table_rows(table: Path, subset: str, images: dict[str, dict], problems: _Problems):
    """Adds each row's abnormality to ``images`` ({P_00001_LEFT_CC: {label, cases, ...}})."""
    header, rows = _rows(table)
    index = _header_index(table, header, _CBIS_COLUMNS)
    for line, row in rows:
        where = f"{table}:{line}"
        image_path = _cell(row, index, "imagefilepath")
        case = re.split(r"[/\\]", image_path.strip().strip('"'), maxsplit=1)[0]
        m = _CBIS_CASE.match(case)
        if m is None:
            problems.add(
                where,
                f"image file path {image_path[:60]!r} does not start with a case folder like "
                "Mass-Training_P_00001_LEFT_CC; use the table as TCIA distributes it",
            )
            continue
        key = f"{m.group(3)}_{m.group(4)}_{m.group(5)}".upper()
        image = images.setdefault(
            key, {"label": 0, "cases": [], "subsets": set(), "assessment": [], "bad": False}
        )
        pathology = _cell(row, index, "pathology").upper()
        if pathology not in _PATHOLOGY:
            problems.add(
                where,
                f"pathology {pathology or '(empty)'!r}; expected {', '.join(_PATHOLOGY)} (image "
                f"{key} left out: its label is unknown)",
            )
            image["bad"] = True
            continue
        image["label"] = max(image["label"], _PATHOLOGY[pathology])
        if case not in image["cases"]:
            image["cases"].append(case)
        image["subsets"].add(subset)
        assessment = _cell(row, index, "assessment")
        if assessment.isdigit():
            image["assessment"].append(int(assessment))


def _cbis_dicom(cases: list[str], folders: dict[str, Path], problems: _Problems) -> Path | None:
    """The full mammogram of an image: the one DICOM file under its case folder (the first of its
    case folders that exists: a breast in a mass and a calcification case has two copies)."""
    present = [folders[c.lower()] for c in sorted(cases) if c.lower() in folders]
    if not present:
        problems.add(
            cases[0],
            "the case tables list this case but there is no such folder under the download; "
            "download it from TCIA or remove its rows",
        )
        return None
    folder = present[0]
    dicoms = sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".dcm" and p.is_file())
    if len(dicoms) > 1:  # keep the full mammogram series if the folder holds other series
        full = [p for p in dicoms if "full mammogram" in p.parent.name.lower()]
        dicoms = full or dicoms
    if len(dicoms) != 1:
        problems.add(
            folder,
            f"{len(dicoms)} DICOM files in this case folder; expected the one full mammogram "
            "(1-1.dcm in a '... full mammogram images ...' series). Download the case again",
        )
        return None
    return dicoms[0]


# --------------------------------------------------------------------------------------------------
# VinDr-Mammo.

_VINDR_BREAST = "breast-level_annotations.csv"
_VINDR_FINDINGS = "finding_annotations.csv"
_VINDR_COLUMNS = {
    "studyid": "study_id",
    "imageid": "image_id",
    "laterality": "laterality",
    "viewposition": "view_position",
    "breastbirads": "breast_birads",
}
_VINDR_BOX_COLUMNS = {
    "imageid": "image_id",
    "findingbirads": "finding_birads",
    "xmin": "xmin",
    "ymin": "ymin",
    "xmax": "xmax",
    "ymax": "ymax",
}
_VINDR_SPLITS = {"training": "train", "train": "train", "test": "test"}


def _is_vindr_table(name: str) -> bool:
    return name in (_VINDR_BREAST, _VINDR_FINDINGS)


def _vindr_birads(value: str) -> str:
    """ "BI-RADS 4" -> "4" (also "4", "BIRADS 4A"); "" if it is none of these."""
    m = re.fullmatch(r"(?:bi-?rads)?\s*([0-9][abc]?(?:\.0+)?)", value.strip().lower())
    return _normalise_birads(m.group(1)) if m else ""


def read_vindr_mammo(
    root: str | os.PathLike, *, skip_bad: bool = False
) -> tuple[list[SourceRecord], list[BadFile]]:
    """Read VinDr-Mammo under ``root`` (its two annotation tables and images/); see the module
    docstring.

    Returns:
      (records sorted by study and image, bad files and rows).

    Raises:
      DataError: no breast-level table or missing columns; unless skip_bad, rows with an unknown
        BI-RADS or split, repeated image ids, rows without an image, all in one message.
    """
    root = _check_root(root, "VinDr-Mammo (breast-level_annotations.csv, images/)")
    table = _shallowest(root, lambda n: n == _VINDR_BREAST, _VINDR_BREAST)
    base = table.parent
    problems = _Problems(skip_bad, str(root))
    boxes = _vindr_boxes(base / _VINDR_FINDINGS)
    header, rows = _rows(table)
    index = _header_index(table, header, _VINDR_COLUMNS)
    keyed, seen = [], {}
    for line, row in rows:
        where = f"{table}:{line}"
        study, image_id = _cell(row, index, "studyid"), _cell(row, index, "imageid")
        if not study or not image_id:
            problems.add(where, "row without a study_id or image_id; restore the table")
            continue
        if image_id in seen:
            problems.add(where, f"image {image_id} repeats line {seen[image_id]}; keep one row")
            continue
        seen[image_id] = line
        raw = _cell(row, index, "breastbirads")
        birads = _vindr_birads(raw)
        try:
            label = birads_label(birads)
        except DataError:
            problems.add(where, f"breast_birads {raw!r} of image {image_id}; expected BI-RADS 1-5")
            continue
        split = _cell(row, index, "split").lower()
        if "split" in index and split not in _VINDR_SPLITS:
            problems.add(where, f"split {split!r} of image {image_id}; expected training or test")
            continue
        path = base / "images" / study / f"{image_id}.dicom"
        if not path.is_file():
            problems.add(where, f"no image {path}; download it or remove the row")
            continue
        laterality = _cell(row, index, "laterality").upper()
        keyed.append(
            _record(
                (study, image_id),
                file_id=image_id,
                path=path,
                label=label,
                birads=birads,
                patient_id=study,
                laterality=laterality if laterality in ("L", "R") else "",
                view=_cell(row, index, "viewposition").upper(),
                masses=tuple(boxes.get(image_id, ())),
                subset=_VINDR_SPLITS.get(split, ""),
            )
        )
    images_dir = base / "images"
    listed = {r.path for _, r in keyed}
    unlisted = [
        p
        for p in (sorted(images_dir.rglob("*.dicom")) if images_dir.is_dir() else [])
        if p not in listed and p.stem not in seen
    ]
    _warn_unlisted(unlisted, "VinDr-Mammo images without a row in breast-level_annotations.csv")
    bad = problems.finish()
    if not keyed:
        raise DataError(f"{root}: no usable VinDr-Mammo images; see the problems listed above.")
    return _sorted(keyed), bad


def _vindr_boxes(table: Path) -> dict[str, list[np.ndarray]]:
    """{image_id: [rectangle outlines]} of the findings with finding_birads >= 4 and a box. A
    finding whose box is missing or empty gets no outline (its image keeps its label); one
    warning lists such rows."""
    if not table.is_file():
        logging.warning(
            "No %s beside breast-level_annotations.csv: VinDr-Mammo images get no finding boxes, "
            "so the localisation score is off.",
            table,
        )
        return {}
    header, rows = _rows(table)
    index = _header_index(table, header, _VINDR_BOX_COLUMNS)
    boxes: dict[str, list[np.ndarray]] = {}
    unusable: list[int] = []
    for line, row in rows:
        birads = _vindr_birads(_cell(row, index, "findingbirads"))
        if not birads or birads[0] < "4":
            continue  # "No Finding" rows (empty) and findings below BI-RADS 4
        try:
            x0, y0, x1, y1 = (float(_cell(row, index, k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            unusable.append(line)
            continue
        if not all(map(math.isfinite, (x0, y0, x1, y1))) or x1 <= x0 or y1 <= y0:
            unusable.append(line)
            continue
        boxes.setdefault(_cell(row, index, "imageid"), []).append(_box_outline(y0, x0, y1, x1))
    if unusable:
        logging.warning(
            "%d BI-RADS >= 4 finding(s) in %s have no usable box (missing, empty or inverted; "
            "lines %s): they get no outline.",
            len(unusable),
            table,
            ", ".join(map(str, unusable[:_LISTED])) + (" ..." if len(unusable) > _LISTED else ""),
        )
    return boxes


# --------------------------------------------------------------------------------------------------
# CMMD.

_CMMD_NAMES = ("cmmd_clinicaldata_revision.xlsx", "cmmd_clinicaldata_revision.csv")
_CMMD_PATIENT = re.compile(r"^D\d-\d{4}$", re.IGNORECASE)
_CMMD_COLUMNS = {"id1": "ID1", "leftright": "LeftRight", "classification": "classification"}
_VIEW_CODES = {"399162004": "CC", "399368009": "MLO", "R-10242": "CC", "R-10226": "MLO"}
_CLASSIFICATION = {"malignant": 1, "benign": 0}


def _is_cmmd_table(name: str) -> bool:
    return name in _CMMD_NAMES


def _xlsx_rows(path: Path) -> list[list[str]]:
    """The first sheet of an .xlsx file as rows of strings (whole numbers without ".0")."""
    try:
        import openpyxl
    except ImportError:
        raise DataError(
            f"{path}: reading .xlsx needs openpyxl (pip install openpyxl), or save the sheet as "
            "CMMD_clinicaldata_revision.csv in the same folder."
        ) from None
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            sheet = book.worksheets[0]
            rows = []
            for values in sheet.iter_rows(values_only=True):
                cells = []
                for v in values:
                    if isinstance(v, float) and v.is_integer():
                        v = int(v)
                    cells.append("" if v is None else str(v))
                rows.append(cells)
        finally:
            book.close()
    except Exception as e:  # BadZipFile, InvalidFileException, KeyError on damaged files
        raise DataError(
            f"{path}: cannot read the Excel table ({type(e).__name__}: {e}); download it again "
            "from TCIA, or save it as CMMD_clinicaldata_revision.csv."
        ) from e
    return rows


def read_cmmd(
    root: str | os.PathLike, *, skip_bad: bool = False
) -> tuple[list[SourceRecord], list[BadFile]]:
    """Read CMMD under ``root`` (the clinical table and the TCIA DICOM tree); see the module
    docstring.

    Returns:
      (records sorted by patient and file, bad files and rows).

    Raises:
      DataError: no table or missing columns, no patient folders; unless skip_bad, rows with an
        unknown side or classification, two rows of one breast that disagree, rows without
        images, unreadable DICOM headers or images whose breast cannot be told, all listed in one
        message.
    """
    root = _check_root(root, "CMMD (CMMD_clinicaldata_revision.xlsx and the CMMD folder)")
    table = _shallowest(root, _is_cmmd_table, "CMMD_clinicaldata_revision.xlsx")
    problems = _Problems(skip_bad, str(root))
    breasts = _cmmd_table(table, problems)
    patients = _cmmd_patients(root)
    keyed, unlisted, sides_from_table = _cmmd_records(root, table, patients, breasts, problems)
    _warn_unlisted(unlisted, "CMMD images of breasts that the clinical table does not list")
    if sides_from_table:
        logging.info(
            "%d CMMD image(s) have no ImageLaterality; each patient's only listed breast is used.",
            sides_from_table,
        )
    bad = problems.finish()
    if not keyed:
        raise DataError(f"{root}: no usable CMMD images; see the problems listed above.")
    return _sorted(keyed), bad


def _cmmd_patients(root: Path) -> dict[str, Path]:
    """{patient ID (upper case): folder} of the patient folders (D1-0001, ...) under root; the
    shallowest of a name wins, and a patient folder inside another is not looked for."""
    patients: dict[str, Path] = {}
    for folder, dirs, _ in os.walk(root):
        dirs.sort()
        for d in dirs:
            if _CMMD_PATIENT.match(d):
                patients.setdefault(d.upper(), Path(folder) / d)
        dirs[:] = [d for d in dirs if not _CMMD_PATIENT.match(d)]  # no patient inside a patient
    if not patients:
        raise DataError(
            f"{root}: no CMMD patient folders (D1-0001, ...) under this folder; put the TCIA "
            "download (its CMMD folder) here."
        )
    return patients


def _cmmd_records(
    root: Path,
    table: Path,
    patients: dict[str, Path],
    breasts: dict[tuple[str, str], tuple[int, int]],
    problems: _Problems,
) -> tuple[list[tuple[object, SourceRecord]], list[Path], int]:
    """The keyed records of every patient's DICOM images, then a problem for each table row
    whose breast has no image: (keyed records, images of breasts the table does not list, how
    many images took their breast from the table)."""
    keyed, unlisted, sides_from_table = [], [], 0
    used: set[tuple[str, str]] = set()
    failed: set[str] = set()  # patients with an image left out as a problem
    for patient, folder in sorted(patients.items()):
        listed_sides = sorted(side for (p, side) in breasts if p == patient)
        dicoms = sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".dcm" and p.is_file())
        stems = [p.stem for p in dicoms]
        for path in dicoms:
            found = _cmmd_side_view(path, patient, listed_sides, problems)
            if found is None:
                failed.add(patient)
                continue
            side, view, from_table = found
            sides_from_table += from_table
            if (patient, side) not in breasts:
                unlisted.append(path)
                continue
            used.add((patient, side))
            unique = stems.count(path.stem) == 1
            file_id = f"{patient}_{path.stem}" if unique else path.relative_to(root).as_posix()
            keyed.append(
                _record(
                    (patient, path.relative_to(folder).as_posix()),
                    file_id=file_id,
                    path=path,
                    label=breasts[(patient, side)][0],
                    birads="",
                    patient_id=patient,
                    laterality=side,
                    view=view,
                )
            )
    for (patient, side), (_, line) in sorted(breasts.items()):
        if (patient, side) not in used and patient not in failed:
            problems.add(
                f"{table}:{line}",
                f"row for {patient} {side} but no image of that breast under "
                f"{patients.get(patient, 'the CMMD folder')}; download it or remove the row",
            )
    return keyed, unlisted, sides_from_table


def _cmmd_side_view(
    path: Path, patient: str, listed_sides: list[str], problems: _Problems
) -> tuple[str, str, bool] | None:
    """(breast "L"/"R", view, whether the breast came from the table) of one image: from its
    header, or the patient's only breast in the table when the header has no ImageLaterality;
    None when it cannot be told (a problem is listed)."""
    try:
        side, view = _cmmd_header(path)
    except DataError as e:
        problems.add(path, str(e))
        return None
    if side:
        return side, view, False
    if len(listed_sides) != 1:
        problems.add(
            path,
            "no ImageLaterality in its header and the table lists "
            f"{len(listed_sides)} breasts of {patient}; the breast cannot be told",
        )
        return None
    return listed_sides[0], view, True


def _cmmd_table(table: Path, problems: _Problems) -> dict[tuple[str, str], tuple[int, int]]:
    """{(ID1, "L"/"R"): (label, line)} from the clinical table."""
    if table.suffix.lower() == ".xlsx":
        raw = _xlsx_rows(table)
        header = raw[0] if raw else []
        rows = [(n, r) for n, r in enumerate(raw[1:], start=2) if any(c.strip() for c in r)]
        if not any(c.strip() for c in header):
            raise DataError(f"{table}: the table is empty; download it again from TCIA.")
    else:
        header, rows = _rows(table)
    index = _header_index(table, header, _CMMD_COLUMNS)
    breasts: dict[tuple[str, str], tuple[int, int]] = {}
    for line, row in rows:
        where = f"{table}:{line}"
        patient = _cell(row, index, "id1").upper()
        side = _cell(row, index, "leftright").upper()
        classification = _cell(row, index, "classification").lower()
        if not _CMMD_PATIENT.match(patient) or side not in ("L", "R"):
            problems.add(where, f"ID1 {patient!r} / LeftRight {side!r}: expected D1-0001 and L/R")
            continue
        if classification not in _CLASSIFICATION:
            problems.add(where, f"classification {classification!r}; expected Benign or Malignant")
            continue
        label = _CLASSIFICATION[classification]
        previous = breasts.get((patient, side))
        if previous is not None and previous[0] != label:
            problems.add(
                where,
                f"{patient} {side} is {classification} here but not on line {previous[1]}; "
                "correct one row",
            )
            continue
        breasts.setdefault((patient, side), (label, line))
    return breasts


def _cmmd_header(path: Path) -> tuple[str, str]:
    """(laterality "L"/"R"/"", view "CC"/"MLO"/...) from a DICOM header."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:  # InvalidDicomError, OSError, struct errors on damaged files
        raise DataError(
            f"unreadable DICOM header ({type(e).__name__}: {e}); download the file again"
        ) from e
    side = str(ds.get("ImageLaterality", "") or ds.get("Laterality", "") or "").strip().upper()
    view = ""
    for item in ds.get("ViewCodeSequence", None) or []:
        view = _VIEW_CODES.get(str(item.get("CodeValue", "")).strip(), "")
        if view:
            break
    if not view:
        view = str(ds.get("ViewPosition", "") or "").strip().upper()
    return (side if side in ("L", "R") else ""), view


READERS = {
    "mias": read_mias,
    "cbis_ddsm": read_cbis_ddsm,
    "vindr_mammo": read_vindr_mammo,
    "cmmd": read_cmmd,
}
