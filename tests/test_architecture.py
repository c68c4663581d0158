"""The AlexNet architecture table: JAX-free, and the one table the model, the weight readers and
the PyTorch reference read."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deepmil_jax import architecture
from deepmil_jax.errors import ConfigError


def test_importable_without_jax_or_numpy():
    code = (
        "import sys\n"
        "sys.modules['jax'] = sys.modules['numpy'] = None  # importing them now fails\n"
        "from deepmil_jax.architecture import CONV_SPECS\n"
        "print(len(CONV_SPECS['caffe']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "5"


def test_one_table_for_model_weights_and_torch_reference():
    from deepmil_jax import weights
    from deepmil_jax.benchmark import torch_reference
    from deepmil_jax.models import LRNS, NORMALIZATIONS

    assert weights.CONV_SPECS is architecture.CONV_SPECS
    assert LRNS is architecture.LRNS and NORMALIZATIONS is architecture.NORMALIZATIONS
    assert torch_reference.CONV_SPECS is architecture.CONV_SPECS
    assert torch_reference._DEFAULTS is architecture.DEFAULTS


def test_expected_shapes():
    shapes = architecture.expected_shapes("caffe")
    assert shapes["conv2"]["kernel"] == (5, 5, 48, 256)  # two groups
    assert shapes["fc6"]["kernel"] == (9216, 4096)
    assert "fc6" not in architecture.expected_shapes("torchvision", fc=False)
    with pytest.raises(ConfigError, match="unknown AlexNet variant 'vgg'"):
        architecture.expected_shapes("vgg")
