"""torchvision's ImageNet ResNet-18 state dict -> the `resnet18` trunk (`backbones.resnet18_small`).

As MaskCon (Feng & Patras 2023): bn1 and layer1..layer4 come from ImageNet; the 7x7
conv1 does not fit the 3x3 stem, which stays freshly initialised; fc is dropped.
Names follow torchvision (`layer2.0.downsample.0.weight`, ...); `num_batches_tracked`
is ignored. Pure NumPy. A known difference: the trunk's stride-2 3x3 convolutions
(layer2..4's first blocks) pad "same" (bottom / right on even sizes), torch 1 on every
side: there the ImageNet filters see the image shifted by a pixel.
"""

import numpy as np

from grafit_tf.errors import UserError

TORCH_EPSILON = 1e-5  # torch's BatchNorm2d eps; Keras's BatchNormalization has 1e-3.
UNUSED = ("conv1.weight", "fc.weight", "fc.bias")  # The 7x7 stem and ImageNet's classifier.


def layers():
    """`[(torch module, Keras layer, torch shape)]`: every layer converted, in order
    (4-d shapes are convolutions `[out, in, kh, kw]`, 1-d batch norms `[channels]`)."""
    out, channels = [("bn1", "stem_bn", (64,))], 64
    for s, filters in enumerate((64, 128, 256, 512)):
        for b in range(2):
            t, k = f"layer{s + 1}.{b}", f"s{s}b{b}"
            out += [(f"{t}.conv1", f"{k}_conv1", (filters, channels, 3, 3)),
                    (f"{t}.bn1", f"{k}_bn1", (filters,)),
                    (f"{t}.conv2", f"{k}_conv2", (filters, filters, 3, 3)),
                    (f"{t}.bn2", f"{k}_bn2", (filters,))]
            if channels != filters:  # The first block of layer2..4: stride 2, 1x1 shortcut.
                out += [(f"{t}.downsample.0", f"{k}_proj", (filters, channels, 1, 1)),
                        (f"{t}.downsample.1", f"{k}_proj_bn", (filters,))]
            channels = filters
    return out


def keras_weights(state_dict, epsilon=1e-3):
    """`{Keras layer name: its weights}` from `state_dict` (`{name: array}`).

    Convolutions: OIHW -> HWIO kernels. Batch norms: `[gamma, beta, moving_mean,
    moving_variance]`, gamma times `sqrt((var + epsilon) / (var + 1e-5))` so that a
    Keras layer of `epsilon` computes torch's function with the ImageNet statistics
    (inference mode) exactly, and, in training, wherever a batch's variance is near them.

    Raises:
        UserError: a key missing or left over, or a shape that is not ResNet-18's.
    """
    def get(key, shape):
        if key not in state_dict:
            raise UserError(f"state dict: no {key}; a torchvision resnet18 state dict is needed.")
        value = np.asarray(state_dict[key], np.float32)
        if value.shape != shape:
            raise UserError(f"state dict: {key} has shape {list(value.shape)}, ResNet-18's is "
                            f"{list(shape)}; a torchvision resnet18 state dict is needed.")
        return value

    out, used = {}, set(UNUSED)
    for module, name, shape in layers():
        if len(shape) == 4:
            out[name] = [get(f"{module}.weight", shape).transpose(2, 3, 1, 0)]
            used.add(f"{module}.weight")
            continue
        keys = [f"{module}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
        gamma, beta, mean, var = (get(key, shape) for key in keys)
        out[name] = [gamma * np.sqrt((var + epsilon) / (var + TORCH_EPSILON)), beta, mean, var]
        used.update(keys)
    extra = sorted(k for k in state_dict if k not in used and "num_batches_tracked" not in k)
    if extra:
        raise UserError(f"state dict: keys ResNet-18 does not have ({', '.join(extra[:3])}"
                        f"{', ...' * (len(extra) > 3)}); a torchvision resnet18 state dict is needed.")
    return out


def load(trunk, state_dict):
    """Sets `trunk` (a `backbones.resnet18_small`, with batch norm) from `state_dict`;
    its stem convolution keeps its initial values."""
    converted = keras_weights(state_dict, trunk.get_layer("stem_bn").epsilon)
    for name, values in converted.items():
        trunk.get_layer(name).set_weights(values)
