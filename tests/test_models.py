"""Models: shapes, the grey-input fold, exact normalisation, LRN, heads, schemes and dtypes.

The layer-by-layer comparison against other frameworks (torch, and a numpy/scipy Theano reference)
with converted weights is in test_weights.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import deepmil_jax.models.alexnet as alexnet_mod
from deepmil_jax import registry
from deepmil_jax.errors import ConfigError, WeightsError
from deepmil_jax.models import (
    LRNS,
    AlexNet,
    AlexNetClassifier,
    AttentionPooling,
    DeepMIL,
    FixedPooling,
    InstanceHead,
    LearnedLSEPooling,
    build_model,
    local_response_norm,
    normalize,
)
from deepmil_jax.registry import SCHEMES

SMALL = 99  # smallest handy input: a 2x2 map in both variants (99 -> 23 -> 11 -> 5 -> 2)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def raw_images(n: int, size: int, channels: int = 1, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).random((n, size, size, channels), np.float32))


@pytest.fixture(scope="module")
def caffe_net() -> AlexNet:
    return AlexNet("caffe", rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tv_net() -> AlexNet:
    return AlexNet("torchvision", rngs=nnx.Rngs(1))


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
@pytest.mark.parametrize(
    ("variant", "size", "grid"),
    [
        ("caffe", 227, 6),
        ("torchvision", 227, 6),
        ("torchvision", 224, 6),
        ("caffe", 291, 8),
        ("caffe", 454, 13),
        ("torchvision", 454, 13),
        ("caffe", 512, 14),
    ],
)
def test_fully_convolutional_grid(caffe_net, tv_net, variant, size, grid):
    net = caffe_net if variant == "caffe" else tv_net
    for channels in (1, 3):
        shape = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
        assert jax.eval_shape(net, shape).shape == (2, grid, grid, 256)
        assert jax.eval_shape(net.forward_raw, shape).shape == (2, grid, grid, 256)


def test_parameter_shapes_match_the_two_architectures(caffe_net, tv_net):
    caffe = {f"conv{i}": getattr(caffe_net, f"conv{i}").kernel.shape for i in range(1, 6)}
    assert caffe == {
        "conv1": (11, 11, 3, 96),
        "conv2": (5, 5, 48, 256),  # 2 groups
        "conv3": (3, 3, 256, 384),
        "conv4": (3, 3, 192, 384),  # 2 groups
        "conv5": (3, 3, 192, 256),  # 2 groups
    }
    tv = {f"conv{i}": getattr(tv_net, f"conv{i}").kernel.shape for i in range(1, 6)}
    assert [k[-1] for k in tv.values()] == [64, 192, 384, 256, 256]
    assert tv["conv2"] == (5, 5, 64, 192)


@pytest.mark.parametrize("variant", ["caffe", "torchvision"])
def test_grey_input_equals_the_image_fed_three_times(caffe_net, tv_net, variant):
    net = caffe_net if variant == "caffe" else tv_net
    grey = normalize(raw_images(2, SMALL), "torchvision")  # any real-valued image
    folded = net(grey)
    repeated = net(jnp.repeat(grey, 3, axis=-1))
    assert rel_err(folded, repeated) < 1e-5


@pytest.mark.parametrize(
    ("variant", "lrn", "normalization"),
    [
        ("caffe", "keras", "keras"),
        ("caffe", "caffe", "caffe"),
        ("torchvision", None, "torchvision"),
        ("caffe", "keras", "torchvision"),  # per-channel std too, without padding
    ],
)
def test_forward_raw_grey_is_exact_per_channel_normalisation(variant, lrn, normalization):
    """Folding per-channel mean/std into conv1 is exact, also with torchvision's padded conv1."""
    net = AlexNet(variant, lrn=lrn, normalization=normalization, rngs=nnx.Rngs(2))
    raw = raw_images(2, SMALL, seed=3)
    mean = {
        "keras": [123.68, 116.779, 103.939],
        "caffe": [104.00698793, 116.66876762, 122.67891434],
        "torchvision": [0.485, 0.456, 0.406],
    }[normalization]
    std = [0.229, 0.224, 0.225] if normalization == "torchvision" else [1.0, 1.0, 1.0]
    scale = 1.0 if normalization == "torchvision" else 255.0
    three = (np.repeat(np.asarray(raw), 3, axis=-1) * scale - np.array(mean)) / np.array(std)
    ref = net(jnp.asarray(three, jnp.float32))
    assert rel_err(net.forward_raw(raw), ref) < 1e-5
    # ... while averaging the statistics (normalize() on one channel) is only an approximation
    approx = net(normalize(raw, normalization))
    if normalization == "torchvision":
        assert rel_err(approx, ref) > 1e-4


def test_normalize_rgb_by_hand():
    rgb = jnp.asarray([[[[0.2, 0.4, 0.6]]]], jnp.float32)  # (1, 1, 1, 3)
    np.testing.assert_allclose(
        normalize(rgb, "keras")[0, 0, 0], [51 - 123.68, 102 - 116.779, 153 - 103.939], rtol=1e-5
    )
    np.testing.assert_allclose(  # reversed to BGR, BGR means
        normalize(rgb, "caffe")[0, 0, 0],
        [153 - 104.00698793, 102 - 116.66876762, 51 - 122.67891434],
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        normalize(rgb, "torchvision")[0, 0, 0],
        [(0.2 - 0.485) / 0.229, (0.4 - 0.456) / 0.224, (0.6 - 0.406) / 0.225],
        rtol=1e-5,
    )
    grey = jnp.full((1, 1, 1, 1), 0.5)
    np.testing.assert_allclose(normalize(grey, "keras")[0, 0, 0, 0], 127.5 - 114.7993, rtol=1e-5)
    with pytest.raises(ConfigError, match="unknown normalization"):
        normalize(rgb, "imagenet")
    with pytest.raises(ConfigError, match="1 or 3 channels"):
        normalize(jnp.zeros((1, 2, 2, 2)), "keras")


def test_lrn_matches_keras_formula_and_torch():
    x = np.random.default_rng(0).normal(0, 30, (2, 4, 5, 11)).astype(np.float32)  # NHWC
    sq = np.pad(x.astype(np.float64) ** 2, ((0, 0), (0, 0), (0, 0), (2, 2)))
    window = sum(sq[..., i : i + 11] for i in range(5))
    keras = x / (2.0 + 1e-4 * window) ** 0.75  # convnets-keras crosschannelnormalization
    assert rel_err(local_response_norm(jnp.asarray(x), LRNS["keras"]), keras) < 1e-6
    caffe = F.local_response_norm(
        torch.from_numpy(x.transpose(0, 3, 1, 2)).double(), size=5, alpha=1e-4, beta=0.75, k=1.0
    )
    ours = local_response_norm(jnp.asarray(x), LRNS["caffe"])
    assert rel_err(ours, caffe.numpy().transpose(0, 2, 3, 1)) < 1e-6


@pytest.mark.parametrize("flavour", ["keras", "caffe"])
def test_lrn_gradient_matches_torch_autograd(flavour):
    """The hand-written LRN gradient against torch's autograd of its own LRN, in float64."""
    spec = LRNS[flavour]
    rng = np.random.default_rng(1)
    x = rng.normal(0, 40, (2, 3, 4, 9)).astype(np.float32)  # large values: the power matters
    cotangent = rng.normal(size=x.shape).astype(np.float32)
    _, vjp = jax.vjp(lambda v: local_response_norm(v, spec), jnp.asarray(x))
    ours = np.asarray(vjp(jnp.asarray(cotangent))[0])
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2)).double().requires_grad_()
    ty = F.local_response_norm(tx, size=spec.n, alpha=spec.alpha * spec.n, beta=spec.beta, k=spec.k)
    ty.backward(torch.from_numpy(cotangent.transpose(0, 3, 1, 2)).double())
    assert rel_err(ours, tx.grad.numpy().transpose(0, 2, 3, 1)) < 1e-5


def test_lrn_placement_differs_between_flavours():
    a = AlexNet("caffe", lrn="keras", rngs=nnx.Rngs(0))
    b = AlexNet("caffe", lrn="caffe", rngs=nnx.Rngs(0))
    x = normalize(raw_images(1, SMALL), "keras")
    assert rel_err(a(x), b(x)) > 1e-3


def test_instance_head_is_a_per_pixel_mlp():
    head = InstanceHead(8, (5, 4), rngs=nnx.Rngs(0))
    feats = np.random.default_rng(1).normal(size=(2, 3, 4, 8)).astype(np.float32)
    h = feats.astype(np.float64)
    for layer in head.hidden:
        h = np.maximum(h @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]), 0)
    ref = (h @ np.asarray(head.logit.kernel[...]) + np.asarray(head.logit.bias[...]))[..., 0]
    out = head(jnp.asarray(feats))
    assert out.shape == (2, 3, 4)
    assert out.dtype == jnp.float32
    assert rel_err(out, ref) < 1e-5
    assert len(InstanceHead(256, rngs=nnx.Rngs(0)).hidden) == 0  # logistic regression


def test_deep_mil_gives_instance_logits(caffe_net):
    head = InstanceHead(256, rngs=nnx.Rngs(3))
    model = DeepMIL(caffe_net, head)
    raw = raw_images(3, SMALL)
    out = model(raw)
    assert out.shape == (3, 2, 2)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, head(caffe_net.forward_raw(raw)), rtol=1e-6)


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
def test_classifier_shape_dropout_and_size_error():
    clf = build_model("alexnet", rngs=nnx.Rngs(0))
    assert isinstance(clf, AlexNetClassifier)
    raw = raw_images(2, 227)
    clf.eval()
    a, b = clf(raw), clf(raw)
    assert a.shape == (2, 1, 1)
    np.testing.assert_array_equal(a, b)  # no dropout in eval mode
    clf.train()
    assert not np.allclose(clf(raw), a)  # dropout active in train mode
    with pytest.raises(ConfigError, match=r"6x6 feature map.*227x227"):
        clf(raw_images(1, 291))


def test_build_model_schemes():
    for scheme in ("max_pooling", "label_assign", "sparse"):
        model = build_model(scheme, head_hidden=(128, 128), rngs=nnx.Rngs(0))
        assert isinstance(model, DeepMIL)
        assert model.backbone.variant == "caffe"
        assert [layer.kernel.shape for layer in model.head.hidden] == [(256, 128), (128, 128)]
    model = build_model("sparse", backbone="torchvision", rngs=nnx.Rngs(0))
    assert (model.backbone.variant, model.backbone.normalization) == ("torchvision", "torchvision")
    with pytest.raises(ConfigError, match="unknown scheme"):
        build_model("median_pooling", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="unknown backbone 'vgg'"):
        build_model("sparse", backbone="vgg", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=r"is a path.*load_converted"):
        build_model("sparse", pretrained="/x", rngs=nnx.Rngs(0))  # models read no files


def test_bf16_compute_keeps_float32_params():
    f32 = build_model("max_pooling", rngs=nnx.Rngs(0))
    bf16 = build_model("max_pooling", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    params = jax.tree.leaves(nnx.state(bf16, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}
    raw = raw_images(2, SMALL)
    out = bf16(raw)
    assert out.dtype == jnp.float32
    assert bf16.backbone.forward_raw(raw).dtype == jnp.bfloat16
    assert rel_err(out, f32(raw)) < 0.1  # same parameters, bf16 rounding only


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
def test_split_and_native_grouped_convolutions_agree_with_gradients(monkeypatch):
    """The CPU lowering (one convolution per group) equals feature_group_count, values and grads."""
    model = build_model("max_pooling", rngs=nnx.Rngs(0))
    raw = raw_images(2, SMALL)

    def loss_and_grads():
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(jax.nn.softplus(m(raw))))(model)
        return loss, jax.tree.leaves(grads)

    monkeypatch.setattr(alexnet_mod, "GROUPED_CONV", "split")
    loss_s, grads_s = loss_and_grads()
    monkeypatch.setattr(alexnet_mod, "GROUPED_CONV", "native")
    loss_n, grads_n = loss_and_grads()
    assert abs(float(loss_s) - float(loss_n)) < 1e-5 * abs(float(loss_n))
    for gs, gn in zip(grads_s, grads_n, strict=True):
        assert np.all(np.isfinite(gs))
        assert rel_err(gs, gn) < 1e-4


def test_custom_max_pool_gradient_equals_xla(monkeypatch):
    """The CPU max-pool gradient (alexnet.POOL_GRADIENT="custom") equals XLA's, ties included."""
    from deepmil_jax.models import alexnet

    rng = np.random.default_rng(0)
    # coarse values so that many windows hold tied maxima
    x = jnp.asarray(rng.integers(0, 4, (2, 27, 31, 5)).astype(np.float32))
    cotangent = jnp.asarray(rng.standard_normal((2, 13, 15, 5)).astype(np.float32))
    grads = {}
    for mode in ("xla", "custom"):
        monkeypatch.setattr(alexnet, "POOL_GRADIENT", mode)
        y, vjp = jax.vjp(alexnet.max_pool, x)
        grads[mode] = (np.asarray(y), np.asarray(vjp(cotangent)[0]))
    np.testing.assert_array_equal(grads["custom"][0], grads["xla"][0])
    np.testing.assert_allclose(grads["custom"][1], grads["xla"][1], rtol=1e-6, atol=1e-6)


def _lrn_numpy(x, k, alpha, beta, n=5):
    """Cross-channel LRN over the last axis, float64: x / (k + alpha * sum_{|c'-c|<=n//2} x^2)^b."""
    x = np.asarray(x, np.float64)
    c, half = x.shape[-1], n // 2
    sq = np.pad(x**2, [(0, 0)] * (x.ndim - 1) + [(half, half)])
    window = sum(sq[..., i : i + c] for i in range(n))
    return x / (k + alpha * window) ** beta


def _max_pool_numpy(x):
    """3x3 max pooling, stride 2, no padding, NHWC."""
    n, h, w, c = x.shape
    oh, ow = (h - 3) // 2 + 1, (w - 3) // 2 + 1
    out = np.full((n, oh, ow, c), -np.inf)
    for i in range(3):
        for j in range(3):
            out = np.maximum(out, x[:, i : i + 2 * oh : 2, j : j + 2 * ow : 2, :])
    return out


@pytest.mark.parametrize("flavour", ["keras", "caffe"])
def test_each_lrn_flavour_matches_its_numpy_formula_and_place(flavour):
    """Caffe's LRNLayer (local_size 5, alpha 1e-4 divided by local_size, k 1, beta 0.75) comes
    before the pooling; convnets-keras' crosschannelnormalization (alpha 1e-4 per element, k 2,
    beta 0.75) after it."""
    x = np.random.default_rng(4).normal(0, 40, (2, 9, 11, 12)).astype(np.float32)
    if flavour == "caffe":
        lrn = _lrn_numpy(x, k=1.0, alpha=1e-4 / 5, beta=0.75)
        expected = _max_pool_numpy(lrn)
    else:
        lrn = _lrn_numpy(x, k=2.0, alpha=1e-4, beta=0.75)
        expected = _lrn_numpy(_max_pool_numpy(x.astype(np.float64)), k=2.0, alpha=1e-4, beta=0.75)
    assert rel_err(local_response_norm(jnp.asarray(x), LRNS[flavour]), lrn) < 1e-6
    net = AlexNet("caffe", lrn=flavour, rngs=nnx.Rngs(0))
    got = net._pool_stage(jnp.asarray(x))
    assert got.shape == expected.shape == (2, 4, 5, 12)
    assert rel_err(got, expected) < 1e-6
    # the other order gives a different result on these values, so the check above has teeth
    other = _lrn_numpy(_max_pool_numpy(x.astype(np.float64)), k=1.0, alpha=1e-4 / 5, beta=0.75)
    if flavour == "caffe":
        assert rel_err(other, expected) > 1e-3


def test_models_import_no_weight_reading_code():
    """deepmil_jax.models builds modules only: importing it loads no weights code, Orbax, h5py
    or torch."""
    code = (
        "import sys\n"
        "import deepmil_jax.models\n"
        "bad = ('orbax', 'h5py', 'torch', 'deepmil_jax.weights')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bad or m.startswith(bad)))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_pretrained_arrays_are_copied_and_checked():
    """build_model(pretrained=(params, metadata)) copies the arrays; a bad one names its layer."""
    source = AlexNet("caffe", lrn="caffe", normalization="caffe", rngs=nnx.Rngs(5))
    params = {
        f"conv{i}": {
            kind: np.asarray(getattr(getattr(source, f"conv{i}"), kind)[...])
            for kind in ("kernel", "bias")
        }
        for i in range(1, 6)
    }
    metadata = {"variant": "caffe", "lrn": "caffe", "normalization": "caffe"}
    model = build_model("max_pooling", pretrained=(params, metadata), rngs=nnx.Rngs(0))
    assert (model.backbone.lrn, model.backbone.normalization) == ("caffe", "caffe")
    for i in range(1, 6):
        for kind in ("kernel", "bias"):
            got = getattr(getattr(model.backbone, f"conv{i}"), kind)[...]
            np.testing.assert_array_equal(got, params[f"conv{i}"][kind])
    clf = build_model("alexnet", pretrained=(params, metadata), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(clf.backbone.conv5.bias[...], params["conv5"]["bias"])
    assert clf.fc6.kernel.shape == (9216, 4096)  # no fc6 in params: a fresh layer
    bad = {**params, "conv3": {**params["conv3"], "kernel": np.zeros((3, 3, 128, 384))}}
    with pytest.raises(WeightsError, match=r"conv3 kernel has shape \(3, 3, 128, 384\).*"):
        build_model("sparse", pretrained=(bad, metadata), rngs=nnx.Rngs(0))
    missing = {k: v for k, v in params.items() if k != "conv4"}
    with pytest.raises(WeightsError, match="no layer 'conv4'"):
        build_model("sparse", pretrained=(missing, metadata), rngs=nnx.Rngs(0))


# ---- MIL poolings beyond max: attention (gated), learned log-sum-exp, fixed poolings -----------
def _np(x) -> np.ndarray:
    return np.asarray(x[...], np.float64)


def _attention_reference(pool: AttentionPooling, feats: np.ndarray, z: np.ndarray):
    """Ilse et al. Eq. 8-9 in float64 numpy: a = softmax(w^T (tanh(V h) [* sigmoid(U h)]))."""
    h = feats.astype(np.float64)
    x = np.tanh(h @ _np(pool.V.kernel) + _np(pool.V.bias))
    if pool.gated:
        x = x / (1 + np.exp(-(h @ _np(pool.U.kernel) + _np(pool.U.bias))))
    scores = (x @ _np(pool.w.kernel) + _np(pool.w.bias))[..., 0].reshape(len(h), -1)
    a = np.exp(scores - scores.max(1, keepdims=True))
    a /= a.sum(1, keepdims=True)
    zf = z.reshape(len(z), -1).astype(np.float64)
    return (a * zf).sum(1), a


@pytest.mark.parametrize("gated", [False, True])
def test_attention_pooling_is_ilse_et_al(gated):
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(3, 2, 3, 16)).astype(np.float32)
    z = rng.normal(size=(3, 2, 3)).astype(np.float32) * 2
    pool = AttentionPooling(16, 8, gated=gated, rngs=nnx.Rngs(4))
    assert hasattr(pool, "U") == gated
    scores, bag = pool(jnp.asarray(feats), jnp.asarray(z))
    ref_bag, a = _attention_reference(pool, feats, z)
    np.testing.assert_allclose(bag, ref_bag, rtol=1e-5, atol=1e-6)
    # heatmap scores: attention-weighted instance logits m a_j z_j, whose mean is the bag logit
    np.testing.assert_allclose(scores, (6 * a * z.reshape(3, -1)).reshape(z.shape), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(scores).mean(axis=(1, 2)), bag, rtol=1e-5, atol=1e-6)


def test_attention_on_a_linear_head_is_the_classifier_of_the_weighted_embedding(caffe_net):
    """With the paper's logistic-regression head, sum_j a_j (w.h_j + b) = w.(sum_j a_j h_j) + b:
    Ilse et al.'s embedding-level attention MIL."""
    model = build_model("attention", rngs=nnx.Rngs(7))
    raw = raw_images(2, 131)
    scores, bag = model.instances_and_bag(raw)
    feats = np.asarray(model.backbone.forward_raw(raw), np.float64)
    _, a = _attention_reference(model.pooling, feats, np.zeros(feats.shape[:3]))
    embedding = (a[..., None] * feats.reshape(2, -1, 256)).sum(1)  # (N, 256)
    head = model.head.logit
    expected = (embedding @ _np(head.kernel) + _np(head.bias))[:, 0]
    np.testing.assert_allclose(bag, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model(raw), scores)  # __call__ gives the heatmap scores


def test_learned_lse_pooling_learns_its_temperature():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(4, 3, 3)).astype(np.float32) * 2
    pool = LearnedLSEPooling(temperature=2.0)
    scores, bag = pool(None, jnp.asarray(z))
    zf = z.reshape(4, -1).astype(np.float64)
    ref = np.log(np.mean(np.exp(2.0 * zf), axis=1)) / 2.0
    np.testing.assert_allclose(bag, ref, rtol=1e-5)
    np.testing.assert_array_equal(scores, z)  # heatmaps: the instance logits
    # the log-temperature is a parameter with a finite, non-zero gradient
    graphdef, params = nnx.split(pool, nnx.Param)

    def total(p):
        return nnx.merge(graphdef, p)(None, jnp.asarray(z))[1].sum()

    grads = jax.grad(total)(params)
    g = float(grads["log_temperature"][...])
    assert np.isfinite(g) and g > 0  # a sharper pooling moves each bag towards its maximum


def test_every_scheme_builds_its_pooling_and_bag_logits():
    raw = raw_images(2, 131)  # a 3x3 grid
    for scheme in SCHEMES:
        if scheme == "alexnet":
            continue
        model = build_model(scheme, k=2, rngs=nnx.Rngs(0))
        assert isinstance(model, DeepMIL), scheme
        scores, bag = model.instances_and_bag(raw)
        assert scores.shape == (2, 3, 3) and bag.shape == (2,), scheme
        assert scores.dtype == bag.dtype == jnp.float32, scheme
        pooling = registry.SCHEMES[scheme].pooling
        if pooling not in registry.POOLINGS_WITH_PARAMETERS:
            assert isinstance(model.pooling, FixedPooling)
            z = np.asarray(model.head(model.backbone.forward_raw(raw))).reshape(2, -1)
            r = 1 / (1 + np.exp(-z.astype(np.float64)))
            expected = {
                "max": z.max(1),
                "mean": np.log(r.mean(1) / (1 - r.mean(1))),
                "topk_mean": None,
                "lse": np.log(np.mean(np.exp(z), axis=1)),
                "noisy_or": None,
            }[pooling]
            if pooling == "topk_mean":
                top = np.sort(r, axis=1)[:, -2:].mean(1)
                expected = np.log(top / (1 - top))
            if pooling == "noisy_or":
                q = np.prod(1 - r, axis=1)
                expected = np.log((1 - q) / q)
            np.testing.assert_allclose(bag, expected, rtol=1e-4, err_msg=scheme)
    assert {"attention", "gated_attention", "learned_lse"} <= {
        s for s in SCHEMES if registry.SCHEMES[s].pooling in registry.POOLINGS_WITH_PARAMETERS
    }
    clf = build_model("alexnet", rngs=nnx.Rngs(0))
    clf.eval()
    logits, bag = clf.instances_and_bag(raw_images(2, 227))
    np.testing.assert_array_equal(bag, np.asarray(logits).reshape(2))


@pytest.mark.parametrize("scheme", ["attention", "gated_attention", "learned_lse"])
def test_pooling_parameters_start_fresh_over_pretrained_convolutions(scheme):
    source = AlexNet("caffe", lrn="caffe", normalization="caffe", rngs=nnx.Rngs(5))
    params = {
        f"conv{i}": {k: _np(getattr(getattr(source, f"conv{i}"), k)) for k in ("kernel", "bias")}
        for i in range(1, 6)
    }
    metadata = {"variant": "caffe", "lrn": "caffe", "normalization": "caffe"}
    a = build_model(scheme, pretrained=(params, metadata), rngs=nnx.Rngs(0))
    b = build_model(scheme, pretrained=(params, metadata), rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(a.backbone.conv3.kernel[...], params["conv3"]["kernel"])
    pooled = jax.tree.leaves(nnx.state(a.pooling, nnx.Param))
    assert pooled and all(p.dtype == jnp.float32 for p in pooled)
    if scheme == "learned_lse":
        assert float(a.pooling.temperature) == 1.0  # the plain log-sum-exp to start
    else:  # random attention weights, drawn from the given streams
        assert not np.array_equal(a.pooling.V.kernel[...], b.pooling.V.kernel[...])
        assert np.std(np.asarray(a.pooling.V.kernel[...])) > 0


@pytest.mark.parametrize("scheme", ["attention", "gated_attention", "learned_lse"])
def test_new_poolings_in_bf16_keep_float32_params_and_outputs(scheme):
    f32 = build_model(scheme, rngs=nnx.Rngs(0))
    bf16 = build_model(scheme, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {
        jnp.dtype(jnp.float32)
    }
    raw = raw_images(2, SMALL)
    (s16, b16), (s32, b32) = bf16.instances_and_bag(raw), f32.instances_and_bag(raw)
    assert s16.dtype == b16.dtype == jnp.float32
    if scheme != "learned_lse":
        assert bf16.pooling.V(jnp.ones((1, 256), jnp.bfloat16)).dtype == jnp.bfloat16
    assert rel_err(b16, b32) < 0.1 and rel_err(s16, s32) < 0.1


def test_fixed_pooling_refuses_an_unknown_pooling():
    with pytest.raises(ConfigError, match="unknown pooling"):
        FixedPooling("median")
