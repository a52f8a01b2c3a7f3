"""serve.py, the entry point, end to end: bad input, errors before any work, exit status,
no TensorFlow.

The serving modules' own tests are tests/test_serving_<module>.py; the agreement of
serve's embeddings with the training pipeline's is in test_serving_agreement.py.
"""

import ctypes
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings

import numpy as np
import pytest
from PIL import Image

from grafit_tf.serving import gallery as gallery_lib, job, outputs
from tests.conftest import REPO, read_csv, served_csv, served_embeddings
from tests.image_files import png_bytes, png_header_only
from tests.test_serving_embedder import onnx_model

SERVE = os.path.join(REPO, "serve.py")


# --- helpers -----------------------------------------------------------------


def run_serve(*args, preexec_fn=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, SERVE, "--progress=false", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env,
                          preexec_fn=preexec_fn)


def synthetic(root, labels=("a", "b", "c"), per_label=4, queries=5):
    """A small embedder (no training), a labelled gallery folder and a query folder.

    Returns:
        dict: `model`, `gallery`, `queries` (paths, as str).
    """
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    model = onnx_model(os.path.join(root, "embedder.onnx"))
    for label in labels:
        os.makedirs(os.path.join(root, "gallery", label))
        for i in range(per_label):
            with open(os.path.join(root, "gallery", label, f"{i}.png"), "wb") as f:
                f.write(png_bytes(rng.integers(0, 256, (28, 28), np.uint8)))
    os.makedirs(os.path.join(root, "queries"))
    for i in range(queries):
        with open(os.path.join(root, "queries", f"{i}.png"), "wb") as f:
            f.write(png_bytes(rng.integers(0, 256, (28, 28), np.uint8)))
    return {"model": model, "gallery": os.path.join(root, "gallery"),
            "queries": os.path.join(root, "queries")}


def serve_options(**changes):
    return job.ServeOptions(**dict(dict(workers=0, progress=False, k=3), **changes))


def stderr_lines(result):
    return [l for l in result.stderr.splitlines() if l.strip()]


def saved_gallery(path, dim=16, rows=4, **changes):
    """Writes a gallery .npz (unit rows), with `changes` replacing any of its arrays."""
    emb = np.random.default_rng(1).normal(size=(rows, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    values = dict(embeddings=emb, labels=np.arange(rows, dtype=np.int32) % 2,
                  label_names=np.asarray(["x", "y"]),
                  paths=np.asarray([f"{'xy'[i % 2]}/{i}.png" for i in range(rows)]),
                  model_sha256=np.asarray(""), format_version=np.asarray(1, np.int32))
    values.update(changes)
    with open(path, "wb") as f:
        np.savez(f, **values)
    return str(path)


def default_sigint():
    """preexec_fn: Ctrl-C's default action, which a background job (`cmd &`) inherits as
    ignored: Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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

    _, index_rows = served_csv(out, "index.csv")
    _, error_rows = served_csv(out, "errors.csv")
    served = [r[0] for r in index_rows]
    failed = {r[0]: r[1] for r in error_rows}
    assert len(served) == len(set(served)) and len(failed) == len(error_rows)
    assert set(served) == index
    assert set(failed) == set(errors)
    for path, reason in errors.items():
        assert reason in failed[path], (path, failed[path])

    embeddings = served_embeddings(out)
    assert embeddings.shape == (len(served), tiny_export["embedding_dim"])
    assert embeddings.dtype == np.float32 and np.isfinite(embeddings).all()
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    row = {p: i for i, p in enumerate(served)}
    # The non-UTF-8 name was read, not just listed: same pixels, same embedding.
    np.testing.assert_allclose(embeddings[row["latin1_caf\\xe9.png"]],
                               embeddings[row["same_as_latin1.png"]], atol=1e-6)
    np.testing.assert_allclose(embeddings[row["alias.png"]], embeddings[row["good/00000.png"]],
                               atol=1e-6)

    header, predictions = served_csv(out, "predictions.csv")
    assert [r[0] for r in predictions] == served
    assert header[:4] == ["path", "predicted", "score", "neighbour_1"]
    assert len(header) == 3 + 3 * 5
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["embedded"] == len(served) and summary["errors"] == len(failed)
    assert summary["files"] == len(index) + len(errors)
    assert not [n for n in os.listdir(out) if n.startswith(".")], "temporary files left"


@pytest.mark.parametrize("case", ["missing_model", "invalid_model", "empty_dir",
                                  "dim_mismatch", "missing_images", "output_under_a_file",
                                  "save_gallery_a_folder"])
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
    elif case == "output_under_a_file":  # Unwritable: found before the work, not after it.
        (tmp_path / "file").write_text("x")
        extra, expected = [f"--output={tmp_path / 'file' / 'out'}"], "cannot write"
    elif case == "save_gallery_a_folder":
        (tmp_path / "folder").mkdir()
        extra = [f"--gallery={fashion_pngs['gallery']}", f"--save_gallery={tmp_path / 'folder'}"]
        expected = "is a directory"
    else:
        unit = np.ones((3, tiny_export["embedding_dim"] + 1), np.float32)
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        bad = gallery_lib.Gallery(unit,
                                  np.zeros(3, np.int32), ("a",), ("a/1", "a/2", "a/3"))
        gallery_lib.save(bad, str(tmp_path / "bad.npz"))
        extra, expected = [f"--gallery={tmp_path / 'bad.npz'}"], "dimension"
    out = tmp_path / "out"
    result = run_serve(f"--model={model}", f"--images={images}", f"--output={out}", *extra,
                       "--workers=0")
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
    _, rows = served_csv(tmp_path / "out", "errors.csv")
    assert [r[0] for r in rows] == ["notes.txt"]


def test_serving_never_imports_tensorflow(tiny_export, fashion_pngs, tmp_path):
    code = f"""
import sys
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
    # From the repository root, like every serve.py run: `import serve` finds the script.
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout


# --- bad input: one line, exit status 2, nothing touched ---------------------


def _bad_input(case, tmp_path):
    """`(extra flags, expected part of the error line)` for one kind of bad input."""
    s = synthetic(str(tmp_path / "data"))
    base = [f"--model={s['model']}", f"--images={s['queries']}", f"--gallery={s['gallery']}"]
    model_dir = os.path.dirname(s["model"])
    if case == "flag_not_an_int":
        return base + ["--k=abc"], "flag --k=abc"
    if case == "flag_missing":
        return [f"--images={s['queries']}"], "--model"
    if case == "flag_unknown_value":
        return base + ["--index=fastest"], "--index"
    if case == "threads_negative":
        return base + ["--intra_op_threads=-1"], "--intra_op_threads=-1"
    if case.startswith("temperature_"):
        value = case.split("_", 1)[1].replace("negative", "-1")
        return base + [f"--temperature={value}"], f"--temperature={float(value)}"
    if case.startswith("model_temperature_"):
        value = {"zero": 0, "negative": -0.5, "nan": float("nan"), "text": "cold"}[
            case.rsplit("_", 1)[1]]
        onnx_model(s["model"], config={"eval_temperature": value})
        return base, f"eval_temperature={value!r}, not a finite number > 0"
    if case == "parity_failed":
        with open(os.path.join(model_dir, "parity.json"), "w", encoding="utf-8") as f:
            json.dump({"passed": False, "keras_vs_onnxruntime": 0.2, "tolerance": 1e-4}, f)
        return base, f"{os.path.join(model_dir, 'parity.json')} says passed=false"
    if case == "model_nan":
        onnx_model(s["model"], output="nan")
        return base, "its output is not a finite unit-norm [N, D]"
    if case == "model_metadata_vs_graph":
        onnx_model(s["model"], image_shape=(32, 32, 1), graph_shape=(28, 28, 1))
        return base, "its metadata says input 32x32x1 (HxWxC) but its graph input is"
    gallery = str(tmp_path / "gallery.npz")
    base[2] = f"--gallery={gallery}"
    if case == "gallery_format_version_list":
        saved_gallery(gallery, format_version=np.asarray([1, 2]))
        return base, "'format_version' is int64 of shape [2], not an integer scalar"
    if case == "gallery_nan":
        emb = np.full((4, 16), 0.25, np.float32)
        emb[2, 3] = np.nan
        saved_gallery(gallery, embeddings=emb)
        return base, f"--gallery={gallery}: 1 of its 4 embeddings are not finite"
    if case == "gallery_not_unit":
        saved_gallery(gallery, embeddings=np.ones((4, 16), np.float32))
        return base, "not of unit norm"
    if case == "gallery_label_count":
        saved_gallery(gallery, labels=np.zeros(3, np.int32))
        return base, "inconsistent arrays"
    assert case == "gallery_dim", case
    saved_gallery(gallery, dim=8)
    return base, "dimension 8"


BAD_INPUTS = ["flag_not_an_int", "flag_missing", "flag_unknown_value", "threads_negative",
              "temperature_nan",
              "temperature_inf", "temperature_negative", "model_temperature_zero",
              "model_temperature_negative", "model_temperature_nan", "model_temperature_text",
              "parity_failed", "model_nan", "model_metadata_vs_graph",
              "gallery_format_version_list", "gallery_nan", "gallery_not_unit",
              "gallery_label_count", "gallery_dim"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_line_and_exit_2(case, tmp_path):
    args, expected = _bad_input(case, tmp_path)
    out = tmp_path / "out"
    result = run_serve(*args, f"--output={out}")
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert expected in lines[0], lines[0]
    assert not out.exists(), "work started before the error"


def test_a_failed_parity_check_can_be_overridden(tmp_path):
    s = synthetic(str(tmp_path / "data"))
    with open(os.path.join(os.path.dirname(s["model"]), "parity.json"), "w") as f:
        json.dump({"passed": False}, f)
    out = tmp_path / "out"
    result = run_serve(f"--model={s['model']}", f"--images={s['queries']}", f"--output={out}",
                       "--allow_failed_parity")
    assert result.returncode == 0, result.stderr
    assert "failed the parity check" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["export_parity"] == "failed" and summary["embedded"] == 5


def test_non_finite_scores_are_refused_not_written(tmp_path):
    s = synthetic(str(tmp_path / "data"))
    out = tmp_path / "out"
    args = [f"--model={s['model']}", f"--images={s['queries']}", f"--output={out}",
            f"--gallery={s['gallery']}", "--k=3", "--progress=false", "--workers=0",
            "--shard_size=2"]
    # The vote itself broken (no valid setting reaches NaN any more): serve.py must refuse.
    code = f"""
import numpy as np
from absl import app
import serve
from grafit_tf import knn
knn.weighted_vote = lambda s, l, n, t: (np.zeros(len(s), np.int64),
                                        np.full((len(s), n), np.nan, np.float32))
app.run(serve.main, argv=["serve.py"] + {args!r}, flags_parser=serve.flags_parser("serve.py"))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = stderr_lines(result)
    assert len(lines) == 1 and "non-finite scores" in lines[0], result.stderr
    assert sorted(os.listdir(out)) == ["manifest.json"], "a shard or summary was published"
    assert run_serve(*args).returncode == 0  # The same command, once the vote works.
    assert len(served_csv(out, "predictions.csv")[1]) == 5


# --- killing serve.py --------------------------------------------------------


def _marked_processes(marker):
    """`{pid: status}` of the live processes whose environment holds `marker`."""
    found = {}
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        for p in psutil.process_iter():
            try:
                if p.environ().get("GRAFIT_SERVE_TEST") == marker \
                        and p.status() != psutil.STATUS_ZOMBIE:
                    found[p.pid] = " ".join(p.cmdline())
            except (psutil.Error, OSError):
                continue
        return found
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"GRAFIT_SERVE_TEST={marker}".encode() in env and state != b"Z":
            found[int(pid)] = cmdline
    return found


def _wait_for(condition, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    return condition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT],
                         ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_killing_serve_leaves_no_process_behind(sig, tmp_path):
    s = synthetic(str(tmp_path / "data"))
    images = tmp_path / "many"
    images.mkdir()
    y, x = np.mgrid[0:1200, 0:1200]
    (images / "0000.png").write_bytes(png_bytes(((x * y) % 251).astype(np.uint8)))
    for i in range(1, 2000):  # Hard links: 2000 slow-to-decode files, one on disk.
        os.link(images / "0000.png", images / f"{i:04d}.png")
    out = tmp_path / "out"
    marker = uuid.uuid4().hex
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", GRAFIT_SERVE_TEST=marker)
    proc = subprocess.Popen([sys.executable, SERVE, "--progress=false", f"--model={s['model']}",
                             f"--images={images}", f"--output={out}", "--workers=2",
                             "--batch_size=16"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        def both_workers():
            found = [c for c in _marked_processes(marker).values() if "spawn_main" in c]
            return found if len(found) >= 2 else None

        workers = _wait_for(both_workers, 60)
        assert workers, (_marked_processes(marker), proc.poll())
        time.sleep(0.5)
        assert proc.poll() is None, "serve.py finished before it could be killed"
        os.kill(proc.pid, sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    left = _wait_for(lambda: not _marked_processes(marker), 10)
    assert left, f"still alive after {sig!r}: {_marked_processes(marker)}"
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        # A killed run leaves its staging folder; the next run into the folder removes it.
        assert [n for n in os.listdir(out) if n.startswith(outputs.STAGING_PREFIX)]
    else:
        expected = (143, "terminated (SIGTERM)") if sig == signal.SIGTERM else (130, "interrupted")
        assert proc.returncode == expected[0], stderr
        lines = [l for l in stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith(expected[1]), stderr
        assert not [n for n in os.listdir(out) if n.startswith(".")], "temporaries left"
    assert "summary.json" not in os.listdir(out), "an unfinished run marked finished"


# --- file names and CSV cells ------------------------------------------------


def test_undecodable_and_backslash_names_are_told_apart(tmp_path):
    s = synthetic(str(tmp_path / "data"))
    images = os.fsencode(str(tmp_path / "names"))
    os.makedirs(images)
    data = png_bytes(np.full((28, 28), 90, np.uint8))
    for name in (b"a\\xe9.png", b"a\xe9.png", b"b\\c.png"):  # Literal backslash, byte 0xE9.
        with open(os.path.join(images, name), "wb") as f:
            f.write(data)
    out = tmp_path / "out"
    job.run(serve_options(model=s["model"], images=os.fsdecode(images), output=str(out)),
            log=lambda *a: None)
    _, rows = served_csv(out, "index.csv")
    assert [r[0] for r in rows] == ["a\\\\xe9.png", "a\\xe9.png", "b\\\\c.png"]


FORMULA = ("=", "+", "-", "@", "\t", "\r")


def test_csv_cells_never_start_a_formula(tmp_path):
    s = synthetic(str(tmp_path / "data"), labels=("=cmd", "+plus", "-minus", "@at", "'quote"))
    (tmp_path / "data" / "gallery" / "=cmd" / "=oops.txt").write_text("not an image")
    images = tmp_path / "queries"
    shutil.copytree(s["queries"], images)
    for src, dst in (("0.png", "=1+1.png"), ("1.png", "-2.png"), ("2.png", "@SUM(A1).png")):
        os.rename(images / src, images / dst)
    (images / "+bad.txt").write_text("not an image")
    out = tmp_path / "out"
    job.run(serve_options(model=s["model"], images=str(images), output=str(out),
                          gallery=s["gallery"], k=20), log=lambda *a: None)
    texts = []
    for name in ("index.csv", "errors.csv", "predictions.csv", "gallery_errors.csv"):
        header, rows = (read_csv(out / name) if name == "gallery_errors.csv"
                        else served_csv(out, name))
        numeric = [h in ("score", "size", "mtime") or h.startswith("similarity_")
                   for h in header]
        for row in rows:
            for cell, is_number in zip(row, numeric):
                if is_number:
                    float(cell)  # A number, written as one (negative ones included).
                    continue
                assert not cell.startswith(FORMULA), (name, cell)
                texts.append(outputs.read_cell(cell))
    assert {"=1+1.png", "-2.png", "@SUM(A1).png", "+bad.txt", "=cmd/=oops.txt", "'quote",
            "=cmd", "+plus", "-minus", "@at", "'quote/0.png"} <= set(texts)
