"""Exports a trained embedder to a SavedModel and to ONNX, and checks parity.

    python export/export_onnx.py --workdir=runs/grafit [--embedding_transform=whiten] \
        [--quantize=int8] [--fp16] [--quantize_tolerance=0.5]

Writes `W/export/saved_model/`, `W/export/embedder.onnx` and
`W/export/parity.json` (see `grafit_tf.export`); then, with `--quantize=int8` /
`--fp16`, `W/export/embedder.int8.onnx` / `embedder.fp16.onnx`, each with its accuracy
check against the float32 model, `parity.int8.json` / `parity.fp16.json` (see
`grafit_tf.quantize`). Exits non-zero with one line when the work directory is
incomplete, the exports disagree with Keras, or a variant loses more accuracy than
`--quantize_tolerance`.
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
flags.DEFINE_string("quantize", "none", "none, or int8: also write embedder.int8.onnx, "
                    "onnxruntime static int8 quantisation (QDQ, per-channel weights) calibrated "
                    "on training images, for CPUs (float16: --fp16).")
flags.DEFINE_bool("fp16", False, "Also write embedder.fp16.onnx: float16 weights and compute "
                  "(for the CUDA provider), uint8 input and float32 output kept.")
flags.DEFINE_float("quantize_tolerance", 0.5, "Largest accepted fall, in accuracy points, of "
                   "the int8 / fp16 model's fine kNN top-1 and fine Recall@1 against the "
                   "float32 model's on the run's evaluation data.")
flags.DEFINE_integer("calibration_images", 512, "Training images (first of the split, no "
                     "labels) that calibrate the int8 activation ranges (at least 64).")
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv  # flags_parser refuses stray arguments.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines while saving.
    FLAGS = flags.FLAGS
    if not os.path.isdir(FLAGS.workdir):
        print(f"error: --workdir={FLAGS.workdir} is not a directory.", file=sys.stderr)
        return 2
    if FLAGS.quantize not in ("none", "int8"):
        print(f"error: --quantize={FLAGS.quantize}: choose none or int8 (float16: --fp16).",
              file=sys.stderr)
        return 2
    variants = [v for v, on in (("int8", FLAGS.quantize == "int8"), ("fp16", FLAGS.fp16)) if on]
    from grafit_tf import export, quantize  # Import TensorFlow lazily, after the cheap checks.

    try:
        for variant in variants:  # Bad settings fail now, not after the float export.
            quantize.check_settings(variant, FLAGS.quantize_tolerance, FLAGS.calibration_images)
        report = export.export(FLAGS.workdir, num_parity_images=FLAGS.parity_images,
                               tolerance=FLAGS.tolerance, data_dir=FLAGS.data_dir or None,
                               opset=FLAGS.opset, transform=FLAGS.embedding_transform,
                               whiten_shrinkage=FLAGS.whiten_shrinkage)
        print(f"SavedModel: {report['saved_model']}")
        print(f"ONNX:       {report['onnx']}")
        print(f"parity on {report['images']} training images: "
              f"max |Keras - SavedModel| = {report['keras_vs_saved_model']:.3g}, "
              f"max |Keras - onnxruntime| = {report['keras_vs_onnxruntime']:.3g} "
              f"(tolerance {report['tolerance']:g}): OK", flush=True)
        for variant in variants:
            r = quantize.quantize(FLAGS.workdir, variant, FLAGS.quantize_tolerance,
                                  FLAGS.calibration_images, FLAGS.data_dir or None)
            before, after, change = r["float32"], r[variant], r["change_points"]
            print(f"{variant}:       {r['onnx']} ({r['size_bytes'][variant] / 2**20:.1f} MiB, "
                  f"float32 {r['size_bytes']['float32'] / 2**20:.1f} MiB)")
            print(f"  {r['query_images']} queries, {r['gallery_images']} gallery images: "
                  f"fine kNN top-1 {100 * before['fine_knn_top1']:.2f} -> "
                  f"{100 * after['fine_knn_top1']:.2f} ({change['fine_knn_top1']:+.2f}), "
                  f"fine Recall@1 {100 * before['fine_recall_at_1']:.2f} -> "
                  f"{100 * after['fine_recall_at_1']:.2f} ({change['fine_recall_at_1']:+.2f}), "
                  f"max |difference| {r['max_abs_diff']:.3g} "
                  f"(tolerance {r['tolerance_points']:g} points): OK", flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except export.ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser("export/export_onnx.py"))
