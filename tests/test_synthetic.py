"""Tests of data_pipeline.synthetic: INbreast layout and formats, determinism, lesion size and
place, and that the lesion is the only signal (global statistics at chance, a local one not)."""

import csv
import filecmp
import plistlib
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
import skimage.draw
import skimage.filters
from sklearn.metrics import roc_auc_score

from data_pipeline.errors import DataError
from data_pipeline.inbreast import read_inbreast
from data_pipeline.preprocess import preprocess_file, read_image
from data_pipeline.synthetic import write_synthetic_inbreast

NAME = re.compile(r"^(\d{8})_([0-9a-f]{16})_MG_([LR])_(CC|MLO)_ANON\.dcm$")
HEADER = "Patient ID;Patient age;Laterality;View;Acquisition date;File Name;ACR;Bi-Rads"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """96 images at the default size, read and preprocessed once for the tests below."""
    root = write_synthetic_inbreast(tmp_path_factory.mktemp("synthetic"), num_images=96, seed=0)
    records, bad = read_inbreast(root)
    assert bad == []
    processed = [preprocess_file(r.path) for r in records]
    return root, records, processed


def test_layout_and_table_format(dataset):
    root, records, _ = dataset
    names = sorted(p.name for p in (root / "AllDICOMs").iterdir())
    assert len(names) == 96 and all(NAME.match(n) for n in names)
    raw = (root / "INbreast.csv").read_bytes()
    assert raw.startswith(HEADER.encode() + b"\r\n") and raw.count(b"\r\n") == 97
    assert b"\n" not in raw.replace(b"\r\n", b"")
    rows = list(csv.reader(raw.decode().splitlines()[1:], delimiter=";"))
    assert all(row[:2] == ["removed", "removed"] and len(row) == 8 for row in rows)
    by_name = {NAME.match(n).group(1): NAME.match(n).groups() for n in names}
    for row in rows:  # the table agrees with the file names
        _, _, lat, view = by_name[row[5]]
        assert (row[2], row[3]) == (lat, view)
    # Four images per woman: L/R x CC/MLO.
    per_patient = Counter(r.patient_id for r in records)
    assert len(per_patient) == 24 and set(per_patient.values()) == {4}
    for p in per_patient:
        views = {(r.laterality, r.view) for r in records if r.patient_id == p}
        assert views == {("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")}
    # About 25% positive, with the right BI-RADS; both views of a breast agree.
    labels = np.array([r.label for r in records])
    assert labels.sum() == 24
    assert {r.birads for r in records if r.label} <= {"4a", "4b", "4c", "5", "6"}
    assert {r.birads for r in records if not r.label} <= {"1", "2", "3"}
    for p in per_patient:
        for side in "LR":
            assert len({r.label for r in records if (r.patient_id, r.laterality) == (p, side)}) == 1


def test_dicom_files_are_proper(dataset):
    _, records, _ = dataset
    photometric = Counter()
    for r in records[:24]:
        ds = pydicom.dcmread(r.path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored) == (512, 416, 16, 12)
        assert ds.Modality == "MG" and ds.ImageLaterality == r.laterality
        assert ds.pixel_array.dtype == np.uint16 and ds.pixel_array.max() <= 4095
        photometric[ds.PhotometricInterpretation] += 1
    assert photometric["MONOCHROME1"] >= 2 and photometric["MONOCHROME2"] >= 12
    # MONOCHROME1 files decode to the same look: bright breast on a dark background.
    for r in records[:24]:
        image = read_image(r.path)
        assert image[0:5, :].mean() < 0.1 < image[250:260, :].max()


def test_outlines_only_for_positives_and_inside_the_lesion(dataset):
    root, records, processed = dataset
    for r, (image, geometry) in zip(records, processed, strict=True):
        assert len(r.masses) == r.label
        xml = root / "AllXML" / f"{r.file_id}.xml"
        assert xml.exists()  # every image has calcifications outlined (and left out of masses)
        names = {roi["Name"] for roi in plistlib.loads(xml.read_bytes())["Images"][0]["ROIs"]}
        assert "Calcification" in names and ("Mass" in names) == bool(r.label)
        if not r.label:
            continue
        outline = r.masses[0]
        original = read_image(r.path)
        breast = original > 0.1  # background is below 0.05, tissue above 0.15
        mass = skimage.draw.polygon2mask(original.shape, outline)
        # About 2% of the breast (1.6-2.4% drawn, outline vs soft edge), inside the breast.
        assert 0.013 < mass.sum() / breast.sum() < 0.03
        assert breast[mass].mean() > 0.99
        # Brighter than the tissue around it, in the preprocessed image as well.
        ring = skimage.draw.polygon2mask(
            original.shape, (outline - outline.mean(0)) * 2 + outline.mean(0)
        )
        ring &= ~mass & breast
        assert original[mass].mean() > original[ring].mean() + 0.06
        y0, x0, y1, x1 = np.round(geometry.box_from_original(outline)).astype(int)
        inside = image[y0 : y1 + 1, x0 : x1 + 1].mean()
        assert inside > image[image > 0.05].mean() + 0.05


def _auc(labels, values) -> float:
    return float(roc_auc_score(labels, values))


def test_global_statistics_are_at_chance(dataset):
    _, records, processed = dataset
    labels = np.array([r.label for r in records])
    mean_all, mean_breast, area = [], [], []
    for image, g in processed:
        breast = image > 0.05
        y0, x0, y1, x1 = g.crop
        mean_all.append(image.mean())
        mean_breast.append(image[breast].mean())
        area.append(breast.mean() * (y1 - y0) * (x1 - x0))  # in original pixels
    for name, values in [("mean", mean_all), ("breast mean", mean_breast), ("area", area)]:
        auc = _auc(labels, values)
        assert 0.4 <= auc <= 0.6, f"{name}: AUC {auc:.3f}"


def test_the_lesion_is_a_learnable_local_signal(dataset):
    _, records, processed = dataset
    labels = np.array([r.label for r in records])
    scores = []
    for image, _ in processed:
        breast = image > 0.05

        def local_mean(sigma, image=image, breast=breast):
            weight = skimage.filters.gaussian(breast.astype(float), sigma)
            return skimage.filters.gaussian(image * breast, sigma) / np.maximum(weight, 1e-3)

        blob = local_mean(4) - local_mean(16)  # a difference of Gaussians at the lesion's scale
        inner = skimage.filters.gaussian(breast.astype(float), 3) > 0.99
        scores.append(blob[inner].max())
    assert _auc(labels, scores) > 0.9


def test_deterministic_for_a_seed(tmp_path):
    a = write_synthetic_inbreast(tmp_path / "a", num_images=6, seed=3, image_shape=(128, 104))
    b = write_synthetic_inbreast(tmp_path / "b", num_images=6, seed=3, image_shape=(128, 104))
    c = write_synthetic_inbreast(tmp_path / "c", num_images=6, seed=4, image_shape=(128, 104))
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert len([f for f in files if f.endswith(".dcm")]) == 6
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == []
    assert (a / "INbreast.csv").read_bytes() != (c / "INbreast.csv").read_bytes()
    records, _ = read_inbreast(a)  # six images: one woman and a half
    assert [len({r.patient_id for r in records})] == [2]
    # Another seed into the same folder would mix two datasets: refused.
    with pytest.raises(DataError, match="AllDICOMs.*would not write"):
        write_synthetic_inbreast(a, num_images=6, seed=4, image_shape=(128, 104))


def test_command_line(tmp_path):
    out = subprocess.run(  # absl exits with status 1 after --help
        [sys.executable, "-m", "data_pipeline.synthetic", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout
    assert "--num_images" in out and "--seed" in out and "--out" in out
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipeline.synthetic",
            f"--out={tmp_path}",
            "--num_images=4",
            "--height=96",
            "--width=80",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    records, bad = read_inbreast(tmp_path)
    assert len(records) == 4 and bad == []
    assert read_image(records[0].path).shape == (96, 80)


def test_data_pipeline_imports_no_jax():
    code = (
        "import sys, data_pipeline.preprocess, data_pipeline.inbreast, data_pipeline.synthetic\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'deepmil_jax')]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_cli_errors_are_one_line_naming_the_flag(tmp_path):
    def run(*args: str) -> list[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "data_pipeline.synthetic", *args],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode != 0
        return proc.stderr.strip().splitlines()

    lines = run(f"--out={tmp_path / 'a'}", "--num_images=0")
    assert lines == ["error: --num_images=0: write at least one image"]
    lines = run(f"--out={tmp_path / 'b'}", "--height=8")
    assert len(lines) == 1 and lines[0].startswith("error: --height=8"), lines
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # A folder holding other images: the DataError, on one line.
    write_synthetic_inbreast(tmp_path / "c", num_images=2, seed=0, image_shape=(64, 416))
    lines = run(f"--out={tmp_path / 'c'}", "--num_images=2", "--seed=1", "--height=64")
    assert len(lines) == 1 and lines[0].startswith("error: ") and "AllDICOMs" in lines[0], lines
