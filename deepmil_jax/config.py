"""Run settings: one frozen, values-only dataclass per program, each with its own ``validate()``.

Each field is declared once with ``setting(default, help)``; ``deepmil_jax.cli`` turns the fields
into absl flags when a program starts. Defaults are the paper's (Zhu et al. 2017, Sec. 3) where it
gives them; the choices (schemes, backbones, datasets, weights formats) and the defaults that
depend on them (sparse MIL's weight decay, a backbone's fine-tuning recipe) are
``deepmil_jax.registry``'s. Importing this module loads neither JAX nor TensorFlow, and checking
settings builds no model: the instance grid comes from the architecture tables.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from deepmil_jax import registry
from deepmil_jax.errors import ConfigError

SCHEMES = tuple(registry.SCHEMES)
DATASETS = tuple(registry.DATASETS)


def parse_k(value: Any) -> int | float | str:
    """``--k`` in canonical form: an int count (6 and 6.0 alike), a float fraction in (0, 1), or
    one of ``AUTO_K``; ConfigError for anything else (the flag arrives as text)."""
    if isinstance(value, str):
        text = value.strip()
        if text in AUTO_K:
            return text
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(
                f"--k: {value!r} is not a number; give a count (6), a fraction (0.15), "
                f"or one of {', '.join(AUTO_K)}."
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"--k: {value!r} is not a count, a fraction or one of {AUTO_K}.")
    if value <= 0:
        raise ConfigError(f"--k: must be positive; got {value}.")
    if value >= 1:
        if float(value) != int(value):
            raise ConfigError(
                f"--k: {value} is neither a whole number of instances nor a fraction < 1."
            )
        return int(value)
    return float(value)


AUTO_K = registry.AUTO_K


def scheme_variant(
    entry: str, flag: str = "--schemes"
) -> tuple[str, str, int | float | str | None]:
    """An entry of evaluate's ``--schemes`` (and the benchmark's ``--compare``): a scheme
    (``sparse``), or a scheme that reads k with its own k (``label_assign:k=3``), as ``(name,
    scheme, k)``: ``name`` is the entry's folder and report name (``label_assign_k3``), ``k`` None
    when the entry sets none (the run takes ``--k``). ConfigError for anything else."""
    scheme, sep, rest = entry.strip().partition(":")
    registry.scheme(scheme, flag)
    if not sep:
        return scheme, scheme, None
    key, eq, value = rest.partition("=")
    if key.strip() != "k" or not eq:
        raise ConfigError(f"{flag}: {entry!r}: only k can be set per scheme, as {scheme}:k=VALUE.")
    if scheme not in registry.k_schemes():
        readers = " and ".join(registry.k_schemes())
        raise ConfigError(f"{flag}: {entry!r}: {scheme} does not read k; k= applies to {readers}.")
    try:
        k = parse_k(value)
    except ConfigError as error:
        raise ConfigError(f"{flag}: {entry!r}: {error}") from None
    return f"{scheme}_k{k}", scheme, k


def scheme_variants(
    entries: tuple[str, ...] | list[str], flag: str = "--schemes"
) -> dict[str, tuple[str, Any]]:
    """``{name: (scheme, k or None)}`` of ``scheme_variant`` entries, refusing two that name one
    run (``label_assign:k=6`` and ``label_assign:k=6.0``)."""
    variants: dict[str, tuple[str, Any]] = {}
    for entry in entries:
        name, scheme, k = scheme_variant(entry, flag)
        if name in variants:
            raise ConfigError(f"{flag}: {entry!r} repeats the run {name}; give it once.")
        variants[name] = (scheme, k)
    return variants


def scheme_configs(
    config: Config, entries: tuple[str, ...] | list[str], flag: str = "--schemes"
) -> dict[str, Config]:
    """``{run name: the run's settings}`` of ``scheme_variant`` entries; an entry's own k
    replaces ``config.k``."""
    configs: dict[str, Config] = {}
    seen: dict[Config, str] = {}
    for name, (scheme, k) in scheme_variants(entries, flag).items():
        run = dataclasses.replace(config, scheme=scheme, k=config.k if k is None else k)
        same = run.canonical()
        if same.scheme not in registry.k_schemes():
            same = dataclasses.replace(same, k=0)  # k is not read: not part of the run
        if same in seen:
            raise ConfigError(
                f"{flag}: {name} and {seen[same]} are the same configuration; give it once."
            )
        seen[same] = name
        configs[name] = run
    return configs


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _path(p: str) -> str:
    return os.path.abspath(os.path.expanduser(p)) if p else p


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its flag's help text (and, for a string, its allowed values)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run depends on; saved as ``config.json`` in canonical form."""

    scheme: str = setting(
        "label_assign",
        "MIL scheme: "
        + "; ".join(f"{name}: {entry.help}" for name, entry in registry.SCHEMES.items())
        + ". The schemes after sparse are trained by the cross-entropy of their bag probability.",
        choices=SCHEMES,
    )
    k: float | str = setting(
        6,
        "label_assign: the top-k instances of each image take its label; an integer count "
        "(paper: 6 of 36), a fraction in (0, 1) of the instances, or auto: k chosen per image as "
        "the model's estimate of the malignant extent (the sum of its instance probabilities), "
        "auto_soft: the same with a soft top-k assignment, auto_relative: the instances as "
        "probable as the image's top one (sum of r / max r). topk_pooling: the count or "
        "fraction pooled.",
    )
    mu: float = setting(
        1e-5, "sparse: weight of the L1 term on the sorted instance probabilities (paper: 1e-5)."
    )
    weight_decay: float | None = setting(
        None,
        "lambda of the lambda/2 ||theta||^2 term in the loss (default: the scheme's, "
        "deepmil_jax.registry: the paper's 1e-5, or 5e-6 for --scheme=sparse).",
    )
    learning_rate: float | None = setting(
        None,
        "Adam learning rate of the backbone; default: the backbone's fine-tuning recipe when "
        "fine-tuning (--init=imagenet:... or checkpoint:...; the paper's 5e-5 for AlexNet, 1e-4 "
        "for EfficientNet-Lite and ResNet), 3e-4 from --init=random, where 5e-5 barely moves in "
        "a CPU-sized run.",
    )
    head_learning_rate: float | None = setting(
        None,
        "Adam learning rate of the instance head and the pooling, which start random; default: "
        "--learning_rate for AlexNet and from --init=random, 1e-3 when fine-tuning "
        "EfficientNet-Lite or ResNet (deepmil_jax.registry's recipes).",
    )
    warmup_epochs: int | None = setting(
        None,
        "Epochs of linear learning-rate warm-up from 0; default: the backbone's recipe (0 for "
        "AlexNet and from --init=random, 1 when fine-tuning EfficientNet-Lite or ResNet).",
    )
    freeze_backbone: bool = setting(
        False,
        "Train only the instance head and the pooling on fixed backbone features (a linear "
        "probe with the paper's logistic-regression head).",
    )
    batch_size: int = setting(
        8,
        "Global training batch, split over all devices of all processes; must be a multiple of "
        "the device count.",
    )
    eval_batch_size: int = setting(32, "Global evaluation batch.")
    epochs: int = setting(
        15, "Training epochs; the epoch with the best validation AUC is the one tested."
    )
    dataset: str = setting(
        "synthetic",
        "synthetic: generated INbreast-like data (no download needed; easy lesions, the "
        "Quickstart's); synthetic_hard: the same layout made to tell MIL methods apart (lesions "
        "of 0.2-10% of the breast, benign look-alikes, dense tissue); inbreast: the INbreast "
        "database at --manual_dir; folder: your CSV of images and labels at --manual_dir; "
        "cbis_ddsm, vindr_mammo, cmmd, mias: that public collection as downloaded, at "
        "--manual_dir (README, Data).",
        choices=DATASETS,
    )
    data_dir: str = setting(
        "~/.cache/deepmil_jax", "Where prepared datasets (and the synthetic data) are kept."
    )
    manual_dir: str = setting(
        "",
        "inbreast: the INbreast folder (AllDICOMs, AllXML, INbreast.csv); folder: the CSV file; "
        "cbis_ddsm: the folder with CBIS-DDSM/ and the four case CSVs; vindr_mammo: the folder "
        "with breast-level_annotations.csv and images/; cmmd: the folder with CMMD/ and "
        "CMMD_clinicaldata_revision.xlsx; mias: the folder with Info.txt and mdbNNN.pgm.",
    )
    image_column: str = setting(
        "image", "--dataset=folder: the CSV column of image paths (relative to the CSV)."
    )
    label_column: str = setting(
        "label", "--dataset=folder: the CSV column of labels (0/1, or MALIGNANT/BENIGN)."
    )
    patient_column: str = setting(
        "",
        "--dataset=folder: the CSV column of patient ids, so that folds keep a patient's images "
        "together (empty: every image its own patient).",
    )
    synthetic_images: int = setting(160, "Images in a synthetic dataset (its first use writes it).")
    image_size: int = setting(
        227,
        "Preprocessed image side in pixels (paper: 227, a 6x6 grid of instances; 454 gives 13x13).",
    )
    skip_bad: bool = setting(
        False, "List unreadable images in a summary and go on, instead of stopping at the first."
    )
    fold: int = setting(0, "Test fold; fold+1 (mod num_folds) is the validation fold.")
    num_folds: int = setting(5, "Cross-validation folds (paper: 5).")
    split: str = setting(
        "patient",
        "patient: no patient's images in two of train/validation/test; image: the paper's "
        "image-level split; official: the collection's own test set (cbis_ddsm, vindr_mammo), "
        "with fold --fold of its training set (by patient) as the validation set.",
        choices=("patient", "image", "official"),
    )
    init: str = setting(
        "",
        "random, imagenet:PATH (a python -m deepmil_jax.convert_weights output, as the paper "
        "did), imagenet:BACKBONE (the ImageNet weights an installed package ships: "
        "efficientnet_lite0/1/2), or checkpoint:PATH (another run's workdir, e.g. label_assign "
        "fine-tuned from max_pooling). Default: imagenet:BACKBONE for a backbone whose weights "
        "a package ships, else random.",
    )
    backbone: str = setting(
        "caffe",
        "; ".join(f"{name}: {entry.help}" for name, entry in registry.BACKBONES.items()) + ".",
        choices=tuple(registry.BACKBONES),
    )
    output_stride: int = setting(
        32, "ResNet backbones: 32, or 16 (layer4 dilated: a grid twice as fine)."
    )
    head_hidden: tuple[int, ...] = setting(
        (),
        "Hidden 1x1 layers before the instance logit, e.g. 128,128 (the paper's released "
        "code); empty for the paper's logistic regression.",
    )
    precision: str = setting(
        "fp32",
        "bf16: bfloat16 compute with float32 parameters and optimiser state.",
        choices=("fp32", "bf16"),
    )
    augment: bool = setting(True, "The paper's augmentation: flip, shift, rotation, a zeroed box.")
    seed: int = setting(0, "Seeds every random choice (splits, init, shuffling, augmentation).")

    def validate(self) -> None:
        """Raises ConfigError naming the flag when a value cannot work (including ``k`` against
        the instance grid of ``image_size``, computed from the architecture tables)."""

        def fail(flag: str, why: str) -> None:
            raise ConfigError(f"--{flag}: {why}")

        for name in ("scheme", "dataset", "split", "backbone", "precision"):
            choices = _field(Config, name).metadata["choices"]
            if getattr(self, name) not in choices:
                fail(name, f"{getattr(self, name)!r} is not one of {', '.join(choices)}.")
        source = registry.DATASETS[self.dataset]
        if not source.synthetic and not self.manual_dir:
            fail("manual_dir", f"--dataset={self.dataset} needs {source.manual_dir}.")
        if self.split == "official" and not source.official_split:
            official = [n for n, d in registry.DATASETS.items() if d.official_split]
            fail(
                "split",
                f"--dataset={self.dataset} has no official train/test split (only "
                f"{', '.join(official)}); use --split=patient.",
            )
        if self.scheme in registry.k_schemes():
            k = parse_k(self.k)
            if k in AUTO_K and self.scheme != "label_assign":
                fail(
                    "k",
                    f"{k} is for --scheme=label_assign; give {self.scheme} a count or fraction.",
                )
        for name in ("batch_size", "eval_batch_size", "epochs", "num_folds", "image_size"):
            if getattr(self, name) < 1:
                fail(name, f"must be positive; got {getattr(self, name)}.")
        if self.num_folds < 3:
            fail("num_folds", "needs at least 3 folds (train, validation and test).")
        if not 0 <= self.fold < self.num_folds:
            fail("fold", f"must be in 0..{self.num_folds - 1}; got {self.fold}.")
        init = self.canonical_init()
        kind, _, where = init.partition(":")
        if kind not in ("random", "imagenet", "checkpoint") or (kind != "random") != bool(where):
            fail(
                "init",
                f"must be random, imagenet:PATH, imagenet:BACKBONE or checkpoint:PATH; got "
                f"{self.init!r}.",
            )
        packaged = registry.BACKBONES.get(where)
        if kind == "imagenet" and packaged is not None and packaged.pretrained is not None:
            if where != self.backbone:
                fail("init", f"{init} holds {where} weights; add --backbone={where}.")
        elif kind != "random" and not os.path.exists(os.path.expanduser(where)):
            fail("init", f"{where} does not exist.")
        if self.scheme == "alexnet" and registry.BACKBONES[self.backbone].family != "alexnet":
            fail(
                "backbone",
                "--scheme=alexnet is AlexNet with its fully connected layers; "
                "use --backbone=caffe or torchvision, or a MIL scheme.",
            )
        if self.output_stride not in (16, 32) or (
            self.output_stride == 16 and registry.BACKBONES[self.backbone].family != "resnet"
        ):
            fail("output_stride", "must be 32, or 16 for a ResNet backbone.")
        if self.freeze_backbone and kind == "random":
            fail("freeze_backbone", "a frozen random backbone learns nothing; give --init.")
        for name in ("learning_rate", "head_learning_rate", "warmup_epochs", "mu", "weight_decay"):
            value, rate = getattr(self, name), name.endswith("learning_rate")
            if value is not None and (value <= 0 if rate else value < 0):
                fail(name, f"must be {'positive' if rate else '0 or more'}; got {value}.")
        if any(h < 1 for h in self.head_hidden):
            fail("head_hidden", f"layer widths must be positive; got {list(self.head_hidden)}.")
        self._validate_grid(fail)

    def grid(self) -> tuple[int, int]:
        """(h, w) of the instance grid at ``image_size``, from the architecture tables."""
        size = self.image_size
        return registry.instance_grid(
            self.scheme, self.backbone, size, size, output_stride=self.output_stride
        )

    def _validate_grid(self, fail) -> None:
        rows, cols = self.grid()
        if rows < 1 or cols < 1:
            if self.scheme == "alexnet":
                fail("image_size", f"--scheme=alexnet needs 227x227 images; got {self.image_size}.")
            least = registry.min_image_size(self.backbone, output_stride=self.output_stride)
            fail(
                "image_size",
                f"{self.image_size} is too small for the {self.backbone} backbone: its feature "
                f"map would be empty; use {least} or more (the paper: 227).",
            )
        k = parse_k(self.k)
        if self.scheme in registry.k_schemes() and k not in AUTO_K and k > rows * cols:
            fail(
                "k",
                f"{k} is more than the {rows * cols} instances of --image_size={self.image_size} "
                f"(a {rows}x{cols} grid); use at most {rows * cols}, or a fraction < 1.",
            )

    def canonical_init(self) -> str:
        """``--init`` with its default filled in: ``imagenet:BACKBONE`` for a backbone whose
        ImageNet weights a package ships, else ``random``; paths absolute and normalised."""
        if not self.init:
            packaged = registry.BACKBONES.get(self.backbone)
            return f"imagenet:{self.backbone}" if packaged and packaged.pretrained else "random"
        kind, sep, where = self.init.partition(":")
        entry = registry.BACKBONES.get(where)
        if not sep or (kind == "imagenet" and entry is not None and entry.pretrained):
            return self.init
        return f"{kind}:{_path(where)}"

    def canonical(self) -> Config:
        """The settings in the one form that is saved and compared: every path absolute and
        normalised (``/x/`` and ``/x`` are one setting), ``k`` an int count or a float fraction,
        and the defaults that depend on other settings filled in: ``init``, the learning rates
        and warm-up (the backbone's recipe when fine-tuning, 3e-4 and no warm-up from random
        initialisation) and ``weight_decay`` (the scheme's: 5e-6 for sparse MIL, else 1e-5)."""
        init = self.canonical_init()
        recipe = registry.BACKBONES[self.backbone].recipe
        if init == "random":
            recipe = registry.RANDOM_INIT_RECIPE
        learning_rate = recipe.learning_rate if self.learning_rate is None else self.learning_rate
        head_learning_rate = self.head_learning_rate
        if head_learning_rate is None:
            # AlexNet (the paper) trains everything at one rate, whatever --learning_rate says
            same = recipe.head_learning_rate == recipe.learning_rate
            head_learning_rate = learning_rate if same else recipe.head_learning_rate
        warmup = recipe.warmup_epochs if self.warmup_epochs is None else self.warmup_epochs
        weight_decay = self.weight_decay
        if weight_decay is None:
            weight_decay = registry.SCHEMES[self.scheme].weight_decay
        return dataclasses.replace(
            self,
            data_dir=_path(self.data_dir),
            manual_dir=_path(self.manual_dir),
            init=init,
            k=parse_k(self.k),
            learning_rate=float(learning_rate),
            head_learning_rate=float(head_learning_rate),
            warmup_epochs=int(warmup),
            weight_decay=float(weight_decay),
            head_hidden=tuple(int(h) for h in self.head_hidden),
        )

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON values (tuples as lists), as config.json holds them."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where a program writes and how its processes find each other (not part of a run's
    settings)."""

    workdir: str = setting(
        "",
        "Output folder; train: default runs/<scheme>_fold<fold> (an existing workdir is "
        "resumed); evaluate: default runs/cv.",
    )
    distributed: bool = setting(
        False,
        "Call jax.distributed.initialize() (Cloud TPU pods and clusters it detects); see "
        "--coordinator_address for others.",
    )
    coordinator_address: str = setting(
        "", "host:port of process 0, for multi-process training without cluster auto-detection."
    )
    num_processes: int | None = setting(None, "With --coordinator_address: number of processes.")
    process_id: int | None = setting(None, "With --coordinator_address: this process's index.")


@dataclasses.dataclass(frozen=True)
class CrossValidation:
    """python -m deepmil_jax.evaluate: which schemes and folds (with Config and Launch)."""

    schemes: tuple[str, ...] = setting(
        registry.PAPER_SCHEMES,
        "Schemes to cross-validate (--scheme is ignored here); any of --scheme's choices, "
        "label_assign and topk_pooling also with their own k, as label_assign:k=3 (a k "
        "sweep in one report; without it --k applies). Runs go to <workdir>/<scheme> or "
        "<workdir>/<scheme>_k<k>.",
    )
    folds: tuple[int, ...] = setting((), "Folds to run; default all of 0..num_folds-1.")


@dataclasses.dataclass(frozen=True)
class Predict:
    """python -m deepmil_jax.predict: a trained workdir applied to image files."""

    checkpoint: str = setting(
        "",
        "A training workdir (python -m deepmil_jax.train --workdir=...): its config.json and "
        "checkpoints/ are used.",
    )
    which: str = setting(
        "best",
        "Which checkpoint of the workdir: best by validation AUC, or the latest.",
        choices=("best", "latest"),
    )
    output: str = setting("predictions", "Folder for predictions.csv and heatmaps/.")
    batch_size: int = setting(8, "Images preprocessed and run through the network at a time.")
    heatmaps: bool = setting(True, "Draw a heatmap PNG per image.")
    max_side: int = setting(
        1024,
        "Longest side of the heatmap pictures in pixels (the CSV keeps full-resolution "
        "coordinates).",
    )
    xml_dir: str = setting(
        "", "Folder of INbreast <id>.xml mass outlines (default: AllXML/ near each image)."
    )

    def validate(self) -> None:
        """Raises ConfigError naming the flag when a value cannot work."""
        if not self.checkpoint:
            raise ConfigError(
                "--checkpoint: give the --workdir of a python -m deepmil_jax.train run."
            )
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size must be positive; got {self.batch_size}.")
        if self.max_side < 16:
            raise ConfigError(f"--max_side must be at least 16 pixels; got {self.max_side}.")


@dataclasses.dataclass(frozen=True)
class ConvertWeights:
    """python -m deepmil_jax.convert_weights: a pretrained AlexNet file into a converted folder."""

    format: str = setting(
        "keras_h5",
        "Kind of --input: "
        + "; ".join(f"{name}: {f.description}" for name, f in registry.FORMATS.items())
        + ".",
        choices=tuple(registry.FORMATS),
    )
    input: str = setting("", "The pretrained weights file to convert.")
    output: str = setting("", "Folder to write (Orbax checkpoint in params/ plus metadata.json).")
    overwrite: bool = setting(
        False,
        "Replace params/ and metadata.json in a non-empty --output folder (other files are kept).",
    )
