"""The whole path through the command lines, on real Fashion-MNIST images:
train a few steps, export to ONNX, write PNG folders, serve with a gallery."""

import json
import subprocess
import sys

from grafit_tf.serving import shards
from tests.conftest import REPO


def cli(*args, timeout=400):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (args[0], proc.stderr[-3000:])
    return proc


def test_train_export_serve(tmp_path, fashion_dir):
    w = tmp_path / "run"
    cli("train.py", "--flagfile=configs/fashion_mnist.cfg", f"--data_dir={fashion_dir}",
        f"--workdir={w}", "--epochs=1", "--max_train_examples=1024", "--max_eval_examples=500",
        "--batch_size=128", "--width=8", "--eval_every=0", "--verbose=0")
    metrics = json.loads((w / "metrics.json").read_text())
    cli("export/export_onnx.py", f"--workdir={w}", f"--data_dir={fashion_dir}")
    parity = json.loads((w / "export" / "parity.json").read_text())
    assert parity["keras_vs_onnxruntime"] <= 1e-4 and parity["keras_vs_saved_model"] <= 1e-4
    for split, per_class, out in (("train", 30, "gallery"), ("test", 20, "queries")):
        cli("export/fashion_mnist_png.py", f"--data_dir={fashion_dir}", f"--split={split}",
            f"--max_per_class={per_class}", f"--output={tmp_path / out}")
    out = tmp_path / "served"
    cli("serve.py", f"--model={w / 'export' / 'embedder.onnx'}", f"--images={tmp_path / 'queries'}",
        f"--output={out}", f"--gallery={tmp_path / 'gallery'}", "--labels_from_dirs",
        "--progress=false", "--workers=1")
    results = shards.read(out)
    assert len(results.predictions["path"]) == 200
    summary = json.loads((out / "summary.json").read_text())
    accuracy = summary["accuracy"]["accuracy"]
    assert summary["accuracy"]["images"] == 200
    # A trained embedder, a 300-image gallery: far above the 10% of chance, in
    # the neighbourhood of training's own kNN evaluation.
    assert accuracy > 0.4, summary
    assert metrics["fine_knn_top1"] > 0.4
    assert not results.errors.get("path")  # Every PNG was embedded.
