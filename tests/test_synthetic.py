"""Tests of data_pipeline.synthetic: INbreast layout and formats, determinism, lesion size and
place, and that the lesion is the only signal (global statistics at chance, a local one not); for
the hard style, lesion sizes, distractors in both classes and their ROI names, and a classifier on
global statistics at chance."""

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
from data_pipeline.inbreast import read_inbreast, read_mass_outlines
from data_pipeline.preprocess import preprocess_file, read_image
from data_pipeline.synthetic import (
    BENIGN_MASS,
    HARD_LESION_AREA,
    LINEAR_DENSITY,
    write_synthetic_inbreast,
)

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
    assert "--num_images" in out and "--seed" in out and "--out" in out and "--style" in out
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
    easy_names = {
        roi["Name"] for r in records for roi in _rois(tmp_path / "AllXML" / f"{r.file_id}.xml")
    }
    subprocess.run(
        [sys.executable, "-m", "data_pipeline.synthetic", f"--out={tmp_path / 'hard'}"]
        + ["--num_images=4", "--height=96", "--width=80", "--style=hard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    records, bad = read_inbreast(tmp_path / "hard")
    assert len(records) == 4 and bad == []
    for r in records:  # every hard breast has a lesion, a benign mass or a linear density
        names = {roi["Name"] for roi in _rois(tmp_path / "hard" / "AllXML" / f"{r.file_id}.xml")}
        assert names & {"Mass", BENIGN_MASS, LINEAR_DENSITY}
    assert not easy_names & {BENIGN_MASS, LINEAR_DENSITY, "Cluster"}


def test_data_pipeline_imports_no_jax():
    code = (
        "import sys, data_pipeline.preprocess, data_pipeline.inbreast, data_pipeline.synthetic\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'deepmil_jax')]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
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
    lines = run(f"--out={tmp_path / 'd'}", "--style=medium")
    assert lines == ["error: --style=medium: choose one of easy, hard"]
    lines = run(f"--out={tmp_path / 'b'}", "--height=8")
    assert len(lines) == 1 and lines[0].startswith("error: --height=8"), lines
    assert not any((tmp_path / d).exists() for d in "abd")
    # A folder holding other images: the DataError, on one line.
    write_synthetic_inbreast(tmp_path / "c", num_images=2, seed=0, image_shape=(64, 416))
    lines = run(f"--out={tmp_path / 'c'}", "--num_images=2", "--seed=1", "--height=64")
    assert len(lines) == 1 and lines[0].startswith("error: ") and "AllDICOMs" in lines[0], lines


def test_a_folder_holding_what_it_did_not_write_is_refused(tmp_path):
    small = dict(num_images=2, seed=0, image_shape=(64, 80))
    user = tmp_path / "user"
    user.mkdir()
    (user / "INbreast.csv").write_text("Patient ID;File Name\r\nmine;123\r\n")
    with pytest.raises(DataError, match=r"user: holds INbreast.csv, which .* did not write"):
        write_synthetic_inbreast(user, **small)
    assert sorted(p.name for p in user.iterdir()) == ["INbreast.csv"]  # nothing written
    assert "mine;123" in (user / "INbreast.csv").read_text()
    # the command line: one line naming the folder, status 1; --overwrite writes there anyway
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipeline.synthetic", f"--out={user}", "--num_images=2"]
        + ["--height=64", "--width=80"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "mine;123" in (user / "INbreast.csv").read_text()
    assert proc.stderr.strip().splitlines() == [
        f"error: {user}: holds INbreast.csv, which data_pipeline.synthetic did not write; write "
        "into an empty or new folder, or pass --overwrite (overwrite=True) to write there anyway."
    ]
    write_synthetic_inbreast(user, overwrite=True, **small)
    assert len(read_inbreast(user)[0]) == 2
    # its own output, complete (written again, the same bytes) or interrupted: written there
    own = write_synthetic_inbreast(tmp_path / "own", **small)
    before = {p: p.read_bytes() for p in own.rglob("*") if p.is_file()}
    write_synthetic_inbreast(own, **small)
    assert {p: p.read_bytes() for p in own.rglob("*") if p.is_file()} == before
    (own / "INbreast.csv").unlink()
    next((own / "AllDICOMs").iterdir()).unlink()
    write_synthetic_inbreast(own, **small)
    assert {p: p.read_bytes() for p in own.rglob("*") if p.is_file()} == before
    (own / ".DS_Store").write_bytes(b"")  # hidden files do not count
    write_synthetic_inbreast(own, **small)
    # anything else, beside or inside its folders; an INbreast.csv of other images or beside
    # a missing image
    for extra in ("notes.txt", "AllXML/other.xml", "AllDICOMs/readme", "AllROI/"):
        folder = tmp_path / extra.replace("/", "_")
        write_synthetic_inbreast(folder, **small)
        (folder / extra).parent.mkdir(exist_ok=True)
        if extra.endswith("/"):
            (folder / extra).mkdir()
        else:
            (folder / extra).write_text("x")
        with pytest.raises(DataError, match=rf"holds {extra.rstrip('/')}, which"):
            write_synthetic_inbreast(folder, **small)
    table = (own / "INbreast.csv").read_bytes()
    (own / "INbreast.csv").write_bytes(table.rsplit(b"\r\n", 2)[0] + b"\r\n")  # a row less
    with pytest.raises(DataError, match="holds INbreast.csv"):
        write_synthetic_inbreast(own, **small)
    (own / "INbreast.csv").write_bytes(table)
    next((own / "AllDICOMs").iterdir()).unlink()
    with pytest.raises(DataError, match="holds INbreast.csv"):
        write_synthetic_inbreast(own, **small)


# --------------------------------------------------------------------------------------------------
# The hard style.

HARD_SHAPE = (128, 104)  # small: the statistics need many images, not many pixels


def _rois(xml: Path) -> list[dict]:
    return plistlib.loads(xml.read_bytes())["Images"][0]["ROIs"]


def _shoelace(points_yx: np.ndarray) -> float:
    y, x = points_yx[:, 0], points_yx[:, 1]
    return 0.5 * abs(float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)))


def _points(roi: dict) -> np.ndarray:
    xy = [tuple(float(v) for v in p.strip("()").split(",")) for p in roi["Point_px"]]
    return np.array([(y, x) for x, y in xy])


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    """400 small hard-style images (100 women), read, their XML parsed and preprocessed once."""
    root = write_synthetic_inbreast(
        tmp_path_factory.mktemp("hard"),
        num_images=400,
        seed=0,
        image_shape=HARD_SHAPE,
        style="hard",
    )
    records, bad = read_inbreast(root)
    assert bad == [] and len(records) == 400
    rois = [_rois(root / "AllXML" / f"{r.file_id}.xml") for r in records]
    processed = [preprocess_file(r.path) for r in records]
    return root, records, rois, processed


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
def test_hard_mass_outlines_exactly_in_positives(hard):
    root, records, rois, _ = hard
    labels = np.array([r.label for r in records])
    assert labels.sum() == 100  # a quarter of the breasts, both views
    named = [Counter(roi["Name"] for roi in image_rois) for image_rois in rois]
    for r, names in zip(records, named, strict=True):
        # The reader's masses are exactly the "Mass" ROIs: none in a negative image, one to three
        # in a positive one; benign masses, clusters and calcifications are left out.
        assert len(r.masses) == names["Mass"]
        assert (names["Mass"] > 0) == bool(r.label), r.file_id
        assert names["Mass"] <= 3 and names["Calcification"] >= 1
        assert set(names) <= {"Mass", BENIGN_MASS, LINEAR_DENSITY, "Cluster", "Calcification"}
        if names[BENIGN_MASS]:
            benign = read_mass_outlines(root / "AllXML" / f"{r.file_id}.xml", name=BENIGN_MASS)
            assert len(benign) == names[BENIGN_MASS]
            assert not any(np.array_equal(b, m) for b in benign for m in r.masses)
    lesions = Counter(n["Mass"] for n, y in zip(named, labels, strict=True) if y)
    assert lesions[1] > lesions[2] > lesions[3] > 0  # some positives have two or three lesions
    # Both views of a breast show the same number of lesions.
    per_breast = {}
    for r in records:
        per_breast.setdefault((r.patient_id, r.laterality), set()).add(len(r.masses))
    assert all(len(v) == 1 for v in per_breast.values())


def test_hard_distractors_in_both_classes_alike(hard):
    _, records, rois, _ = hard
    labels = np.array([r.label for r in records])
    named = [Counter(roi["Name"] for roi in image_rois) for image_rois in rois]
    benign = np.array([n[BENIGN_MASS] > 0 for n in named])
    linear = np.array([n[LINEAR_DENSITY] > 0 for n in named])
    cluster = np.array([n["Cluster"] > 0 for n in named])
    # Benign masses, linear densities and calcification clusters in both classes.
    pos, neg = labels == 1, labels == 0
    assert 0.25 < benign[pos].mean() < 0.6 and 0.25 < benign[neg].mean() < 0.6
    assert abs(benign[pos].mean() - benign[neg].mean()) < 0.15
    assert linear[pos].mean() > 0.15 and linear[neg].mean() > 0.95
    for c in (pos, neg):
        assert 0.2 < cluster[c].mean() < 0.5
    # The area of all findings (lesions, benign masses, linear densities; shoelace areas of the
    # outlines over the breast's pixels) does not tell the classes apart.
    breast = _breast_areas(records)
    names = ("Mass", BENIGN_MASS, LINEAR_DENSITY)
    covered = [
        sum(_shoelace(_points(roi)) for roi in image_rois if roi["Name"] in names)
        / breast[r.file_id]
        for r, image_rois in zip(records, rois, strict=True)
    ]
    assert 0.4 < _auc(labels, covered) < 0.6


def _breast_areas(records) -> dict[str, float]:
    return {r.file_id: float((read_image(r.path) > 0.1).sum()) for r in records}


def test_hard_lesion_areas_span_the_range(hard):
    _, records, rois, _ = hard
    breast = _breast_areas(records)
    fractions = {"Mass": [], BENIGN_MASS: []}
    for r, image_rois in zip(records, rois, strict=True):
        for roi in image_rois:
            if roi["Name"] in fractions:
                fractions[roi["Name"]].append(_shoelace(_points(roi)) / breast[r.file_id])
    lesion = np.array(fractions["Mass"])
    lo, hi = HARD_LESION_AREA
    # From about 0.2% to 10% of the breast (outline vs thresholded breast; a large lesion shrinks
    # when the breast has no room for it).
    assert 0.7 * lo < lesion.min() < 1.5 * lo and 0.6 * hi < lesion.max() < 1.3 * hi
    # Log-uniform: each third of the log range holds about a third of the lesions.
    edges = np.exp(np.linspace(np.log(lo), np.log(hi), 4))
    thirds = np.histogram(lesion, bins=[0, edges[1], edges[2], np.inf])[0] / len(lesion)
    assert np.all(np.abs(thirds - 1 / 3) < 0.12), thirds
    # The benign masses are drawn from the same sizes.
    benign = np.array(fractions[BENIGN_MASS])
    assert 0.67 < np.median(benign) / np.median(lesion) < 1.5


def test_hard_distractors_as_bright_as_lesions(hard):
    """Mean intensity inside each outline minus that of a ring around it, in the decoded image:
    linear densities as bright as lesions (drawn alike), benign masses somewhat dimmer, all brighter
    than their surroundings."""
    _, records, rois, _ = hard
    contrast = {"Mass": [], BENIGN_MASS: [], LINEAR_DENSITY: []}
    for r, image_rois in zip(records[:200], rois[:200], strict=True):
        image = read_image(r.path)
        breast = image > 0.1
        for roi in image_rois:
            if roi["Name"] not in contrast:
                continue
            outline = _points(roi)
            inside = skimage.draw.polygon2mask(image.shape, outline) & breast
            centre = outline.mean(0)
            ring = skimage.draw.polygon2mask(image.shape, (outline - centre) * 1.6 + centre)
            ring &= ~inside & breast
            if inside.sum() >= 4 and ring.sum() >= 4:
                contrast[roi["Name"]].append(image[inside].mean() - image[ring].mean())
    lesion, benign, linear = (np.median(contrast[k]) for k in ("Mass", BENIGN_MASS, LINEAR_DENSITY))
    assert min(lesion, benign, linear) > 0.02
    assert 0.75 < linear / lesion < 1.33
    assert 0.5 < benign / lesion < 1.0
    # Their ranges overlap: a quarter of the benign masses are brighter than a quarter of lesions.
    assert np.percentile(contrast[BENIGN_MASS], 75) > np.percentile(contrast["Mass"], 25)


def test_hard_global_statistics_are_at_chance(hard):
    """A logistic regression on global statistics of each preprocessed image (mean, spread,
    percentiles of the breast's intensities, breast area), cross-validated by woman, is at chance;
    the same classifier finds a global shift of 0.01 in the positives' breast mean."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _, records, _, processed = hard
    labels = np.array([r.label for r in records])
    features = []
    for image, g in processed:
        inside = image[image > 0.05]
        y0, x0, y1, x1 = g.crop
        area = (image > 0.05).mean() * (y1 - y0) * (x1 - x0)  # in original pixels
        percentiles = np.percentile(inside, [1, 5, 25, 50, 75, 95, 99])
        features.append(
            [image.mean(), image.std(), inside.mean(), inside.std(), *percentiles, area]
        )
    features = np.array(features)
    for j in range(features.shape[1]):
        assert 0.4 < _auc(labels, features[:, j]) < 0.6, f"feature {j}"

    def cv_auc(x: np.ndarray) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        folds = StratifiedGroupKFold(5, shuffle=True, random_state=0)
        groups = [r.patient_id for r in records]
        return float(
            cross_val_score(model, x, labels, groups=groups, cv=folds, scoring="roc_auc").mean()
        )

    assert 0.35 < cv_auc(features) < 0.65
    leaky = features.copy()
    leaky[:, 2] += 0.01 * labels
    assert cv_auc(leaky) > 0.9


def test_hard_deterministic_for_a_seed(tmp_path):
    kw = {"num_images": 8, "image_shape": (128, 104), "style": "hard"}
    a = write_synthetic_inbreast(tmp_path / "a", seed=5, **kw)
    b = write_synthetic_inbreast(tmp_path / "b", seed=5, **kw)
    c = write_synthetic_inbreast(tmp_path / "c", seed=6, **kw)
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert len([f for f in files if f.endswith(".xml")]) == 8
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == []
    dicoms = sorted((a / "AllDICOMs").iterdir())
    others = sorted((c / "AllDICOMs").iterdir())
    assert not np.array_equal(read_image(dicoms[0]), read_image(others[0]))
    # The same seed in the easy style: the same women and labels, other pictures.
    e = write_synthetic_inbreast(tmp_path / "e", seed=5, num_images=8, image_shape=(128, 104))
    assert sorted(p.name for p in (e / "AllDICOMs").iterdir()) == [p.name for p in dicoms]
    assert not np.array_equal(read_image(dicoms[0]), read_image(e / "AllDICOMs" / dicoms[0].name))
    with pytest.raises(ValueError, match="style"):
        write_synthetic_inbreast(tmp_path / "d", num_images=4, style="medium")
