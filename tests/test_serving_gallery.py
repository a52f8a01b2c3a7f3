"""grafit_tf.serving.gallery: a gallery saved to .npz and loaded serves the same predictions."""

import numpy as np
import pytest

from grafit_tf.data import png_folders
from grafit_tf.errors import UserError
from grafit_tf.serving import gallery as gallery_lib, job
from tests.conftest import read_csv


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
    rows_a = read_csv(tmp_path / "first" / "predictions.csv")
    rows_b = read_csv(tmp_path / "second" / "predictions.csv")
    assert rows_a[0] == rows_b[0]
    for a, b in zip(rows_a[1], rows_b[1]):
        assert a[:3] == b[:3]  # path, label, predicted.
        np.testing.assert_allclose(float(a[3]), float(b[3]), atol=1e-5)


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
