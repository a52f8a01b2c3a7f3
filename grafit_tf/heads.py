"""Heads on the pooled trunk feature `[N, F]`, and the exported embedder."""

import keras
from keras import layers

TRANSFORM_LAYER = "embedding_transform"


def mlp(hidden, out, name, sync_bn=False, use_bn=True):
    """Linear -> BN -> ReLU -> Linear: BYOL's projector / predictor shape.

    Returns:
        A `keras.Sequential` `[N, F] -> [N, out]`.
    """
    body = [layers.Dense(hidden, use_bias=not use_bn, name=f"{name}_fc1")]
    if use_bn:
        body.append(layers.BatchNormalization(synchronized=sync_bn, name=f"{name}_bn"))
    body += [layers.ReLU(name=f"{name}_relu"), layers.Dense(out, name=f"{name}_fc2")]
    return keras.Sequential(body, name=name)


def classifier(num_classes, name="classifier"):
    """A linear classifier `[N, F] -> [N, num_classes]` for the cross-entropy methods."""
    return layers.Dense(num_classes, name=name)


def embedder(backbone, head=None, transform=False, name="embedder"):
    """An embedding model: image `[N, H, W, C]` (0..255) -> unit vector `[N, D]`.

    Args:
        backbone: the trained trunk.
        head: an optional head before normalisation (the memory's prefill embeds
            with the kNN head or the key projector).
        transform: add the frozen affine map of `--embedding_transform` (a `Dense`
            layer `TRANSFORM_LAYER`, the identity until fitted; see
            `grafit_tf.embedding_transform`) between two L2 normalisations.
    """
    inputs = keras.Input(tuple(backbone.input_shape[1:]), name="image")
    x = backbone(inputs)
    if head is not None:
        x = head(x)
    if transform:
        x = layers.UnitNormalization(axis=-1, name="l2_normalize_features")(x)
        # A plain Dense layer: every Keras, SavedModel and ONNX reader knows it.
        x = layers.Dense(x.shape[-1], kernel_initializer="identity", trainable=False,
                         dtype="float32", name=TRANSFORM_LAYER)(x)
    return keras.Model(inputs, layers.UnitNormalization(axis=-1, name="l2_normalize")(x), name=name)
