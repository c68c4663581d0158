"""Converting pretrained AlexNet files into deepmil-jax parameters (numpy; no JAX or Flax).

Three sources are understood (``FORMATS``):

``torchvision``
    ``alexnet-owt-*.pth``, the ``state_dict`` of ``torchvision.models.alexnet`` (filters
    64-192-384-256-256, no groups, no LRN). Read with ``torch.load(weights_only=True)``, so
    torch is needed (the ``torch`` extra). Kernels are ``(out, in, kh, kw)`` cross-correlations.
``keras_h5``
    ``alexnet_weights.h5`` of heuritech/convnets-keras, the weights the paper's code used
    (filters 96-256-384-384-256; conv2, conv4, conv5 in two groups, stored as separate layers
    ``conv_2_1``/``conv_2_2`` etc.). Keras 1 with the Theano backend: kernels ``(out, in, kh,
    kw)`` and Theano's ``conv2d`` is a *true* convolution (it flips the kernel), so every kernel
    is rotated by 180 degrees here to become the cross-correlation kernel that XLA applies.
``caffe_npy``
    ``bvlc_alexnet.npy`` (Guerzhoy & Frossard's conversion of Caffe's BVLC AlexNet with
    caffe-tensorflow): an ``np.save`` of a dict ``{layer: [W, b]}``, ``W`` in HWIO layout
    (cross-correlation), grouped layers holding ``in/groups`` input channels.

Every reader returns the canonical parameter tree: ``{"conv1": {"kernel": (kh, kw, in/groups,
out), "bias": (out,)}, ..., "conv5": ..., optionally "fc6": {"kernel": (9216, 4096), "bias"},
"fc7": {"kernel": (4096, 4096), "bias"}}``, float32, with ``fc6`` rows in the (h, w, channel)
order of an NHWC flatten of the 6x6x256 map. ``fc8`` (1000 ImageNet classes) is not kept.

Each source also fixes the input normalisation and the LRN flavour that the weights were trained
with (``deepmil_jax.registry.FORMATS``); both are written to ``metadata.json``, which
``load_converted`` returns with the arrays for
``deepmil_jax.models.build_model(..., pretrained=(params, metadata))``:

============  ========  =============  ==================================================
source        variant   lrn            normalization
============  ========  =============  ==================================================
torchvision   torch.    none           ``torchvision``: RGB on [0, 1], mean (0.485, 0.456,
                                       0.406), std (0.229, 0.224, 0.225)
keras_h5      caffe     ``keras``      ``keras``: RGB on [0, 255] minus (123.68, 116.779,
                                       103.939) in RGB order (convnets-keras
                                       ``preprocess_image_batch``, ``color_mode='rgb'``)
caffe_npy     caffe     ``caffe``      ``caffe``: BGR on [0, 255] minus the BVLC ImageNet
                                       mean (104.007, 116.669, 122.679) in BGR order
============  ========  =============  ==================================================

The ``keras`` LRN is convnets-keras' ``crosschannelnormalization`` (after the max pooling,
``x / (2 + 1e-4 * sum_5 x^2) ** 0.75``), the ``caffe`` LRN is Caffe's (before the pooling,
``x / (1 + 1e-4 / 5 * sum_5 x^2) ** 0.75``).

One module a reader (``torchvision_pth``, ``keras_h5``, ``caffe_npy``); ``common`` holds the checks
they share and ``converted`` the dispatch by format and the converted folder. The architecture
table (``ConvSpec``, ``CONV_SPECS``) is ``deepmil_jax.architecture``, re-exported here.
"""

from deepmil_jax.architecture import CONV_SPECS, FC_GRID, FC_SIZE, ConvSpec, expected_shapes
from deepmil_jax.weights.caffe_npy import (
    RestrictedUnpickler,
    load_npy_pickle_safely,
    read_caffe_npy,
)
from deepmil_jax.weights.common import Params, validate
from deepmil_jax.weights.converted import (
    FORMATS,
    METADATA_FILE,
    METADATA_VERSION,
    PARAMS_DIR,
    convert,
    load_converted,
    read_weights,
    save_converted,
    validate_params,
)
from deepmil_jax.weights.keras_h5 import read_keras_h5, theano_kernel_to_hwio
from deepmil_jax.weights.packaged import packaged
from deepmil_jax.weights.torchvision_pth import read_torchvision

__all__ = [
    "CONV_SPECS",
    "FC_GRID",
    "FC_SIZE",
    "FORMATS",
    "METADATA_FILE",
    "METADATA_VERSION",
    "PARAMS_DIR",
    "ConvSpec",
    "Params",
    "RestrictedUnpickler",
    "convert",
    "expected_shapes",
    "load_converted",
    "load_npy_pickle_safely",
    "packaged",
    "read_caffe_npy",
    "read_keras_h5",
    "read_torchvision",
    "read_weights",
    "save_converted",
    "theano_kernel_to_hwio",
    "validate",
    "validate_params",
]
