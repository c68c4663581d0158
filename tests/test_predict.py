"""Prediction, heatmaps and localisation: the coordinate mapping back to the original image (with a
fake detector, so it tests the mapping and not learning), the CLI's predictions.csv against the
model called directly, and bad files."""

import csv
import json
import math
import os
import plistlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.io

from data_pipeline.inbreast import image_files
from data_pipeline.preprocess import Geometry, PreprocessConfig, preprocess_file
from deepmil_jax import config as config_module
from deepmil_jax import heatmap, predict, steps
from deepmil_jax.checkpoints import RunCheckpoints

# trains for epochs, spawns or kills processes: not in `pytest -m "not slow"`
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Coordinate mapping


def _mammogram(path: Path, *, lesion_yx: tuple[int, int], right_side: bool) -> None:
    """A 16-bit PNG of a textured half-ellipse breast against one edge with a bright lesion."""
    H, W = 360, 280
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W].astype(float)
    breast = ((yy - 180) / 150) ** 2 + (xx / 200) ** 2 < 1
    image = np.where(breast, 0.35 + 0.1 * rng.random((H, W)), 0.0)
    ly, lx = lesion_yx
    image = np.maximum(image, 0.95 * np.exp(-((yy - ly) ** 2 + (xx - lx) ** 2) / (2 * 4.0**2)))
    if right_side:
        image = image[:, ::-1]
    skimage.io.imsave(path, np.round(image * 65535).astype(np.uint16), check_contrast=False)


def _block_max_detector(grid: int):
    """A fake model: the instance logit of a patch is its brightest pixel, so the hot instance is
    the one holding the lesion (the brightest thing) under the patch approximation."""

    def predict_fn(images: np.ndarray) -> np.ndarray:
        n, h, w, _ = images.shape
        blocks = images[..., 0].reshape(n, grid, h // grid, grid, w // grid)
        return 10.0 * (blocks.max(axis=(2, 4)) - 0.5)

    return predict_fn


@pytest.mark.parametrize("right_side", [False, True])
def test_lesion_lands_under_the_heatmap_maximum(tmp_path, right_side):
    lesion = (250, 95)  # (y, x) in the breast's own frame (chest wall at x = 0)
    where = (lesion[0], 279 - lesion[1]) if right_side else lesion  # in the written image
    path = tmp_path / "12345_patient_MG_L_CC_ANON.png"
    _mammogram(path, lesion_yx=lesion, right_side=right_side)

    (pred,) = predict.predict_files(
        _block_max_detector(4), [path], image_size=64, output_dir=tmp_path / "out", progress=False
    )
    assert pred.error is None
    assert pred.geometry.flipped == right_side  # the flip is undone in the second case
    # Independently of the mapping: the lesion's preprocessed cell is where the preprocessed
    # image is brightest, and the fake model is hot there.
    image, _ = preprocess_file(path, PreprocessConfig(size=(64, 64)))
    py, px = np.unravel_index(np.argmax(image), image.shape)
    assert pred.top_patch == (py // 16, px // 16)
    # Mapped back: the top patch holds the lesion in the original image ...
    y0, x0, y1, x1 = pred.box
    assert y0 <= where[0] < y1 and x0 <= where[1] < x1, (pred.box, where)
    assert abs(pred.center[0] - where[0]) < (y1 - y0) / 2
    assert abs(pred.center[1] - where[1]) < (x1 - x0) / 2
    # ... and the heatmap painted on the original is at its maximum on the lesion.
    heat = heatmap.instance_map_to_original(heatmap.sigmoid(pred.instance_logits), pred.geometry)
    assert heat[where] == np.nanmax(heat)
    assert np.count_nonzero(heat == np.nanmax(heat)) == (y1 - y0) * (x1 - x0)
    picture = skimage.io.imread(pred.heatmap)
    assert picture.ndim == 3 and picture.shape[0] > 300


def test_an_inbreast_outline_gives_the_top_patch_coverage_and_iou(tmp_path):
    lesion = (250, 95)
    path = tmp_path / "12345_patient_MG_L_CC_ANON.png"
    _mammogram(path, lesion_yx=lesion, right_side=False)
    detector = _block_max_detector(4)
    (first,) = predict.predict_files(
        detector, [path], image_size=64, heatmaps=False, progress=False
    )
    assert first.top_patch_mass_coverage is None and first.row()["mass_iou"] == ""
    # An outline around exactly the top patch's original pixels (corners half a pixel outside
    # the pixel centres): the patch is fully inside it.
    y0, x0, y1, x1 = first.box
    corners = [
        (x0 - 0.5, y0 - 0.5),
        (x1 - 0.5, y0 - 0.5),
        (x1 - 0.5, y1 - 0.5),
        (x0 - 0.5, y1 - 0.5),
    ]
    (tmp_path / "AllXML").mkdir()
    roi = {"Name": "Mass", "NumberOfPoints": 4, "Point_px": [f"({x}, {y})" for x, y in corners]}
    with open(tmp_path / "AllXML" / "12345.xml", "wb") as f:
        plistlib.dump({"Images": [{"ROIs": [roi]}]}, f)
    (pred,) = predict.predict_files(detector, [path], image_size=64, heatmaps=False, progress=False)
    assert pred.top_patch == first.top_patch
    # the crop box need not be a multiple of 4: up to a pixel's rim of the 16 x 16 patch differs
    assert pred.top_patch_mass_coverage == pytest.approx(1.0, abs=2 * 17 / 256)
    # IoU by hand: the lesion is one cell of 16 x 16 preprocessed pixels; the heatmap is every
    # cell whose logit is >= 0, so the IoU is about 1 / (number of hot cells).
    hot = int(np.count_nonzero(pred.instance_logits >= 0))
    assert pred.mass_iou == pytest.approx(1 / hot, abs=0.1 / hot)
    assert float(pred.row()["mass_iou"]) == pytest.approx(pred.mass_iou, abs=1e-4)


def test_downsampled_picture_keeps_full_resolution_coordinates(tmp_path):
    path = tmp_path / "777_p_MG_R_CC_ANON.png"
    _mammogram(path, lesion_yx=(250, 95), right_side=True)
    small, big = (
        predict.predict_files(
            _block_max_detector(4),
            [path],
            image_size=64,
            output_dir=tmp_path / name,
            max_side=m,
            progress=False,
        )[0]
        for name, m in (("small", 100), ("big", 1024))
    )
    assert small.box == big.box and small.center == big.center
    assert Path(small.heatmap).is_file() and Path(big.heatmap).is_file()
    # The same name twice: two pictures.
    twice = predict.predict_files(
        _block_max_detector(4),
        [path, path],
        image_size=64,
        output_dir=tmp_path / "twice",
        max_side=100,
        progress=False,
    )
    assert [Path(p.heatmap).name for p in twice] == [
        "777_p_MG_R_CC_ANON.png",
        "777_p_MG_R_CC_ANON_2.png",
    ]
    reduced, stride = heatmap.downsample(np.ones((360, 280)), 100)
    assert reduced.shape == (90, 70) and stride == 4
    # Block means, the last (partial) block padded with its edge values.
    image = np.arange(15, dtype=float).reshape(3, 5)
    reduced, stride = heatmap.downsample(image, 3)
    assert stride == 2
    np.testing.assert_allclose(reduced, [[3, 5, 6.5], [10.5, 12.5, 14]])


def test_find_images_and_xml(tmp_path):
    (tmp_path / "AllDICOMs" / "sub").mkdir(parents=True)
    (tmp_path / "AllXML").mkdir()
    a = tmp_path / "AllDICOMs" / "22580192_5530d5782fc89dd7_MG_L_CC_ANON.dcm"
    b = tmp_path / "AllDICOMs" / "sub" / "50997304_x.PNG"
    for p in (a, b, tmp_path / "AllDICOMs" / "notes.txt", tmp_path / "AllDICOMs" / ".hidden.png"):
        p.write_bytes(b"")
    xml = tmp_path / "AllXML" / "22580192.xml"
    xml.write_text("")
    assert image_files([tmp_path / "AllDICOMs", tmp_path / "missing.dcm"]) == [
        a,
        b,
        tmp_path / "missing.dcm",
    ]
    assert image_files([tmp_path], exclude=tmp_path / "AllDICOMs" / "sub") == [a]
    assert predict.find_mass_xml(a) == xml
    assert predict.find_mass_xml(b) is None
    assert predict.find_mass_xml(b, xml_dir=tmp_path / "AllXML") is None


# ---------------------------------------------------------------------------------------------
# The command line with a real model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir holding a randomly initialised label_assign model (99x99: 2x2 grid)."""

    wd = tmp_path_factory.mktemp("run")
    config = config_module.Config(scheme="label_assign", k=1, image_size=99, seed=3)
    (wd / "config.json").write_text(json.dumps(config.to_json()))
    trainer = steps.Trainer(config, steps.make_mesh())
    store = RunCheckpoints(wd / "checkpoints")
    store.save(1, steps.checkpointed(trainer.state), {"epoch": 1, "best_step": 1})
    store.close()
    return wd


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "deepmil_jax.predict", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _expected_box(geometry: Geometry, row: int, col: int, grid: tuple[int, int]):
    """The patch in original pixels, written out from the crop and the flip."""
    y0, x0, y1, x1 = geometry.crop
    ch, cw = (y1 - y0) / grid[0], (x1 - x0) / grid[1]
    top, bottom = y0 + row * ch, y0 + (row + 1) * ch
    if geometry.flipped:
        left, right = x1 - (col + 1) * cw, x1 - col * cw
    else:
        left, right = x0 + col * cw, x0 + (col + 1) * cw
    # Pixel i (centre i + 0.5 in edge coordinates) belongs to [a, b) iff a <= i + 0.5 < b.
    return tuple(math.ceil(e - 0.5) for e in (top, left, bottom, right))


def test_cli_predictions_csv_bad_files_and_exit_status(tmp_path, workdir):
    from data_pipeline.synthetic import write_synthetic_inbreast
    from deepmil_jax import checkpoints

    data = write_synthetic_inbreast(tmp_path / "inbreast", num_images=4, image_shape=(256, 208))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.dcm").write_bytes(b"DICM but not really" * 3)
    (bad / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    relative = os.path.relpath(workdir, tmp_path)  # relative paths work too
    done = _cli(
        f"--checkpoint={relative}",
        "--output=out",
        "--batch_size=3",
        bad / "broken.dcm",
        data,
        bad / "empty.png",
        cwd=tmp_path,
    )
    # the good files are predicted and the CSV written, but the status says that some failed
    assert done.returncode == 1, done.stderr[-3000:]
    assert "2 of the 6 file(s) could not be predicted" in done.stderr
    assert "Traceback" not in done.stderr
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(predict.CSV_COLUMNS)
    assert len(rows) == 6
    errors = {Path(r["file"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"broken.dcm", "empty.png"}
    assert all(name in msg for name, msg in errors.items())
    assert all(r["probability"] == "" for r in rows if r["error"])

    _, model = checkpoints.load_trained(workdir)
    good = [r for r in rows if not r["error"]]
    assert len(good) == 4
    for r in good:
        image, geometry = preprocess_file(r["file"], PreprocessConfig(size=(99, 99)))
        logits = np.asarray(model(image[None, :, :, None]))[0]
        assert logits.shape == (2, 2)
        assert float(r["probability"]) == pytest.approx(1 / (1 + np.exp(-logits.max())), abs=2e-6)
        row, col = np.unravel_index(np.argmax(logits), logits.shape)
        assert (int(r["top_patch_row"]), int(r["top_patch_col"])) == (row, col)
        assert r["flipped"] == str(int(geometry.flipped))
        box = tuple(int(r[k]) for k in ("box_y0", "box_x0", "box_y1", "box_x1"))
        assert box == _expected_box(geometry, row, col, (2, 2))
        H, W = geometry.original_shape
        assert 0 <= box[0] < box[2] <= H and 0 <= box[1] < box[3] <= W
        cy, cx = float(r["center_y"]), float(r["center_x"])
        assert box[0] <= cy < box[2] and box[1] <= cx < box[3]
        assert Path(r["heatmap"]).parent == Path("heatmaps") and (out / r["heatmap"]).is_file()
    assert "2 file(s) could not be read" in done.stderr

    nothing = _cli(
        f"--checkpoint={workdir}",
        f"--output={tmp_path / 'none'}",
        "--noheatmaps",
        bad / "broken.dcm",
        cwd=tmp_path,
    )
    assert nothing.returncode != 0
    assert "1 of the 1 file(s) could not be predicted" in nothing.stderr
    assert "Traceback" not in nothing.stderr


def test_cli_bad_max_side_is_refused_before_predicting(tmp_path, workdir):
    image = tmp_path / "x.png"
    skimage.io.imsave(image, np.zeros((64, 64), np.uint8), check_contrast=False)
    done = _cli(
        f"--checkpoint={workdir}", "--max_side=0", f"--output={tmp_path / 'o'}", image, cwd=tmp_path
    )
    assert done.returncode != 0
    assert "--max_side must be at least 16" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()
