"""Output files, never half-written: staged, fsynced, then renamed into place.

`shards` publishes each shard folder with one rename. The top-level files
are written (and fsynced) into `OUT/.serve.tmp.<pid>/`; `commit` publishes
them with `summary.json` as the completeness marker:

1. remove `OUT/summary.json`: until step 3 ends, the folder has no marker;
2. move every output of the earlier run into `OUT/.serve.old.<pid>/`;
3. rename the new outputs in, `summary.json` last;
4. remove `OUT/.serve.old.<pid>/` and the staging folder.

Each step is a rename or removal within `OUT`, so a run killed at any point
leaves one run's outputs only: complete, or without `summary.json` (marked
incomplete). The next run into `OUT` removes a killed run's temporary folders,
and its `commit` moves away the rest. An exclusive `flock` on `OUT` (where the
file system has one) keeps two runs, and the cleanup, off each other's files.
"""

import contextlib
import csv
import json
import math
import os
import re
import shutil

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no flock; runs into one folder must not overlap.
    fcntl = None

STAGING_PREFIX = ".serve.tmp."
OLD_PREFIX = ".serve.old."
ESCAPED_START = ("=", "+", "-", "@", "\t", "\r", "'")


class OutputBusy(Exception):
    """Another process holds the output folder."""


def csv_cell(value):
    """One CSV cell as text: formula-safe strings, 6-decimal floats, plain ints.

    A string starting with `=`, `+`, `-`, `@`, a tab or a carriage return (a
    spreadsheet formula: OWASP's CSV injection) or with `'` gets a leading `'`,
    so the escaping is one-to-one (`read_cell`).

    Raises:
        ValueError: a non-finite float (never written as `nan` / `inf`).
    """
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise ValueError(f"non-finite number {value!r} in a CSV output")
        return f"{float(value):.6f}"
    text = str(value)
    return "'" + text if text.startswith(ESCAPED_START) else text


def read_cell(text):
    """The inverse of `csv_cell` for a text cell."""
    return text[1:] if text.startswith("'") else text


@contextlib.contextmanager
def _synced(path, mode, **kwargs):
    """A file opened for writing, fsynced on close: on disk before a rename makes it visible."""
    encoding = None if "b" in mode else "utf-8"
    with open(path, mode, encoding=encoding, **kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_csv(path, header, rows):
    """Writes a UTF-8 CSV (rows: iterables of cells, see `csv_cell`), fsynced."""
    with _synced(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([csv_cell(c) for c in header])
        writer.writerows([csv_cell(c) for c in row] for row in rows)


def write_npy(path, array):
    with _synced(path, "wb") as f:
        np.save(f, array)


def write_json(path, value):
    with _synced(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
        f.write("\n")


def rename(src, dst):
    """Every rename of the publish goes through here (tests interrupt it)."""
    os.replace(src, dst)


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # Windows cannot open a directory; its renames need no sync.
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


class OutputDir:
    """Stages files for `directory`; `commit()` publishes them, `discard()` drops them.

    Creating one creates and locks the folder and removes what killed runs left
    there; `names` (every output a run may write) tell older versions' temporaries.

    Raises:
        OSError: the folder cannot be created or written.
        OutputBusy: another serve.py run holds the folder.
    """

    def __init__(self, directory, names=()):
        self.directory = directory
        self.names = tuple(names)
        self._staged = set()
        self._lock_fd = None
        os.makedirs(directory, exist_ok=True)
        self._lock()
        try:
            self.cleanup()
            self.staging = os.path.join(directory, f"{STAGING_PREFIX}{os.getpid()}")
            os.mkdir(self.staging)
        except BaseException:
            self._unlock()
            raise

    def _lock(self):
        if fcntl is None:
            return
        try:
            fd = os.open(self.directory, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusy(self.directory) from None
        except OSError:  # A file system without flock (some NFS): go on unlocked.
            os.close(fd)
            return
        self._lock_fd = fd

    def _unlock(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # Closing releases the flock.
            self._lock_fd = None

    def cleanup(self):
        """Removes the temporaries that killed runs left in the folder.

        A killed publish's outputs stay (marked incomplete) until the next `commit`:
        a run that fails before publishing should not remove more than it adds.
        """
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            legacy = re.fullmatch(r"\.(.+)\.tmp\.\d+", name)  # Older versions' temporaries.
            if name.startswith((STAGING_PREFIX, OLD_PREFIX)) and os.path.isdir(path) \
                    and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif legacy and legacy[1] in self.names and os.path.isfile(path):
                os.remove(path)

    def path(self, name):
        """The final path of output `name`."""
        return os.path.join(self.directory, name)

    def _staged_path(self, name):
        self._staged.add(name)
        return os.path.join(self.staging, name)

    def write_csv(self, name, header, rows):
        """Writes a UTF-8 CSV (rows: iterables of cells, see `csv_cell`)."""
        write_csv(self._staged_path(name), header, rows)

    def write_json(self, name, value):
        write_json(self._staged_path(name), value)

    def publish_json(self, name, value):
        """Writes JSON output `name` into place now (staged, then one rename), not at `commit`."""
        staged = os.path.join(self.staging, name)
        write_json(staged, value)
        rename(staged, self.path(name))
        fsync_dir(self.directory)

    def commit(self, stale=(), last="summary.json"):
        """Publishes the staged files as a whole (the module docstring's steps).

        Args:
            stale: output names of earlier runs, moved away whether or not this
                run writes them.
            last: the completeness marker, removed first and renamed in last.
        """
        old = os.path.join(self.directory, f"{OLD_PREFIX}{os.getpid()}")
        if os.path.lexists(self.path(last)):
            os.remove(self.path(last))
            fsync_dir(self.directory)
        earlier = [n for n in dict.fromkeys(tuple(stale) + tuple(self._staged))
                   if n != last and os.path.lexists(self.path(n))]
        if earlier:
            os.makedirs(old, exist_ok=True)
            for name in earlier:
                rename(self.path(name), os.path.join(old, name))
            fsync_dir(self.directory)
        for name in sorted(self._staged, key=lambda n: (n == last, n)):
            if name == last:
                fsync_dir(self.directory)  # Every other output is in place first.
            rename(os.path.join(self.staging, name), self.path(name))
        fsync_dir(self.directory)
        self._staged.clear()
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        self._unlock()

    def discard(self):
        """Removes the staging folder (after a failure); published files stay."""
        self._staged.clear()
        shutil.rmtree(self.staging, ignore_errors=True)
        self._unlock()
