"""A labelled gallery of embeddings: built from `G/<fine label>/<image>`, or a saved `.npz`.

The `.npz` holds plain arrays only, read with `allow_pickle=False`: `embeddings`
`[G, D]` float32 (L2-normalised), `labels` `[G]` int32 (indices into
`label_names` `[L]` str), `paths` `[G]` str (relative to the gallery folder),
`model_sha256` `[]` str (the model file that embedded them), `format_version` `[]` int.
"""

import dataclasses
import os

import numpy as np

from grafit_tf.errors import UserError
from grafit_tf.serving.embedder import NORM_TOLERANCE

FORMAT_VERSION = 1
_KEYS = ("embeddings", "labels", "label_names", "paths", "model_sha256", "format_version")


@dataclasses.dataclass(frozen=True)
class Gallery:
    """Labelled embeddings: the `.npz` arrays, with names and paths as tuples of str."""

    embeddings: np.ndarray
    labels: np.ndarray
    label_names: tuple
    paths: tuple
    model_sha256: str = ""  # '' when unknown.

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
        with open(tmp, "wb") as f:  # A file object: np.savez would append '.npz' to a name.
            np.savez(f, embeddings=gallery.embeddings.astype(np.float32),
                     labels=gallery.labels.astype(np.int32),
                     label_names=np.asarray(gallery.label_names, dtype=str),
                     paths=np.asarray(gallery.paths, dtype=str),
                     model_sha256=np.asarray(gallery.model_sha256, dtype=str),
                     format_version=np.asarray(FORMAT_VERSION, np.int32))
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
            values = None if missing else {k: data[k] for k in _KEYS}
    except Exception as e:  # Not a zip, a damaged member, arrays that need pickle...
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"--gallery={path}: cannot read it as a gallery .npz ({reason}); "
                        "write one with --save_gallery.") from None
    if missing:
        raise UserError(f"--gallery={path}: not a gallery .npz (missing "
                        f"{', '.join(missing)}); write one with --save_gallery.")
    _check_arrays(path, values)
    return Gallery(values["embeddings"].astype(np.float32), values["labels"].astype(np.int32),
                   tuple(map(str, values["label_names"])), tuple(map(str, values["paths"])),
                   str(values["model_sha256"]))
