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


def test_resnet18_weights_are_all_but_the_stem_convolution(tmp_path):
    # convert_resnet18.py writes such a file (tests/test_torchvision_resnet.py).
    first = build("resnet18")
    path = str(tmp_path / "after_stem.weights.h5")
    backbones.after_stem(first).save_weights(path)
    second = build("resnet18", weights=path)
    for a, b in zip(first.weights, second.weights):
        same = np.array_equal(a.numpy(), b.numpy())
        assert same == (not a.path.startswith("stem_conv/")), a.path  # The stem is fresh.
    assert build("resnet18", (28, 28, 1), weights=path).output_shape == (None, 512)


def test_weights_errors(tmp_path):
    for name in ("resnet50", "resnet18"):
        with pytest.raises(UserError, match="no such file"):
            build(name, weights=str(tmp_path / "absent.weights.h5"))
    other = str(tmp_path / "resnet50.weights.h5")
    build("resnet50").get_layer("resnet50").save_weights(other)
    with pytest.raises(UserError, match="not a resnet18 file of convert_resnet18.py") as e:
        build("resnet18", weights=other)
    assert "\n" not in str(e.value)
    # Checked with the rest of the flags.
    with pytest.raises(UserError, match="backbone=small_resnet trains from scratch"):
        Config(backbone="small_resnet", weights=str(tmp_path / "x.weights.h5")).validate()
