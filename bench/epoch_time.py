"""Seconds per Fashion-MNIST training epoch on this machine.

    python -m bench.epoch_time --runs=coarse_ce:1,grafit:2,grafit:3

(from the repository root, as a module: see bench/runs.py).

Each run is `train.py --flagfile=CONFIG --method=M --num_views=V --epochs=1`
(no evaluation during training) in its own process; the table gives `model.fit`'s
wall time for the one epoch (graph tracing included) and images/s, from
`metrics.json`. `coarse_ce:1` is the trunk alone: one view of each of the 60,000
images, cross-entropy, an optimizer step per batch. Run it with nothing else on
the cores: the figure is a timing.
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile

from absl import app, flags

from bench.runs import ROOT, publish

flags.DEFINE_string("config", "configs/fashion_mnist.cfg", "Flagfile of every run.")
flags.DEFINE_list("runs", ["coarse_ce:1", "grafit:2", "grafit:3"],
                "method:views pairs to time.")
flags.DEFINE_multi_string("override", [], "Extra train.py flag for every run.")
flags.DEFINE_bool("update_benchmarks", True, "Rewrite the epoch_time section of BENCHMARKS.md.")
FLAGS = flags.FLAGS


def time_one(method, views, workdir):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--flagfile={FLAGS.config}",
           f"--method={method}", f"--num_views={views}", "--epochs=1", "--eval_every=0",
           "--max_eval_examples=1000", "--verbose=2", f"--workdir={workdir}", *FLAGS.override]
    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(os.path.join(workdir, "metrics.json"), encoding="utf-8") as f:
        m = json.load(f)
    return {"method": method, "views": views, "train_examples": m["train_examples"],
            "epoch_seconds": m["train_seconds"],
            "images_per_second": m["train_images_per_second"]}


def main(argv):
    del argv
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(FLAGS.runs):
            method, views = spec.split(":")
            rows.append(time_one(method, int(views), os.path.join(tmp, str(i))))
    lines = ["| method | views per image | training images | epoch seconds | images/s |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['views']} | {r['train_examples']} | "
              f"{r['epoch_seconds']:.0f} | {r['images_per_second']:.0f} |" for r in rows]
    publish("epoch_time", rows, "\n".join(lines) + "\n\nImages/s counts dataset "
            "images (each seen `views` times per epoch).", FLAGS.update_benchmarks)


if __name__ == "__main__":
    app.run(main)
