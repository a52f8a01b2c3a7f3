"""`train_and_evaluate(config, workdir)`: the whole training job.

Writes into `workdir`: `config.json`, `checkpoints/`, `logs/` (TensorBoard,
`train.csv`, `eval.csv`), `embedder.keras` and `metrics.json`. Running the same
command again after a crash resumes from the last checkpoint.
"""

import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

import grafit_tf
from grafit_tf import builders, checkpointing, embedding_transform, evaluation, heads, subclusters
from grafit_tf.data import pipeline, sources
from grafit_tf.distribute import is_chief, make_strategy
from grafit_tf.errors import UserError


def check_batch(config, source, replicas):
    """Stops early on batch / memory sizes that cannot work."""
    if config.batch_size % replicas:
        raise UserError(
            f"--batch_size={config.batch_size} does not divide by the {replicas} replicas; "
            f"use a multiple of {replicas}."
        )
    if len(source.train) < config.batch_size:
        what = "the memory (one slot per training image)" if config.uses_memory else "the data"
        raise UserError(
            f"{what} holds {len(source.train)} images, fewer than one batch "
            f"(--batch_size={config.batch_size}); lower --batch_size or raise "
            "--max_train_examples."
        )


def check_resumable(config, workdir):
    """Refuses to resume a checkpointed run with other settings than it started with.

    Resuming would silently mix two configurations in one model (and overwrite
    `config.json`, hiding the first).
    """
    path = os.path.join(workdir, "config.json")
    if checkpointing.latest(os.path.join(workdir, "checkpoints")) is None or not os.path.isfile(
            path):
        return
    with open(path, encoding="utf-8") as f:
        changed = config.differences(json.load(f))
    if changed:
        raise UserError(
            f"--workdir={workdir} holds a run started with other settings ("
            + "; ".join(changed) + "): use another --workdir, or delete this one to start over.")


def embedding_fn(embedder, source):
    """`embedder` as a function `[B, H, W, C]` float32 -> `[B, D]` float32, traced once.

    The batch size is left open, so one trace serves every batch of both splits,
    the last, smaller one included: for a large trunk, tracing costs more than
    embedding a small split does.
    """
    spec = tf.TensorSpec([None, *source.image_shape], tf.float32)
    return tf.function(lambda x: tf.cast(embedder(x, training=False), tf.float32),
                       input_signature=[spec])


def embed(fn, split, source, batch_size=512):
    """Embeddings `[N, D]` float32 of a split, in order, evaluation preprocessing.

    `fn`: from `embedding_fn` (reused across splits, it is traced only once). Runs
    outside any strategy on this process's own copy of the weights, so every worker
    gets the same full result in dataset order (a distributed `predict` would shard
    the data across workers).
    """
    ds = pipeline.eval_dataset(split, source, batch_size)
    return np.concatenate([fn(batch).numpy() for batch in ds]).astype(np.float32)


def evaluate(embedder, source, config):
    """The protocol of `grafit_tf.evaluation` on the test split.

    With `--embedding_transform`, first fits the embedder's map on the training
    split's embeddings (images only) and sets it, so the embedder that is saved
    and exported is the one that was scored.
    """
    fn = embedding_fn(embedder, source)  # One trace for both splits.
    if config.embedding_transform == "none":
        train_emb = embed(fn, source.train, source)
    else:
        layer = embedder.get_layer(heads.TRANSFORM_LAYER)
        dim = layer.kernel.shape[0]
        layer.set_weights([np.eye(dim, dtype=np.float32), np.zeros(dim, np.float32)])
        features = embed(fn, source.train, source)  # The identity map: normalise(f(x)).
        mean, projection = embedding_transform.fit(features, config.embedding_transform,
                                                   config.whiten_shrinkage)
        # Variables, not constants, in the trace: `fn` sees the new map.
        layer.set_weights(embedding_transform.dense_weights(mean, projection))
        # The same map in NumPy: cheaper than embedding the training split again.
        train_emb = embedding_transform.apply(features, mean, projection)
    test_emb = embed(fn, source.test, source)
    return evaluation.knn_metrics(
        train_emb, source.train.fine, source.train.coarse,
        test_emb, source.test.fine, source.test.coarse,
        k=config.eval_k, temperature=config.eval_temperature,
        num_fine=source.hierarchy.num_fine)


class PeriodicEvaluation(keras.callbacks.Callback):
    """Runs the evaluation every `every` epochs and appends to `logs/eval.csv`.

    `seconds` adds up the wall time spent evaluating, which `model.fit`'s time
    (`train_seconds`) includes: the trainer reports it as `eval_seconds`, so that
    the training's own time can be told apart.
    """

    def __init__(self, embedder, source, config, every, path, write=True):
        super().__init__()
        self.embedder, self.source, self.config = embedder, source, config
        self.every, self.path, self.write = every, path, write
        self.seconds = 0.0

    def on_epoch_end(self, epoch, logs=None):
        if not self.every or (epoch + 1) % self.every or epoch + 1 == self.config.epochs:
            return  # The last epoch is evaluated by train_and_evaluate itself.
        started = time.time()
        metrics = dict(epoch=epoch + 1, **evaluate(self.embedder, self.source, self.config))
        if self.write:
            append_csv(self.path, metrics)
        seconds = time.time() - started
        self.seconds += seconds
        print(f"\neval epoch {epoch + 1} ({seconds:.0f} s): " + ", ".join(
            f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch"), flush=True)


def append_csv(path, row):
    new = not os.path.isfile(path)
    with open(path, "a", encoding="utf-8") as f:
        if new:
            f.write(",".join(row) + "\n")
        f.write(",".join(str(v) for v in row.values()) + "\n")


def prefill_memory(model, source, config):
    """Fills the memory with real embeddings of the (un-augmented) training images."""
    if model.objective.maskcon:  # The queue holds keys: the key encoder's embeddings.
        head = heads.embedder(model.target_backbone, model.target_projector, model.image_shape)
    else:
        head = heads.embedder(model.backbone, model.knn_head, model.image_shape)
    split = source.train if model.memory.kind == "full" else source.train.take(model.memory.size)
    z = embed(embedding_fn(head, source), split, source)
    labels = source.train.coarse[: len(z)]
    model.memory.fill(z, labels)


def train_and_evaluate(config, workdir):
    """Trains, saves and evaluates. Returns the metrics dict (also in metrics.json).

    Under `--distribute=multi_worker` every worker runs this; only the chief
    writes into `workdir`.
    """
    return run(config, workdir).metrics


class Result:
    """What a run leaves in memory: the trained model, embedder and metrics."""

    def __init__(self, model, embedder, metrics):
        self.model, self.embedder, self.metrics = model, embedder, metrics


def run(config, workdir):
    """`train_and_evaluate`, returning the `Result`."""
    config.validate()
    source = sources.load(config)
    strategy = make_strategy(config.distribute, config.cpu_replicas, config.worker_timeout)
    replicas = strategy.num_replicas_in_sync
    check_batch(config, source, replicas)
    chief = is_chief(strategy)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    logs = os.path.join(workdir, "logs")
    check_resumable(config, workdir)
    if chief:
        os.makedirs(logs, exist_ok=True)
        checkpointing.write_json(os.path.join(workdir, "config.json"), dict(
            config.to_dict(), num_replicas=replicas, version=grafit_tf.__version__,
            data=sources.describe(source)))

    spe = pipeline.steps_per_epoch(len(source.train), config.batch_size)
    total_steps = spe * config.epochs
    keras.utils.set_random_seed(config.seed)
    # Compute in float16 / bfloat16; variables, losses and the memory stay float32.
    keras.mixed_precision.set_global_policy(
        "float32" if config.mixed_precision == "none" else config.mixed_precision)
    with strategy.scope():
        model = builders.build_model(config, source, total_steps,
                                     sync_bn=config.sync_batch_norm and replicas > 1)
        # jit_compile is always explicit: Keras's "auto" differs between CPU,
        # one GPU and a strategy.
        model.compile(optimizer=builders.build_optimizer(config, total_steps, spe),
                      jit_compile=bool(config.jit_compile))
        model.optimizer.build(model.trainable_variables)
        embedder = builders.build_embedder(model, config.embedding_transform)
    start_step = checkpointing.restore(model, ckpt_dir)
    if start_step:
        print(f"Resuming from step {start_step} of {total_steps} ({ckpt_dir}).", flush=True)
    elif config.uses_memory:
        prefill_memory(model, source, config)

    periodic = PeriodicEvaluation(embedder, source, config, config.eval_every,
                                  os.path.join(logs, "eval.csv"), write=chief)
    callbacks = [
        checkpointing.Checkpointer(ckpt_dir, spe, config.checkpoint_every, enabled=chief),
        keras.callbacks.TerminateOnNaN(),
        periodic,
    ]
    if model.subclusters is not None:
        # First, so that the epoch's checkpoint holds the clustering the next epoch uses.
        callbacks.insert(0, subclusters.Reclustering(model.subclusters,
                                                     config.subcluster_start_epochs))
    if chief:
        callbacks += [keras.callbacks.CSVLogger(os.path.join(logs, "train.csv"), append=True),
                      keras.callbacks.TensorBoard(logs, write_graph=False)]
    started = time.time()
    for first_step, epoch, steps in fit_segments(start_step, spe, config.epochs):
        ds = strategy.distribute_datasets_from_function(
            pipeline.train_dataset_fn(source, config, start_step=first_step))
        model.fit(ds, initial_epoch=epoch, epochs=epoch + 1 if steps != spe else config.epochs,
                  steps_per_epoch=steps, callbacks=callbacks,
                  verbose=config.verbose if chief else 0)
        if model.stop_training:
            break
    train_seconds = time.time() - started
    final_step = int(model.optimizer.iterations.numpy())
    if final_step < total_steps:
        raise RuntimeError("training stopped early (a NaN loss?); see logs/train.csv")

    metrics = evaluate(embedder, source, config)
    if config.method == "finetune":  # Issue 6: transfer is scored by the classifier's top-1.
        from grafit_tf import transfer

        metrics["fine_top1"] = transfer.classification_top1(model, source)
        print(f"fine top-1 (classifier): {100 * metrics['fine_top1']:.2f}%", flush=True)
    metrics.update(
        method=config.method,
        epochs=config.epochs,
        num_replicas=replicas,
        train_examples=len(source.train),
        eval_examples=len(source.test),
        # train_seconds: the wall time of model.fit, its periodic evaluations
        # (eval_seconds of it) included; the final evaluation is in neither.
        train_seconds=train_seconds,
        eval_seconds=periodic.seconds,
        train_images_per_second=(final_step - start_step) * config.batch_size
        / max(train_seconds, 1e-9),
        resumed_from_step=start_step,
        history=read_eval_history(os.path.join(logs, "eval.csv")),
    )
    if chief:
        embedder.save(os.path.join(workdir, "embedder.keras"))
        checkpointing.write_json(os.path.join(workdir, "metrics.json"), metrics)
        print(evaluation.format_table([metrics], evaluation.METRIC_COLUMNS), flush=True)
    return Result(model, embedder, metrics)


def fit_segments(start_step, steps_per_epoch, epochs):
    """Splits the remaining training into `model.fit` calls.

    A run resumed mid-epoch first finishes that epoch (a shorter one-epoch
    `fit`), then runs the remaining whole epochs.

    Yields:
        `(first_global_step, initial_epoch, steps_per_epoch_of_this_fit)`.
    """
    epoch, done = divmod(start_step, steps_per_epoch)
    if done:
        yield start_step, epoch, steps_per_epoch - done
        epoch += 1
    if epoch < epochs:
        yield epoch * steps_per_epoch, epoch, steps_per_epoch


def read_eval_history(path):
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = [l.strip().split(",") for l in f if l.strip()]
    header, rows = lines[0], lines[1:]
    return [{k: float(v) for k, v in zip(header, r)} for r in rows]
