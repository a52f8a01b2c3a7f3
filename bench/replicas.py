"""Training throughput with 1 replica vs N logical-CPU replicas (MirroredStrategy).

    python -m bench.replicas --replicas=1,2

(from the repository root, as a module: see bench/runs.py).

Each setting runs `train.py` on the same subset and config in its own process
and reads `train_images_per_second` from `metrics.json`. On a CPU the logical
devices share the same cores: this measures the overhead of the distributed
path, not a speed-up.
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile

from absl import app, flags

from bench.runs import ROOT, publish

flags.DEFINE_list("replicas", ["1", "2"], "Replica counts to compare.")
flags.DEFINE_string("config", "configs/fashion_mnist.cfg", "Flagfile of the runs.")
flags.DEFINE_integer("examples", 10240, "Training images (one epoch).")
flags.DEFINE_multi_string("override", [], "Extra train.py flag for every run.")
flags.DEFINE_bool("update_benchmarks", True, "Rewrite the replicas section of BENCHMARKS.md.")
FLAGS = flags.FLAGS


def run(replicas, workdir):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--flagfile={FLAGS.config}",
           f"--workdir={workdir}", "--epochs=1", f"--max_train_examples={FLAGS.examples}",
           "--max_eval_examples=1000", "--eval_every=0", "--verbose=0",
           f"--distribute={'none' if replicas == 1 else 'mirrored'}",
           f"--cpu_replicas={replicas}", *FLAGS.override]
    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(os.path.join(workdir, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


def main(argv):
    del argv
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, FLAGS.replicas):
            m = run(n, os.path.join(tmp, f"r{n}"))
            rows.append({"replicas": n, "images_per_second": m["train_images_per_second"],
                         "train_seconds": m["train_seconds"], "num_replicas": m["num_replicas"]})
    base = rows[0]["images_per_second"]
    lines = ["| replicas | train images/s | ratio to first row | train seconds |",
             "|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['num_replicas']} | {r['images_per_second']:.0f} | "
                     f"{r['images_per_second'] / base:.2f} | {r['train_seconds']:.0f} |")
    publish("replicas", rows, "\n".join(lines) + "\n\nLogical CPU devices share the "
            "same 2 cores, so this shows the cost of the distributed path (all-gathers, "
            "per-replica batches, synchronised batch norm), not a speed-up.",
            FLAGS.update_benchmarks)


if __name__ == "__main__":
    app.run(main)
