"""bench/ablation.py: every variant changes only flags that train.py still has."""

import dataclasses

from bench import ablation
from grafit_tf.config import Config


def test_every_variant_sets_existing_train_flags():
    # train.py defines one flag per Config field (plus --workdir and --dry_run).
    known = {f.name for f in dataclasses.fields(Config)}
    for variant in ablation.VARIANTS:
        names = {flag[2:].split("=")[0] for flag in ablation.variant_flags(variant)}
        assert names <= known, (variant, sorted(names - known))
