"""grafit_tf.serving.job: checking the options, and reruns into the same output folder."""

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
