"""A labelled gallery of embeddings: built from `G/<fine label>/<image>`, or a saved `.npz`.

The `.npz` holds plain arrays only, read with `allow_pickle=False`: `embeddings`
`[G, D]` float32 (L2-normalised), `labels` `[G]` int32 (indices into
`label_names` `[L]` str), `paths` `[G]` str (relative to the gallery folder),
`model_sha256` `[]` str (the model file that embedded them), `format_version` `[]` int.

Version 2 adds an optional open-set calibration (`open_set.Calibration`), all of these
or none, scalars: `calibration_threshold` float (+inf: no score reached the target),
`calibration_target_precision`, `calibration_precision`, `calibration_kept`,
`calibration_temperature` float, `calibration_k`, `calibration_queries` int,
`calibration_score` str. Version-1 files load, without a calibration.
"""

import dataclasses
import math
import os

import numpy as np

from grafit_tf.errors import UserError
from grafit_tf.serving import open_set
from grafit_tf.serving.embedder import NORM_TOLERANCE

FORMAT_VERSION = 2
_KEYS = ("embeddings", "labels", "label_names", "paths", "model_sha256", "format_version")
# The `open_set.Calibration` fields, saved as scalars "calibration_<name>" of these types.
_CALIBRATION = {"threshold": float, "target_precision": float, "precision": float,
                "kept": float, "k": int, "temperature": float, "queries": int, "score": str}
_DTYPES = {float: np.float64, int: np.int64, str: str}


@dataclasses.dataclass(frozen=True)
class Gallery:
    """Labelled embeddings: the `.npz` arrays, with names and paths as tuples of str."""

    embeddings: np.ndarray
    labels: np.ndarray
    label_names: tuple
    paths: tuple
    model_sha256: str = ""  # '' when unknown.
    calibration: open_set.Calibration = None  # None when not calibrated (or version 1).

    def __len__(self):
        return len(self.labels)

    @property
    def dim(self):
        return int(self.embeddings.shape[1])


def label_of(relpath):
    """The label folder of a path relative to a labelled root (None at the top level)."""
    parts = relpath.split(os.sep)
    return parts[0] if len(parts) > 1 else None


def from_embedded(embeddings, relpaths, model_sha256=""):
    """A gallery of `[G, D]` embeddings of `G` files, `relpaths` under label folders."""
    names = [label_of(p) for p in relpaths]
    if any(n is None for n in names):
        raise ValueError("gallery images must sit in label folders")
    label_names = tuple(sorted(set(names)))
    index = {n: i for i, n in enumerate(label_names)}
    return Gallery(np.asarray(embeddings, np.float32),
                   np.asarray([index[n] for n in names], np.int32),
                   label_names, tuple(relpaths), model_sha256)


def save(gallery, path):
    """Writes the gallery to `path` (.npz), atomically (temporary name, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        cal = gallery.calibration
        extra = {} if cal is None else {
            f"calibration_{name}": np.asarray(getattr(cal, name), dtype=_DTYPES[kind])
            for name, kind in _CALIBRATION.items()}
        with open(tmp, "wb") as f:  # A file object: np.savez would append '.npz' to a name.
            np.savez(f, embeddings=gallery.embeddings.astype(np.float32),
                     labels=gallery.labels.astype(np.int32),
                     label_names=np.asarray(gallery.label_names, dtype=str),
                     paths=np.asarray(gallery.paths, dtype=str),
                     model_sha256=np.asarray(gallery.model_sha256, dtype=str),
                     format_version=np.asarray(FORMAT_VERSION, np.int32), **extra)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _scalar(path, values, key, kind, what):
    value = values[key]
    if value.shape != () or value.dtype.kind not in kind:
        raise UserError(f"--gallery={path}: '{key}' is {value.dtype} of shape "
                        f"{list(value.shape)}, not {what}; rebuild the gallery with "
                        "--save_gallery.")
    return value[()]


def _check_arrays(path, values):
    """Raises `UserError` unless the arrays of a gallery .npz are of its format and usable."""
    version = _scalar(path, values, "format_version", "iu", "an integer scalar")
    if version > FORMAT_VERSION or version < 1:
        raise UserError(f"--gallery={path}: format version {int(version)} is not one this "
                        f"grafit_tf reads (1 to {FORMAT_VERSION}); upgrade or rebuild the gallery.")
    _scalar(path, values, "model_sha256", "U", "a string scalar")
    emb, labels, names, paths = (values[k] for k in _KEYS[:4])
    rebuild = "rebuild the gallery with --save_gallery"
    if emb.ndim != 2 or emb.dtype.kind != "f" or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise UserError(f"--gallery={path}: embeddings are {emb.dtype} of shape "
                        f"{list(emb.shape)}, not a non-empty float [G, D]; {rebuild}.")
    if (labels.dtype.kind not in "iu" or labels.shape != (len(emb),)
            or names.dtype.kind != "U" or names.ndim != 1 or len(names) == 0
            or paths.dtype.kind != "U" or paths.shape != (len(emb),)):
        raise UserError(f"--gallery={path}: inconsistent arrays (embeddings "
                        f"{list(emb.shape)}, labels {labels.dtype} {list(labels.shape)}, "
                        f"label_names {names.dtype} {list(names.shape)}, paths {paths.dtype} "
                        f"{list(paths.shape)}): one integer label and one path (text) per "
                        f"row, label names as text; {rebuild}.")
    if labels.min() < 0 or labels.max() >= len(names) or len(set(names.tolist())) != len(names):
        raise UserError(f"--gallery={path}: labels outside 0..{len(names) - 1} or repeated "
                        f"label names; {rebuild}.")
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        raise UserError(f"--gallery={path}: {int((~finite).sum())} of its {len(emb)} "
                        f"embeddings are not finite (NaN or infinity; first: row "
                        f"{int(np.argmin(finite))}); {rebuild}.")
    norms = np.linalg.norm(emb.astype(np.float64), axis=1)
    off = np.abs(norms - 1.0) > NORM_TOLERANCE
    if off.any():
        row = int(np.argmax(off))
        raise UserError(f"--gallery={path}: {int(off.sum())} of its {len(emb)} embeddings "
                        f"are not of unit norm (row {row}: {norms[row]:.4g}); a gallery holds "
                        f"L2-normalised embeddings: {rebuild}.")


def _calibration(path, values):
    """The saved `open_set.Calibration`, or None when there is none.

    Raises:
        UserError: some of its arrays missing, of another kind, or out of range.
    """
    keys = [f"calibration_{name}" for name in _CALIBRATION]
    missing = [k for k in keys if k not in values]
    if len(missing) == len(keys):
        return None
    if missing:
        raise UserError(f"--gallery={path}: a partial calibration (missing "
                        f"{', '.join(missing)}); rebuild the gallery with --save_gallery.")
    fields = {}
    for name, kind in _CALIBRATION.items():
        dtype, what = {float: ("f", "a float scalar"), int: ("iu", "an integer scalar"),
                       str: ("U", "a string scalar")}[kind]
        fields[name] = kind(_scalar(path, values, f"calibration_{name}", dtype, what))
    cal = open_set.Calibration(**fields)
    checks = (("threshold", not (math.isnan(cal.threshold) or cal.threshold == -math.inf),
               "a number or +inf"),
              ("target_precision", 0 < cal.target_precision <= 1, "in (0, 1]"),
              ("precision", 0 <= cal.precision <= 1, "in [0, 1]"),
              ("kept", 0 <= cal.kept <= 1, "in [0, 1]"), ("k", cal.k >= 1, "1 or more"),
              ("queries", cal.queries >= 1, "1 or more"),
              ("temperature", math.isfinite(cal.temperature) and cal.temperature > 0,
               "a finite number > 0"),
              ("score", cal.score in open_set.SCORES, f"one of {', '.join(open_set.SCORES)}"))
    for name, ok, what in checks:
        if not ok:
            raise UserError(f"--gallery={path}: calibration_{name} is {getattr(cal, name)!r}, "
                            f"not {what}; rebuild the gallery with --save_gallery.")
    return cal


def load(path):
    """Reads a gallery written by `save`.

    Raises:
        UserError: missing, not an .npz of this format, or inconsistent.
    """
    if not os.path.isfile(path):
        raise UserError(f"--gallery={path}: no such file or directory.")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in _KEYS if k not in data.files]
            wanted = _KEYS + tuple(f"calibration_{name}" for name in _CALIBRATION)
            values = None if missing else {k: data[k] for k in wanted if k in data.files}
    except Exception as e:  # Not a zip, a damaged member, arrays that need pickle...
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"--gallery={path}: cannot read it as a gallery .npz ({reason}); "
                        "write one with --save_gallery.") from None
    if missing:
        raise UserError(f"--gallery={path}: not a gallery .npz (missing "
                        f"{', '.join(missing)}); write one with --save_gallery.")
    _check_arrays(path, values)
    # Version 1 had no calibration: any such arrays there are not this format's.
    calibration = _calibration(path, values) if values["format_version"] >= 2 else None
    return Gallery(values["embeddings"].astype(np.float32), values["labels"].astype(np.int32),
                   tuple(map(str, values["label_names"])), tuple(map(str, values["paths"])),
                   str(values["model_sha256"]), calibration)
