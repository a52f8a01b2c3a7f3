"""A labelled gallery of embeddings: built from `G/<fine label>/<image>`, or a saved `.npz`.

The `.npz` holds plain arrays only (no pickled objects), so it is read with
`allow_pickle=False`:

- `embeddings` `[G, D]` float32, L2-normalised;
- `labels` `[G]` int32, indices into `label_names`;
- `label_names` `[L]` str;
- `paths` `[G]` str, relative to the gallery folder;
- `model_sha256` `[]` str, the model file the embeddings came from;
- `format_version` `[]` int.
"""

import dataclasses
import os

import numpy as np

from grafit_tf.errors import UserError

FORMAT_VERSION = 1
_KEYS = ("embeddings", "labels", "label_names", "paths", "model_sha256", "format_version")


@dataclasses.dataclass(frozen=True)
class Gallery:
    """Labelled embeddings.

    Attributes:
        embeddings: `[G, D]` float32.
        labels: `[G]` int32 indices into `label_names`.
        label_names: tuple of str.
        paths: tuple of str, one per row.
        model_sha256: digest of the model that embedded them ('' if unknown).
    """

    embeddings: np.ndarray
    labels: np.ndarray
    label_names: tuple
    paths: tuple
    model_sha256: str = ""

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
    """Builds a gallery from embedded files of a labelled folder.

    Args:
        embeddings: `[G, D]` float32.
        relpaths: `G` paths relative to the gallery root, each under a label folder.
        model_sha256: digest of the model.
    """
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
            if missing:
                raise UserError(f"--gallery={path}: not a gallery .npz (missing "
                                f"{', '.join(missing)}); write one with --save_gallery.")
            values = {k: data[k] for k in _KEYS}
    except UserError:
        raise
    except (OSError, ValueError) as e:  # Not a zip, or arrays that need pickle.
        raise UserError(f"--gallery={path}: cannot read it as a gallery .npz ({e}).") from None
    if int(values["format_version"]) > FORMAT_VERSION:
        raise UserError(f"--gallery={path}: format version {int(values['format_version'])} "
                        "is newer than this grafit_tf; upgrade or rebuild the gallery.")
    emb, labels, names = values["embeddings"], values["labels"], values["label_names"]
    if (emb.ndim != 2 or labels.shape != (len(emb),) or values["paths"].shape != (len(emb),)
            or len(emb) == 0 or labels.min() < 0 or labels.max() >= len(names)):
        raise UserError(f"--gallery={path}: inconsistent arrays (embeddings {emb.shape}, "
                        f"labels {labels.shape}, {len(names)} label names).")
    return Gallery(emb.astype(np.float32), labels.astype(np.int32),
                   tuple(str(n) for n in names), tuple(str(p) for p in values["paths"]),
                   str(values["model_sha256"]))
