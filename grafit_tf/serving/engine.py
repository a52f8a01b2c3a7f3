"""`--engine=ray`: the shards served by Ray Data's workers, one onnxruntime model each.

Each shard is a row of a Ray dataset; `ShardServer`, the batch function of
`map_batches` on a pool of `workers` actors, serves it with `work.serve_shard`
as `serve.py`'s own loop does, so the outputs are the same. The actors publish
their shards themselves: on several machines the output folder must be shared
storage (and each node needs this package). Ray is imported only on demand.
"""

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import warnings

import numpy as np

from grafit_tf.errors import UserError
from grafit_tf.serving import outputs, work
from grafit_tf.serving.embedder import OnnxEmbedder, resolve_providers

# While an actor serves a shard it holds the empty folder `OUT/<MARK>`: when its
# process dies, Ray's error gives the pid and the folder names the shard (the next
# run's `OutputDir` removes leftovers, as they have the staging prefix).
MARK = outputs.STAGING_PREFIX + "{pid}.{shard}"


class ShardServer:
    """Ray Data's batch function: serves the shard of each row (`{"shard": [index]}`).

    Args:
        parts: object refs of the `(shards.Shard, reuse or None)` pairs; an actor
            fetches only the shards it serves.
        classifier: `[object ref of a work.Classifier]`, or `[None]`.
        threads: onnxruntime threads (the actor's CPUs).
    """

    def __init__(self, parts, model, providers, classifier, settings, directory, threads):
        import ray

        self.parts, self.directory = parts, directory
        self.classifier = None if classifier[0] is None else ray.get(classifier[0])
        self.settings = dataclasses.replace(settings, workers=0)  # Decodes in this process.
        self.embedder = OnnxEmbedder(model, providers, threads)

    def __call__(self, batch):
        import ray

        names, values = [], []
        for index in batch["shard"]:
            shard, reuse = ray.get(self.parts[int(index)])
            mark = os.path.join(self.directory, MARK.format(pid=os.getpid(), shard=shard.name))
            os.makedirs(mark, exist_ok=True)
            try:
                value = work.serve_shard(shard, self.embedder, self.classifier, self.settings,
                                         self.directory, reuse)
            except Exception as e:  # Named here: the driver only sees Ray's wrapper.
                what = "" if isinstance(e, work.RunError) else f"{type(e).__name__}: "
                raise work.RunError(f"{shard.name}: {what}{_one_line(e)}") from None
            finally:
                os.rmdir(mark)
            names.append(shard.name)
            values.append(json.dumps(value))
        return {"name": np.array(names), "value": np.array(values)}


def serve_shards(todo, model, providers, classifier, settings, directory, address, workers, log):
    """Serves `todo` on Ray; returns `{shard name: its shard.json dict}`.

    Args:
        todo: `(shards.Shard, reuse or None)` pairs (see `work.serve_shard`).
        classifier: a `work.Classifier`, or None.
        settings: `work.Settings` (its `workers` is ignored: actors decode in-process).
        address: the cluster to join ('auto', 'ray://HEAD:10001'); '' starts a local
            one of `workers` CPUs, stopped on return (Ctrl-C too). A process
            already connected (`ray.init` done by its caller) uses that cluster.
        workers: actors, one CPU and one onnxruntime model each (and a share of the
            GPUs when the cluster has some and `providers` picks CUDA).

    Raises:
        UserError: Ray is not installed, or the cluster cannot be reached.
        RunError: a shard failed (named in the one-line message); the shards that
            finished stay published.
    """
    try:
        import ray
    except ImportError:
        raise UserError("--engine=ray needs Ray: pip install -r requirements-scale.txt") from None
    started = time.perf_counter()
    owned = _connect(ray, address, workers)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = ctx.print_on_execution_start = False
        for handler in logging.getLogger("ray.data").handlers:  # Its log file keeps all.
            if not type(handler).__name__.endswith("FileHandler"):
                handler.setLevel(logging.CRITICAL)  # Its failures reach the caller as RunError.
        gpus = ray.cluster_resources().get("GPU", 0)
        cuda = bool(gpus) and "CUDAExecutionProvider" in resolve_providers(providers)
        parts = [ray.put(part) for part in todo]
        shared = [None if classifier is None else ray.put(classifier)]
        where = f"a local cluster started in {time.perf_counter() - started:.1f} s" if owned \
            else f"the cluster at {address or ray.get_runtime_context().gcs_address}"
        log(f"ray: {len(todo)} shards on {workers} workers{' with GPUs' if cuda else ''}, {where}")
        with _sigint_deferred(), warnings.catch_warnings():
            rows = ray.data.from_items([{"shard": i} for i in range(len(todo))],
                                       override_num_blocks=len(todo))  # A task per shard.
            # Ray 2.60 deprecates max_restarts here (2.64 drops it): requirements-scale.txt.
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            served = rows.map_batches(
                ShardServer, batch_size=1, num_cpus=1,
                compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
                num_gpus=min(1.0, gpus / workers) if cuda else 0,
                fn_constructor_args=(parts, model, providers, shared, settings, directory, 1),
                max_restarts=0)  # A dead actor fails the run, not retries the shard forever.
        done = {}
        try:
            for row in served.iter_rows():
                done[str(row["name"])] = json.loads(str(row["value"]))
        except Exception as e:
            # Ray Data stops at the first failed row (DataContext.max_errored_blocks
            # is 0) and raises it here: a RayTaskError(UserCodeException) whose text
            # holds the actor's traceback, ending in its RunError that names the
            # shard; or, when an actor's process died (a crash in a native library,
            # the OOM killer), an ActorDiedError with its pid. Shards that other
            # actors were serving are dropped unpublished. Per-file problems never
            # get here: they are rows of the shards' errors.csv.
            raise work.RunError(f"--engine=ray: {_cause(e, directory)}") from None
        return done
    finally:
        if owned:
            ray.shutdown()
        for name in os.listdir(directory):
            if name.startswith(outputs.STAGING_PREFIX) and ".shard-" in name:
                with contextlib.suppress(OSError):  # Gone already, or a killed actor's.
                    os.rmdir(os.path.join(directory, name))


def _connect(ray, address, workers):
    """Connects to Ray; True when this call started the (local) cluster."""
    if ray.is_initialized():
        return False
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    # Ray's token authentication stays on (RAY_AUTH_MODE decides), without the warning
    # that it is on by default.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    host = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", address)
    if host:  # Ray would retry an address that does not answer for many minutes.
        try:
            socket.create_connection((host[1], int(host[2])), timeout=10).close()
        except OSError as e:
            raise UserError(f"--engine=ray: cannot reach Ray at --ray_address={address} "
                            f"({_one_line(e)}).") from None
    try:
        with _sigint_deferred():
            if address:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            else:  # 'local': a new cluster even when RAY_ADDRESS is set; no dashboard server.
                ray.init(address="local", num_cpus=workers, include_dashboard=False,
                         logging_level=logging.WARNING, log_to_driver=False)
    except BaseException as e:
        ray.shutdown()  # Whatever has started (Ctrl-C, or a cluster that cannot come up).
        if not isinstance(e, (ConnectionError, RuntimeError, ValueError)):
            raise
        what = f"cannot reach Ray at --ray_address={address}" if address else \
            "cannot start a local Ray cluster"
        raise UserError(f"--engine=ray: {what} ({_one_line(e)}).") from None
    finally:
        if main and sigterm is not None:  # ray.init sets its own (sys.exit); serve.py has one.
            signal.signal(signal.SIGTERM, sigterm)
    return not address


@contextlib.contextmanager
def _sigint_deferred():
    """A first Ctrl-C waits for the end of the block, a second one interrupts it.

    A cluster cut short while it starts leaves two of its processes running for a
    minute, and a Ray Data dataset cut short while it is built prints an error.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []

    def handler(number, frame):
        if caught:
            raise KeyboardInterrupt
        caught.append(number)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _cause(error, directory):
    """One line for a failed Ray execution: the actor's `RunError` (Ray passes on its
    traceback as text), or the shard whose worker process died (found by the pid that
    Ray reports), else Ray's first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # Ray colours its task names.
    raised = re.findall(rf"^{re.escape(work.RunError.__module__)}\.RunError: (.+)$", text,
                        re.MULTILINE)
    if raised:
        return raised[-1]
    if pid := re.search(r"^\s*pid: (\d+)$", text, re.MULTILINE):
        prefix = MARK.format(pid=pid[1], shard="")
        for name in os.listdir(directory):
            if name.startswith(prefix):
                return (f"{name[len(prefix):]}: its Ray worker process died serving it (a "
                        f"crash, or killed for memory; {type(error).__name__})")
    return f"{type(error).__name__}: {_one_line(text)}"


def _one_line(error):
    lines = [" ".join(l.split()) for l in str(error).splitlines() if l.strip()]
    return lines[0] if lines else type(error).__name__
