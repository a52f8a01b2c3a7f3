"""Trunks: shapes, parameter counts against the published ones, local weights."""

import numpy as np
import pytest

from grafit_tf import backbones
from grafit_tf.config import Config
from grafit_tf.errors import UserError

MEAN, STD = (120.0, 110.0, 100.0), (60.0, 60.0, 60.0)


def trainable_params(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def build(backbone, shape=(32, 32, 3), **changes):
    return backbones.build(Config(backbone=backbone, **changes), shape, MEAN[: shape[-1]],
                           STD[: shape[-1]])


def test_small_resnet_shapes():
    trunk = build("small_resnet", (28, 28, 1), width=8)
    assert trunk.output_shape == (None, 8 * 2 ** 3)
    out = trunk(np.zeros((2, 28, 28, 1), "float32"))
    assert out.shape == (2, 64)


def test_resnet18_is_the_cifar_resnet18():
    # 11,173,962 parameters with a 10-class linear layer (5,130 of them).
    trunk = build("resnet18")
    assert trunk.output_shape == (None, 512)
    assert trainable_params(trunk) == 11_173_962 - 5_130
    # 3x3 stem, no max-pool: 32 px -> 4x4 before pooling.
    assert trunk.get_layer("s3b1_out").output.shape[1:3] == (4, 4)


def test_resnet50_trunk():
    trunk = build("resnet50")
    assert trunk.output_shape == (None, 2048)
    assert trainable_params(trunk) == 23_534_592  # Keras's ResNet50(include_top=False).


def test_regnety8gf_matches_the_published_size():
    # RegNetY-8.0GF: 39.2M parameters with its 1000-class head (Radosavovic et al. 2020).
    trunk = build("regnety8gf")
    assert trunk.output_shape == (None, 2016)
    # pycls / timm's regnety_080 count exactly: 39,180,068.
    assert trainable_params(trunk) + 2016 * 1000 + 1000 == 39_180_068
    out = trunk(np.zeros((1, 32, 32, 3), "float32"))
    assert out.shape == (1, 2016)


@pytest.mark.parametrize("name,body", [("resnet50", "resnet50"), ("regnety8gf", "regnety080")])
def test_local_weights_file_is_loaded(name, body, tmp_path):
    first = build(name)
    path = str(tmp_path / "body.weights.h5")
    first.get_layer(body).save_weights(path)
    second = build(name, weights=path)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(second(images), first(images), rtol=1e-5, atol=1e-5)


def test_weights_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        build("resnet50", weights=str(tmp_path / "absent.weights.h5"))
    for small in ("resnet18", "small_resnet"):  # Checked with the rest of the flags.
        with pytest.raises(UserError, match=f"backbone={small} trains from scratch"):
            Config(backbone=small, weights=str(tmp_path / "x.weights.h5")).validate()
