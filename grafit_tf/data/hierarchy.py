"""Coarse/fine label hierarchies and coarse-map files.

A coarse map file is a JSON object from fine class name to coarse class name;
every fine class of the dataset must be mapped.
"""

import dataclasses
import json
import os

import numpy as np

from grafit_tf.errors import UserError

MAPS_DIR = os.path.join(os.path.dirname(__file__), "maps")


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    """Fine classes, coarse classes and the map between them.

    Attributes:
        fine_names: fine class names, index = fine label.
        coarse_names: coarse class names, index = coarse label.
        fine_to_coarse: coarse label of each fine label, length len(fine_names).
    """

    fine_names: tuple
    coarse_names: tuple
    fine_to_coarse: tuple

    @property
    def num_fine(self):
        return len(self.fine_names)

    @property
    def num_coarse(self):
        return len(self.coarse_names)

    def coarse_of(self, fine_labels):
        """Maps an int array of fine labels `[N]` to coarse labels `[N]`."""
        return np.asarray(self.fine_to_coarse, np.int32)[np.asarray(fine_labels)]

    def to_dict(self):
        return {f: self.coarse_names[c] for f, c in zip(self.fine_names, self.fine_to_coarse)}


def from_mapping(fine_names, mapping, source="the coarse map"):
    """Builds a `Hierarchy` from a fine-name -> coarse-name dict.

    Coarse classes are numbered in sorted order of their names, so the same
    mapping always gives the same labels.

    Raises:
        UserError: a fine class is unmapped, or the map names unknown classes.
    """
    fine_names = tuple(fine_names)
    missing = [n for n in fine_names if n not in mapping]
    if missing:
        raise UserError(
            f"{source} leaves fine class(es) unmapped: {', '.join(missing[:10])}"
            f"{' ...' if len(missing) > 10 else ''}; map every fine class to a coarse class.")
    unknown = sorted(set(mapping) - set(fine_names))
    if unknown:
        raise UserError(
            f"{source} names fine class(es) the dataset does not have: "
            f"{', '.join(unknown[:10])}; known fine classes: {', '.join(fine_names[:20])}.")
    bad = [k for k, v in mapping.items() if not isinstance(v, str) or not v]
    if bad:
        raise UserError(f"{source}: coarse names must be non-empty strings ({bad[0]!r}).")
    coarse_names = tuple(sorted(set(mapping[n] for n in fine_names)))
    index = {c: i for i, c in enumerate(coarse_names)}
    return Hierarchy(fine_names, coarse_names, tuple(index[mapping[n]] for n in fine_names))


def load_coarse_map(path, fine_names):
    """Reads a coarse map JSON file and builds the `Hierarchy`."""
    if not os.path.isfile(path):
        raise UserError(f"--coarse_map={path}: no such file; give a JSON object fine -> coarse.")
    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--coarse_map={path}: not valid JSON ({e}).") from None
    if not isinstance(mapping, dict):
        raise UserError(f"--coarse_map={path}: expected a JSON object fine name -> coarse name.")
    return from_mapping(fine_names, mapping, source=f"--coarse_map={path}")


def builtin_map(name):
    """Path of a coarse map shipped with the package (`maps/<name>.json`)."""
    return os.path.join(MAPS_DIR, f"{name}.json")
