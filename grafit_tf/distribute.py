"""`tf.distribute` glue: choosing a strategy and gathering across replicas."""

import json
import os
import socket
import subprocess
import sys

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


def make_strategy(kind, cpu_replicas=0, worker_timeout=120.0):
    """The strategy for `--distribute`: `auto` is MirroredStrategy over more than one
    visible GPU, else the default strategy; `mirrored` mirrors over every visible GPU,
    or over the `cpu_replicas` logical CPU devices when there is no GPU.
    """
    split_cpu(cpu_replicas)
    if kind == "multi_worker":
        return multi_worker_strategy(worker_timeout)
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "none" or (kind == "auto" and len(gpus) <= 1):
        return tf.distribute.get_strategy()
    if kind in ("auto", "mirrored"):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    raise UserError(
        f"--distribute={kind!r} is not known; choose auto, none, mirrored or multi_worker.")


def cluster_from_env():
    """The `TF_CONFIG` cluster `(cluster dict, task dict)`; UserError if unusable."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise UserError("--distribute=multi_worker needs TF_CONFIG on every host, e.g. "
                        '{"cluster": {"worker": ["h0:12345", "h1:12345"]}, '
                        '"task": {"type": "worker", "index": 0}}.')
    try:
        tf_config = json.loads(raw)
        cluster, task = tf_config["cluster"], tf_config["task"]
        cluster[task["type"]][task["index"]]  # This task must be in the cluster.
    except (ValueError, KeyError, IndexError, TypeError):
        raise UserError(f"TF_CONFIG is not a valid cluster description: {raw[:200]}") from None
    for addresses in cluster.values():
        for address in addresses:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise UserError(f"TF_CONFIG: worker address {address!r} is not host:port.")
            try:
                socket.getaddrinfo(host, int(port))
            except socket.gaierror:
                raise UserError(f"TF_CONFIG: worker address {address!r} does not resolve; "
                                "fix the host name.") from None
    return cluster, task


# A separate process: MultiWorkerMirroredStrategy blocks in C++, holding the GIL, until
# every worker is up, so no Python thread of ours could report a missing worker.
_WATCHDOG = """
import os, signal, sys, time
parent, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(timeout)
try:
    os.kill(parent, 0)
except OSError:
    sys.exit(0)
print(message, file=sys.stderr, flush=True)
os.kill(parent, signal.SIGKILL)
"""


def multi_worker_strategy(timeout):
    """`MultiWorkerMirroredStrategy` from `TF_CONFIG`, with a start-up watchdog: unless
    every worker answers a first collective within `timeout` seconds, it prints one
    line naming the cluster and ends this process (SIGKILL) instead of a hang."""
    cluster, _ = cluster_from_env()
    addresses = [a for group in cluster.values() for a in group]
    message = (f"error: not every worker answered within {timeout:.0f} s "
               f"({', '.join(addresses)}); check that each TF_CONFIG address is reachable "
               "and that every worker is started.")
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()),
                                 str(timeout), message])
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        # A first collective: returns once every worker is up and connected.
        strategy.reduce(tf.distribute.ReduceOp.SUM,
                        strategy.run(lambda: tf.constant(1.0)), axis=None)
    finally:
        watchdog.kill()
        watchdog.wait()
    return strategy


def is_chief(strategy):
    """Whether this process writes files: the chief, or worker 0 without a chief."""
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not spec or resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in spec


def num_replicas():
    """Replicas in sync under the current strategy (1 outside any)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def all_gather(tensor):
    """`tensor` `[b, ...]` of every replica, in replica order: `[b * replicas, ...]`, the
    same on every replica, so each applies the same memory update (the memory holds *all*
    of the global batch). In replica context (`train_step`); one replica: the identity."""
    return cross_replica_concat(tensor)[0]


def cross_replica_concat(tensor, axis=0):
    """`tensor` of every replica concatenated along `axis`, and where this replica's part
    starts in it (as SimCLR's `tpu_cross_replica_concat`): the keys of a contrastive loss
    with the global batch's negatives. One replica: `(tensor, 0)`."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensor, 0
    return (context.all_gather(tensor, axis=axis),
            context.replica_id_in_sync_group * tf.shape(tensor)[axis])
