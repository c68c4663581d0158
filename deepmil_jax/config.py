"""Run settings: one frozen dataclass per program, its command-line flags derived from the fields.

Each field is declared once with ``setting(default, help)``; ``define_flags(cls)`` turns the fields
of a dataclass into absl flags (when a program starts, never on import) and ``from_flags(cls)``
builds the dataclass from the parsed flags. Defaults are the paper's (Zhu et al. 2017, Sec. 3)
where it gives them. Importing this module loads neither JAX nor TensorFlow, so ``--help`` is
answered at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import app, flags, logging

from deepmil_jax.errors import ConfigError, DeepMILError

SCHEMES = (
    "alexnet",
    "max_pooling",
    "label_assign",
    "sparse",
    # the MIL poolings of other work (issue 14): deepmil_jax.losses.bag_logits' parameter-free
    # ones, attention MIL (Ilse et al. 2018) and a log-sum-exp pooling with a learned sharpness
    "mean_pooling",
    "topk_pooling",
    "lse_pooling",
    "noisy_or",
    "attention",
    "gated_attention",
    "learned_lse",
)
PAPER_SCHEMES = SCHEMES[:4]  # the paper's Table 1, evaluate's default
# --k values: the model chooses k per image
AUTO_K = ("auto", "auto_soft", "auto_relative")
DATASETS = (
    "synthetic",
    "synthetic_hard",
    "inbreast",
    "folder",
    "cbis_ddsm",
    "vindr_mammo",
    "cmmd",
    "mias",
)
# the collections that come with their own train/test split (--split=official)
OFFICIAL_SPLIT_DATASETS = ("cbis_ddsm", "vindr_mammo")
# generated on first use under --data_dir; the others are read from --manual_dir
SYNTHETIC_DATASETS = ("synthetic", "synthetic_hard")


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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
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


# the schemes that read --k
K_SCHEMES = ("label_assign", "topk_pooling")


def scheme_variant(
    entry: str, flag: str = "--schemes"
) -> tuple[str, str, int | float | str | None]:
    """An entry of evaluate's ``--schemes`` (and the benchmark's ``--compare``): a scheme
    (``sparse``), or a scheme that reads k with its own k (``label_assign:k=3``), as ``(name,
    scheme, k)``: ``name`` is the entry's folder and report name (``label_assign_k3``), ``k`` None
    when the entry sets none (the run takes ``--k``). ConfigError for anything else."""
    scheme, sep, rest = entry.strip().partition(":")
    if scheme not in SCHEMES:
        raise ConfigError(f"{flag}: unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}.")
    if not sep:
        return scheme, scheme, None
    key, eq, value = rest.partition("=")
    if key.strip() != "k" or not eq:
        raise ConfigError(f"{flag}: {entry!r}: only k can be set per scheme, as {scheme}:k=VALUE.")
    if scheme not in K_SCHEMES:
        raise ConfigError(
            f"{flag}: {entry!r}: {scheme} does not read k; k= applies to {' and '.join(K_SCHEMES)}."
        )
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
    return {
        name: dataclasses.replace(config, scheme=scheme, k=config.k if k is None else k)
        for name, (scheme, k) in scheme_variants(entries, flag).items()
    }


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its flag's help text (and, for a string, its allowed values)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run depends on; saved as ``config.json`` in canonical form."""

    scheme: str = setting(
        "label_assign",
        "MIL scheme: alexnet (the paper's baseline: AlexNet with its fully connected layers), "
        "max_pooling (Eq. 4), label_assign (Eq. 6), sparse (Eq. 7); other MIL poolings, each "
        "trained by the cross-entropy of its bag probability: mean_pooling (mean instance "
        "probability), topk_pooling (mean probability of the top --k), lse_pooling "
        "(log-sum-exp of the logits, T=1), noisy_or (1 - prod(1 - r)), attention and "
        "gated_attention (attention MIL, Ilse et al. 2018; heatmaps show attention-weighted "
        "instance logits), learned_lse (log-sum-exp with a learned temperature).",
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
        "lambda of the lambda/2 ||theta||^2 term in the loss (default: the paper's 1e-5, or 5e-6 "
        "for --scheme=sparse).",
    )
    learning_rate: float | None = setting(
        None,
        "Adam learning rate; default: the paper's 5e-5 when fine-tuning (--init=imagenet:... or "
        "checkpoint:...), 3e-4 from --init=random, where 5e-5 barely moves in a CPU-sized run.",
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
        "random",
        "random, imagenet:PATH (a python -m deepmil_jax.convert_weights output, as the paper "
        "did), or checkpoint:PATH (another run's workdir, e.g. label_assign fine-tuned from "
        "max_pooling).",
    )
    backbone: str = setting(
        "caffe",
        "AlexNet variant: caffe (the paper's, grouped convolutions and LRN) or torchvision.",
        choices=("caffe", "torchvision"),
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
        the instance grid of ``image_size``, which builds the model's shapes)."""

        def fail(flag: str, why: str) -> None:
            raise ConfigError(f"--{flag}: {why}")

        for name in ("scheme", "dataset", "split", "backbone", "precision"):
            choices = _field(Config, name).metadata["choices"]
            if getattr(self, name) not in choices:
                fail(name, f"{getattr(self, name)!r} is not one of {', '.join(choices)}.")
        if self.dataset not in SYNTHETIC_DATASETS and not self.manual_dir:
            fail("manual_dir", f"--dataset={self.dataset} needs the folder (or CSV) of your data.")
        if self.split == "official" and self.dataset not in OFFICIAL_SPLIT_DATASETS:
            fail(
                "split",
                f"--dataset={self.dataset} has no official train/test split (only "
                f"{', '.join(OFFICIAL_SPLIT_DATASETS)}); use --split=patient.",
            )
        if self.scheme in ("label_assign", "topk_pooling"):
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
        kind = self.init.split(":", 1)[0]
        if kind not in ("random", "imagenet", "checkpoint") or (kind != "random") != (
            ":" in self.init
        ):
            fail("init", f"must be random, imagenet:PATH or checkpoint:PATH; got {self.init!r}.")
        if kind != "random" and not os.path.exists(os.path.expanduser(self.init.split(":", 1)[1])):
            fail("init", f"{self.init.split(':', 1)[1]} does not exist.")
        if self.learning_rate is not None and self.learning_rate <= 0:
            fail("learning_rate", f"must be positive; got {self.learning_rate}.")
        for name in ("mu", "weight_decay"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                fail(name, f"must be 0 or more; got {getattr(self, name)}.")
        if any(h < 1 for h in self.head_hidden):
            fail("head_hidden", f"layer widths must be positive; got {list(self.head_hidden)}.")
        self._validate_grid(fail)

    def _validate_grid(self, fail) -> None:
        from deepmil_jax.models.grid import grid_shape  # JAX: loaded once flags are parsed

        rows, cols = grid_shape(
            self.scheme, self.backbone, self.image_size, tuple(self.head_hidden)
        )
        if rows < 1 or cols < 1:
            fail(
                "image_size",
                f"{self.image_size} is too small for the {self.backbone} AlexNet: its feature "
                "map would be empty; use 67 or more (the paper: 227).",
            )
        k = parse_k(self.k)
        if self.scheme in K_SCHEMES and k not in AUTO_K and k > rows * cols:
            fail(
                "k",
                f"{k} is more than the {rows * cols} instances of --image_size={self.image_size} "
                f"(a {rows}x{cols} grid); use at most {rows * cols}, or a fraction < 1.",
            )

    def canonical(self) -> Config:
        """The settings in the one form that is saved and compared: every path absolute and
        normalised (``/x/`` and ``/x`` are one setting), ``k`` an int count or a float fraction,
        and the defaults that depend on other settings filled in: ``learning_rate`` (5e-5 when
        fine-tuning, 3e-4 from random initialisation) and ``weight_decay`` (5e-6 for sparse MIL,
        else 1e-5)."""

        def path(p: str) -> str:
            return os.path.abspath(os.path.expanduser(p)) if p else p

        init = self.init
        if ":" in init:
            kind, where = init.split(":", 1)
            init = f"{kind}:{path(where)}"
        learning_rate = self.learning_rate
        if learning_rate is None:
            learning_rate = 3e-4 if init == "random" else 5e-5
        weight_decay = self.weight_decay
        if weight_decay is None:
            weight_decay = 5e-6 if self.scheme == "sparse" else 1e-5
        return dataclasses.replace(
            self,
            data_dir=path(self.data_dir),
            manual_dir=path(self.manual_dir),
            init=init,
            k=parse_k(self.k),
            learning_rate=float(learning_rate),
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
        PAPER_SCHEMES,
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


WEIGHT_FORMATS = ("torchvision", "keras_h5", "caffe_npy")


@dataclasses.dataclass(frozen=True)
class ConvertWeights:
    """python -m deepmil_jax.convert_weights: a pretrained AlexNet file into a converted folder."""

    format: str = setting(
        "keras_h5",
        "Kind of --input: keras_h5 (convnets-keras alexnet_weights.h5, the paper's), caffe_npy "
        "(bvlc_alexnet.npy) or torchvision (alexnet-owt-*.pth). See the module help above.",
        choices=WEIGHT_FORMATS,
    )
    input: str = setting("", "The pretrained weights file to convert.")
    output: str = setting("", "Folder to write (Orbax checkpoint in params/ plus metadata.json).")
    overwrite: bool = setting(
        False,
        "Replace params/ and metadata.json in a non-empty --output folder (other files are kept).",
    )


# ---------------------------------------------------------------------------------------------
# Flags from fields


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def define_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one absl flag per field of the dataclass ``cls`` (default and help from the
    field). Field types: str (an enum when the field has choices), int, float, bool, their
    ``| None`` forms, and tuples (comma-separated lists)."""
    for f in dataclasses.fields(cls):
        kind, default, help_text = str(f.type), f.default, f.metadata["help"]
        if f.metadata.get("choices"):
            flags.DEFINE_enum(
                f.name, default, f.metadata["choices"], help_text, flag_values=flag_values
            )
        elif kind.startswith("tuple"):
            flags.DEFINE_list(f.name, [str(v) for v in default], help_text, flag_values=flag_values)
        elif kind.startswith("bool"):
            flags.DEFINE_bool(f.name, default, help_text, flag_values=flag_values)
        elif kind.startswith("int"):
            flags.DEFINE_integer(f.name, default, help_text, flag_values=flag_values)
        elif kind.startswith("float") and "str" not in kind:
            flags.DEFINE_float(f.name, default, help_text, flag_values=flag_values)
        else:  # str, or a number or a word (--k=6, --k=auto): text, parsed by the dataclass
            text = default if default is None or isinstance(default, str) else str(default)
            flags.DEFINE_string(f.name, text, help_text, flag_values=flag_values)


def from_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> Any:
    """The dataclass ``cls`` from parsed flags (ConfigError naming a flag that cannot be read)."""
    values = {}
    for f in dataclasses.fields(cls):
        value = flag_values[f.name].value
        if str(f.type).startswith("tuple[int"):
            try:
                value = tuple(int(v) for v in value)
            except ValueError:
                raise ConfigError(
                    f"--{f.name}: {','.join(value)} is not a list of integers."
                ) from None
        elif str(f.type).startswith("tuple"):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


def parse_flags_early(*classes: type) -> None:
    """Defines the flags of ``classes`` and parses ``sys.argv`` with absl's usage handling, so
    that ``--help`` and a misspelt flag are answered before a program's heavy imports; the
    program's ``absl.app.run`` parses the same command line again."""
    import sys

    from absl import app

    for cls in classes:
        define_flags(cls)
    app.define_help_flags()
    app.parse_flags_with_usage(sys.argv)


# ---------------------------------------------------------------------------------------------
# Running a program


def initialize_distributed(launch: Launch) -> None:
    """Joins the other processes of a multi-host run (--distributed or --coordinator_address)."""
    import jax

    if launch.coordinator_address:
        jax.distributed.initialize(
            launch.coordinator_address, launch.num_processes, launch.process_id
        )
    elif launch.distributed:
        jax.distributed.initialize()


def _quiet_libraries(record) -> bool:
    """Keeps the libraries' INFO chatter (Orbax, TFDS, JAX's search for TPUs and GPUs) out of
    the program's log (30: WARNING)."""
    noisy = ("orbax", "tensorflow_datasets", "etils", "xla_bridge")
    return record.levelno >= 30 or not any(n in record.pathname for n in noisy)


def run_main(body, *, positional: bool = False) -> None:
    """Runs ``body`` under absl, turning the project's errors into one clear line and exit status
    1. ``body()`` takes no arguments, or with ``positional`` the command line's ``argv``."""

    def main(argv):
        if not positional and len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
        logging.get_absl_handler().addFilter(_quiet_libraries)
        try:
            if positional:
                body(argv)
            else:
                body()
        except DeepMILError as e:  # one line on stderr, no traceback
            raise SystemExit(f"error: {e}") from None

    app.run(main)
