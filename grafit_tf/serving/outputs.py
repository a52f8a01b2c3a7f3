"""Output files written under temporary names and renamed together at the end.

A run stages every output as `.<name>.tmp.<pid>` in the output folder (same
file system, so `os.replace` is atomic) and renames them only once all are
written; a crash therefore leaves temporary names, never a half-written
`embeddings.npy` or `index.csv` that looks complete. Outputs of an earlier run
that this run does not produce are removed at commit, so the folder never
mixes two runs.
"""

import csv
import json
import os

import numpy as np


class OutputDir:
    """Stages files in `directory`; `commit()` publishes them, `discard()` drops them."""

    def __init__(self, directory):
        self.directory = directory
        self._staged = {}  # final name -> temporary path
        os.makedirs(directory, exist_ok=True)

    def path(self, name):
        """The final path of output `name`."""
        return os.path.join(self.directory, name)

    def _stage(self, name):
        tmp = os.path.join(self.directory, f".{name}.tmp.{os.getpid()}")
        self._staged[name] = tmp
        return tmp

    def write_csv(self, name, header, rows):
        """Writes a UTF-8 CSV (rows: iterables of cells)."""
        with open(self._stage(name), "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
            _sync(f)

    def write_npy(self, name, array):
        with open(self._stage(name), "wb") as f:
            np.save(f, array)
            _sync(f)

    def write_json(self, name, value):
        with open(self._stage(name), "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")
            _sync(f)

    def commit(self, stale=(), last=None):
        """Renames every staged file to its final name.

        Args:
            stale: output names of earlier runs to remove when not produced now.
            last: the name renamed last (a marker that the set is complete).
        """
        for name in stale:
            if name not in self._staged and os.path.exists(self.path(name)):
                os.remove(self.path(name))
        order = sorted(self._staged, key=lambda n: n == last)
        for name in order:
            os.replace(self._staged[name], self.path(name))
        self._staged.clear()

    def discard(self):
        """Removes the staged temporary files (after a failure)."""
        for tmp in self._staged.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        self._staged.clear()


def _sync(f):
    # On disk before the rename makes it visible under its final name.
    f.flush()
    os.fsync(f.fileno())
