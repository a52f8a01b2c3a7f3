"""Speed as ratios, each measured against a reference interleaved in the same run.

    python -m bench.speed                      # every part (~25 minutes on 2 cores)
    python -m bench.speed --parts=pipeline     # pipeline, steps, backends, knn, serve

(from the repository root, as a module: see bench/runs.py). The cores are shared
and absolute times drift, so every figure is a ratio of two things timed in turns
(A, B, A, B ...; the median of each), in one process, or in alternating processes
where the setting is read when TensorFlow starts (oneDNN). Times are the process's
CPU time unless said otherwise: a pipeline that keeps both cores busy has the
same ratio in images/s.

- pipeline: the training input pipeline on 500x375 JPEGs vs a plain `tf.data`
  reference (Model Garden's fast path: `decode_and_crop_jpeg` of a random-resized-
  crop window, resize to 224, flip), at 1 and 2 views; and the cores per GPU it
  needs to feed a ResNet-50 at 1,000 images/s. The colour jitter runs in the train
  step: the pipeline draws its numbers; its cost on a CPU (no accelerator) is a row.
- steps: a grafit step vs a 1-view `coarse_ce` step, against the ideal compute
  ratio (3V + V) / 3 (V views forward and backward, and the EMA target forward).
- backends: oneDNN on vs off, and mixed_bfloat16 vs float32 (alternating processes).
- knn: the evaluation's kNN (`grafit_tf.knn.search`, backend auto) vs faiss
  `IndexFlatIP`, time and peak memory (separate processes).
- serve: `serve.py` end to end vs onnxruntime alone on the decoded batches, and
  onnxruntime vs Keras predict (a small trunk at 224 px, JPEGs).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

import grafit_tf  # noqa: F401  Before the parts' TensorFlow: its oneDNN setting.
from bench.runs import ROOT, interleaved, publish

flags.DEFINE_list("parts", ["pipeline", "steps", "backends", "knn", "serve"], "What to measure.")
flags.DEFINE_integer("rounds", 5, "Alternations (A, B) per figure; the median is kept.")
flags.DEFINE_string("scratch", os.path.join(tempfile.gettempdir(), "grafit_bench_speed"),
                    "Where the generated JPEGs and models go (reused).")
FLAGS = flags.FLAGS
GPU_RATE = 1000  # Images/s of a ResNet-50 training step on one current GPU.


def jpegs(n=128, size=(375, 500)):
    """`n` generated photo-like JPEGs of `size` (smooth waves plus noise), paths `[n]`."""
    import numpy as np
    from PIL import Image

    folder = os.path.join(FLAGS.scratch, f"jpegs_{size[0]}x{size[1]}")
    os.makedirs(folder, exist_ok=True)
    rng, paths = np.random.default_rng(0), []
    y, x = np.mgrid[0:size[0], 0:size[1]].astype(np.float32)
    for i in range(n):
        paths.append(os.path.join(folder, f"{i:04d}.jpg"))
        if not os.path.isfile(paths[-1]):
            waves = [127.5 + 127.5 * np.sin(rng.uniform(.02, .2) * y + rng.uniform(.02, .2) * x
                                            + rng.uniform(0, 6.3)) for _ in range(3)]
            pixels = np.stack(waves, -1) + rng.normal(0, 8, size + (3,))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return np.asarray(paths)


def pipeline_part(rounds):
    """Rows: project / reference images per CPU-second, at 1 and 2 views."""
    import numpy as np
    import tensorflow as tf

    from grafit_tf import augment
    from grafit_tf.config import Config
    from grafit_tf.data import hierarchy, pipeline, types

    paths = jpegs()
    labels = np.zeros(len(paths), np.int32)
    split = types.Split(paths=paths, fine=labels, coarse=labels)
    source = types.Source("bench", split, split, hierarchy.from_mapping(["a"], {"a": "x"}),
                          (224, 224, 3), *types.IMAGENET_STATS, resize="resize_center_crop")
    box = tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4])

    def reference(views):
        def one(i, path):
            data, out = tf.io.read_file(path), []
            for v in range(views):
                seed = tf.stack([tf.cast(i, tf.int32), v])
                begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
                    tf.image.extract_jpeg_shape(data), box, seed=seed, min_object_covered=0.0,
                    aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
                    use_image_if_no_bounding_boxes=True)
                window = tf.stack([begin[0], begin[1], size[0], size[1]])
                crop = tf.image.decode_and_crop_jpeg(data, window, channels=3)
                out.append(tf.image.stateless_random_flip_left_right(
                    tf.image.resize(crop, [224, 224]), seed + 7))
            return tf.stack(out)
        ds = tf.data.Dataset.from_tensor_slices(paths).repeat().enumerate()
        return ds.map(one, tf.data.AUTOTUNE).batch(32).prefetch(tf.data.AUTOTUNE)

    def project(views, jitter, rand_augment):
        config = Config(dataset="image_folder", num_views=views, batch_size=32, epochs=1000,
                        crop_scale_min=0.08, jitter_strength=jitter, rand_augment=rand_augment,
                        method="grafit" if views > 1 else "coarse_ce")
        return pipeline.train_dataset_fn(source, config)(None)

    def rate(ds, batches=8):
        it = iter(ds)
        next(it)  # Threads started, buffers filled.
        started = time.process_time()
        for _ in range(batches):
            next(it)
        return batches * 32 / (time.process_time() - started)

    def step_colour(views):  # The colour jitter where it runs, in the train step, on a CPU.
        batch = next(iter(project(views, 0.4, False)))
        colour = tf.function(lambda b: augment.colour(b["views"], b["colour"], 0.4))
        colour(batch)
        return lambda: rate(iter(lambda: colour(batch), None))

    rows = []
    for views in (1, 2):
        ref = reference(views)
        for name, jitter, rand_augment in (("crop, resize, flip", 0.0, False),
                                           ("+ jitter draws", 0.4, False),
                                           ("+ jitter draws + RandAugment", 0.4, True)):
            ds = project(views, jitter, rand_augment)
            r = interleaved({"project": lambda: rate(ds), "reference": lambda: rate(ref)},
                            rounds)
            rows.append({"part": "pipeline", "row": f"{views} view(s): {name}",
                         "project": r["project"], "reference": r["reference"],
                         "ratio": r["project"] / r["reference"],
                         "cores_per_gpu": GPU_RATE / r["project"],
                         "target": 0.5 if rand_augment else 0.9})
        r = interleaved({"colour": step_colour(views), "reference": lambda: rate(ref)}, rounds)
        rows.append({"part": "pipeline", "row": f"{views} view(s): colour jitter in the "
                     "train step, on a CPU", "colour": r["colour"],
                     "reference": r["reference"], "ratio": r["colour"] / r["reference"]})
    return rows


def _synthetic_source(shape, n=256):
    import numpy as np

    from grafit_tf.data import hierarchy, types

    fine = np.arange(n, dtype=np.int32) % 4
    hier = hierarchy.from_mapping(list("abcd"), {"a": "x", "b": "y", "c": "x", "d": "y"})
    images = np.random.default_rng(0).integers(0, 256, (n,) + shape, dtype=np.uint8)
    split = types.Split(images=images, fine=fine, coarse=hier.coarse_of(fine))
    stats = ((128.0,) * shape[-1], (64.0,) * shape[-1])
    return types.Source("bench", split, split, hier, shape, *stats)


def step_fn(config, source, steps=3):
    """`() -> CPU seconds per step` of `config`'s train_step on a fixed batch."""
    import keras
    import tensorflow as tf

    from grafit_tf import builders
    from grafit_tf.data import pipeline

    keras.utils.set_random_seed(0)
    model = builders.build_model(config, source, total_steps=1000)
    model.compile(optimizer=builders.build_optimizer(config, 1000, 10))
    model.optimizer.build(model.trainable_variables)
    batch = next(iter(pipeline.train_dataset_fn(source, config)(None)))
    step = tf.function(model.train_step, jit_compile=False)

    def run():
        started = time.process_time()
        for _ in range(steps):
            step(batch)["loss"].numpy()
        return (time.process_time() - started) / steps

    return run


STEP_SETTINGS = {  # name: (image shape, Config overrides)
    "small_resnet": ((28, 28, 1), dict(backbone="small_resnet", width=16, batch_size=128,
                                       num_views=3, instance_loss="infonce", memory="queue",
                                       queue_size=8192, lambda_inst=0.5)),
    "resnet50": ((224, 224, 3), dict(backbone="resnet50", batch_size=8, num_views=2,
                                     instance_loss="infonce", memory="queue", queue_size=256,
                                     proj_hidden=512)),
}


def steps_part(rounds):
    from grafit_tf.config import Config

    rows = []
    for name, (shape, overrides) in STEP_SETTINGS.items():
        source = _synthetic_source(shape)
        views = overrides["num_views"]
        grafit = step_fn(Config(method="grafit", **overrides), source)
        coarse = step_fn(Config(**dict(overrides, method="coarse_ce", num_views=1)), source)
        r = interleaved({"grafit": grafit, "coarse_ce": coarse}, rounds)
        ideal = (3 * views + views) / 3
        rows.append({"part": "steps", "row": f"{name}, grafit {views} views vs coarse_ce 1 view",
                     "ratio": r["grafit"] / r["coarse_ce"], "ideal": ideal,
                     "of_ideal": r["grafit"] / r["coarse_ce"] / ideal,
                     "grafit_images_per_cpu_second": overrides["batch_size"] / r["grafit"]})
    return rows


# One process's step time, for settings read when TensorFlow starts.
_STEP_CHILD = """
import json, sys
from absl import flags
flags.FLAGS(["x"])
from bench import speed
from grafit_tf.config import Config
shape, overrides = speed.STEP_SETTINGS[sys.argv[1]]
if sys.argv[2] != "none":
    import keras
    keras.mixed_precision.set_global_policy(sys.argv[2])
run = speed.step_fn(Config(method="grafit", mixed_precision=sys.argv[2], **overrides),
                    speed._synthetic_source(shape))
run()
print(json.dumps(min(run() for _ in range(3))))
"""


def _child_step(name, onednn, policy="none"):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", _STEP_CHILD, name, policy], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"the step child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def backends_part(rounds):
    rows = []
    for name in STEP_SETTINGS:
        r = interleaved({"on": lambda: _child_step(name, "1"),
                         "off": lambda: _child_step(name, "0")}, max(2, rounds // 2))
        rows.append({"part": "backends", "row": f"{name} grafit step, oneDNN on / off",
                     "ratio": r["on"] / r["off"]})
    r = interleaved({"bf16": lambda: _child_step("resnet50", "1", "mixed_bfloat16"),
                     "f32": lambda: _child_step("resnet50", "1")}, max(2, rounds // 2))
    rows.append({"part": "backends", "row": "resnet50 grafit step, bfloat16 / float32 (oneDNN)",
                 "ratio": r["bf16"] / r["f32"]})
    return rows


_KNN_CHILD = """
import json, sys, time
import numpy as np
rng = np.random.default_rng(0)
unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
gallery = unit(rng.standard_normal((100_000, 2048), dtype=np.float32))
queries = unit(rng.standard_normal((10_000, 2048), dtype=np.float32))
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024  # MB.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Resets the peak (VmHWM) to the present size: data generation excluded.
base = rss("VmRSS")
started = time.process_time()
if sys.argv[1] == "faiss":
    import faiss
    index = faiss.IndexFlatIP(2048)
    index.add(gallery)
    index.search(queries, 20)
else:
    from grafit_tf import knn
    knn.search(queries, gallery, 20)
print(json.dumps([time.process_time() - started, rss("VmHWM") - base]))
"""


def knn_part(rounds):
    def child(kind):
        out = subprocess.run([sys.executable, "-c", _KNN_CHILD, kind], cwd=ROOT,
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"the kNN child failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    runs = {"knn": [], "faiss": []}
    for _ in range(max(2, rounds // 2)):
        for kind in runs:
            runs[kind].append(child(kind))
    (k_time, k_mem), (f_time, f_mem) = ([statistics.median(x) for x in zip(*runs[k])]
                                        for k in ("knn", "faiss"))
    return [{"part": "knn", "row": "10,000 queries x 100,000 x 2048 gallery, k=20: "
             "grafit_tf.knn.search / faiss IndexFlatIP", "ratio": k_time / f_time,
             "peak_mb": k_mem, "faiss_peak_mb": f_mem, "memory_ratio": k_mem / f_mem}]


def _serving_model():
    """A small_resnet embedder (width 32, untrained: speed depends on the architecture)
    at 224 px, exported by `grafit_tf.export` into the scratch folder: the ONNX path."""
    import keras
    import numpy as np

    import grafit_tf
    from grafit_tf import backbones, export, heads
    from grafit_tf.config import Config
    from grafit_tf.data import types

    run = os.path.join(FLAGS.scratch, "serve_run")
    model = os.path.join(run, "export", "embedder.onnx")
    if os.path.isfile(model):
        return run, model
    os.makedirs(run, exist_ok=True)
    keras.utils.set_random_seed(0)
    shape = (224, 224, 3)
    trunk = backbones.small_resnet(shape, *types.IMAGENET_STATS, width=32)
    heads.embedder(trunk).save(os.path.join(run, "embedder.keras"))
    config = Config(dataset="image_folder", image_size=224, width=32)
    # config.json's data description as `sources.describe` writes it (no folder is read).
    data = {"name": "image_folder", "image_shape": list(shape), "resize": "resize_center_crop",
            "mean": list(types.IMAGENET_STATS[0]), "std": list(types.IMAGENET_STATS[1])}
    with open(os.path.join(run, "config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(config.to_dict(), version=grafit_tf.__version__, data=data), f)
    images = np.random.default_rng(0).integers(0, 256, (64,) + shape, dtype=np.uint8)
    export.export(run, num_parity_images=64, images=images)
    return run, model


def serve_part(rounds):
    """Rows: serve.py's run (by --workers) / onnxruntime alone on the decoded batches,
    and onnxruntime / Keras predict; wall time (serving is one process)."""
    import keras
    import numpy as np

    from grafit_tf.serving import images as images_lib
    from grafit_tf.serving import job
    from grafit_tf.serving.embedder import OnnxEmbedder

    run, model = _serving_model()
    paths = jpegs(384)  # A run's start-up (session, probe, model digest) is not per image.
    folder = os.path.dirname(paths[0])
    embedder = OnnxEmbedder(model, "cpu")
    spec = images_lib.Spec(embedder.image_shape, embedder.resize)
    decoded = np.stack([images_lib.load(p, spec) for p in paths])
    batches = [decoded[i:i + 32] for i in range(0, len(decoded), 32)]
    keras_model = keras.saving.load_model(os.path.join(run, "embedder.keras"))

    def wall_rate(fn):
        started = time.perf_counter()
        fn()
        return len(decoded) / (time.perf_counter() - started)

    def onnx():
        return wall_rate(lambda: [embedder(b) for b in batches])

    def serve(workers):
        def fn():
            with tempfile.TemporaryDirectory() as out:
                options = job.ServeOptions(model=model, images=folder, output=out,
                                           workers=workers, batch_size=32, progress=False,
                                           providers="cpu")
                return job.run(options, log=lambda *a: None)["images_per_second"]
        return fn

    rows = []
    for workers in (0, 1, 2):
        r = interleaved({"serve": serve(workers), "onnxruntime": onnx}, rounds)
        rows.append({"part": "serve", "row": f"serve.py --workers={workers} / onnxruntime alone "
                     "(small_resnet, 224 px, 500x375 JPEGs)", "ratio": r["serve"] / r["onnxruntime"],
                     "serve_images_per_s": r["serve"], "target": 0.8})
    floats = decoded.astype(np.float32)
    r = interleaved({"onnxruntime": onnx, "keras": lambda: wall_rate(
        lambda: keras_model.predict(floats, batch_size=32, verbose=0))}, rounds)
    rows.append({"part": "serve", "row": "onnxruntime / Keras predict (same batches)",
                 "ratio": r["onnxruntime"] / r["keras"]})
    return rows


PARTS = {"pipeline": pipeline_part, "steps": steps_part, "backends": backends_part,
         "knn": knn_part, "serve": serve_part}


def table(rows):
    lines = ["| part | what | ratio | notes |", "|---|---|---|---|"]
    for r in rows:
        notes = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in r.items() if k not in ("part", "row", "ratio"))
        lines.append(f"| {r['part']} | {r['row']} | {r['ratio']:.2f} | {notes} |")
    return "\n".join(lines)


def main(argv):
    del argv
    rows = []
    for part in FLAGS.parts:
        rows += PARTS[part](FLAGS.rounds)
        print(table(rows), flush=True)
    # The parts not measured this time keep their rows from the last run.
    saved = os.path.join(ROOT, "bench", "results", "speed.json")
    if os.path.isfile(saved):
        with open(saved, encoding="utf-8") as f:
            kept = [r for r in json.load(f)["rows"] if r["part"] not in FLAGS.parts]
        rows = sorted(kept + rows, key=lambda r: list(PARTS).index(r["part"]))
    publish("speed", rows, table(rows), update=False)


if __name__ == "__main__":
    app.run(main)
