"""torchvision ResNet-18 state dict -> the resnet18 trunk, and convert_resnet18.py.

The state dict is synthetic (random values) with torchvision's real names and shapes,
written out here independently of the converter's own table.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from grafit_tf import backbones, torchvision_resnet
from grafit_tf.config import Config
from grafit_tf.errors import UserError
from tests.conftest import REPO

MEAN, STD = (120.0, 110.0, 100.0), (60.0, 60.0, 60.0)


def torchvision_state_dict(seed=0):
    """`torchvision.models.resnet18().state_dict()`'s 122 names and shapes, random values."""
    shapes, rng = {"conv1.weight": (64, 3, 7, 7)}, np.random.default_rng(seed)

    def bn(prefix, c):
        shapes.update({f"{prefix}.{p}": (c,) for p in ("weight", "bias", "running_mean",
                                                      "running_var")})
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    inplanes = 64
    for i, planes in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            p = f"layer{i}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes if b == 0 else planes, 3, 3)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            if b == 0 and i > 1:
                shapes[f"{p}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes)
        inplanes = planes
    shapes.update({"fc.weight": (1000, 512), "fc.bias": (1000,)})
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = np.array(12345, np.int64)
        elif name.endswith("running_var"):  # Down to 1e-4: Keras's epsilon (1e-3) matters.
            state[name] = (10 ** rng.uniform(-4, 0.5, shape)).astype(np.float32)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            state[name] = rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32)
        else:
            state[name] = rng.normal(0.5 if name.endswith(".weight") else 0, 0.3,
                                     shape).astype(np.float32)
    assert len(state) == 122
    return state


@pytest.fixture(scope="module")
def state():
    return torchvision_state_dict()


@pytest.fixture(scope="module")
def trunk(state):
    keras.utils.set_random_seed(1)
    model = backbones.resnet18_small((32, 32, 3), MEAN, STD)
    stem = model.get_layer("stem_conv").kernel.numpy()
    torchvision_resnet.load(model, state)
    model.stem_before = stem
    return model


def hwio(state, key):
    return state[key].transpose(2, 3, 1, 0)


def torch_conv(x, w, stride, pad):
    """torch's conv2d on NCHW `x` with OIHW `w` (symmetric zero padding)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    h, v = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], h, v))
    for i in range(k):
        for j in range(k):
            patch = x[:, :, i:i + stride * h:stride, j:j + stride * v:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.float64))
    return out


def torch_bn(x, state, prefix):
    """torch's BatchNorm2d in eval mode (eps 1e-5) on NCHW `x`."""
    g, b, m, v = (state[f"{prefix}.{p}"].astype(np.float64)[:, None, None]
                  for p in ("weight", "bias", "running_mean", "running_var"))
    return (x - m) / np.sqrt(v + 1e-5) * g + b


def submodel(trunk, start, end):
    return keras.Model(trunk.get_layer(start).output, trunk.get_layer(end).output)


def test_convolutions_and_batch_norms_land_transposed_in_their_layers(trunk, state):
    np.testing.assert_array_equal(trunk.get_layer("s2b1_conv2").kernel.numpy(),
                                  hwio(state, "layer3.1.conv2.weight"))
    np.testing.assert_array_equal(trunk.get_layer("s1b0_proj").kernel.numpy(),
                                  hwio(state, "layer2.0.downsample.0.weight"))
    bn = trunk.get_layer("s3b0_proj_bn")
    var = state["layer4.0.downsample.1.running_var"]
    np.testing.assert_array_equal(bn.moving_variance.numpy(), var)
    np.testing.assert_array_equal(bn.moving_mean.numpy(),
                                  state["layer4.0.downsample.1.running_mean"])
    np.testing.assert_array_equal(bn.beta.numpy(), state["layer4.0.downsample.1.bias"])
    # gamma absorbs Keras's epsilon (1e-3) against torch's (1e-5).
    assert bn.epsilon == 1e-3
    np.testing.assert_allclose(bn.gamma.numpy(), state["layer4.0.downsample.1.weight"]
                               * np.sqrt((var + 1e-3) / (var + 1e-5)), rtol=1e-6)
    np.testing.assert_array_equal(trunk.get_layer("stem_bn").moving_mean.numpy(),
                                  state["bn1.running_mean"])


def test_the_7x7_conv1_is_not_loaded(trunk, state):
    stem = trunk.get_layer("stem_conv").kernel.numpy()
    assert stem.shape == (3, 3, 3, 64)
    np.testing.assert_array_equal(stem, trunk.stem_before)  # Its fresh initialisation.


def test_a_basic_block_computes_torchs_forward(trunk, state):
    # layer3.1 (stride 1): relu(bn2(conv2(relu(bn1(conv1(x))))) + x), eval-mode BN.
    x = np.random.default_rng(2).normal(0, 1, (2, 256, 8, 8))
    y = np.maximum(torch_bn(torch_conv(x, state["layer3.1.conv1.weight"], 1, 1), state,
                            "layer3.1.bn1"), 0)
    y = torch_bn(torch_conv(y, state["layer3.1.conv2.weight"], 1, 1), state, "layer3.1.bn2")
    want = np.maximum(y + x, 0)
    got = submodel(trunk, "s2b0_out", "s2b1_out")(x.transpose(0, 2, 3, 1).astype(np.float32))
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


def test_the_downsample_shortcut_computes_torchs_forward(trunk, state):
    x = np.random.default_rng(3).normal(0, 1, (2, 128, 16, 16))
    want = torch_bn(torch_conv(x, state["layer3.0.downsample.0.weight"], 2, 0), state,
                    "layer3.0.downsample.1")
    got = submodel(trunk, "s1b1_out", "s2b0_proj_bn")(x.transpose(0, 2, 3, 1).astype(np.float32))
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())


def test_conv1_and_fc_are_not_needed(state):
    kept = {k: v for k, v in state.items() if not k.startswith(("conv1.", "fc."))}
    assert set(torchvision_resnet.keras_weights(kept)) == {
        name for _, name, _ in torchvision_resnet.layers()}


@pytest.mark.parametrize("change,needle", [
    (lambda s: s.pop("layer2.0.downsample.1.running_var"),
     "no layer2.0.downsample.1.running_var"),
    (lambda s: s.update({"layer4.1.conv2.weight": np.zeros((512, 512, 1, 1))}),
     r"layer4.1.conv2.weight has shape \[512, 512, 1, 1\], ResNet-18's is \[512, 512, 3, 3\]"),
    (lambda s: s.update({"layer1.2.conv1.weight": np.zeros((64, 64, 3, 3))}),  # ResNet-34.
     "does not have \\(layer1.2.conv1.weight\\)"),
])
def test_a_bad_state_dict_is_one_line(state, change, needle):
    bad = dict(state)
    change(bad)
    with pytest.raises(UserError, match=needle) as raised:
        torchvision_resnet.keras_weights(bad)
    assert "\n" not in str(raised.value)


def run_convert(*argv):
    return subprocess.run([sys.executable, "convert_resnet18.py", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def check_written(out, state):
    """`--backbone=resnet18 --weights=out` gives the converted layers (RGB and grey)."""
    for shape in ((32, 32, 3), (28, 28, 1)):
        config = Config(backbone="resnet18", weights=out)
        config.validate()
        model = backbones.build(config, shape, MEAN[:shape[-1]], STD[:shape[-1]])
        np.testing.assert_array_equal(model.get_layer("s2b1_conv2").kernel.numpy(),
                                      hwio(state, "layer3.1.conv2.weight"))
        np.testing.assert_array_equal(model.get_layer("s3b0_proj_bn").moving_variance.numpy(),
                                      state["layer4.0.downsample.1.running_var"])


def test_the_command_line_converts_an_npz(state, tmp_path):
    np.savez(tmp_path / "resnet18.npz", **state)
    out = tmp_path / "resnet18.weights.h5"
    result = run_convert(f"--state_dict={tmp_path / 'resnet18.npz'}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["resnet18.npz", "resnet18.weights.h5"]
    check_written(str(out), state)


def test_the_command_line_converts_a_pth(state, tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed (it is optional): "
                                "the .pth path is not exercised, the .npz one is")
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()},
               tmp_path / "resnet18.pth")
    out = tmp_path / "resnet18.weights.h5"
    result = run_convert(f"--state_dict={tmp_path / 'resnet18.pth'}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    check_written(str(out), state)


def test_bad_input_is_one_line_and_writes_nothing(state, tmp_path):
    bad = dict(state, **{"layer4.1.conv2.weight": np.zeros((512, 512, 1, 1), np.float32)})
    np.savez(tmp_path / "bad.npz", **bad)
    (tmp_path / "torch.pth").write_bytes(b"not a pickle")
    cases = [("absent.npz", "no such file"), ("bad.npz", "layer4.1.conv2.weight has shape")]
    try:
        import torch  # noqa: F401
        cases.append(("torch.pth", "torch cannot read it"))
    except ImportError:
        cases.append(("torch.pth", "needs torch"))
    for name, needle in cases:
        out = tmp_path / "out.weights.h5"
        result = run_convert(f"--state_dict={tmp_path / name}", f"--out={out}")
        assert result.returncode == 2, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
        assert "Traceback" not in result.stderr and not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["bad.npz", "torch.pth"]
