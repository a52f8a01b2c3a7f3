"""One train_step on N logical CPU replicas vs. one device, same global batch.

Run as a subprocess (logical devices must be configured before TensorFlow
starts): `python tests/replicas_worker.py N [method ...]`. Prints one JSON line
with, per method, the loss on each side and the largest differences of the
updated weights and of the memory.
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

import keras  # noqa: E402

from grafit_tf import builders  # noqa: E402
from grafit_tf.config import Config  # noqa: E402
from grafit_tf.data import pipeline  # noqa: E402
# Run as a script, this file's folder (tests/) is sys.path[0]: its helpers import flat.
from synthetic import synthetic_source  # noqa: E402


def step(model, strategy, batch):
    """Runs one train_step on `batch` (global) split evenly over the replicas."""
    per = len(batch["index"]) // strategy.num_replicas_in_sync

    def shard(ctx):
        r = ctx.replica_id_in_sync_group
        return {k: v[r * per:(r + 1) * per] for k, v in batch.items()}

    values = strategy.experimental_distribute_values_from_function(shard)
    out = strategy.run(tf.function(model.train_step), args=(values,))
    return float(strategy.reduce(tf.distribute.ReduceOp.MEAN, out["loss"], axis=None))


STRATEGIES = None


def strategies():
    """Created once: several MirroredStrategy objects in one process clash."""
    global STRATEGIES
    if STRATEGIES is None:
        STRATEGIES = (("one", tf.distribute.OneDeviceStrategy("/cpu:0")),
                      ("mirrored", tf.distribute.MirroredStrategy(
                          [f"/cpu:{i}" for i in range(REPLICAS)])))
    return STRATEGIES


def run(method, batch_norm=False):
    """`batch_norm`: trunk and heads with synchronised batch norm."""
    config = Config(method=method, batch_size=16, queue_size=32, width=4, proj_hidden=16, knn_dim=8,
                    proj_dim=8, optimizer="sgd", learning_rate=0.01, warmup_epochs=0,
                    weight_decay=0.0, epochs=1, seed=3)
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
            initial = model.get_weights()
        else:
            model.set_weights(initial)
        loss = step(model, strategy, batch)
        memory = model.memory.embeddings.value if model.memory is not None else None
        copies = ([v.numpy() for v in memory.values] if hasattr(memory, "values")
                  else [memory.numpy()] if memory is not None else [])
        results[name] = dict(loss=loss, weights=model.get_weights(), memory=copies,
                             variables=[w.path for w in model.weights])
    one, mir = results["one"], results["mirrored"]
    # Relative to max(1, |w|): batch-norm moving variances are far above 1.
    weight_diff = max(float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(a))))
                      for a, b in zip(one["weights"], mir["weights"]))
    changed = max(float(np.max(np.abs(a - b))) for a, b in zip(initial, one["weights"]))
    memory_diff = max([float(np.max(np.abs(m - one["memory"][0]))) for m in mir["memory"]],
                      default=0.0)
    worst = int(np.argmax([np.max(np.abs(a - b)) for a, b in zip(one["weights"], mir["weights"])]))
    return dict(worst_variable=one["variables"][worst], loss_one=one["loss"], loss_mirrored=mir["loss"], weight_diff=weight_diff,
                weights_changed=changed, memory_diff=memory_diff,
                memory_copies=len(mir["memory"]))


if __name__ == "__main__":
    # "grafit+bn" runs grafit with synchronised batch norm.
    methods = sys.argv[2:] or ["grafit", "coarse_ce", "instance", "fine_ce"]
    for m in methods:
        if m.partition("+")[2] not in ("", "bn"):
            sys.exit(f"unknown variant {m!r}: METHOD or METHOD+bn")
    print(json.dumps({m: run(m.split("+")[0], batch_norm=m.endswith("+bn")) for m in methods}))
