"""Tests of data_pipeline.datasets: TFDS preparation of INbreast-layout and folder+CSV sources."""

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import datasets
from data_pipeline.datasets import Examples, prepare
from data_pipeline.errors import DataError
from data_pipeline.inbreast import read_mass_outlines
from data_pipeline.preprocess import PreprocessConfig, preprocess_file
from data_pipeline.synthetic import write_synthetic_inbreast

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


def test_prepared_images_and_boxes_match_preprocess_file(raw, prepared):
    examples, _ = prepared
    files = _dicoms(raw)
    assert examples.images.shape == (NUM_IMAGES, SIZE, SIZE)
    assert examples.images.dtype == np.uint16
    config = PreprocessConfig(size=(SIZE, SIZE))
    for i, file_id in enumerate(examples.file_ids):
        image, geometry = preprocess_file(files[file_id], config)
        expected = np.round(image * 65535.0)
        np.testing.assert_allclose(examples.images[i], expected, atol=1)
        assert examples.geometries[i] == geometry
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


def test_subset_and_errors(prepared, tmp_path):
    examples, _ = prepared
    part = examples.subset([3, 0])
    np.testing.assert_array_equal(part.images, examples.images[[3, 0]])
    assert list(part.file_ids) == [examples.file_ids[3], examples.file_ids[0]]
    assert part.mass_boxes[0] is examples.mass_boxes[3]
    with pytest.raises(DataError, match="source"):
        prepare("cbis", manual_dir=tmp_path, data_dir=tmp_path)
    with pytest.raises(DataError, match="no manual_dir"):
        prepare("inbreast", manual_dir=None, data_dir=tmp_path / "empty", image_size=SIZE)
    with pytest.raises(DataError, match="no such folder"):
        prepare("inbreast", manual_dir=tmp_path / "nope", data_dir=tmp_path / "d", image_size=SIZE)
    with pytest.raises(DataError, match="image_size"):
        prepare("inbreast", manual_dir=tmp_path, data_dir=tmp_path, image_size=(3,))
