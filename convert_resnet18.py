"""Converts torchvision's ImageNet ResNet-18 for `train.py --backbone=resnet18 --weights=`.

    python convert_resnet18.py --state_dict=resnet18-f37072fd.pth \\
        --out=resnet18_imagenet.weights.h5
    python train.py --backbone=resnet18 --weights=resnet18_imagenet.weights.h5 ...

`resnet18-f37072fd.pth` is torchvision's `resnet18(weights="IMAGENET1K_V1")` (the
`pretrained=True` of MaskCon). As MaskCon, the trunk keeps ImageNet's bn1 and
layer1..layer4; its 3x3 stem is initialised by each run, fc is dropped (see
`grafit_tf.torchvision_resnet`). Reading a .pth needs torch; without it, give a .npz
of the same arrays, made where torch is installed:

    python -c "import numpy, torch; numpy.savez('resnet18.npz', **{k: v.numpy() for k, v \\
        in torch.load('resnet18-f37072fd.pth', map_location='cpu').items()})"

Exit status: 0 written; 2 bad input (one line, nothing written).
"""

import os
import sys
import zipfile

import numpy as np
from absl import app, flags

from grafit_tf import torchvision_resnet
from grafit_tf.errors import UserError, check_writable, flags_parser

flags.DEFINE_string("state_dict", None, "torchvision ResNet-18 state dict: a .pth (needs "
                    "torch) or a .npz of its arrays under the same names (numpy.savez('x.npz', "
                    "**{k: v.numpy() for k, v in state_dict.items()}), where torch is).")
flags.DEFINE_string("out", None, "The .weights.h5 to write, for train.py --backbone=resnet18 "
                    "--weights=OUT (any image size; the stem is not in it).")
flags.mark_flags_as_required(["state_dict", "out"])


def read_state_dict(path):
    """`{name: numpy array}` of a `.npz` or (with torch) a `.pth` state dict."""
    if not os.path.isfile(path):
        raise UserError(f"--state_dict={path}: no such file.")
    if path.endswith(".npz"):
        try:
            with np.load(path) as arrays:
                return {name: arrays[name] for name in arrays.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"--state_dict={path}: not a readable .npz ({e}).") from None
    if not path.endswith((".pth", ".pt")):
        raise UserError(f"--state_dict={path}: give a .pth (torch) or .npz state dict.")
    try:
        import torch
    except ImportError:
        raise UserError(f"--state_dict={path}: reading a .pth needs torch, not installed here; "
                        "give a .npz of it instead (python convert_resnet18.py --help).") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's errors for a damaged or foreign file vary.
        raise UserError(f"--state_dict={path}: torch cannot read it ({e}).") from None
    if not isinstance(state, dict):
        raise UserError(f"--state_dict={path}: holds a {type(state).__name__}, not a state dict.")
    return {name: value.numpy() for name, value in state.items() if hasattr(value, "numpy")}


def convert(state_dict_path, out):
    """Writes `out` (a `.weights.h5`, atomically) from the state dict at `state_dict_path`."""
    if not out.endswith(".weights.h5"):
        raise UserError(f"--out={out}: the name must end in .weights.h5 (Keras's weights file).")
    check_writable(out, "--out")
    state = read_state_dict(state_dict_path)
    torchvision_resnet.keras_weights(state)  # A bad state dict fails before TensorFlow loads.
    from grafit_tf import backbones

    trunk = backbones.resnet18_small((32, 32, 3), (0.0,) * 3, (1.0,) * 3)  # Sizes: any.
    torchvision_resnet.load(trunk, state)
    tmp = f"{out[:-len('.weights.h5')]}.tmp{os.getpid()}.weights.h5"
    try:
        backbones.after_stem(trunk).save_weights(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv):
    del argv  # flags_parser refuses stray arguments.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        convert(flags.FLAGS.state_dict, flags.FLAGS.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {flags.FLAGS.out}: use it with train.py --backbone=resnet18 "
          f"--weights={flags.FLAGS.out}")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser("convert_resnet18.py"))
