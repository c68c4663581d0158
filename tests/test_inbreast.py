"""Tests of data_pipeline.inbreast: the real INbreast table, a generated INbreast folder (DICOM and
converted PNG/TIFF), XML outlines, the generic folder + CSV source, and bad input."""

import plistlib
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import skimage.io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline.errors import DataError
from data_pipeline.inbreast import (
    BadFile,
    birads_label,
    read_folder,
    read_inbreast,
    read_inbreast_table,
    read_mass_outlines,
)
from data_pipeline.preprocess import preprocess_file, read_image
from data_pipeline.synthetic import write_dicom

FIXTURE = Path(__file__).parent / "fixtures" / "INbreast.csv"
HEADER = "Patient ID;Patient age;Laterality;View;Acquisition date;File Name;ACR;Bi-Rads"
fuzz = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# ---------------------------------------------------------------------------------------------
# The real table.


def test_real_inbreast_table():
    raw = FIXTURE.read_bytes()
    assert raw.count(b"\r\n") == 411 and raw.count(b"\n") == 411  # CRLF, as published
    rows = read_inbreast_table(FIXTURE)
    assert len(rows) == 410
    assert sum(r.label for r in rows) == 100
    counts = Counter(r.birads for r in rows)
    assert counts == {"1": 67, "2": 220, "3": 23, "4a": 13, "4b": 8, "4c": 22, "5": 49, "6": 8}
    assert len({r.file_id for r in rows}) == 410 and all(r.file_id.isdigit() for r in rows)
    assert {r.laterality for r in rows} == {"L", "R"}
    assert Counter(r.view for r in rows) == {"CC": 203, "MLO": 206, "FB": 1}
    assert all(r.patient_id == "" for r in rows)  # blanked ("removed") in the published table
    first = rows[0]
    assert (first.file_id, first.laterality, first.view, first.birads, first.acr, first.line) == (
        "22678622",
        "R",
        "CC",
        "1",
        "4",
        2,
    )


@pytest.mark.parametrize(
    "value,label",
    [
        ("1", 0),
        ("2", 0),
        ("3", 0),
        ("4", 1),
        ("4a", 1),
        ("4B", 1),
        (" 4c ", 1),
        ("5", 1),
        ("6", 1),
        ("5.0", 1),
        ("2.0", 0),
    ],
)
def test_birads_label(value, label):
    assert birads_label(value) == label


@pytest.mark.parametrize("value", ["0", "7", "4d", "x", "", "45"])
def test_birads_unknown(value):
    with pytest.raises(DataError, match="unknown BI-RADS"):
        birads_label(value)


# ---------------------------------------------------------------------------------------------
# A generated INbreast folder.

PATIENT_A, PATIENT_B = "0a1b2c3d4e5f6a7b", "ffeeddccbbaa9988"
IMAGES = [  # id, patient, laterality, view, BI-RADS
    ("100", PATIENT_A, "R", "CC", "1"),
    ("124", PATIENT_A, "L", "CC", "4b"),
    ("148", PATIENT_A, "R", "MLO", "2"),
    ("172", PATIENT_A, "L", "MLO", "5"),
    ("196", PATIENT_B, "R", "CC", "3"),
    ("220", PATIENT_B, "L", "MLO", "6"),
]


def tiny_mammogram(side: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:48]
    d = xx if side == "L" else 47 - xx
    inside = ((yy - 32) / 26.0) ** 2 + (d / 34.0) ** 2 < 1
    return np.where(inside, rng.integers(1500, 3000, (64, 48)), rng.integers(0, 30, (64, 48)))


def write_table(path: Path, rows, header: str = HEADER, newline: str = "\r\n") -> Path:
    lines = [header] + [
        ";".join(["removed", "removed", lat, view, "201001", fid, "2", birads])
        for fid, _, lat, view, birads in rows
    ]
    path.write_bytes((newline.join(lines) + newline).encode())
    return path


def plist_rois(*rois) -> dict:
    return {
        "Images": [{"ImageIndex": 0, "NumberOfROIs": len(rois), "ROIs": [dict(r) for r in rois]}]
    }


def roi(name: str, points_xy) -> dict:
    return {
        "Name": name,
        "NumberOfPoints": len(points_xy),
        "Point_px": [f"({x:.6f}, {y:.6f})" for x, y in points_xy],
        "Point_mm": [f"({x * 0.07:.6f}, {y * 0.07:.6f}, 0.000000)" for x, y in points_xy],
    }


MASS_XY = [(10.5, 20.25), (14.0, 22.0), (12.0, 27.5)]


def make_inbreast(root: Path, rows=IMAGES, *, table=True) -> Path:
    (root / "AllDICOMs").mkdir(parents=True)
    (root / "AllXML").mkdir()
    for i, (fid, patient, lat, view, _) in enumerate(rows):
        name = f"{fid}_{patient}_MG_{lat}_{view}_ANON.dcm"
        write_dicom(root / "AllDICOMs" / name, tiny_mammogram(lat, i).astype(np.uint16))
    # Image 124 has a mass and a calcification; 172 two masses; 100 only calcifications.
    xml = plist_rois(roi("Mass", MASS_XY), roi("Calcification", [(30.0, 30.0)]))
    (root / "AllXML" / "124.xml").write_bytes(plistlib.dumps(xml))
    xml = plist_rois(roi("Mass", MASS_XY), roi("Mass", [(1, 2), (3, 4), (5, 1)]))
    (root / "AllXML" / "172.xml").write_bytes(plistlib.dumps(xml))
    xml = plist_rois(roi("Calcification", [(3.0, 4.0)]), roi("Cluster", MASS_XY))
    (root / "AllXML" / "100.xml").write_bytes(plistlib.dumps(xml))
    if table:
        write_table(root / "INbreast.csv", rows)
    return root


def test_read_generated_inbreast(tmp_path):
    records, bad = read_inbreast(make_inbreast(tmp_path / "INbreast"))
    assert bad == []
    assert [r.file_id for r in records] == [row[0] for row in IMAGES]
    for r, (fid, patient, lat, view, birads) in zip(records, IMAGES, strict=True):
        assert r.patient_id == patient and r.laterality == lat and r.view == view
        assert r.birads == birads and r.label == int(birads[0] in "456")
        assert r.path.name.startswith(f"{fid}_{patient}_MG_{lat}_{view}")
    by_id = {r.file_id: r for r in records}
    assert len(by_id["124"].masses) == 1  # the calcification is left out
    expected_yx = np.array([[y, x] for x, y in MASS_XY])
    np.testing.assert_allclose(by_id["124"].masses[0], expected_yx)
    assert len(by_id["172"].masses) == 2
    assert by_id["100"].masses == () and by_id["148"].masses == ()
    # Every record preprocesses; the mass box maps into the preprocessed image.
    image, geometry = preprocess_file(by_id["124"].path)
    box = geometry.box_from_original(by_id["124"].masses[0])
    assert image.shape == (227, 227) and np.all((box >= 0) & (box <= 226))


def test_missing_allxml_is_said_once(tmp_path, caplog):
    root = make_inbreast(tmp_path / "INbreast")
    with caplog.at_level("WARNING"):
        read_inbreast(root)
    assert "localisation score" not in caplog.text  # outlines present: nothing to say
    for xml in (root / "AllXML").iterdir():
        xml.unlink()
    (root / "AllXML").rmdir()
    caplog.clear()
    with caplog.at_level("WARNING"):
        records, _ = read_inbreast(root)
    said = [r for r in caplog.records if "localisation score" in r.getMessage()]
    assert len(said) == 1 and "AllXML" in said[0].getMessage()
    assert all(r.masses == () for r in records)


def test_xml_reader_keeps_only_masses(tmp_path):
    path = tmp_path / "1.xml"
    xml = plist_rois(
        roi("Calcification", [(1, 1)]), roi(" mass ", MASS_XY), roi("Spiculated Region", MASS_XY)
    )
    path.write_bytes(plistlib.dumps(xml))
    (outline,) = read_mass_outlines(path)
    assert outline.shape == (3, 2) and outline.dtype == np.float64
    np.testing.assert_allclose(outline[:, 0], [y for _, y in MASS_XY])
    np.testing.assert_allclose(outline[:, 1], [x for x, _ in MASS_XY])


def test_converted_png_and_tiff(tmp_path):
    root = tmp_path / "converted"
    rows = IMAGES[:3]
    (root / "png8").mkdir(parents=True)
    (root / "deep" / "png16").mkdir(parents=True)
    images = {}
    for i, (fid, patient, lat, view, _) in enumerate(rows):
        img = tiny_mammogram(lat, i)
        if i == 0:
            arr, path = (img // 16).astype(np.uint8), root / "png8" / f"{fid}_{patient}.png"
        elif i == 1:
            arr, path = img.astype(np.uint16) * 16, root / "deep" / "png16" / f"{fid}_converted.png"
        else:
            arr, path = img.astype(np.uint16), root / f"{fid}_{patient}_MG_{lat}_{view}.tif"
        skimage.io.imsave(path, arr, check_contrast=False)
        images[fid] = arr
    write_table(root / "INbreast.csv", rows)
    records, bad = read_inbreast(root)
    assert bad == [] and [r.file_id for r in records] == ["100", "124", "148"]
    assert [r.path.suffix for r in records] == [".png", ".png", ".tif"]
    assert records[0].patient_id == PATIENT_A
    assert records[1].patient_id == "124"  # no patient in "124_converted": its own patient
    for r in records:
        a = images[r.file_id].astype(np.float64)
        np.testing.assert_allclose(
            read_image(r.path), (a - a.min()) / (a.max() - a.min()), atol=1e-6
        )
        assert preprocess_file(r.path)[0].shape == (227, 227)


def test_dicom_preferred_over_png(tmp_path):
    root = make_inbreast(tmp_path / "db", IMAGES[:2])
    (root / "png").mkdir()
    skimage.io.imsave(root / "png" / "100_x.png", np.zeros((8, 8), np.uint8), check_contrast=False)
    records, bad = read_inbreast(root)
    assert bad == [] and records[0].path.suffix == ".dcm"


def test_comma_separated_lf_table_with_bom(tmp_path):
    root = make_inbreast(tmp_path / "db", IMAGES[:2], table=False)
    text = (
        HEADER.replace(";", ",")
        + "\n"
        + "\n".join(
            f"removed,removed,{lat},{view},201001,{fid}.0,2,{b.upper()}"
            for fid, _, lat, view, b in IMAGES[:2]
        )
    )
    (root / "INbreast.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    records, _ = read_inbreast(root)
    assert [(r.file_id, r.birads, r.label) for r in records] == [("100", "1", 0), ("124", "4b", 1)]


def test_xls_without_reader_says_export_to_csv(tmp_path, monkeypatch):
    root = make_inbreast(tmp_path / "db", IMAGES[:2], table=False)
    (root / "INbreast.xls").write_bytes(b"\xd0\xcf\x11\xe0 not really excel")
    monkeypatch.setitem(sys.modules, "xlrd", None)  # as if not installed
    with pytest.raises(DataError, match=r"INbreast\.xls.*no \.xls reader.*save it as CSV"):
        read_inbreast(root)


def test_xls_with_a_reader(tmp_path, monkeypatch):
    root = make_inbreast(tmp_path / "db", IMAGES[:2], table=False)
    (root / "INbreast.xls").write_bytes(b"fake")
    cells = [HEADER.split(";")] + [
        [
            "removed",
            "removed",
            lat,
            view,
            201001.0,
            float(fid),
            2.0,
            b if b[-1].isalpha() else float(b),
        ]
        for fid, _, lat, view, b in IMAGES[:2]
    ]
    sheet = types.SimpleNamespace(nrows=len(cells), row_values=lambda r: cells[r])
    book = types.SimpleNamespace(sheet_by_index=lambda i: sheet)
    monkeypatch.setitem(sys.modules, "xlrd", types.SimpleNamespace(open_workbook=lambda p: book))
    records, _ = read_inbreast(root)
    assert [(r.file_id, r.birads, r.label) for r in records] == [("100", "1", 0), ("124", "4b", 1)]


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        read_inbreast(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no INbreast.csv"):
        read_inbreast(tmp_path / "empty")
    write_table(tmp_path / "empty" / "INbreast.csv", IMAGES)
    with pytest.raises(DataError, match="no images"):
        read_inbreast(tmp_path / "empty")


def make_broken(root: Path) -> Path:
    make_inbreast(root)
    rows = IMAGES + [("999", "", "L", "CC", "2")] + [("888", "", "R", "CC", "4x")]
    write_table(root / "INbreast.csv", rows)  # 999: row without image; 888: unknown BI-RADS
    write_dicom(
        root / "AllDICOMs" / "777_abc_MG_L_CC_ANON.dcm", tiny_mammogram("L").astype(np.uint16)
    )
    (root / "AllXML" / "148.xml").write_text("<plist><dict><key>Images</key><array>")  # cut off
    return root


def test_bad_files_raise_one_error_naming_each(tmp_path):
    root = make_broken(tmp_path / "db")
    with pytest.raises(DataError) as info:
        read_inbreast(root)
    message = str(info.value)
    assert "4 problem(s)" in message
    assert "777_abc_MG_L_CC_ANON.dcm: image without a row" in message
    assert "INbreast.csv:8: row for image 999 but no image file" in message
    assert "INbreast.csv:9: unknown BI-RADS value '4x'" in message
    assert "148.xml: unreadable XML outline file" in message
    assert "skip_bad=True" in message


def test_skip_bad_lists_bad_files(tmp_path):
    root = make_broken(tmp_path / "db")
    records, bad = read_inbreast(root, skip_bad=True)
    assert all(isinstance(b, BadFile) for b in bad)
    assert [r.file_id for r in records] == [row[0] for row in IMAGES]  # 148 kept, no outlines
    reasons = {Path(b.path.split(":")[0]).name: b.reason for b in bad}
    assert set(reasons) == {"INbreast.csv", "777_abc_MG_L_CC_ANON.dcm", "148.xml"}
    assert len(bad) == 4
    assert any("kept without outlines" in b.reason for b in bad)


def test_missing_columns(tmp_path):
    root = make_inbreast(tmp_path / "db", IMAGES[:1], table=False)
    (root / "INbreast.csv").write_text("Laterality;View\nL;CC\n")
    with pytest.raises(DataError, match="missing column.*File Name, Bi-Rads"):
        read_inbreast(root)


def test_duplicate_images_for_one_id(tmp_path):
    root = make_inbreast(tmp_path / "db", IMAGES[:2])
    (root / "copy").mkdir()
    write_dicom(root / "copy" / "100_x_MG_R_CC_ANON.dcm", tiny_mammogram("R").astype(np.uint16))
    with pytest.raises(DataError, match="several image files for id 100"):
        read_inbreast(root)


@fuzz
@given(
    text=st.text(
        alphabet=st.sampled_from(list("0123456789;,\t\r\n\"' abcLRCMO-4a.\x00é")), max_size=300
    )
)
def test_fuzz_table_reader(tmp_path, text):
    path = tmp_path / "INbreast.csv"
    path.write_text(HEADER + "\r\n" + text, encoding="utf-8")
    try:
        rows = read_inbreast_table(path)
    except DataError as e:
        assert "INbreast.csv" in str(e)
        return
    for r in rows:
        assert r.label == int(r.birads[0] in "456") and r.file_id


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-10, 10)
    | st.text(max_size=12)
    | st.sampled_from(["(1.5, 2.5)", "(x, y)", "Mass", "(3, 4, 5)", "(1e3,-2)"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["Images", "ROIs", "Name", "Point_px", "NumberOfPoints", "other"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@fuzz
@given(value=json_like, raw=st.binary(max_size=200), use_raw=st.booleans())
def test_fuzz_xml_reader(tmp_path, value, raw, use_raw):
    path = tmp_path / "9.xml"
    if use_raw:
        path.write_bytes(b"<?xml version" + raw)
    else:
        value = {"Images": [{"ROIs": [value, {"Name": "Mass", "Point_px": value}]}]}
        try:
            path.write_bytes(plistlib.dumps(value))
        except (TypeError, ValueError, OverflowError):  # None is not a plist value
            return
    try:
        outlines = read_mass_outlines(path)
    except DataError as e:
        assert "9.xml" in str(e)
        return
    assert all(o.ndim == 2 and o.shape[1] == 2 and np.isfinite(o).all() for o in outlines)


# ---------------------------------------------------------------------------------------------
# Any folder + CSV.


def test_read_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    write_dicom(tmp_path / "imgs" / "a.dcm", tiny_mammogram("L").astype(np.uint16))
    skimage.io.imsave(
        tmp_path / "imgs" / "b.png", tiny_mammogram("R").astype(np.uint16), check_contrast=False
    )
    skimage.io.imsave(
        tmp_path / "c.png", (tiny_mammogram("L") // 16).astype(np.uint8), check_contrast=False
    )
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(
        "path,cancer,woman,view,laterality\n"
        "imgs/a.dcm,0,P1,CC,LEFT\n"
        "imgs/b.png,MALIGNANT,P1,MLO,RIGHT\n"
        f"{tmp_path / 'c.png'},BENIGN_WITHOUT_CALLBACK,P2,,\n"
        "imgs/a.dcm,1,P1,CC,LEFT\n"  # a second finding on image a: positive
    )
    records, bad = read_folder(
        csv_path, image_column="path", label_column="cancer", patient_column="woman"
    )
    assert bad == []
    assert [(r.file_id, r.label, r.patient_id, r.view, r.laterality) for r in records] == [
        ("imgs/a.dcm", 1, "P1", "CC", "L"),
        ("imgs/b.png", 1, "P1", "MLO", "R"),
        ("c.png", 0, "P2", "", ""),  # written absolute, inside the CSV's folder
    ]
    assert records[0].path == tmp_path / "imgs" / "a.dcm" and records[0].masses == ()
    for r in records:
        assert preprocess_file(r.path)[0].shape == (227, 227)
    # Without a patient column each image is its own patient.
    records, _ = read_folder(csv_path, image_column="path", label_column="cancer")
    assert [r.patient_id for r in records] == [r.file_id for r in records]


def test_read_folder_one_image_under_three_spellings(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "data").mkdir()
    write_dicom(tmp_path / "img" / "a.dcm", tiny_mammogram("L").astype(np.uint16))
    write_dicom(tmp_path / "img" / "b.dcm", tiny_mammogram("R").astype(np.uint16))
    outside = tmp_path / "elsewhere" / "c.dcm"
    outside.parent.mkdir()
    write_dicom(outside, tiny_mammogram("L").astype(np.uint16))
    csv_path = tmp_path / "data" / "list.csv"
    csv_path.write_text(
        "image,label,patient\n"
        "../img/a.dcm,0,P1\n"
        "./../img/b.dcm,0,P2\n"
        ".././img/a.dcm,1,\n"  # a second finding of a.dcm, patient left blank
        "..//img//a.dcm,0,P1\n"
        f"{tmp_path}/data/../elsewhere/c.dcm,1,P3\n"
    )
    records, bad = read_folder(csv_path, patient_column="patient")
    assert bad == []
    # All three lie outside the CSV's folder, so their ids are absolute paths without "..".
    expected = [
        (str(tmp_path / "img" / "a.dcm"), tmp_path / "img" / "a.dcm", 1, "P1"),
        (str(tmp_path / "img" / "b.dcm"), tmp_path / "img" / "b.dcm", 0, "P2"),
        (str(outside), outside, 1, "P3"),
    ]
    assert [(r.file_id, r.path, r.label, r.patient_id) for r in records] == expected
    # Inside the CSV's folder the id is relative: four spellings, one image.
    write_dicom(tmp_path / "data" / "d.dcm", tiny_mammogram("R").astype(np.uint16))
    (tmp_path / "data" / "sub").mkdir()
    csv_path.write_text("image,label\nd.dcm,0\n./d.dcm,1\nsub/../d.dcm,0\n.//d.dcm,0\n")
    records, _ = read_folder(csv_path)
    assert [(r.file_id, r.path, r.label, r.patient_id) for r in records] == [
        ("d.dcm", tmp_path / "data" / "d.dcm", 1, "d.dcm")
    ]


def test_read_folder_one_image_two_patients_is_an_error(tmp_path):
    write_dicom(tmp_path / "a.dcm", tiny_mammogram("L").astype(np.uint16))
    write_dicom(tmp_path / "b.dcm", tiny_mammogram("R").astype(np.uint16))
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("image,label,woman\na.dcm,0,P1\nb.dcm,0,P2\n./a.dcm,1,P9\n")
    for skip_bad in (False, True):
        with pytest.raises(DataError) as info:
            read_folder(csv_path, patient_column="woman", skip_bad=skip_bad)
        message = str(info.value)
        assert "list.csv: lines 2 and 4" in message and "a.dcm" in message
        assert "'P1'" in message and "'P9'" in message and "Correct the rows" in message
    # Without the patient column the rows do not conflict.
    records, _ = read_folder(csv_path)
    assert [(r.file_id, r.label) for r in records] == [("a.dcm", 1), ("b.dcm", 0)]


def test_read_folder_bad_rows(tmp_path):
    write_dicom(tmp_path / "a.dcm", tiny_mammogram("L").astype(np.uint16))
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("image;label\na.dcm;1\nmissing.dcm;0\na.dcm;maybe\n;1\n")
    with pytest.raises(DataError) as info:
        read_folder(csv_path)
    message = str(info.value)
    assert "3 problem(s)" in message and "list.csv:3: image missing.dcm not found" in message
    assert "list.csv:4: label 'maybe'" in message and "list.csv:5: row without an image" in message
    records, bad = read_folder(csv_path, skip_bad=True)
    assert [r.file_id for r in records] == ["a.dcm"] and len(bad) == 3
    with pytest.raises(DataError, match="no label column named 'cancer'.*image, label"):
        read_folder(csv_path, label_column="cancer")
    with pytest.raises(DataError, match="no such CSV"):
        read_folder(tmp_path / "nope.csv")


# ---------------------------------------------------------------------------------------------
# Property-based tests of the readers: any bytes, any field -> records or a DataError.

fuzz_more = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
path_cells = st.one_of(
    st.sampled_from(["a.dcm", "./a.dcm", "sub/../a.dcm", "~", "~nobody_here/a.dcm", "~/a.dcm",
                     "/", ".", "..", "a.dcm/x", "a" * 300, "d/" * 3000, "é.png", " a.dcm "]),
    st.text(alphabet=st.sampled_from(list("a./~\\ é-_0")), max_size=20),
)  # fmt: skip
label_cells = st.sampled_from(["0", "1", "yes", "MALIGNANT", "maybe", "", "1.0", "nan"])


@fuzz_more
@given(
    rows=st.lists(st.tuples(path_cells, label_cells, st.text(max_size=5)), max_size=6),
    delimiter=st.sampled_from([",", ";", "\t"]),
)
def test_fuzz_folder_reader_fields(tmp_path, rows, delimiter):
    import csv
    import io

    if not (tmp_path / "a.dcm").exists():
        write_dicom(tmp_path / "a.dcm", tiny_mammogram("L").astype(np.uint16))
    text = io.StringIO()
    writer = csv.writer(text, delimiter=delimiter)
    writer.writerow(["image", "label", "patient"])
    writer.writerows(rows)
    path = tmp_path / "list.csv"
    path.write_text(text.getvalue(), encoding="utf-8")
    for skip_bad in (False, True):
        try:
            records, bad = read_folder(path, patient_column="patient", skip_bad=skip_bad)
        except DataError as e:
            assert "list.csv" in str(e)
            continue
        assert records and all(r.path.is_file() and r.label in (0, 1) for r in records)
        assert len({r.file_id for r in records}) == len(records)


@fuzz_more
@given(data=st.binary(max_size=400), name=st.sampled_from(["INbreast.csv", "list.csv"]))
def test_fuzz_table_readers_random_bytes(tmp_path, data, name):
    path = tmp_path / name
    path.write_bytes(data)
    try:
        if name == "INbreast.csv":
            read_inbreast_table(path)
        else:
            read_folder(path)
    except DataError as e:
        assert name in str(e)


@fuzz_more
@given(
    prefix=st.sampled_from([b"", b"bplist00", b'<?xml version="1.0"?>', b"<plist><dict>"]),
    data=st.binary(max_size=300),
)
def test_fuzz_xml_reader_random_bytes(tmp_path, prefix, data):
    path = tmp_path / "7.xml"
    path.write_bytes(prefix + data)
    try:
        outlines = read_mass_outlines(path)
    except DataError as e:
        assert "7.xml" in str(e)
        return
    assert all(o.ndim == 2 and o.shape[1] == 2 and np.isfinite(o).all() for o in outlines)


def test_xml_entity_declarations_are_refused(tmp_path):
    """A billion-laughs plist must stay a DataError (plistlib refuses entity declarations)."""
    laughs = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    path = tmp_path / "8.xml"
    path.write_text(
        f'<?xml version="1.0"?><!DOCTYPE plist [<!ENTITY l0 "ha">{laughs}]>'
        "<plist><dict><key>Images</key><string>&l9;</string></dict></plist>"
    )
    with pytest.raises(DataError, match=r"8.xml: unreadable XML.*entity"):
        read_mass_outlines(path)


@pytest.mark.parametrize("value,label", [("4 a", 1), (" 4 C", 1), ("2 ", 0), ("5 .0", 1)])
def test_birads_label_ignores_spaces_inside_the_value(value, label):
    assert birads_label(value) == label
