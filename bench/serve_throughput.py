"""Serving throughput: serve.py on the Fashion-MNIST test PNGs, and onnxruntime vs Keras.

    python -m bench.serve_throughput --workdir=/tmp/serve_bench_run

(from the repository root, as a module: see bench/runs.py).

Measures, on the exported model of a finished training run (exported first if
`W/export/embedder.onnx` is missing):

1. `serve.py` end to end over the 10,000 Fashion-MNIST test images written as
   PNG files: its own images/second (decoding in worker processes overlapped
   with onnxruntime, from summary.json) and the wall time of the whole command
   (Python start-up and model loading included), per batch size and number
   of decoding workers;
2. embedding throughput on the same uint8 batches already in memory:
   onnxruntime (CPU provider; the session as serve.py configures it, and one
   with onnxruntime's default options) next to Keras `predict` and
   `predict_on_batch` of `W/embedder.keras`.

Each figure is the median of `--repeats` timed runs (after a warm-up for the
in-memory runtimes, which take turns so that a change in the load of a shared
machine affects them alike). Writes `bench/results/serve.json`.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from bench.runs import ROOT as REPO
from bench.runs import invocation

flags.DEFINE_string("workdir", None, "Finished training run (embedder.keras, config.json; "
                    "export/embedder.onnx is written when missing).")
flags.DEFINE_string("data_dir", "/usr/share/datasets/fashion-mnist",
                    "Folder of the Fashion-MNIST IDX .gz files.")
flags.DEFINE_string("png_dir", os.path.join(tempfile.gettempdir(), "grafit_bench_fmnist_test_png"),
                    "Where the test split is written as PNGs (reused when complete).")
flags.DEFINE_multi_integer("batch_size", [32, 256], "Batch sizes to measure (repeatable flag).")
flags.DEFINE_multi_integer("workers", [1, 2], "serve.py --workers values to measure "
                           "(decoding processes; repeatable flag).")
flags.DEFINE_integer("repeats", 3, "Timed repetitions per figure (the median is reported).")
flags.DEFINE_string("output", os.path.join(REPO, "bench", "results", "serve.json"),
                    "Where to write the results (JSON).")
flags.mark_flag_as_required("workdir")

NUM_IMAGES = 10000  # The Fashion-MNIST test split.


def _ensure_onnx(workdir):
    path = os.path.join(workdir, "export", "embedder.onnx")
    if not os.path.isfile(path):
        from grafit_tf import export

        export.export(workdir)
    return path


def _ensure_pngs(data_dir, png_dir):
    from grafit_tf.data import png_folders

    count = sum(len(files) for _, _, files in os.walk(png_dir)) if os.path.isdir(png_dir) else 0
    if count != NUM_IMAGES:
        png_folders.fashion_mnist_to_png(data_dir, "test", png_dir)
    return png_dir


def _median_rates(fns, images, repeats):
    """Median images/second of each `fns[name]()` (one full pass over `images` images).

    The runtimes take turns within each repeat, so a change in machine load
    (the CPUs are shared) affects all of them alike.
    """
    for fn in fns.values():
        fn()  # Warm-up: graph tracing, thread pools, caches.
    rates = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            rates[name].append(images / (time.perf_counter() - started))
    return {name: statistics.median(r) for name, r in rates.items()}


def bench_serve(model, png_dir, batch_size, workers, repeats):
    """serve.py over the PNG folder: (median images/s from summary.json, median wall s)."""
    rates, walls = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            subprocess.run([sys.executable, os.path.join(REPO, "serve.py"), f"--model={model}",
                            f"--images={png_dir}", f"--output={out}", f"--workers={workers}",
                            f"--batch_size={batch_size}", "--progress=false"],
                           check=True, capture_output=True, cwd=REPO)
            walls.append(time.perf_counter() - started)
            with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
                summary = json.load(f)
            assert summary["embedded"] == NUM_IMAGES, summary
            rates.append(summary["images_per_second"])
    return statistics.median(rates), statistics.median(walls)


def bench_runtimes(workdir, model, images, batch_size, repeats):
    """Embedding-only images/s of onnxruntime and Keras on the same batches.

    Args:
        images: `[N, 28, 28, 1]` uint8.
    """
    import keras
    import numpy as np
    import onnxruntime as ort

    from grafit_tf.serving.embedder import OnnxEmbedder

    served = OnnxEmbedder(model, providers="cpu")  # The session exactly as serve.py sets it.
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])  # Defaults.
    embedder = keras.saving.load_model(os.path.join(workdir, "embedder.keras"))
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    floats = images.astype(np.float32)  # Keras takes the float pixels the graph casts to.
    float_batches = [b.astype(np.float32) for b in batches]

    def onnx_pass():
        return [served(b) for b in batches]

    def onnx_default_pass():
        return [session.run(None, {"images": b})[0] for b in batches]

    def predict_pass():
        return embedder.predict(floats, batch_size=batch_size, verbose=0)

    def on_batch_pass():
        return [embedder.predict_on_batch(b) for b in float_batches]

    diff = float(np.abs(np.concatenate(onnx_pass()) - predict_pass()).max())
    passes = {"onnxruntime": onnx_pass, "onnxruntime_default_options": onnx_default_pass,
              "keras_predict": predict_pass, "keras_predict_on_batch": on_batch_pass}
    rates = _median_rates(passes, len(images), repeats)
    result = {f"{name}_images_per_second": rate for name, rate in rates.items()}
    result["max_abs_difference"] = diff
    return result


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    import grafit_tf
    from grafit_tf.data import png_folders

    f = flags.FLAGS
    model = _ensure_onnx(f.workdir)
    png_dir = _ensure_pngs(f.data_dir, f.png_dir)
    images, _ = png_folders.read_fashion_mnist(f.data_dir, "test")
    images = np.ascontiguousarray(images[..., None])  # [10000, 28, 28, 1] uint8
    with open(os.path.join(f.workdir, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)

    serve_rows, runtime_rows = [], []
    load_before = os.getloadavg()
    for batch_size in f.batch_size:
        for workers in f.workers:
            rate, wall = bench_serve(model, png_dir, batch_size, workers, f.repeats)
            serve_rows.append({"batch_size": batch_size, "workers": workers,
                               "images_per_second": rate, "wall_seconds": wall,
                               "wall_images_per_second": NUM_IMAGES / wall})
            print(json.dumps(serve_rows[-1]), flush=True)
        runtime_rows.append(dict(batch_size=batch_size, **bench_runtimes(
            f.workdir, model, images, batch_size, f.repeats)))
        print(json.dumps(runtime_rows[-1]), flush=True)

    result = {
        "command": invocation(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpus": os.cpu_count(), "gpu": None, "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "model": {"workdir": f.workdir, "backbone": config.get("backbone"),
                  "width": config.get("width"), "image_shape": config["data"]["image_shape"]},
        "images": NUM_IMAGES,
        "repeats": f.repeats,
        "version": grafit_tf.__version__,
        "serve": serve_rows,
        "embedding_only": runtime_rows,
    }
    os.makedirs(os.path.dirname(f.output), exist_ok=True)
    tmp = f.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    os.replace(tmp, f.output)
    print(f"wrote {f.output}")


if __name__ == "__main__":
    app.run(main)
