"""The benchmark program (JSON figures and their consistency) and its PyTorch reference model.

No timing is asserted: the machine is shared. The checks are that every figure is there and
positive, that the derived figures follow from the reported ones (mfu from FLOPs, rate and peak;
ratios from rates; medians from the per-repeat lists), that the FLOP count matches a hand count
of the network, and that the PyTorch losses and network compute what the JAX ones do.
"""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax import nnx  # noqa: E402

from deepmil_jax import losses  # noqa: E402
from deepmil_jax.benchmark import peaks  # noqa: E402
from deepmil_jax.benchmark import torch_reference as tr  # noqa: E402
from deepmil_jax.benchmark.train_timer import TrainSteps  # noqa: E402
from deepmil_jax.models import build_model  # noqa: E402

# trains for epochs, spawns or kills processes: not in `pytest -m "not slow"`
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

REQUIRED = (
    "train_images_per_sec",
    "eval_images_per_sec",
    "mfu",
    "pipeline_images_per_sec",
    "preprocess_images_per_sec",
    "preprocess_peak_rss_mib",
    "torch_train_images_per_sec",
    "train_vs_torch",
    "train_flops_per_step",
    "train_step_memory_mib",
    "peak_flops_per_sec",
    "train_from_pipeline_images_per_sec",
    "pipeline_overlap",
)


def _forward_conv_flops(size: int) -> float:
    """2 x multiply-adds of the caffe AlexNet's convolutions (conv1 on one folded channel),
    counting only kernel taps on real pixels, as XLA's cost analysis does; plus the 1x1 head."""

    def out_and_taps(n, k, s, p):
        out = (n + 2 * p - k) // s + 1
        taps = sum(sum(0 <= o * s - p + t < n for t in range(k)) for o in range(out))
        return out, taps

    def pool(n):
        return (n - 3) // 2 + 1

    n, total = size, 0.0
    layers = [  # (k, stride, pad, in per group, out, pool after)
        (11, 4, 0, 1, 96, True),
        (5, 1, 2, 48, 256, True),
        (3, 1, 1, 256, 384, False),
        (3, 1, 1, 192, 384, False),
        (3, 1, 1, 192, 256, True),
    ]
    for k, s, p, cin, cout, pooled in layers:
        n_out, taps = out_and_taps(n, k, s, p)
        total += 2.0 * taps * taps * cin * cout
        n = pool(n_out) if pooled else n_out
    return total + 2.0 * n * n * 256


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "deepmil_jax.benchmark", "--quick", f"--json={out}"),
            "--compare=label_assign,max_pooling",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_quick_json_has_every_figure(quick):
    result, table = quick
    assert result["backbone"] == "caffe" and result["scheme"] == "label_assign"
    assert result["batch_size"] == 4 and result["image_size"] == 131
    assert "cpu" in result["device"]
    for key in REQUIRED:
        value = result[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, key
    assert "images/s" in table and "JAX / PyTorch" in table
    assert "relative to label_assign's (--compare)" in table and "    max_pooling " in table


def test_quick_figures_are_consistent(quick):
    r, _ = quick
    b = r["batch_size"]
    mfu = r["train_flops_per_step"] * r["train_images_per_sec"] / b / r["peak_flops_per_sec"]
    assert r["mfu"] == pytest.approx(mfu, rel=1e-9)
    assert r["train_vs_torch"] == pytest.approx(
        r["train_images_per_sec"] / r["torch_train_images_per_sec"], rel=1e-9
    )
    assert r["pipeline_overlap"] == pytest.approx(
        r["train_from_pipeline_images_per_sec"] / r["train_fixed_batch_images_per_sec"], rel=1e-9
    )
    for key, values in r["per_repeat"].items():
        assert len(values) == r["repeats"]
        if "[" not in key:  # the --compare part's rates, checked below
            assert r[key] == pytest.approx(float(np.median(values)), rel=1e-9), key
    # --compare: step time relative to --scheme's, both timed in alternation in this run
    rates = {k[k.index("[") + 1 : -1]: v for k, v in r["per_repeat"].items() if "[" in k}
    assert set(rates) == {"reference", "max_pooling"}  # label_assign is the --scheme itself
    assert r["step_time_vs_scheme"]["label_assign"] == 1.0
    assert r["step_time_vs_scheme"]["max_pooling"] == pytest.approx(
        np.median(rates["reference"]) / np.median(rates["max_pooling"]), rel=1e-9
    )
    for key in ("train_images_per_sec", "torch_train_images_per_sec"):
        assert r[f"{key}_best"] == pytest.approx(max(r["per_repeat"][key]), rel=1e-9)
    assert r["train_vs_torch_best"] == pytest.approx(
        r["train_images_per_sec_best"] / r["torch_train_images_per_sec_best"], rel=1e-9
    )
    # The CPU peak is documented as cores x GHz x FLOPs/cycle.
    assert r["peak_source"].startswith("estimate")
    assert 1e9 < r["peak_flops_per_sec"] < 1e14


def test_quick_flops_match_a_hand_count(quick):
    r, _ = quick
    forward = _forward_conv_flops(r["image_size"]) * r["batch_size"]
    # A train step is the forward pass, the weight gradients (as many FLOPs again) and the input
    # gradients of conv2..conv5 (not of conv1: the images need none), plus small elementwise work.
    assert 2.5 * forward < r["train_flops_per_step"] < 3.3 * forward


def test_quick_train_step_memory_holds_the_state_and_the_batch(quick):
    """At least what a step's arguments hold, counted from the model itself: the float32
    parameters and Adam's two moments, and the batch; at most a few times more (gradients, and
    the activations of a 131x131 batch of 4, a few MiB)."""
    r, _ = quick
    model = build_model(r["scheme"], backbone=r["backbone"], rngs=nnx.Rngs(0))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    least = (3 * params * 4 + r["batch_size"] * r["image_size"] ** 2 * 4) / 2**20
    assert least < r["train_step_memory_mib"] < 3 * least + 64


def test_preprocess_memory_is_the_workers_own(quick):
    r, _ = quick
    # The benchmark process holds JAX, TensorFlow and torch (over 1 GiB); a worker that counted
    # its parent's high-water mark would report that. A fresh one with a 1024x832 DICOM does not.
    assert 20 < r["preprocess_peak_rss_mib"] < 1024
    assert r["preprocess_peak_rss_mib_total"] >= r["preprocess_peak_rss_mib"]


def test_forward_flop_count_at_227():
    # The textbook AlexNet (one grey channel into conv1): 1.19 GFLOPs with padding taps counted;
    # without them, as XLA counts, 1.085 GFLOPs.
    assert _forward_conv_flops(227) == pytest.approx(1.0855e9, rel=2e-3)


def test_cpu_peak_estimate():
    info = {
        "model name": "Xeon(R) CPU @ 2.00GHz",
        "flags": "fma avx avx2",
        "siblings": "4",
        "cpu cores": "2",
    }
    peak = peaks.cpu_peak("fp32", info, cpus=4)  # 4 hyperthreads on 2 cores
    assert peak.flops_per_sec == pytest.approx(2 * 2.0e9 * 32)
    info = {"cpu MHz": "2500.0", "flags": "fma avx2 avx512f avx512_bf16"}
    assert peaks.cpu_peak("fp32", info, cpus=2).flops_per_sec == pytest.approx(2 * 2.5e9 * 64)
    assert peaks.cpu_peak("bf16", info, cpus=2).flops_per_sec == pytest.approx(2 * 2.5e9 * 128)


@pytest.mark.parametrize(
    "kind, precision, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H200", "fp32", 66.9),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("TPU v5 lite", "bf16", 197.0),
        ("TPU v5", "bf16", 459.0),
        ("TPU v6 lite", "bf16", 918.0),
        ("TPU v4", "fp32", 275.0),
    ],
)
def test_accelerator_peaks(kind, precision, tflops):
    device = types.SimpleNamespace(platform="gpu", device_kind=kind)
    assert peaks.device_peak(device, precision).flops_per_sec == pytest.approx(tflops * 1e12)


# ---- the PyTorch reference against deepmil_jax -------------------------------------------------


def _logits_and_labels(seed, shape=(5, 6, 6)):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, size=shape).astype(np.float32)
    z[0, 0, 0], z[1, 2, 3], z[2, 1, 1] = 40.0, -40.0, 0.0  # saturated sigmoids stay finite
    labels = np.array([1, 0, 1, 0, 1][: shape[0]], np.int32)
    return z, labels


@pytest.mark.parametrize("k", [1, 6, 36, 0.2])
def test_torch_label_assign_loss_equals_jax(k):
    z, y = _logits_and_labels(0)
    zt = torch.tensor(z, requires_grad=True)
    loss_t = tr.label_assign_loss(zt, torch.tensor(y), k)
    loss_t.backward()
    loss_j, grad_j = jax.value_and_grad(losses.label_assign_loss)(jnp.asarray(z), jnp.asarray(y), k)
    np.testing.assert_allclose(loss_t.item(), float(loss_j), rtol=1e-6)
    np.testing.assert_allclose(zt.grad.numpy(), np.asarray(grad_j), rtol=1e-5, atol=1e-8)


def test_torch_max_pooling_and_sparse_losses_equal_jax():
    z, y = _logits_and_labels(1, (4, 3, 5))
    zt, yt = torch.tensor(z), torch.tensor(y)
    np.testing.assert_allclose(
        tr.max_pooling_loss(zt, yt).item(), float(losses.max_pooling_loss(z, y)), rtol=1e-6
    )
    np.testing.assert_allclose(
        tr.sparse_loss(zt, yt, 0.3).item(), float(losses.sparse_loss(z, y, 0.3)), rtol=1e-6
    )


@pytest.mark.parametrize(
    "scheme, backbone, hidden",
    [("label_assign", "caffe", ()), ("max_pooling", "torchvision", (8,))],
)
def test_torch_network_equals_the_jax_model(scheme, backbone, hidden):
    model = build_model(scheme, backbone=backbone, head_hidden=hidden, rngs=nnx.Rngs(0))
    model.eval()
    net = tr.MILNet(scheme, backbone=backbone, head_hidden=hidden).eval()
    tr.load_jax_params(net, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    images = np.random.default_rng(2).random((2, 131, 131, 1), dtype=np.float32)
    expected = np.asarray(model(jnp.asarray(images)))
    with torch.no_grad():
        got = net(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert got.shape == expected.shape == (2, 3, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_torch_trainer_step_lowers_the_loss_like_adam():
    trainer = tr.TorchTrainer("label_assign", k=2, learning_rate=1e-3, channels_last=True)
    images = np.random.default_rng(3).random((4, 131, 131, 1), dtype=np.float32)
    x, y = trainer.to_device(images, np.array([1, 0, 1, 0]))
    first = trainer.step(x, y).item()
    for _ in range(4):
        last = trainer.step(x, y).item()
    assert math.isfinite(first) and last < first


def test_help_gives_the_device_dependent_defaults():
    """--help must not show train's batch 8 / fp32 as the benchmark's defaults."""
    proc = subprocess.run(
        [sys.executable, "-m", "deepmil_jax.benchmark", "--helpshort"],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = " ".join((proc.stdout + proc.stderr).split())
    batch = text.split("--batch_size:")[1].split("--")[0]
    assert "32 on CPU, 256 on GPU/TPU" in batch and "default: '8'" not in batch
    precision = text.split("--precision:")[1].split("--")[0]
    assert "fp32 on CPU, bf16 on GPU/TPU" in precision and "default:" not in precision


def test_train_and_eval_parts_need_no_tensorflow_or_dicom_stack():
    """The accelerator machine may lack TensorFlow, TFDS, pydicom and scikit-image: the train-step
    and eval parts must run without them (they are imported only by the parts that use them)."""
    code = (
        "import runpy, sys\n"
        "for m in ('tensorflow', 'tensorflow_datasets', 'pydicom', 'skimage'):\n"
        "    sys.modules[m] = None  # any import of them raises ImportError\n"
        "sys.argv = ['benchmark', '--quick', '--parts=train,eval', '--notorch']\n"
        "runpy.run_module('deepmil_jax.benchmark', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train step (JAX)" in proc.stdout and "eval forward" in proc.stdout


# ---------------------------------------------------------------------------------------------
# The PyTorch reference against formulas written in numpy (independent of both frameworks).


def _bce_numpy(z, y):
    z = np.asarray(z, np.float64)
    return np.logaddexp(0.0, -z) * y + np.logaddexp(0.0, z) * (1 - y)


def test_torch_reference_losses_match_the_papers_equations_in_numpy():
    rng = np.random.default_rng(7)
    z = rng.normal(0, 3, (5, 4, 3)).astype(np.float32)
    y = np.array([1, 0, 1, 1, 0])
    flat = z.reshape(5, -1).astype(np.float64)
    zt, yt = torch.tensor(z), torch.tensor(y)
    # Eq. 4: cross-entropy of the largest instance probability, mean over images
    eq4 = np.mean(_bce_numpy(flat.max(1), y))
    np.testing.assert_allclose(tr.max_pooling_loss(zt, yt).item(), eq4, rtol=1e-6)
    # Eq. 6: the k largest instances take the image label, the others 0; mean over all instances
    for k, top in [(1, 1), (5, 5), (12, 12), (0.25, 3), (0.3, 4), (0.2, 3)]:
        ranked = -np.sort(-flat, axis=1)
        targets = np.where(np.arange(12)[None, :] < top, y[:, None], 0)
        eq6 = np.mean(_bce_numpy(ranked, targets))
        np.testing.assert_allclose(tr.label_assign_loss(zt, yt, k).item(), eq6, rtol=1e-6)
    # Eq. 7: Eq. 4 plus mu times the L1 norm of the instance probabilities, mean over images
    probs = 1.0 / (1.0 + np.exp(-flat))
    eq7 = np.mean(_bce_numpy(flat.max(1), y) + 0.3 * probs.sum(1))
    np.testing.assert_allclose(tr.sparse_loss(zt, yt, 0.3).item(), eq7, rtol=1e-6)
    np.testing.assert_allclose(tr.scheme_loss("sparse", zt, yt, mu=0.3).item(), eq7, rtol=1e-6)
    np.testing.assert_allclose(tr.scheme_loss("alexnet", zt, yt).item(), eq4, rtol=1e-6)
    np.testing.assert_allclose(
        tr.scheme_loss("label_assign", zt, yt, k=5).item(),
        np.mean(_bce_numpy(-np.sort(-flat, 1), np.where(np.arange(12) < 5, y[:, None], 0))),
        rtol=1e-6,
    )
    net = tr.MILNet("max_pooling", backbone="torchvision")
    squares = sum(float((p.detach().double().numpy() ** 2).sum()) for p in net.parameters())
    np.testing.assert_allclose(tr.l2_penalty(net).item(), squares / 2, rtol=1e-5)


def _conv_numpy(x, w, b, stride, pad, groups):
    """NCHW convolution in float64: x (N, C, H, W), w (O, C / groups, k, k)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    cin, cout = x.shape[1] // groups, w.shape[0] // groups
    outs = [
        np.einsum(
            "nchwij,ocij->nohw", win[:, g * cin : (g + 1) * cin], w[g * cout : (g + 1) * cout]
        )
        for g in range(groups)
    ]
    return np.concatenate(outs, axis=1) + b[None, :, None, None]


def _pool_numpy(x):
    win = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2]
    return win.max(axis=(-2, -1))


def _lrn_nchw(x, k, alpha, beta):
    sq = np.pad(x**2, ((0, 0), (2, 2), (0, 0), (0, 0)))
    return x / (k + alpha * sum(sq[:, i : i + x.shape[1]] for i in range(5))) ** beta


# (kernel, stride, pad, groups) of conv1..conv5: Krizhevsky et al. / BVLC, and torchvision
_ALEXNET = {
    "caffe": [(11, 4, 0, 1), (5, 1, 2, 2), (3, 1, 1, 1), (3, 1, 1, 2), (3, 1, 1, 2)],
    "torchvision": [(11, 4, 2, 1), (5, 1, 2, 1), (3, 1, 1, 1), (3, 1, 1, 1), (3, 1, 1, 1)],
}
# grey input repeated in 3 channels: x * scale - mean, / std, per channel
_NORMALISE = {
    "caffe": (255.0, [123.68, 116.779, 103.939], [1.0, 1.0, 1.0]),  # convnets-keras
    "torchvision": (1.0, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}


def _milnet_numpy(params, images, backbone, lrn):
    """The deep MIL network in numpy: AlexNet features, then 1x1 convolutions (hidden + logit)."""
    scale, mean, std = _NORMALISE[backbone]
    x = (np.repeat(images, 3, axis=1) * scale - np.array(mean)[None, :, None, None]) / np.array(
        std
    )[None, :, None, None]
    norm = {
        "keras": lambda v: _lrn_nchw(v, 2.0, 1e-4, 0.75),  # after the pooling
        "caffe": lambda v: _lrn_nchw(v, 1.0, 1e-4 / 5, 0.75),  # before it
    }.get(lrn)
    for i, (k, s, p, g) in enumerate(_ALEXNET[backbone]):
        assert params[f"convs.{i}"][0].shape[-2:] == (k, k)
        x = np.maximum(_conv_numpy(x, *params[f"convs.{i}"], s, p, g), 0.0)
        if i in (0, 1):
            if lrn == "caffe":
                x = _pool_numpy(norm(x))
            elif lrn == "keras":
                x = norm(_pool_numpy(x))
            else:
                x = _pool_numpy(x)
    x = _pool_numpy(x)
    j = 0
    while f"hidden.{j}" in params:
        x = np.maximum(_conv_numpy(x, *params[f"hidden.{j}"], 1, 0, 1), 0.0)
        j += 1
    return _conv_numpy(x, *params["logit"], 1, 0, 1)[:, 0]


@pytest.mark.parametrize(
    "backbone, lrn, hidden",
    [("caffe", "keras", ()), ("caffe", "caffe", (4,)), ("torchvision", None, ())],
)
def test_torch_reference_network_matches_numpy(backbone, lrn, hidden):
    net = tr.MILNet("label_assign", backbone=backbone, head_hidden=hidden, lrn=lrn).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large weights, so that the LRN's denominators matter
        for p in net.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 2.0 / math.sqrt(fan_in))
    params = {}
    for name, p in net.named_parameters():
        layer, kind = name.rsplit(".", 1)
        params.setdefault(layer, [None, None])[kind == "bias"] = p.detach().double().numpy()
    images = np.random.default_rng(8).random((2, 1, 99, 99))
    expected = _milnet_numpy(params, images, backbone, lrn)
    with torch.no_grad():
        got = net(torch.from_numpy(images.astype(np.float32))).numpy()
    assert got.shape == expected.shape == (2, 2, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_train_steps_number_on_and_allow_no_warmup():
    """``--warmup=0`` (no untimed step) is allowed, so ``on_devices(..., 0)`` runs nothing."""

    class Trainer:
        def __init__(self):
            self.calls = []

        def step_on_devices(self, images, labels, step):
            self.calls.append(step)
            return {"loss": jnp.float32(step)}

    trainer = Trainer()
    steps = TrainSteps(trainer, batch=4)
    assert steps.on_devices(None, None, 0) == 0 and trainer.calls == []
    assert steps.on_devices(None, None, 3) == 12 and trainer.calls == [0, 1, 2]
    assert steps.on_devices(None, None, 2) == 8 and trainer.calls == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--batch_size=0", "--batch_size must be positive"),
        ("--k=37", "--k: 37 is more than the 36 instances"),
        ("--image_size=10", "--image_size: 10 is too small"),
        ("--head_hidden=x", "--head_hidden"),
    ],
)
def test_bad_flags_are_one_line_before_any_work(flag, message):
    proc = subprocess.run(
        [sys.executable, "-m", "deepmil_jax.benchmark", flag, "--parts=train", "--notorch"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
