"""The torch part: the same network, loss and Adam step in PyTorch (``torch_reference``), timed by
``train_timer`` in alternation with the JAX step, and the JAX / PyTorch ratios."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from absl import logging

from deepmil_jax.benchmark.settings import Setup
from deepmil_jax.benchmark.timing import Figures, median


def torch_steps(setup: Setup) -> tuple[Callable[[int], int], dict[str, Any]] | None:
    """(n steps on the fixed batch -> images done, what PyTorch ran with), or None without the
    torch extra or for a scheme the reference lacks. On the GPU when JAX runs on an accelerator
    and torch sees CUDA."""
    config = setup.config
    if config.scheme not in ("alexnet", "max_pooling", "label_assign", "sparse") or isinstance(
        config.k, str
    ):
        logging.warning(
            "The PyTorch reference has the paper's schemes with a fixed k only; no torch "
            "comparison for --scheme=%s --k=%s",
            config.scheme,
            config.k,
        )
        return None
    try:
        import torch

        from deepmil_jax.benchmark import torch_reference
    except ImportError as e:  # the torch extra is not installed
        logging.warning("PyTorch is not available (%s); no torch comparison", e)
        return None
    device = "cuda" if setup.on_accelerator and torch.cuda.is_available() else "cpu"
    if setup.on_accelerator and device == "cpu":
        logging.warning(
            "JAX runs on %s but torch sees no CUDA device; torch runs on the CPU",
            jax.default_backend(),
        )
    trainer = torch_reference.TorchTrainer(
        config.scheme,
        backbone=config.backbone,
        head_hidden=config.head_hidden,
        k=config.k,
        mu=config.mu,
        lam=config.weight_decay,
        learning_rate=config.learning_rate,
        device=device,
        channels_last=setup.settings.torch_channels_last,
        autocast_bf16=config.precision == "bf16",
        seed=config.seed,
    )
    x, y = trainer.to_device(setup.images, setup.labels)

    def steps(n: int) -> int:
        for _ in range(n):
            loss = trainer.step(x, y)
        loss.item()
        return n * setup.batch

    info = {
        "torch_version": torch.__version__,
        "torch_device": str(trainer.device),
        "torch_channels_last": setup.settings.torch_channels_last,
        "torch_autocast_bf16": trainer.autocast_bf16,
        "torch_threads": torch.get_num_threads(),
    }
    return steps, info


def compare(train: Figures) -> Figures:
    """JAX / PyTorch of the medians, of the best repeats and of each pair of repeats, from the
    train part's figures (which hold both frameworks' rates)."""
    jax_rates = train.per_repeat["train_images_per_sec"]
    torch_rates = train.per_repeat["torch_train_images_per_sec"]
    best_jax, best_torch = max(jax_rates), max(torch_rates)
    paired = [a / b for a, b in zip(jax_rates, torch_rates, strict=True)]
    return Figures(
        {
            "train_vs_torch": median(jax_rates) / median(torch_rates),
            "torch_train_images_per_sec_best": best_torch,
            "train_vs_torch_best": best_jax / best_torch,
            "train_vs_torch_paired_median": median(paired),
        }
    )
