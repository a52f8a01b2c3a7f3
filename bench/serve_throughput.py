"""Serving throughput: serve.py on the Fashion-MNIST test PNGs, and onnxruntime vs Keras.

    python -m bench.serve_throughput --workdir=/tmp/serve_bench_run [--parts=engine,resume]

(from the repository root, as a module: see bench/runs.py).

Measures, on the exported model of a finished training run (exported first if
`W/export/embedder.onnx` is missing), the `--parts` asked for (all by default):

1. `serve.py` end to end over the 10,000 Fashion-MNIST test images written as
   PNG files: its own images/second (decoding in worker processes overlapped
   with onnxruntime, from summary.json) and the wall time of the whole command
   (Python start-up and model loading included), per batch size and number
   of decoding workers;
2. embedding throughput on the same uint8 batches already in memory:
   onnxruntime (CPU provider; set up as serve.py configures it, and one
   with onnxruntime's default options) next to Keras `predict` and
   `predict_on_batch` of `W/embedder.keras`;
3. `engine`: images/second of `serve.py --engine=ray --engine_workers=2` against
   `--engine=local` on the same PNGs and gallery (a .npz, embedded once), in
   shards of `--shard_size`; the two alternate over `--rounds` rounds;
4. `resume`: the wall time of a rerun of `serve.py` after a SIGKILL once half its
   shards are published, against an uninterrupted run (alternating over
   `--rounds` rounds); the resumed outputs must equal the uninterrupted ones.

Each figure is the median of `--repeats` timed runs (after a warm-up for the
in-memory runtimes, which take turns so that a change in the load of a shared
machine affects them alike). Writes `bench/results/serve.json`: the parts run
replace theirs, the others stay.
"""

import json
import os
import platform
import re
import shutil
import signal
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
flags.DEFINE_list("parts", ["serve", "runtimes", "engine", "resume"], "What to measure: "
                  "serve (serve.py per batch size and workers), runtimes (embedding only), "
                  "engine (--engine=ray vs local), resume (rerun after a kill).")
flags.DEFINE_string("gallery_dir", os.path.join(tempfile.gettempdir(),
                                                "grafit_bench_fmnist_gallery_png"),
                    "engine, resume: where 500 training images per class are written as PNGs "
                    "(reused when complete), the gallery of the kNN vote.")
flags.DEFINE_integer("shard_size", 1000, "engine, resume: serve.py --shard_size.")
flags.DEFINE_integer("engine_workers", 2, "engine: serve.py --engine_workers.")
flags.DEFINE_integer("rounds", 3, "engine, resume: rounds of the two commands in turn.")
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

    served = OnnxEmbedder(model, providers="cpu")  # Exactly as serve.py sets it up.
    plain = ort.InferenceSession(model, providers=["CPUExecutionProvider"])  # Defaults.
    embedder = keras.saving.load_model(os.path.join(workdir, "embedder.keras"))
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    floats = images.astype(np.float32)  # Keras takes the float pixels the graph casts to.
    float_batches = [b.astype(np.float32) for b in batches]

    def onnx_pass():
        return [served(b) for b in batches]

    def onnx_default_pass():
        return [plain.run(None, {"images": b})[0] for b in batches]

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


def _serve_command(model, images, output, *extra):
    return [sys.executable, os.path.join(REPO, "serve.py"), f"--model={model}",
            f"--images={images}", f"--output={output}", "--progress=false", *extra]


def _timed(command):
    """Runs a serve.py command to completion: (wall seconds, its stdout)."""
    started = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
    return time.perf_counter() - started, done.stdout


def _ensure_gallery(data_dir, gallery_dir, model, npz):
    """The gallery PNGs (500 training images per class) embedded once into `npz`."""
    from grafit_tf.data import png_folders
    from grafit_tf.serving import embed, gallery as gallery_lib, walk
    from grafit_tf.serving.embedder import OnnxEmbedder

    count = sum(len(f) for _, _, f in os.walk(gallery_dir)) if os.path.isdir(gallery_dir) else 0
    if count != 10 * 500:
        png_folders.fashion_mnist_to_png(data_dir, "train", gallery_dir, max_per_class=500)
    files, _ = walk.walk(gallery_dir)
    embedder = OnnxEmbedder(model)
    result = embed.embed_files(embedder, [f.path for f in files], 256, 0)
    gallery_lib.save(gallery_lib.from_embedded(
        result.embeddings, [files[i].relpath for i in result.ok], embedder.sha256), npz)
    return npz


def _compare(expected, got):
    """How the outputs of two finished runs differ (`shards.read` of each folder)."""
    import numpy as np

    from grafit_tf.serving import shards

    a, b = shards.read(expected), shards.read(got)
    numeric = [c for c in a.predictions if c == "score" or c.startswith("similarity_")]
    return {"max_abs_embedding_difference": float(np.abs(a.embeddings - b.embeddings).max()),
            "index_equal": a.index == b.index, "errors_equal": a.errors == b.errors,
            "predictions_equal": a.predictions == b.predictions,
            "labels_and_neighbours_equal": all(a.predictions[c] == b.predictions[c]
                                               for c in a.predictions if c not in numeric),
            "max_abs_score_difference": max(
                (abs(float(x) - float(y)) for c in numeric
                 for x, y in zip(a.predictions[c], b.predictions[c])), default=0.0)}


def bench_engine(model, png_dir, gallery, shard_size, workers, rounds, scratch):
    """`serve.py --engine=ray` against `--engine=local`, in turns (A, B, A, B, ...)."""
    from grafit_tf.serving import shards

    engines = {"local": ["--engine=local"],
               "ray": ["--engine=ray", f"--engine_workers={workers}"]}
    runs = {name: [] for name in engines}
    for round_ in range(rounds):
        for name, extra in engines.items():
            out = os.path.join(scratch, f"engine_{name}")
            shutil.rmtree(out, ignore_errors=True)
            wall, stdout = _timed(_serve_command(model, png_dir, out, f"--gallery={gallery}",
                                                 f"--shard_size={shard_size}", *extra))
            with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
                summary = json.load(fh)
            assert summary["embedded"] == NUM_IMAGES, summary
            start = re.search(r"local cluster started in ([0-9.]+) s", stdout)
            # Inside the shards (no start-up): the images over the shards' own seconds,
            # shared by the processes serving them.
            busy = sum(shards.stats(out, n)["seconds"] for n in shards.published(out))
            runs[name].append({"wall_seconds": wall, "wall_images_per_second": NUM_IMAGES / wall,
                               "images_per_second": summary["images_per_second"],
                               "in_shard_images_per_second":
                                   NUM_IMAGES * (workers if name == "ray" else 1) / busy,
                               "cluster_start_seconds": float(start[1]) if start else None})
            print(json.dumps({"round": round_, "engine": name, **runs[name][-1]}), flush=True)
    ratios = lambda key: [r[key] / l[key] for l, r in zip(runs["local"], runs["ray"])]  # noqa: E731
    return {"shard_size": shard_size, "engine_workers": workers, "rounds": rounds,
            "runs": runs,
            "median": {name: {k: statistics.median(r[k] for r in rs)
                              for k in ("wall_seconds", "wall_images_per_second",
                                        "images_per_second", "in_shard_images_per_second")}
                       for name, rs in runs.items()},
            "ray_over_local_images_per_second": statistics.median(ratios("images_per_second")),
            "ray_over_local_wall_images_per_second": statistics.median(
                ratios("wall_images_per_second")),
            "ray_over_local_in_shard_images_per_second": statistics.median(
                ratios("in_shard_images_per_second")),
            "median_cluster_start_seconds": statistics.median(
                r["cluster_start_seconds"] for r in runs["ray"]),
            "outputs_ray_vs_local": _compare(os.path.join(scratch, "engine_local"),
                                             os.path.join(scratch, "engine_ray"))}


def bench_resume(model, png_dir, gallery, shard_size, rounds, scratch):
    """The rerun after a SIGKILL at half the shards against a whole run, in turns."""
    from grafit_tf.serving import shards

    total = -(-NUM_IMAGES // shard_size)
    rows = []
    for round_ in range(rounds):
        whole, killed = os.path.join(scratch, "resume_whole"), os.path.join(scratch, "resume")
        for out in (whole, killed):
            shutil.rmtree(out, ignore_errors=True)
        command = lambda out: _serve_command(  # noqa: E731
            model, png_dir, out, f"--gallery={gallery}", f"--shard_size={shard_size}")
        whole_seconds, _ = _timed(command(whole))
        started = time.perf_counter()
        proc = subprocess.Popen(command(killed), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while len(shards.published(killed)) < total // 2 and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rows.append({"whole_seconds": whole_seconds,
                     "killed_after_seconds": time.perf_counter() - started,
                     "shards_kept": len(shards.published(killed)), "shards": total})
        rows[-1]["rerun_seconds"], _ = _timed(command(killed))
        rows[-1]["rerun_over_whole"] = rows[-1]["rerun_seconds"] / whole_seconds
        rows[-1]["outputs_vs_whole_run"] = _compare(whole, killed)
        print(json.dumps({"round": round_, **rows[-1]}), flush=True)
    return {"shard_size": shard_size, "rounds": rows,
            "median_whole_seconds": statistics.median(r["whole_seconds"] for r in rows),
            "median_rerun_seconds": statistics.median(r["rerun_seconds"] for r in rows),
            "median_rerun_over_whole": statistics.median(r["rerun_over_whole"] for r in rows)}


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    import grafit_tf
    from grafit_tf.data import png_folders

    f = flags.FLAGS
    unknown = set(f.parts) - {"serve", "runtimes", "engine", "resume"}
    if unknown:
        raise app.UsageError(f"--parts: unknown {sorted(unknown)}; choose among serve, "
                             "runtimes, engine, resume.")
    model = _ensure_onnx(f.workdir)
    png_dir = _ensure_pngs(f.data_dir, f.png_dir)
    with open(os.path.join(f.workdir, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    try:
        with open(f.output, encoding="utf-8") as fh:
            result = json.load(fh)  # The parts not run now keep their figures.
    except (OSError, ValueError):
        result = {}
    machine = {"cpus": os.cpu_count(), "gpu": None, "platform": platform.platform(),
               "python": platform.python_version(), "load_average_before": os.getloadavg()}
    about = {"command": invocation(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
             "machine": machine,
             "model": {"workdir": f.workdir, "backbone": config.get("backbone"),
                       "width": config.get("width"),
                       "image_shape": config["data"]["image_shape"]},
             "images": NUM_IMAGES, "version": grafit_tf.__version__}

    if {"serve", "runtimes"} & set(f.parts):
        images, _ = png_folders.read_fashion_mnist(f.data_dir, "test")
        images = np.ascontiguousarray(images[..., None])  # [10000, 28, 28, 1] uint8
        serve_rows, runtime_rows = [], []
        for batch_size in f.batch_size:
            for workers in f.workers if "serve" in f.parts else []:
                rate, wall = bench_serve(model, png_dir, batch_size, workers, f.repeats)
                serve_rows.append({"batch_size": batch_size, "workers": workers,
                                   "images_per_second": rate, "wall_seconds": wall,
                                   "wall_images_per_second": NUM_IMAGES / wall})
                print(json.dumps(serve_rows[-1]), flush=True)
            if "runtimes" in f.parts:
                runtime_rows.append(dict(batch_size=batch_size, **bench_runtimes(
                    f.workdir, model, images, batch_size, f.repeats)))
                print(json.dumps(runtime_rows[-1]), flush=True)
        result.update(about, repeats=f.repeats)
        result.update({"serve": serve_rows} if "serve" in f.parts else {})
        result.update({"embedding_only": runtime_rows} if "runtimes" in f.parts else {})
    if {"engine", "resume"} & set(f.parts):
        with tempfile.TemporaryDirectory() as scratch:
            gallery = _ensure_gallery(f.data_dir, f.gallery_dir, model,
                                      os.path.join(scratch, "gallery.npz"))
            if "engine" in f.parts:
                result["engine"] = dict(about, **bench_engine(
                    model, png_dir, gallery, f.shard_size, f.engine_workers, f.rounds, scratch))
            if "resume" in f.parts:
                result["resume"] = dict(about, **bench_resume(
                    model, png_dir, gallery, f.shard_size, f.rounds, scratch))
    machine["load_average_after"] = os.getloadavg()

    os.makedirs(os.path.dirname(f.output), exist_ok=True)
    tmp = f.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    os.replace(tmp, f.output)
    print(f"wrote {f.output}")


if __name__ == "__main__":
    app.run(main)
