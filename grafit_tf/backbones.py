"""Trunks: image `[N, H, W, C]` (float32, 0..255) -> pooled feature `[N, F]`.

Each starts with the dataset's input normalisation (mean / std), so the saved
embedder takes raw pixels and no client needs the statistics.
"""

import os
import warnings

import keras
from keras import layers

from grafit_tf import regnet
from grafit_tf.errors import UserError


def normalization(mean, std):
    """Fixed per-channel `(x - mean) / std`, saved with the model."""
    return layers.Normalization(
        mean=list(mean), variance=[s * s for s in std], name="normalize"
    )


def batch_norm(sync, name):
    # synchronized=True makes the statistics global across replicas (TF backend).
    return layers.BatchNormalization(synchronized=sync, momentum=0.9, name=name)


def _basic_block(x, filters, stride, use_bn, sync_bn, name):
    """A pre-activation-free ResNet basic block (two 3x3 convolutions)."""
    shortcut = x
    y = layers.Conv2D(filters, 3, stride, "same", use_bias=not use_bn, name=f"{name}_conv1")(x)
    if use_bn:
        y = batch_norm(sync_bn, f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(filters, 3, 1, "same", use_bias=not use_bn, name=f"{name}_conv2")(y)
    if use_bn:
        y = batch_norm(sync_bn, f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(
            filters, 1, stride, use_bias=not use_bn, name=f"{name}_proj"
        )(x)
        if use_bn:
            shortcut = batch_norm(sync_bn, f"{name}_proj_bn")(shortcut)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, shortcut]))


def small_resnet(input_shape, mean, std, width=32, blocks=(1, 1, 1), use_bn=True,
                 sync_bn=False, name="small_resnet"):
    """A compact ResNet for images of at most 64 px (Fashion-MNIST, CIFAR).

    A 3x3 stem at full resolution, then one stage per entry of `blocks`, each
    halving the resolution and doubling the width: 28x28 -> 14 -> 7 -> 4 with
    the defaults, features of `width * 2**len(blocks)` channels.

    Args:
        input_shape: `(H, W, C)`.
        mean, std: per-channel input statistics in 0..255 units.
        width: channels of the stem.
        blocks: basic blocks per stage.
        use_bn: batch norm after each convolution (off for exact replica tests).
        sync_bn: synchronised (cross-replica) batch norm.

    Returns:
        A `keras.Model` `[N, H, W, C] -> [N, width * 2**len(blocks)]`.
    """
    stages = [(width * 2 ** (s + 1), count, 2) for s, count in enumerate(blocks)]
    return _stem_resnet(input_shape, mean, std, width, stages, use_bn, sync_bn, name)


def resnet18_small(input_shape, mean, std, use_bn=True, sync_bn=False, name="resnet18"):
    """ResNet-18 with a 3x3 stem and no max-pool, MaskCon's (and most CIFAR papers')
    trunk for 32 px images: stem 64, then stages of two basic blocks at 64 (stride 1),
    128, 256, 512 channels (stride 2); 11.2M parameters.

    Returns:
        A `keras.Model` `[N, H, W, C] -> [N, 512]`.
    """
    stages = [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)]
    return _stem_resnet(input_shape, mean, std, 64, stages, use_bn, sync_bn, name)


def _stem_resnet(input_shape, mean, std, stem, stages, use_bn, sync_bn, name):
    """3x3 stem at full resolution, then `stages` of `(filters, blocks, stride)`."""
    inputs = keras.Input(input_shape, name="image")
    x = normalization(mean, std)(inputs)
    x = layers.Conv2D(stem, 3, 1, "same", use_bias=not use_bn, name="stem_conv")(x)
    if use_bn:
        x = batch_norm(sync_bn, "stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for s, (filters, count, stride) in enumerate(stages):
        for b in range(count):
            x = _basic_block(x, filters, stride if b == 0 else 1, use_bn, sync_bn, f"s{s}b{b}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, x, name=name)


def _check_weights(weights):
    if weights and not os.path.isfile(weights):
        raise UserError(f"--weights={weights}: no such file (a local .weights.h5 is needed).")


def after_stem(trunk):
    """The layers of a `resnet18_small` trunk after its stem convolution, as a model
    sharing them: what `--weights` holds for resnet18 (convert_resnet18.py), so that
    neither the input statistics nor the stem (fresh, as MaskCon's) are in the file."""
    return keras.Model(trunk.get_layer("stem_conv").output, trunk.output, name="after_stem")


def _load_after_stem(trunk, weights):
    _check_weights(weights)
    try:
        with warnings.catch_warnings():  # Keras's warnings per layer before its error.
            warnings.simplefilter("ignore")
            after_stem(trunk).load_weights(weights)
    except (ValueError, OSError) as e:
        raise UserError(f"--weights={weights}: not a resnet18 file of convert_resnet18.py "
                        f"({str(e).splitlines()[0].rstrip(':.')}).") from None
    return trunk


def _full_size_trunk(body, input_shape, mean, std, weights, name):
    """Normalisation + `body`, a `keras.Model` `[N, H, W, 3] -> [N, F]`, with `weights`
    (a local `.weights.h5`: Keras's ImageNet file for ResNet-50, or one saved from
    this trunk's body) loaded into `body`."""
    _check_weights(weights)
    inputs = keras.Input(input_shape, name="image")
    x = normalization(mean, std)(inputs)
    if weights:
        body.load_weights(weights)
    return keras.Model(inputs, body(x), name=name)


def _regnety8gf_body(input_shape):
    inputs = keras.Input(input_shape, name="normalized")
    return keras.Model(inputs, regnet.regnety(inputs, regnet.REGNETY_8GF), name="regnety080")


def build(config, input_shape, mean, std, use_bn=True, sync_bn=False):
    """The trunk named by `config.backbone`: images `input_shape` -> `[N, F]`."""
    if config.backbone == "small_resnet":
        return small_resnet(input_shape, mean, std, config.width, use_bn=use_bn, sync_bn=sync_bn)
    if config.backbone == "resnet18":
        trunk = resnet18_small(input_shape, mean, std, use_bn=use_bn, sync_bn=sync_bn)
        return _load_after_stem(trunk, config.weights) if config.weights else trunk
    if config.backbone == "resnet50":
        body = keras.applications.ResNet50(include_top=False, weights=None,
                                           input_shape=input_shape, pooling="avg")
        return _full_size_trunk(body, input_shape, mean, std, config.weights, "resnet50")
    if config.backbone == "regnety8gf":
        # Written here: Keras 3's applications have no RegNet.
        return _full_size_trunk(_regnety8gf_body(input_shape), input_shape, mean, std,
                                config.weights, "regnety8gf")
    raise UserError(f"--backbone={config.backbone!r} is not known.")
