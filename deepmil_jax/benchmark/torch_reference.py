"""The deep MIL network, its losses and its training step in PyTorch: the benchmark's reference.

``python -m deepmil_jax.benchmark`` times the JAX train step against this one in the same run
(``torch_train_images_per_sec``, ``train_vs_torch``), and the tests use the losses here as an
independent implementation of ``deepmil_jax.losses``. torch is imported in this module only; it is
the optional ``torch`` extra.

The network is the one ``deepmil_jax.models.build_model`` builds, layer for layer, so that the two
frameworks do the same work and, given the same parameters (``load_jax_params``), compute the same
instance logits (up to float rounding):

* AlexNet features, NCHW in PyTorch: the ``caffe`` variant (conv1 11x11/4 96, conv2 5x5 256 in 2
  groups, conv3 384, conv4 384 in 2 groups, conv5 256 in 2 groups, ReLU, 3x3/2 max pooling and
  cross-channel LRN in the order and with the constants of ``deepmil_jax.models.LRNS``) or the
  ``torchvision`` variant (no groups, no LRN);
* grey ``(N, 1, H, W)`` images on [0, 1], normalised for the backbone by folding the per-channel
  statistics into conv1 exactly as ``AlexNet.forward_raw`` does (one input channel instead of
  three copies of the grey image: the same result with a third of conv1's work);
* the instance head: optional hidden 1x1 convolutions with ReLU, then a 1x1 convolution to one
  logit, giving ``(N, h, w)`` instance logits; or, for ``scheme="alexnet"``, fc6/fc7 (4096, ReLU,
  dropout) and one logit, as ``(N, 1, 1)``;
* the losses of the paper (Eq. 4, 6, 7) with ``torch.sort``/``torch.topk``, plus
  ``lam / 2 * ||theta||^2`` in the loss, and Adam, as ``deepmil_jax.train`` does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepmil_jax.architecture import CONV_SPECS, FC_GRID, FC_SIZE, LRNS, NORMALIZATIONS
from deepmil_jax.architecture import DEFAULTS as _DEFAULTS
from deepmil_jax.errors import ConfigError

__all__ = [
    "MILNet",
    "TorchTrainer",
    "l2_penalty",
    "label_assign_loss",
    "load_jax_params",
    "max_pooling_loss",
    "scheme_loss",
    "sparse_loss",
]

# ---------------------------------------------------------------------------------------------
# Losses (independent of deepmil_jax.losses: torch.sort / torch.topk and torch's BCE)


def _flat(instance_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = instance_logits.float().flatten(1)  # (N, m)
    if labels.shape != (z.shape[0],):
        raise ValueError(f"labels must be ({z.shape[0]},); got {tuple(labels.shape)}")
    return z, labels.to(z.dtype)


def _top_count(k: int | float, m: int) -> int:
    """An int k (1 <= k <= m), or ceil(k * m) for a fraction k in (0, 1) (at least 1)."""
    if isinstance(k, int):
        if not 1 <= k <= m:
            raise ValueError(f"k={k} must be in 1..{m}")
        return k
    if not 0.0 < k < 1.0:
        raise ValueError(f"a fractional k must be in (0, 1); got {k}")
    return max(1, min(m, math.ceil(k * m - 1e-4)))


def max_pooling_loss(instance_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 4 without the lambda term: BCE of each image's largest instance logit, mean over N."""
    z, y = _flat(instance_logits, labels)
    return F.binary_cross_entropy_with_logits(z.max(dim=1).values, y)


def label_assign_loss(
    instance_logits: torch.Tensor, labels: torch.Tensor, k: int | float
) -> torch.Tensor:
    """Eq. 6 without the lambda term: the top-k instances take the image label, the rest 0.

    Args:
      instance_logits: ``(N, m)`` or ``(N, h, w)``.
      labels: ``(N,)`` 0/1.
      k: int count, or fraction in (0, 1) of the m instances (rounded up).

    Returns:
      Scalar: the instance BCE averaged over all N * m instances.
    """
    z, y = _flat(instance_logits, labels)
    ranked = torch.sort(z, dim=1, descending=True).values
    top = _top_count(k, z.shape[1])
    rank = torch.arange(z.shape[1], device=z.device)[None, :]
    targets = torch.where(rank < top, y[:, None], torch.zeros_like(ranked))
    return F.binary_cross_entropy_with_logits(ranked, targets)


def sparse_loss(instance_logits: torch.Tensor, labels: torch.Tensor, mu: float) -> torch.Tensor:
    """Eq. 7 without the lambda term: max-pooling BCE + mu * L1 of the instance probabilities."""
    z, y = _flat(instance_logits, labels)
    top1 = torch.topk(z, 1, dim=1).values[:, 0]
    return (
        F.binary_cross_entropy_with_logits(top1, y, reduction="none")
        + mu * torch.sigmoid(z).sum(dim=1)
    ).mean()


def scheme_loss(
    scheme: str,
    instance_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int | float = 6,
    mu: float = 1e-5,
) -> torch.Tensor:
    """The data term of ``scheme`` (as ``deepmil_jax.train.scheme_loss``)."""
    if scheme in ("alexnet", "max_pooling"):
        return max_pooling_loss(instance_logits, labels)
    if scheme == "label_assign":
        return label_assign_loss(instance_logits, labels, k)
    if scheme == "sparse":
        return sparse_loss(instance_logits, labels, mu)
    raise ConfigError(f"unknown scheme {scheme!r}")


def l2_penalty(module: nn.Module) -> torch.Tensor:
    """``||theta||^2 / 2`` over every parameter (as ``deepmil_jax.losses.l2_penalty``)."""
    return 0.5 * sum(p.float().pow(2).sum() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# The network


class MILNet(nn.Module):
    """AlexNet features + instance head (or the alexnet scheme's classifier), NCHW.

    ``forward(images (N, 1, H, W) on [0, 1]) -> (N, h, w)`` float32 instance logits
    (``(N, 1, 1)`` for ``scheme="alexnet"``).
    """

    def __init__(
        self,
        scheme: str = "label_assign",
        *,
        backbone: str = "caffe",
        head_hidden: Sequence[int] = (),
        lrn: str | None = None,
        normalization: str | None = None,
        dropout: float = 0.5,
    ):
        super().__init__()
        if backbone not in CONV_SPECS:
            raise ConfigError(f"unknown backbone {backbone!r}; choose one of {list(CONV_SPECS)}")
        default_lrn, default_norm = _DEFAULTS[backbone]
        self.scheme = scheme
        self.backbone = backbone
        self.lrn_spec = LRNS[lrn or default_lrn] if (lrn or default_lrn) else None
        self.norm = NORMALIZATIONS[normalization or default_norm]
        self.specs = CONV_SPECS[backbone]
        self.convs = nn.ModuleList(
            nn.Conv2d(s.in_features, s.out_features, s.kernel, s.stride, s.padding, groups=s.groups)
            for s in self.specs
        )
        if self.lrn_spec is not None:
            r = self.lrn_spec
            # torch: x / (k + alpha / n * sum_n x^2) ** beta; ours: alpha per squared element.
            self.lrn = nn.LocalResponseNorm(r.n, alpha=r.alpha * r.n, beta=r.beta, k=r.k)
        features = self.specs[-1].out_features
        if scheme == "alexnet":
            self.fc = nn.ModuleList(
                [nn.Linear(FC_GRID * FC_GRID * features, FC_SIZE), nn.Linear(FC_SIZE, FC_SIZE)]
            )
            self.dropout = nn.Dropout(dropout)
            self.logit = nn.Linear(FC_SIZE, 1)
        else:
            sizes = [features, *head_hidden]
            self.hidden = nn.ModuleList(
                nn.Conv2d(a, b, 1) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            )
            self.logit = nn.Conv2d(sizes[-1], 1, 1)

    def _conv1_folded(self, images: torch.Tensor) -> torch.Tensor:
        """conv1 of the grey image repeated in 3 channels and normalised per channel, exactly."""
        s, conv = self.specs[0], self.convs[0]
        w = conv.weight  # (out, 3, kh, kw)
        std = torch.tensor(self.norm.std, dtype=w.dtype, device=w.device)
        mean = torch.tensor(self.norm.mean, dtype=w.dtype, device=w.device)
        k_scale = torch.einsum("ochw,c->ohw", w, self.norm.scale / std)[:, None]
        k_mean = torch.einsum("ochw,c->ohw", w, mean / std)[:, None]
        if s.padding == 0:
            offset = (conv.bias - k_mean.sum(dim=(1, 2, 3)))[None, :, None, None]
        else:
            ones = torch.ones((1, 1, *images.shape[2:]), dtype=w.dtype, device=w.device)
            offset = conv.bias[None, :, None, None] - F.conv2d(
                ones, k_mean, stride=s.stride, padding=s.padding
            )
        y = F.conv2d(images, k_scale, stride=s.stride, padding=s.padding)
        return y + offset.to(y.dtype)

    def _pool_stage(self, x: torch.Tensor) -> torch.Tensor:
        if self.lrn_spec is None:
            return F.max_pool2d(x, 3, 2)
        if self.lrn_spec.before_pool:
            return F.max_pool2d(self.lrn(x), 3, 2)
        return self.lrn(F.max_pool2d(x, 3, 2))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 1, H, W)`` on [0, 1] -> ``(N, 256, h, w)``."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ConfigError(f"images must be (N, 1, H, W); got {tuple(images.shape)}")
        x = self._pool_stage(F.relu(self._conv1_folded(images)))
        x = self._pool_stage(F.relu(self.convs[1](x)))
        x = F.relu(self.convs[2](x))
        x = F.relu(self.convs[3](x))
        x = F.relu(self.convs[4](x))
        return F.max_pool2d(x, 3, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)
        if self.scheme == "alexnet":
            n = x.shape[0]
            x = x.permute(0, 2, 3, 1).reshape(n, -1)  # (h, w, c) order, as the JAX model's fc6
            for fc in self.fc:
                x = self.dropout(F.relu(fc(x)))
            return self.logit(x).float().reshape(n, 1, 1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.logit(x)[:, 0].float()


def _np(x: Any) -> np.ndarray:
    return np.array(x, dtype=np.float32)  # a writable copy (torch.from_numpy warns otherwise)


def load_jax_params(net: MILNet, params: Mapping[str, Any]) -> None:
    """Copy a JAX model's parameters into ``net``.

    Args:
      net: the torch network of the same scheme, backbone and head.
      params: ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` of the ``build_model`` model:
        ``{"backbone": {"conv1": {"kernel": (kh, kw, in/g, out), "bias"}, ...}, "head":
        {"hidden": {0: {"kernel": (in, out), "bias"}, ...}, "logit": {...}}}`` (MIL schemes) or
        ``{"backbone": ..., "fc6", "fc7", "fc8"}`` (alexnet).
    """
    with torch.no_grad():
        for s, conv in zip(net.specs, net.convs, strict=True):
            p = params["backbone"][s.name]
            conv.weight.copy_(torch.from_numpy(_np(p["kernel"]).transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(_np(p["bias"])))
        if net.scheme == "alexnet":
            for name, layer in (("fc6", net.fc[0]), ("fc7", net.fc[1]), ("fc8", net.logit)):
                layer.weight.copy_(torch.from_numpy(_np(params[name]["kernel"]).T.copy()))
                layer.bias.copy_(torch.from_numpy(_np(params[name]["bias"])))
            return
        head = params["head"]
        hidden = head.get("hidden", {}) or {}
        layers = [*(hidden[i] for i in sorted(hidden, key=int)), head["logit"]]
        for p, conv in zip(layers, [*net.hidden, net.logit], strict=True):
            kernel = _np(p["kernel"]).T[:, :, None, None]  # (out, in, 1, 1)
            conv.weight.copy_(torch.from_numpy(kernel.copy()))
            conv.bias.copy_(torch.from_numpy(_np(p["bias"])))


class LiteMILNet(nn.Module):
    """EfficientNet-Lite features (the ``efficientnet-lite-pytorch`` package's network, the test
    reference of ``deepmil_jax.models.efficientnet``) + the paper's instance head, NCHW, as the
    JAX model trains it: batch norm frozen at its statistics (eval mode; scale and bias train),
    the grey image repeated in three channels and normalised as TF-lite, ``(255 x - 127) / 128``.

    ``forward(images (N, 1, H, W) on [0, 1]) -> (N, h, w)`` float32 instance logits.
    """

    def __init__(self, variant: str = "lite0"):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.features = EfficientNet.from_name(f"efficientnet-{variant}")
        self.logit = nn.Conv2d(1280, 1, 1)

    def train(self, mode: bool = True) -> LiteMILNet:
        super().train(mode)
        for module in self.modules():  # frozen statistics, as the JAX model's FrozenBatchNorm
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.expand(-1, 3, -1, -1) * 255.0 - 127.0) / 128.0
        return self.logit(self.features.extract_features(x))[:, 0].float()


# ---------------------------------------------------------------------------------------------
# Training step


class TorchTrainer:
    """Adam on ``scheme_loss + lam * l2_penalty``: the step ``deepmil_jax.train.Trainer`` jits.

    Args:
      scheme, backbone, head_hidden: the model (as ``build_model``).
      k, mu, lam, learning_rate: the loss and optimiser (defaults as ``train.Config``).
      device: ``"cpu"`` or ``"cuda"``.
      channels_last: NHWC memory format for activations and weights.
      autocast_bf16: bfloat16 autocast for the forward pass (parameters stay float32).
      num_threads: intra-op threads on CPU (default: every CPU of this process).
    """

    def __init__(
        self,
        scheme: str = "label_assign",
        *,
        backbone: str = "caffe",
        head_hidden: Sequence[int] = (),
        k: int | float = 6,
        mu: float = 1e-5,
        lam: float = 1e-5,
        learning_rate: float = 5e-5,
        device: str = "cpu",
        channels_last: bool = False,
        autocast_bf16: bool = False,
        num_threads: int | None = None,
        seed: int = 0,
    ):
        if device == "cpu":
            torch.set_num_threads(num_threads or len(os.sched_getaffinity(0)))
        torch.manual_seed(seed)
        self.scheme, self.k, self.mu, self.lam = scheme, k, mu, lam
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.autocast_bf16 = autocast_bf16
        if backbone.startswith("efficientnet_"):
            if head_hidden or scheme not in ("max_pooling", "label_assign", "sparse"):
                raise ConfigError(
                    "the PyTorch EfficientNet-Lite reference has the paper's schemes and "
                    "logistic-regression head only"
                )
            net = LiteMILNet(backbone.removeprefix("efficientnet_"))
        else:
            net = MILNet(scheme, backbone=backbone, head_hidden=head_hidden)
        self.net = net.to(self.device)
        self.net = self.net.to(memory_format=self.memory_format)
        self.net.train()
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=learning_rate)

    def to_device(
        self, images: np.ndarray, labels: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, H, W, 1)`` float32 numpy images, ``(N,)`` labels -> device tensors (NCHW)."""
        x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).permute(0, 3, 1, 2)
        x = x.to(self.device).contiguous(memory_format=self.memory_format)
        return x, torch.from_numpy(np.asarray(labels)).to(self.device)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            logits = self.net(images)
        data = scheme_loss(self.scheme, logits.float(), labels, k=self.k, mu=self.mu)
        return data + self.lam * l2_penalty(self.net)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One Adam step; returns the loss (a device scalar: call ``.item()`` to wait for it)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(images, labels)
        loss.backward()
        self.optimizer.step()
        return loss.detach()
