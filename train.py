"""Trains Grafit (or a baseline) and evaluates the embedding at the fine level.

    python train.py --flagfile=configs/fashion_mnist.cfg --workdir=runs/grafit

Any flag after the flagfile overrides it, e.g. `--epochs=1 --max_train_examples=2000`.
Running the same command again resumes from the last checkpoint. Exit status: 0
done; 2 bad flags, settings or data (one line, nothing trained); 1 a run that
could not finish (a NaN loss, a full disk: one line, the last good checkpoint kept).
"""

import dataclasses
import sys

from absl import app, flags

from grafit_tf.config import Config
from grafit_tf.errors import RunFailed, UserError, flags_parser

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


def define_flags():
    """One flag per `Config` field, with its default and help (idempotent)."""
    if "workdir" in flags.FLAGS:
        return
    for field in dataclasses.fields(Config):
        kind = field.type if isinstance(field.type, type) else eval(field.type)
        _DEFINE[kind](field.name, field.default, field.metadata["help"])
    flags.DEFINE_string("workdir", None, "Work directory for checkpoints, logs and results.")
    flags.DEFINE_bool("dry_run", False, "Check the flags, print the resolved config as JSON "
                      "and exit without training.")
    flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    try:
        config = Config(**{f.name: getattr(flags.FLAGS, f.name)
                           for f in dataclasses.fields(Config)})
        config.validate()
        if flags.FLAGS.dry_run:
            print(config.to_json())
            return
        from grafit_tf import trainer  # Imports TensorFlow: after the cheap checks.

        trainer.train_and_evaluate(config, flags.FLAGS.workdir)
    except UserError as e:  # Bad flags, settings or data: nothing was trained.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # A disk that filled or went read-only during the run.
        where = e.filename or flags.FLAGS.workdir
        print(f"error: {where}: {e.strerror or e}; free space or give another --workdir, "
              "then rerun to resume from the last checkpoint.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=flags_parser("train.py"))
