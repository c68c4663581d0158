"""Flax NNX models: the backbones (AlexNet caffe/torchvision, EfficientNet-Lite, ResNet), the MIL
network, the baseline. Which backbone and pooling a name means is ``deepmil_jax.registry``'s.

Public API::

    AlexNet(variant="caffe", *, lrn=None, normalization=None, dtype, param_dtype, rngs)
    AlexNet.from_converted(params, metadata, *, dtype, param_dtype)
    normalize(images, kind)
    InstanceHead(in_features=256, hidden=(), *, dtype, param_dtype, rngs)
    DeepMIL(backbone, head, pooling=None)  # .instances_and_bag(images) -> (scores, bag logits)
    FixedPooling(pooling="max", *, k=6), LearnedLSEPooling(temperature=1.0)
    AttentionPooling(in_features=256, hidden=128, *, gated=False, dtype, param_dtype, rngs)
    AlexNetClassifier(backbone, *, dropout=0.5, dtype, param_dtype, rngs)
    build_model(scheme, *, backbone="caffe", head_hidden=(), pretrained=None, ...)

Modules only: no file is read here. ImageNet weights are read by ``deepmil_jax.weights``::

    build_model(scheme, backbone=..., pretrained=weights.load_converted(path), rngs=...)
"""

from deepmil_jax.models.alexnet import (
    LRNS,
    NORMALIZATIONS,
    AlexNet,
    local_response_norm,
    max_pool,
    normalize,
)
from deepmil_jax.models.mil import (
    AlexNetClassifier,
    AttentionPooling,
    DeepMIL,
    FixedPooling,
    InstanceHead,
    LearnedLSEPooling,
    build_backbone,
    build_model,
)

__all__ = [
    "LRNS",
    "NORMALIZATIONS",
    "AlexNet",
    "AlexNetClassifier",
    "AttentionPooling",
    "DeepMIL",
    "FixedPooling",
    "InstanceHead",
    "LearnedLSEPooling",
    "build_backbone",
    "build_model",
    "local_response_norm",
    "max_pool",
    "normalize",
]
