r"""Convert ImageNet-pretrained AlexNet weights into a deepmil-jax folder.

    python -m deepmil_jax.convert_weights --format=FORMAT --input=FILE --output=DIR [--overwrite]

Formats (--format) and where to get each file:

  keras_h5     alexnet_weights.h5 of heuritech/convnets-keras: the weights the paper's code used
               (Caffe/BVLC AlexNet, 96-256-384-384-256 filters, groups, LRN). It was published at
               http://files.heuritech.com/weights/alexnet_weights.h5 (that host may no longer
               serve it; copies circulate under that name). Keras 1 / Theano layout; kernels
               are rotated by 180 degrees because Theano's conv2d is a true convolution. Also
               gives fc6/fc7 (dense_1/dense_2) for --scheme=alexnet. Input: RGB on 0-255 minus
               (123.68, 116.779, 103.939).
  caffe_npy    bvlc_alexnet.npy, Caffe's BVLC AlexNet converted by Guerzhoy & Frossard
               (http://www.cs.toronto.edu/~guerzhoy/tf_alexnet/), widely mirrored. Same
               filters; Caffe's LRN constants and order (LRN before pooling). Read without
               running pickled code. Input: BGR on 0-255 minus (104.0, 116.7, 122.7).
  torchvision  alexnet-owt-*.pth, torchvision.models.alexnet's state_dict (download with
               torchvision, or from https://download.pytorch.org/models/alexnet-owt-7be5be79.pth).
               The 64-192-384-256-256 variant without groups or LRN (backbone "torchvision").
               Needs PyTorch (pip install 'deepmil-jax[torch]'). Input: RGB on [0, 1] with
               ImageNet mean/std.

DIR receives an Orbax checkpoint (DIR/params) and DIR/metadata.json (variant, source format,
input file name, normalization, LRN flavour). Use it with
`python -m deepmil_jax.train --init=imagenet:DIR`, or in Python
`build_model(scheme, pretrained=weights.load_converted(DIR), ...)`; the normalisation is applied
by the model from the metadata, training feeds [0, 1] images.
"""

from __future__ import annotations

if __name__ == "__main__":  # flags and --help are answered before Orbax and h5py load
    from deepmil_jax import cli as _cli
    from deepmil_jax import config as _settings

    _cli.parse_flags_early(_settings.ConvertWeights)

import json

from absl import logging

from deepmil_jax import weights
from deepmil_jax.cli import run_main
from deepmil_jax.config import ConvertWeights
from deepmil_jax.errors import ConfigError


def main(settings: ConvertWeights) -> None:
    for name in ("input", "output"):
        if not getattr(settings, name):
            raise ConfigError(f"--{name} is required; see --help.")
    out = weights.convert(
        settings.format, settings.input, settings.output, overwrite=settings.overwrite
    )
    meta = json.loads((out / weights.METADATA_FILE).read_text())
    line = f"wrote {out} (variant={meta['variant']}, normalization={meta['normalization']})"
    logging.info(line)
    print(line)


if __name__ == "__main__":
    run_main(main, ConvertWeights)
