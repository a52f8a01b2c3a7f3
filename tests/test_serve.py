"""serve.py end to end: bad input, galleries, errors before work, no TensorFlow.

The agreement of serve's embeddings with the training pipeline's is in
test_serving_agreement.py.
"""

import csv
import ctypes
import io
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from grafit_tf.data import png_folders
from grafit_tf.errors import UserError
from grafit_tf.serving import classify, embed, gallery as gallery_lib, job, pool as pool_lib
from tests.image_files import png_bytes, png_header_only

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = os.path.join(REPO, "serve.py")


# --- helpers -----------------------------------------------------------------


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def run_serve(*args, preexec_fn=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, SERVE, "--progress=false", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env,
                          preexec_fn=preexec_fn)


def error_lines(result):
    return [l for l in result.stderr.splitlines() if l.startswith("error:")]


def _drop_file_read_override():
    """preexec_fn: drops CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH from the bounding set.

    Root reads any file whatever its mode; without these two capabilities it
    is refused like any user, so a chmod-000 file is really unreadable.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def unreadable_support():
    """`(possible, preexec_fn)` for making chmod-000 files unreadable to serve.py."""
    if os.geteuid() != 0:
        return True, None
    try:
        subprocess.run(["true"], preexec_fn=_drop_file_read_override, check=True)
        return True, _drop_file_read_override
    except (OSError, subprocess.SubprocessError):
        return False, None


@pytest.fixture(scope="session")
def fashion_pngs(fashion_dir, tmp_path_factory):
    """Real Fashion-MNIST PNG folders.

    A gallery (train, 6 per class), queries (test, 3 per class) and the first
    test images as arrays.
    """
    root = tmp_path_factory.mktemp("fashion_png")
    train_x, train_y = png_folders.read_fashion_mnist(fashion_dir, "train")
    test_x, test_y = png_folders.read_fashion_mnist(fashion_dir, "test")
    png_folders.write_png_folders(train_x, train_y, str(root / "gallery"),
                                  indices=png_folders.select(train_y, 6))
    png_folders.write_png_folders(test_x, test_y, str(root / "queries"),
                                  indices=png_folders.select(test_y, 3))
    return {"gallery": str(root / "gallery"), "queries": str(root / "queries"),
            "test_images": test_x[:40]}


def _huge_png():
    y, x = np.mgrid[0:2500, 0:3000]
    return png_bytes(((x + y) % 256).astype(np.uint8))


def build_messy_tree(root, good_images, unreadable):
    """A query folder mixing good images with every kind of bad input.

    Returns:
        `(expected_index: set of paths, expected_errors: {path: reason part})`.
    """
    index, errors = set(), {}
    rng = np.random.default_rng(0)

    def put(rel, data):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def good(rel, data):
        put(rel, data)
        index.add(rel)

    def bad(rel, data, reason):
        put(rel, data)
        errors[rel] = reason

    for i, pixels in enumerate(good_images[:4]):
        good(f"good/{i:05d}.png", png_bytes(pixels))
    good("nested/deeper/still_good.png", png_bytes(good_images[4]))
    good("unicode/日本語の画像.png", png_bytes(good_images[5]))
    good("unicode/naïve café.png", png_bytes(good_images[6]))
    good("unicode/comma, quote\" and\nnewline.png", png_bytes(good_images[7]))
    # A name that is not UTF-8 (Latin-1 e-acute): its bytes are shown escaped.
    with open(os.path.join(os.fsencode(root), b"latin1_caf\xe9.png"), "wb") as f:
        f.write(png_bytes(good_images[8]))
    index.add("latin1_caf\\xe9.png")
    good("same_as_latin1.png", png_bytes(good_images[8]))

    photo = np.repeat(good_images[9][..., None], 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=95)
    good("formats/photo.jpg", buffer.getvalue())
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate([photo, 255 - photo[..., :1]], -1), "CMYK").save(buffer, "JPEG")
    good("formats/cmyk.jpg", buffer.getvalue())
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate([photo, photo[..., :1]], -1), "RGBA").save(buffer, "PNG")
    good("formats/rgba.png", buffer.getvalue())
    buffer = io.BytesIO()
    Image.fromarray(photo).convert("P").save(buffer, "PNG", transparency=0)
    good("formats/palette.png", buffer.getvalue())
    buffer = io.BytesIO()
    Image.fromarray(good_images[10].astype(np.uint16) * 257).save(buffer, "PNG")
    good("formats/gray16.png", buffer.getvalue())
    exif = Image.Exif()
    exif[0x0112] = 6  # Rotate 90 degrees clockwise to display.
    buffer = io.BytesIO()
    Image.fromarray(np.rot90(good_images[11]).copy()).save(buffer, "JPEG", exif=exif)
    good("formats/exif_rotated.jpg", buffer.getvalue())
    good("formats/huge.png", _huge_png())

    valid = png_bytes(rng.integers(0, 256, (28, 28), np.uint8))
    corrupt = bytearray(valid)
    corrupt[60:90] = bytes(30)  # Inside the IDAT stream: zlib / CRC errors.
    bad("bad/corrupt.png", bytes(corrupt), "corrupt")
    bad("bad/truncated.png", valid[: len(valid) // 2], "truncated")
    bad("bad/zero_bytes.png", b"", "empty file")
    bad("bad/notes.txt", b"not an image\n", "not an image")
    bad("bad/random.jpg", rng.integers(0, 256, 4096, np.uint8).tobytes(), "not an image")
    bad("bad/bomb.png", png_header_only(40000, 40000), "decompression bomb")
    os.symlink(".", os.path.join(root, "bad", "loop_to_parent"))
    errors["bad/loop_to_parent"] = "symlink loop"
    os.symlink("self.png", os.path.join(root, "bad", "self.png"))
    errors["bad/self.png"] = "symlink loop"
    os.symlink("missing_target.png", os.path.join(root, "bad", "dangling.png"))
    errors["bad/dangling.png"] = "broken symlink"
    os.symlink(os.path.join(root, "good", "00000.png"), os.path.join(root, "alias.png"))
    index.add("alias.png")  # A symlink to a good file serves that file.
    os.mkfifo(os.path.join(root, "bad", "a_fifo"))
    errors["bad/a_fifo"] = "fifo"
    if unreadable:
        bad("bad/unreadable.png", valid, "permission denied")
        os.chmod(os.path.join(root, "bad", "unreadable.png"), 0)
        put("locked/inside.png", valid)
        os.chmod(os.path.join(root, "locked"), 0)
        errors["locked"] = "unreadable directory"
    return index, errors


# --- tests -------------------------------------------------------------------


def test_every_file_is_accounted_for_once(tiny_export, fashion_pngs, tmp_path):
    possible, preexec = unreadable_support()
    if not possible:
        warnings.warn("cannot make a file unreadable here (root without CAP_SETPCAP): the "
                      "unreadable-file case is left out of this run")
    root = str(tmp_path / "messy")
    index, errors = build_messy_tree(root, fashion_pngs["test_images"], possible)
    out = tmp_path / "out"
    try:
        result = run_serve(f"--model={tiny_export['onnx']}", f"--images={root}",
                           f"--output={out}", f"--gallery={fashion_pngs['gallery']}",
                           "--k=5", "--workers=2", "--batch_size=8", preexec_fn=preexec)
    finally:
        for path in ("locked", "bad/unreadable.png"):
            if os.path.exists(os.path.join(root, path)):
                os.chmod(os.path.join(root, path), 0o755)
    assert result.returncode == 0, result.stderr

    _, index_rows = read_csv(out / "index.csv")
    _, error_rows = read_csv(out / "errors.csv")
    served = [r[0] for r in index_rows]
    failed = {r[0]: r[1] for r in error_rows}
    assert len(served) == len(set(served)) and len(failed) == len(error_rows)
    assert set(served) == index
    assert set(failed) == set(errors)
    for path, reason in errors.items():
        assert reason in failed[path], (path, failed[path])

    embeddings = np.load(out / "embeddings.npy")
    assert embeddings.shape == (len(served), tiny_export["embedding_dim"])
    assert embeddings.dtype == np.float32 and np.isfinite(embeddings).all()
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    row = {p: i for i, p in enumerate(served)}
    # The non-UTF-8 name was read, not just listed: same pixels, same embedding.
    np.testing.assert_allclose(embeddings[row["latin1_caf\\xe9.png"]],
                               embeddings[row["same_as_latin1.png"]], atol=1e-6)
    np.testing.assert_allclose(embeddings[row["alias.png"]], embeddings[row["good/00000.png"]],
                               atol=1e-6)

    header, predictions = read_csv(out / "predictions.csv")
    assert [r[0] for r in predictions] == served
    assert header[:4] == ["path", "predicted", "score", "neighbour_1"]
    assert len(header) == 3 + 3 * 5
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["embedded"] == len(served) and summary["errors"] == len(failed)
    assert summary["files"] == len(index) + len(errors)
    assert not [n for n in os.listdir(out) if n.startswith(".")], "temporary files left"


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


def test_knn_backends_agree():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(3000, 32)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = rng.normal(size=(200, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sims_np, idx_np = classify.search(queries, gallery, 20, backend="numpy")
    sims_fa, idx_fa = classify.search(queries, gallery, 20, backend="faiss")
    np.testing.assert_array_equal(idx_np, idx_fa)
    np.testing.assert_allclose(sims_np, sims_fa, atol=1e-5)
    g = gallery_lib.Gallery(gallery, rng.integers(0, 7, 3000).astype(np.int32),
                            tuple(f"c{i}" for i in range(7)), tuple(map(str, range(3000))))
    a = classify.predict(queries, g, 20, 0.07, backend="numpy")
    b = classify.predict(queries, g, 20, 0.07, backend="faiss")
    np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("case", ["missing_model", "invalid_model", "empty_dir",
                                  "dim_mismatch", "missing_images"])
def test_clear_error_before_any_work(case, tiny_export, fashion_pngs, tmp_path):
    model, images, extra = tiny_export["onnx"], fashion_pngs["queries"], []
    if case == "missing_model":
        model, expected = str(tmp_path / "nope.onnx"), "no such file"
    elif case == "invalid_model":
        model = str(tmp_path / "garbage.onnx")
        with open(model, "wb") as f:
            f.write(b"this is not a protobuf" * 10)
        expected = "not a valid ONNX model"
    elif case == "empty_dir":
        images = str(tmp_path / "empty")
        os.makedirs(images)
        expected = "empty"
    elif case == "missing_images":
        images, expected = str(tmp_path / "absent"), "no such directory"
    else:
        bad = gallery_lib.Gallery(np.ones((3, tiny_export["embedding_dim"] + 1), np.float32),
                                  np.zeros(3, np.int32), ("a",), ("a/1", "a/2", "a/3"))
        gallery_lib.save(bad, str(tmp_path / "bad.npz"))
        extra, expected = [f"--gallery={tmp_path / 'bad.npz'}"], "dimension"
    out = tmp_path / "out"
    result = run_serve(f"--model={model}", f"--images={images}", f"--output={out}", *extra)
    assert result.returncode == 2, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists(), "work started before the error"


def test_all_bad_exits_non_zero(tiny_export, tmp_path):
    images = tmp_path / "bad_only"
    images.mkdir()
    (images / "notes.txt").write_text("hello")
    result = run_serve(f"--model={tiny_export['onnx']}", f"--images={images}",
                       f"--output={tmp_path / 'out'}", "--workers=0")
    assert result.returncode == 1
    assert len(error_lines(result)) == 1
    _, rows = read_csv(tmp_path / "out" / "errors.csv")
    assert [r[0] for r in rows] == ["notes.txt"]


def test_serving_never_imports_tensorflow(tiny_export, fashion_pngs, tmp_path):
    code = f"""
import sys
sys.path.insert(0, {REPO!r})
import serve
import grafit_tf.serving
from grafit_tf.serving import (classify, embed, embedder, gallery, images, job, outputs,
                               pool, report, resize, walk)
from grafit_tf.data import png_folders
summary = job.run(job.ServeOptions(model={tiny_export['onnx']!r},
                                   images={fashion_pngs['queries']!r},
                                   output={str(tmp_path / 'out')!r},
                                   gallery={fashion_pngs['gallery']!r}, labels_from_dirs=True,
                                   workers=1, progress=False), log=lambda *a: None)
assert summary["embedded"] == 30, summary
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx"))
print("HEAVY", heavy)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout


class _MeanEmbedder:
    """A stand-in model: the mean pixel as a 1-d embedding."""

    image_shape, resize, dim = (28, 28, 1), "none", 1

    def __call__(self, images):
        return images.reshape(len(images), -1).mean(axis=1, keepdims=True).astype(np.float32)


def crash_on_marked_file(paths, spec, start=0):
    """A decoding task that kills its worker process on files named 'crash*'."""
    if any(os.path.basename(p).startswith("crash") for p in paths):
        os._exit(3)
    return pool_lib.decode_chunk(paths, spec, start)


def test_a_crashing_decoder_loses_only_its_file(tmp_path):
    paths = []
    for i in range(40):
        name = "crash.png" if i == 17 else f"{i:02d}.png"
        path = tmp_path / name
        path.write_bytes(png_bytes(np.full((28, 28), i, np.uint8)))
        paths.append(str(path))
    result = embed.embed_files(_MeanEmbedder(), paths, batch_size=8, workers=2,
                               decode=crash_on_marked_file)
    assert result.errors == [(17, "decoder crashed (its worker process died)")]
    assert result.ok == [i for i in range(40) if i != 17]
    np.testing.assert_allclose(result.embeddings[:, 0], [i for i in range(40) if i != 17])


def test_user_error_on_bad_flags(tiny_export, fashion_pngs, tmp_path):
    base = dict(model=tiny_export["onnx"], images=fashion_pngs["queries"],
                output=str(tmp_path / "out"), progress=False)
    for changes, message in (({"k": 0}, "--k"), ({"labels_from_dirs": True}, "needs --gallery"),
                             ({"providers": "nonexistent"}, "not available"),
                             ({"save_gallery": "x.npz"}, "--save_gallery")):
        with pytest.raises(UserError, match=message):
            job.run(job.ServeOptions(**base, **changes), log=lambda *a: None)


def test_providers_resolve():
    from grafit_tf.serving.embedder import resolve_providers

    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers("")[-1] == "CPUExecutionProvider"


def test_rerun_replaces_outputs_and_skips_its_own_folder(tiny_export, fashion_pngs, tmp_path):
    import shutil

    images = tmp_path / "queries"
    shutil.copytree(fashion_pngs["queries"], images)
    out = images / "results"  # Inside the query folder: never served itself.
    base = dict(model=tiny_export["onnx"], images=str(images), output=str(out), workers=0,
                progress=False)
    first = job.run(job.ServeOptions(**base, gallery=fashion_pngs["gallery"]),
                    log=lambda *a: None)
    assert (out / "predictions.csv").exists() and first["embedded"] == 30
    second = job.run(job.ServeOptions(**base), log=lambda *a: None)
    assert second["embedded"] == 30 and second["errors"] == 0
    assert not (out / "predictions.csv").exists(), "stale predictions of the earlier run"
    assert not (out / "gallery_errors.csv").exists()
