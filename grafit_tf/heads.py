"""Heads on the pooled trunk feature `[N, F]`."""

import keras
from keras import layers

TRANSFORM_LAYER = "embedding_transform"


def mlp(hidden, out, name, sync_bn=False, use_bn=True, hidden_layers=1):
    """(Linear -> BN -> ReLU) x hidden_layers -> Linear.

    One hidden layer is BYOL's projector / predictor shape; two are SimCLR v2's
    deeper projector, which moves the loss one layer further from the trunk.

    Returns:
        A `keras.Sequential` `[N, F] -> [N, out]`.
    """
    body = []
    for i in range(hidden_layers):
        # The first layer keeps its old names, so that checkpoints of 1-layer heads still load.
        tag = "" if i == 0 else str(i + 1)
        body.append(layers.Dense(hidden, use_bias=not use_bn, name=f"{name}_fc1{tag}"))
        if use_bn:
            body.append(layers.BatchNormalization(synchronized=sync_bn, name=f"{name}_bn{tag}"))
        body.append(layers.ReLU(name=f"{name}_relu{tag}"))
    body.append(layers.Dense(out, name=f"{name}_fc2"))
    return keras.Sequential(body, name=name)


def classifier(num_classes, name="classifier"):
    """A linear classifier `[N, F] -> [N, num_classes]` for the cross-entropy baselines."""
    return layers.Dense(num_classes, name=name)


class Prototypes(layers.Layer):
    """`K` trainable prototypes of width `D`, L2-normalised on every use (SwAV).

    A layer rather than a bare variable so that the model tracks, checkpoints
    and distributes it like every other part; it is never called on a tensor.
    """

    def __init__(self, num, dim, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.kernel = self.add_weight(
            shape=(num, dim), name="prototypes",
            initializer=keras.initializers.RandomNormal(stddev=1.0, seed=seed))
        self.built = True

    def unit(self):
        """The `[K, D]` prototypes, L2-normalised."""
        return keras.ops.normalize(self.kernel, axis=-1, order=2)


def embedder(backbone, head=None, image_shape=None, transform=False, name="embedder"):
    """The exported model: image `[N, H, W, C]` (0..255) -> unit vector `[N, D]`.

    Args:
        backbone: the trained trunk.
        head: an optional head applied before normalisation (`--embedding=knn_head`).
        image_shape: `(H, W, C)` the embedder takes (None: the trunk's input shape;
            given when the trunk takes any size, for local crops).
        transform: add the frozen affine map of `--embedding_transform` (a `Dense`
            layer named `TRANSFORM_LAYER`, the identity until the trainer fits it;
            see `grafit_tf.embedding_transform`) between two L2 normalisations.
    """
    inputs = keras.Input(tuple(image_shape or backbone.input_shape[1:]), name="image")
    x = backbone(inputs)
    if head is not None:
        x = head(x)
    if transform:
        x = layers.UnitNormalization(axis=-1, name="l2_normalize_features")(x)
        # A plain Dense layer: every Keras, SavedModel and ONNX reader knows it.
        x = layers.Dense(x.shape[-1], kernel_initializer="identity", trainable=False,
                         dtype="float32", name=TRANSFORM_LAYER)(x)
    return keras.Model(inputs, layers.UnitNormalization(axis=-1, name="l2_normalize")(x), name=name)
