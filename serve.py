r"""Embeds a folder of images with the exported ONNX model and labels them by kNN.

    python serve.py --model=W/export/embedder.onnx --images=DIR --output=OUT \
        [--gallery=G | --gallery=G.npz] [--save_gallery=G.npz] [--k=20] [--labels_from_dirs]

Never imports TensorFlow: onnxruntime, Pillow, NumPy (and faiss-cpu for large
galleries) only. Exit status: 0 when at least one image was embedded, 1 when
none was, 2 (one line on stderr, before any work) for a missing or invalid
model, an empty folder, a gallery of another embedding dimension, or bad flags.
See `grafit_tf.serving.job` for the outputs.
"""

import os
import sys

from absl import app, flags, logging

from grafit_tf.serving import images, job

flags.DEFINE_string("model", None, "Exported model: W/export/embedder.onnx "
                    "(written by export/export_onnx.py).")
flags.DEFINE_string("images", None, "Folder of query images, searched recursively; with "
                    "--labels_from_dirs laid out as IMAGES/<fine label>/<image>.")
flags.DEFINE_string("output", None, "Output folder: embeddings.npy, index.csv, errors.csv, "
                    "predictions.csv (with --gallery) and summary.json.")
flags.DEFINE_string("gallery", "", "Labelled gallery: a folder GALLERY/<fine label>/<image> "
                    "(embedded now) or a .npz written by --save_gallery. Enables predictions.csv.")
flags.DEFINE_string("save_gallery", "", "Save the embedded gallery folder to this .npz, to "
                    "reuse with --gallery=PATH.npz.")
flags.DEFINE_integer("k", 20, "Neighbours in the similarity-weighted kNN vote (and listed "
                     "per image in predictions.csv).")
flags.DEFINE_float("temperature", 0.0, "Temperature T of the vote weights exp(sim / T); "
                   "0 takes the training config's eval_temperature (0.07).")
flags.DEFINE_bool("labels_from_dirs", False, "Query images sit in IMAGES/<fine label>/: report "
                  "accuracy overall and per class (terminal and summary.json).")
flags.DEFINE_string("providers", "", "onnxruntime execution providers, comma-separated, best "
                    "first (names or aliases: cuda, cpu, tensorrt). Default: CUDA when "
                    "onnxruntime-gpu is installed, else CPU.")
flags.DEFINE_integer("batch_size", 256, "Images per onnxruntime call.")
flags.DEFINE_integer("workers", min(4, os.cpu_count() or 1), "Image decoding processes "
                     "working ahead of inference (0: decode in the main process).")
flags.DEFINE_enum("knn_backend", "auto", ["auto", "faiss", "numpy"], "Exact inner-product "
                  "search: faiss-cpu (IndexFlatIP), NumPy, or auto (faiss for large galleries).")
flags.DEFINE_integer("max_image_pixels", images.DEFAULT_MAX_PIXELS, "Decompression-bomb "
                     "limit: images with more pixels (width x height) go to errors.csv "
                     "(default: Pillow's limit).")
flags.DEFINE_integer("intra_op_threads", 0, "onnxruntime threads per operator (0: its default).")
flags.DEFINE_bool("progress", True, "Show a progress bar with images per second (stderr).")
for _name in ("model", "images", "output"):
    flags.mark_flag_as_required(_name)


def options_from_flags():
    f = flags.FLAGS
    return job.ServeOptions(
        model=f.model, images=f.images, output=f.output, gallery=f.gallery,
        save_gallery=f.save_gallery, k=f.k, temperature=f.temperature,
        labels_from_dirs=f.labels_from_dirs, providers=f.providers, batch_size=f.batch_size,
        workers=f.workers, knn_backend=f.knn_backend, max_image_pixels=f.max_image_pixels,
        intra_op_threads=f.intra_op_threads, progress=f.progress)


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; use --flags.", file=sys.stderr)
        return 2
    from grafit_tf.errors import UserError

    logging.set_verbosity(logging.WARNING)  # Library INFO chatter off the terminal.
    try:
        summary = job.run(options_from_flags())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output was published (temporary files removed).", file=sys.stderr)
        return 130
    if not summary["embedded"]:
        print(f"error: no image under --images={flags.FLAGS.images} could be embedded; "
              f"reasons in {os.path.join(flags.FLAGS.output, 'errors.csv')}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
