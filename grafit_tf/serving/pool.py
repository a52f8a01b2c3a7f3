"""Decodes image files in worker processes, ahead of the inference that consumes them.

`DecodePool.map(paths)` yields `Chunk`s in file order while up to `ahead`
chunks are being decoded, overlapping Pillow with the caller's onnxruntime.
Processes, not threads: decoding small files is mostly Python code, and a
crashing decoder takes down only its worker; the files in flight are then
decoded again one at a time, so only the culprit is an error.

Workers never outlive their parent: Linux kills them when it dies
(`prctl(PR_SET_PDEATHSIG)`) and, on every platform, a thread in each polls
`os.getppid()`, so a SIGKILL of `serve.py` leaves no decoder behind (nor
multiprocessing's resource tracker, which exits once no process holds its
pipe). Workers ignore SIGINT: on Ctrl-C the parent stops them as it shuts the
pool down.
"""

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from grafit_tf.serving import images as images_lib

CHUNK_SIZE = 32  # Files per task: amortises inter-process traffic.
PARENT_POLL_SECONDS = 0.5
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _exit_with_parent(parent_pid):
    """Worker initializer: the worker ends when process `parent_pid` does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # The parent handles Ctrl-C.
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            # "Parent" is the thread that started the worker: `map`'s caller,
            # which outlives the pool (workers start on `submit`, not later).
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # The polling thread below still ends the worker.
    if os.getppid() != parent_pid:  # The parent died before the prctl.
        os._exit(1)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@dataclasses.dataclass
class Chunk:
    """Decoded consecutive files `[start, start + count)` of the full file list."""

    start: int
    count: int
    images: np.ndarray  # [n_ok, H, W, C] uint8, the files that decoded, in order.
    ok: list  # [n_ok] indices of those files.
    errors: list  # (index, reason) of the files that did not decode.


def _no_images(spec):
    return np.zeros((0, *spec.image_shape), np.uint8)


def decode_chunk(paths, spec, start=0):
    """Decodes `paths` (`start`: index of `paths[0]` in the full list) with an `images.Spec`.

    Returns:
        A `Chunk`; a bad file becomes one of its errors, never an exception.
    """
    decoded, ok, errors = [], [], []
    for i, path in enumerate(paths):
        try:
            decoded.append(images_lib.load(path, spec))
            ok.append(start + i)
        except images_lib.ImageError as e:
            errors.append((start + i, str(e)))
        except Exception as e:  # A decoder bug must not lose the other files.
            errors.append((start + i, f"decoder failed ({type(e).__name__}: {e})"))
    stacked = np.stack(decoded) if decoded else _no_images(spec)
    return Chunk(start, len(paths), stacked, ok, errors)


class DecodePool:
    """Ordered, bounded-ahead decoding in worker processes; a context manager.

    Args:
        spec: an `images.Spec`.
        workers: worker processes; 0 decodes in the calling process.
        chunk_size: files per task.
        ahead: chunks in flight (default: 2 per worker).
        decode: the task function (module level, picklable); tests swap it.
    """

    def __init__(self, spec, workers, chunk_size=CHUNK_SIZE, ahead=None, decode=decode_chunk):
        self.spec, self.workers, self.chunk_size = spec, workers, chunk_size
        self.ahead = ahead or 2 * max(workers, 1)
        self.decode = decode
        # 'spawn': fork does not copy the parent's onnxruntime / BLAS threads safely.
        self._context = multiprocessing.get_context("spawn")
        self._executor = None

    def _new_executor(self, workers):
        return concurrent.futures.ProcessPoolExecutor(workers, mp_context=self._context,
                                                      initializer=_exit_with_parent,
                                                      initargs=(os.getpid(),))

    def map(self, paths):
        """Yields a `Chunk` per `chunk_size` files of `paths`, in order."""
        if self.workers <= 0:
            for start in range(0, len(paths), self.chunk_size):
                yield self.decode(paths[start:start + self.chunk_size], self.spec, start)
            return
        pending = collections.deque()  # (start, count, future), in file order.
        next_start = 0
        while pending or next_start < len(paths):
            self._executor = self._executor or self._new_executor(self.workers)
            while len(pending) < self.ahead and next_start < len(paths):
                part = paths[next_start:next_start + self.chunk_size]
                pending.append((next_start, len(part),
                                self._executor.submit(self.decode, part, self.spec, next_start)))
                next_start += len(part)
            start, count, future = pending.popleft()
            try:
                yield future.result()
            except BrokenProcessPool:
                # Every chunk in flight is lost and the culprit is unknown:
                # redo them one file at a time, where a crash names its file.
                lost = [(start, count)] + [(s, c) for s, c, _ in pending]
                pending.clear()
                self.close()
                for s, c in lost:
                    yield self._isolated(paths, s, c)

    def _isolated(self, paths, start, count):
        """Decodes `paths[start:start+count]` one by one in a single worker."""
        parts, executor = [], None
        for i in range(start, start + count):
            executor = executor or self._new_executor(1)
            try:
                parts.append(executor.submit(self.decode, [paths[i]], self.spec, i).result())
            except BrokenProcessPool:
                parts.append(Chunk(i, 1, _no_images(self.spec), [],
                                   [(i, "decoder crashed (its worker process died)")]))
                executor.shutdown(wait=True, cancel_futures=True)
                executor = None
        if executor is not None:
            executor.shutdown(wait=True)
        decoded = [p.images for p in parts if len(p.images)]
        return Chunk(start, count, np.concatenate(decoded) if decoded else _no_images(self.spec),
                     [j for p in parts for j in p.ok], [e for p in parts for e in p.errors])

    def close(self):
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
