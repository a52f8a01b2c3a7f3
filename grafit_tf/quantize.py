"""Smaller and faster copies of the exported embedder: int8 and float16.

`quantize(run_dir, variant)` derives `W/export/embedder.<variant>.onnx` from the
float32 `W/export/embedder.onnx` and writes what it costs in `parity.<variant>.json`:

- int8: onnxruntime static quantisation in QDQ format, int8 weights per output
  channel, uint8 activations whose ranges are calibrated (MinMax) on training
  images, no labels. For CPUs (int8 convolutions with VNNI / AMX).
- fp16: float16 weights and compute, for the CUDA provider (on a CPU: half the file,
  as fast as float32; `bench/quantize.py`).

Both keep the float model's interface (uint8 images `[N, H, W, C]` -> float32 `[N, D]`)
and metadata, so `OnnxEmbedder` serves them unchanged. The trunk's last global pooling
and everything after it (L2 normalisation, embedding transform) stay float32: an int8
normalisation is not unit norm to serving's 1e-3, a float16 sum of 2048 squares may
overflow, and these few operations cost nothing.

The check: both ONNX models embed the same images (onnxruntime, CPU), the run's
evaluation as `trainer.evaluate` does it (`grafit_tf.evaluation`: training split as
gallery, test split as queries). The report holds each model's metrics, the change of
fine kNN top-1 and fine Recall@1 in points, and max |difference| of the embeddings.
Passed: neither metric falls by more than `tolerance` points and every embedding is
finite and unit norm. A failed check publishes nothing (`parity.<variant>_failed.json`).
"""

import json
import os

import numpy as np

from grafit_tf import evaluation, export, workdir
from grafit_tf.config import Config
from grafit_tf.data import sources
from grafit_tf.errors import UserError

VARIANTS = ("int8", "fp16")
POOLING = ("GlobalAveragePool", "ReduceMean")
CALIBRATION_BATCH = 64
MIN_CALIBRATION_IMAGES = 64
RULE = ("passed: neither fine kNN top-1 nor fine Recall@1 falls by more than tolerance_points "
        "below embedder.onnx's (same images, onnxruntime CPU), and every embedding is "
        "finite and unit norm")


def model_name(variant):
    return f"embedder.{variant}.onnx"


def report_name(variant):
    return f"parity.{variant}.json"  # `serving.embedder.export_parity` reads it.


def head(model):
    """`(cut, nodes)`: the tensor the trunk's last global pooling reads, and the names of
    that pooling node and of every node downstream of it (tf2onnx writes the nodes in
    topological order).

    Raises:
        UserError: the graph has no global pooling (not a `grafit_tf` embedder).
    """
    pools = [n for n in model.graph.node if n.op_type in POOLING]
    if not pools:
        raise UserError("the ONNX model has no global pooling: not an export_onnx.py embedder.")
    tainted, names = set(pools[-1].output), [pools[-1].name]
    for node in model.graph.node:
        if any(name in tainted for name in node.input):
            names.append(node.name)
            tainted.update(node.output)
    return pools[-1].input[0], names


def int8_model(float_path, out_path, images):
    """Writes the static int8 (QDQ) quantisation of `float_path` to `out_path`, its
    activation ranges calibrated on `images` `[N, H, W, C]` uint8."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    model = onnx.load(float_path)
    batches = iter([{model.graph.input[0].name: images[i:i + CALIBRATION_BATCH]}
                    for i in range(0, len(images), CALIBRATION_BATCH)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    with export._quiet("root"):  # Its advice to run its pre-processing (no gain here).
        quantize_static(float_path, out_path, Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=head(model)[1])
    _finish(onnx.load(out_path), model, "int8", out_path)


def fp16_model(float_path, out_path):
    """Writes `float_path` with a float16 trunk (its float32 head kept) to `out_path`."""
    import onnx
    from onnx.utils import Extractor
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(float_path)
    cut, _ = head(model)
    # Converted whole with the head on its block list, the converter would round every
    # head tensor through float16 anyway; so the trunk is converted alone and rejoined.
    parts = Extractor(onnx.shape_inference.infer_shapes(model))
    inp, out = model.graph.input[0].name, model.graph.output[0].name
    trunk = convert_float_to_float16(parts.extract_model([inp], [cut]), keep_io_types=True)
    tail = parts.extract_model([cut], [out])
    for part in (trunk, tail):
        del part.graph.value_info[:]  # merge_models refuses names that both describe.
    merged = onnx.compose.merge_models(trunk, tail, io_map=[(cut, cut)])
    _finish(merged, model, "fp16", out_path)


def _finish(variant, model, name, out_path):
    """The float model's metadata, opsets and batch axis on `variant`, checked, saved."""
    import onnx

    del variant.metadata_props[:], variant.opset_import[:]
    variant.opset_import.extend(model.opset_import)
    onnx.helper.set_model_props(variant, dict(
        {p.key: p.value for p in model.metadata_props}, precision=name))
    for value in list(variant.graph.input) + list(variant.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = export.BATCH_DIM
    onnx.checker.check_model(variant, full_check=True)
    export.write_atomic(out_path, variant.SerializeToString())


def compare(float_path, variant_path, config, data_dir=None):
    """Both models on the run's evaluation (gallery: training split, queries: test split).

    Returns:
        dict: `float32` and `variant` (the `evaluation.knn_metrics` dicts),
        `max_abs_diff` of the embeddings, `non_unit_embeddings` (variant embeddings
        not finite and unit norm), `gallery_images`, `query_images`.
    """
    from grafit_tf.serving.embedder import OnnxEmbedder, row_problems

    cfg = Config.from_dict(dict(config, data_dir=data_dir or config["data_dir"]))
    source = sources.load(cfg)
    models = [OnnxEmbedder(path, "cpu") for path in (float_path, variant_path)]
    worst, bad, embedded = 0.0, 0, []
    for split in (source.train, source.test):
        pairs = [[m(b) for m in models] for b in export.uint8_batches(split, source)]
        worst = max([worst] + [float(np.abs(f - v).max()) for f, v in pairs])
        bad += sum(p is not None for _, v in pairs for p in row_problems(v))
        embedded.append([np.concatenate(e) for e in zip(*pairs)])  # [float, variant]
    (train_f, train_v), (test_f, test_v) = embedded
    before, after = (evaluation.knn_metrics(
        train, source.train.fine, source.train.coarse, test, source.test.fine,
        source.test.coarse, temperature=cfg.eval_temperature,
        num_fine=source.hierarchy.num_fine) for train, test in ((train_f, test_f),
                                                                (train_v, test_v)))
    return {"float32": before, "variant": after, "max_abs_diff": worst,
            "non_unit_embeddings": bad, "gallery_images": len(train_f),
            "query_images": len(test_f)}


def check_settings(variant, tolerance, calibration_images):
    """Raises `UserError` for a bad `quantize` argument (before any work is done)."""
    if variant not in VARIANTS:
        raise UserError(f"variant {variant!r} is not known; choose one of: "
                        f"{', '.join(VARIANTS)}.")
    if not 0 <= tolerance <= 100:  # NaN too.
        raise UserError(f"--quantize_tolerance={tolerance}: give accuracy points, 0 to 100.")
    if calibration_images < MIN_CALIBRATION_IMAGES:
        raise UserError(f"--calibration_images={calibration_images}: use at least "
                        f"{MIN_CALIBRATION_IMAGES}.")


def quantize(run_dir, variant, tolerance=0.5, calibration_images=512, data_dir=None):
    """Writes `run_dir/export/embedder.<variant>.onnx` and its `parity.<variant>.json`.

    Args:
        run_dir: a work directory whose `export/embedder.onnx` exists.
        variant: one of `VARIANTS`.
        tolerance: largest accepted fall of fine kNN top-1 and of fine Recall@1, in
            points (0.5: 90.4% may become 89.9%).
        calibration_images: first training images that calibrate int8 (>= 64).
        data_dir: where the data is now, if not the config's `data_dir`.

    Returns:
        The report (also in the report file), with the model path under `onnx`.

    Raises:
        UserError: a bad argument, a missing float export or data.
        export.ParityError: the check failed; nothing was published.
    """
    check_settings(variant, tolerance, calibration_images)
    out_dir = os.path.join(run_dir, "export")
    float_path = os.path.join(out_dir, "embedder.onnx")
    if not os.path.isfile(float_path):
        raise UserError(f"{float_path} not found; export the float32 model first "
                        "(export/export_onnx.py --workdir=W).")
    config = workdir.read_config(run_dir)
    for stale in os.listdir(out_dir):  # Left by a killed run.
        if stale.startswith(f"{export.STAGING}{variant}."):
            os.remove(os.path.join(out_dir, stale))
    tmp = os.path.join(out_dir, f"{export.STAGING}{variant}.{os.getpid()}.onnx")
    failed = os.path.join(out_dir, f"parity.{variant}_failed.json")
    try:
        report = {"variant": variant, "tolerance_points": tolerance, "rule": RULE}
        if variant == "int8":
            images = export.parity_images(config, calibration_images, data_dir)
            int8_model(float_path, tmp, images)
            report["calibration_images"] = len(images)
        else:
            fp16_model(float_path, tmp)
        measured = compare(float_path, tmp, config, data_dir)
        measured[variant] = measured.pop("variant")
        report.update(measured)
        change = {k: round(100 * (report[variant][k] - report["float32"][k]), 4)
                  for k in ("fine_knn_top1", "fine_recall_at_1")}
        sizes = {"float32": os.path.getsize(float_path), variant: os.path.getsize(tmp)}
        # One query's worth of top-1, to read the tolerance against.
        report.update(change_points=change, size_bytes=sizes,
                      points_per_query=100 / measured["query_images"])
        bad = report["non_unit_embeddings"]
        report["passed"] = bad == 0 and min(change.values()) >= -tolerance
        text = json.dumps(report, indent=2, sort_keys=True).encode()
        if not report["passed"]:
            export.write_atomic(failed, text)
            raise export.ParityError(
                f"{variant} check failed: fine kNN top-1 {change['fine_knn_top1']:+.2f}, "
                f"fine Recall@1 {change['fine_recall_at_1']:+.2f} points against float32 "
                f"(tolerance {tolerance:g}), {bad} embeddings not unit norm; nothing was "
                f"published (see {failed}).")
        os.replace(tmp, os.path.join(out_dir, model_name(variant)))
        export.write_atomic(os.path.join(out_dir, report_name(variant)), text)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if os.path.exists(failed):
        os.remove(failed)
    return dict(report, onnx=os.path.join(out_dir, model_name(variant)))
