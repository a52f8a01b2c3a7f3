"""One `serve.py` run: embed a folder, optionally classify it against a gallery.

`run(options)` checks everything that can fail before any work, then embeds,
predicts and writes into `options.output`, published as a whole (see `outputs`):

- `embeddings.npy` `[N, D]` float32, row i = row i of `index.csv`;
- `index.csv` (`path`): embedded files, relative to `options.images`;
- `errors.csv` (`path`, `reason`): every other file under `options.images`;
- `predictions.csv` with a gallery: per row of `index.csv`, the predicted fine
  label, its vote share, and the top-k neighbours with similarities;
- `gallery_errors.csv` for a gallery folder: its files that were not embedded;
- `summary.json`: counts, throughput, providers, the export's parity verdict,
  and the accuracy with `labels_from_dirs`; written last, it marks the folder
  complete.
"""

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time

import numpy as np
from tqdm import tqdm

import grafit_tf
from grafit_tf.errors import UserError, check_writable
from grafit_tf.serving import classify, embed, gallery as gallery_lib, images, outputs, report, walk
from grafit_tf.serving.embedder import OnnxEmbedder, export_parity

OUTPUT_NAMES = ("embeddings.npy", "index.csv", "errors.csv", "predictions.csv",
                "gallery_errors.csv", "summary.json")
DEFAULT_TEMPERATURE = 0.07  # The training config's default eval_temperature.


class RunError(Exception):
    """The run failed after work started; nothing was published. One-line message."""


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """The settings of a run; `serve.py` documents each flag."""

    model: str
    images: str
    output: str
    gallery: str = ""
    save_gallery: str = ""
    k: int = 20
    temperature: float = 0.0  # 0: the training config's eval_temperature (else 0.07).
    labels_from_dirs: bool = False
    providers: str = ""
    batch_size: int = 256
    workers: int = None  # None: `thread_split`'s default.
    knn_backend: str = "auto"
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS
    intra_op_threads: int = 0  # 0: `thread_split`'s.
    progress: bool = True
    allow_failed_parity: bool = False


def thread_split(workers=None, cpus=None):
    """`(decoding workers, onnxruntime threads)` on `cpus` CPUs: workers default to none below
    4 CPUs (there they slowed onnxruntime more than they decoded: BENCHMARKS.md), else a
    quarter; onnxruntime gets the CPUs left (0, its own default, without workers)."""
    cpus = cpus or os.cpu_count() or 1
    workers = (0 if cpus < 4 else cpus // 4) if workers is None else workers
    return workers, max(1, cpus - workers) if workers else 0


def check_options(o):
    """Raises `UserError` for settings that cannot work, before anything is read."""
    if o.k < 1:
        raise UserError(f"--k={o.k}: use at least 1 neighbour.")
    if o.batch_size < 1:
        raise UserError(f"--batch_size={o.batch_size}: use at least 1.")
    if o.workers is not None and o.workers < 0:
        raise UserError(f"--workers={o.workers}: use 0 (decode in the main process) or more.")
    if not math.isfinite(o.temperature) or o.temperature < 0:
        raise UserError(f"--temperature={o.temperature}: must be a finite number > 0 (or 0: "
                        "the model's eval_temperature).")
    if o.intra_op_threads < 0:
        raise UserError(f"--intra_op_threads={o.intra_op_threads}: use 0 (onnxruntime's "
                        "default) or more.")
    if o.max_image_pixels < 1:
        raise UserError(f"--max_image_pixels={o.max_image_pixels}: must be positive.")
    if o.knn_backend not in classify.BACKENDS:
        raise UserError(f"--knn_backend={o.knn_backend!r}: choose one of "
                        f"{', '.join(classify.BACKENDS)}.")
    if o.labels_from_dirs and not o.gallery:
        raise UserError("--labels_from_dirs needs --gallery: accuracy is measured on the "
                        "gallery's kNN predictions.")
    if not os.path.isdir(o.images):
        raise UserError(f"--images={o.images}: no such directory.")
    if os.path.realpath(o.output) == os.path.realpath(o.images):
        raise UserError("--output must differ from --images (outputs would mix with inputs).")
    if os.path.exists(o.output) and not os.path.isdir(o.output):
        raise UserError(f"--output={o.output} exists and is not a directory.")
    if o.gallery and not os.path.exists(o.gallery):
        raise UserError(f"--gallery={o.gallery}: no such file or directory.")
    if o.save_gallery and not (o.gallery and os.path.isdir(o.gallery)):
        raise UserError("--save_gallery needs --gallery to be a labelled folder "
                        "(GALLERY/<fine label>/<image>) to embed.")
    if o.save_gallery and os.path.isdir(o.save_gallery):
        raise UserError(f"--save_gallery={o.save_gallery} is a directory; give a .npz file.")
    check_writable(o.output, "--output")
    if o.save_gallery:
        check_writable(os.path.dirname(os.path.abspath(o.save_gallery)), "--save_gallery")


def _list_folder(root, flag, output):
    """Walks a folder; `UserError` when it holds nothing at all."""
    files, problems = walk.walk(root, exclude=[output])
    if not files and not problems:
        raise UserError(f"--{flag}={root}: the directory is empty (no files under it).")
    return files, problems


def _embed(embedder, files, o, desc):
    with tqdm(total=len(files), desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr,
              disable=not o.progress) as bar:
        return embed.embed_files(embedder, [f.path for f in files], o.batch_size, o.workers,
                                 o.max_image_pixels, bar)


def _error_rows(files, problems, failed):
    rows = [(p.relpath, p.reason) for p in problems] + [(files[i].relpath, r) for i, r in failed]
    return sorted(rows, key=lambda r: r[0])


def _build_gallery(embedder, files, problems, o, out, log):
    """Embeds a labelled folder. Returns `(Gallery, error rows)`."""
    labelled = [f for f in files if gallery_lib.label_of(f.relpath) is not None]
    problems = problems + [walk.Problem(f.relpath, "not in a label folder (expected "
                                        "GALLERY/<fine label>/<image>)")
                           for f in files if gallery_lib.label_of(f.relpath) is None]
    result = _embed(embedder, labelled, o, "gallery")
    rows = _error_rows(labelled, problems, result.errors)
    out.write_csv("gallery_errors.csv", ("path", "reason"), rows)
    if not result.ok:
        first = f"{rows[0][0]}: {rows[0][1]}" if rows else "no files"
        raise UserError(f"--gallery={o.gallery}: none of its {len(rows)} files could be "
                        f"embedded (first: {first}).")
    g = gallery_lib.from_embedded(result.embeddings, [labelled[i].relpath for i in result.ok],
                                  embedder.sha256)
    log(f"gallery: {len(g)} images of {len(g.label_names)} labels from {o.gallery} "
        f"({len(rows)} not embedded, see gallery_errors.csv)")
    if o.save_gallery:
        gallery_lib.save(g, o.save_gallery)
        log(f"gallery saved to {o.save_gallery}")
    return g, rows


def resolve_temperature(o, embedder):
    """The kNN vote's temperature: `--temperature`, else the model's eval_temperature.

    Raises `UserError` when the model's value is not a finite number > 0.
    """
    if o.temperature:
        return float(o.temperature)
    value = embedder.config.get("eval_temperature", DEFAULT_TEMPERATURE)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value > 0)):
        raise UserError(f"--model={o.model}: its training_config has eval_temperature="
                        f"{value!r}, not a finite number > 0; pass --temperature=T (training's "
                        f"default is {DEFAULT_TEMPERATURE}).")
    return float(value)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM wait until the block ends; yields the list of those caught.

    The publish is a few renames: finishing it beats leaving it half done. Only
    the main thread can set handlers; elsewhere nothing is deferred.
    """
    caught = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda number, frame: caught.append(number))
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _prediction_rows(files, ok, preds, g, true_names):
    header = ["path"] + (["label"] if true_names is not None else []) + ["predicted", "score"]
    for j in range(1, preds.neighbours.shape[1] + 1):
        header += [f"neighbour_{j}", f"neighbour_{j}_label", f"similarity_{j}"]
    rows = []
    for r, i in enumerate(ok):
        row = [files[i].relpath]
        if true_names is not None:
            row.append(true_names[r] or "")
        row += [g.label_names[preds.labels[r]], float(preds.scores[r])]
        for n, s in zip(preds.neighbours[r], preds.similarities[r]):
            row += [g.paths[n], g.label_names[g.labels[n]], float(s)]
        rows.append(row)
    return header, rows


def run(o, log=print):
    """Runs `serve.py` with `ServeOptions` `o`; `log` prints one line (summary, warnings).

    Returns:
        The summary dict (also `summary.json`); `summary["embedded"]` counts the
        embedded query images.

    Raises:
        UserError: a setting, the model, a folder or the gallery is unusable
            (found before any image is decoded, but for a gallery folder none
            of whose images decodes).
        RunError: the run failed once work had started (nothing published).
    """
    check_options(o)
    workers, threads = thread_split(o.workers)
    o = dataclasses.replace(o, workers=workers, intra_op_threads=o.intra_op_threads or threads)
    parity = export_parity(o.model, o.allow_failed_parity)
    if parity == "failed":
        log(f"warning: --model={o.model}: its export failed the parity check (parity.json); "
            "served anyway (--allow_failed_parity).")
    embedder = OnnxEmbedder(o.model, o.providers, o.intra_op_threads)
    files, problems = _list_folder(o.images, "images", o.output)
    g = gallery_files = None
    if o.gallery and os.path.isdir(o.gallery):
        gallery_files = _list_folder(o.gallery, "gallery", o.output)
        if not any(gallery_lib.label_of(f.relpath) for f in gallery_files[0]):
            raise UserError(f"--gallery={o.gallery}: no file sits in a label folder; lay it "
                            "out as GALLERY/<fine label>/<image>.")
    elif o.gallery:
        g = gallery_lib.load(o.gallery)
        if g.dim != embedder.dim:
            raise UserError(f"--gallery={o.gallery}: embeddings of dimension {g.dim}, but the "
                            f"model --model={o.model} outputs {embedder.dim}; rebuild the gallery "
                            "with this model.")
        if g.model_sha256 and g.model_sha256 != embedder.sha256:
            log(f"warning: --gallery={o.gallery} was embedded with another model file; its "
                "neighbours are only meaningful if the two models are the same.")
    temperature = resolve_temperature(o, embedder) if o.gallery else None
    try:
        out = outputs.OutputDir(o.output, OUTPUT_NAMES)
    except outputs.OutputBusy:
        raise UserError(f"--output={o.output}: another serve.py run is writing into it; wait "
                        "for it to end or choose another folder.") from None
    except OSError as e:
        raise UserError(f"--output={o.output}: cannot create or write in it "
                        f"({e.strerror or e}).") from None
    log(f"model {o.model}: input {'x'.join(map(str, embedder.image_shape))} "
        f"(resize {embedder.resize}), {embedder.dim}-d embeddings, providers "
        f"{', '.join(embedder.providers)}")
    try:
        summary = _serve(embedder, files, problems, g, gallery_files, temperature, o, out, log)
        summary["export_parity"] = parity
        out.write_json("summary.json", summary)
        with _signals_deferred() as caught:
            out.commit(stale=OUTPUT_NAMES, last="summary.json")
    except embed.ModelOutputError as e:
        out.discard()
        raise RunError(f"--model={o.model}: {e}; nothing was published.") from None
    except BaseException:
        out.discard()
        raise
    if caught:
        log("warning: interrupted while publishing; the run had finished and its outputs "
            f"in {o.output} are complete.")
    return summary


def _serve(embedder, files, problems, g, gallery_files, temperature, o, out, log):
    started = time.perf_counter()
    gallery_errors = None
    if gallery_files is not None:
        g, gallery_errors = _build_gallery(embedder, *gallery_files, o, out, log)
    result = _embed(embedder, files, o, "embedding")
    errors = _error_rows(files, problems, result.errors)
    out.write_npy("embeddings.npy", result.embeddings)
    out.write_csv("index.csv", ("path",), [(files[i].relpath,) for i in result.ok])
    out.write_csv("errors.csv", ("path", "reason"), errors)
    summary = dict(version=grafit_tf.__version__, model=o.model, model_sha256=embedder.sha256,
                   providers=embedder.providers, images_dir=o.images,
                   files=len(files) + len(problems), embedded=len(result.ok), errors=len(errors),
                   embedding_dim=embedder.dim, embed_seconds=result.seconds,
                   images_per_second=result.images_per_second, batch_size=o.batch_size,
                   workers=o.workers)
    log(f"embedded {len(result.ok)} of {summary['files']} files in {result.seconds:.1f} s "
        f"({result.images_per_second:.0f} images/s); {len(errors)} in errors.csv")
    if g is not None:
        preds = classify.predict(result.embeddings, g, o.k, temperature, o.knn_backend)
        if not (np.isfinite(preds.scores).all() and np.isfinite(preds.similarities).all()):
            raise RunError(f"the kNN vote gave non-finite scores (temperature {temperature}); "
                           "nothing was published: check --temperature and the gallery.")
        true_names = ([gallery_lib.label_of(files[i].relpath) for i in result.ok]
                      if o.labels_from_dirs else None)
        header, rows = _prediction_rows(files, result.ok, preds, g, true_names)
        out.write_csv("predictions.csv", header, rows)
        summary["gallery"] = {"source": o.gallery, "images": len(g), "labels": list(g.label_names),
                              "errors": None if gallery_errors is None else len(gallery_errors)}
        summary.update(k=int(min(o.k, len(g))), temperature=temperature)
        if true_names is not None:
            predicted = [g.label_names[p] for p in preds.labels]
            summary["accuracy"] = acc = report.accuracy(true_names, predicted, g.label_names)
            if acc["images"]:
                log(report.format_accuracy(acc))
                log(f"fine-level accuracy: {100 * acc['accuracy']:.2f}% "
                    f"({acc['correct']} / {acc['images']}, k={summary['k']})")
            if acc["labels_not_in_gallery"]:
                log(f"warning: query labels absent from the gallery: "
                    f"{', '.join(acc['labels_not_in_gallery'])}")
    summary["total_seconds"] = time.perf_counter() - started
    return summary
