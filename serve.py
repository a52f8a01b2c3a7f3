r"""Embeds a folder of images with the exported ONNX model and labels them by kNN.

    python serve.py --model=W/export/embedder.onnx --images=DIR --output=OUT \
        [--gallery=G | --gallery=G.npz] [--save_gallery=G.npz] [--k=20] [--labels_from_dirs]
        [--temperature=T] [--shard_size=100000] [--retry_errors] [--allow_failed_parity]

The outputs are shards of --shard_size images, each published whole; rerunning
the same command after a kill serves only the shards that are not finished.

Never imports TensorFlow: onnxruntime, Pillow, NumPy (and faiss-cpu for large
galleries) only. Exit status, with one line on stderr whenever it is not 0:

- 0: at least one image was embedded; the run is finished (summary.json).
  Files that could not be embedded (unreadable, not an image, or a model
  output that is not finite / not unit norm for that image) are rows of the
  shards' errors.csv.
- 1: no image was embedded (the run is finished; errors.csv says why), or the
  run failed after work started (the model returned a batch of the wrong
  shape, or the kNN vote gave non-finite scores): finished shards stay, no
  summary.json is written. With --engine=ray, a shard that failed or whose
  worker process died is named.
- 2: bad flags (absl's parsing errors too) or bad input, found before any
  image is decoded and before anything is written: a missing, invalid or
  inconsistent model (metadata against graph, output on a probe not a finite
  unit-norm [N, D]), a model whose export failed its parity check
  (its parity report; see --allow_failed_parity), a temperature that is not a
  finite number > 0 (flag or model metadata), a missing or empty folder or file list, an
  unusable gallery .npz (arrays of the wrong type or shape, not finite, not
  unit norm, another embedding dimension), an output folder another run is
  writing into, or that holds the results of a run with other settings. Also,
  after embedding it, a gallery folder none of whose images could be embedded.
- 130 / 143: interrupted by SIGINT (Ctrl-C) / SIGTERM; finished shards stay
  (rerun the same command to go on) and the decoding workers are stopped.

See `grafit_tf.serving.job` for the outputs and `grafit_tf.serving.shards`
for the shards and how to read them.
"""

import signal
import sys

from absl import app, flags, logging

from grafit_tf.errors import flags_parser
from grafit_tf.serving import images, job

flags.DEFINE_string("model", None, "Exported model: W/export/embedder.onnx "
                    "(written by export/export_onnx.py).")
flags.DEFINE_string("images", None, "Folder of query images, searched recursively, or a "
                    "text file listing image paths (one a line, relative to the list's folder "
                    "or absolute); with --labels_from_dirs laid out as "
                    "IMAGES/<fine label>/<image>.")
flags.DEFINE_string("output", None, "Output folder: shard-<i>/ folders (embeddings.npy, "
                    "index.csv, errors.csv, predictions.csv with --gallery), manifest.json and "
                    "summary.json (written last, when the run is finished).")
flags.DEFINE_string("gallery", "", "Labelled gallery: a folder GALLERY/<fine label>/<image> "
                    "(embedded now) or a .npz written by --save_gallery. Enables predictions.csv.")
flags.DEFINE_string("save_gallery", "", "Save the embedded gallery folder to this .npz, to "
                    "reuse with --gallery=PATH.npz.")
flags.DEFINE_integer("k", 20, "Neighbours in the similarity-weighted kNN vote (and listed "
                     "per image in predictions.csv).")
flags.DEFINE_float("temperature", 0.0, "Temperature T > 0 of the vote weights exp(sim / T); "
                   "0 takes the model's eval_temperature (its training config; 0.07 if "
                   "absent).")
flags.DEFINE_bool("labels_from_dirs", False, "Query images sit in IMAGES/<fine label>/: report "
                  "accuracy overall and per class (terminal and summary.json).")
flags.DEFINE_string("providers", "", "onnxruntime execution providers, comma-separated, best "
                    "first (names or aliases: cuda, cpu, tensorrt). Default: CUDA when "
                    "onnxruntime-gpu is installed, else CPU.")
flags.DEFINE_integer("batch_size", 256, "Images per onnxruntime call.")
flags.DEFINE_integer("workers", None, "Image decoding processes working ahead of inference "
                     "(0: decode in the main process). Default: 0 below 4 CPUs, else CPUs // 4; "
                     "on 2 CPUs decoding workers starve onnxruntime (slower overall).")
flags.DEFINE_enum("index", "auto", ["auto", "flat", "hnsw", "ivf"], "Gallery search: flat "
                  "(exact), hnsw or ivf (IVF-PQ; approximate, re-ranked exactly), or auto: flat "
                  "below 100,000 gallery images, else HNSW within --index_memory, else IVF-PQ. "
                  "Kept beside the gallery .npz (G.index.npz) and reused.")
flags.DEFINE_string("index_memory", "4G", "Memory budget of --index=auto's choice (e.g. "
                    "512M, 4G).")
flags.DEFINE_float("unknown_precision", 0.0, "Open set: predict 'unknown' when an image's top-1 "
                   "similarity is below a threshold calibrated on the gallery (leave-one-out) "
                   "for this precision, e.g. 0.95; 0: off. Saved with the gallery .npz.")
flags.DEFINE_integer("max_image_pixels", images.DEFAULT_MAX_PIXELS, "Decompression-bomb "
                     "limit: images with more pixels (width x height) go to errors.csv "
                     "(default: Pillow's limit).")
flags.DEFINE_integer("intra_op_threads", 0, "onnxruntime threads per operator (0: the CPUs "
                     "the decoding workers leave, or onnxruntime's default with --workers=0).")
flags.DEFINE_bool("progress", True, "Show a progress bar with images per second (stderr).")
flags.DEFINE_integer("shard_size", 100_000, "Images per output shard; a shard is published "
                     "whole, and a rerun of the same command skips the finished ones.")
flags.DEFINE_bool("retry_errors", False, "On a rerun, decode again the files that finished "
                  "shards list in errors.csv (e.g. after a storage hiccup).")
flags.DEFINE_enum("engine", "local", ["local", "ray"], "Who serves the shards: this process, "
                  "or Ray workers (pip install -r requirements-scale.txt; one shard per task).")
flags.DEFINE_string("ray_address", "", "--engine=ray: the Ray cluster to join (e.g. auto, or "
                    "ray://HEAD:10001); empty starts a local one of --engine_workers processes.")
flags.DEFINE_integer("engine_workers", 2, "--engine=ray: worker processes, one onnxruntime "
                     "model each.")
flags.DEFINE_bool("allow_failed_parity", False, "Serve a model whose export failed its "
                  "parity check (its report beside it, parity.json or parity.int8.json / "
                  "parity.fp16.json, says passed=false).")
for _name in ("model", "images", "output"):
    flags.mark_flag_as_required(_name)


def options_from_flags():
    f = flags.FLAGS
    return job.ServeOptions(
        model=f.model, images=f.images, output=f.output, gallery=f.gallery,
        save_gallery=f.save_gallery, k=f.k, temperature=f.temperature,
        labels_from_dirs=f.labels_from_dirs, providers=f.providers, batch_size=f.batch_size,
        workers=f.workers, index=f.index, index_memory=f.index_memory,
        unknown_precision=f.unknown_precision, max_image_pixels=f.max_image_pixels,
        intra_op_threads=f.intra_op_threads, progress=f.progress,
        allow_failed_parity=f.allow_failed_parity, shard_size=f.shard_size,
        retry_errors=f.retry_errors, engine=f.engine, ray_address=f.ray_address,
        engine_workers=f.engine_workers)


class Terminated(KeyboardInterrupt):
    """SIGTERM: ends the run the way Ctrl-C does (finished shards kept, workers stopped)."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # Once: let the cleanup finish.
    raise Terminated()


def _one_line(error):
    return " ".join(str(error).split())


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; use --flags.", file=sys.stderr)
        return 2
    from grafit_tf.errors import UserError

    logging.set_verbosity(logging.WARNING)  # Library INFO chatter off the terminal.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        summary = job.run(options_from_flags())
    except UserError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except job.RunError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:  # A disk that filled or went read-only during the run.
        print(f"error: {e.filename or flags.FLAGS.output}: {e.strerror or _one_line(e)}; "
              "finished shards are kept, the run is not finished.", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"{what}: finished shards are kept in {flags.FLAGS.output}; rerun the same "
              "command to serve the rest.", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    if not summary["embedded"]:
        print(f"error: no image under --images={flags.FLAGS.images} could be embedded; "
              f"reasons in the errors.csv of {flags.FLAGS.output}/shard-*/.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser("serve.py"))
