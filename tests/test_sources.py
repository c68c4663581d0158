"""Tests of data_pipeline.collections_sources: mini-MIAS, CBIS-DDSM, VinDr-Mammo and CMMD, each
read from a small fixture written in its distribution's layout (file names, folder nesting, table
columns). The expected labels, patients, sides, splits and outlines are written down by hand in
each fixture's plan, independently of the readers."""

from __future__ import annotations

import csv
import hashlib
import logging as pylogging
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from data_pipeline.collections_sources import (
    SourceRecord,
    read_cbis_ddsm,
    read_cmmd,
    read_mias,
    read_vindr_mammo,
)
from data_pipeline.errors import DataError
from data_pipeline.synthetic import synthesize_image, write_dicom

H, W = 120, 100  # fixture images: not square, so that a swapped height and width shows


def _pixels(seed: int, lesion: bool, laterality: str = "L", view: str = "MLO") -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = synthesize_image(rng, shape=(H, W), laterality=laterality, view=view, lesion=lesion)
    return image.image


def _uint16(seed: int, lesion: bool, laterality: str = "L", view: str = "MLO") -> np.ndarray:
    return np.round(_pixels(seed, lesion, laterality, view) * 4095).astype(np.uint16)


def _by_id(records) -> dict[str, SourceRecord]:
    return {r.file_id: r for r in records}


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# ==================================================================================================
# mini-MIAS: Info.txt + mdbNNN.pgm (binary PGM, origin of X, Y at the bottom-left corner).

# (number, tissue, [(class, severity, x, y, radius)]); NORM images have an empty list. Severity M
# makes the image malignant. Locations (x, y, r) of None are "omitted" (widely spread CALC).
MIAS_PLAN = [
    (1, "G", [("CIRC", "B", 40, 30, 8)]),
    (2, "G", [("SPIC", "M", 60, 70, 10)]),
    (3, "D", []),
    (4, "D", []),
    (5, "F", [("CALC", "M", None, None, None)]),
    (6, "F", []),
    (7, "G", [("MISC", "M", 50, 80, 6), ("CALC", "B", 30, 40, 5)]),
    (8, "G", []),
    (9, "D", [("ARCH", "B", 45, 55, 12)]),
    (10, "D", [("CIRC", "M", 35, 90, 7)]),
    (11, "F", []),
    (12, "F", [("ASYM", "B", 50, 60, 20)]),
]
MIAS_MALIGNANT = {"mdb002", "mdb005", "mdb007", "mdb010"}


def write_pgm(path: Path, pixels: np.ndarray) -> Path:
    """An 8-bit binary PGM (P5), written by hand: magic, width, height, maxval, raw bytes."""
    data = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    path.write_bytes(b"P5\n%d %d\n255\n" % (data.shape[1], data.shape[0]) + data.tobytes())
    return path


def write_mias(root: Path, plan=MIAS_PLAN) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for number, tissue, findings in plan:
        ref = f"mdb{number:03d}"
        lesion = any(f[1] == "M" for f in findings)
        write_pgm(root / f"{ref}.pgm", _pixels(number, lesion, "L" if number % 2 == 0 else "R"))
        if not findings:
            lines.append(f"{ref} {tissue} NORM ")
        for kind, severity, x, y, r in findings:
            where = "" if x is None else f" {x} {y} {r}"
            lines.append(f"{ref} {tissue} {kind} {severity}{where}")
    (root / "Info.txt").write_text("\n".join(lines) + "\n")
    return root


def test_mias_labels_patients_sides_and_views(tmp_path):
    records, bad = read_mias(write_mias(tmp_path / "mias"))
    assert bad == []
    by_id = _by_id(records)
    assert [r.file_id for r in records] == [f"mdb{n:03d}" for n, _, _ in MIAS_PLAN]
    assert {i for i, r in by_id.items() if r.label == 1} == MIAS_MALIGNANT
    # consecutive pairs (1, 2), (3, 4), ... are one woman; no two pairs share a patient
    for a in range(1, 13, 2):
        assert by_id[f"mdb{a:03d}"].patient_id == by_id[f"mdb{a + 1:03d}"].patient_id
    assert len({r.patient_id for r in records}) == 6
    assert {i for i, r in by_id.items() if r.laterality == "L"} == {
        f"mdb{n:03d}" for n in range(2, 13, 2)
    }
    assert {r.laterality for r in records} == {"L", "R"}
    assert {r.view for r in records} == {"MLO"} and {r.subset for r in records} == {""}
    assert all(isinstance(r.path, Path) and r.path.name == f"{r.file_id}.pgm" for r in records)


def test_mias_outlines_are_circles_from_the_bottom_left_origin(tmp_path):
    records, _ = read_mias(write_mias(tmp_path / "mias"))
    by_id = _by_id(records)
    for number, _, findings in MIAS_PLAN:
        record = by_id[f"mdb{number:03d}"]
        located = [f for f in findings if f[2] is not None]
        assert len(record.masses) == len(located)
        for outline, (_, _, x, y, r) in zip(record.masses, located, strict=True):
            assert outline.shape[1] == 2 and outline.shape[0] >= 16
            # every point is r away from (y, x) = (H - Y, X): Y counts up from the bottom row
            distance = np.hypot(outline[:, 0] - (H - y), outline[:, 1] - x)
            np.testing.assert_allclose(distance, r, rtol=1e-9)
            np.testing.assert_allclose(outline.mean(axis=0), [H - y, x], atol=1e-9)


def test_mias_bad_rows_are_listed_and_skippable(tmp_path):
    root = write_mias(tmp_path / "mias")
    info = root / "Info.txt"
    info.write_text(
        info.read_text()
        + "mdb013 G WXYZ B 1 2 3\n"  # unknown class
        + "mdb003 D CIRC B 10 10 5\n"  # mdb003 is also NORM
        + "mdb099 F NORM\n"  # no image
        + "mdb007 G SPIC X 1 2 3\n"  # unknown severity: mdb007 (other rows fine) is left out
    )
    (root / "Licence.txt").write_text("not a table\n")
    with pytest.raises(DataError) as error:
        read_mias(root)
    message = str(error.value)
    assert "4 problem(s)" in message and "WXYZ" in message and "mdb099" in message
    assert f"{info}:14: mdb013: unknown tissue 'G' or class 'WXYZ'" in message  # names the line
    records, bad = read_mias(root, skip_bad=True)
    assert len(bad) == 4
    # mdb003 (NORM and CIRC) and mdb007 (a bad row) are left out: their labels are unknown
    assert set(_by_id(records)) == {f"mdb{n:03d}" for n in range(1, 13)} - {"mdb003", "mdb007"}


def test_mias_malformed_location_is_a_bad_row_and_omitted_ones_are_not(tmp_path):
    """`6O` for `60` lost the lesion's outline without a word; rows like the real Info.txt's
    `mdb059 F CIRC B` (no location) and `mdb216 D CALC M *NOTE 3*` stay without one."""
    root = write_mias(tmp_path / "mias")
    info = root / "Info.txt"
    text = info.read_text().replace("mdb002 G SPIC M 60 70 10", "mdb002 G SPIC M 6O 70 10")
    bad_rows = {
        "mdb001": "mdb001 G CIRC B 40 30",  # two of the three numbers
        "mdb009": "mdb009 D ARCH B 45 55 0",  # no radius
        "mdb010": "mdb010 D CIRC M 35 nan 7",
    }
    for ref, row in bad_rows.items():
        text = "\n".join(row if line.startswith(ref) else line for line in text.splitlines())
    text = text.replace("mdb005 F CALC M", "mdb005 F CALC M *NOTE 3* ")
    info.write_text(text + "\nmdb012 F ASYM B\n")  # a second ASYM row, without a location
    with pytest.raises(DataError) as error:
        read_mias(root)
    message = str(error.value)
    assert "4 problem(s)" in message, message
    assert f"{info}:2: mdb002: location '6O 70 10' is not three numbers X Y RADIUS" in message
    assert "mdb001: location '40 30' is not three numbers" in message
    assert "mdb009: location '45 55 0' is not finite with a positive RADIUS" in message
    assert "mdb010: location '35 nan 7'" in message
    records, bad = read_mias(root, skip_bad=True)
    assert len(bad) == 4
    by_id = _by_id(records)
    assert set(by_id) == {f"mdb{n:03d}" for n in range(1, 13)} - {
        "mdb001",
        "mdb002",
        "mdb009",
        "mdb010",
    }
    assert by_id["mdb005"].label == 1 and len(by_id["mdb005"].masses) == 0
    assert len(by_id["mdb012"].masses) == 1  # the located row's circle; the other has none


def test_mias_image_without_a_row_is_left_out_with_a_warning(tmp_path, caplog):
    root = write_mias(tmp_path / "mias")
    write_pgm(root / "mdb013.pgm", _pixels(13, False))
    with caplog.at_level(pylogging.WARNING):
        records, bad = read_mias(root)
    assert bad == [] and "mdb013" not in _by_id(records)
    assert "mdb013.pgm" in caplog.text


def test_mias_damaged_header_and_missing_table(tmp_path):
    root = write_mias(tmp_path / "mias")
    (root / "mdb004.pgm").write_bytes(b"GIF89a not a pgm")
    with pytest.raises(DataError, match="mdb004.pgm: not a PGM image"):
        read_mias(root)
    (root / "Info.txt").unlink()
    with pytest.raises(DataError, match="no Info.txt"):
        read_mias(root)


# ==================================================================================================
# CBIS-DDSM: TCIA's Descriptive Directory Name layout and the four case tables.

MASS_HEADER = [
    "patient_id",
    "breast_density",
    "left or right breast",
    "image view",
    "abnormality id",
    "abnormality type",
    "mass shape",
    "mass margins",
    "assessment",
    "pathology",
    "subtlety",
    "image file path",
    "cropped image file path",
    "ROI mask file path",
]
CALC_HEADER = [
    "patient_id",
    "breast density",
    "left or right breast",
    "image view",
    "abnormality id",
    "abnormality type",
    "calc type",
    "calc distribution",
    "assessment",
    "pathology",
    "subtlety",
    "image file path",
    "cropped image file path",
    "ROI mask file path",
]

# (kind, subset, patient number, side, view, [(assessment, pathology)])
CBIS_PLAN = [
    ("Mass", "Training", 1, "LEFT", "CC", [(4, "MALIGNANT")]),
    ("Mass", "Training", 1, "LEFT", "MLO", [(4, "MALIGNANT")]),
    ("Mass", "Training", 4, "RIGHT", "CC", [(3, "BENIGN"), (5, "MALIGNANT")]),
    ("Mass", "Training", 6, "LEFT", "MLO", [(2, "BENIGN_WITHOUT_CALLBACK")]),
    ("Calc", "Training", 7, "RIGHT", "CC", [(3, "BENIGN")]),
    ("Calc", "Training", 8, "LEFT", "MLO", [(4, "MALIGNANT")]),
    ("Mass", "Test", 16, "LEFT", "CC", [(4, "BENIGN")]),
    ("Calc", "Test", 17, "RIGHT", "MLO", [(4, "MALIGNANT")]),
    # one breast in a mass training case and a calcification test case (two copies on disk)
    ("Mass", "Training", 5, "RIGHT", "CC", [(3, "BENIGN")]),
    ("Calc", "Test", 5, "RIGHT", "CC", [(4, "MALIGNANT")]),
]
CBIS_LABELS = {
    "P_00001_LEFT_CC": 1,
    "P_00001_LEFT_MLO": 1,
    "P_00004_RIGHT_CC": 1,
    "P_00006_LEFT_MLO": 0,
    "P_00007_RIGHT_CC": 0,
    "P_00008_LEFT_MLO": 1,
    "P_00016_LEFT_CC": 0,
    "P_00017_RIGHT_MLO": 1,
    "P_00005_RIGHT_CC": 1,
}
CBIS_TEST = {"P_00016_LEFT_CC", "P_00017_RIGHT_MLO", "P_00005_RIGHT_CC"}


def _uid(*parts: object) -> str:
    digest = int(hashlib.sha256(repr(parts).encode()).hexdigest()[:12], 16)
    return f"1.3.6.1.4.1.9590.100.1.2.{digest}"


def write_cbis_ddsm(root: Path, plan=CBIS_PLAN, classic: bool = False) -> Path:
    """The TCIA download: <root>/CBIS-DDSM/<case>/<date-DDSM-NA-nnnnn>/<1.000000-full mammogram
    images-nnnnn>/1-1.dcm (classic=True: <case>/<UID>/<UID>/000000.dcm), ROI-mask and crop cases
    <case>_<n>, and the case tables beside CBIS-DDSM/."""
    images = root / "CBIS-DDSM"
    tables: dict[tuple[str, str], list] = {}
    seed = 0
    for kind, subset, number, side, view, findings in plan:
        case = f"{kind}-{subset}_P_{number:05d}_{side}_{view}"
        seed += 1
        if classic:
            series = images / case / _uid(case, "study") / _uid(case, "series")
            name = "000000.dcm"
        else:
            series = (
                images
                / case
                / "07-20-2016-DDSM-NA-74994"
                / f"1.000000-full mammogram images-{seed:05d}"
            )
            name = "1-1.dcm"
        series.mkdir(parents=True)
        malignant = any(p == "MALIGNANT" for _, p in findings)
        write_dicom(series / name, _uint16(number, malignant, side[0], view), uid_seed=case)
        rows = tables.setdefault((kind.lower(), "train" if subset == "Training" else "test"), [])
        for n, (assessment, pathology) in enumerate(findings, start=1):
            roi = images / f"{case}_{n}" / "09-06-2017-DDSM-NA-30776"
            for series_name, file in (
                ("1.000000-ROI mask images-59186", "1-1.dcm"),
                ("1.000000-cropped images-94682", "1-2.dcm"),
            ):
                (roi / series_name).mkdir(parents=True)
                write_dicom(roi / series_name / file, np.zeros((40, 30), np.uint8), uid_seed=file)
            full = f"{case}/{_uid(case, 'study')}/{_uid(case, 'series')}/000000.dcm"
            crop = f"{case}_{n}/{_uid(case, n, 'study')}/{_uid(case, n, 'c')}/000000.dcm"
            mask = f"{case}_{n}/{_uid(case, n, 'study')}/{_uid(case, n, 'm')}/000001.dcm\n"
            descriptors = (
                ["OVAL", "CIRCUMSCRIBED"] if kind == "Mass" else ["PLEOMORPHIC", "CLUSTERED"]
            )
            rows.append(
                [
                    f"P_{number:05d}",
                    3,
                    side,
                    view,
                    n,
                    kind.lower() if kind == "Mass" else "calcification",
                    *descriptors,
                    assessment,
                    pathology,
                    4,
                    full,
                    crop,
                    mask,
                ]
            )
    for (kind, subset), rows in tables.items():
        header = MASS_HEADER if kind == "mass" else CALC_HEADER
        _write_csv(root / f"{kind}_case_description_{subset}_set.csv", header, rows)
    return root


def test_cbis_ddsm_labels_splits_and_full_mammograms(tmp_path):
    root = write_cbis_ddsm(tmp_path / "cbis")
    records, bad = read_cbis_ddsm(root)
    assert bad == []
    by_id = _by_id(records)
    assert {i: r.label for i, r in by_id.items()} == CBIS_LABELS
    assert {i for i, r in by_id.items() if r.subset == "test"} == CBIS_TEST
    assert {r.subset for r in records} == {"train", "test"}
    for file_id, record in by_id.items():
        patient, number, side, view = file_id.split("_")
        assert record.patient_id == f"{patient}_{number}"
        assert record.laterality == side[0] and record.view == view
        # the full mammogram, never a ROI mask or crop (which live in <case>_<n> folders)
        assert record.path.name == "1-1.dcm" and "full mammogram" in record.path.parent.name
        assert record.path.parents[2].name.endswith(f"{side}_{view}")
    assert by_id["P_00004_RIGHT_CC"].birads == "5"  # the highest assessment of its two
    assert by_id["P_00001_LEFT_CC"].patient_id == by_id["P_00001_LEFT_MLO"].patient_id


def test_cbis_ddsm_classic_layout(tmp_path):
    root = write_cbis_ddsm(tmp_path / "cbis", classic=True)
    records, _ = read_cbis_ddsm(root)
    assert {r.file_id: r.label for r in records} == CBIS_LABELS
    assert {r.path.name for r in records} == {"000000.dcm"}


def test_cbis_ddsm_problems(tmp_path, caplog):
    plan = CBIS_PLAN[:7]
    root = write_cbis_ddsm(tmp_path / "cbis", plan=plan)
    table = root / "mass_case_description_train_set.csv"
    rows = list(csv.reader(open(table, newline="")))
    rows[1][MASS_HEADER.index("pathology")] = "UNKNOWN"
    # P_00004_RIGHT_CC has a BENIGN and a MALIGNANT row: an unreadable one makes its label unknown
    p4 = [n for n, r in enumerate(rows) if r[0] == "P_00004"]
    rows[p4[1]][MASS_HEADER.index("pathology")] = ""
    _write_csv(table, rows[0], rows[1:])
    # a case folder that the tables list but the download lacks
    missing = next((root / "CBIS-DDSM").glob("Calc-Training_P_00007_RIGHT_CC"))
    for p in sorted(missing.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    missing.rmdir()
    with pytest.raises(DataError) as error:
        read_cbis_ddsm(root)
    assert "3 problem(s)" in str(error.value)
    assert "UNKNOWN" in str(error.value) and "Calc-Training_P_00007_RIGHT_CC" in str(error.value)
    with caplog.at_level(pylogging.WARNING):
        records, bad = read_cbis_ddsm(root, skip_bad=True)
    assert len(bad) == 3
    # the rows with an unknown pathology leave their images (P_00001_LEFT_CC, P_00004_RIGHT_CC) out
    assert set(_by_id(records)) == {
        "P_00001_LEFT_MLO",
        "P_00006_LEFT_MLO",
        "P_00008_LEFT_MLO",
        "P_00016_LEFT_CC",
    }
    assert "missing calc_case_description_test_set.csv" in caplog.text


def test_cbis_ddsm_unlisted_case_is_left_out(tmp_path, caplog):
    root = write_cbis_ddsm(tmp_path / "cbis")
    (root / "calc_case_description_test_set.csv").unlink()
    with caplog.at_level(pylogging.WARNING):
        records, bad = read_cbis_ddsm(root)
    assert bad == []
    assert "P_00017_RIGHT_MLO" not in _by_id(records)
    assert "Calc-Test_P_00017_RIGHT_MLO" in caplog.text
    # without the calcification test table, P_00005 is only a benign mass training case
    assert _by_id(records)["P_00005_RIGHT_CC"].label == 0
    assert _by_id(records)["P_00005_RIGHT_CC"].subset == "train"


def test_cbis_ddsm_no_tables(tmp_path):
    (tmp_path / "CBIS-DDSM").mkdir()
    with pytest.raises(DataError, match="no CBIS-DDSM case table"):
        read_cbis_ddsm(tmp_path)


# ==================================================================================================
# VinDr-Mammo: breast-level_annotations.csv, finding_annotations.csv, images/<study>/<image>.dicom.

BREAST_HEADER = [
    "study_id",
    "series_id",
    "image_id",
    "laterality",
    "view_position",
    "height",
    "width",
    "breast_birads",
    "breast_density",
    "split",
]
FINDING_HEADER = [
    "study_id",
    "series_id",
    "image_id",
    "laterality",
    "view_position",
    "height",
    "width",
    "breast_birads",
    "breast_density",
    "finding_categories",
    "finding_birads",
    "xmin",
    "ymin",
    "xmax",
    "ymax",
    "split",
]
# study -> (split, {side: BI-RADS}); each study has four images (L/R x CC/MLO)
VINDR_PLAN = {
    "0a0c5108270e814818c1ad002482ce74": ("training", {"L": 1, "R": 4}),
    "1b2d6f0e9b7c4c7f8e3f0b2a6c1d9e77": ("training", {"L": 2, "R": 2}),
    "2c3e7a1f0c8d5d8a9f4a1c3b7d2eaa88": ("training", {"L": 5, "R": 3}),
    "3d4f8b2a1d9e6e9bab5b2d4c8e3fbb99": ("test", {"L": 1, "R": 1}),
    "4e5a9c3b2eaf7fa0bc6c3e5d9f4acc00": ("test", {"L": 4, "R": 2}),
}


def _vindr_image_id(study: str, side: str, view: str) -> str:
    return f"{study[:8]}{side}{view}".lower().ljust(32, "0")


def write_vindr(root: Path, plan=VINDR_PLAN) -> Path:
    breast_rows, finding_rows = [], []
    for study, (split, sides) in plan.items():
        series = f"{study[::-1]}"
        for side, birads in sides.items():
            for view in ("CC", "MLO"):
                image_id = _vindr_image_id(study, side, view)
                folder = root / "images" / study
                folder.mkdir(parents=True, exist_ok=True)
                write_dicom(
                    folder / f"{image_id}.dicom",
                    _uint16(len(breast_rows), birads >= 4, side, view),
                    laterality=side,
                    view=view,
                    uid_seed=image_id,
                )
                common = [
                    study,
                    series,
                    image_id,
                    side,
                    view,
                    H,
                    W,
                    f"BI-RADS {birads}",
                    "DENSITY C",
                ]
                breast_rows.append([*common, split])
                if birads >= 3:  # a finding with the breast's BI-RADS, and a box from its numbers
                    box = [10.5 + birads, 20.25, 40.0 + birads, 60.75]
                    finding_rows.append([*common, "['Mass']", f"BI-RADS {birads}", *box, split])
                else:
                    finding_rows.append([*common, "['No Finding']", "", "", "", "", "", split])
    _write_csv(root / "breast-level_annotations.csv", BREAST_HEADER, breast_rows)
    _write_csv(root / "finding_annotations.csv", FINDING_HEADER, finding_rows)
    return root


def test_vindr_labels_boxes_patients_and_split(tmp_path):
    root = write_vindr(tmp_path / "vindr-mammo" / "1.0.0")
    records, bad = read_vindr_mammo(tmp_path / "vindr-mammo")
    assert bad == [] and len(records) == 20
    for record in records:
        split, sides = VINDR_PLAN[record.patient_id]
        birads = sides[record.laterality]
        assert record.file_id == _vindr_image_id(record.patient_id, record.laterality, record.view)
        assert record.label == int(birads >= 4) and record.birads == str(birads)
        assert record.subset == {"training": "train", "test": "test"}[split]
        assert record.path == root / "images" / record.patient_id / f"{record.file_id}.dicom"
        if birads >= 4:  # a BI-RADS 4/5 finding: its box, as (y, x) corners
            (outline,) = record.masses
            y0, x0, y1, x1 = 20.25, 10.5 + birads, 60.75, 40.0 + birads
            np.testing.assert_array_equal(outline.min(axis=0), [y0, x0])
            np.testing.assert_array_equal(outline.max(axis=0), [y1, x1])
            assert len(outline) == 4
        else:  # no finding, or BI-RADS 3: no box
            assert record.masses == ()
    assert {r.view for r in records} == {"CC", "MLO"}


def test_vindr_problems(tmp_path, caplog):
    root = write_vindr(tmp_path / "vindr")
    table = root / "breast-level_annotations.csv"
    rows = list(csv.reader(open(table, newline="")))
    rows[1][7] = "BI-RADS 9"
    rows.append(list(rows[2]))  # a repeated image id
    rows.append(["ffff", "s", "0" * 32, "L", "CC", H, W, "BI-RADS 1", "DENSITY A", "training"])
    _write_csv(table, rows[0], rows[1:])
    with pytest.raises(DataError) as error:
        read_vindr_mammo(root)
    message = str(error.value)
    assert "3 problem(s)" in message and "BI-RADS 9" in message and "repeats line 3" in message
    assert str(root / "images" / "ffff" / f"{'0' * 32}.dicom") in message
    records, bad = read_vindr_mammo(root, skip_bad=True)
    assert len(records) == 19 and len(bad) == 3
    # a BI-RADS >= 4 finding without a box: its image keeps its label, without an outline
    findings = root / "finding_annotations.csv"
    rows = list(csv.reader(open(findings, newline="")))
    boxed = next(n for n, r in enumerate(rows) if r[10] == "BI-RADS 4")
    rows[boxed][11:15] = ["", "", "", ""]
    _write_csv(findings, rows[0], rows[1:])
    with caplog.at_level(pylogging.WARNING):
        records, bad = read_vindr_mammo(root, skip_bad=True)
    record = _by_id(records)[rows[boxed][2]]
    assert record.label == 1 and record.masses == () and len(bad) == 3
    assert f"lines {boxed + 1}" in caplog.text
    (root / "finding_annotations.csv").unlink()
    with caplog.at_level(pylogging.WARNING):
        records, _ = read_vindr_mammo(root, skip_bad=True)
    assert all(r.masses == () for r in records) and "localisation score is off" in caplog.text


# ==================================================================================================
# CMMD: CMMD_clinicaldata_revision.xlsx and CMMD/<ID1>/<study>/<series>/1-N.dcm.

CMMD_HEADER = ["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"]
# patient -> ({side: classification} listed in the table, sides imaged); two views per side
CMMD_PLAN = {
    "D1-0001": ({"R": "Benign"}, ["R"]),
    "D1-0002": ({"L": "Malignant"}, ["L"]),
    "D1-0003": ({"L": "Benign", "R": "Malignant"}, ["L", "R"]),
    "D1-0004": ({"R": "Benign"}, ["L", "R"]),  # the left breast is imaged but not listed
    "D2-0005": ({"L": "Malignant"}, ["L"]),
    "D2-0006": ({"R": "Malignant"}, ["R"]),
    "D2-0007": ({"L": "Benign"}, ["L"]),
}
VIEW_CODE = {"CC": "399162004", "MLO": "399368009"}


def _view_code(view: str) -> Sequence:
    item = Dataset()
    item.CodeValue = VIEW_CODE[view]
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = {"CC": "cranio-caudal", "MLO": "medio-lateral oblique"}[view]
    return Sequence([item])


def write_cmmd(root: Path, plan=CMMD_PLAN, *, xlsx: bool = True) -> tuple[Path, dict]:
    """The TCIA tree and the clinical table; returns (root, {file id: (side, view, label)})."""
    expected = {}
    rows = []
    for patient, (listed, imaged) in plan.items():
        series = root / "CMMD" / patient / "07-18-2010-NA-NA-79377" / "1.000000-NA-70244"
        series.mkdir(parents=True)
        n = 0
        for side in imaged:
            for view in ("CC", "MLO"):
                n += 1
                malignant = listed.get(side) == "Malignant"
                write_dicom(
                    series / f"1-{n}.dcm",
                    _uint16(n + len(expected), malignant, side, view),
                    patient_id=patient,
                    laterality=side,
                    uid_seed=f"{patient}-{n}",
                    ViewCodeSequence=_view_code(view),
                )
                if side in listed:
                    expected[f"{patient}_1-{n}"] = (side, view, int(malignant))
        for side, classification in listed.items():
            rows.append(
                [
                    patient,
                    side,
                    50,
                    2,
                    "mass",
                    classification,
                    "" if classification == "Benign" else "Luminal A",
                ]
            )
    if xlsx:
        import openpyxl

        book = openpyxl.Workbook()
        sheet = book.active
        sheet.title = "Sheet1"
        sheet.append(CMMD_HEADER)
        for row in rows:
            sheet.append(row)
        book.save(root / "CMMD_clinicaldata_revision.xlsx")
    else:
        _write_csv(root / "CMMD_clinicaldata_revision.csv", CMMD_HEADER, rows)
    return root, expected


@pytest.mark.parametrize("xlsx", [True, False], ids=["xlsx", "csv"])
def test_cmmd_sides_views_and_labels_per_breast(tmp_path, caplog, xlsx):
    root, expected = write_cmmd(tmp_path / "cmmd", xlsx=xlsx)
    with caplog.at_level(pylogging.WARNING):
        records, bad = read_cmmd(root)
    assert bad == []
    got = {r.file_id: (r.laterality, r.view, r.label) for r in records}
    assert got == expected
    assert {r.patient_id for r in records} == set(CMMD_PLAN)
    assert all(r.file_id.startswith(r.patient_id) for r in records)
    # D1-0004's left breast has no row: its two images are left out, with a warning
    assert "D1-0004" in caplog.text and "1-1.dcm" in caplog.text


def test_cmmd_csv_export_beside_the_xlsx_is_read(tmp_path):
    root, expected = write_cmmd(tmp_path / "cmmd")
    rows = [CMMD_HEADER] + [
        [p, s, 50, 2, "mass", "Malignant", ""] for p, (lst, _) in CMMD_PLAN.items() for s in lst
    ]
    _write_csv(root / "CMMD_clinicaldata_revision.csv", rows[0], rows[1:])  # all malignant
    records, _ = read_cmmd(root)
    assert {r.file_id for r in records} == set(expected) and {r.label for r in records} == {1}
    (root / "CMMD" / "CMMD_clinicaldata_revision.csv").write_text("deeper copy, not read\n")
    assert {r.label for r in read_cmmd(root)[0]} == {1}
    twin = root / "cmmd_clinicaldata_revision.CSV"
    twin.write_text("ID1\n")
    with pytest.raises(DataError, match="two copies"):
        read_cmmd(root)


def test_cmmd_laterality_from_the_table_when_the_header_has_none(tmp_path):
    root, expected = write_cmmd(tmp_path / "cmmd", plan={"D1-0002": ({"L": "Malignant"}, ["L"])})
    first = root / "CMMD" / "D1-0002" / "07-18-2010-NA-NA-79377" / "1.000000-NA-70244" / "1-1.dcm"
    import pydicom

    ds = pydicom.dcmread(first)
    del ds.ImageLaterality
    ds.save_as(first)
    records, _ = read_cmmd(root)
    assert {r.file_id: (r.laterality, r.view, r.label) for r in records} == expected


def test_cmmd_problems(tmp_path):
    plan = dict(CMMD_PLAN)
    root, _ = write_cmmd(tmp_path / "cmmd", plan=plan, xlsx=False)
    table = root / "CMMD_clinicaldata_revision.csv"
    rows = list(csv.reader(open(table, newline="")))
    rows.append(["D1-0001", "R", 50, 2, "mass", "Malignant", ""])  # disagrees with Benign
    rows.append(["D1-0009", "L", 50, 2, "mass", "Benign", ""])  # no images
    rows.append(["D1-0002", "X", 50, 2, "mass", "Benign", ""])  # unknown side
    _write_csv(table, rows[0], rows[1:])
    with pytest.raises(DataError) as error:
        read_cmmd(root)
    message = str(error.value)
    assert "3 problem(s)" in message and "D1-0009" in message and "'X'" in message
    records, bad = read_cmmd(root, skip_bad=True)
    assert len(bad) == 3
    assert _by_id(records)["D1-0001_1-1"].label == 0  # the first row of the breast holds


# ==================================================================================================
# Each collection prepares and trains two epochs as a --dataset= choice.

TRAIN = dict(
    scheme="label_assign",
    k=1,
    image_size=99,  # a 2x2 grid of instances
    batch_size=4,
    eval_batch_size=16,
    epochs=2,
    num_folds=3,
    learning_rate=1e-4,
    augment=False,
    seed=1,
)


def _train_two_epochs(source: str, root: Path, tmp_path: Path, split: str) -> dict:
    """Trains --dataset=source on its fixture (two epochs, fold 0) and returns split.json with
    the results and the epochs logged."""
    import json

    from deepmil_jax import config as config_module
    from deepmil_jax import train

    config = config_module.Config(
        **TRAIN, dataset=source, manual_dir=str(root), data_dir=str(tmp_path / "data"), split=split
    )
    results = train.train_and_evaluate(config, tmp_path / "run")
    parts = json.loads((tmp_path / "run" / "split.json").read_text())
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert epochs == [1, 2]
    assert 0.0 <= results["test"]["auc"] <= 1.0  # the test part holds both classes
    with open(tmp_path / "run" / "test_predictions.csv", newline="") as f:
        tested = sorted(row["file_id"] for row in csv.DictReader(f))
    assert tested == sorted(parts["test"])
    return parts


def _assert_patient_wise(parts: dict, patient_of: dict[str, str]) -> None:
    assert sorted(parts["train"] + parts["validation"] + parts["test"]) == sorted(patient_of)
    patients = [{patient_of[i] for i in parts[name]} for name in ("train", "validation", "test")]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])


@pytest.mark.slow
def test_cbis_ddsm_trains_on_the_official_split(tmp_path):
    # 12 women, both views of the left breast; even numbers malignant; 10-12 in the test tables
    plan = [
        (
            "Mass" if n % 3 else "Calc",
            "Test" if n > 9 else "Training",
            n,
            "LEFT",
            view,
            [(4, "MALIGNANT" if n % 2 == 0 else "BENIGN")],
        )
        for n in range(1, 13)
        for view in ("CC", "MLO")
    ]
    root = write_cbis_ddsm(tmp_path / "cbis", plan=plan)
    parts = _train_two_epochs("cbis_ddsm", root, tmp_path, "official")
    official_test = {f"P_{n:05d}_LEFT_{v}" for n in (10, 11, 12) for v in ("CC", "MLO")}
    assert set(parts["test"]) == official_test
    assert len(parts["train"]) + len(parts["validation"]) == 18 and parts["validation"]


@pytest.mark.slow
def test_vindr_mammo_trains_on_the_official_split(tmp_path):
    studies = [f"{i:02d}" + "ab" * 15 for i in range(12)]
    plan = {
        s: ("test" if i >= 9 else "training", {"L": 4 if i % 2 == 0 else 1, "R": 2})
        for i, s in enumerate(studies)
    }
    root = write_vindr(tmp_path / "vindr", plan=plan)
    parts = _train_two_epochs("vindr_mammo", root, tmp_path, "official")
    official_test = {
        _vindr_image_id(s, side, view)
        for s in studies[9:]
        for side in "LR"
        for view in ("CC", "MLO")
    }
    assert set(parts["test"]) == official_test
    study_of = {
        _vindr_image_id(s, side, view): s
        for s in studies
        for side in "LR"
        for view in ("CC", "MLO")
    }
    train_studies = {study_of[i] for i in parts["train"]}
    assert not train_studies & {study_of[i] for i in parts["validation"]}


@pytest.mark.slow
def test_cmmd_trains_patient_wise(tmp_path):
    plan = {
        f"D1-{n:04d}": ({side: "Malignant" if n % 2 else "Benign"}, [side])
        for n in range(1, 10)
        for side in ["L" if n % 3 else "R"]
    }
    root, expected = write_cmmd(tmp_path / "cmmd", plan=plan)
    parts = _train_two_epochs("cmmd", root, tmp_path, "patient")
    _assert_patient_wise(parts, {i: i.split("_")[0] for i in expected})


@pytest.mark.slow
def test_mias_trains_patient_wise(tmp_path):
    root = write_mias(tmp_path / "mias")
    parts = _train_two_epochs("mias", root, tmp_path, "patient")
    _assert_patient_wise(parts, {f"mdb{n:03d}": str((n + 1) // 2) for n, _, _ in MIAS_PLAN})


def test_a_changed_table_prepares_again(tmp_path):
    from data_pipeline import datasets

    root, expected = write_cmmd(tmp_path / "cmmd", xlsx=False)
    kwargs = dict(manual_dir=root, data_dir=tmp_path / "tfds", image_size=67, num_workers=0)
    first = datasets.prepare("cmmd", **kwargs)
    assert dict(zip(first.file_ids, first.labels.tolist(), strict=True)) == {
        i: label for i, (_, _, label) in expected.items()
    }
    assert set(first.subsets) == {""}  # CMMD has no official split
    # D1-0001's right breast becomes malignant in the table: its two images change label
    table = root / "CMMD_clinicaldata_revision.csv"
    table.write_text(
        table.read_text().replace("D1-0001,R,50,2,mass,Benign", "D1-0001,R,50,2,mass,Malignant")
    )
    second = datasets.prepare("cmmd", **kwargs)
    changed = {
        i for i, a, b in zip(first.file_ids, first.labels, second.labels, strict=True) if a != b
    }
    assert changed == {"D1-0001_1-1", "D1-0001_1-2"}
    assert all(second.labels[list(second.file_ids).index(i)] == 1 for i in changed)


def test_official_split_is_kept_in_the_prepared_dataset(tmp_path):
    from data_pipeline import datasets

    root = write_vindr(tmp_path / "vindr")
    examples = datasets.prepare(
        "vindr_mammo", manual_dir=root, data_dir=tmp_path / "tfds", image_size=67, num_workers=0
    )
    for file_id, subset, patient in zip(
        examples.file_ids, examples.subsets, examples.patient_ids, strict=True
    ):
        assert subset == {"training": "train", "test": "test"}[VINDR_PLAN[patient][0]], file_id
    # VinDr's boxes come through: every BI-RADS >= 4 image has one box in the preprocessed frame
    for label, boxes in zip(examples.labels, examples.mass_boxes, strict=True):
        assert len(boxes) == int(label)


@pytest.mark.parametrize("dataset", ["cmmd", "mias", "inbreast", "folder"])
def test_official_split_is_refused_without_one(dataset):
    from deepmil_jax import config as config_module
    from deepmil_jax.errors import ConfigError

    config = config_module.Config(dataset=dataset, manual_dir="/data", split="official")
    with pytest.raises(ConfigError, match="--split: .* no official train/test split"):
        config.validate()
    for with_split in ("cbis_ddsm", "vindr_mammo"):  # these have one
        config_module.Config(dataset=with_split, manual_dir="/data", split="official").validate()
