"""Output files, published as a whole run: never a mix of two runs, never half-written.

A run writes (and fsyncs) every output into a staging folder
`OUT/.serve.tmp.<pid>/` and publishes them only at the end (`commit`), with
`summary.json` as the completeness marker:

1. remove `OUT/summary.json`: until step 3 ends, the folder has no marker;
2. move every output of the earlier run into `OUT/.serve.old.<pid>/`;
3. rename the new outputs in, `summary.json` last;
4. remove `OUT/.serve.old.<pid>/` and the staging folder.

Every step is a rename (or removal) within `OUT`, one file system, so a run
killed at any point leaves the outputs of one run only, never a mix: the
earlier run's, complete (killed before step 1); a part of the earlier or of
the new run's, without `summary.json` (killed during steps 1-3: incomplete,
and marked so by the missing marker); or the new run's, complete. Readers
take a folder as complete only when `summary.json` is there. The next run
into `OUT` removes what a killed run left behind (its `.serve.tmp.*` /
`.serve.old.*` folders) when it starts, and its `commit` moves away the
outputs of an unfinished publish with the rest.

A run holds an exclusive `flock` on `OUT` itself (where the platform and the
file system have one), so two runs never write into one folder at once and
the cleanup never touches a live run's files.

CSV cells are text: a cell that starts with `=`, `+`, `-`, `@`, a tab or a
carriage return would act as a formula in a spreadsheet, so it is written
with a leading `'` (OWASP's advice against CSV injection), and so is a cell
that already starts with `'` (the escaping stays one-to-one: to read a text
cell back, drop one leading `'`). Numbers are written as numbers (`float`
cells: 6 decimals; a non-finite one is refused, never written as `nan`).
"""

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
# Temporaries of older serve.py versions: `.<output name>.tmp.<pid>` files.
_LEGACY_TEMP = re.compile(r"^\.[^/]+\.tmp\.\d+$")
# A text cell starting with one of these gets a leading "'": the formula
# starts (OWASP), and "'" itself so that the escaping is one-to-one.
ESCAPED_START = ("=", "+", "-", "@", "\t", "\r", "'")


class OutputBusy(Exception):
    """Another process holds the output folder."""


def csv_cell(value):
    """One CSV cell as text: formula-safe strings, 6-decimal floats, plain ints.

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


def _rename(src, dst):
    """Every rename of the publish goes through here (tests interrupt it)."""
    os.replace(src, dst)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # Windows cannot open a directory; its renames need no sync.
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputDir:
    """Stages files for `directory`; `commit()` publishes them, `discard()` drops them.

    Creating one creates the folder if needed, locks it, and removes what
    killed runs left there (see the module docstring).
    """

    def __init__(self, directory, names=()):
        """
        Args:
            directory: the output folder.
            names: every output name a run may write (to recognise the
                temporaries `.<name>.tmp.<pid>` of older versions).

        Raises:
            OSError: the folder cannot be created or written.
            OutputBusy: another serve.py run holds the folder.
        """
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

        Outputs of a publish that was killed (no `summary.json`) stay until
        the next `commit` moves them away: they are marked incomplete, and a
        run that fails before publishing should not remove more than it adds.

        Returns:
            The names removed.
        """
        removed = []
        legacy = {f".{n}" for n in self.names}
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if name.startswith((STAGING_PREFIX, OLD_PREFIX)) and os.path.isdir(path) \
                    and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
            elif (_LEGACY_TEMP.match(name) and name.rsplit(".tmp.", 1)[0] in legacy
                  and os.path.isfile(path)):
                os.remove(path)
                removed.append(name)
        return removed

    def path(self, name):
        """The final path of output `name`."""
        return os.path.join(self.directory, name)

    def _stage(self, name):
        self._staged.add(name)
        return os.path.join(self.staging, name)

    def write_csv(self, name, header, rows):
        """Writes a UTF-8 CSV (rows: iterables of cells, see `csv_cell`)."""
        with open(self._stage(name), "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([csv_cell(c) for c in header])
            writer.writerows([csv_cell(c) for c in row] for row in rows)
            _sync(f)

    def write_npy(self, name, array):
        with open(self._stage(name), "wb") as f:
            np.save(f, array)
            _sync(f)

    def write_json(self, name, value):
        with open(self._stage(name), "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
            f.write("\n")
            _sync(f)

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
            _fsync_dir(self.directory)
        earlier = [n for n in dict.fromkeys(tuple(stale) + tuple(self._staged))
                   if n != last and os.path.lexists(self.path(n))]
        if earlier:
            os.makedirs(old, exist_ok=True)
            for name in earlier:
                _rename(self.path(name), os.path.join(old, name))
            _fsync_dir(self.directory)
        for name in sorted(self._staged, key=lambda n: (n == last, n)):
            if name == last:
                _fsync_dir(self.directory)  # Every other output is in place first.
            _rename(os.path.join(self.staging, name), self.path(name))
        _fsync_dir(self.directory)
        self._staged.clear()
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        self._unlock()

    def discard(self):
        """Removes the staging folder (after a failure); published files stay."""
        self._staged.clear()
        shutil.rmtree(self.staging, ignore_errors=True)
        self._unlock()


def _sync(f):
    # On disk before the rename makes it visible under its final name.
    f.flush()
    os.fsync(f.fileno())
