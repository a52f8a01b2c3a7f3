"""`tf.distribute` glue: choosing a strategy and gathering across replicas."""

import tensorflow as tf

from grafit_tf.errors import UserError


def split_cpu(replicas):
    """Makes `replicas` logical CPU devices, so the distributed path runs anywhere.

    Must run before TensorFlow initialises its devices (before any op).
    """
    if replicas <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    except RuntimeError:
        if len(tf.config.list_logical_devices("CPU")) != replicas:
            raise UserError(f"--cpu_replicas={replicas}: TensorFlow already started with "
                            f"{len(tf.config.list_logical_devices('CPU'))} CPU devices.") from None


def make_strategy(kind, cpu_replicas=0):
    """The strategy for `--distribute`.

    `auto` picks MirroredStrategy when more than one GPU is visible and the
    default (single-device) strategy otherwise; `mirrored` mirrors over every
    visible GPU, or over the logical CPU devices when there is no GPU
    (`cpu_replicas` of them).
    """
    split_cpu(cpu_replicas)
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "none" or (kind == "auto" and len(gpus) <= 1):
        return tf.distribute.get_strategy()
    if kind in ("auto", "mirrored"):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    raise UserError(f"--distribute={kind!r} is not known; choose auto, none or mirrored.")


def num_replicas():
    """Replicas in sync under the current strategy (1 outside any)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def all_gather(tensor):
    """Concatenates `tensor` `[b, ...]` from every replica: `[b * replicas, ...]`.

    Called in replica context (inside `train_step`). Every replica gets the same
    result, in replica order, which is what lets each replica apply the same
    memory update: the memory holds *all* of the global batch, not just the
    replica's share. With a single replica it is the identity.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensor
    return context.all_gather(tensor, axis=0)
