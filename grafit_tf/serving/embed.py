"""Files -> embeddings, in batches, with every file accounted for.

Decoding runs in a `pool.DecodePool` while this loop feeds onnxruntime, so the
two overlap. Each file ends as a row of the embeddings or as an error: a row
the model returns not finite or not of unit norm makes its file an error
("model output ..."), so no NaN reaches the outputs; a batch of the wrong
shape stops the run (`ModelOutputError`).
"""

import dataclasses
import time

import numpy as np

from grafit_tf.serving import images as images_lib
from grafit_tf.serving import pool as pool_lib
from grafit_tf.serving.embedder import row_problems


class ModelOutputError(Exception):
    """The model returned a batch that is not `[N, D]` for N images."""


@dataclasses.dataclass
class Embedded:
    """The result over a list of files, in file order."""

    embeddings: np.ndarray  # [n_ok, D] float32, one row per embedded file.
    ok: list  # [n_ok] indices of the embedded files in the input list.
    errors: list  # (index, reason) of the files that failed.
    seconds: float  # Wall time of decoding + inference.

    @property
    def images_per_second(self):
        return (len(self.ok) + len(self.errors)) / max(self.seconds, 1e-9)


def embed_files(embedder, paths, batch_size=256, workers=2, max_pixels=None, progress=None,
                decode=pool_lib.decode_chunk):
    """Decodes and embeds files; returns an `Embedded`.

    Args:
        embedder: an `embedder.OnnxEmbedder` (or any callable uint8 `[N,H,W,C]`
            -> `[N, D]` with `image_shape`, `resize` and `dim`).
        batch_size: images per inference call.
        workers: decoding processes (0: decode in this process).
        max_pixels: decompression-bomb limit (default: Pillow's).
        progress: optional `update(n)`-able (a tqdm bar), told as files are decided.
        decode: the pool's task function (tests swap it).
    """
    spec = images_lib.Spec(tuple(embedder.image_shape), embedder.resize,
                           max_pixels or images_lib.DEFAULT_MAX_PIXELS)
    started = time.perf_counter()
    rows, ok, errors = [], [], []
    pending, pending_ok = [], []  # Decoded images waiting for a full batch.
    consumed = reported = 0

    def run_batches(final):
        nonlocal pending, pending_ok
        images = np.concatenate(pending)
        done = 0
        while len(images) - done >= batch_size or (final and done < len(images)):
            take = min(batch_size, len(images) - done)
            out = np.asarray(embedder(images[done:done + take]), np.float32)
            if out.shape != (take, embedder.dim):
                raise ModelOutputError(f"the model returned shape {list(out.shape)} for "
                                       f"{take} images, not [{take}, {embedder.dim}]")
            problems = row_problems(out)
            rows.append(out[np.array([p is None for p in problems])])
            for index, p in zip(pending_ok[done:done + take], problems):
                if p is None:
                    ok.append(index)
                else:
                    errors.append((index, f"model output {p}: the model cannot embed this image"))
            done += take
        pending = [images[done:]] if done < len(images) else []
        pending_ok = pending_ok[done:]

    with pool_lib.DecodePool(spec, workers, decode=decode) as pool:
        for chunk in pool.map(list(paths)):
            consumed += chunk.count
            errors.extend(chunk.errors)
            if chunk.ok:
                pending.append(chunk.images)
                pending_ok.extend(chunk.ok)
            if len(pending_ok) >= batch_size:
                run_batches(final=False)
            if progress is not None:  # A file is decided once embedded or failed.
                progress.update(consumed - len(pending_ok) - reported)
                reported = consumed - len(pending_ok)
        if pending_ok:
            run_batches(final=True)
    if progress is not None and consumed > reported:
        progress.update(consumed - reported)
    embeddings = (np.concatenate(rows) if rows
                  else np.zeros((0, embedder.dim), np.float32)).astype(np.float32, copy=False)
    return Embedded(embeddings, ok, sorted(errors), time.perf_counter() - started)
