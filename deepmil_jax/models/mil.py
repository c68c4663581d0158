"""The instance head, the deep multi-instance network and the paper's AlexNet baseline.

``DeepMIL`` (Zhu et al. 2017, Sec. 2): AlexNet features of a whole mammogram give an ``h x w``
grid of instances; a logistic regression per instance (a 1x1 convolution to one logit) scores each
one, and the MIL losses (``deepmil_jax.losses``: max pooling Eq. 4, label assignment Eq. 6,
sparse Eq. 7) turn the ``(N, h, w)`` instance logits into a bag prediction.

``AlexNetClassifier`` is the paper's "AlexNet" baseline: the same features followed by AlexNet's
fully connected layers and one logit, returned as a 1x1 instance map ``(N, 1, 1)`` so the same
losses apply (max pooling over a single instance is plain binary cross-entropy).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from deepmil_jax.architecture import FC_GRID, FC_LAYERS, FC_SIZE
from deepmil_jax.config import SCHEMES
from deepmil_jax.errors import ConfigError
from deepmil_jax.models.alexnet import AlexNet, copy_params


class InstanceHead(nnx.Module):
    """Per-instance classifier: optional hidden 1x1 convolutions with ReLU, then a 1x1 to 1 logit.

    ``hidden=()`` is the paper's logistic regression; the released Keras code used ``(128, 128)``.
    A 1x1 convolution over NHWC is a dense layer over the channel axis, which is how it is computed.
    """

    def __init__(
        self,
        in_features: int = 256,
        hidden: Sequence[int] = (),
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        sizes = [in_features, *hidden]
        self.hidden = nnx.List(
            [
                nnx.Linear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )
        self.logit = nnx.Linear(sizes[-1], 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        """Features ``(N, h, w, C)`` -> instance logits ``(N, h, w)`` in float32."""
        x = features
        for layer in self.hidden:
            x = nnx.relu(layer(x))
        return self.logit(x)[..., 0].astype(jnp.float32)


class DeepMIL(nnx.Module):
    """Deep multi-instance network: raw ``(N, H, W, 1)`` images on [0, 1] -> ``(N, h, w)`` logits.

    Applies the backbone's own input normalisation (``AlexNet.forward_raw``), so training code
    feeds [0, 1] images whatever the pretrained weights expect.
    """

    def __init__(self, backbone: AlexNet, head: InstanceHead):
        self.backbone = backbone
        self.head = head

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.backbone.forward_raw(images))


class AlexNetClassifier(nnx.Module):
    """The paper's AlexNet baseline: features -> fc6 4096 -> fc7 4096 -> 1 logit, as ``(N, 1, 1)``.

    ReLU and dropout (rate ``dropout``, active in ``model.train()`` mode, off after
    ``model.eval()``) follow fc6 and fc7, as in the convnets-keras model. The fully connected
    layers need the 6x6 map of a 227x227 input (224 also works for the torchvision variant).
    """

    def __init__(
        self,
        backbone: AlexNet,
        *,
        dropout: float = 0.5,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype}
        self.backbone = backbone
        self.fc6 = nnx.Linear(FC_GRID * FC_GRID * backbone.out_features, FC_SIZE, **kw, rngs=rngs)
        self.fc7 = nnx.Linear(FC_SIZE, FC_SIZE, **kw, rngs=rngs)
        self.fc8 = nnx.Linear(FC_SIZE, 1, **kw, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    @classmethod
    def from_converted(
        cls,
        params: Mapping[str, Mapping[str, Any]],
        metadata: Mapping[str, Any],
        *,
        dropout: float = 0.5,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ) -> AlexNetClassifier:
        """The classifier holding ``weights.load_converted``'s (params, metadata).

        Built abstractly, then filled: the features and fc6/fc7 from ``params``; fc8 (and fc6,
        fc7 when ``params`` lacks them) and the dropout stream fresh from ``rngs``.
        """
        kw = {"dtype": dtype, "param_dtype": param_dtype}
        backbone = AlexNet.from_converted(params, metadata, **kw)
        variant, lrn, norm = backbone.variant, backbone.lrn, backbone.normalization
        model = nnx.eval_shape(
            lambda: cls(
                AlexNet(variant, lrn=lrn, normalization=norm, **kw, rngs=nnx.Rngs(0)),
                dropout=dropout,
                **kw,
                rngs=nnx.Rngs(0),
            )
        )
        model.backbone = backbone
        fan_in = {"fc6": FC_GRID * FC_GRID * backbone.out_features, "fc7": FC_SIZE}
        missing = [name for name in FC_LAYERS if name not in params]
        if missing:
            logging.warning("the pretrained weights have no %s; those start random", missing)
        for name in FC_LAYERS:
            if name in params:
                copy_params(getattr(model, name), params, name, "the alexnet scheme")
            else:
                setattr(model, name, nnx.Linear(fan_in[name], FC_SIZE, **kw, rngs=rngs))
        model.fc8 = nnx.Linear(FC_SIZE, 1, **kw, rngs=rngs)
        model.dropout = nnx.Dropout(dropout, rngs=rngs)
        return model

    def __call__(self, images: jax.Array) -> jax.Array:
        """Raw ``(N, 227, 227, 1)`` images on [0, 1] -> logits ``(N, 1, 1)`` in float32."""
        features = self.backbone.forward_raw(images)
        n, h, w, _ = features.shape
        if (h, w) != (FC_GRID, FC_GRID):
            raise ConfigError(
                f"the alexnet scheme's fully connected layers need a {FC_GRID}x{FC_GRID} feature "
                f"map (227x227 images); images of {images.shape[1]}x{images.shape[2]} give "
                f"{h}x{w}. "
                "Resize the images to 227x227, or use a MIL scheme (max_pooling, label_assign, "
                "sparse), which accepts any size"
            )
        x = features.reshape(n, -1)  # (h, w, c) order, matching the converted fc6
        x = self.dropout(nnx.relu(self.fc6(x)))
        x = self.dropout(nnx.relu(self.fc7(x)))
        return self.fc8(x).astype(jnp.float32).reshape(n, 1, 1)


def _pretrained_arrays(
    pretrained: tuple[Mapping[str, Any], Mapping[str, Any]], backbone: str
) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """``pretrained`` as (params, metadata), refusing a path and weights of another variant."""
    if isinstance(pretrained, (str, os.PathLike)):
        raise ConfigError(
            f"pretrained={os.fspath(pretrained)!r} is a path; build_model takes the arrays: pass "
            "pretrained=deepmil_jax.weights.load_converted(path)"
        )
    params, metadata = pretrained
    if metadata["variant"] != backbone:
        source = f" (from {metadata['input_file']})" if "input_file" in metadata else ""
        raise ConfigError(
            f"the pretrained weights{source} are for the {metadata['variant']} AlexNet but "
            f"backbone={backbone!r}; pass backbone={metadata['variant']!r} (--backbone)"
        )
    return params, metadata


def build_model(
    scheme: str,
    *,
    backbone: str = "caffe",
    head_hidden: Sequence[int] = (),
    pretrained: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
    dropout: float = 0.5,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """The model of a training scheme.

    Args:
      scheme: ``"alexnet"`` -> :class:`AlexNetClassifier` (``(N, 1, 1)`` logits, 227x227 input);
        ``"max_pooling"``, ``"label_assign"``, ``"sparse"`` -> :class:`DeepMIL` (``(N, h, w)``).
      backbone: ``"caffe"`` (the paper's) or ``"torchvision"``; must match the pretrained weights.
      head_hidden: hidden 1x1 layer sizes of the instance head (``()`` = logistic regression).
      pretrained: ``(params, metadata)`` as ``deepmil_jax.weights.load_converted(path)`` returns
        them (ImageNet weights; the LRN flavour and normalisation come from ``metadata``), or
        None for random initialisation. The instance head (and fc8 of the classifier) always
        start fresh. Only arrays are copied here; reading the folder is the caller's.
      dropout: dropout rate of the classifier's fully connected layers (alexnet scheme only).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); ``param_dtype``: parameter dtype.
      rngs: random streams for initialisation (and ``dropout``).
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown scheme {scheme!r}; choose one of {list(SCHEMES)}")
    kw = {"dtype": dtype, "param_dtype": param_dtype}
    if pretrained is None:
        features = AlexNet(backbone, **kw, rngs=rngs)
        if scheme == "alexnet":
            return AlexNetClassifier(features, dropout=dropout, **kw, rngs=rngs)
    else:
        params, metadata = _pretrained_arrays(pretrained, backbone)
        if scheme == "alexnet":
            return AlexNetClassifier.from_converted(
                params, metadata, dropout=dropout, **kw, rngs=rngs
            )
        features = AlexNet.from_converted(params, metadata, **kw)
    head = InstanceHead(features.out_features, tuple(head_hidden), **kw, rngs=rngs)
    return DeepMIL(features, head)
