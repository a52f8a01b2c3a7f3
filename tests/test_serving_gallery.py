"""grafit_tf.serving.gallery: a gallery saved to .npz and loaded serves the same predictions."""

import numpy as np
import pytest

from grafit_tf.data import png_folders
from grafit_tf.errors import UserError
from grafit_tf.serving import gallery as gallery_lib, job, open_set, shards


def test_gallery_save_and_load(tiny_export, fashion_pngs, tmp_path):
    saved = str(tmp_path / "gallery.npz")
    options = job.ServeOptions(model=tiny_export["onnx"], images=fashion_pngs["queries"],
                               output=str(tmp_path / "first"), gallery=fashion_pngs["gallery"],
                               save_gallery=saved, k=7, labels_from_dirs=True, workers=0,
                               progress=False)
    first = job.run(options, log=lambda *a: None)
    g = gallery_lib.load(saved)
    assert len(g) == 60 and g.dim == tiny_export["embedding_dim"]
    assert g.label_names == tuple(sorted(png_folders.FASHION_MNIST_CLASSES))
    with np.load(saved, allow_pickle=False) as data:
        assert data["embeddings"].dtype == np.float32 and data["labels"].dtype == np.int32
    second = job.run(options.__class__(**dict(options.__dict__, gallery=saved, save_gallery="",
                                              output=str(tmp_path / "second"))),
                     log=lambda *a: None)
    assert first["accuracy"] == second["accuracy"]
    assert 0.0 <= first["accuracy"]["accuracy"] <= 1.0
    assert first["accuracy"]["images"] == 30 and len(first["accuracy"]["per_class"]) == 10
    a = shards.read(str(tmp_path / "first")).predictions
    b = shards.read(str(tmp_path / "second")).predictions
    assert list(a) == list(b) and len(a["path"]) == 30
    for column in ("path", "label", "predicted"):
        assert a[column] == b[column]
    np.testing.assert_allclose(np.asarray(a["score"], float), np.asarray(b["score"], float),
                               atol=1e-5)


def _write(path, **changes):
    emb = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    values = dict(embeddings=emb, labels=np.asarray([0, 1, 0, 1], np.int32),
                  label_names=np.asarray(["x", "y"]),
                  paths=np.asarray(["x/0", "y/1", "x/2", "y/3"]),
                  model_sha256=np.asarray(""), format_version=np.asarray(1, np.int32))
    values.update(changes)
    with open(path, "wb") as f:
        np.savez(f, **values)
    return str(path)


def _nan_rows():
    emb = np.full((4, 8), 8 ** -0.5, np.float32)
    emb[1, 0] = np.nan
    return emb


@pytest.mark.parametrize("changes, message", [
    ({"format_version": np.asarray([1, 2])}, "'format_version' is int64 of shape [2]"),
    ({"format_version": np.asarray("1")}, "'format_version' is <U1"),
    ({"format_version": np.asarray(7, np.int32)}, "format version 7 is not one"),
    ({"model_sha256": np.asarray([1.0])}, "'model_sha256' is float64"),
    ({"embeddings": _nan_rows()}, "1 of its 4 embeddings are not finite"),
    ({"embeddings": np.ones((4, 8), np.float32)}, "are not of unit norm (row 0: 2.828)"),
    ({"embeddings": np.ones((4, 2, 4), np.float32)}, "not a non-empty float [G, D]"),
    ({"embeddings": np.ones((4, 8), np.int32)}, "not a non-empty float [G, D]"),
    ({"labels": np.zeros(3, np.int32)}, "inconsistent arrays"),
    ({"labels": np.zeros(4, np.float32)}, "inconsistent arrays"),
    ({"labels": np.asarray([0, 1, 2, 0], np.int32)}, "labels outside 0..1"),
    ({"label_names": np.asarray([1, 2])}, "inconsistent arrays"),
    ({"label_names": np.asarray(["x", "x"])}, "repeated label names"),
    ({"paths": np.asarray(["x/0"])}, "inconsistent arrays"),
])
def test_a_bad_gallery_npz_is_refused_in_one_line(changes, message, tmp_path):
    path = _write(tmp_path / "g.npz", **changes)
    with pytest.raises(UserError) as info:
        gallery_lib.load(path)
    text = str(info.value)
    assert text.startswith(f"--gallery={path}: ") and message in text, text
    assert "\n" not in text


def test_a_damaged_npz_is_refused_in_one_line(tmp_path):
    good = _write(tmp_path / "g.npz")
    data = open(good, "rb").read()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="cannot read it as a gallery .npz"):
        gallery_lib.load(str(tmp_path / "cut.npz"))
    assert len(gallery_lib.load(good)) == 4


def _gallery(calibration=None):
    emb = np.eye(3, 4, dtype=np.float32)
    return gallery_lib.Gallery(emb, np.asarray([0, 1, 1], np.int32), ("a", "b"),
                               ("a/0.png", "b/1.png", "b/2.png"), "abc", calibration)


@pytest.mark.parametrize("calibration", [
    None,
    open_set.Calibration(0.8125, 0.95, 0.96, 0.75, 20, 0.07, 3, "vote_share"),
    open_set.Calibration(float("inf"), 0.99, 0.5, 0.0, 7, 0.1, 3, "top1_similarity"),
])
def test_a_calibration_round_trips_with_its_gallery(calibration, tmp_path):
    path = str(tmp_path / "g.npz")
    gallery_lib.save(_gallery(calibration), path)
    g = gallery_lib.load(path)
    assert g.calibration == calibration and g.model_sha256 == "abc" and len(g) == 3
    with np.load(path, allow_pickle=False) as data:
        assert int(data["format_version"]) == gallery_lib.FORMAT_VERSION == 2
        assert any(k.startswith("calibration_") for k in data.files) == (calibration is not None)
    if calibration is not None:
        assert g.calibration.matches(calibration.target_precision, calibration.k,
                                     calibration.temperature, calibration.score)


def test_a_version_1_gallery_loads_without_a_calibration(tmp_path):
    g = gallery_lib.load(_write(tmp_path / "g.npz"))
    assert len(g) == 4 and g.calibration is None
    # Arrays of that name in a version-1 file are none of that format's: not read.
    g = gallery_lib.load(_write(tmp_path / "h.npz", calibration_k=np.asarray("x")))
    assert g.calibration is None


def _calibrated(**changes):
    values = {f"calibration_{name}": np.asarray(value) for name, value in dict(
        threshold=0.5, target_precision=0.95, precision=0.96, kept=0.7, k=20,
        temperature=0.07, queries=100, score="vote_share").items()}
    values.update(format_version=np.asarray(2, np.int32), **changes)
    return values


@pytest.mark.parametrize("changes, message", [
    ({"calibration_k": None}, "a partial calibration (missing calibration_k)"),
    ({"calibration_k": np.asarray(20.0)}, "'calibration_k' is float64 of shape []"),
    ({"calibration_threshold": np.asarray([0.5])}, "'calibration_threshold' is float64 of "
                                                    "shape [1]"),
    ({"calibration_score": np.asarray(1)}, "'calibration_score' is int64"),
    ({"calibration_threshold": np.asarray(np.nan)}, "calibration_threshold is nan, not a "
                                                     "number or +inf"),
    ({"calibration_threshold": np.asarray(-np.inf)}, "calibration_threshold is -inf"),
    ({"calibration_target_precision": np.asarray(0.0)}, "calibration_target_precision is 0.0, "
                                                         "not in (0, 1]"),
    ({"calibration_kept": np.asarray(1.5)}, "calibration_kept is 1.5, not in [0, 1]"),
    ({"calibration_k": np.asarray(0)}, "calibration_k is 0, not 1 or more"),
    ({"calibration_temperature": np.asarray(np.inf)}, "calibration_temperature is inf"),
    ({"calibration_score": np.asarray("cosine")}, "calibration_score is 'cosine', not one of"),
])
def test_a_bad_calibration_is_refused_in_one_line(changes, message, tmp_path):
    values = _calibrated(**changes)
    path = _write(tmp_path / "g.npz", **{k: v for k, v in values.items() if v is not None})
    with pytest.raises(UserError) as info:
        gallery_lib.load(path)
    text = str(info.value)
    assert text.startswith(f"--gallery={path}: ") and message in text, text
    assert "\n" not in text and "--save_gallery" in text
    assert gallery_lib.load(_write(tmp_path / "ok.npz", **_calibrated())).calibration.k == 20
