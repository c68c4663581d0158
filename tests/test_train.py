"""The training program: end to end, data parallelism, resume, preemption, divergence."""

import csv
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ROOT, SMALL, _params

from deepmil_jax import checkpoints, steps, train
from deepmil_jax.checkpoints import RunCheckpoints
from deepmil_jax.errors import ConfigError, DeepMILError

# trains for epochs, spawns or kills processes: not in `pytest -m "not slow"`
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def _assert_same_params(a, b, **tol):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], err_msg=key, **tol)


def test_end_to_end_learns_the_synthetic_lesions(tmp_path):
    # 131x131 images (a 3x3 grid) and no augmentation, so that a few epochs suffice on a CPU
    config = dataclasses.replace(
        SMALL,
        image_size=131,
        k=2,
        synthetic_images=160,
        epochs=5,
        learning_rate=1e-4,
        augment=False,
        num_folds=5,
        data_dir=str(tmp_path / "data"),
    )
    results = train.train_and_evaluate(config, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(saved) == {"config", "best_epoch", "validation", "test"}
    # the reported numbers, recomputed from the prediction CSVs with independent formulas: the
    # threshold maximises Youden's J on the *validation* predictions, the test metrics use it
    val_labels, val_probs = _labels_and_probs(tmp_path / "run" / "validation_predictions.csv")
    test_labels, test_probs = _labels_and_probs(tmp_path / "run" / "test_predictions.csv")
    threshold = _youden_threshold(val_labels, val_probs)
    assert saved["test"]["threshold"] == pytest.approx(threshold, abs=2e-6)
    predicted = test_probs >= threshold
    pos, neg = test_labels == 1, test_labels == 0
    assert saved["test"]["sensitivity"] == pytest.approx(predicted[pos].mean())
    assert saved["test"]["specificity"] == pytest.approx((~predicted[neg]).mean())
    assert saved["test"]["accuracy"] == pytest.approx((predicted == pos).mean())
    assert saved["test"]["auc"] == pytest.approx(_pairwise_auc(test_labels, test_probs), abs=1e-5)
    assert saved["validation"]["auc"] == pytest.approx(
        _pairwise_auc(val_labels, val_probs), abs=1e-5
    )
    _check_localisation(config, tmp_path / "run", saved["test"])
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [h["epoch"] for h in history] == list(range(1, 6))
    best = max(history, key=lambda h: h["validation_auc"])
    assert saved["best_epoch"] == best["epoch"]
    assert saved["validation"]["auc"] == pytest.approx(best["validation_auc"], abs=1e-6)
    assert results["test"]["auc"] > 0.75, results


def _check_localisation(config, run_dir, test):
    """results.json's localisation scores, recomputed independently: instance logits from the best
    checkpoint (checkpoints.load_trained), cell coverage by repeating pixels until the cells align,
    the AUC by counting pairs, the IoU and pointing game from the test predictions CSV."""
    from deepmil_jax import checkpoints, predict

    examples = train.load_examples(config)
    with open(run_dir / "test_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    index = {file_id: i for i, file_id in enumerate(examples.file_ids)}
    idx = np.array([index[r["file_id"]] for r in rows])
    _, model = checkpoints.load_trained(run_dir)
    images = examples.images[idx].astype(np.float32)[..., None] / 65535.0
    logits, _ = predict.model_predict_fn(model, 16)(images)
    grid = logits.shape[1]  # 3 x 3 for 131-pixel images: repeat pixels 3 times to align cells
    lesion, other = [], []
    ious = []
    for z, i, row in zip(logits, idx, rows, strict=True):
        if examples.labels[i] != 1:
            continue
        fine = np.repeat(np.repeat(examples.mass_masks[i] / 255.0, grid, 0), grid, 1)
        side = fine.shape[0] // grid
        coverage = fine.reshape(grid, side, grid, side).mean(axis=(1, 3))
        if not (coverage >= 0.01).any():
            continue
        lesion += z[coverage >= 0.01].tolist()
        other += z[coverage == 0].tolist()
        ious.append(float(row["mass_iou"]))
    assert len(ious) >= 3, "the test fold should hold positive images with lesions"
    pairs = [(p > n) + 0.5 * (p == n) for p in lesion for n in other]
    assert test["instance_auc"] == pytest.approx(np.mean(pairs), abs=2e-3)
    assert test["localised_images"] == len(ious)
    assert test["iou"] == pytest.approx(np.mean(ious), abs=1e-3)
    hits = [
        float(r["top_patch_mass_coverage"]) > 0 for r in rows if r["label"] == "1" and r["mass_iou"]
    ]
    assert test["pointing_images"] == len(hits)
    assert test["pointing_hits"] == pytest.approx(sum(hits), abs=1)  # box vs outline at the rim


def _labels_and_probs(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return np.array([int(r["label"]) for r in rows]), np.array(
        [float(r["probability"]) for r in rows]
    )


def _youden_threshold(labels, probs):
    """The highest threshold t among those maximising TPR - FPR of "positive iff p >= t"."""
    best_j, best_t = -np.inf, 1.0
    for t in sorted(set(probs.tolist()), reverse=True):
        j = np.mean(probs[labels == 1] >= t) - np.mean(probs[labels == 0] >= t)
        if j > best_j + 1e-12:
            best_j, best_t = j, t
    return best_t


def _pairwise_auc(labels, probs):
    pairs = [(p > n) + 0.5 * (p == n) for p in probs[labels == 1] for n in probs[labels == 0]]
    return float(np.mean(pairs))


def _latest(config, workdir):
    """(state, meta) of the newest intact checkpoint of ``workdir``."""
    trainer = steps.Trainer(config, steps.make_mesh())
    store = RunCheckpoints(Path(workdir) / "checkpoints")
    state, meta, _ = store.restore(steps.checkpointed(trainer.state))
    store.close()
    return state, meta


def _run_and_params(config, workdir):
    train.train_and_evaluate(config, workdir)
    state, meta = _latest(config, workdir)
    return _params(state), meta


def test_resume_gives_the_same_parameters_and_metrics(tmp_path, data_dir, monkeypatch):
    config = dataclasses.replace(SMALL, data_dir=data_dir)
    original = steps.Trainer.train_step
    seen = []  # (objective, data term) of every step, as the step returned them

    def recorded_step(self, batch, step):
        out = original(self, batch, step)
        seen.append((float(out["loss"]), float(out["data_loss"])))
        return out

    monkeypatch.setattr(steps.Trainer, "train_step", recorded_step)
    straight, straight_meta = _run_and_params(config, tmp_path / "straight")
    monkeypatch.setattr(steps.Trainer, "train_step", original)
    # each epoch's train_loss and train_data_loss are the means of its own steps' two values,
    # which differ by the weight-decay term
    per_epoch = np.asarray(seen).reshape(config.epochs, -1, 2).mean(axis=1)
    for record, (objective, data) in zip(straight_meta["history"], per_epoch, strict=True):
        assert record["train_loss"] == pytest.approx(objective, rel=1e-6)
        assert record["train_data_loss"] == pytest.approx(data, rel=1e-6)
        assert objective - data > 1e-4
    train.train_and_evaluate(dataclasses.replace(config, epochs=1), tmp_path / "resumed")
    resumed, resumed_meta = _run_and_params(config, tmp_path / "resumed")
    _assert_same_params(straight, resumed, rtol=0, atol=0)
    # fewer epochs than a finished run trained: refused, nothing rewritten
    before = (tmp_path / "straight" / "results.json").read_bytes()
    with pytest.raises(ConfigError, match="--epochs=1: .* has already trained 2 epochs"):
        train.train_and_evaluate(dataclasses.replace(config, epochs=1), tmp_path / "straight")
    assert (tmp_path / "straight" / "results.json").read_bytes() == before
    for a, b in zip(straight_meta["history"], resumed_meta["history"], strict=True):
        a.pop("train_images_per_sec"), b.pop("train_images_per_sec")
        assert a == pytest.approx(b, rel=1e-5)


def test_sigterm_saves_and_resumes_mid_epoch(tmp_path, data_dir, monkeypatch):
    config = dataclasses.replace(SMALL, data_dir=data_dir, epochs=1, batch_size=4)
    straight, _ = _run_and_params(config, tmp_path / "straight")

    original = steps.Trainer.train_step
    calls = {"n": 0}

    def preempted_step(self, batch, step):
        out = original(self, batch, step)
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(steps.Trainer, "train_step", preempted_step)
    with pytest.raises(train.Preempted):
        train.train_and_evaluate(config, tmp_path / "preempted")
    assert not (tmp_path / "preempted" / "results.json").exists()
    monkeypatch.setattr(steps.Trainer, "train_step", original)
    resumed, meta = _run_and_params(config, tmp_path / "preempted")
    assert meta["epoch"] == 1
    _assert_same_params(straight, resumed, rtol=0, atol=0)
    # the resumed epoch's losses average all its steps, not only those after the resume
    _, straight_meta = _latest(config, tmp_path / "straight")
    for key in ("train_loss", "train_data_loss"):
        assert meta["history"][0][key] == straight_meta["history"][0][key], key


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    config = dataclasses.replace(SMALL, data_dir=data_dir, epochs=1)
    train.train_and_evaluate(config, tmp_path / "run")
    good, _ = _run_and_params(config, tmp_path / "run")
    monkeypatch.setattr(steps, "scheme_loss", lambda config, logits, labels, *bag: jax.numpy.nan)
    jax.clear_caches()  # the steps compiled above do not call the patched loss
    with pytest.raises(train.TrainingDiverged, match="last good checkpoint"):
        train.train_and_evaluate(dataclasses.replace(config, epochs=2), tmp_path / "run")
    monkeypatch.undo()
    state, meta = _latest(config, tmp_path / "run")
    assert meta["epoch"] == 1
    _assert_same_params(good, _params(state), rtol=0, atol=0)


def _worker(out, **kwargs):
    args = [sys.executable, str(ROOT / "tests" / "dist_worker.py"), str(out)]
    args += [f"--{k}={v}" for k, v in kwargs.items()]
    return subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)


def _finish(proc):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_four_devices_and_two_processes_agree(tmp_path):
    """Same seed and data: 1 device, 4 devices, and 2 processes x 2 devices (gloo over loopback)."""
    port = _free_port()
    procs = [
        _worker(tmp_path / "one.npz", devices=1),
        _worker(tmp_path / "four.npz", devices=4),
    ]
    for p in procs:
        _finish(p)
    pair = [
        _worker(tmp_path / "two.npz", devices=2, process_id=i, num_processes=2, port=port)
        for i in range(2)
    ]
    for p in pair:
        _finish(p)
    one, four, two = (dict(np.load(tmp_path / f"{n}.npz")) for n in ("one", "four", "two"))
    assert (int(one.pop("devices")), int(four.pop("devices")), int(two.pop("devices"))) == (1, 4, 4)
    # Adam moves every weight by about lr per step whatever its gradient's size, so a weight whose
    # gradient is near zero can differ by a few 1e-6 when the all-reduce sums in another order.
    _assert_same_params(one, four, rtol=2e-4, atol=2e-5)
    _assert_same_params(four, two, rtol=2e-4, atol=2e-5)


def test_batch_must_divide_over_devices(tmp_path):
    code = (
        "from deepmil_jax import train\n"
        "from deepmil_jax import config as config_module\n"
        f"c = config_module.Config(batch_size=6, synthetic_images=48, data_dir={str(tmp_path)!r})\n"
        f"train.train_and_evaluate(c, {str(tmp_path / 'run')!r})\n"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert "--batch_size=6 cannot be split evenly over 4 devices" in proc.stderr


def test_a_run_that_fails_early_does_not_lock_its_workdir(tmp_path, data_dir):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match="--k"):
        train.train_and_evaluate(dataclasses.replace(SMALL, k=5, data_dir=data_dir), workdir)
    bad_data = dataclasses.replace(SMALL, dataset="folder", manual_dir=str(tmp_path / "nothing"))
    with pytest.raises(DeepMILError):
        train.train_and_evaluate(bad_data, workdir)
    assert not (workdir / "config.json").exists()


# ---- the MIL poolings, from the command line to predictions ------------------------------


def _attention_bag(model, images: np.ndarray) -> np.ndarray:
    """Ilse et al.'s attention pooling recomputed in float64 numpy from the model's features."""
    feats = np.asarray(model.backbone.forward_raw(images), np.float64)
    n = len(feats)
    pool, head = model.pooling, model.head.logit

    def p(x):
        return np.asarray(x[...], np.float64)

    z = (feats @ p(head.kernel) + p(head.bias))[..., 0].reshape(n, -1)
    x = np.tanh(feats @ p(pool.V.kernel) + p(pool.V.bias))
    if pool.gated:
        x = x / (1 + np.exp(-(feats @ p(pool.U.kernel) + p(pool.U.bias))))
    s = (x @ p(pool.w.kernel) + p(pool.w.bias))[..., 0].reshape(n, -1)
    a = np.exp(s - s.max(1, keepdims=True))
    a /= a.sum(1, keepdims=True)
    return (a * z).sum(1), z


def test_gated_attention_end_to_end_evaluates_and_predicts_with_its_own_pooling(tmp_path, data_dir):
    import skimage.io

    from data_pipeline.preprocess import PreprocessConfig, preprocess_file
    from deepmil_jax import predict

    config = dataclasses.replace(SMALL, scheme="gated_attention", data_dir=data_dir)
    run_dir = tmp_path / "run"
    results = train.train_and_evaluate(config, run_dir)
    assert np.isfinite(results["test"]["auc"])
    loaded, model = checkpoints.load_trained(run_dir)
    assert loaded.scheme == "gated_attention"
    # the reported probabilities are the attention pooling's, recomputed independently
    examples = train.load_examples(loaded)
    with open(run_dir / "test_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    index = {file_id: i for i, file_id in enumerate(examples.file_ids)}
    idx = np.array([index[r["file_id"]] for r in rows])
    images = examples.images[idx].astype(np.float32)[..., None] / 65535.0
    bag, z = _attention_bag(model, images)
    got = np.array([float(r["probability"]) for r in rows])
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-bag)), atol=2e-4)
    assert np.abs(got - 1 / (1 + np.exp(-z.max(1)))).max() > 1e-3  # not max pooling's
    # predict: the same pooling, and a heatmap of the attention-weighted instance logits
    path = tmp_path / "scan.png"
    skimage.io.imsave(path, examples.images[idx[0]], check_contrast=False)
    (pred,) = predict.predict_files(
        predict.model_predict_fn(model, 4),
        [path],
        image_size=loaded.image_size,
        output_dir=tmp_path / "out",
        progress=False,
    )
    assert pred.error is None and Path(pred.heatmap).exists()
    size = (loaded.image_size, loaded.image_size)
    image, _ = preprocess_file(path, PreprocessConfig(size=size))  # what predict fed the model
    expected, _ = _attention_bag(model, image[None, ..., None].astype(np.float32))
    assert pred.probability == pytest.approx(1 / (1 + np.exp(-expected[0])), abs=2e-4)
    a_z = pred.instance_logits.reshape(-1)  # m a_j z_j: their mean is the bag logit
    assert np.log(pred.probability / (1 - pred.probability)) == pytest.approx(a_z.mean(), abs=1e-3)
