"""RegNetY (Radosavovic et al., "Designing Network Design Spaces", CVPR 2020).

Keras 3's `keras.applications` has no RegNet, so it is written here block for block
as pycls (the paper's code) defines it: a stride-2 3x3 stem of 32 channels, then four
stages of Y blocks (1x1 conv, grouped 3x3 conv, squeeze-and-excitation, 1x1 conv,
residual), each stage's first block striding by 2.
"""

import dataclasses

from keras import layers


@dataclasses.dataclass(frozen=True)
class RegNetSpec:
    """One RegNetY model: blocks and widths per stage, channels per group."""

    depths: tuple
    widths: tuple
    group_width: int
    se_ratio: float = 0.25


# RegNetY-8.0GF as pycls generates it (d=17, w0=192, wa=76.82, wm=2.19, group width 56;
# 192 channels rounded to 3 groups of 56 = 168): 39,180,068 parameters with its
# 1000-class head, the published 39.2M, and 2016-d features.
REGNETY_8GF = RegNetSpec(depths=(2, 4, 10, 1), widths=(168, 448, 896, 2016), group_width=56)


def _bn(name):
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)


def _y_block(x, filters_out, group_width, stride, se_ratio, name):
    """Y block `[N, H, W, C_in] -> [N, H/stride, W/stride, filters_out]`."""
    filters_in = x.shape[-1]
    if stride != 1 or filters_in != filters_out:
        skip = layers.Conv2D(filters_out, 1, stride, use_bias=False, name=f"{name}_skip_conv")(x)
        skip = _bn(f"{name}_skip_bn")(skip)
    else:
        skip = x
    y = layers.Conv2D(filters_out, 1, use_bias=False, name=f"{name}_conv_1x1_1")(x)
    y = layers.ReLU(name=f"{name}_relu1")(_bn(f"{name}_bn1")(y))
    y = layers.Conv2D(filters_out, 3, stride, "same", groups=filters_out // group_width,
                      use_bias=False, name=f"{name}_conv_3x3")(y)
    y = layers.ReLU(name=f"{name}_relu2")(_bn(f"{name}_bn2")(y))
    # Squeeze-and-excitation, its bottleneck sized on the block's *input* width.
    se = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_se_pool")(y)
    se = layers.Conv2D(int(filters_in * se_ratio), 1, activation="relu",
                       name=f"{name}_se_reduce")(se)
    se = layers.Conv2D(filters_out, 1, activation="sigmoid", name=f"{name}_se_expand")(se)
    y = layers.Multiply(name=f"{name}_se_scale")([y, se])
    y = layers.Conv2D(filters_out, 1, use_bias=False, name=f"{name}_conv_1x1_2")(y)
    y = _bn(f"{name}_bn3")(y)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, skip]))


def regnety(inputs, spec=REGNETY_8GF, name="regnety"):
    """The pooled RegNetY trunk on a (normalised) image tensor.

    Args:
        inputs: a Keras tensor `[N, H, W, 3]`, already normalised.
        spec: a `RegNetSpec`.

    Returns:
        The Keras tensor of pooled features `[N, spec.widths[-1]]`.
    """
    x = layers.Conv2D(32, 3, 2, "same", use_bias=False, name=f"{name}_stem_conv")(inputs)
    x = layers.ReLU(name=f"{name}_stem_relu")(_bn(f"{name}_stem_bn")(x))
    for s, (depth, width) in enumerate(zip(spec.depths, spec.widths)):
        for b in range(depth):
            x = _y_block(x, width, spec.group_width, 2 if b == 0 else 1, spec.se_ratio,
                         f"{name}_s{s}b{b}")
    return layers.GlobalAveragePooling2D(name=f"{name}_pool")(x)
