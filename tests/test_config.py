"""Run settings (deepmil_jax.config) and their flags (deepmil_jax.cli): a bad setting names its
flag, the paper's defaults, settings compared canonically, --schemes entries, flag parsing of the
schemes and of k, and each program's own flags with --help and a misspelt flag."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT, SMALL

from deepmil_jax import config as config_module
from deepmil_jax.errors import ConfigError


@pytest.mark.parametrize(
    "changes, flag",
    [
        ({"fold": 5}, "--fold"),
        ({"scheme": "mean"}, "--scheme"),
        ({"k": 2.5}, "--k"),
        ({"init": "imagenet:/no/such/dir"}, "--init"),
        ({"init": "pretrained"}, "--init"),
        ({"dataset": "inbreast"}, "--manual_dir"),
        ({"precision": "fp16"}, "--precision"),
        ({"k": 37}, "--k: 37 is more than the 36 instances"),
        ({"image_size": 10}, "--image_size: 10 is too small"),
        ({"mu": -1e-5}, "--mu"),
        ({"weight_decay": -1.0}, "--weight_decay"),
        ({"learning_rate": 0.0}, "--learning_rate: must be positive"),
        ({"head_learning_rate": -1e-3}, "--head_learning_rate: must be positive"),
        ({"warmup_epochs": -1}, "--warmup_epochs: must be 0 or more"),
        ({"head_hidden": (0,)}, "--head_hidden"),
    ],
)
def test_bad_config_names_the_flag(changes, flag):
    with pytest.raises(ConfigError, match=flag):
        dataclasses.replace(config_module.Config(), **changes).validate()


def test_paper_defaults():
    c = config_module.Config().canonical()
    assert (c.weight_decay, c.k, c.mu, c.image_size, c.num_folds) == (1e-5, 6, 1e-5, 227, 5)
    fine_tuning = dataclasses.replace(config_module.Config(), init="imagenet:weights").canonical()
    assert fine_tuning.learning_rate == 5e-5  # the paper's fine-tuning
    assert c.learning_rate == 3e-4  # from random initialisation
    assert (
        dataclasses.replace(config_module.Config(), learning_rate=1e-3).canonical().learning_rate
        == 1e-3
    )
    assert (
        dataclasses.replace(config_module.Config(), scheme="sparse").canonical().weight_decay
        == 5e-6
    )
    assert dataclasses.replace(config_module.Config(), k=0.15).canonical().k == 0.15


def test_settings_are_compared_canonically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = dataclasses.replace(SMALL, manual_dir=f"{tmp_path}/x/", data_dir="data//d/")
    b = dataclasses.replace(SMALL, manual_dir=f"{tmp_path}/x", data_dir=str(tmp_path / "data/d"))
    assert a.canonical() == b.canonical()
    assert a.canonical().to_json() == json.loads(json.dumps(b.canonical().to_json()))
    assert (
        dataclasses.replace(SMALL, k=6).canonical() == dataclasses.replace(SMALL, k=6.0).canonical()
    )


@pytest.mark.parametrize(
    "entries, message",
    [
        (["label_assign:k=6", "label_assign:k=6.0"], "repeats the run label_assign_k6"),
        (["sparse:k=3"], "sparse does not read k"),
        (["label_assign:mu=3"], "only k can be set"),
        (["label_assign:k=three"], "'label_assign:k=three': --k: 'three' is not a number"),
        (["maxpooling"], "unknown scheme 'maxpooling'"),
    ],
)
def test_evaluate_bad_scheme_entries_are_refused(tmp_path, entries, message):

    with pytest.raises(ConfigError, match=re.escape(message)):
        config_module.scheme_configs(config_module.Config(), entries)


def test_new_schemes_and_k_auto_parse_from_the_command_line():
    from absl import flags

    from deepmil_jax import cli as config_mod
    from deepmil_jax import registry

    fv = flags.FlagValues()
    config_mod.define_flags(config_module.Config, fv)
    assert set(registry.SCHEMES) <= set(fv["scheme"].parser.enum_values)
    for name in ("attention", "gated_attention", "learned_lse", "noisy_or", "topk_pooling"):
        assert name in fv["scheme"].help
    assert "auto" in fv["k"].help
    fv(["train", "--scheme=label_assign", "--k=auto", "--image_size=99"])
    c = config_mod.from_flags(config_module.Config, fv)
    c.validate()
    assert c.canonical().k == "auto"
    fv(["train", "--scheme=gated_attention", "--k=0.25"])
    assert config_mod.from_flags(config_module.Config, fv).canonical().k == 0.25
    for bad, why in (("--k=sometimes", "not a number"), ("--k=2.5", "whole number")):
        fv(["train", bad])
        with pytest.raises(ConfigError, match=f"--k: .*{why}"):
            config_mod.from_flags(config_module.Config, fv).validate()


# spawn processes: not in `pytest -m "not slow"`
@pytest.mark.slow
def test_each_program_accepts_its_own_flags_only():
    """Flags are defined when a program runs, from its dataclasses' fields, and --help lists
    them (absl lists the main module's flags only)."""
    for program, own, foreign in (
        ("train", "--k", "--checkpoint"),
        ("evaluate", "--schemes", "--checkpoint"),
        ("predict", "--max_side", "--scheme"),
    ):
        help_text = subprocess.run(
            [sys.executable, "-m", f"deepmil_jax.{program}", "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert f"{own}:" in help_text and f"{foreign}:" not in help_text, program
        bad = subprocess.run(
            [sys.executable, "-m", f"deepmil_jax.{program}", f"{foreign}=1"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bad.returncode != 0 and "Unknown command line flag" in bad.stderr, program
    from absl import flags

    assert "scheme" not in flags.FLAGS  # importing the modules defines no flag


@pytest.mark.slow
def test_cli_help_and_bad_flag():
    help_text = subprocess.run(
        [sys.executable, "-m", "deepmil_jax.train", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for flag in (
        "--scheme",
        "--k",
        "--mu",
        "--dataset",
        "--fold",
        "--init",
        "--precision",
        "--workdir",
        "--coordinator_address",
    ):
        assert f"  {flag}:" in help_text, flag  # listed by --help, not only named in the text
    bad = subprocess.run(
        [sys.executable, "-m", "deepmil_jax.train", "--fold=9"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0
    assert "--fold: must be in 0..4" in bad.stderr
    assert "Traceback" not in bad.stderr
