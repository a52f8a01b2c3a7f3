"""`train_and_evaluate(config, workdir)`: the whole training job.

Writes into `workdir`: `config.json`, `checkpoints/`, `logs/` (TensorBoard,
`train.csv`, `eval.csv`), `embedder.keras` and `metrics.json`. Running the same
command again after a crash resumes from the last checkpoint.
"""

import collections
import os
import time

import keras
import numpy as np
import tensorflow as tf

import grafit_tf
from grafit_tf import builders, checkpointing, evaluation, heads, workdir as workdir_lib
from grafit_tf.data import pipeline, sources
from grafit_tf.distribute import is_chief, make_strategy
from grafit_tf.embedding import embed, embedding_fn
from grafit_tf.errors import RunFailed, check_writable


def evaluate(embedder, source, config):
    """The protocol of `grafit_tf.evaluation` on the test split."""
    fn = embedding_fn(embedder, source)  # One trace for both splits.
    train_emb = embed(fn, source.train, source)
    test_emb = embed(fn, source.test, source)
    return evaluation.knn_metrics(
        train_emb, source.train.fine, source.train.coarse, test_emb, source.test.fine,
        source.test.coarse, temperature=config.eval_temperature,
        num_fine=source.hierarchy.num_fine)


def classification_top1(model, source, batch_size=256):
    """Top-1 accuracy in [0, 1] of `model.classifier(model.backbone(x))` on the test
    split (`--method=finetune`'s score)."""
    classify = keras.Sequential([model.backbone, model.classifier])
    logits = embed(embedding_fn(classify, source), source.test, source, batch_size)  # [N, K]
    return float(np.mean(logits.argmax(axis=1) == source.test.fine))


class PeriodicEvaluation(keras.callbacks.Callback):
    """Runs the evaluation every `every` epochs and appends to `logs/eval.csv`.

    `seconds` adds up the time spent evaluating, which `model.fit`'s `train_seconds`
    includes: reported as `eval_seconds`, it tells the training's own time apart.
    """

    def __init__(self, embedder, source, config, every, path, write=True):
        super().__init__()
        self.embedder, self.source, self.config = embedder, source, config
        self.every, self.path, self.write = every, path, write
        self.seconds = 0.0

    def on_epoch_end(self, epoch, logs=None):
        if not self.every or (epoch + 1) % self.every or epoch + 1 == self.config.epochs:
            return  # The last epoch is evaluated by train_and_evaluate itself.
        if self.model.stop_training:
            return  # A NaN loss stopped training: nothing worth scoring.
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
    """Fills the memory with real embeddings: of the (un-augmented) training images in
    order (grafit), or MaskCon's keys (`augmented_keys`)."""
    if model.objective.maskcon:
        model.memory.fill(*augmented_keys(model, source, config))
        return
    head = heads.embedder(model.backbone, model.knn_head)
    split = source.train if model.memory.kind == "full" else source.train.take(model.memory.size)
    z = embed(embedding_fn(head, source), split, source)
    model.memory.fill(z, source.train.coarse[: len(z)])


def augmented_keys(model, source, config):
    """MaskCon's queue prefill: `model.key` of key views (view 1) of shuffled training
    images, a pass of the pipeline under another seed (MaskCon: one more of its loader).

    Returns:
        `keys [n, P]` float32 (L2-normalised), `coarse labels [n]`; n <= the queue size.
    """
    other = config.replace(seed=(config.seed + 1) % 2**31)
    key_fn = tf.function(model.key)
    keys, labels, size = [], [], model.memory.size
    for batch in pipeline.train_dataset_fn(source, other)():
        keys.append(key_fn(model.views(batch)[:, 1]).numpy())
        labels.append(batch["label"].numpy())
        if len(keys) * len(labels[0]) >= size:
            break
    return np.concatenate(keys)[:size], np.concatenate(labels)[:size]


def train_and_evaluate(config, workdir):
    """Trains, saves and evaluates. Returns the metrics dict (also in metrics.json).

    Under `--distribute=multi_worker` every worker runs this; only the chief
    writes into `workdir`.
    """
    return run(config, workdir).metrics


# What a run leaves in memory.
Result = collections.namedtuple("Result", "model embedder metrics")


def run(config, workdir):
    """`train_and_evaluate`, returning the `Result`."""
    config.validate()
    source = sources.load(config)
    strategy = make_strategy(config.distribute, config.cpu_replicas, config.worker_timeout)
    replicas = strategy.num_replicas_in_sync
    config.validate(source, replicas)
    chief = is_chief(strategy)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    logs = os.path.join(workdir, "logs")
    workdir_lib.check_resumable(config, workdir)
    if config.init_from:
        workdir_lib.check_init_from(config, source.image_shape[-1])
    if chief:
        check_writable(workdir, "--workdir")
        os.makedirs(logs, exist_ok=True)
        checkpointing.write_json(os.path.join(workdir, "config.json"), dict(
            config.to_dict(), num_replicas=replicas, version=grafit_tf.__version__,
            data=sources.describe(source)))
        if source.skipped:
            sources.write_skipped(source, os.path.join(workdir, "skipped_images.csv"))

    spe = pipeline.steps_per_epoch(len(source.train), config.batch_size)
    total_steps = spe * config.epochs
    keras.utils.set_random_seed(config.seed)
    # Compute in float16 / bfloat16; variables, losses and the memory stay float32.
    keras.mixed_precision.set_global_policy(
        "float32" if config.mixed_precision == "none" else config.mixed_precision)
    with strategy.scope():
        init = ((lambda trunk: workdir_lib.init_trunk(trunk, config.init_from))
                if config.init_from else None)
        # Batch norm is synchronised across replicas: per-replica statistics of a
        # small per-GPU batch would make 2 GPUs train another model than 1.
        model = builders.build_model(config, source, total_steps, sync_bn=replicas > 1,
                                     init_trunk=init)
        # jit_compile is always explicit: Keras's "auto" differs between CPU,
        # one GPU and a strategy.
        model.compile(optimizer=builders.build_optimizer(config, total_steps, spe),
                      jit_compile=bool(config.jit_compile))
        model.optimizer.build(model.trainable_variables)
        embedder = heads.embedder(model.backbone)
    start_step = checkpointing.restore(model, ckpt_dir)
    if start_step:
        print(f"Resuming from step {start_step} of {total_steps} ({ckpt_dir}).", flush=True)
    elif model.memory is not None:
        prefill_memory(model, source, config)

    periodic = PeriodicEvaluation(embedder, source, config, config.eval_every,
                                  os.path.join(logs, "eval.csv"), write=chief)
    checkpointer = checkpointing.Checkpointer(ckpt_dir, spe, config.checkpoint_every,
                                              enabled=chief)
    callbacks = [checkpointer, keras.callbacks.TerminateOnNaN(), periodic]
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
    if final_step < total_steps or checkpointer.skipped:
        last = checkpointing.latest(ckpt_dir)
        raise RunFailed(
            f"the loss or the weights became NaN or infinite by step {final_step} of "
            f"{total_steps} (logs/train.csv); nothing after step {last['step'] if last else 0} "
            "was saved. Rerun in a new --workdir with a lower --learning_rate (a rerun here "
            "resumes from that step with the same settings).")

    metrics = evaluate(embedder, source, config)
    if config.method == "finetune":  # Transfer is scored by the classifier's top-1.
        metrics["fine_top1"] = classification_top1(model, source)
        print(f"fine top-1 (classifier): {100 * metrics['fine_top1']:.2f}%", flush=True)
    metrics.update(
        method=config.method, epochs=config.epochs, num_replicas=replicas,
        train_examples=len(source.train), eval_examples=len(source.test),
        # train_seconds: the wall time of model.fit, its periodic evaluations
        # (eval_seconds of it) included; the final evaluation is in neither.
        train_seconds=train_seconds, eval_seconds=periodic.seconds,
        train_images_per_second=(final_step - start_step) * config.batch_size
        / max(train_seconds, 1e-9),
        resumed_from_step=start_step,
        history=read_eval_history(os.path.join(logs, "eval.csv")))
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
