"""torchvision ResNet-18/34/50: the architecture table, the Flax model and the .pth reader, against
an independent PyTorch reference.

torchvision itself cannot be installed beside the CPU build of torch here (its PyPI wheel links
libtorch_cuda), so the reference below is written by hand in torch.nn, following torchvision's
ResNet (v1.5: the stride on the Bottleneck's 3x3 convolution; ``replace_stride_with_dilation``)
with the same module names, so its ``state_dict`` has the real file's keys. It reads nothing
from ``deepmil_jax.architecture``; the parameter counts of torchvision's models anchor it.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from deepmil_jax.architecture import resnet as arch
from deepmil_jax.errors import ConfigError, WeightsError
from deepmil_jax.models.resnet import ResNet
from deepmil_jax.weights.torchvision_resnet import read_torchvision_resnet, validate_resnet

TOL = 1e-4  # max |ours - reference| / max |reference|
TV_MEAN = np.array([0.485, 0.456, 0.406])
TV_STD = np.array([0.229, 0.224, 0.225])
# sum(p.numel() for p in torchvision.models.<variant>().parameters())
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}

torch.set_num_threads(2)


# -- the reference ---------------------------------------------------------------------------


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, downsample, dilation):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, downsample, dilation):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
    def __init__(self, block, counts, dilate_layer4=False):
        super().__init__()
        self.cin, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(block, 64, counts[0], 1, False)
        self.layer2 = self._stage(block, 128, counts[1], 2, False)
        self.layer3 = self._stage(block, 256, counts[2], 2, False)
        self.layer4 = self._stage(block, 512, counts[3], 2, dilate_layer4)
        self.fc = nn.Linear(512 * block.expansion, 1000)

    def _stage(self, block, planes, count, stride, dilate):
        first_dilation = self.dilation
        if dilate:  # torchvision: the stride becomes dilation from the stage's second block on
            self.dilation *= stride
            stride = 1
        cout = planes * block.expansion
        down = None
        if stride != 1 or self.cin != cout:
            down = nn.Sequential(
                nn.Conv2d(self.cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        layers = [block(self.cin, planes, stride, down, first_dilation)]
        self.cin = cout
        layers += [block(cout, planes, 1, None, self.dilation) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def features(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


REFERENCE = {
    "resnet18": (_Basic, (2, 2, 2, 2)),
    "resnet34": (_Basic, (3, 4, 6, 3)),
    "resnet50": (_Bottleneck, (3, 4, 6, 3)),
}


def torch_resnet(variant: str, seed: int, dilate: bool = False) -> TorchResNet:
    """A reference with random weights and non-trivial batch norm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = TorchResNet(*REFERENCE[variant], dilate_layer4=dilate)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.num_batches_tracked.fill_(1234)
    return model.eval()


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def images(seed: int, h: int, w: int, channels: int = 3, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, h, w, channels), dtype=np.float32)


def torch_logits(model: TorchResNet, raw: np.ndarray, features: bool = False) -> np.ndarray:
    """torchvision's preprocessing (RGB on [0, 1], mean/std) and eval forward; NHWC features."""
    x = (raw.astype(np.float64) - TV_MEAN) / TV_STD
    x = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        if features:
            return model.features(x).permute(0, 2, 3, 1).numpy()
        return model(x).numpy()


@nnx.jit
def logits_of(model: ResNet, x):
    return model.classify(x)


@nnx.jit
def raw_features(model: ResNet, raw):
    return model.forward_raw(raw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(variant, dilate=False)``: (torch reference, path of its torch.save'd state_dict);
    ``dilate`` gives the same weights in the reference with a dilated layer4."""
    cache: dict = {}

    def get(variant: str, dilate: bool = False):
        key = (variant, dilate)
        if key not in cache:
            if dilate:
                model, path = get(variant)
                dilated = TorchResNet(*REFERENCE[variant], dilate_layer4=True)
                dilated.load_state_dict(model.state_dict())
                cache[key] = (dilated.eval(), path)
            else:
                model = torch_resnet(variant, seed=len(cache))
                path = tmp_path_factory.mktemp(variant) / f"{variant}.pth"
                torch.save(model.state_dict(), path)
                cache[key] = (model, path)
        return cache[key]

    return get


def load(path, output_stride=32, **kw) -> ResNet:
    params, variant = read_torchvision_resnet(path)
    meta = {"variant": variant, "normalization": "torchvision"}
    return ResNet.from_converted(params, meta, output_stride=output_stride, **kw)


# -- the architecture table ------------------------------------------------------------------


def test_table_is_importable_without_jax_or_numpy():
    code = (
        "import sys\n"
        "sys.modules['jax'] = sys.modules['numpy'] = None  # importing them now fails\n"
        "from deepmil_jax.architecture import resnet\n"
        "print(resnet.grid('resnet50', 224, 224), resnet.out_features('resnet18'))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(7, 7) 512"


@pytest.mark.parametrize("variant", sorted(TORCHVISION_PARAMS))
def test_table_matches_torchvision_layout(variant):
    shapes = arch.expected_shapes(variant)
    trainable = sum(
        math.prod(s)
        for layer in shapes.values()
        for k, s in layer.items()
        if k not in ("mean", "var")
    )
    assert trainable == TORCHVISION_PARAMS[variant]
    # the reference's state_dict has exactly these layers (bn: 4 arrays + num_batches_tracked)
    state = TorchResNet(*REFERENCE[variant]).state_dict()
    layers = {k.rsplit(".", 1)[0] for k in state}
    assert layers == set(shapes)
    assert arch.out_features(variant) == {"resnet50": 2048}.get(variant, 512)
    assert "fc" not in arch.expected_shapes(variant, fc=False)


def test_table_refuses_unknown_names():
    with pytest.raises(ConfigError, match="unknown ResNet variant 'resnet101'"):
        arch.expected_shapes("resnet101")
    with pytest.raises(ConfigError, match="output_stride must be one of"):
        arch.grid("resnet18", 224, 224, output_stride=8)
    with pytest.raises(ConfigError, match="output_stride must be one of"):
        ResNet("resnet18", output_stride=8, rngs=nnx.Rngs(0))


SIZES = [(224, 224), (200, 264), (1, 1), (31, 33), (33, 31), (97, 512), (513, 129)]


@pytest.mark.parametrize("variant", ["resnet18", "resnet50"])
@pytest.mark.parametrize("output_stride", [32, 16])
def test_grid_is_the_feature_map_size(variant, output_stride):
    model = nnx.eval_shape(lambda: ResNet(variant, output_stride=output_stride, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    for h, w in SIZES:
        want = arch.grid(variant, h, w, output_stride)
        for c in (1, 3):
            x = jax.ShapeDtypeStruct((2, h, w, c), jnp.float32)
            got = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).forward_raw(x), state, x).shape
            assert got == (2, *want, arch.out_features(variant)), (h, w, c)
    # torch's arithmetic too (the reference computes no values on meta tensors)
    ref = TorchResNet(*REFERENCE[variant], dilate_layer4=output_stride == 16).to("meta").eval()
    for h, w in SIZES:
        out = ref.features(torch.empty((1, 3, h, w), device="meta"))
        assert tuple(out.shape[2:]) == arch.grid(variant, h, w, output_stride)


# -- against the reference -------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant,size",
    [
        ("resnet18", (224, 224)),
        ("resnet18", (200, 264)),
        ("resnet50", (224, 224)),
        ("resnet50", (200, 264)),
        ("resnet34", (160, 120)),
    ],
)
def test_logits_match_torch(saved, variant, size):
    ref, path = saved(variant)
    model = load(path)
    raw = images(1, *size)
    x = (raw - TV_MEAN.astype(np.float32)) / TV_STD.astype(np.float32)
    err = rel_err(logits_of(model, jnp.asarray(x)), torch_logits(ref, raw))
    assert err < TOL, err
    # the features through forward_raw (normalising itself) too
    err = rel_err(raw_features(model, jnp.asarray(raw)), torch_logits(ref, raw, features=True))
    assert err < TOL, err


@pytest.mark.parametrize("variant", ["resnet50", "resnet18"])
def test_output_stride_16_matches_dilated_torch(saved, variant):
    _, path = saved(variant)
    ref, _ = saved(variant, dilate=True)
    model = load(path, output_stride=16)
    assert model.stride == 16
    raw = images(2, 160, 208)
    ours = raw_features(model, jnp.asarray(raw))
    want = torch_logits(ref, raw, features=True)
    assert ours.shape == want.shape == (1, 10, 13, arch.out_features(variant))
    assert rel_err(ours, want) < TOL


def test_grey_is_folded_into_conv1_exactly(saved):
    _, path = saved("resnet18")
    model = load(path)
    grey = images(3, 75, 101, channels=1, n=2)
    folded = raw_features(model, jnp.asarray(grey))
    repeated = raw_features(model, jnp.asarray(np.repeat(grey, 3, axis=-1)))
    assert folded.shape == (2, 3, 4, 512)
    assert rel_err(folded, repeated) < 1e-5
    # normalised grey in __call__: conv1's kernel summed over its input channels
    g = jnp.asarray(grey[..., :1] * 2 - 1)
    assert rel_err(model(g), model(jnp.repeat(g, 3, axis=-1))) < 1e-5


def test_bfloat16_compute_is_close_to_float32(saved):
    _, path = saved("resnet18")
    f32_model = load(path)
    bf16_model = load(path, dtype=jnp.bfloat16)
    raw = jnp.asarray(images(4, 96, 128))
    out = raw_features(bf16_model, raw)
    assert out.dtype == jnp.bfloat16
    assert jax.tree.leaves(nnx.state(bf16_model, nnx.Param))[0].dtype == jnp.float32
    err = rel_err(out.astype(jnp.float32), raw_features(f32_model, raw))
    assert err < 5e-2, err
    grey = jnp.asarray(images(4, 96, 128, channels=1))
    err = rel_err(raw_features(bf16_model, grey).astype(jnp.float32), raw_features(f32_model, grey))
    assert err < 5e-2, err


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
@pytest.mark.parametrize("variant,output_stride", [("resnet18", 16), ("resnet50", 32)])
def test_every_parameter_gradient_matches_torch(saved, variant, output_stride, monkeypatch):
    """The gradient of every convolution kernel and batch-norm scale and bias, against torch's
    autograd through the reference in eval mode (batch norm on its running statistics).

    Both networks' ReLUs become softplus here. With ReLU, rounding that puts one pre-activation
    on the other side of the kink in one framework and not the other moves every gradient below
    it (measured: 2.6% in ResNet-50's layer2 at 72x88, where torch's float32 agrees with its
    float64 to 1e-6); what is under test is the wiring of convolutions, batch norms, strides,
    dilations and shortcuts, which a smooth activation leaves in place.
    """
    monkeypatch.setattr(nnx, "relu", jax.nn.softplus)
    monkeypatch.setattr(torch, "relu", torch.nn.functional.softplus)
    _, path = saved(variant)
    ref, _ = saved(variant, dilate=output_stride == 16)
    model = load(path, output_stride=output_stride)
    model.fc = None  # not in the features
    x = ((images(6, 72, 88, n=2) - TV_MEAN) / TV_STD).astype(np.float32)
    out = ref.features(torch.from_numpy(x).permute(0, 3, 1, 2))
    g = np.random.default_rng(7).normal(size=out.shape).astype(np.float32)
    ref.zero_grad()
    (out * torch.from_numpy(g)).sum().backward()
    want = {name: p.grad.numpy() for name, p in ref.named_parameters() if p.grad is not None}

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    g_nhwc = jnp.asarray(g.transpose(0, 2, 3, 1))

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(jnp.asarray(x)) * g_nhwc)

    grads = jax.jit(jax.grad(loss))(params)
    torch_kind = {"kernel": "weight", "scale": "weight", "bias": "bias"}
    for path_, grad in nnx.to_flat_state(grads):
        name = ".".join(map(str, path_[:-1])) + "." + torch_kind[path_[-1]]
        got = np.asarray(grad[...])
        if got.ndim == 4:  # HWIO -> torch's OIHW
            got = got.transpose(3, 2, 0, 1)
        # the stem's: below the max pool, where two nearly equal maxima may swap (one of the
        # ~10^5 windows moves its gradient to a neighbour, about 1e-3 of the largest)
        tol = 1e-4 if name.startswith("layer") else 1e-2
        assert rel_err(got, want.pop(name)) < tol, name
    assert not want  # every parameter compared


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
def test_batch_norm_is_frozen(saved):
    _, path = saved("resnet18")
    model = load(path)
    stats = nnx.state(model, nnx.BatchStat)
    params = nnx.state(model, nnx.Param)
    assert len(jax.tree.leaves(stats)) == 2 * 20  # mean and var of each of the 20 batch norms
    assert len(jax.tree.leaves(params)) == 20 + 2 * 20 + 2  # kernels, bn scale/bias, fc
    raw = jnp.asarray(images(5, 64, 64, n=2))
    before = raw_features(model, raw)
    model.train()  # no batch statistics in training mode either

    def loss(m):
        return m.forward_raw(raw).mean()

    grads = nnx.grad(loss)(model)
    assert not jax.tree.leaves(nnx.state(grads, nnx.BatchStat))
    np.testing.assert_array_equal(raw_features(model, raw), before)
    after = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    for a, b in zip(after, jax.tree.leaves(stats), strict=True):
        np.testing.assert_array_equal(a, b)


def test_from_converted_without_fc_and_refusals(saved):
    _, path = saved("resnet18")
    params, variant = read_torchvision_resnet(path)
    assert variant == "resnet18"
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
    assert params["fc"]["kernel"].shape == (512, 1000)
    assert set(params["layer2.0.bn1"]) == {"scale", "bias", "mean", "var"}
    validate_resnet(params, variant, "x")
    features_only = {k: v for k, v in params.items() if k != "fc"}
    meta = {"variant": variant, "normalization": "torchvision"}
    model = ResNet.from_converted(features_only, meta)
    assert model.fc is None and model.out_features == 512 and model.variant == "resnet18"
    with pytest.raises(ConfigError, match="without its classifier"):
        model.classify(jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(WeightsError, match="normalization"):
        ResNet.from_converted(features_only, {"variant": variant, "normalization": "caffe"})
    broken = dict(features_only)
    del broken["layer3.1.bn2"]
    with pytest.raises(WeightsError, match="no layer 'layer3.1.bn2'"):
        ResNet.from_converted(broken, meta)
    with pytest.raises(WeightsError, match="layer 'layer3.1.bn2' is missing"):
        validate_resnet(broken, variant, "x")
    broken = dict(features_only, conv1={"kernel": np.zeros((7, 7, 1, 64), np.float32)})
    with pytest.raises(WeightsError, match=r"conv1 kernel has shape \(7, 7, 1, 64\)"):
        ResNet.from_converted(broken, meta)
    with pytest.raises(WeightsError, match="conv1' kernel has shape"):
        validate_resnet(broken, variant, "x")


# -- the reader's refusals -------------------------------------------------------------------


def _state(variant="resnet18"):
    return TorchResNet(*REFERENCE[variant]).state_dict()


def _refused(tmp_path, obj, match, name="bad.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    with pytest.raises(WeightsError, match=match) as info:
        read_torchvision_resnet(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_reader_unwraps_and_refuses(tmp_path, saved):
    _, path = saved("resnet18")
    good = torch.load(path, weights_only=True)
    # a training checkpoint's {"state_dict": ...} with DataParallel's "module." prefixes
    wrapped = {"state_dict": {f"module.{k}": v for k, v in good.items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    params, variant = read_torchvision_resnet(tmp_path / "wrapped.pth")
    ref, _ = read_torchvision_resnet(path)
    assert variant == "resnet18"
    np.testing.assert_array_equal(params["layer4.1.bn2"]["var"], ref["layer4.1.bn2"]["var"])

    raw = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightsError, match="cannot be read as a PyTorch state_dict") as info:
        read_torchvision_resnet(tmp_path / "cut.pth")
    assert "\n" not in str(info.value)
    with pytest.raises(WeightsError, match="is a folder"):
        read_torchvision_resnet(tmp_path)
    with pytest.raises(WeightsError, match="no such file"):
        read_torchvision_resnet(tmp_path / "absent.pth")
    _refused(tmp_path, [torch.zeros(3)], "holds a list, not a state_dict")
    _refused(tmp_path, nn.Linear(2, 2), "cannot be read")  # a pickled module, not weights

    state = dict(good)
    del state["layer2.0.downsample.1.running_var"]
    _refused(tmp_path, state, "key 'layer2.0.downsample.1.running_var' is missing")
    state = dict(good, **{"layer3.0.conv2.weight": torch.zeros(256, 256, 1, 1)})
    _refused(tmp_path, state, r"'layer3.0.conv2.weight' has shape \(256, 256, 1, 1\), expected")
    state = dict(good, **{"fc.weight": torch.zeros(2, 512)})
    _refused(tmp_path, state, r"'fc.weight' has shape \(2, 512\)")
    bad = good["layer1.1.bn1.weight"].clone()
    bad[3] = float("nan")
    _refused(tmp_path, dict(good, **{"layer1.1.bn1.weight": bad}), "NaN or infinite")
    bad = good["layer4.0.conv1.weight"].clone()
    bad[0, 0, 0, 0] = float("inf")
    _refused(tmp_path, dict(good, **{"layer4.0.conv1.weight": bad}), "NaN or infinite")
    _refused(
        tmp_path,
        dict(good, **{"bn1.running_var": -torch.ones(64)}),
        "'bn1.running_var' holds negative variances",
    )
    _refused(tmp_path, dict(good, **{"layer1.0.se.weight": torch.zeros(3)}), "modified ResNet")
    _refused(tmp_path, {"features.0.weight": torch.zeros(3)}, "is this torchvision's ResNet")
    state = {k: v for k, v in good.items() if not k.startswith("layer4.1.")}
    _refused(tmp_path, state, r"basic blocks \(2, 2, 2, 1\) per stage is not one we know")
    # a torch.save'd bfloat16 copy reads (converted to float32)
    torch.save(
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in good.items()},
        tmp_path / "bf16.pth",
    )
    params, _ = read_torchvision_resnet(tmp_path / "bf16.pth")
    assert params["conv1"]["kernel"].dtype == np.float32


def test_reader_tells_the_variants(tmp_path):
    for variant in ("resnet34", "resnet50"):
        torch.save(_state(variant), tmp_path / f"{variant}.pth")
        params, got = read_torchvision_resnet(tmp_path / f"{variant}.pth")
        assert got == variant
        assert set(params) == set(arch.expected_shapes(variant))
