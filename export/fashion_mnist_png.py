r"""Writes a Fashion-MNIST split as PNG folders `OUTPUT/<fine label>/<index>.png`.

    python export/fashion_mnist_png.py --split=test --output=/tmp/fmnist_png/test
    python export/fashion_mnist_png.py --split=train --max_per_class=500 \
        --output=/tmp/fmnist_png/gallery

The folders feed `serve.py` (`--images`, `--gallery`, `--labels_from_dirs`).
NumPy and Pillow only.
"""

import os
import sys

from absl import app, flags

flags.DEFINE_string("data_dir", "/usr/share/datasets/fashion-mnist",
                    "Folder of the Fashion-MNIST IDX .gz files.")
flags.DEFINE_enum("split", "test", ["train", "test"], "Which split to write.")
flags.DEFINE_string("output", None, "Output folder; one sub-folder per fine label.")
flags.DEFINE_integer("max_per_class", 0, "Write only the first N images of each class, in "
                     "split order (0: all).")
flags.DEFINE_bool("overwrite", False, "Write into an output folder that already has files.")
flags.mark_flag_as_required("output")


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; use --flags.", file=sys.stderr)
        return 2
    from grafit_tf.data import png_folders
    from grafit_tf.errors import UserError

    f = flags.FLAGS
    try:
        if f.max_per_class < 0:
            raise UserError(f"--max_per_class={f.max_per_class}: use 0 (all) or more.")
        if os.path.isdir(f.output) and os.listdir(f.output) and not f.overwrite:
            raise UserError(f"--output={f.output} is not empty; pass --overwrite to write "
                            "into it anyway.")
        counts = png_folders.fashion_mnist_to_png(f.data_dir, f.split, f.output,
                                                  f.max_per_class)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {sum(counts.values())} PNGs of the {f.split} split to {f.output} "
          f"({len(counts)} classes: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")")
    return 0


if __name__ == "__main__":
    app.run(main)
