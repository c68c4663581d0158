"""Tests of data_pipeline.datasets: TFDS preparation of INbreast-layout and folder+CSV sources."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import matplotlib.path
import numpy as np
import pydicom
import pytest
import skimage.io
import skimage.transform

from data_pipeline import datasets
from data_pipeline.datasets import Examples, prepare
from data_pipeline.errors import DataError
from data_pipeline.folds import make_split
from data_pipeline.inbreast import read_mass_outlines
from data_pipeline.synthetic import write_dicom, write_synthetic_inbreast

SIZE = 64
NUM_IMAGES = 12
REPO = Path(__file__).resolve().parents[1]


def _table(root: Path) -> dict[str, dict[str, str]]:
    """INbreast.csv read with the csv module: {file id: row}."""
    with open(root / "INbreast.csv", newline="") as f:
        return {row["File Name"]: row for row in csv.DictReader(f, delimiter=";")}


def _dicoms(root: Path) -> dict[str, Path]:
    return {p.name.split("_")[0]: p for p in (root / "AllDICOMs").glob("*.dcm")}


def _copies(data_dir: Path, builder: str = "inbreast", config: str = str(SIZE)) -> list[Path]:
    """Version folders of the complete prepared copies: <builder>_<config>_<digest>/..."""
    pattern = f"{builder}_{config}_*/{builder}/{config}/1.0.0/dataset_info.json"
    return sorted(p.parent for p in data_dir.glob(pattern))


def _copy(data_dir: Path, builder: str = "inbreast", config: str = str(SIZE)) -> Path:
    (copy,) = _copies(data_dir, builder, config)  # exactly one
    return copy


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inbreast")
    return write_synthetic_inbreast(root, num_images=NUM_IMAGES, seed=1, image_shape=(128, 104))


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory) -> tuple[Examples, Path]:
    data_dir = tmp_path_factory.mktemp("tfds")
    examples = prepare(
        "inbreast", manual_dir=raw, data_dir=data_dir, image_size=SIZE, num_workers=2
    )
    return examples, data_dir


def test_prepare_gives_the_tables_labels_and_ids(raw, prepared):
    examples, _ = prepared
    table = _table(raw)
    files = _dicoms(raw)
    assert len(examples) == NUM_IMAGES
    assert sorted(examples.file_ids) == sorted(table)
    assert list(examples.file_ids) == sorted(table, key=lambda f: (len(f), f))
    for i, file_id in enumerate(examples.file_ids):
        row = table[file_id]
        birads = row["Bi-Rads"].lower()
        assert examples.birads[i] == birads
        assert examples.labels[i] == int(birads[0] >= "4")
        _, patient, _, laterality, view, _ = files[file_id].stem.split("_")
        assert examples.patient_ids[i] == patient
        assert examples.laterality[i] == laterality == row["Laterality"]
        assert examples.view[i] == view == row["View"]
    assert examples.labels.dtype == np.int32 and examples.labels.sum() > 0
    assert examples.bad_files == []


def test_prepared_boxes_match_a_hand_mapping(raw, prepared):
    examples, _ = prepared
    assert examples.images.shape == (NUM_IMAGES, SIZE, SIZE)
    assert examples.images.dtype == np.uint16
    for i, file_id in enumerate(examples.file_ids):
        geometry = examples.geometries[i]
        assert geometry.original_shape == (128, 104) and geometry.size == (SIZE, SIZE)
        xml = raw / "AllXML" / f"{file_id}.xml"
        outlines = read_mass_outlines(xml) if xml.exists() else ()
        boxes = examples.mass_boxes[i]
        assert boxes.dtype == np.float32 and boxes.shape == (len(outlines), 4)
        assert (len(outlines) > 0) == bool(examples.labels[i])  # synthetic: masses = positives
        for box, outline in zip(boxes, outlines, strict=True):
            # Reference: map every outline point by hand (scale, shift, flip), then min / max.
            y0, x0, y1, x1 = geometry.crop
            py = (outline[:, 0] - y0 + 0.5) * SIZE / (y1 - y0) - 0.5
            px = (outline[:, 1] - x0 + 0.5) * SIZE / (x1 - x0) - 0.5
            if geometry.flipped:
                px = SIZE - 1 - px
            ref = [py.min(), px.min(), py.max(), px.max()]
            np.testing.assert_allclose(box, np.clip(ref, 0, SIZE - 1), atol=1e-4)
            # The lesion is bright: the box holds brighter pixels than the image on average.
            r0, c0, r1, c1 = np.round(box).astype(int)
            inside = examples.images[i, r0 : r1 + 1, c0 : c1 + 1].astype(float).mean()
            assert inside > examples.images[i][examples.images[i] > 0].mean()
        _check_mask(examples.mass_masks[i], outlines, geometry)


def _check_mask(mask: np.ndarray, outlines, geometry) -> None:
    """The stored lesion mask against matplotlib's point-in-polygon test of every preprocessed
    pixel centre mapped back to the original (an independent rasteriser and mapping)."""
    assert mask.dtype == np.uint8 and mask.shape == geometry.size
    if not outlines:
        assert not mask.any()
        return
    rows, cols = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    centres = geometry.to_original(np.stack([rows, cols], axis=-1).reshape(-1, 2))
    inside = np.zeros(len(centres), bool)
    for outline in outlines:
        inside |= matplotlib.path.Path(outline[:, ::-1]).contains_points(centres[:, ::-1])
    inside = inside.reshape(mask.shape)
    # A pixel whose centre is inside is mostly inside (>= half) except along the edge.
    agree = np.mean((mask >= 128) == inside)
    assert agree > 0.97, agree
    assert inside.sum() > 0 and abs(int((mask >= 128).sum()) - int(inside.sum())) <= max(
        3, 0.25 * inside.sum()
    )


def test_second_prepare_only_loads(raw, prepared, monkeypatch):
    examples, data_dir = prepared
    data_path = _copy(data_dir)
    before = {p.name: p.stat().st_mtime_ns for p in data_path.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("the second call preprocessed again")

    monkeypatch.setattr(datasets, "_preprocessed", fail)
    again = prepare("inbreast", manual_dir=raw, data_dir=data_dir, image_size=SIZE)
    assert {p.name: p.stat().st_mtime_ns for p in data_path.iterdir()} == before
    np.testing.assert_array_equal(again.images, examples.images)
    np.testing.assert_array_equal(again.labels, examples.labels)
    np.testing.assert_array_equal(again.file_ids, examples.file_ids)
    for a, b in zip(again.mass_boxes, examples.mass_boxes, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(again.mass_masks, examples.mass_masks)
    # Loading needs no manual_dir once prepared.
    assert len(prepare("inbreast", manual_dir=None, data_dir=data_dir, image_size=SIZE)) == 12


def test_bad_file_fails_cleanly_or_is_skipped_and_recorded(raw, tmp_path, caplog):
    broken = tmp_path / "broken"
    shutil.copytree(raw, broken)
    victim = sorted((broken / "AllDICOMs").glob("*.dcm"))[3]
    intact = victim.read_bytes()
    victim.write_bytes(intact[:300])
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="skip_bad"):
        prepare("inbreast", manual_dir=broken, data_dir=data_dir, image_size=SIZE, num_workers=0)
    # neither a dataset nor an incomplete folder is left behind
    assert not list(data_dir.rglob("dataset_info.json"))
    assert not list(data_dir.rglob("incomplete.*"))

    examples = prepare(
        "inbreast",
        manual_dir=broken,
        data_dir=data_dir,
        image_size=SIZE,
        skip_bad=True,
        num_workers=2,
    )
    assert len(examples) == NUM_IMAGES - 1
    assert victim.name.split("_")[0] not in examples.file_ids
    assert [b.path for b in examples.bad_files] == [str(victim)]
    # The summary names the final folder, not TFDS's temporary incomplete.* one.
    (summary,) = [r.getMessage() for r in caplog.records if "left out of inbreast" in r.message]
    assert f"listed in {_copy(data_dir)}/metadata.json" in summary and "incomplete" not in summary
    metadata = json.loads((_copy(data_dir) / "metadata.json").read_text())
    assert [b["path"] for b in metadata["bad_files"]] == [str(victim)]
    assert metadata["num_examples"] == NUM_IMAGES - 1
    reloaded = prepare(
        "inbreast", manual_dir=broken, data_dir=data_dir, image_size=SIZE, skip_bad=True
    )
    assert reloaded.bad_files == examples.bad_files
    # Once the file is fixed, the next preparation includes it (the old copy is not reused).
    victim.write_bytes(intact)
    fixed = prepare(
        "inbreast", manual_dir=broken, data_dir=data_dir, image_size=SIZE, skip_bad=True
    )
    assert len(fixed) == NUM_IMAGES and fixed.bad_files == []
    assert victim.name.split("_")[0] in fixed.file_ids
    assert len(_copies(data_dir)) == 1  # the outdated copy was deleted


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
def test_a_killed_preparation_is_not_used(raw, tmp_path):
    data_dir = tmp_path / "data"
    script = textwrap.dedent(
        f"""
        import os
        from data_pipeline import datasets
        real = datasets.preprocess_file
        calls = []
        def dying(path, config):
            calls.append(path)
            if len(calls) == 5:
                os._exit(3)  # like SIGKILL: no cleanup runs
            return real(path, config)
        datasets.preprocess_file = dying
        datasets.prepare("inbreast", manual_dir={str(raw)!r}, data_dir={str(data_dir)!r},
                         image_size={SIZE}, num_workers=0)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert result.returncode == 3, result.stderr.decode()[-2000:]
    (config_dir,) = data_dir.glob(f"inbreast_{SIZE}_*/inbreast/{SIZE}")
    assert not (config_dir / "1.0.0").exists()
    assert [p.name for p in config_dir.iterdir() if p.name.startswith("incomplete")]

    examples = prepare(
        "inbreast", manual_dir=raw, data_dir=data_dir, image_size=SIZE, num_workers=0
    )
    assert len(examples) == NUM_IMAGES
    assert (config_dir / "1.0.0" / "dataset_info.json").exists()


def test_folder_source_reads_a_csv(raw, tmp_path):
    table = _table(raw)
    files = _dicoms(raw)
    chosen = sorted(table)[:6]
    rows = ["path,malignant,woman"]
    for file_id in chosen:
        rel = os.path.relpath(files[file_id], raw)
        rows.append(f"{rel},{int(table[file_id]['Bi-Rads'][0] >= '4')},w{file_id[-3:]}")
    (raw / "my_list.csv").write_text("\n".join(rows) + "\n")
    try:
        examples = prepare(
            "folder",
            manual_dir=raw / "my_list.csv",
            data_dir=tmp_path / "data",
            image_size=(SIZE, 48),
            image_column="path",
            label_column="malignant",
            patient_column="woman",
            num_workers=0,
        )
    finally:
        (raw / "my_list.csv").unlink()
    assert examples.images.shape == (6, SIZE, 48)
    expected = {os.path.relpath(files[f], raw): f for f in chosen}
    assert sorted(examples.file_ids) == sorted(expected)
    for i, rel in enumerate(examples.file_ids):
        file_id = expected[rel]
        assert examples.labels[i] == int(table[file_id]["Bi-Rads"][0] >= "4")
        assert examples.patient_ids[i] == f"w{file_id[-3:]}"
        assert examples.mass_boxes[i].shape == (0, 4)
    assert _copy(tmp_path / "data", "mammogram_folder", f"{SIZE}x48").is_dir()


def test_synthetic_source_writes_the_data_first(tmp_path, monkeypatch):
    import data_pipeline.synthetic as synthetic

    def small(out_dir, **kwargs):
        return write_synthetic_inbreast(out_dir, num_images=4, seed=2, image_shape=(96, 80))

    monkeypatch.setattr(synthetic, "write_synthetic_inbreast", small)
    examples = prepare(
        "synthetic",
        manual_dir=tmp_path / "raw",
        data_dir=tmp_path / "data",
        image_size=32,
        num_workers=0,
    )
    assert len(examples) == 4 and (tmp_path / "raw" / "INbreast.csv").exists()
    assert len(set(examples.patient_ids)) == 1


def test_errors(tmp_path):
    with pytest.raises(DataError, match="source"):
        prepare("cbis", manual_dir=tmp_path, data_dir=tmp_path)
    with pytest.raises(DataError, match="no manual_dir"):
        prepare("inbreast", manual_dir=None, data_dir=tmp_path / "empty", image_size=SIZE)
    with pytest.raises(DataError, match="no such folder"):
        prepare("inbreast", manual_dir=tmp_path / "nope", data_dir=tmp_path / "d", image_size=SIZE)
    with pytest.raises(DataError, match="image_size"):
        prepare("inbreast", manual_dir=tmp_path, data_dir=tmp_path, image_size=(3,))


# --------------------------------------------------------------------------------------------------
# Stored images against an independent decode; folder datasets for fingerprints and duplicates.


def test_stored_image_equals_an_independent_decode_and_resize(tmp_path):
    # Two phantoms whose breast box is known by construction: a linear ramp on a zero background,
    # chest wall on the left (kept) and on the right (flipped to the left).
    yy, xx = np.mgrid[0:256, 0:192]
    ramp = 1000 + 10 * yy + 5 * xx
    boxes = {"left.dcm": (32, 0, 224, 120), "right.dcm": (40, 72, 216, 192)}
    rows = ["image,label"]
    for name, (y0, x0, y1, x1) in boxes.items():
        pixels = np.zeros((256, 192), np.uint16)
        pixels[y0:y1, x0:x1] = ramp[y0:y1, x0:x1]
        write_dicom(tmp_path / name, pixels)
        rows.append(f"{name},0")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    examples = prepare(
        "folder", manual_dir=tmp_path, data_dir=tmp_path / "data", image_size=SIZE, num_workers=0
    )
    assert list(examples.file_ids) == list(boxes)
    for i, (name, (y0, x0, y1, x1)) in enumerate(boxes.items()):
        # Independent reference: pydicom's pixels scaled to [0, 1] (darkest 0, brightest 1), the
        # known box cropped by hand, skimage's anti-aliased resize, flipped for the right breast.
        stored = pydicom.dcmread(tmp_path / name).pixel_array.astype(np.float64)
        stored = (stored - stored.min()) / (stored.max() - stored.min())
        expected = skimage.transform.resize(stored[y0:y1, x0:x1], (SIZE, SIZE), anti_aliasing=True)
        if name == "right.dcm":
            expected = expected[:, ::-1]
        assert examples.geometries[i].crop == (y0, x0, y1, x1)
        assert examples.geometries[i].flipped == (name == "right.dcm")
        image = examples.images[i] / 65535.0
        # Tolerance: on a linear ramp every symmetric anti-aliasing filter gives the same values
        # away from the border (the pipeline averages blocks before a smaller Gaussian, skimage
        # smooths once), so inside only the uint16 rounding (0.5 / 65535) and float32 remain: 5e-5
        # is 3 uint16 steps. The outermost pixels see the filters' different edge modes (edge vs
        # reflect) over a ramp that rises by 10 / 3825 per original pixel: at most a few 1e-4.
        np.testing.assert_allclose(image[1:-1, 1:-1], expected[1:-1, 1:-1], atol=5e-5)
        np.testing.assert_allclose(image, expected, atol=2e-3)


def _phantom(seed: int) -> np.ndarray:
    """A small distinct mammogram: noisy tissue in a half ellipse on the left, dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:96, 0:80]
    inside = ((yy - 48) / 40.0) ** 2 + (xx / 60.0) ** 2 < 1
    tissue = rng.integers(1500, 3000, (96, 80))
    return np.where(inside, tissue, rng.integers(0, 30, (96, 80))).astype(np.uint16)


def _write_folder(root: Path, images: dict[str, int], rows: list[str]) -> Path:
    for name, seed in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_dicom(root / name, _phantom(seed), uid_seed=name)
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_changed_columns_relabel_and_regroup(tmp_path, caplog):
    images = {"img/a.dcm": 1, "img/b.dcm": 2, "img/c.dcm": 3, "img/d.dcm": 4}
    rows = [
        "image,label,malignant,woman",
        "img/a.dcm,0,1,W1",
        "img/b.dcm,1,0,W1",
        "img/c.dcm,0,0,W2",
        "img/d.dcm,1,1,W3",
    ]
    root = _write_folder(tmp_path / "raw", images, rows)
    data_dir = tmp_path / "data"
    kwargs = dict(manual_dir=root, data_dir=data_dir, image_size=32, num_workers=0)
    first = prepare("folder", patient_column="woman", **kwargs)
    assert dict(zip(first.file_ids, first.labels.tolist(), strict=True)) == {
        "img/a.dcm": 0,
        "img/b.dcm": 1,
        "img/c.dcm": 0,
        "img/d.dcm": 1,
    }
    relabelled = prepare("folder", label_column="malignant", patient_column="woman", **kwargs)
    assert dict(zip(relabelled.file_ids, relabelled.labels.tolist(), strict=True)) == {
        "img/a.dcm": 1,
        "img/b.dcm": 0,
        "img/c.dcm": 0,
        "img/d.dcm": 1,
    }
    assert list(relabelled.patient_ids) == ["W1", "W1", "W2", "W3"]
    (why,) = _messages(caplog, "Preparing mammogram_folder again")
    assert "(label_column 'label' -> 'malignant')" in why
    caplog.clear()
    regrouped = prepare("folder", label_column="malignant", **kwargs)
    assert list(regrouped.patient_ids) == list(images)  # each image its own patient
    assert regrouped.labels.tolist() == [1, 0, 0, 1]
    (why,) = _messages(caplog, "Preparing mammogram_folder again")
    assert "(patient_column 'woman' -> None)" in why
    assert len(_copies(data_dir, "mammogram_folder", "32")) == 1  # outdated copies deleted


def test_fingerprint_decides_whether_to_prepare_again(tmp_path, monkeypatch, caplog):
    raw = write_synthetic_inbreast(tmp_path / "raw", num_images=4, seed=3, image_shape=(96, 80))
    data_dir = tmp_path / "data"
    kwargs = dict(manual_dir=raw, data_dir=data_dir, image_size=32, num_workers=0)
    first = prepare("inbreast", **kwargs)
    old = _copy(data_dir, config="32")
    old_files = {p: p.stat().st_mtime_ns for p in old.rglob("*")}
    real_preprocessed, real_preprocess_file = datasets._preprocessed, datasets.preprocess_file
    calls = []

    def counting(records, *args, **kwargs):
        calls.append(len(records))
        return real_preprocessed(records, *args, **kwargs)

    monkeypatch.setattr(datasets, "_preprocessed", counting)
    # Unchanged sources and settings: loaded, nothing preprocessed.
    again = prepare("inbreast", **kwargs)
    assert calls == []
    np.testing.assert_array_equal(again.images, first.images)

    # A touched source file: prepared anew. A preparation that fails half-way leaves the old
    # copy untouched and usable.
    victim = sorted((raw / "AllDICOMs").glob("*.dcm"))[1]
    stat = victim.stat()
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    done = []

    def crashing(path, config):
        if len(done) == 2:
            raise RuntimeError("simulated crash in the middle of the preparation")
        done.append(path)
        return real_preprocess_file(path, config)

    monkeypatch.setattr(datasets, "preprocess_file", crashing)
    with pytest.raises(Exception, match="simulated crash"):
        prepare("inbreast", **kwargs)
    assert calls == [4] and len(done) == 2
    assert _copies(data_dir, config="32") == [old]
    assert {p: p.stat().st_mtime_ns for p in old.rglob("*")} == old_files
    unchecked = prepare("inbreast", manual_dir=None, data_dir=data_dir, image_size=32)
    np.testing.assert_array_equal(unchecked.images, first.images)

    monkeypatch.setattr(datasets, "preprocess_file", real_preprocess_file)
    caplog.clear()
    renewed = prepare("inbreast", **kwargs)
    assert calls == [4, 4]
    np.testing.assert_array_equal(renewed.images, first.images)  # same pixels, only touched
    (why,) = _messages(caplog, "Preparing inbreast again")
    assert f"1 source file(s) changed/added/removed (1/0/0; first: AllDICOMs/{victim.name})" in why
    (new,) = _copies(data_dir, config="32")
    assert new != old and not old.exists()

    # Other preprocessing code: prepared anew.
    monkeypatch.setattr(datasets, "_code_version", lambda: "edited")
    caplog.clear()
    prepare("inbreast", **kwargs)
    assert calls == [4, 4, 4]
    (why,) = _messages(caplog, "Preparing inbreast again")
    assert why.endswith("(preprocessing code changed).")


def test_same_pixels_under_two_names_are_one_image(tmp_path, caplog):
    images = {"a.dcm": 1, "b.dcm": 2, "c.dcm": 3, "copies/a_again.dcm": 1}  # same seed: a's pixels
    rows = [
        "image,label,woman",
        "a.dcm,1,W1",
        "b.dcm,0,W2",
        "copies/a_again.dcm,1,",  # no patient given: no conflict
        "c.dcm,0,W3",
        "copies/a.png,1,W1",
    ]
    root = _write_folder(tmp_path / "raw", images, rows)
    skimage.io.imsave(root / "copies" / "a.png", _phantom(1), check_contrast=False)
    examples = prepare(
        "folder",
        manual_dir=root,
        data_dir=tmp_path / "data",
        image_size=32,
        patient_column="woman",
        num_workers=0,
    )
    assert list(examples.file_ids) == ["a.dcm", "b.dcm", "c.dcm"]
    assert list(examples.patient_ids) == ["W1", "W2", "W3"]
    for copy in ("copies/a_again.dcm", "copies/a.png"):
        (warning,) = _messages(caplog, f"and {root / copy} hold the same image")
        assert warning.startswith(f"{root / 'a.dcm'} and ")


@pytest.mark.parametrize(
    "row,problem",
    [("copies/x.dcm,0,W1", "label 1 vs 0"), ("copies/x.dcm,1,W9", "patient 'W1' vs 'W9'")],
)
def test_copies_that_disagree_are_an_error(tmp_path, row, problem):
    images = {"a.dcm": 1, "b.dcm": 2, "copies/x.dcm": 1}
    root = _write_folder(
        tmp_path / "raw", images, ["image,label,woman", "a.dcm,1,W1", "b.dcm,0,W2", row]
    )
    with pytest.raises(DataError) as info:
        prepare(
            "folder",
            manual_dir=root,
            data_dir=tmp_path / "data",
            image_size=32,
            patient_column="woman",
            num_workers=0,
        )
    message = str(info.value)
    assert f"{root / 'a.dcm'} (image a.dcm) and {root / 'copies/x.dcm'} (image copies/x.dcm)" in (
        message
    )
    assert problem in message and "remove one of the copies" in message


def test_a_split_never_separates_copies_or_patients(tmp_path):
    # 10 women with 2 images each; women 0, 2, 4, 6, 8 negative, the others positive.
    patient_of, images, rows = {}, {}, ["image,label,woman"]
    for woman in range(10):
        for k in range(2):
            name = f"img/w{woman}_{k}.dcm"
            images[name] = 100 * woman + k
            patient_of[name] = f"W{woman}"
            rows.append(f"{name},{woman % 2},W{woman}")
    # Copies under other names, without a patient (today's code made each its own patient), and
    # other spellings of one path, also without a patient.
    for woman in range(4):
        images[f"dup/copy_of_w{woman}.dcm"] = 100 * woman
        rows.append(f"dup/copy_of_w{woman}.dcm,{woman % 2},")
    rows += ["./img/w5_1.dcm,1,", "img//w7_0.dcm,1,", "dup/../img/w9_1.dcm,1,"]
    root = _write_folder(tmp_path / "raw", images, rows)
    examples = prepare(
        "folder",
        manual_dir=root,
        data_dir=tmp_path / "data",
        image_size=32,
        patient_column="woman",
        num_workers=0,
    )
    assert sorted(examples.file_ids) == sorted(patient_of)  # each physical image once
    for fold in range(5):
        split = make_split(examples.labels, examples.patient_ids, num_folds=5, fold=fold)
        part_of_woman: dict[str, set[str]] = {}
        for part, index in (
            ("train", split.train),
            ("val", split.validation),
            ("test", split.test),
        ):
            for file_id in examples.file_ids[index]:
                part_of_woman.setdefault(patient_of[file_id], set()).add(part)
        assert all(len(parts) == 1 for parts in part_of_woman.values()), part_of_woman
        assert len(part_of_woman) == 10


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
def test_a_killed_preparation_leaves_no_worker_behind(raw, tmp_path):
    script = textwrap.dedent(
        f"""
        import time
        from data_pipeline import datasets
        def stuck(*args, **kwargs):  # the workers are running: stop here until killed
            print("READY", flush=True)
            time.sleep(120)
        datasets._example = stuck
        datasets.prepare("inbreast", manual_dir={str(raw)!r}, data_dir={str(tmp_path)!r},
                         image_size={SIZE}, num_workers=2)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    parent = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )

    def descendants(pid: int) -> list[int]:
        found = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += [int(child), *descendants(int(child))]
        return found

    try:
        for line in parent.stdout:
            if b"READY" in line:
                break
        children = descendants(parent.pid)
    finally:
        parent.kill()
        parent.wait()
    # The forkserver, 2 workers (and the resource tracker) were running.
    assert len(children) >= 3, children
    deadline = time.monotonic() + 10
    alive = children
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in children if _running(pid)]
    for pid in alive:  # do not leave them behind if the test fails
        os.kill(pid, signal.SIGKILL)
    assert alive == [], "processes that outlived their killed parent"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
