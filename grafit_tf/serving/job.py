"""One `serve.py` run: embed a folder in shards, optionally classify it against a gallery.

`run(options)` checks everything that can fail before any work, then serves
the shards that are not finished yet into `options.output`:

- `shard-<i>/`: a whole shard each, published as it ends (`shards`, `work`);
- `manifest.json`: the run's settings and shard plan, written before any shard;
  a rerun with other settings is refused, so shards of two runs never mix;
- `gallery_errors.csv` for a gallery folder: its files that were not embedded;
- `summary.json`: counts, throughput, providers, the export's parity verdict
  and the accuracy with `labels_from_dirs`; written last, it marks the run
  finished (`shards.read` reads such a folder in one call).

A rerun of the same command keeps the finished shards whose files did not
change and serves the rest; `retry_errors` also decodes again the files that
finished shards list as errors.
"""

import contextlib
import dataclasses
import hashlib
import json
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
from grafit_tf.serving import embed, engine, gallery as gallery_lib, images, index as index_lib
from grafit_tf.serving import open_set, outputs, report, shards, walk, work
from grafit_tf.serving.embedder import OnnxEmbedder, export_parity
from grafit_tf.serving.work import RunError

# Every top-level name a run (of this or an earlier version) may write there.
OUTPUT_NAMES = ("manifest.json", "gallery_errors.csv", "summary.json", "embeddings.npy",
                "index.csv", "errors.csv", "predictions.csv")
MANIFEST_VERSION = 1
DEFAULT_TEMPERATURE = 0.07  # The training config's default eval_temperature.
DEFAULT_SHARD_SIZE = 100_000


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
    index: str = "auto"  # Gallery search: `index.KINDS`.
    index_memory: str = index_lib.DEFAULT_MEMORY
    unknown_precision: float = 0.0  # 0: off; else the open-set threshold's target precision.
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS
    intra_op_threads: int = 0  # 0: `thread_split`'s.
    progress: bool = True
    allow_failed_parity: bool = False
    shard_size: int = DEFAULT_SHARD_SIZE
    retry_errors: bool = False
    engine: str = "local"  # 'local' (this process) or 'ray' (`grafit_tf.serving.engine`).
    ray_address: str = ""  # '' starts a local Ray cluster of `engine_workers` processes.
    engine_workers: int = 2


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
    if o.engine not in ("local", "ray"):
        raise UserError(f"--engine={o.engine!r}: choose local or ray.")
    if o.engine_workers < 1:
        raise UserError(f"--engine_workers={o.engine_workers}: use at least 1.")
    if o.shard_size < 1:
        raise UserError(f"--shard_size={o.shard_size}: use at least 1 image per shard.")
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
    if o.index not in index_lib.KINDS:
        raise UserError(f"--index={o.index!r}: choose one of {', '.join(index_lib.KINDS)}.")
    try:
        index_lib.parse_memory(o.index_memory)
    except UserError as e:
        raise UserError(f"--index_memory: {e}") from None
    if not (o.unknown_precision == 0 or 0 < o.unknown_precision <= 1):
        raise UserError(f"--unknown_precision={o.unknown_precision}: use a precision in (0, 1] "
                        "(e.g. 0.95), or 0 to always name a gallery label.")
    if o.unknown_precision and not o.gallery:
        raise UserError("--unknown_precision needs --gallery: the threshold is calibrated on "
                        "the gallery.")
    if o.labels_from_dirs and not o.gallery:
        raise UserError("--labels_from_dirs needs --gallery: accuracy is measured on the "
                        "gallery's kNN predictions.")
    if not os.path.exists(o.images):
        raise UserError(f"--images={o.images}: no such directory or file list.")
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
    """Walks a folder or reads a file list; `UserError` when it names nothing at all."""
    files, problems = (walk.walk(root, exclude=[output]) if os.path.isdir(root)
                       else walk.listed(root))
    if not files and not problems:
        raise UserError(f"--{flag}={root}: " + ("the directory is empty (no files under it)."
                        if os.path.isdir(root) else "the list names no file."))
    return files, problems


def _bar(o, total, desc):
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr,
                disable=not o.progress)


def _build_gallery(embedder, files, problems, o, out, log):
    """Embeds a labelled folder. Returns `(Gallery, error rows)`."""
    labelled = [f for f in files if gallery_lib.label_of(f.relpath) is not None]
    problems = problems + [walk.Problem(f.relpath, "not in a label folder (expected "
                                        "GALLERY/<fine label>/<image>)")
                           for f in files if gallery_lib.label_of(f.relpath) is None]
    with _bar(o, len(labelled), "gallery") as bar:
        result = embed.embed_files(embedder, [f.path for f in labelled], o.batch_size, o.workers,
                                   o.max_image_pixels, bar)
    rows = work.error_rows(labelled, problems, result.errors)
    out.write_csv("gallery_errors.csv", ("path", "reason"), rows)
    if not result.ok:
        first = f"{rows[0][0]}: {rows[0][1]}" if rows else "no files"
        raise UserError(f"--gallery={o.gallery}: none of its {len(rows)} files could be "
                        f"embedded (first: {first}).")
    g = gallery_lib.from_embedded(result.embeddings, [labelled[i].relpath for i in result.ok],
                                  embedder.sha256)
    log(f"gallery: {len(g)} images of {len(g.label_names)} labels from {o.gallery} "
        f"({len(rows)} not embedded, see gallery_errors.csv)")
    return g, rows


def _classifier(g, o, temperature, log):
    """The gallery side of the vote: its index and, with `unknown_precision`, its threshold.

    The index is kept beside the gallery's `.npz` (`--gallery` or `--save_gallery`), and
    the threshold in it, so that a later run reuses both.
    """
    npz = o.save_gallery or (o.gallery if not os.path.isdir(o.gallery) else "")
    searcher = index_lib.prepare(g.embeddings, o.index, o.index_memory,
                                 index_lib.index_path(npz) if npz else None, log)
    calibration, save = g.calibration, bool(o.save_gallery)
    if o.unknown_precision and not (calibration and calibration.matches(
            o.unknown_precision, o.k, temperature)):
        calibration = open_set.calibrate(g.embeddings, g.labels, len(g.label_names),
                                         o.unknown_precision, o.k, temperature, searcher.search)
        g, save = dataclasses.replace(g, calibration=calibration), True
        log(f"open set: a top-1 similarity below {calibration.threshold:.4f} is unknown "
            f"(precision {calibration.precision:.4f} on {calibration.queries} leave-one-out "
            f"gallery votes, target {o.unknown_precision:g})")
    if o.unknown_precision and calibration.warning():
        log(f"warning: {calibration.warning()}")
    if save and npz:
        try:
            gallery_lib.save(g, npz)
            log(f"gallery saved to {npz}")
        except OSError as e:  # A read-only gallery: calibrated again next time.
            log(f"warning: cannot save the gallery to {npz} ({e.strerror or e}).")
    return work.Classifier(g, o.k, temperature, searcher,
                           calibration if o.unknown_precision else None)


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


def _gallery_identity(g, gallery_files):
    """What the predictions depend on in the gallery: its files, or the .npz's arrays
    (not its bytes: a saved calibration changes those)."""
    if gallery_files is not None:
        entries = sorted(gallery_files[0] + gallery_files[1], key=lambda e: e.relpath)
        return "folder:" + shards.fingerprint(entries)
    if g is None:
        return None
    digest = hashlib.sha256()
    for part in (g.embeddings, g.labels, "\n".join(g.label_names), "\n".join(g.paths)):
        digest.update(part.tobytes() if isinstance(part, np.ndarray) else part.encode())
    return "npz:" + digest.hexdigest()


def _check_manifest(out, o, run_key):
    """Refuses an output folder that holds another run's results (see the module docstring)."""
    try:
        with open(out.path("manifest.json"), encoding="utf-8") as f:
            earlier = json.load(f).get("run")
    except FileNotFoundError:
        earlier = None
    except (OSError, ValueError, AttributeError):
        earlier = "unreadable"
    if earlier is None:
        if not (set(OUTPUT_NAMES) & set(os.listdir(o.output)) or shards.published(o.output)):
            return
        differs = "written by an earlier version of serve.py"
    elif earlier == run_key:
        return
    elif not isinstance(earlier, dict):
        differs = "its manifest.json is unreadable"
    else:
        differs = "other " + ", ".join(sorted(k for k in run_key if earlier.get(k) != run_key[k]))
    raise UserError(f"--output={o.output} holds the results of another run ({differs}); "
                    "remove it or choose another folder (a rerun of the same command goes on "
                    "where it stopped).")


def _reuse(directory, shard):
    """`{relpath: embedding}` of a finished shard, for `retry_errors`; None when no listed
    error is a file that can be decoded again."""
    _, errors = shards.read_csv(os.path.join(directory, shard.name, "errors.csv"))
    if not {row[0] for row in errors} & {f.relpath for f in shard.files}:
        return None
    _, index = shards.read_csv(os.path.join(directory, shard.name, "index.csv"))
    embeddings = np.load(os.path.join(directory, shard.name, "embeddings.npy"))
    return {row[0]: e for row, e in zip(index, embeddings)}


def run(o, log=print):
    """Runs `serve.py` with `ServeOptions` `o`; `log` prints one line (summary, warnings).

    Returns:
        The summary dict (also `summary.json`); `summary["embedded"]` counts the
        embedded query images.

    Raises:
        UserError: a setting, the model, a folder or the gallery is unusable, or
            the output folder holds another run (found before any image is
            decoded, but for a gallery folder none of whose images decodes).
        RunError: the run failed once work had started (finished shards stay;
            no summary.json).
    """
    check_options(o)
    workers, threads = thread_split(o.workers)
    o = dataclasses.replace(o, workers=workers, intra_op_threads=o.intra_op_threads or threads)
    parity = export_parity(o.model, o.allow_failed_parity)
    if parity == "failed":
        log(f"warning: --model={o.model}: its export failed the parity check (the report "
            "beside it); served anyway (--allow_failed_parity).")
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
    names = (g.label_names if g is not None else [gallery_lib.label_of(f.relpath) for f in
                                                  gallery_files[0]] if gallery_files else [])
    if o.unknown_precision and work.UNKNOWN in names:
        raise UserError(f"--gallery={o.gallery} has a label named {work.UNKNOWN!r}, the word "
                        "predictions.csv gives below the open-set threshold; rename that label.")
    temperature = resolve_temperature(o, embedder) if o.gallery else None
    run_key = dict(images=os.path.realpath(o.images), model_sha256=embedder.sha256,
                   gallery=_gallery_identity(g, gallery_files), k=o.k, temperature=temperature,
                   labels_from_dirs=o.labels_from_dirs, max_image_pixels=o.max_image_pixels,
                   shard_size=o.shard_size, index=o.index, index_memory=o.index_memory,
                   unknown_precision=o.unknown_precision)
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
        _check_manifest(out, o, run_key)
        summary = _serve(embedder, files, problems, g, gallery_files, temperature, o, out,
                         run_key, log)
        summary["export_parity"] = parity
        out.write_json("summary.json", summary)
        with _signals_deferred() as caught:
            out.commit(stale=[n for n in OUTPUT_NAMES if n != "manifest.json"],
                       last="summary.json")
    except RunError as e:
        out.discard()
        raise RunError(f"--model={o.model}: {e}; the finished shards stay in {o.output}, "
                       "without summary.json.") from None
    except BaseException:
        out.discard()
        raise
    if caught:
        log("warning: interrupted while publishing; the run had finished and its outputs "
            f"in {o.output} are complete.")
    return summary


def _serve(embedder, files, problems, g, gallery_files, temperature, o, out, run_key, log):
    started = time.perf_counter()
    plan = shards.plan(files, problems, o.shard_size)
    gallery_errors = None
    if gallery_files is not None:  # A gallery none of whose images embeds: nothing written.
        g, gallery_errors = _build_gallery(embedder, *gallery_files, o, out, log)
    classifier = None if g is None else _classifier(g, o, temperature, log)
    if os.path.lexists(out.path("summary.json")):  # Unfinished until the new one is in.
        os.remove(out.path("summary.json"))
    out.publish_json("manifest.json", dict(format_version=MANIFEST_VERSION, run=run_key,
                                           shards=[[s.name, s.fingerprint, len(s)]
                                                   for s in plan]))
    settings = work.Settings(o.batch_size, o.workers, o.max_image_pixels, o.labels_from_dirs)
    done, todo = {}, []
    for shard in plan:
        value = shards.stats(o.output, shard.name)
        if value is None or value.get("fingerprint") != shard.fingerprint:
            todo.append((shard, None))
        elif o.retry_errors and value["errors"] and (reuse := _reuse(o.output, shard)):
            todo.append((shard, reuse))
        else:
            done[shard.name] = value
    if done:
        log(f"{len(done)} of {len(plan)} shards already finished in {o.output}; serving the "
            f"other {len(todo)}")
    served = sum(len(s) - len(reuse or ()) for s, reuse in todo)  # Entries read now.
    if o.engine == "ray" and todo:
        done.update(engine.serve_shards(todo, o.model, o.providers, classifier, settings,
                                        o.output, o.ray_address, o.engine_workers, log))
    else:
        with _bar(o, served, "embedding") as bar:
            for shard, reuse in todo:
                done[shard.name] = work.serve_shard(shard, embedder, classifier, settings,
                                                    o.output, reuse, bar)
    for name in shards.published(o.output):
        if name not in done:  # Shards of files that are gone.
            shards.remove(o.output, name)
    seconds = time.perf_counter() - started
    return _summary(plan, done, embedder, classifier, gallery_errors, o, seconds, served, log)


def _summary(plan, done, embedder, classifier, gallery_errors, o, seconds, served, log):
    values = [done[s.name] for s in plan]
    count = lambda key: sum(v[key] for v in values)  # noqa: E731
    summary = dict(version=grafit_tf.__version__, model=o.model, model_sha256=embedder.sha256,
                   providers=embedder.providers, images_dir=o.images, files=count("entries"),
                   embedded=count("embedded"), errors=count("errors"),
                   embedding_dim=embedder.dim, shards=len(plan), shard_size=o.shard_size,
                   served_now=served, embed_seconds=seconds,
                   images_per_second=served / max(seconds, 1e-9),
                   batch_size=o.batch_size, workers=o.workers, total_seconds=seconds)
    log(f"embedded {summary['embedded']} of {summary['files']} files in {len(plan)} shards "
        f"({served} served now in {seconds:.1f} s, {summary['images_per_second']:.0f} "
        f"images/s); {summary['errors']} in the shards' errors.csv")
    if classifier is None:
        return summary
    g = classifier.gallery
    summary["gallery"] = {"source": o.gallery, "images": len(g), "labels": list(g.label_names),
                          "errors": None if gallery_errors is None else len(gallery_errors)}
    summary.update(k=int(min(o.k, len(g))), temperature=classifier.temperature,
                   index=classifier.searcher.describe())
    if classifier.calibration is not None:
        c = dataclasses.asdict(classifier.calibration)
        c["threshold"] = c["threshold"] if math.isfinite(c["threshold"]) else None  # JSON.
        summary.update(calibration=c, unknown=count("unknown"))
        log(f"unknown: {summary['unknown']} of {summary['embedded']} images (top-1 similarity "
            f"below the threshold)")
    if o.labels_from_dirs:
        counts = report.merge((v["accuracy_counts"], v["unlabelled"]) for v in values)
        summary["accuracy"] = acc = report.from_counts(*counts, g.label_names)
        if acc["images"]:
            log(report.format_accuracy(acc))
            log(f"fine-level accuracy: {100 * acc['accuracy']:.2f}% "
                f"({acc['correct']} / {acc['images']}, k={summary['k']})")
        if acc["labels_not_in_gallery"]:
            log(f"warning: query labels absent from the gallery: "
                f"{', '.join(acc['labels_not_in_gallery'])}")
    return summary
