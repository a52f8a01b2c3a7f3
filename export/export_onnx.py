"""Exports a trained embedder to a SavedModel and to ONNX, and checks parity.

    python export/export_onnx.py --workdir=runs/grafit [--embedding_transform=whiten]

Writes `W/export/saved_model/`, `W/export/embedder.onnx` and
`W/export/parity.json` (see `grafit_tf.export`). Exits non-zero with one line
when the work directory is incomplete or the exports disagree with Keras.
"""

import os
import sys

from absl import app, flags, logging

from grafit_tf.errors import UserError, flags_parser

flags.DEFINE_string("workdir", None, "Work directory of a finished training run "
                    "(holds embedder.keras and config.json); the exports go to WORKDIR/export/.")
flags.DEFINE_integer("parity_images", 256, "Training images of the parity check (at least 64).")
flags.DEFINE_float("tolerance", 1e-4, "Largest accepted max |difference| between the Keras "
                   "embeddings and the SavedModel / onnxruntime ones.")
flags.DEFINE_string("data_dir", "", "Training data folder for the parity images when it moved "
                    "since training (default: data_dir of config.json).")
flags.DEFINE_integer("opset", 17, "ONNX opset of the conversion.")
flags.DEFINE_string("embedding_transform", "none",
                    "Fixed map the exported embedder ends in, fitted on the training images' "
                    "embeddings (no labels): none (as in the paper), center (subtract their "
                    "mean) or whiten (PCA whitening); the result is L2-normalised again.")
flags.DEFINE_float("whiten_shrinkage", 0.1, "--embedding_transform=whiten: added to each "
                   "eigenvalue, as a fraction of their mean, so the smallest directions are "
                   "not blown up.")
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv  # flags_parser refuses stray arguments.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines while saving.
    FLAGS = flags.FLAGS
    if not os.path.isdir(FLAGS.workdir):
        print(f"error: --workdir={FLAGS.workdir} is not a directory.", file=sys.stderr)
        return 2
    from grafit_tf import export  # Imports TensorFlow lazily, after the cheap checks.

    try:
        report = export.export(FLAGS.workdir, num_parity_images=FLAGS.parity_images,
                               tolerance=FLAGS.tolerance, data_dir=FLAGS.data_dir or None,
                               opset=FLAGS.opset, transform=FLAGS.embedding_transform,
                               whiten_shrinkage=FLAGS.whiten_shrinkage)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except export.ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"SavedModel: {report['saved_model']}")
    print(f"ONNX:       {report['onnx']}")
    print(f"parity on {report['images']} training images: "
          f"max |Keras - SavedModel| = {report['keras_vs_saved_model']:.3g}, "
          f"max |Keras - onnxruntime| = {report['keras_vs_onnxruntime']:.3g} "
          f"(tolerance {report['tolerance']:g}): OK")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser("export/export_onnx.py"))
