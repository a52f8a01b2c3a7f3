"""One shard's work: embed its files, classify them against the gallery, publish the shard.

`serve_shard` is the whole unit of work, the same in `serve.py`'s loop and in
an engine's workers (`grafit_tf.serving.engine`): a shard's outputs depend on
its files, the model and the `Classifier` only.

`predictions.csv` has per embedded file (a row of `index.csv`): `path`, the
`label` read from its folder with `labels_from_dirs`, the `predicted` fine
label (`unknown` when the top-1 similarity is below the open-set threshold),
its vote `score`, then per neighbour j its gallery path, label and similarity.
"""

import dataclasses
import time

import numpy as np

from grafit_tf.serving import classify, embed, gallery as gallery_lib, open_set, outputs, report
from grafit_tf.serving import shards


UNKNOWN = "unknown"  # The predicted label below the open-set threshold.


class RunError(Exception):
    """The run failed after work started; finished shards stay. One-line message."""


@dataclasses.dataclass
class Classifier:
    """The gallery side of the kNN vote."""

    gallery: gallery_lib.Gallery
    k: int
    temperature: float
    searcher: object = None  # An `index.Searcher` (None: exact search).
    calibration: open_set.Calibration = None  # Open-set threshold (None: always a label).

    def predict(self, embeddings):
        """`(classify.Predictions, [Q] bool unknown)` of `[Q, D]` embeddings.

        Raises:
            RunError: non-finite scores.
        """
        preds = classify.predict(embeddings, self.gallery, self.k, self.temperature,
                                 self.searcher)
        if not (np.isfinite(preds.scores).all() and np.isfinite(preds.similarities).all()):
            raise RunError(f"the kNN vote gave non-finite scores (temperature "
                           f"{self.temperature}): check --temperature and the gallery.")
        unknown = np.zeros(len(embeddings), bool)
        if self.calibration is not None:
            c = self.calibration
            unknown = open_set.unknown_mask(
                open_set.scores(preds.similarities, preds.scores, c.score), c.threshold)
        return preds, unknown


@dataclasses.dataclass(frozen=True)
class Settings:
    """How files are decoded and embedded (`serve.py` documents each)."""

    batch_size: int = 256
    workers: int = 0
    max_image_pixels: int = None
    labels_from_dirs: bool = False


def error_rows(files, problems, failed):
    """`(path, reason)` rows, by path, of `walk.Problem`s and of the `(index into files,
    reason)` pairs of files that failed."""
    rows = [(p.relpath, p.reason) for p in problems] + [(files[i].relpath, r) for i, r in failed]
    return sorted(rows, key=lambda r: r[0])


def _prediction_rows(relpaths, preds, unknown, g, true_names):
    header = ["path"] + (["label"] if true_names is not None else []) + ["predicted", "score"]
    for j in range(1, preds.neighbours.shape[1] + 1):
        header += [f"neighbour_{j}", f"neighbour_{j}_label", f"similarity_{j}"]
    rows = []
    for r, path in enumerate(relpaths):
        row = [path] + ([true_names[r] or ""] if true_names is not None else [])
        row += [UNKNOWN if unknown[r] else g.label_names[preds.labels[r]],
                float(preds.scores[r])]
        for n, s in zip(preds.neighbours[r], preds.similarities[r]):
            row += [g.paths[n], g.label_names[g.labels[n]], float(s)]
        rows.append(row)
    return header, rows


def serve_shard(shard, embedder, classifier, settings, directory, reuse=None, progress=None):
    """Embeds (and classifies) `shard`'s files and publishes `directory/<shard name>/`.

    Args:
        shard: a `shards.Shard`.
        embedder: an `embedder.OnnxEmbedder`.
        classifier: a `Classifier`, or None (no predictions).
        settings: `Settings`.
        reuse: `{relpath: [D] embedding}` of files embedded earlier (`--retry_errors`
            decodes only the others).
        progress: optional `update(n)`-able.

    Returns:
        The shard's `shard.json` dict.

    Raises:
        RunError: the model or the vote failed; the shard is not published.
    """
    reuse = reuse or {}
    started = time.perf_counter()
    todo = [f for f in shard.files if f.relpath not in reuse]
    if progress is not None:
        progress.update(len(shard) - len(todo))
    try:
        result = embed.embed_files(embedder, [f.path for f in todo], settings.batch_size,
                                   settings.workers, settings.max_image_pixels, progress)
    except embed.ModelOutputError as e:
        raise RunError(f"the model failed: {e}") from None
    new = {todo[i].relpath: row for i, row in zip(result.ok, result.embeddings)}
    errors = error_rows(todo, shard.problems, result.errors)
    ok = [f for f in shard.files if f.relpath in reuse or f.relpath in new]
    rows = [reuse.get(f.relpath, new.get(f.relpath)) for f in ok]
    embeddings = (np.stack(rows) if rows else np.zeros((0, embedder.dim))).astype(np.float32)
    writer = shards.Writer(directory, shard.name)
    try:
        outputs.write_npy(writer.path("embeddings.npy"), embeddings)
        outputs.write_csv(writer.path("index.csv"), ("path", "size", "mtime"),
                          [(f.relpath, f.size, f.mtime_ns / 1e9) for f in ok])
        outputs.write_csv(writer.path("errors.csv"), ("path", "reason"), errors)
        value = dict(fingerprint=shard.fingerprint, entries=len(shard), embedded=len(ok),
                     errors=len(errors), seconds=time.perf_counter() - started)
        if classifier is not None:
            preds, unknown = classifier.predict(embeddings)
            g = classifier.gallery
            true = ([gallery_lib.label_of(f.relpath) for f in ok] if settings.labels_from_dirs
                    else None)
            header, rows = _prediction_rows([f.relpath for f in ok], preds, unknown, g, true)
            outputs.write_csv(writer.path("predictions.csv"), header, rows)
            value["unknown"] = int(unknown.sum())
            if true is not None:  # Counts, so the summary never re-reads finished shards.
                value["accuracy_counts"], value["unlabelled"] = report.count(
                    true, [r[2] for r in rows])
        outputs.write_json(writer.path("shard.json"), value)
        writer.publish()
    except BaseException:
        writer.discard()
        raise
    return value
