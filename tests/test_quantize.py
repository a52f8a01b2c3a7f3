"""int8 and fp16 exports (`export_onnx.py --quantize=int8 --fp16`): the files, serving
them, their accuracy reports, the report each model file maps to, failures."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from grafit_tf import quantize
from grafit_tf.errors import UserError
from tests.conftest import REPO

EXPORT = os.path.join(REPO, "export", "export_onnx.py")


def run_export(*args):
    return subprocess.run([sys.executable, EXPORT, *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


@pytest.fixture(scope="module")
def quantized(tiny_workdir, tmp_path_factory):
    """A copy of `tiny_workdir` exported by the command line with both variants: its
    `export` folder and the command's stdout. The tolerance is 5 points: one of the
    tiny run's 256 queries is 0.39 (its 1-epoch trunk is near ties everywhere)."""
    run = tmp_path_factory.mktemp("quantized_run")
    for name in ("embedder.keras", "config.json", "metrics.json"):
        shutil.copy(os.path.join(tiny_workdir, name), run / name)
    result = run_export(f"--workdir={run}", "--quantize=int8", "--fp16", "--parity_images=64",
                        "--calibration_images=64", "--quantize_tolerance=5")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"run": str(run), "out": str(run / "export"), "stdout": result.stdout}


def load_report(quantized, variant):
    with open(os.path.join(quantized["out"], f"parity.{variant}.json"), encoding="utf-8") as f:
        return json.load(f)


def test_cli_writes_both_variants_beside_the_float_model(quantized):
    assert sorted(os.listdir(quantized["out"])) == [
        "embedder.fp16.onnx", "embedder.int8.onnx", "embedder.onnx", "parity.fp16.json",
        "parity.int8.json", "parity.json", "saved_model"]
    lines = quantized["stdout"].splitlines()
    for variant in ("int8", "fp16"):
        (line,) = [l for l in lines if l.startswith(f"{variant}:")]
        assert line.split()[1] == os.path.join(quantized["out"], f"embedder.{variant}.onnx")
    assert sum("fine kNN top-1" in l and l.endswith("OK") for l in lines) == 2


@pytest.mark.parametrize("variant,close", [("int8", 0.1), ("fp16", 1e-2)])
def test_variants_are_served_unchanged(variant, close, quantized, fashion_pngs):
    """uint8 `[N, H, W, C]` in, unit-norm float32 `[N, D]` out, the float model's metadata,
    embeddings near the float model's but not its copy."""
    import onnx

    from grafit_tf.serving.embedder import OnnxEmbedder

    path = os.path.join(quantized["out"], f"embedder.{variant}.onnx")
    model = OnnxEmbedder(path, "cpu")
    reference = OnnxEmbedder(os.path.join(quantized["out"], "embedder.onnx"), "cpu")
    assert model.session.get_inputs()[0].type == "tensor(uint8)"
    assert (model.image_shape, model.dim, model.config) == (
        reference.image_shape, reference.dim, reference.config)
    images = fashion_pngs["test_images"][..., None]  # [40, 28, 28, 1] uint8.
    got, want = model(images), reference(images)
    assert got.dtype == np.float32 and got.shape == want.shape == (40, reference.dim)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert 0 < np.abs(got - want).max() < close
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    float_meta = {p.key: p.value for p in onnx.load(reference.path).metadata_props}
    assert meta == dict(float_meta, precision=variant)
    assert os.path.getsize(path) < 0.6 * os.path.getsize(reference.path)


def test_int8_quantises_the_trunk_and_keeps_the_head_float(quantized):
    import onnx

    model = onnx.load(os.path.join(quantized["out"], "embedder.int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert ops.count("DequantizeLinear") > ops.count("Conv") and len(weights) >= ops.count("Conv")
    # Nothing quantised from the global pooling on: the L2 normalisation stays float.
    tail = ops[ops.index("GlobalAveragePool"):]
    assert "QuantizeLinear" not in tail and "DequantizeLinear" not in tail
    fp16 = onnx.load(os.path.join(quantized["out"], "embedder.fp16.onnx"))
    types = {i.data_type for i in fp16.graph.initializer if len(i.dims) == 4}  # Conv kernels.
    assert types == {onnx.TensorProto.FLOAT16}


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_reports_hold_the_accuracy_change_and_the_verdict(variant, quantized, tiny_workdir):
    report = load_report(quantized, variant)
    with open(os.path.join(tiny_workdir, "metrics.json"), encoding="utf-8") as f:
        trained = json.load(f)
    # The float32 model's figures are the training run's own evaluation (512 gallery
    # images, 256 queries), to a query whose nearest neighbour is a near tie.
    assert (report["gallery_images"], report["query_images"]) == (512, 256)
    for key in ("fine_knn_top1", "fine_recall_at_1"):
        assert report["float32"][key] == pytest.approx(trained[key], abs=1.5 / 256)
        assert report["change_points"][key] == pytest.approx(
            100 * (report[variant][key] - report["float32"][key]), abs=1e-4)
    assert report["tolerance_points"] == 5 and "tolerance_points" in report["rule"]
    assert report["passed"] is True and report["non_unit_embeddings"] == 0
    assert min(report["change_points"].values()) >= -5
    assert 0 < report["max_abs_diff"] < 0.1
    assert ("calibration_images" in report) == (variant == "int8")


def test_export_parity_maps_each_file_to_its_report(quantized, tmp_path):
    from grafit_tf.serving.embedder import export_parity

    for name in ("embedder.onnx", "embedder.int8.onnx", "embedder.fp16.onnx"):
        assert export_parity(os.path.join(quantized["out"], name)) == "passed"
    for name in ("embedder.onnx", "embedder.int8.onnx", "embedder.fp16.onnx", "my.onnx"):
        shutil.copy(os.path.join(quantized["out"], "embedder.onnx"), tmp_path / name)
    (tmp_path / "parity.json").write_text(json.dumps({"passed": True}))
    # A variant is never judged by the float model's report.
    assert export_parity(str(tmp_path / "embedder.int8.onnx")) == "absent"
    assert export_parity(str(tmp_path / "my.onnx")) == "passed"
    (tmp_path / "parity.int8.json").write_text(json.dumps({"passed": False}))
    (tmp_path / "parity.fp16.json").write_text(json.dumps({"passed": True}))
    with pytest.raises(UserError, match=r"parity\.int8\.json says passed=false: the int8 "
                       r"model loses more accuracy.*--allow_failed_parity"):
        export_parity(str(tmp_path / "embedder.int8.onnx"))
    assert export_parity(str(tmp_path / "embedder.int8.onnx"), allow_failed=True) == "failed"
    assert export_parity(str(tmp_path / "embedder.fp16.onnx")) == "passed"
    assert export_parity(str(tmp_path / "embedder.onnx")) == "passed"


def test_serve_embeds_with_the_int8_model(quantized, fashion_pngs, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    model = os.path.join(quantized["out"], "embedder.int8.onnx")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "serve.py"), "--progress=false", f"--model={model}",
         f"--images={fashion_pngs['queries']}", f"--gallery={fashion_pngs['gallery']}",
         f"--output={tmp_path / 'out'}", "--providers=cpu"], capture_output=True, text=True,
        timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["export_parity"] == "passed"


def test_a_failed_check_publishes_nothing(quantized, monkeypatch):
    """A variant beyond the tolerance leaves the published variant and its report as they
    were; the failed report goes to parity.int8_failed.json, no staging file is left."""
    out = quantized["out"]
    before = {n: open(os.path.join(out, n), "rb").read()
              for n in ("embedder.int8.onnx", "parity.int8.json")}
    compare = quantize.compare

    def worse(*args, **kwargs):  # As if the int8 model had lost 10 points of top-1.
        result = compare(*args, **kwargs)
        result["variant"]["fine_knn_top1"] = result["float32"]["fine_knn_top1"] - 0.1
        return result

    monkeypatch.setattr(quantize, "compare", worse)
    with pytest.raises(quantize.export.ParityError, match=r"int8 check failed: fine kNN "
                       r"top-1 -10\.00.*nothing was published"):
        quantize.quantize(quantized["run"], "int8", tolerance=5, calibration_images=64)
    for name, data in before.items():
        assert open(os.path.join(out, name), "rb").read() == data
    with open(os.path.join(out, "parity.int8_failed.json"), encoding="utf-8") as f:
        assert json.load(f)["passed"] is False
    assert not [n for n in os.listdir(out) if n.startswith(".staging")]
    monkeypatch.setattr(quantize, "compare", compare)
    quantize.quantize(quantized["run"], "int8", tolerance=5, calibration_images=64)
    assert not os.path.exists(os.path.join(out, "parity.int8_failed.json"))


def test_bad_settings(tmp_path):
    with pytest.raises(UserError, match="variant 'int4' is not known"):
        quantize.check_settings("int4", 0.5, 512)
    with pytest.raises(UserError, match="--quantize_tolerance=nan"):
        quantize.check_settings("int8", float("nan"), 512)
    with pytest.raises(UserError, match="--calibration_images=10"):
        quantize.check_settings("int8", 0.5, 10)
    os.makedirs(tmp_path / "export")
    with pytest.raises(UserError, match="embedder.onnx not found; export the float32"):
        quantize.quantize(str(tmp_path), "fp16")


@pytest.mark.parametrize("args,needle", [
    (["--quantize=int4"], "--quantize=int4: choose none or int8"),
    (["--quantize=int8", "--quantize_tolerance=-1"], "--quantize_tolerance=-1"),
    (["--fp16=maybe"], "fp16")])
def test_cli_bad_values_are_one_line_and_exit_2(args, needle, tmp_path):
    result = run_export(f"--workdir={tmp_path}", *args)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "export")  # Refused before the float export.


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_rgb_export_with_a_whitening_keeps_its_transform_float(variant, rgb_export,
                                                               rgb_workdir, tmp_path):
    """3 channels, resize_center_crop, an embedding transform after the pooling: the
    transform's MatMul stays float32 and the variant's metadata says the same."""
    import onnx

    shutil.copy(os.path.join(rgb_workdir, "config.json"), tmp_path / "config.json")
    shutil.copytree(os.path.dirname(rgb_export["onnx"]), tmp_path / "export")
    report = quantize.quantize(str(tmp_path), variant, tolerance=100, calibration_images=64)
    assert report["passed"] and report["non_unit_embeddings"] == 0
    model = onnx.load(report["onnx"])
    meta = {p.key: p.value for p in model.metadata_props}
    assert (meta["resize"], meta["embedding_transform"]) == ("resize_center_crop", "whiten")
    (matmul,) = [n for n in model.graph.node if n.op_type == "MatMul"]
    weights = {i.name: i.data_type for i in model.graph.initializer}
    assert weights.get(matmul.input[1]) == onnx.TensorProto.FLOAT  # Not quantised nor fp16.
