"""Reading INbreast (and any folder of mammograms with a CSV) into `Record`s.

INbreast ships as
    AllDICOMs/<id>_<patient>_MG_<L|R>_<CC|MLO>_ANON.dcm    one mammogram per file
    AllXML/<id>.xml                                         OsiriX ROI plists (lesion outlines)
    INbreast.csv (or the official INbreast.xls)             semicolon-separated, one row per image:
      Patient ID;Patient age;Laterality;View;Acquisition date;File Name;ACR;Bi-Rads
`read_inbreast` finds the images anywhere under the folder it is given, by the numeric id that
starts their names, so converted files (<id>_*.png or .tif, 8 or 16 bit) work the same way. As in
the paper, an image is positive (label 1) when its BI-RADS assessment is 4 or higher (4a, 4b, 4c,
5, 6).

`read_folder` is the generic source: a CSV with an image path and a label per row (CBIS-DDSM, CMMD,
VinDr-Mammo or a user's own data converted to that form).

Only reading happens here: the pixels are decoded later by
`data_pipeline.preprocess.preprocess_file`, which raises `DataError` for damaged images.
"""

from __future__ import annotations

import csv
import io
import os
import plistlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from absl import logging

from data_pipeline.errors import DataError
from data_pipeline.preprocess import DICOM_SUFFIXES, RASTER_SUFFIXES

__all__ = [
    "BIRADS_VALUES",
    "IMAGE_SUFFIXES",
    "BadFile",
    "Record",
    "TableRow",
    "birads_label",
    "canonical_image_path",
    "file_id_of",
    "find_images",
    "image_files",
    "listed_images",
    "read_folder",
    "read_inbreast",
    "read_inbreast_table",
    "read_mass_outlines",
]

# BI-RADS assessment categories that INbreast uses (0, "incomplete", does not occur there).
BIRADS_VALUES = ("1", "2", "3", "4", "4a", "4b", "4c", "5", "6")
IMAGE_SUFFIXES = DICOM_SUFFIXES | RASTER_SUFFIXES
TABLE_NAMES = ("inbreast.csv", "inbreast.xls", "inbreast.xlsx")  # the metadata table
_MAX_LISTED = 10


@dataclass(frozen=True)
class BadFile:
    """A file (or table row, as 'table.csv:LINE') that was left out, and why."""

    path: str
    reason: str


@dataclass(frozen=True, eq=False)
class Record:
    """One mammogram.

    Attributes:
      file_id: INbreast's numeric id (the "File Name" column); for `read_folder` the image's
        canonical path relative to the CSV's folder (`canonical_image_path`).
      path: the image file.
      label: 1 for BI-RADS >= 4 (malignant in the paper's sense), else 0.
      birads: "1" ... "6" with "4a"/"4b"/"4c"; "" when the source has none.
      patient_id: groups images of one woman (for patient-wise folds).
      laterality: "L" or "R" ("" when unknown).
      view: "CC" or "MLO" (one INbreast image is "FB"; "" when unknown).
      masses: mass outlines, each (P, 2) float64 (y, x) in ORIGINAL image pixel coordinates.
    """

    file_id: str
    path: Path
    label: int
    birads: str
    patient_id: str
    laterality: str
    view: str
    masses: tuple[np.ndarray, ...] = field(default=())


@dataclass(frozen=True)
class TableRow:
    """One row of INbreast.csv. `line` is the 1-based line number in the table."""

    file_id: str
    birads: str
    label: int
    laterality: str
    view: str
    acr: str
    patient_id: str
    line: int


class _Problems:
    """Collects problems; raises them together unless skip_bad."""

    def __init__(self, skip_bad: bool, what: str):
        self.skip_bad = skip_bad
        self.what = what
        self.bad: list[BadFile] = []

    def add(self, path: str | os.PathLike, reason: str) -> None:
        self.bad.append(BadFile(str(path), reason))

    def finish(self) -> list[BadFile]:
        if self.bad and not self.skip_bad:
            lines = [f"  {b.path}: {b.reason}" for b in self.bad[:_MAX_LISTED]]
            if len(self.bad) > _MAX_LISTED:
                lines.append(f"  ... and {len(self.bad) - _MAX_LISTED} more")
            raise DataError(
                f"{self.what}: {len(self.bad)} problem(s):\n"
                + "\n".join(lines)
                + "\nFix or remove these files, or pass skip_bad=True (--skip_bad) to leave them "
                "out and get them listed."
            )
        for b in self.bad:
            logging.warning("left out %s: %s", b.path, b.reason)
        return self.bad


# --------------------------------------------------------------------------------------------------
# BI-RADS and the table.


def _normalise_birads(value: str) -> str:
    v = value.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+\.0+", v):  # spreadsheet exports write 5 as 5.0
        v = v.split(".")[0]
    return v


def birads_label(birads: str) -> int:
    """1 if the BI-RADS assessment is 4 or higher (4a/4b/4c count), else 0.

    Raises:
      DataError: for a value outside 1, 2, 3, 4, 4a, 4b, 4c, 5, 6.
    """
    v = _normalise_birads(birads)
    if v not in BIRADS_VALUES:
        raise DataError(
            f"unknown BI-RADS value {birads!r}; expected one of {', '.join(BIRADS_VALUES)}. "
            "Correct the table."
        )
    return int(v[0] >= "4")


def _column_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.strip().lstrip("\ufeff").lower())


def _sniff_delimiter(header: str) -> str:
    counts = {d: header.count(d) for d in (";", ",", "\t")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _read_csv_text(path: Path) -> list[list[str]]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(
            f"{path}: cannot read the table ({e.strerror or e}); check the path."
        ) from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    if "\x00" in text:
        raise DataError(f"{path}: the table holds binary data; export it again as CSV text.")
    first = text.split("\n", 1)[0]
    try:
        return list(csv.reader(io.StringIO(text, newline=""), delimiter=_sniff_delimiter(first)))
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV table ({e}); export it again as CSV.") from e


def _read_xls(path: Path) -> list[list[str]]:
    try:
        import xlrd  # optional: not a dependency of this project
    except ImportError:
        raise DataError(
            f"{path}: this is the Excel table and no .xls reader (xlrd) is installed. Open it in a "
            "spreadsheet program and save it as CSV, named INbreast.csv, in the same folder "
            "(semicolon- or comma-separated both work), or pip install xlrd."
        ) from None
    try:
        sheet = xlrd.open_workbook(str(path)).sheet_by_index(0)
        rows = []
        for r in range(sheet.nrows):
            cells = []
            for value in sheet.row_values(r):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                cells.append(str(value))
            rows.append(cells)
        return rows
    except Exception as e:
        raise DataError(
            f"{path}: cannot read the Excel table ({type(e).__name__}: {e}); save it as "
            "INbreast.csv (CSV) in the same folder."
        ) from e


_REQUIRED = {"filename": "File Name", "birads": "Bi-Rads"}
_OPTIONAL = {"laterality": "Laterality", "view": "View", "acr": "ACR", "patientid": "Patient ID"}


def _clean_id(value: str) -> str:
    v = value.strip()
    if re.fullmatch(r"\d+\.0+", v):
        v = v.split(".")[0]
    return v


def _parse_table(path: Path, rows: list[list[str]], problems: _Problems) -> list[TableRow]:
    if not rows or not any(c.strip() for c in rows[0]):
        raise DataError(f"{path}: the table is empty; it needs a header row and one row per image.")
    header = {_column_key(c): i for i, c in enumerate(rows[0])}
    missing = [name for key, name in _REQUIRED.items() if key not in header]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(rows[0])}. The "
            "INbreast table has: Patient ID;Patient age;Laterality;View;Acquisition date;"
            "File Name;ACR;Bi-Rads"
        )

    def cell(row: list[str], key: str) -> str:
        i = header.get(key)
        return row[i].strip() if i is not None and i < len(row) else ""

    out: list[TableRow] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        where = f"{path}:{line}"
        file_id = _clean_id(cell(row, "filename"))
        if not file_id:
            problems.add(where, "row without a File Name; fill it in or delete the row")
            continue
        if file_id in seen:
            problems.add(where, f"File Name {file_id} repeats line {seen[file_id]}; keep one row")
            continue
        seen[file_id] = line
        raw = cell(row, "birads")
        birads = _normalise_birads(raw)
        if birads not in BIRADS_VALUES:
            problems.add(
                where,
                f"unknown BI-RADS value {raw!r} for image {file_id}; expected one of "
                f"{', '.join(BIRADS_VALUES)}. Correct the table",
            )
            continue
        laterality = cell(row, "laterality").upper()
        view = cell(row, "view").upper()
        patient = cell(row, "patientid")
        if patient.lower() in ("removed", "anonymized", "anonymised", "-", "none", "nan"):
            patient = ""
        out.append(
            TableRow(
                file_id=file_id,
                birads=birads,
                label=birads_label(birads),
                laterality=laterality if laterality in ("L", "R") else "",
                view=view,
                acr=cell(row, "acr"),
                patient_id=patient,
                line=line,
            )
        )
    return out


def read_inbreast_table(path: str | os.PathLike, *, skip_bad: bool = False) -> list[TableRow]:
    """Read INbreast.csv (semicolon or comma separated, any line ends) or INbreast.xls.

    Returns:
      One TableRow per image row. With skip_bad=True, bad rows are logged and left out
      (`read_inbreast` returns them as BadFile entries).

    Raises:
      DataError: unreadable table, missing columns, or (unless skip_bad) bad rows.
    """
    path = Path(path)
    problems = _Problems(skip_bad, str(path))
    rows = _load_table(path, problems)
    problems.finish()
    return rows


def _load_table(path: Path, problems: _Problems) -> list[TableRow]:
    """The table's good rows; bad rows go to `problems`."""
    suffix = path.suffix.lower()
    raw = _read_xls(path) if suffix in (".xls", ".xlsx") else _read_csv_text(path)
    return _parse_table(path, raw, problems)


# --------------------------------------------------------------------------------------------------
# XML outlines.

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_POINT = re.compile(rf"^\s*\(?\s*({_NUMBER})\s*,\s*({_NUMBER})")


def _parse_point(text: object, where: Path) -> tuple[float, float]:
    if not isinstance(text, str):
        raise DataError(f"{where}: a Point_px entry is not a string '(x, y)'; the XML is damaged.")
    m = _POINT.match(text)
    if m is None:
        raise DataError(f"{where}: cannot read the point {text[:40]!r}; expected '(x, y)'.")
    x, y = float(m.group(1)), float(m.group(2))
    if not (np.isfinite(x) and np.isfinite(y)):
        raise DataError(f"{where}: the point {text[:40]!r} is not finite.")
    return y, x


def read_mass_outlines(path: str | os.PathLike, *, name: str = "Mass") -> tuple[np.ndarray, ...]:
    """Outlines of the ROIs called `name` ("Mass") in an INbreast/OsiriX ROI plist.

    The plist is a dict with "Images": a list of dicts, each with "ROIs": a list of dicts with
    "Name", "NumberOfPoints" and "Point_px": strings "(x, y)" in original image pixels. ROIs with
    another name (Calcification, Cluster, Distortion, ...) are left out.

    Returns:
      A tuple of (P, 2) float64 arrays, (y, x) in original image pixel coordinates.

    Raises:
      DataError: naming the file, when it is not a readable ROI plist.
    """
    path = Path(path)
    fix = (
        "Restore it from the INbreast distribution, or delete it to use the image without outlines."
    )
    try:
        with open(path, "rb") as f:
            plist = plistlib.load(f)
    except OSError as e:
        raise DataError(f"{path}: cannot open the XML ({e.strerror or e}). {fix}") from e
    except Exception as e:  # ExpatError, InvalidFileException, ValueError, ... on damaged files
        raise DataError(
            f"{path}: unreadable XML outline file ({type(e).__name__}: {e}). {fix}"
        ) from e
    if not isinstance(plist, dict) or not isinstance(plist.get("Images"), list):
        raise DataError(f"{path}: not an OsiriX ROI plist (no 'Images' list). {fix}")
    wanted = name.strip().lower()
    outlines = []
    for image in plist["Images"]:
        if not isinstance(image, dict):
            raise DataError(f"{path}: an 'Images' entry is not a dict. {fix}")
        rois = image.get("ROIs", [])
        if not isinstance(rois, list):
            raise DataError(f"{path}: 'ROIs' is not a list. {fix}")
        for roi in rois:
            if not isinstance(roi, dict):
                raise DataError(f"{path}: an ROI entry is not a dict. {fix}")
            roi_name = roi.get("Name", "")
            if not isinstance(roi_name, str) or roi_name.strip().lower() != wanted:
                continue
            points = roi.get("Point_px", [])
            if not isinstance(points, list) or not points:
                raise DataError(f"{path}: a {name} ROI has no Point_px list. {fix}")
            outlines.append(np.array([_parse_point(p, path) for p in points], dtype=np.float64))
    return tuple(outlines)


# --------------------------------------------------------------------------------------------------
# Finding files.


def file_id_of(path: str | os.PathLike) -> str:
    """INbreast's id of an image or outline file: its name up to the first "_" or ".", e.g.
    "22678622" for 22678622_x_MG_R_CC_ANON.dcm and for 22678622.xml."""
    return Path(path).name.split("_", 1)[0].split(".", 1)[0]


def _images_under(folder: Path, skip: Path | None = None) -> list[Path]:
    """The image files (by suffix) anywhere under `folder`, sorted; hidden files and anything
    under `skip` (a resolved path) left out."""
    return [
        p
        for p in sorted(folder.rglob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not p.name.startswith(".")
        and (skip is None or not p.resolve().is_relative_to(skip))
    ]


def image_files(
    inputs: Iterable[str | os.PathLike], *, exclude: str | os.PathLike | None = None
) -> list[Path]:
    """Files to read: each input file as given, and the DICOM/PNG/TIFF files under each folder
    (recursively, sorted, hidden files and anything under ``exclude`` left out). A path that does
    not exist is kept, so that it is reported as a bad file."""
    skip = Path(exclude).resolve() if exclude is not None else None
    out: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        out.extend(_images_under(path, skip) if path.is_dir() else [path])
    return out


_PRIORITY = {s: 0 for s in DICOM_SUFFIXES} | {".png": 1, ".tif": 2, ".tiff": 2}
_PRIORITY |= {s: 3 for s in RASTER_SUFFIXES if s not in _PRIORITY}  # PGM/PPM, JPEG


def find_images(root: str | os.PathLike) -> dict[str, list[Path]]:
    """Image files (.dcm, .png, .tif) anywhere under `root`, grouped by the id starting their name.

    Returns:
      {file_id: [paths]} with the preferred file first (DICOM, then PNG, then TIFF).
    """
    found: dict[str, list[Path]] = {}
    for p in _images_under(Path(root)):
        found.setdefault(file_id_of(p), []).append(p)
    for paths in found.values():
        paths.sort(key=lambda q: (_PRIORITY[q.suffix.lower()], str(q)))
    return found


def _find_table(root: Path) -> Path:
    tables = [p for p in root.rglob("*") if p.name.lower() in TABLE_NAMES and p.is_file()]
    if not tables:
        raise DataError(
            f"{root}: no INbreast.csv (or INbreast.xls) under this folder. Put the table from the "
            "INbreast distribution (or tests/fixtures/INbreast.csv) into it."
        )
    # Prefer CSV over Excel, then the shallowest.
    tables.sort(key=lambda p: (p.suffix.lower() != ".csv", len(p.relative_to(root).parts), str(p)))
    best = tables[0]
    ties = [
        p
        for p in tables[1:]
        if p.suffix.lower() == best.suffix.lower()
        and len(p.relative_to(root).parts) == len(best.relative_to(root).parts)
    ]
    if ties:
        raise DataError(
            f"{root}: several tables found ({best}, {', '.join(map(str, ties))}); keep one."
        )
    return best


def _name_fields(path: Path) -> list[str]:
    return path.name.split(".", 1)[0].split("_")


def _patient_from_name(fields: list[str]) -> str:
    """The patient field of <id>_<patient>_MG_..., or of <id>_<patient> when it looks like
    INbreast's (a hexadecimal hash); "" otherwise (e.g. <id>_converted.png)."""
    if len(fields) < 2 or not fields[1]:
        return ""
    if len(fields) >= 3 and fields[2].upper() == "MG":
        return fields[1]
    return fields[1] if re.fullmatch(r"[0-9a-fA-F]{8,}", fields[1]) else ""


def read_inbreast(
    root: str | os.PathLike, *, skip_bad: bool = False
) -> tuple[list[Record], list[BadFile]]:
    """Read the INbreast database (or the synthetic one in the same layout) under `root`.

    Finds INbreast.csv (or INbreast.xls) and the images (DICOM, or converted PNG/TIFF) anywhere
    under `root`, matches them by id, and reads the mass outlines from <id>.xml files where
    present. The patient id is the second field of the image's file name (the table's Patient ID
    is blanked); laterality and view come from the table (or the file name).

    Returns:
      (records sorted by file_id, bad files). A bad XML file keeps its image, without outlines.

    Raises:
      DataError: no folder, no table, no images, or (unless skip_bad) any row without an image,
        image without a row, unknown BI-RADS value or unreadable XML, all listed in one message.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{root}: no such folder; give the folder holding INbreast (AllDICOMs, ...)."
        )
    table = _find_table(root)
    problems = _Problems(skip_bad, str(root))
    rows = _load_table(table, problems)
    images = find_images(root)
    if not images:
        raise DataError(
            f"{root}: no images (.dcm, .png, .tif) under this folder; INbreast's are in AllDICOMs/ "
            "and are named <id>_<patient>_MG_<L|R>_<CC|MLO>_ANON.dcm."
        )
    _report_unlisted(images, {r.file_id for r in rows}, table, problems)
    xmls = _outline_files(root)
    if not xmls:
        logging.warning(
            "No mass outlines under %s (INbreast's AllXML/<id>.xml files): the images are read "
            "without outlines, so training works but the localisation score (pointing game) is "
            "off. Copy AllXML from the INbreast distribution into this folder to get it.",
            root,
        )
    records: list[Record] = []
    anonymous = 0
    for row in rows:
        path = _image_of(row, images.get(row.file_id), table, problems)
        if path is None:
            continue
        fields = _name_fields(path)
        patient = _patient_from_name(fields) or row.patient_id
        if not patient:
            patient = row.file_id
            anonymous += 1
        laterality = row.laterality or (fields[3].upper() if len(fields) >= 5 else "")
        records.append(
            Record(
                file_id=row.file_id,
                path=path,
                label=row.label,
                birads=row.birads,
                patient_id=patient,
                laterality=laterality if laterality in ("L", "R") else "",
                view=row.view or (fields[4].upper() if len(fields) >= 5 else ""),
                masses=_outlines_of(xmls.get(row.file_id), row.file_id, problems),
            )
        )
    if anonymous:
        logging.warning(
            "%d image(s) under %s have no patient id in their name or the table; each is treated "
            "as its own patient, so patient-wise folds cannot group them.",
            anonymous,
            root,
        )
    bad = problems.finish()
    if not records:
        raise DataError(f"{root}: no usable images left; see the problems listed above.")
    records.sort(key=lambda r: (len(r.file_id), r.file_id))
    return records, bad


def _outline_files(root: Path) -> dict[str, Path]:
    """{id: <id>.xml} anywhere under `root` (outlines; other XML, e.g. <id>_muscle.xml, is not
    about masses)."""
    xmls: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() == ".xml" and "_" not in p.stem and p.is_file():
            xmls.setdefault(p.stem, p)
    return xmls


def _report_unlisted(
    images: dict[str, list[Path]], listed: set[str], table: Path, problems: _Problems
) -> None:
    """Every image whose id has no row in the table is a problem."""
    for file_id, paths in sorted(images.items()):
        if file_id not in listed:
            for p in paths:
                problems.add(
                    p,
                    f"image without a row in {table.name} (id {file_id}); add a row or remove "
                    "the file",
                )


def _image_of(
    row: TableRow, paths: list[Path] | None, table: Path, problems: _Problems
) -> Path | None:
    """The one image file of a table row (DICOM before PNG before TIFF); None, with a problem
    added, when there is none or several of the preferred kind."""
    if not paths:
        problems.add(
            f"{table}:{row.line}",
            f"row for image {row.file_id} but no image file named {row.file_id}_*.dcm (or "
            ".png, .tif) under the folder; add the image or delete the row",
        )
        return None
    path = paths[0]
    same = [p for p in paths[1:] if _PRIORITY[p.suffix.lower()] == _PRIORITY[path.suffix.lower()]]
    if same:
        problems.add(
            path,
            f"several image files for id {row.file_id} "
            f"({', '.join(p.name for p in same)}); keep one",
        )
        return None
    return path


def _outlines_of(xml: Path | None, file_id: str, problems: _Problems) -> tuple[np.ndarray, ...]:
    """The mass outlines in `xml`; none (with a problem added) when it cannot be read."""
    if xml is None:
        return ()
    try:
        return read_mass_outlines(xml)
    except DataError as e:
        reason = str(e).removeprefix(f"{xml}: ")
        problems.add(xml, f"{reason} (image {file_id} kept without outlines)")
        return ()


# --------------------------------------------------------------------------------------------------
# Generic folder + CSV.

_POSITIVE = {"1", "1.0", "true", "yes", "malignant", "positive", "cancer"}
_NEGATIVE = {"0", "0.0", "false", "no", "benign", "benign_without_callback", "negative", "normal"}


def _parse_label(value: str) -> int | None:
    v = value.strip().lower()
    if v in _POSITIVE:
        return 1
    if v in _NEGATIVE:
        return 0
    return None


def _find_column(header: list[str], name: str) -> int | None:
    keys = [_column_key(c) for c in header]
    key = _column_key(name)
    return keys.index(key) if key in keys else None


def _is_file(path: Path) -> bool:
    """Path.is_file, False also for a name the system refuses (too long, ...) instead of OSError."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def canonical_image_path(csv_dir: str | os.PathLike, image: str) -> tuple[str, Path]:
    """(file id, path) of an image path as written in a CSV in ``csv_dir``.

    The path is made absolute (relative paths are relative to ``csv_dir``) and normalised
    (``./``, ``//`` and ``x/..`` removed; symbolic links are not followed), so that ``img/a.dcm``,
    ``./img/a.dcm`` and ``img//a.dcm`` name one image. The file id is that path relative to
    ``csv_dir`` with ``/`` separators, or the absolute path for an image outside ``csv_dir``.
    """
    base = Path(os.path.abspath(csv_dir))
    text = image.strip()
    path = Path(text)
    try:
        path = path.expanduser()
    except RuntimeError:  # "~user/..." of no such user: a relative path like any other
        pass
    if not path.is_absolute():
        path = base / path
    path = Path(os.path.normpath(path))
    try:
        file_id = path.relative_to(base).as_posix()
    except ValueError:  # outside the CSV's folder
        file_id = path.as_posix()
    return file_id, path


def listed_images(csv_path: str | os.PathLike, image_column: str = "image") -> list[Path]:
    """The canonical paths of the images a folder CSV lists (see ``canonical_image_path``), in
    CSV order without repeats; [] when the CSV or its column cannot be read (``read_folder``
    reports those). Reads only the CSV: used to fingerprint a prepared dataset's sources."""
    csv_path = Path(csv_path)
    try:
        rows = _read_csv_text(csv_path)
    except DataError:
        return []
    if not rows:
        return []
    column = _find_column(rows[0], image_column)
    if column is None:
        return []
    seen: dict[Path, None] = {}
    for row in rows[1:]:
        if column < len(row) and row[column].strip():
            seen.setdefault(canonical_image_path(csv_path.parent, row[column])[1], None)
    return list(seen)


def read_folder(
    csv_path: str | os.PathLike,
    *,
    image_column: str = "image",
    label_column: str = "label",
    patient_column: str | None = None,
    skip_bad: bool = False,
) -> tuple[list[Record], list[BadFile]]:
    """Read a CSV that lists mammograms (DICOM, PNG or TIFF) and their labels.

    Paths in `image_column` are relative to the CSV's folder (or absolute). Each is canonicalised
    (`canonical_image_path`): the record's file id is the normalised path relative to the CSV's
    folder (absolute for images outside it), so `img/a.dcm`, `./img/a.dcm` and `img//a.dcm` are
    one image. Labels: 0/1 (also true/false, benign/malignant, BENIGN_WITHOUT_CALLBACK). Optional
    columns, found by name: `patient_column` (else each image is its own patient), "birads",
    "laterality", "view". Several rows for one image are merged (several findings): the image is
    positive if any of its rows is (as a MIL bag is), and takes the first non-empty patient id.
    The CSV may be comma-, semicolon- or tab-separated. (Copies of one image under two names are
    found later, by their pixels, when the dataset is prepared.)

    Returns:
      (records in CSV order, bad files).

    Raises:
      DataError: unreadable CSV, missing columns, no rows, rows of one image that name different
        patients (always, naming the rows), or (unless skip_bad) rows whose image is missing or
        whose label cannot be read, all listed in one message.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such CSV file; check the path.")
    rows = _read_csv_text(csv_path)
    if not rows or not any(c.strip() for c in rows[0]):
        raise DataError(f"{csv_path}: the CSV is empty; it needs a header and one row per image.")
    wanted = {"image": image_column, "label": label_column, "patient": patient_column}
    columns = _folder_columns(csv_path, rows[0], wanted)
    problems = _Problems(skip_bad, str(csv_path))
    merged: dict[str, dict] = {}
    for line, row in enumerate(rows[1:], start=2):
        if any(c.strip() for c in row):
            entry = _folder_entry(csv_path, line, row, columns, wanted, problems)
            if entry is not None:
                _merge_entry(merged, entry, csv_path, patient_column)
    bad = problems.finish()
    if not merged:
        raise DataError(f"{csv_path}: no usable rows; add rows with an image path and a label.")
    return [_folder_record(entry) for entry in merged.values()], bad


def _folder_columns(
    csv_path: Path, header: list[str], wanted: dict[str, str | None]
) -> dict[str, int]:
    """{what: column index} of the named columns (`wanted`, an error when missing) and of the
    optional "birads", "laterality" and "view" columns that are there."""
    columns = {}
    for what, name in wanted.items():
        if name is None:
            continue
        i = _find_column(header, name)
        if i is None:
            raise DataError(
                f"{csv_path}: no {what} column named {name!r}; the columns are "
                f"{', '.join(header)}. "
                f"Pass --{what}_column (or {what}_column=) with the right name."
            )
        columns[what] = i
    for extra in ("birads", "laterality", "view"):
        i = _find_column(header, extra)
        if i is not None:
            columns[extra] = i
    return columns


def _folder_entry(
    csv_path: Path,
    line: int,
    row: list[str],
    columns: dict[str, int],
    wanted: dict[str, str | None],
    problems: _Problems,
) -> dict | None:
    """One CSV row as the fields of a Record (plus the row's line, "patient_line"); None, with
    a problem added, when its image path or label is missing or wrong."""

    def cell(what: str) -> str:
        i = columns.get(what)
        return row[i].strip() if i is not None and i < len(row) else ""

    where = f"{csv_path}:{line}"
    image = cell("image")
    if not image:
        problems.add(where, f"row without an image path in column {wanted['image']!r}; fill it in")
        return None
    label = _parse_label(cell("label"))
    if label is None:
        problems.add(
            where,
            f"label {cell('label')!r} of {image} is not 0/1 (or benign/malignant); correct it",
        )
        return None
    file_id, path = canonical_image_path(csv_path.parent, image)
    if not _is_file(path):
        problems.add(where, f"image {image} not found (looked for {path}); fix the path or the row")
        return None
    return dict(
        file_id=file_id,
        path=path,
        label=label,
        birads=_normalise_birads(cell("birads")),
        patient_id=cell("patient") if wanted["patient"] else "",
        laterality=cell("laterality").upper()[:1],
        view=cell("view").upper(),
        patient_line=line,
    )


def _merge_entry(
    merged: dict[str, dict], entry: dict, csv_path: Path, patient_column: str | None
) -> None:
    """Adds a row's entry to `merged`; a second row of one image makes it positive if either
    row is, fills in a missing patient, and must not name another patient (DataError)."""
    kept = merged.setdefault(entry["file_id"], entry)
    if kept is entry:
        return
    kept["label"] = max(kept["label"], entry["label"])
    patient, line = entry["patient_id"], entry["patient_line"]
    if patient and not kept["patient_id"]:
        kept["patient_id"], kept["patient_line"] = patient, line
    elif patient and patient != kept["patient_id"]:
        raise DataError(
            f"{csv_path}: lines {kept['patient_line']} and {line} give image {entry['file_id']} "
            f"two patients ({kept['patient_id']!r} in column {patient_column!r}, then "
            f"{patient!r}); one image belongs to one patient. Correct the rows."
        )


def _folder_record(entry: dict) -> Record:
    fields = {k: v for k, v in entry.items() if k != "patient_line"}
    laterality = fields["laterality"] if fields["laterality"] in ("L", "R") else ""
    patient = fields["patient_id"] or fields["file_id"]
    return Record(**(fields | {"laterality": laterality, "patient_id": patient}), masses=())
