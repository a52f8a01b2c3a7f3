"""Seconds the training input pipeline alone takes to produce batches.

    python bench/pipeline_time.py --batches=100 [--override=--num_views=3]

Builds `train.py`'s training dataset for the config (reading, crop, flip, jitter,
every view of every image; no model) and times `--batches` batches after the
first, which pays for the pipeline's start. Set beside `model.fit`'s time for as
many steps, it says whether the 2 cores wait for the model or for the data.
Prints the figure; writes nothing.
"""

import os
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.runs import resolved_config  # noqa: E402

flags.DEFINE_string("config", "configs/fashion_mnist.cfg", "Flagfile of the run.")
flags.DEFINE_multi_string("override", [], "Extra train.py flag, e.g. --num_views=3.")
flags.DEFINE_integer("batches", 100, "Batches to time (after the first).")
FLAGS = flags.FLAGS


def time_batches(dataset, count):
    """Seconds to draw `count` elements of `dataset` after its first one."""
    it = iter(dataset)
    next(it)
    start = time.perf_counter()
    for _ in range(count):
        next(it)
    return time.perf_counter() - start


def main(argv):
    del argv
    from grafit_tf.data import pipeline, sources

    config = resolved_config([f"--flagfile={FLAGS.config}", *FLAGS.override])
    dataset = pipeline.train_dataset_fn(sources.load(config), config)()
    seconds = time_batches(dataset, FLAGS.batches)
    print(f"{FLAGS.batches} batches of {config.batch_size} images x {config.num_views} views: "
          f"{seconds:.2f} s ({1000 * seconds / FLAGS.batches:.1f} ms per batch)")


if __name__ == "__main__":
    app.run(main)
