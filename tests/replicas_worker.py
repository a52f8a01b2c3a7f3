"""One train_step on N logical CPU replicas vs. one device, same global batch.

Run as a subprocess (logical devices must be configured before TensorFlow
starts): `python tests/replicas_worker.py N [variant ...]`, a variant being a
method, METHOD+bn (synchronised batch norm) or `default` (the default recipe).
Prints one JSON line with, per variant, the losses on each side and the largest
differences of the updated weights and of the memory.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

REPLICAS = int(sys.argv[1])
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * REPLICAS)
# Grappler off, as in the test process (conftest.py): each graph here runs once, and
# optimising it costs more than running it (a quarter of this worker's time).
tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})

import keras  # noqa: E402

from grafit_tf import builders  # noqa: E402
from grafit_tf.config import Config  # noqa: E402
from grafit_tf.data import pipeline  # noqa: E402
# Run as a script, this file's folder (tests/) is sys.path[0]: its helpers import flat.
from synthetic import synthetic_source  # noqa: E402

DEFAULT_CFG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                           "fashion_mnist.cfg")
# The default recipe's settings that shape the losses (InfoNCE over 3 views, a queue
# memory, lambda_inst 0.5, ...); sizes, optimizer and data stay this test's.
RECIPE = ("method", "instance_loss", "memory", "num_views", "lambda_inst", "tau",
          "instance_tau", "memory_momentum", "ema_decay")


def default_recipe():
    """`RECIPE`'s values in configs/fashion_mnist.cfg, typed as `Config`'s fields."""
    with open(DEFAULT_CFG, encoding="utf-8") as f:
        flags = dict(line.strip()[2:].split("=", 1) for line in f if line.startswith("--"))
    return {k: type(getattr(Config(), k))(flags[k]) for k in RECIPE}


def step(model, strategy, batch):
    """Runs one train_step on `batch` (global) split evenly over the replicas; returns
    its logs (the loss and each term), averaged over the replicas."""
    per = len(batch["index"]) // strategy.num_replicas_in_sync

    def shard(ctx):
        r = ctx.replica_id_in_sync_group
        return {k: v[r * per:(r + 1) * per] for k, v in batch.items()}

    values = strategy.experimental_distribute_values_from_function(shard)
    out = strategy.run(tf.function(model.train_step), args=(values,))
    return {k: float(strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None))
            for k, v in out.items()}


STRATEGIES = None


def strategies():
    """Created once: several MirroredStrategy objects in one process clash."""
    global STRATEGIES
    if STRATEGIES is None:
        STRATEGIES = (("one", tf.distribute.OneDeviceStrategy("/cpu:0")),
                      ("mirrored", tf.distribute.MirroredStrategy(
                          [f"/cpu:{i}" for i in range(REPLICAS)])))
    return STRATEGIES


def fill_queue(memory):
    """Fills a quarter of a queue, with slots of coarse class 0 and of a class of no
    image here (2): class 0's queries get an NCA loss > 0, class 1's no positive, so
    the count of queries with a positive differs between replicas."""
    z = np.random.default_rng(1).normal(size=(memory.size // 4, memory.dim))
    memory.fill(z / np.linalg.norm(z, axis=1, keepdims=True), np.arange(len(z)) % 2 * 2)


def run(variant):
    """`default`: the default recipe, with batch norm synchronised as the trainer does
    over replicas; else a method, with synchronised batch norm if `METHOD+bn`."""
    settings = default_recipe() if variant == "default" else dict(method=variant.split("+")[0])
    batch_norm = variant == "default" or variant.endswith("+bn")
    config = Config(batch_size=16, queue_size=32, width=4, proj_hidden=16, knn_dim=8,
                    proj_dim=8, optimizer="sgd", learning_rate=0.01, warmup_epochs=0,
                    weight_decay=0.0, epochs=1, seed=3, **settings)
    source = synthetic_source()
    batch = next(iter(pipeline.train_dataset_fn(source, config)(None)))
    batch = {k: v.numpy() for k, v in batch.items()}
    results = {}
    initial = None
    for name, strategy in strategies():
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = builders.build_model(config, source, total_steps=10, use_bn=batch_norm,
                                         sync_bn=batch_norm)
            model.compile(optimizer=builders.build_optimizer(config, 10, 4))
            model.optimizer.build(model.trainable_variables)
        if initial is None:
            if model.memory is not None and model.memory.kind == "queue":
                fill_queue(model.memory)
            initial = model.get_weights()
        else:
            model.set_weights(initial)
        logs = step(model, strategy, batch)
        memory = model.memory.embeddings.value if model.memory is not None else None
        copies = ([v.numpy() for v in memory.values] if hasattr(memory, "values")
                  else [memory.numpy()] if memory is not None else [])
        results[name] = dict(logs=logs, weights=model.get_weights(), memory=copies,
                             variables=[w.path for w in model.weights])
    one, mir = results["one"], results["mirrored"]
    # Relative to max(1, |w|): batch-norm moving variances are far above 1.
    diffs = [float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(a))))
             for a, b in zip(one["weights"], mir["weights"])]
    # The step did something: the largest change of a weight outside the memory
    # (whose queue pointer always moves).
    changed = max(float(np.max(np.abs(a - b))) for a, b, path in
                  zip(initial, one["weights"], one["variables"]) if not path.startswith("memory"))
    memory_diff = max([float(np.max(np.abs(m - one["memory"][0]))) for m in mir["memory"]],
                      default=0.0)
    return dict(loss_one=one["logs"]["loss"], loss_mirrored=mir["logs"]["loss"],
                weight_diff=max(diffs), worst_variable=one["variables"][int(np.argmax(diffs))],
                weights_changed=changed, memory_diff=memory_diff,
                memory_copies=len(mir["memory"]), logs_one=one["logs"], logs_mirrored=mir["logs"])


if __name__ == "__main__":
    variants = sys.argv[2:] or ["default", "grafit", "coarse_ce", "instance", "fine_ce",
                                "grafit_maskcon", "maskcon"]
    for v in variants:
        if v != "default" and v.partition("+")[2] not in ("", "bn"):
            sys.exit(f"unknown variant {v!r}: default, METHOD or METHOD+bn")
    print(json.dumps({v: run(v) for v in variants}))
