"""The instance head, the deep multi-instance network and the paper's AlexNet baseline.

``DeepMIL`` (Zhu et al. 2017, Sec. 2): AlexNet features of a whole mammogram give an ``h x w``
grid of instances; a logistic regression per instance (a 1x1 convolution to one logit) scores each
one, and the MIL losses (``deepmil_jax.losses``: max pooling Eq. 4, label assignment Eq. 6,
sparse Eq. 7) turn the ``(N, h, w)`` instance logits into a bag prediction.

``AlexNetClassifier`` is the paper's "AlexNet" baseline: the same features followed by AlexNet's
fully connected layers and one logit, returned as a 1x1 instance map ``(N, 1, 1)`` so the same
losses apply (max pooling over a single instance is plain binary cross-entropy).

Every model also gives its bag (image) logits with ``instances_and_bag(images)``: the paper's
schemes pool by the maximum (Eq. 2-3); the other MIL poolings (``registry.SCHEMES``) are modules
here (``FixedPooling``, ``AttentionPooling``, ``LearnedLSEPooling``) whose arithmetic is the pure
functions of ``deepmil_jax.losses``. Training, evaluation and prediction all use that bag logit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from deepmil_jax import losses, registry
from deepmil_jax.architecture import FC_GRID, FC_LAYERS, FC_SIZE
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


ATTENTION_HIDDEN = 128  # L of Ilse et al.'s attention network (their MNIST-bags and histology: 128)


class FixedPooling(nnx.Module):
    """A pooling without parameters: ``losses.bag_logits(z, pooling=..., k=..., temperature=1)``.

    The instance scores (heatmaps, the top patch) are the instance logits themselves.
    """

    def __init__(self, pooling: str = "max", *, k: int | float = 6):
        if pooling not in losses.POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; choose one of {losses.POOLINGS}")
        self.pooling = pooling
        self.k = k

    def instance_scores(self, features: jax.Array, instance_logits: jax.Array) -> jax.Array:
        return instance_logits

    def __call__(
        self, features: jax.Array, instance_logits: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """(features (N, h, w, C), instance logits (N, h, w)) -> (scores (N, h, w), bag (N,))."""
        bag = losses.bag_logits(instance_logits, pooling=self.pooling, k=self.k)
        return instance_logits, bag


class AttentionPooling(nnx.Module):
    """Attention MIL pooling (Ilse, Tomczak & Welling, ICML 2018, Eq. 8-9) of instance logits.

    Attention scores from the backbone features h_j (C channels): w^T tanh(V h_j), or with
    ``gated=True`` w^T (tanh(V h_j) * sigmoid(U h_j)) (their gated attention), softmax-normalised
    over the instances into weights a_j; the bag logit is sum_j a_j z_j
    (``losses.attention_pooling``). With the paper's linear instance head this is exactly Ilse et
    al.'s classifier on the attention-weighted embedding sum_j a_j h_j (the weights sum to 1).

    Instance scores for heatmaps: the attention-weighted instance logits m * a_j * z_j (m: the
    number of instances), not the plain z_j. Why: the bag logit is their mean, so the heatmap
    decomposes the prediction exactly into what each patch contributed, and uniform attention
    gives back z_j. The plain z_j are a poor map here: the gradient reaching z_j is scaled by a_j,
    so patches the attention ignores keep untrained, arbitrary logits that the prediction never
    used; weighting by a_j sends them to 0 (probability 0.5, "not looked at"). The top patch is
    the one that contributed most to the malignancy logit.
    """

    def __init__(
        self,
        in_features: int = 256,
        hidden: int = ATTENTION_HIDDEN,
        *,
        gated: bool = False,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.gated = gated
        self.V = nnx.Linear(in_features, hidden, **kw)
        if gated:
            self.U = nnx.Linear(in_features, hidden, **kw)
        self.w = nnx.Linear(hidden, 1, **kw)

    def attention_logits(self, features: jax.Array) -> jax.Array:
        """Features ``(N, h, w, C)`` -> unnormalised attention scores ``(N, h, w)`` in float32."""
        x = jnp.tanh(self.V(features))
        if self.gated:
            x = x * nnx.sigmoid(self.U(features))
        return self.w(x)[..., 0].astype(jnp.float32)

    def __call__(
        self, features: jax.Array, instance_logits: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """(features, instance logits (N, h, w)) -> (m a_j z_j (N, h, w), bag logits (N,))."""
        bag, weights = losses.attention_pooling(instance_logits, self.attention_logits(features))
        m = instance_logits.shape[1] * instance_logits.shape[2]
        return m * weights * instance_logits, bag

    def instance_scores(self, features: jax.Array, instance_logits: jax.Array) -> jax.Array:
        return self(features, instance_logits)[0]


class LearnedLSEPooling(nnx.Module):
    """Log-sum-exp pooling with a learned sharpness: (1/T) log mean_j exp(T z_j), T = exp(t).

    ``losses.bag_logits(pooling="lse")`` with the temperature a parameter learned with the rest
    of the network (started at ``temperature``; T -> 0 is the mean of the logits, T -> inf their
    maximum), so the data choose between averaging the evidence and trusting the one most
    suspicious patch. The log parametrisation keeps T positive. The weight-decay term of the
    loss also pulls t towards 0 (T = 1), with the same small lambda as every parameter.
    Instance scores for heatmaps: the instance logits (the pooling is monotone in each of them).
    """

    def __init__(self, temperature: float = 1.0):
        self.log_temperature = nnx.Param(jnp.asarray(math.log(temperature), jnp.float32))

    @property
    def temperature(self) -> jax.Array:
        return jnp.exp(self.log_temperature[...])

    def instance_scores(self, features: jax.Array, instance_logits: jax.Array) -> jax.Array:
        return instance_logits

    def __call__(
        self, features: jax.Array, instance_logits: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        bag = losses.bag_logits(instance_logits, pooling="lse", temperature=self.temperature)
        return instance_logits, bag


class DeepMIL(nnx.Module):
    """Deep multi-instance network: raw ``(N, H, W, 1)`` images on [0, 1] -> ``(N, h, w)`` scores.

    ``model(images)`` gives the instance scores drawn in heatmaps (the instance logits, or for
    attention MIL the attention-weighted ones, see ``AttentionPooling``);
    ``model.instances_and_bag(images)`` gives them with the ``(N,)`` bag logits of the model's
    ``pooling`` (default: max pooling, the paper's Eq. 2-3).

    Applies the backbone's own input normalisation (``AlexNet.forward_raw``), so training code
    feeds [0, 1] images whatever the pretrained weights expect.
    """

    def __init__(self, backbone: AlexNet, head: InstanceHead, pooling: nnx.Module | None = None):
        self.backbone = backbone
        self.head = head
        self.pooling = FixedPooling("max") if pooling is None else pooling

    def __call__(self, images: jax.Array) -> jax.Array:
        features = self.backbone.forward_raw(images)
        return self.pooling.instance_scores(features, self.head(features))

    def instances_and_bag(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(N, H, W, 1)`` images -> (instance scores ``(N, h, w)``, bag logits ``(N,)``),
        float32."""
        features = self.backbone.forward_raw(images)
        return self.pooling(features, self.head(features))


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

    def instances_and_bag(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(the ``(N, 1, 1)`` logit map, the same logits as ``(N,)`` bag logits)."""
        logits = self(images)
        return logits, logits.reshape(-1)


def _pretrained_arrays(
    pretrained: tuple[Mapping[str, Any], Mapping[str, Any]], backbone: str
) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """``pretrained`` as (params, metadata), refusing a path and weights of another backbone."""
    if isinstance(pretrained, (str, os.PathLike)):
        raise ConfigError(
            f"pretrained={os.fspath(pretrained)!r} is a path; build_model takes the arrays: pass "
            "pretrained=deepmil_jax.weights.load_converted(path)"
        )
    params, metadata = pretrained
    if metadata["variant"] != registry.BACKBONES[backbone].variant:
        source = f" (from {metadata['input_file']})" if "input_file" in metadata else ""
        raise ConfigError(
            f"the pretrained weights{source} are for the {metadata['variant']} backbone but "
            f"backbone={backbone!r}; pass backbone={metadata['variant']!r} (--backbone)"
        )
    return params, metadata


def build_backbone(
    backbone: str,
    *,
    pretrained: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
    output_stride: int = 32,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """The feature extractor ``backbone`` (a ``registry.BACKBONES`` name), random or holding
    ``pretrained`` = ``weights.load_converted``'s (params, metadata)."""
    entry = registry.backbone(backbone, "backbone")
    cls = registry.resolve(entry.model)
    kw: dict[str, Any] = {"dtype": dtype, "param_dtype": param_dtype}
    if entry.family == "resnet":
        kw["output_stride"] = output_stride
    if pretrained is None:
        if entry.family != "alexnet":
            kw["classifier"] = False  # the ImageNet classifier is only for checking weights
        return cls(entry.variant, **kw, rngs=rngs)
    params, metadata = _pretrained_arrays(pretrained, backbone)
    return cls.from_converted(params, metadata, **kw)


def build_pooling(
    scheme: str, in_features: int, *, k: int | float = 6, dtype: Any, param_dtype: Any, rngs
) -> nnx.Module:
    """The bag pooling of ``scheme`` (its registry entry's ``pooling``)."""
    pooling = registry.scheme(scheme, "scheme").pooling
    if pooling in ("attention", "gated_attention"):
        return AttentionPooling(
            in_features,
            gated=pooling == "gated_attention",
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
    if pooling == "learned_lse":
        return LearnedLSEPooling()
    return FixedPooling(pooling, k=k)


def build_model(
    scheme: str,
    *,
    backbone: str = "caffe",
    head_hidden: Sequence[int] = (),
    pretrained: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
    dropout: float = 0.5,
    k: int | float = 6,
    output_stride: int = 32,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """The model of a training scheme.

    Args:
      scheme: a ``registry.SCHEMES`` name. Its ``model`` ``"classifier"`` (``alexnet``) gives
        :class:`AlexNetClassifier` (``(N, 1, 1)`` logits, 227x227 input); ``"mil"`` gives
        :class:`DeepMIL` (``(N, h, w)``) with the scheme's ``pooling``: a ``losses.bag_logits``
        pooling (:class:`FixedPooling`; max for the paper's three), :class:`AttentionPooling`
        or :class:`LearnedLSEPooling`.
      backbone: a ``registry.BACKBONES`` name; must match the pretrained weights.
      head_hidden: hidden 1x1 layer sizes of the instance head (``()`` = logistic regression).
      pretrained: ``(params, metadata)`` as ``deepmil_jax.weights.load_converted(path)`` returns
        them (ImageNet weights), or None for random initialisation. The instance head, the
        pooling's parameters (and fc8 of the classifier) always start fresh. Only arrays are
        copied here; reading the folder is the caller's.
      dropout: dropout rate of the classifier's fully connected layers (alexnet scheme only).
      k: instances pooled by a ``"topk_mean"`` pooling (a count, or a fraction in (0, 1)).
      output_stride: 32, or 16 for a ResNet with a dilated layer4.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); ``param_dtype``: parameter dtype.
      rngs: random streams for initialisation (and ``dropout``).
    """
    entry = registry.scheme(scheme, "scheme")
    registry.backbone(backbone, "backbone")
    kw = {"dtype": dtype, "param_dtype": param_dtype}
    if entry.model == "classifier":
        if registry.BACKBONES[backbone].family != "alexnet":
            raise ConfigError(f"the {scheme} scheme needs an AlexNet backbone; got {backbone!r}")
        if pretrained is None:
            features = AlexNet(backbone, **kw, rngs=rngs)
            return AlexNetClassifier(features, dropout=dropout, **kw, rngs=rngs)
        params, metadata = _pretrained_arrays(pretrained, backbone)
        return AlexNetClassifier.from_converted(params, metadata, dropout=dropout, **kw, rngs=rngs)
    features = build_backbone(
        backbone, pretrained=pretrained, output_stride=output_stride, **kw, rngs=rngs
    )
    head = InstanceHead(features.out_features, tuple(head_hidden), **kw, rngs=rngs)
    pooling = build_pooling(scheme, features.out_features, k=k, **kw, rngs=rngs)
    return DeepMIL(features, head, pooling)
