"""grafit_tf.serving.job: checking the options, and reruns into the same output folder."""

import dataclasses
import os

import numpy as np
import pytest

from grafit_tf.errors import UserError
from grafit_tf.serving import job


def test_user_error_on_bad_flags(tiny_export, fashion_pngs, tmp_path):
    base = dict(model=tiny_export["onnx"], images=fashion_pngs["queries"],
                output=str(tmp_path / "out"), progress=False)
    for changes, message in (({"k": 0}, "--k"), ({"labels_from_dirs": True}, "needs --gallery"),
                             ({"providers": "nonexistent"}, "not available"),
                             ({"save_gallery": "x.npz"}, "--save_gallery")):
        with pytest.raises(UserError, match=message):
            job.run(job.ServeOptions(**base, **changes), log=lambda *a: None)


def test_a_rerun_skips_its_own_folder_and_finished_shards(tiny_export, fashion_pngs, tmp_path):
    import shutil

    images = tmp_path / "queries"
    shutil.copytree(fashion_pngs["queries"], images)
    out = images / "results"  # Inside the query folder: never served itself.
    options = job.ServeOptions(model=tiny_export["onnx"], images=str(images), output=str(out),
                               workers=0, progress=False, gallery=fashion_pngs["gallery"],
                               shard_size=8)
    first = job.run(options, log=lambda *a: None)
    assert first["embedded"] == 30 and first["shards"] == 4 and first["served_now"] == 30
    second = job.run(options, log=lambda *a: None)
    assert second["embedded"] == 30 and second["errors"] == 0 and second["served_now"] == 0
    assert second["gallery"] == first["gallery"]


def test_thread_split_leaves_small_machines_to_onnxruntime(tiny_export, fashion_pngs, tmp_path,
                                                           monkeypatch):
    # (workers, cpus) -> (workers, intra-op threads); 0 threads: onnxruntime's default.
    for args, want in (((None, 1), (0, 0)), ((None, 2), (0, 0)), ((None, 3), (0, 0)),
                       ((None, 4), (1, 3)), ((None, 16), (4, 12)), ((2, 2), (2, 1)),
                       ((0, 16), (0, 0)), ((3, 8), (3, 5))):
        assert job.thread_split(*args) == want, args
    monkeypatch.setattr(job.os, "cpu_count", lambda: 2)
    summary = job.run(job.ServeOptions(model=tiny_export["onnx"], images=fashion_pngs["queries"],
                                       output=str(tmp_path / "out"), progress=False),
                      log=lambda *a: None)
    assert summary["workers"] == 0 and summary["embedded"] == 30


def test_the_index_and_the_open_set_threshold_are_kept_with_the_gallery(
        tiny_export, fashion_pngs, tmp_path):
    import shutil

    from grafit_tf.serving import gallery as gallery_lib, shards

    gallery = tmp_path / "gallery"  # Two classes left out: their queries have no label.
    shutil.copytree(fashion_pngs["gallery"], gallery,
                    ignore=lambda d, names: [n for n in names if n in ("bag", "trouser")])
    npz = tmp_path / "g.npz"
    lines = []
    options = job.ServeOptions(model=tiny_export["onnx"], images=fashion_pngs["queries"],
                               output=str(tmp_path / "first"), gallery=str(gallery),
                               save_gallery=str(npz), index="hnsw", unknown_precision=0.5, k=3,
                               workers=0, progress=False, labels_from_dirs=True)
    first = job.run(options, log=lines.append)
    cal = first["calibration"]
    assert first["index"]["kind"] == "hnsw" and (tmp_path / "g.index.npz").exists()
    assert cal["target_precision"] == 0.5 and cal["k"] == first["k"]
    results = shards.read(str(tmp_path / "first"))
    predicted = results.predictions["predicted"]
    assert set(predicted) <= set(first["gallery"]["labels"]) | {"unknown"}
    # The rule, row by row: unknown exactly when the top-1 similarity is below the threshold.
    top1 = np.array(results.predictions["similarity_1"], float)
    threshold = cal["threshold"] if cal["threshold"] is not None else np.inf
    np.testing.assert_array_equal(np.array(predicted) == "unknown", top1 < threshold - 1e-6)
    assert first["unknown"] == predicted.count("unknown")
    assert 0 < first["unknown"] < len(predicted), (cal, top1)
    assert gallery_lib.load(str(npz)).calibration.threshold == pytest.approx(
        cal["threshold"] if cal["threshold"] is not None else np.inf)
    assert any(l.startswith("open set:") for l in lines)

    lines.clear()  # The saved gallery: its index and threshold are reused.
    second = job.run(job.ServeOptions(
        model=tiny_export["onnx"], images=fashion_pngs["queries"], output=str(tmp_path / "b"),
        gallery=str(npz), index="hnsw", unknown_precision=0.5, k=3, workers=0, progress=False,
        labels_from_dirs=True), log=lines.append)
    assert any(l.startswith("index: reusing") for l in lines), lines
    assert not any(l.startswith("open set:") for l in lines), "calibrated again"
    assert second["calibration"] == cal
    assert shards.read(str(tmp_path / "b")).predictions["predicted"] == predicted


def test_a_gallery_label_named_unknown_is_refused_with_the_open_set(tiny_export, fashion_pngs,
                                                                    tmp_path):
    import shutil

    gallery = tmp_path / "gallery"
    shutil.copytree(fashion_pngs["gallery"], gallery)
    os.rename(gallery / "bag", gallery / "unknown")
    options = job.ServeOptions(model=tiny_export["onnx"], images=fashion_pngs["queries"],
                               output=str(tmp_path / "out"), gallery=str(gallery),
                               unknown_precision=0.5, progress=False)
    with pytest.raises(UserError, match="label named 'unknown'"):
        job.run(options, log=lambda *a: None)
    assert not (tmp_path / "out").exists()
    for changes, message in (({"index": "annoy"}, "--index"), ({"index_memory": "lots"},
                             "--index_memory"), ({"unknown_precision": 1.5}, "precision"),
                             ({"shard_size": 0}, "--shard_size"), ({"engine": "spark"}, "--engine")):
        with pytest.raises(UserError, match=message):
            job.run(dataclasses.replace(options, **changes), log=lambda *a: None)


def test_a_gallery_folder_that_cannot_be_embedded_writes_nothing(tiny_export, fashion_pngs,
                                                                 tmp_path):
    gallery = tmp_path / "gallery" / "a"
    gallery.mkdir(parents=True)
    (gallery / "x.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="none of its 1 files could be embedded"):
        job.run(job.ServeOptions(model=tiny_export["onnx"], images=fashion_pngs["queries"],
                                 output=str(out), gallery=str(gallery.parent), progress=False),
                log=lambda *a: None)
    assert os.listdir(out) == [], "an exit-2 error wrote into the output folder"
