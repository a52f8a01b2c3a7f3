"""Export to SavedModel and ONNX: parity, signature, metadata, failures."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from grafit_tf import export
from grafit_tf.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parity_on_training_images(tiny_export, tiny_workdir):
    with open(os.path.join(tiny_workdir, "export", "parity.json"), encoding="utf-8") as f:
        stored = json.load(f)
    assert stored["passed"] and stored["images"] >= 64
    assert stored["keras_vs_saved_model"] <= 1e-4
    assert stored["keras_vs_onnxruntime"] <= 1e-4
    assert tiny_export["keras_vs_onnxruntime"] == stored["keras_vs_onnxruntime"]


def test_onnx_model_interface_and_metadata(tiny_export, tiny_workdir):
    import onnx

    model = onnx.load(tiny_export["onnx"])
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == 17
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("images", "embeddings")
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [28, 28, 1]
    meta = {p.key: p.value for p in model.metadata_props}
    with open(os.path.join(tiny_workdir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert meta["input_height"] == "28" and meta["input_width"] == "28"
    assert meta["input_channels"] == "1" and meta["resize"] == "none"
    assert int(meta["embedding_dim"]) == tiny_export["embedding_dim"]
    assert meta["embedding_transform"] == "none" == tiny_export["embedding_transform"]
    assert json.loads(meta["training_config"]) == config
    import grafit_tf

    assert meta["grafit_tf_version"] == grafit_tf.__version__


def test_saved_model_signature_takes_uint8(tiny_export):
    import onnxruntime as ort
    import tensorflow as tf

    fn = tf.saved_model.load(tiny_export["saved_model"]).signatures["serving_default"]
    (spec,) = fn.structured_input_signature[1].values()
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 28, 28, 1]
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1)).astype(np.uint8)
    saved = fn(images=tf.constant(images))["embeddings"].numpy()
    session = ort.InferenceSession(tiny_export["onnx"], providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"images": images})[0]
    assert saved.shape == onnx_out.shape == (3, tiny_export["embedding_dim"])
    np.testing.assert_allclose(np.linalg.norm(saved, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(saved, onnx_out, atol=1e-5)


def test_rgb_resize_center_crop_export(rgb_export):
    assert rgb_export["passed"] and rgb_export["image_shape"] == [32, 32, 3]
    import onnx

    meta = {p.key: p.value for p in onnx.load(rgb_export["onnx"]).metadata_props}
    assert meta["resize"] == "resize_center_crop" and meta["input_channels"] == "3"
    # Exported with the whitening fitted on its 64 training images.
    assert meta["embedding_transform"] == "whiten" == rgb_export["embedding_transform"]


def copy_run(workdir, to):
    """The files `export` reads, so that an export does not replace `tiny_export`'s."""
    for name in ("embedder.keras", "config.json"):
        shutil.copy(os.path.join(workdir, name), to / name)
    return str(to)


@pytest.mark.parametrize("kind", ["center", "whiten"])
def test_export_ends_in_the_transform_fitted_on_the_training_images(kind, tiny_workdir,
                                                                    tmp_path):
    """The exported embedder is normalise((normalise(f(x)) - mean) @ projection), the map
    `embedding_transform.fit` gives on the embeddings of the run's training images."""
    import onnx
    import onnxruntime as ort

    from grafit_tf import embedding_transform, workdir
    from grafit_tf.config import Config
    from grafit_tf.data import sources
    from grafit_tf.embedding import embed, embedding_fn

    report = export.export(copy_run(tiny_workdir, tmp_path), num_parity_images=64,
                           transform=kind, whiten_shrinkage=0.2)
    assert report["passed"] and report["embedding_transform"] == kind
    with open(tmp_path / "export" / "parity.json", encoding="utf-8") as f:
        assert json.load(f)["embedding_transform"] == kind
    meta = {p.key: p.value for p in onnx.load(report["onnx"]).metadata_props}
    assert meta["embedding_transform"] == kind
    # The map by hand, on the plain embedder's embeddings of the training split.
    source = sources.load(Config.from_dict(workdir.read_config(tiny_workdir)))
    fn = embedding_fn(workdir.load_embedder(tiny_workdir), source)
    mean, projection = embedding_transform.fit(embed(fn, source.train, source), kind, 0.2)
    images = source.test.images[:100]
    want = embedding_transform.apply(embed(fn, source.test.take(100), source), mean,
                                     projection)
    session = ort.InferenceSession(report["onnx"], providers=["CPUExecutionProvider"])
    got = session.run(["embeddings"], {"images": images})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    # Not the identity: the transform changes the embedding.
    plain = embed(fn, source.test.take(100), source)
    assert np.abs(got - plain).max() > 0.05


def test_cli_exports_with_a_transform(tiny_workdir, tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "export", "export_onnx.py"),
         f"--workdir={copy_run(tiny_workdir, tmp_path)}", "--embedding_transform=whiten",
         "--parity_images=64"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
    with open(tmp_path / "export" / "parity.json", encoding="utf-8") as f:
        stored = json.load(f)
    assert stored["passed"] and stored["embedding_transform"] == "whiten"


def test_a_failed_export_publishes_nothing_and_keeps_the_previous_one(tiny_workdir, tmp_path):
    """Parity that fails leaves the published export as it was (the failed check goes to
    parity_failed.json, staging is cleaned); the next good export clears that record."""
    copy_run(tiny_workdir, tmp_path)
    images = np.random.default_rng(1).integers(0, 256, (64, 28, 28, 1)).astype(np.uint8)
    export.export(str(tmp_path), images=images)
    out = tmp_path / "export"
    before = {name: (out / name).read_bytes() for name in ("embedder.onnx", "parity.json")}
    with pytest.raises(export.ParityError, match="nothing was published"):
        export.export(str(tmp_path), tolerance=0.0, images=images)
    for name, data in before.items():
        assert (out / name).read_bytes() == data
    with open(out / "parity_failed.json", encoding="utf-8") as f:
        assert json.load(f)["passed"] is False
    assert sorted(os.listdir(out)) == ["embedder.onnx", "parity.json", "parity_failed.json",
                                       "saved_model"]
    os.makedirs(out / f"{export.STAGING}999")  # As a killed export leaves it.
    export.export(str(tmp_path), images=images)
    assert sorted(os.listdir(out)) == ["embedder.onnx", "parity.json", "saved_model"]


def test_user_errors(tiny_workdir, tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        export.export(str(tmp_path))
    shutil.copy(os.path.join(tiny_workdir, "config.json"), tmp_path / "config.json")
    with pytest.raises(UserError, match="embedder.keras not found"):
        export.export(str(tmp_path))
    with pytest.raises(UserError, match="at least 64"):
        export.export(str(tmp_path), num_parity_images=10)
    with pytest.raises(UserError, match="--embedding_transform='pca' is not known"):
        export.export(str(tmp_path), transform="pca")
    with pytest.raises(UserError, match="--tolerance=nan"):
        export.export(str(tmp_path), tolerance=float("nan"))
    with pytest.raises(UserError, match="--opset=1:"):
        export.export(str(tmp_path), opset=1)
    with pytest.raises(UserError, match="--whiten_shrinkage=-0.1"):
        export.export(str(tmp_path), transform="whiten", whiten_shrinkage=-0.1)


@pytest.mark.parametrize("args,needle", [([], "--workdir"), (["--parity_images=abc"], "abc"),
                                         (["W", "--workdir=W"], "unexpected arguments")])
def test_cli_flag_errors_are_one_line_and_exit_2(args, needle, tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "export", "export_onnx.py"),
         *[a.replace("W", str(tmp_path)) for a in args]], capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr


def test_cli_missing_workdir_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "export", "export_onnx.py"),
         f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "no config.json" in lines[0]
