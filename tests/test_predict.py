"""Prediction, heatmaps and localisation: the coordinate mapping back to the original image (with a
fake detector, so it tests the mapping and not learning), the CLI's predictions.csv against the
model called directly, bad files, and the pointing game against hand-computed cases."""

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
from conftest import _fake_run

from data_pipeline.preprocess import Geometry, PreprocessConfig, preprocess_file
from deepmil_jax import config as config_module
from deepmil_jax import evaluate, heatmap, predict, report, steps
from deepmil_jax.checkpoints import RunCheckpoints

# trains for epochs, spawns or kills processes: not in `pytest -m "not slow"`
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Coordinate mapping


def test_cell_boxes_map_back_through_flip_crop_and_resize_by_hand():
    # Original 100 x 80; crop rows 10..90, cols 20..60 (80 x 40); flipped; resized to 40 x 20
    # (scale 1/2 on both axes); a 4 x 2 grid of 10 x 10 preprocessed patches.
    g = Geometry(original_shape=(100, 80), crop=(10, 20, 90, 60), flipped=True, size=(40, 20))
    # Cell (0, 0): preprocessed rows [0, 10), cols [0, 10) -> unflipped cols [10, 20) -> original
    # rows 10 + [0, 20), cols 20 + [20, 40).
    box = heatmap.box_to_original(heatmap.cell_box(0, 0, (4, 2), (40, 20)), g)
    np.testing.assert_allclose(box, [10, 40, 30, 60], atol=1e-9)
    # Cell (3, 1): rows [30, 40), cols [10, 20) -> unflipped [0, 10) -> original
    # [70, 90) x [20, 40).
    box = heatmap.box_to_original(heatmap.cell_box(3, 1, (4, 2), (40, 20)), g)
    np.testing.assert_allclose(box, [70, 20, 90, 40], atol=1e-9)
    assert heatmap.box_to_pixel_slice(box, (100, 80)) == (70, 20, 90, 40)
    # Not flipped: cell (0, 0) is on the left of the crop.
    g2 = Geometry(original_shape=(100, 80), crop=(10, 20, 90, 60), flipped=False, size=(40, 20))
    np.testing.assert_allclose(
        heatmap.box_to_original(heatmap.cell_box(0, 0, (4, 2), (40, 20)), g2), [10, 20, 30, 40]
    )


@pytest.mark.parametrize("flipped", [False, True])
def test_painted_map_agrees_with_the_boxes(flipped):
    # A map painted with each cell's index must show each cell exactly on its box, NaN elsewhere.
    g = Geometry(original_shape=(103, 77), crop=(7, 11, 98, 70), flipped=flipped, size=(24, 24))
    ids = np.arange(12, dtype=float).reshape(3, 4)
    painted = heatmap.instance_map_to_original(ids, g)
    assert painted.shape == (103, 77)
    covered = np.zeros((103, 77), bool)
    for r in range(3):
        for c in range(4):
            y0, x0, y1, x1 = heatmap.box_to_pixel_slice(
                heatmap.box_to_original(heatmap.cell_box(r, c, (3, 4), (24, 24)), g), (103, 77)
            )
            block = painted[y0:y1, x0:x1]
            assert block.size and np.all(block == ids[r, c]), (r, c)
            assert np.count_nonzero(painted == ids[r, c]) == block.size
            covered[y0:y1, x0:x1] = True
    # The crop (and only the crop) is covered.
    expected = np.zeros((103, 77), bool)
    expected[7:98, 11:70] = True
    np.testing.assert_array_equal(covered, expected)
    np.testing.assert_array_equal(np.isnan(painted), ~expected)
    # Column order: cell column 0 is at the chest wall, on the right of the original if flipped.
    left_id = painted[50, 12]
    assert left_id == (ids[1, 3] if flipped else ids[1, 0])
    # A strided (downsampled) map samples the same cells at the blocks' centres.
    small = heatmap.instance_map_to_original(ids, g, stride=4)
    assert small.shape == (26, 20)
    np.testing.assert_array_equal(small[10, 5], painted[10 * 4 + 1, 5 * 4 + 1])


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
    assert predict.find_images([tmp_path / "AllDICOMs", tmp_path / "missing.dcm"]) == [
        a,
        b,
        tmp_path / "missing.dcm",
    ]
    assert predict.find_images([tmp_path], exclude=tmp_path / "AllDICOMs" / "sub") == [a]
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


# ---------------------------------------------------------------------------------------------
# Pointing game


def test_patch_hits_boxes_hand_computed():
    grid, size = (2, 2), (100, 100)  # patches [0, 50) and [50, 100) on each axis
    small = np.array([[10, 10, 20, 20]])  # edges [10.5, 20.5]: inside patch (0, 0) only
    assert heatmap.patch_hits_boxes(0, 0, grid, size, small)
    assert not heatmap.patch_hits_boxes(0, 1, grid, size, small)
    assert not heatmap.patch_hits_boxes(1, 1, grid, size, small)
    central = np.array([[40, 40, 60, 60]])  # straddles all four patches
    assert all(
        heatmap.patch_hits_boxes(r, c, grid, size, central) for r in range(2) for c in range(2)
    )
    on_edge = np.array([[49.5, 10, 49.5, 10]])  # a point at edge y = 50: the second row's
    assert not heatmap.patch_hits_boxes(0, 0, grid, size, on_edge)
    assert heatmap.patch_hits_boxes(1, 0, grid, size, on_edge)
    just_before = np.array([[48.9, 10, 48.9, 10]])  # edge y = 49.4: first row
    assert heatmap.patch_hits_boxes(0, 0, grid, size, just_before)
    two = np.array([[80, 80, 90, 90], [5, 60, 8, 70]])  # the second box is in patch (0, 1)
    assert heatmap.patch_hits_boxes(0, 1, grid, size, two)
    assert not heatmap.patch_hits_boxes(1, 0, grid, size, two)
    assert not heatmap.patch_hits_boxes(0, 0, grid, size, np.zeros((0, 4)))
    # 6 x 6 on 227: patch (2, 3) covers [75.67, 113.5) x [113.5, 151.33).
    assert heatmap.patch_hits_boxes(2, 3, (6, 6), (227, 227), np.array([[100, 150, 105, 160]]))
    assert not heatmap.patch_hits_boxes(2, 3, (6, 6), (227, 227), np.array([[100, 151, 105, 160]]))


def test_pointing_game_counts_only_positives_with_masses():
    boxes = {
        "hit": np.array([[10, 10, 20, 20]]),
        "miss": np.array([[70, 70, 80, 80]]),
        "neg": np.array([[10, 10, 20, 20]]),
        "nobox": np.zeros((0, 4)),
    }
    top = {"hit": (0, 0), "miss": (0, 0), "neg": (1, 1), "nobox": (0, 0), "unknown": (0, 0)}
    labels = {"hit": 1, "miss": 1, "neg": 0, "nobox": 1, "unknown": 1}
    out = heatmap.pointing_game(top, boxes, labels, grid_shape=(2, 2), image_shape=(100, 100))
    assert out == {"hits": 1, "evaluated": 2, "score": 0.5}
    empty = heatmap.pointing_game({}, {}, {}, grid_shape=(2, 2), image_shape=(100, 100))
    assert empty["evaluated"] == 0 and math.isnan(empty["score"])


def test_k_sweep_orders_fixed_k_and_keeps_chosen_k_apart(tmp_path):
    def row(auc):
        return {"auc": {"mean": auc, "std": 0.1}, "instance_auc": {"mean": auc / 2, "std": 0.0}}

    table = {
        "max_pooling": row(0.9),
        "label_assign_k12": row(0.7),
        "label_assign_k3": row(0.8),
        "label_assign_kauto": row(0.75),
        "label_assign_k0.25": row(0.6),
        "topk_pooling_k3": row(0.5),
    }
    sweep = report.k_sweep(table)
    assert list(sweep["fixed"]) == [0.25, 3.0, 12.0]
    assert [r["auc"]["mean"] for r in sweep["fixed"].values()] == [0.6, 0.8, 0.7]
    assert sweep["chosen"] == {"auto": table["label_assign_kauto"]}
    assert list(report.k_sweep(table, "topk_pooling")["fixed"]) == [3.0]
    report.plot_k_sweep(sweep, tmp_path / "k_sweep.png")
    assert (tmp_path / "k_sweep.png").stat().st_size > 10_000


def test_report_removes_an_earlier_reports_plots(tmp_path):
    """A scheme left out of this report leaves no ROC plot behind; other files stay."""
    for name in ("roc_alexnet.png", "reliability_alexnet.png", "k_sweep.png", "notes.png"):
        (tmp_path / name).write_bytes(b"old")
    run_dir = tmp_path / "sparse" / "fold0"
    run_dir.mkdir(parents=True)
    rows = "".join(f"{i},{i % 2},{0.2 + 0.1 * i}\n" for i in range(6))
    (run_dir / "test_predictions.csv").write_text("file_id,label,probability\n" + rows)
    results = {"sparse": [{**_fake_run(run_dir, 0.8, None), "fold": 0}]}
    report.write_report(evaluate.summarize(results), results, tmp_path)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["notes.png", "reliability_sparse.png", "roc_sparse.png"]


def test_cli_bad_max_side_is_refused_before_predicting(tmp_path, workdir):
    image = tmp_path / "x.png"
    skimage.io.imsave(image, np.zeros((64, 64), np.uint8), check_contrast=False)
    done = _cli(
        f"--checkpoint={workdir}", "--max_side=0", f"--output={tmp_path / 'o'}", image, cwd=tmp_path
    )
    assert done.returncode != 0
    assert "--max_side must be at least 16" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()
