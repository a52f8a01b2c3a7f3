"""grafit_tf.serving.embedder: the onnxruntime side, and what it refuses.

`onnx_model` writes small ONNX embedders in the export's interface (uint8
`[N, H, W, C]` -> float `[N, D]`, the export's metadata), healthy or broken on
purpose; the serve.py tests use them too, since they need no training.
"""

import json
import os

import numpy as np
import pytest

from grafit_tf.errors import UserError


def onnx_model(path, image_shape=(28, 28, 1), dim=16, output="unit", metadata=None,
               graph_shape=None, config=None):
    """Writes a small embedder to `path`: a fixed random projection of the pixels.

    Args:
        image_shape: `(H, W, C)` of the metadata (and, by default, of the graph input).
        dim: embedding dimension.
        output: 'unit' (L2-normalised: an all-zero image gives 0 / 0 = NaN),
            'nan' (every output NaN), 'raw' (not normalised) or 'rank3' ([N, 1, D]).
        metadata: replaces / adds metadata properties (None values: removed).
        graph_shape: `(H, W, C)` of the graph input, if not `image_shape`.
        config: the training config stored as `training_config`.

    Returns:
        `path`.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    h, w, c = graph_shape or image_shape
    pixels = h * w * c
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(pixels, dim)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weights"], ["raw"]),
    ]
    inits = [numpy_helper.from_array(np.asarray([-1, pixels], np.int64), "flat_shape"),
             numpy_helper.from_array(weights, "weights")]
    last = "raw"
    if output in ("unit", "nan", "rank3"):
        nodes += [helper.make_node("Mul", ["raw", "raw"], ["sq"]),
                  helper.make_node("ReduceSum", ["sq", "axes"], ["sum"], keepdims=1),
                  helper.make_node("Sqrt", ["sum"], ["norm"]),
                  helper.make_node("Div", ["raw", "norm"], ["unit"])]
        inits.append(numpy_helper.from_array(np.asarray([1], np.int64), "axes"))
        last = "unit"
    if output == "nan":
        nodes.append(helper.make_node("Mul", ["unit", "nan"], ["poisoned"]))
        inits.append(numpy_helper.from_array(np.asarray(np.nan, np.float32), "nan"))
        last = "poisoned"
    if output == "rank3":
        nodes.append(helper.make_node("Unsqueeze", ["unit", "axes"], ["rank3"]))
        last = "rank3"
    nodes.append(helper.make_node("Identity", [last], ["embeddings"]))
    out_shape = ["batch", 1, dim] if output == "rank3" else ["batch", dim]
    graph = helper.make_graph(
        nodes, "embedder",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", h, w, c])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, out_shape)],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    props = {"input_height": str(image_shape[0]), "input_width": str(image_shape[1]),
             "input_channels": str(image_shape[2]), "input_dtype": "uint8",
             "embedding_dim": str(dim), "resize": "none",
             "training_config": json.dumps(config if config is not None
                                           else {"eval_temperature": 0.07})}
    props.update(metadata or {})
    helper.set_model_props(model, {k: v for k, v in props.items() if v is not None})
    onnx.checker.check_model(model)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return str(path)


def test_providers_resolve():
    from grafit_tf.serving.embedder import resolve_providers

    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers("")[-1] == "CPUExecutionProvider"


def test_a_healthy_model_embeds_unit_rows(tmp_path):
    from grafit_tf.serving.embedder import OnnxEmbedder

    embedder = OnnxEmbedder(onnx_model(tmp_path / "m.onnx"), "cpu")
    assert embedder.image_shape == (28, 28, 1) and embedder.dim == 16
    out = embedder(np.random.default_rng(1).integers(0, 256, (3, 28, 28, 1), np.uint8))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("case, message", [
    ("nan", "not a finite unit-norm [N, D]"),
    ("raw", "not a finite unit-norm [N, D]"),
    ("rank3", "not a finite unit-norm [N, D]"),
    ("wrong_dim", "embedding_dim 8"),
    ("metadata_vs_graph", "its metadata says input 32x32x1 (HxWxC) but its graph input is "
                          "[N, 28, 28, 1]"),
    ("metadata_not_int", "not three integers"),
])
def test_a_broken_model_is_refused_with_one_line(case, message, tmp_path):
    from grafit_tf.serving.embedder import OnnxEmbedder

    path = tmp_path / "m.onnx"
    if case in ("nan", "raw", "rank3"):
        onnx_model(path, output=case)
    elif case == "wrong_dim":
        onnx_model(path, metadata={"embedding_dim": "8"})
    elif case == "metadata_vs_graph":
        onnx_model(path, image_shape=(32, 32, 1), graph_shape=(28, 28, 1))
    else:
        onnx_model(path, metadata={"input_width": "wide"})
    with pytest.raises(UserError) as info:
        OnnxEmbedder(str(path), "cpu")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_export_parity_verdict(tmp_path):
    from grafit_tf.serving.embedder import export_parity

    model = onnx_model(tmp_path / "embedder.onnx")
    assert export_parity(model) == "absent"
    report = tmp_path / "parity.json"
    report.write_text(json.dumps({"passed": True, "keras_vs_onnxruntime": 1e-7}))
    assert export_parity(model) == "passed"
    report.write_text(json.dumps({"passed": False, "keras_vs_onnxruntime": 0.3}))
    with pytest.raises(UserError, match="parity.json says passed=false.*--allow_failed_parity"):
        export_parity(model)
    assert export_parity(model, allow_failed=True) == "failed"
    report.write_text("{not json")
    with pytest.raises(UserError, match="parity.json cannot be read"):
        export_parity(model)
    os.remove(report)
    assert export_parity(model) == "absent"
