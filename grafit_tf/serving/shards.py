"""A run's output in shards: planned from the file list, published whole, read back as one.

The files to serve (and the entries that cannot be, `walk.Problem`s), sorted
by path, are cut into shards of `shard_size` entries. Shard i is the folder
`OUT/shard-<i>/`, with its rows in path order:

- `embeddings.npy` `[n, D]` float32, row j = row j of `index.csv`;
- `index.csv` (`path`, `size`, `mtime`): the embedded files (bytes, seconds);
- `errors.csv` (`path`, `reason`): its other entries;
- `predictions.csv` with a gallery (see `grafit_tf.serving.work`);
- `shard.json`: its fingerprint and counts.

A shard is written into a staging folder and renamed into place, so `OUT`
only ever holds whole shards. Its fingerprint hashes its entries' paths, sizes
and modification times: a rerun keeps the shards whose fingerprint still
matches and redoes the others. `read(OUT)` joins a finished run's shards.
"""

import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil

import numpy as np

from grafit_tf.serving import outputs, walk

PREFIX = "shard-"
NAME = re.compile(r"shard-(\d{5,})")


@dataclasses.dataclass(frozen=True)
class Shard:
    """One shard of the plan: `walk.File`s to embed and `walk.Problem`s to report."""

    number: int
    files: tuple
    problems: tuple
    fingerprint: str

    @property
    def name(self):
        return f"{PREFIX}{self.number:05d}"

    def __len__(self):
        return len(self.files) + len(self.problems)


def fingerprint(entries):
    """sha256 of `walk.File`s (path, size, mtime) and `walk.Problem`s (path, reason)."""
    digest = hashlib.sha256()
    for e in entries:
        digest.update(f"{e.relpath}\0{getattr(e, 'size', None)}\0"
                      f"{getattr(e, 'mtime_ns', None)}\0{getattr(e, 'reason', '')}\n"
                      .encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def plan(files, problems, shard_size):
    """Cuts the entries, sorted by path, into `Shard`s of `shard_size` (the last one shorter)."""
    entries = sorted(list(files) + list(problems), key=lambda e: e.relpath)
    shards = []
    for number, start in enumerate(range(0, len(entries), shard_size)):
        part = entries[start:start + shard_size]
        shards.append(Shard(number, tuple(e for e in part if isinstance(e, walk.File)),
                            tuple(e for e in part if not isinstance(e, walk.File)),
                            fingerprint(part)))
    return shards


def stats(directory, name):
    """The `shard.json` of a published shard folder, or None when it is not a whole shard."""
    try:
        with open(os.path.join(directory, name, "shard.json"), encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def published(directory):
    """Names of the shard folders in `directory`, sorted."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if NAME.fullmatch(n)
                  and os.path.isdir(os.path.join(directory, n)))


class Writer:
    """Stages the files of shard `name` of `directory`; `publish()` renames the folder in.

    Works from any process (an engine's worker too): its staging folder is
    per process, and `outputs.OutputDir` removes those that killed runs left.
    """

    def __init__(self, directory, name):
        self.directory, self.name = directory, name
        # Not `OutputDir`'s staging folder (same prefix, so cleaned up alike): this one is
        # removed once empty.
        self.root = os.path.join(directory, f"{outputs.STAGING_PREFIX}{os.getpid()}.shards")
        self.staging = os.path.join(self.root, name)
        shutil.rmtree(self.staging, ignore_errors=True)
        os.makedirs(self.staging)

    def path(self, name):
        return os.path.join(self.staging, name)

    def discard(self):
        """Removes the staged files (a failed or interrupted shard)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        try:
            os.rmdir(self.root)
        except OSError:
            pass

    def publish(self):
        """Replaces `directory/name` with the staged folder (a rename or two)."""
        outputs.fsync_dir(self.staging)
        final = os.path.join(self.directory, self.name)
        old = os.path.join(self.directory, f"{outputs.OLD_PREFIX}{os.getpid()}", self.name)
        if os.path.lexists(final):  # Redone: a kill from here on leaves it missing, not mixed.
            os.makedirs(os.path.dirname(old), exist_ok=True)
            shutil.rmtree(old, ignore_errors=True)
            outputs.rename(final, old)
        outputs.rename(self.staging, final)
        outputs.fsync_dir(self.directory)
        shutil.rmtree(old, ignore_errors=True)
        for folder in (os.path.dirname(old), self.root):
            try:
                os.rmdir(folder)  # Only once empty: other shards may be staging there.
            except OSError:
                pass


def remove(directory, name):
    """Removes a published shard folder (moved aside first, so never half-deleted in place)."""
    old = os.path.join(directory, f"{outputs.OLD_PREFIX}{os.getpid()}")
    os.makedirs(old, exist_ok=True)
    outputs.rename(os.path.join(directory, name), os.path.join(old, name))
    shutil.rmtree(old, ignore_errors=True)


def read_csv(path):
    """`(header, rows)` of a CSV that serving wrote, text cells unescaped."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = [[outputs.read_cell(c) for c in row] for row in csv.reader(f)]
    return rows[0], rows[1:]


@dataclasses.dataclass
class Results:
    """A finished run, its shards joined in order."""

    embeddings: np.ndarray  # [N, D] float32.
    index: dict  # Columns of index.csv: path, size, mtime (as text); N rows each.
    errors: dict  # Columns of errors.csv: path, reason.
    predictions: dict  # Columns of predictions.csv (empty without a gallery).
    summary: dict  # summary.json.


def _columns(parts):
    header = next((h for h, _ in parts), [])
    rows = [r for _, part in parts for r in part]
    return {name: [r[i] for r in rows] for i, name in enumerate(header)}


def read(directory):
    """Reads the outputs of a finished `serve.py` run (every shard, in order).

    `pandas.DataFrame(results.predictions)` makes a table of the predictions.

    Raises:
        ValueError: `directory` holds no finished run (no summary.json: rerun
            the same command to finish it).
    """
    try:
        with open(os.path.join(directory, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        raise ValueError(f"{directory}: no finished serve.py run (summary.json is missing); "
                         "rerun the same command to finish it.") from None
    names = [f"{PREFIX}{i:05d}" for i in range(summary["shards"])]
    parts = {k: [] for k in ("index.csv", "errors.csv", "predictions.csv")}
    embeddings = []
    for name in names:
        folder = os.path.join(directory, name)
        embeddings.append(np.load(os.path.join(folder, "embeddings.npy")))
        for kind, part in parts.items():
            if os.path.exists(os.path.join(folder, kind)):
                part.append(read_csv(os.path.join(folder, kind)))
    dim = summary.get("embedding_dim", 0)
    return Results(np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32),
                   _columns(parts["index.csv"]), _columns(parts["errors.csv"]),
                   _columns(parts["predictions.csv"]), summary)
