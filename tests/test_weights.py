"""Weight conversion: each real file format, written with random values, against an independent
forward pass (torch for torchvision and Caffe's bvlc_alexnet.npy, numpy/scipy implementing
Theano's true convolution and convnets-keras' LRN for the Keras h5 file)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

from deepmil_jax import weights
from deepmil_jax.errors import ConfigError, WeightsError
from deepmil_jax.models import AlexNet, AlexNetClassifier, build_model

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4  # max |ours - reference| / max |reference|
SIZES = (227, 291)

# Per-source input normalisation, written out here independently of the package.
KERAS_MEAN_RGB = np.array([123.68, 116.779, 103.939])
CAFFE_MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434])
TV_MEAN = np.array([0.485, 0.456, 0.406])
TV_STD = np.array([0.229, 0.224, 0.225])


def load_alexnet(out: Path) -> AlexNet:
    """The AlexNet features of a converted folder (the program's way: read, then build)."""
    return AlexNet.from_converted(*weights.load_converted(out, fc=False))


@nnx.jit
def forward_raw(model: AlexNet, raw):
    return model.forward_raw(raw)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def he(rng, shape, fan_in) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def images(seed: int, size: int, channels: int, n: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, channels), dtype=np.float32)


def grey_and_rgb(size: int) -> list[np.ndarray]:
    """Raw test inputs on [0, 1]: a grey image, and an RGB image at 227 (checks the BGR order)."""
    out = [images(size, size, 1, n=1)]
    if size == 227:
        out.append(images(1, size, 3, n=1))
    return out


# ------------------------------------------------------------------ references


def theano_conv(x: np.ndarray, w: np.ndarray, stride: int = 1, groups: int = 1) -> np.ndarray:
    """Theano ``conv2d(x, w, subsample=stride)``, valid mode: a TRUE convolution.

    Computed by the convolution theorem (the product of Fourier transforms is the full linear
    convolution ``y[n] = sum_k x[k] w[n - k]``), then cropped to the valid part and summed over
    input channels, as Theano does; no kernel flip is written anywhere here.
    x (C, H, W), w (O, C/groups, kh, kw) -> (O, H', W'); float64.
    """
    c, h, wd = x.shape
    kh, kw = w.shape[2:]
    full = (h + kh - 1, wd + kw - 1)
    xf = np.fft.rfft2(x.astype(np.float64), full)  # (C, ...)
    outs = []
    for xg, wg in zip(np.split(xf, groups), np.split(w, groups), strict=True):
        for o in range(0, wg.shape[0], 32):  # bound memory
            wf = np.fft.rfft2(wg[o : o + 32].astype(np.float64), full)  # (o, C/groups, ...)
            y = np.fft.irfft2(np.einsum("ocij,cij->oij", wf, xg), full)
            outs.append(y[:, kh - 1 : h, kw - 1 : wd])
    return np.concatenate(outs, axis=0)[:, ::stride, ::stride]


def np_maxpool(x: np.ndarray) -> np.ndarray:
    """3x3 stride 2 valid max pooling of (C, H, W)."""
    win = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))
    return win[:, ::2, ::2].max(axis=(-2, -1))


def keras_lrn(x: np.ndarray, alpha=1e-4, k=2.0, beta=0.75, n=5) -> np.ndarray:
    """convnets-keras crosschannelnormalization on (C, H, W)."""
    half = n // 2
    sq = np.pad(x**2, ((half, half), (0, 0), (0, 0)))
    scale = k + alpha * sum(sq[i : i + x.shape[0]] for i in range(n))
    return x / scale**beta


def keras_alexnet_reference(img: np.ndarray, layers: dict) -> tuple[np.ndarray, np.ndarray]:
    """convnets-keras AlexNet on one normalised (3, H, W) image: (features (256, h, w), fc7)."""
    relu = lambda a: np.maximum(a, 0)  # noqa: E731

    def conv(x, name, stride=1, pad=0, groups=1):
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
        w, b = layers[name]
        return relu(theano_conv(x, w, stride, groups) + b[:, None, None])

    x = conv(img, "conv_1", stride=4)
    x = keras_lrn(np_maxpool(x))
    x = conv(x, "conv_2", pad=2, groups=2)
    x = keras_lrn(np_maxpool(x))
    x = conv(x, "conv_3", pad=1)
    x = conv(x, "conv_4", pad=1, groups=2)
    x = conv(x, "conv_5", pad=1, groups=2)
    feats = np_maxpool(x)
    fc7 = None
    if feats.shape[1:] == (6, 6) and "dense_1" in layers:
        h = relu(feats.reshape(-1) @ layers["dense_1"][0] + layers["dense_1"][1])  # Theano: CHW
        fc7 = relu(h @ layers["dense_2"][0] + layers["dense_2"][1])
    return feats, fc7


class TorchvisionAlexNet(torch.nn.Module):
    """torchvision.models.alexnet's layers with its module indices (so its state_dict keys)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(256 * 36, 4096),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Linear(4096, 1000),
        )


def caffe_npy_reference(x: torch.Tensor, layers: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """BVLC AlexNet (Caffe layer order: conv, relu, LRN, pool) in torch on NCHW BGR input."""

    def conv(x, name, stride=1, pad=0, groups=1):
        w, b = layers[name]
        w = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).double()  # HWIO -> OIHW
        return F.relu(F.conv2d(x, w, torch.from_numpy(b).double(), stride, pad, groups=groups))

    def lrn(x):  # torch's LRN is Caffe's: alpha / n, k = 1
        return F.local_response_norm(x, size=5, alpha=1e-4, beta=0.75, k=1.0)

    x = F.max_pool2d(lrn(conv(x, "conv1", stride=4)), 3, 2)
    x = F.max_pool2d(lrn(conv(x, "conv2", pad=2, groups=2)), 3, 2)
    x = conv(x, "conv3", pad=1)
    x = conv(x, "conv4", pad=1, groups=2)
    x = F.max_pool2d(conv(x, "conv5", pad=1, groups=2), 3, 2)
    fc7 = None
    if x.shape[2:] == (6, 6):
        flat = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # TensorFlow's NHWC flatten
        fc = {k: [torch.from_numpy(a).double() for a in layers[k]] for k in ("fc6", "fc7")}
        h = F.relu(flat @ fc["fc6"][0] + fc["fc6"][1])
        fc7 = F.relu(h @ fc["fc7"][0] + fc["fc7"][1])
    return x, fc7


# ------------------------------------------------------------------ random weight files


def write_keras_h5(path: Path, seed: int = 0, *, fc: bool = True, skip=(), shapes=None) -> dict:
    """A Keras 1 / Theano weights file in convnets-keras' alexnet_weights.h5 structure."""
    rng = np.random.default_rng(seed)
    spec = {
        "conv_1": (96, 3, 11, 11),
        "conv_2_1": (128, 48, 5, 5),
        "conv_2_2": (128, 48, 5, 5),
        "conv_3": (384, 256, 3, 3),
        "conv_4_1": (192, 192, 3, 3),
        "conv_4_2": (192, 192, 3, 3),
        "conv_5_1": (128, 192, 3, 3),
        "conv_5_2": (128, 192, 3, 3),
    }
    if fc:
        spec |= {"dense_1": (9216, 4096), "dense_2": (4096, 4096)}
    spec |= shapes or {}
    layer_names = [
        "input_1", "conv_1", "maxpooling2d_1", "convpool_1", "zeropadding2d_1", "lambda_1",
        "lambda_2", "conv_2_1", "conv_2_2", "conv_2", "maxpooling2d_2", "lambda_3",
        "zeropadding2d_2", "conv_3", "zeropadding2d_3", "lambda_4", "lambda_5", "conv_4_1",
        "conv_4_2", "conv_4", "zeropadding2d_4", "lambda_6", "lambda_7", "conv_5_1", "conv_5_2",
        "conv_5", "convpool_5", "flatten", "dense_1", "dropout_1", "dense_2", "dropout_2",
        "dense_3", "softmax",
    ]  # fmt: skip
    layers = {}
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in layer_names if n not in skip]
        f.attrs["backend"] = b"theano"
        f.attrs["keras_version"] = b"1.1.0"
        for name in layer_names:
            if name in skip:
                continue
            g = f.create_group(name)
            if name not in spec:
                g.attrs["weight_names"] = np.array([], dtype="S1")
                continue
            shape = spec[name]
            fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else shape[0]
            w = he(rng, shape, fan_in)
            b = (0.1 * rng.standard_normal(shape[0] if len(shape) == 4 else shape[1])).astype(
                np.float32
            )
            g.attrs["weight_names"] = [f"{name}_W".encode(), f"{name}_b".encode()]
            g.create_dataset(f"{name}_W", data=w)
            g.create_dataset(f"{name}_b", data=b)
            layers[name] = (w, b)
    for merged in ("conv_2", "conv_4", "conv_5"):  # the reference runs each group on its half
        if f"{merged}_1" in layers and f"{merged}_2" in layers and not shapes:
            layers[merged] = tuple(
                np.concatenate([layers[f"{merged}_1"][i], layers[f"{merged}_2"][i]])
                for i in range(2)
            )
    return layers


def caffe_layers(seed: int = 0, *, fc: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    shapes = {
        "conv1": (11, 11, 3, 96),
        "conv2": (5, 5, 48, 256),
        "conv3": (3, 3, 256, 384),
        "conv4": (3, 3, 192, 384),
        "conv5": (3, 3, 192, 256),
    }
    if fc:
        shapes |= {"fc6": (9216, 4096), "fc7": (4096, 4096), "fc8": (4096, 1000)}
    return {
        k: [
            he(rng, s, int(np.prod(s[:-1]))),
            (0.1 * rng.standard_normal(s[-1])).astype(np.float32),
        ]
        for k, s in shapes.items()
    }


def torchvision_model(seed: int = 0) -> TorchvisionAlexNet:
    torch.manual_seed(seed)
    model = TorchvisionAlexNet().double().eval()
    with torch.no_grad():  # larger biases than torch's default init, so no layer is trivial
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def keras_case(workdir):
    src = workdir / "alexnet_weights.h5"
    layers = write_keras_h5(src)
    out = weights.convert("keras_h5", src, workdir / "keras_out")
    return layers, out


@pytest.fixture(scope="module")
def caffe_case(workdir):
    layers = caffe_layers()
    src = workdir / "bvlc_alexnet.npy"
    np.save(src, layers, allow_pickle=True)
    out = weights.convert("caffe_npy", src, workdir / "caffe_out")
    return layers, out


@pytest.fixture(scope="module")
def torchvision_case(workdir):
    model = torchvision_model()
    src = workdir / "alexnet-owt-test.pth"
    torch.save({k: v.float() for k, v in model.state_dict().items()}, src)
    out = weights.convert("torchvision", src, workdir / "tv_out")
    return model, out


# ------------------------------------------------------------------ the Theano flip


def test_theano_kernel_flip_matches_true_convolution():
    """A Theano conv layer, converted, equals scipy's true convolution; unflipped it does not."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 17, 19))
    w = rng.standard_normal((4, 3, 5, 3))  # asymmetric, non-square kernel
    ref = np.stack(
        [
            sum(scipy.signal.convolve2d(x[0, c], w[o, c], mode="valid") for c in range(3))
            for o in range(4)
        ]
    )  # (O, H', W'): Theano's conv2d, by its definition

    def ours(kernel_hwio):
        y = lax.conv_general_dilated(
            jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32),
            jnp.asarray(kernel_hwio, jnp.float32),
            (1, 1),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return np.asarray(y)[0].transpose(2, 0, 1)

    assert rel_err(ours(weights.theano_kernel_to_hwio(w)), ref) < 1e-5
    assert rel_err(ours(w.transpose(2, 3, 1, 0)), ref) > 0.1  # forgetting the flip is caught


# ------------------------------------------------------------------ end to end, per format


@pytest.mark.parametrize("size", SIZES)
def test_keras_h5_matches_theano_reference(keras_case, size):
    layers, out = keras_case
    model = load_alexnet(out)
    assert (model.variant, model.lrn, model.normalization) == ("caffe", "keras", "keras")
    for raw in grey_and_rgb(size):
        ours = np.asarray(forward_raw(model, jnp.asarray(raw)))
        rgb = np.broadcast_to(raw, (*raw.shape[:3], 3)) * 255.0 - KERAS_MEAN_RGB  # RGB order
        for i in range(raw.shape[0]):
            ref, _ = keras_alexnet_reference(rgb[i].transpose(2, 0, 1), layers)
            assert ours[i].shape == ref.transpose(1, 2, 0).shape
            err = rel_err(ours[i], ref.transpose(1, 2, 0))
            print(f"keras_h5 size={size} channels={raw.shape[-1]} max rel diff {err:.2e}")
            assert err < TOL


@pytest.mark.parametrize("size", SIZES)
def test_caffe_npy_matches_torch_reference(caffe_case, size):
    layers, out = caffe_case
    model = load_alexnet(out)
    assert (model.variant, model.lrn, model.normalization) == ("caffe", "caffe", "caffe")
    for raw in grey_and_rgb(size):
        ours = np.asarray(forward_raw(model, jnp.asarray(raw)))
        rgb = np.broadcast_to(raw, (*raw.shape[:3], 3)).astype(np.float64)
        bgr = rgb[..., ::-1] * 255.0 - CAFFE_MEAN_BGR
        ref, _ = caffe_npy_reference(torch.from_numpy(bgr.transpose(0, 3, 1, 2).copy()), layers)
        err = rel_err(ours, ref.numpy().transpose(0, 2, 3, 1))
        print(f"caffe_npy size={size} channels={raw.shape[-1]} max rel diff {err:.2e}")
        assert err < TOL


@pytest.mark.parametrize("size", SIZES)
def test_torchvision_matches_torch(torchvision_case, size):
    tv, out = torchvision_case
    model = load_alexnet(out)
    assert (model.variant, model.lrn, model.normalization) == ("torchvision", None, "torchvision")
    for raw in grey_and_rgb(size):
        ours = np.asarray(forward_raw(model, jnp.asarray(raw)))
        rgb = np.broadcast_to(raw, (*raw.shape[:3], 3)).astype(np.float64)
        x = torch.from_numpy(((rgb - TV_MEAN) / TV_STD).transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            ref = tv.features(x).numpy().transpose(0, 2, 3, 1)
        err = rel_err(ours, ref)
        print(f"torchvision size={size} channels={raw.shape[-1]} max rel diff {err:.2e}")
        assert err < TOL


@nnx.jit
def _fc7(clf: AlexNetClassifier, raw):
    feats = clf.backbone.forward_raw(raw)
    return nnx.relu(clf.fc7(nnx.relu(clf.fc6(feats.reshape(feats.shape[0], -1)))))


def fc7_of(clf: AlexNetClassifier, raw: np.ndarray) -> np.ndarray:
    return np.asarray(_fc7(clf, jnp.asarray(raw)))


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
def test_fully_connected_layers_match(keras_case, caffe_case, torchvision_case):
    """fc6/fc7 (with fc6's rows reordered from (C, H, W) flattens) against each reference."""
    raw = images(7, 227, 1, n=1)
    rgb = np.broadcast_to(raw, (1, 227, 227, 3)).astype(np.float64)

    layers, out = keras_case
    clf = build_model("alexnet", pretrained=weights.load_converted(out), rngs=nnx.Rngs(0))
    _, ref = keras_alexnet_reference((rgb[0] * 255.0 - KERAS_MEAN_RGB).transpose(2, 0, 1), layers)
    err = rel_err(fc7_of(clf, raw)[0], ref)
    print(f"keras_h5 fc7 max rel diff {err:.2e}")
    assert err < TOL

    layers, out = caffe_case
    clf = AlexNetClassifier.from_converted(*weights.load_converted(out), rngs=nnx.Rngs(0))
    bgr = (rgb[..., ::-1] * 255.0 - CAFFE_MEAN_BGR).transpose(0, 3, 1, 2).copy()
    _, ref = caffe_npy_reference(torch.from_numpy(bgr), layers)
    err = rel_err(fc7_of(clf, raw), ref.numpy())
    print(f"caffe_npy fc7 max rel diff {err:.2e}")
    assert err < TOL

    tv, out = torchvision_case
    pretrained = weights.load_converted(out)
    clf = build_model("alexnet", backbone="torchvision", pretrained=pretrained, rngs=nnx.Rngs(0))
    x = torch.from_numpy(((rgb - TV_MEAN) / TV_STD).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        ref = tv.classifier[:6](torch.flatten(tv.avgpool(tv.features(x)), 1)).numpy()
    err = rel_err(fc7_of(clf, raw), ref)
    print(f"torchvision fc7 max rel diff {err:.2e}")
    assert err < TOL


def test_metadata_and_checkpoint_layout(keras_case, torchvision_case):
    _, out = keras_case
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["variant"] == "caffe"
    assert meta["source"] == "keras_h5"
    assert meta["input_file"] == "alexnet_weights.h5"
    assert meta["normalization"] == "keras"
    assert meta["lrn"] == "keras"
    params, _ = weights.load_converted(out)
    assert params["conv2"]["kernel"].shape == (5, 5, 48, 256)
    assert params["fc6"]["kernel"].shape == (9216, 4096)
    assert "fc8" not in params
    _, out = torchvision_case
    meta = json.loads((out / "metadata.json").read_text())
    assert (meta["variant"], meta["normalization"], meta["lrn"]) == (
        "torchvision",
        "torchvision",
        None,
    )


def test_build_model_refuses_a_backbone_that_does_not_match(torchvision_case):
    _, out = torchvision_case
    pretrained = weights.load_converted(out, fc=False)
    with pytest.raises(ConfigError, match="backbone='torchvision'"):
        build_model("max_pooling", backbone="caffe", pretrained=pretrained, rngs=nnx.Rngs(0))
    model = build_model("sparse", backbone="torchvision", pretrained=pretrained, rngs=nnx.Rngs(0))
    loaded = load_alexnet(out)
    np.testing.assert_array_equal(model.backbone.conv3.kernel[...], loaded.conv3.kernel[...])
    # every backbone array equals the file's
    params, _ = weights.load_converted(out)
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        for kind in ("kernel", "bias"):
            got = getattr(getattr(model.backbone, name), kind)[...]
            np.testing.assert_array_equal(got, params[name][kind])


def test_train_init_imagenet_loads_the_converted_arrays(keras_case, torchvision_case):
    """--init=imagenet:PATH: steps.create_model reads the folder and the model holds its arrays."""
    import dataclasses

    from deepmil_jax import config as config_module
    from deepmil_jax import steps

    for (_, out), backbone, scheme in (
        (keras_case, "caffe", "alexnet"),
        (torchvision_case, "torchvision", "label_assign"),
        (torchvision_case, "torchvision", "gated_attention"),  # attention weights start fresh
    ):
        config = dataclasses.replace(
            config_module.Config(), scheme=scheme, backbone=backbone, init=f"imagenet:{out}"
        )
        model = steps.create_model(config, nnx.Rngs(0))
        params, meta = weights.load_converted(out)
        assert model.backbone.normalization == meta["normalization"]
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
            for kind in ("kernel", "bias"):
                got = getattr(getattr(model.backbone, name), kind)[...]
                np.testing.assert_array_equal(got, params[name][kind])
        if scheme == "alexnet":
            np.testing.assert_array_equal(model.fc6.kernel[...], params["fc6"]["kernel"])


# ------------------------------------------------------------------ safe .npy reading


def test_caffe_npy_reader_handles_python2_style_bytes_keys(tmp_path):
    layers = {k.encode(): v for k, v in caffe_layers(1, fc=False).items()}
    src = tmp_path / "bvlc_alexnet.npy"
    np.save(src, layers, allow_pickle=True)
    params = weights.read_caffe_npy(src)
    np.testing.assert_array_equal(params["conv4"]["kernel"], layers[b"conv4"][0])


class _Evil:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval"])
def test_malicious_pickle_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = _Evil(f"touch {marker}") if payload == "os.system" else _EvalEvil()
    src = tmp_path / "bvlc_alexnet.npy"
    np.save(src, np.array({"conv1": [evil, evil]}, dtype=object), allow_pickle=True)
    with pytest.raises(WeightsError, match="refusing to load global"):
        weights.read_caffe_npy(src)
    with pytest.raises(WeightsError):
        weights.load_npy_pickle_safely(src)
    assert not marker.exists()
    # the stream did name the dangerous callable (the test is not vacuous)
    assert b"system" in src.read_bytes() or b"eval" in src.read_bytes()


def test_restricted_unpickler_still_reads_plain_containers():
    data = pickle.dumps({"a": [np.arange(3, dtype=np.float32), (1, 2.5, "x")]}, protocol=2)
    import io

    got = weights.RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    np.testing.assert_array_equal(got["a"][0], np.arange(3, dtype=np.float32))
    assert got["a"][1] == (1, 2.5, "x")


# ------------------------------------------------------------------ error messages


def test_keras_missing_layer_names_it(tmp_path):
    src = tmp_path / "alexnet_weights.h5"
    write_keras_h5(src, fc=False, skip=("conv_3",))
    with pytest.raises(WeightsError, match=r"'conv_3' is missing.*\(384, 256, 3, 3\)"):
        weights.read_weights("keras_h5", src)


def test_keras_wrong_shape_names_layer_and_expected_shape(tmp_path):
    src = tmp_path / "alexnet_weights.h5"
    write_keras_h5(src, fc=False, shapes={"conv_4_2": (192, 384, 3, 3)})
    with pytest.raises(
        WeightsError, match=r"'conv_4_2' kernel.*\(192, 384, 3, 3\).*\(192, 192, 3, 3\)"
    ):
        weights.read_weights("keras_h5", src)


def test_caffe_npy_wrong_shape_and_missing_layer(tmp_path):
    layers = caffe_layers(2, fc=False)
    layers["conv2"][0] = np.zeros((5, 5, 96, 256), np.float32)  # ungrouped
    src = tmp_path / "bvlc_alexnet.npy"
    np.save(src, layers, allow_pickle=True)
    with pytest.raises(
        WeightsError, match=r"'conv2' W has shape \(5, 5, 96, 256\), expected \(5, 5, 48, 256\)"
    ):
        weights.read_weights("caffe_npy", src)
    del layers["conv5"]
    layers["conv2"][0] = np.zeros((5, 5, 48, 256), np.float32)
    np.save(src, layers, allow_pickle=True)
    with pytest.raises(WeightsError, match=r"'conv5' is missing.*\(3, 3, 192, 256\)"):
        weights.read_weights("caffe_npy", src)


def test_torchvision_missing_and_misshaped_keys(tmp_path):
    state = {k: v.float() for k, v in torchvision_model(1).state_dict().items()}
    src = tmp_path / "alexnet.pth"
    torch.save({k: v for k, v in state.items() if k != "features.6.weight"}, src)
    with pytest.raises(WeightsError, match=r"'features.6.weight' is missing.*\(384, 192, 3, 3\)"):
        weights.read_weights("torchvision", src)
    state["features.8.bias"] = torch.zeros(255)
    torch.save(state, src)
    with pytest.raises(
        WeightsError, match=r"'features.8.bias' has shape \(255,\), expected \(256,\)"
    ):
        weights.read_weights("torchvision", src)


def test_a_complex_tensor_is_refused_not_cast_to_its_real_part(tmp_path):
    """torch casts complex to float32 with only a warning, dropping the imaginary part."""
    state = {k: v.float() for k, v in torchvision_model(1).state_dict().items()}
    state["features.3.weight"] = state["features.3.weight"].to(torch.complex64) * (1 + 1j)
    src = tmp_path / "alexnet.pth"
    torch.save(state, src)
    with pytest.raises(WeightsError, match=r"alexnet.pth: key 'features.3.weight' is a torch"):
        weights.read_weights("torchvision", src)


def test_wrong_file_for_format(tmp_path):
    npy = tmp_path / "bvlc_alexnet.npy"
    np.save(npy, caffe_layers(3, fc=False), allow_pickle=True)
    with pytest.raises(WeightsError, match="not an HDF5 file"):
        weights.read_weights("keras_h5", npy)
    with pytest.raises(WeightsError, match="state_dict"):
        weights.read_weights("torchvision", npy)
    h5 = tmp_path / "x.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("a", data=np.zeros(3))
    with pytest.raises(WeightsError, match="not a .npy file"):
        weights.read_weights("caffe_npy", h5)
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros(3))
    with pytest.raises(WeightsError, match="not a pickled dict"):
        weights.read_weights("caffe_npy", plain)
    with pytest.raises(WeightsError, match="no such file"):
        weights.read_weights("caffe_npy", tmp_path / "missing.npy")
    with pytest.raises(ConfigError, match="unknown weights format"):
        weights.read_weights("onnx", npy)


@pytest.mark.parametrize("fmt", ["torchvision", "torchvision_resnet", "efficientnet_lite"])
def test_torch_not_installed_gives_a_clear_error(tmp_path, monkeypatch, fmt):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    path = tmp_path / "weights.pth"
    with pytest.raises(WeightsError, match=r"weights.pth: reading .* needs PyTorch.*\[torch\]"):
        weights.read_weights(fmt, path)


def test_load_converted_refuses_other_folders(tmp_path):
    with pytest.raises(WeightsError, match="not a convert_weights output"):
        weights.load_converted(tmp_path)


# ------------------------------------------------------------------ output folder and CLI


def test_refuses_non_empty_output_unless_overwrite(tmp_path):
    src = tmp_path / "bvlc_alexnet.npy"
    np.save(src, caffe_layers(4, fc=False), allow_pickle=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="--overwrite"):
        weights.convert("caffe_npy", src, out)
    weights.convert("caffe_npy", src, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    weights.convert("caffe_npy", src, out, overwrite=True)  # a second overwrite replaces params/
    params, meta = weights.load_converted(out)
    assert meta["source"] == "caffe_npy"
    assert sorted(params) == ["conv1", "conv2", "conv3", "conv4", "conv5"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deepmil_jax.convert_weights", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_cli_help_explains_the_formats():
    proc = run_cli("--help")  # absl exits with status 1 after printing the help
    for word in ("keras_h5", "caffe_npy", "torchvision", "alexnet_weights.h5", "bvlc_alexnet.npy",
                 "alexnet-owt", "--overwrite"):  # fmt: skip
        assert word in proc.stdout


@pytest.mark.slow  # over 5 s on 2 idle cores, or spawns/kills processes
def test_cli_converts_and_reports_errors(tmp_path):
    src = tmp_path / "alexnet_weights.h5"
    layers = write_keras_h5(src, fc=False)
    out = tmp_path / "converted"
    proc = run_cli("--format=keras_h5", f"--input={src}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr
    params, meta = weights.load_converted(out)
    assert meta["source"] == "keras_h5"
    np.testing.assert_array_equal(
        params["conv1"]["kernel"], layers["conv_1"][0][:, :, ::-1, ::-1].transpose(2, 3, 1, 0)
    )
    proc = run_cli("--format=keras_h5", f"--input={src}", f"--output={out}")
    assert proc.returncode == 1
    assert "--overwrite" in proc.stderr
    proc = run_cli("--format=caffe_npy", f"--input={src}", f"--output={tmp_path / 'o2'}")
    assert proc.returncode == 1
    assert "not a .npy file" in proc.stderr


# ----------------------------------------------------------------------------- damaged files


class _NotAllowed:
    """A class that torch.load(weights_only=True) must refuse to rebuild."""


def test_keras_layer_that_is_a_dataset_is_refused(tmp_path):
    src = tmp_path / "alexnet_weights.h5"
    write_keras_h5(src, fc=False)
    with h5py.File(src, "a") as f:
        del f["conv_3"]
        f.create_dataset("conv_3", data=np.zeros(3, np.float32))
    with pytest.raises(WeightsError, match=r"'conv_3' is a Dataset, not a layer group"):
        weights.read_weights("keras_h5", src)


def test_keras_dangling_weight_name_is_refused(tmp_path):
    src = tmp_path / "alexnet_weights.h5"
    write_keras_h5(src, fc=False)
    with h5py.File(src, "a") as f:
        f["conv_4_2"].attrs["weight_names"] = [b"conv_4_2_W", b"conv_4_2_gone"]
    with pytest.raises(WeightsError, match=r"'conv_4_2' lists weight 'conv_4_2_gone'.*not exist"):
        weights.read_weights("keras_h5", src)


def test_nan_and_inf_weights_are_refused_naming_the_layer(tmp_path):
    src = tmp_path / "alexnet_weights.h5"
    write_keras_h5(src, fc=False)
    with h5py.File(src, "a") as f:
        f["conv_5_1"]["conv_5_1_W"][3, 2, 1, 0] = np.nan
    with pytest.raises(WeightsError, match=r"'conv_5_1' kernel holds 1 NaN or infinite"):
        weights.read_weights("keras_h5", src)

    layers = caffe_layers(5, fc=False)
    layers["conv3"][1][7] = np.inf
    npy = tmp_path / "bvlc_alexnet.npy"
    np.save(npy, layers, allow_pickle=True)
    with pytest.raises(WeightsError, match=r"'conv3' b holds 1 NaN or infinite"):
        weights.read_weights("caffe_npy", npy)

    state = {k: v.float() for k, v in torchvision_model(6).features.state_dict().items()}
    state = {f"features.{k}": v for k, v in state.items()}
    state["features.8.weight"][0, 0, 0, :2] = float("-inf")
    pth = tmp_path / "alexnet.pth"
    torch.save(state, pth)
    with pytest.raises(WeightsError, match=r"'features.8.weight' holds 2 NaN or infinite"):
        weights.read_weights("torchvision", pth)


def test_torch_load_error_gives_the_whole_cause_on_one_line(tmp_path):
    pth = tmp_path / "alexnet.pth"
    torch.save({"features.0.weight": _NotAllowed()}, pth)
    with pytest.raises(WeightsError) as info:
        weights.read_weights("torchvision", pth)
    message = str(info.value)
    assert "Unsupported global" in message and "_NotAllowed was not an allowed global" in message
    assert "\n" not in message and "\x1b" not in message
    assert "weights_only` set to `False`" not in message  # torch's advice to run the file's code


def test_cli_damaged_h5_gives_one_line(tmp_path):
    src = tmp_path / "alexnet_weights.h5"
    write_keras_h5(src, fc=False)
    with h5py.File(src, "a") as f:
        f["conv_1"].attrs["weight_names"] = [b"conv_1_W", b"nowhere"]
    proc = run_cli("--format=keras_h5", f"--input={src}", f"--output={tmp_path / 'out'}")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "alexnet_weights.h5" in lines[0] and "'nowhere'" in lines[0], lines


# ----------------------------------------------------------------------------- property-based

fuzz = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_READERS = {
    "keras_h5": weights.read_keras_h5,
    "caffe_npy": weights.read_caffe_npy,
    "torchvision": weights.read_torchvision,
}


def assert_params_or_weights_error(fmt: str, path: Path) -> None:
    """A reader either gives finite float32 arrays or raises a WeightsError naming the file."""
    try:
        params = _READERS[fmt](path)
    except WeightsError as e:
        assert path.name in str(e) and "\n" not in str(e)
        return
    for layer in params.values():
        for array in layer.values():
            assert array.dtype == np.float32 and np.all(np.isfinite(array))


@fuzz
@given(
    fmt=st.sampled_from(sorted(_READERS)),
    prefix=st.sampled_from([b"", b"\x93NUMPY\x01\x00", b"\x89HDF\r\n\x1a\n", b"PK\x03\x04"]),
    data=st.binary(max_size=300),
)
def test_fuzz_weight_readers_random_bytes(tmp_path, fmt, prefix, data):
    path = tmp_path / "weights.bin"
    path.write_bytes(prefix + data)
    assert_params_or_weights_error(fmt, path)


@pytest.fixture(scope="module")
def keras_template(workdir) -> bytes:
    path = workdir / "template.h5"
    write_keras_h5(path, 7, fc=False)
    return path.read_bytes()


small_shapes = st.lists(st.integers(0, 4), max_size=4).map(tuple)
weight_dtypes = st.sampled_from(["f4", "f8", "f2", "i1", "u2", "S3", "c8", "?"])
specials = st.sampled_from([None, np.nan, np.inf, -np.inf])


def random_array(shape, dtype, special, seed) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal(shape)
    if special is not None and values.size:
        values.flat[0] = special
    with np.errstate(all="ignore"):
        return values.astype(dtype)


@fuzz
@given(
    layer=st.sampled_from(["conv_1", "conv_2_2", "conv_5_1", "dense_1", "model_weights"]),
    kind=st.sampled_from(["dataset", "names", "array", "softlink", "subgroup", "empty"]),
    names=st.one_of(
        st.lists(st.sampled_from(["{}_W", "{}_b", "x", "", "a/b", "/conv_3/conv_3_W"]), max_size=3),
        st.integers(-(2**63), 2**63 - 1),  # what an HDF5 attribute can hold (int64)
        st.lists(st.floats(), max_size=2),
    ),
    right_shape=st.booleans(),
    shape=small_shapes,
    dtype=weight_dtypes,
    special=specials,
    seed=st.integers(0, 2**16),
)
def test_fuzz_keras_h5_structure(
    tmp_path, keras_template, layer, kind, names, right_shape, shape, dtype, special, seed
):
    path = tmp_path / "alexnet_weights.h5"
    path.write_bytes(keras_template)
    kernel_shape = {
        "conv_1": (96, 3, 11, 11),
        "conv_2_2": (128, 48, 5, 5),
        "conv_5_1": (128, 192, 3, 3),
        "dense_1": (9216, 4096),
    }.get(layer)
    with h5py.File(path, "a") as f:
        if layer in f:
            del f[layer]
        if kind == "dataset":
            f.create_dataset(layer, data=random_array(shape, dtype, special, seed))
            return assert_params_or_weights_error("keras_h5", path)
        g = f.create_group(layer)
        if kind == "empty":
            return assert_params_or_weights_error("keras_h5", path)
        if kind == "names":
            if isinstance(names, list) and all(isinstance(n, str) for n in names):
                names = [n.format(layer).encode() for n in names]
            g.attrs["weight_names"] = names
        elif kind == "softlink":
            g.attrs["weight_names"] = [f"{layer}_W".encode()]
            g[f"{layer}_W"] = h5py.SoftLink("/nowhere")
        elif kind == "subgroup":
            g.attrs["weight_names"] = [f"{layer}_W".encode(), f"{layer}_b".encode()]
            g.create_group(f"{layer}_W")
        if kind in ("names", "array"):
            if right_shape and kernel_shape is not None and layer != "dense_1":
                kernel = random_array(kernel_shape, dtype, special, seed)
            else:
                kernel = random_array(shape, dtype, special, seed)
            g.create_dataset(f"{layer}_W", data=kernel)
            bias_shape = (kernel_shape or (3,))[0] if right_shape else shape[:1]
            g.create_dataset(f"{layer}_b", data=random_array(bias_shape, "f4", None, seed))
    assert_params_or_weights_error("keras_h5", path)


@pytest.fixture(scope="module")
def torchvision_template() -> dict:
    state = torchvision_model(8).features.state_dict()
    return {f"features.{k}": v.float() for k, v in state.items()}


@fuzz
@given(
    key=st.sampled_from(["features.0.weight", "features.3.bias", "classifier.4.bias"]),
    value=st.sampled_from(["tensor", "right", "str", "int", "none", "list", "dict", "numpy"]),
    dtype=st.sampled_from(
        [
            torch.float16,
            torch.bfloat16,
            torch.float64,
            torch.int8,
            torch.bool,
            torch.complex64,
            torch.float32,
        ]
    ),
    wrapper=st.sampled_from(["plain", "state_dict", "module", "list"]),
    shape=small_shapes,
    special=specials,
)
def test_fuzz_torchvision_state_dict(
    tmp_path, torchvision_template, key, value, dtype, wrapper, shape, special
):
    state = dict(torchvision_template)
    right = tuple(state[key].shape) if key in state else (4096,)
    if value in ("tensor", "right"):
        tensor = torch.randn(right if value == "right" else shape, dtype=torch.float64)
        if special is not None and tensor.numel():
            tensor.view(-1)[0] = special
        state[key] = tensor.to(dtype)
    else:
        state[key] = {
            "str": "w",
            "int": 3,
            "none": None,
            "list": [1.0, 2.0],
            "dict": {"a": 1},
            "numpy": np.zeros(3),
        }[value]
    if wrapper == "state_dict":
        state = {"state_dict": state, "epoch": 3}
    elif wrapper == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    elif wrapper == "list":
        state = list(state.values())
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    assert_params_or_weights_error("torchvision", path)


@fuzz
@given(
    layer=st.sampled_from(["conv1", "conv3", "fc6", b"conv2", b"\xff\xfe"]),
    value=st.sampled_from(["pair", "right", "dict", "triple", "str", "none", "objects"]),
    dtype=weight_dtypes,
    shape=small_shapes,
    special=specials,
    seed=st.integers(0, 2**16),
)
def test_fuzz_caffe_npy_values(tmp_path, layer, value, dtype, shape, special, seed):
    layers: dict = caffe_layers(9, fc=False)
    name = layer.decode("utf-8", "replace") if isinstance(layer, bytes) else layer
    right = {"conv1": (11, 11, 3, 96), "conv2": (5, 5, 48, 256), "conv3": (3, 3, 256, 384)}
    w_shape = right.get(name, shape) if value == "right" else shape
    w = random_array(w_shape, dtype, special, seed)
    b = random_array(w_shape[-1:] if w_shape else (), "f4", None, seed)
    if isinstance(layer, bytes):
        layers.pop(name, None)
    layers[layer] = {
        "pair": [w, b],
        "right": [w, b],
        "dict": {b"weights": w, "biases": b},
        "triple": (w, b, b),
        "str": "W",
        "none": None,
        "objects": [np.array([1.0, "x"], dtype=object), b],
    }[value]
    path = tmp_path / "bvlc_alexnet.npy"
    np.save(path, layers, allow_pickle=True)
    assert_params_or_weights_error("caffe_npy", path)
