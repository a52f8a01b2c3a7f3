"""int8 and fp16 exports against the float32 one: accuracy change and CPU speed.

    python -m bench.quantize --workdir=/tmp/q_default

(from the repository root, as a module: see bench/runs.py). For a work directory with
`export/embedder.onnx`, writes each variant with `grafit_tf.quantize` (its
`parity.<variant>.json` gives the change of fine kNN top-1 and fine Recall@1 on the
run's evaluation: for Fashion-MNIST the 10,000 test images against the 60,000 training
ones) and times it against the float32 model: `OnnxEmbedder` (as serving runs it, CPU
provider, 2 threads) on the same test-split batches, the two models taking turns (A, B,
A, B ...) for `--rounds`, the median of each. The cores are shared and absolute times
drift, so the figure is the ratio of images per CPU-second (`time.process_time`, both
inference threads); the wall-time ratio is listed beside it.

`--speed_model`: an exported model timed alone (random uint8 images, calibrated on
random images too: speed only), e.g. a ResNet-50 at 224 px. Writes
`bench/results/quantize.json`.
"""

import os
import time

from absl import app, flags

import grafit_tf  # noqa: F401  Before TensorFlow: its oneDNN setting.
from bench.runs import interleaved, publish

flags.DEFINE_string("workdir", None, "Work directory with export/embedder.onnx; the variants "
                    "and their reports are written beside it.")
flags.DEFINE_list("variants", ["int8", "fp16"], "Variants to write and measure.")
flags.DEFINE_integer("rounds", 5, "Alternations (A, B) per figure; the median is kept.")
flags.DEFINE_integer("batch_size", 256, "Images per onnxruntime call (serve.py's default).")
flags.DEFINE_integer("speed_images", 2048, "Test images per timed turn.")
flags.DEFINE_string("speed_model", "",
                    "Exported model timed on random images too ('' or missing: skipped).")
flags.DEFINE_integer("speed_model_images", 32, "Images per timed turn of --speed_model.")
flags.DEFINE_integer("speed_model_batch", 8, "Batch size of --speed_model.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def rates(embedder, batches):
    """A function timing `embedder` over `batches`: `(images / CPU-second, images / s)`."""
    count = sum(len(b) for b in batches)

    def run():
        cpu, wall = time.process_time(), time.perf_counter()
        for batch in batches:
            embedder(batch)
        return count / (time.process_time() - cpu), count / (time.perf_counter() - wall)
    return run


def speed_row(float_path, path, batches, rounds):
    from grafit_tf.serving.embedder import OnnxEmbedder

    r = interleaved({"float32": rates(OnnxEmbedder(float_path, "cpu"), batches),
                     "variant": rates(OnnxEmbedder(path, "cpu"), batches)}, rounds)
    return {"float32_images_per_cpu_s": r["float32"][0], "images_per_cpu_s": r["variant"][0],
            "speed_ratio_cpu": r["variant"][0] / r["float32"][0],
            "speed_ratio_wall": r["variant"][1] / r["float32"][1],
            "size_ratio": os.path.getsize(path) / os.path.getsize(float_path)}


def workdir_rows():
    from grafit_tf import export, quantize, workdir
    from grafit_tf.config import Config
    from grafit_tf.data import sources

    float_path = os.path.join(FLAGS.workdir, "export", "embedder.onnx")
    config = workdir.read_config(FLAGS.workdir)
    source = sources.load(Config.from_dict(dict(config, max_eval_examples=FLAGS.speed_images)))
    batches = list(export.uint8_batches(source.test, source, FLAGS.batch_size))
    rows = []
    for variant in FLAGS.variants:
        report = quantize.quantize(FLAGS.workdir, variant)
        rows.append(dict(
            speed_row(float_path, report["onnx"], batches, FLAGS.rounds), variant=variant,
            model=f"{config['backbone']} {'x'.join(map(str, config['data']['image_shape']))} "
                  f"({config['dataset']})",
            float32_fine_knn_top1=report["float32"]["fine_knn_top1"],
            fine_knn_top1=report[variant]["fine_knn_top1"],
            change_fine_knn_top1=report["change_points"]["fine_knn_top1"],
            float32_fine_recall_at_1=report["float32"]["fine_recall_at_1"],
            fine_recall_at_1=report[variant]["fine_recall_at_1"],
            change_fine_recall_at_1=report["change_points"]["fine_recall_at_1"],
            max_abs_diff=report["max_abs_diff"], passed=report["passed"]))
        print(table(rows), flush=True)
    return rows


def speed_model_rows():
    import tempfile

    import numpy as np
    import onnx

    from grafit_tf import quantize
    from grafit_tf.serving.embedder import OnnxEmbedder

    shape = OnnxEmbedder(FLAGS.speed_model, "cpu").image_shape
    images = np.random.default_rng(0).integers(
        0, 256, (FLAGS.speed_model_images, *shape), dtype=np.uint8)
    batches = [images[i:i + FLAGS.speed_model_batch]
               for i in range(0, len(images), FLAGS.speed_model_batch)]
    meta = {p.key: p.value for p in onnx.load(FLAGS.speed_model, load_external_data=False)
            .metadata_props}
    backbone = json_get(meta.get("training_config"), "backbone")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for variant in FLAGS.variants:
            path = os.path.join(scratch, quantize.model_name(variant))
            if variant == "int8":
                quantize.int8_model(FLAGS.speed_model, path, images)
            else:
                quantize.fp16_model(FLAGS.speed_model, path)
            rows.append(dict(speed_row(FLAGS.speed_model, path, batches, FLAGS.rounds),
                             variant=variant, model=f"{backbone} {'x'.join(map(str, shape))} "
                             "(random images, speed only)"))
            print(table(rows), flush=True)
    return rows


def json_get(text, key):
    import json

    try:
        return json.loads(text or "{}").get(key, "?")
    except ValueError:
        return "?"


def table(rows):
    lines = ["| model | variant | fine kNN top-1 (float32 -> variant) | change (points) | "
             "fine R@1 (float32 -> variant) | change (points) | max abs diff | "
             "speed ratio (CPU time) | speed ratio (wall) | float32 images/CPU-s | size |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        accuracy = ["", "", "", "", ""]
        if "fine_knn_top1" in r:
            accuracy = [f"{100 * r['float32_fine_knn_top1']:.2f} -> {100 * r['fine_knn_top1']:.2f}",
                        f"{r['change_fine_knn_top1']:+.2f}",
                        f"{100 * r['float32_fine_recall_at_1']:.2f} -> "
                        f"{100 * r['fine_recall_at_1']:.2f}",
                        f"{r['change_fine_recall_at_1']:+.2f}", f"{r['max_abs_diff']:.2g}"]
        lines.append(f"| {r['model']} | {r['variant']} | {' | '.join(accuracy)} | "
                     f"{r['speed_ratio_cpu']:.2f} | {r['speed_ratio_wall']:.2f} | "
                     f"{r['float32_images_per_cpu_s']:.0f} | {r['size_ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv):
    del argv
    rows = workdir_rows()
    if FLAGS.speed_model and os.path.isfile(FLAGS.speed_model):
        rows += speed_model_rows()
    publish("quantize", rows, table(rows), update=False)


if __name__ == "__main__":
    app.run(main)
