"""User-facing errors, and the checks every entry point shares that raise them.

A `UserError` is a mistake in the command line, the
configuration or the data on disk: entry points print its message, which says what
is wrong and how to fix it, as one line and exit non-zero, without a traceback.
"""

import os
import sys

from absl import flags


class UserError(Exception):
    """A problem the user can fix; the message is shown as one line (exit 2)."""


class RunFailed(Exception):
    """A run that started but could not finish (a loss that became NaN): one line
    saying what to do (exit 1)."""


def flags_parser(program):
    """A parser for `absl.app.run(main, flags_parser=...)`: a flag error (a bad value,
    an unknown or missing flag, a flagfile that cannot be read) or a stray argument
    prints one line and exits 2, where absl would exit 1."""
    def parse(argv):
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as e:
            message = " ".join(str(e).split()).rstrip(".")
            print(f"error: {message}; see python {program} --helpshort.", file=sys.stderr)
            sys.exit(2)
        if len(rest) > 1:
            print(f"error: unexpected arguments {rest[1:]}; every setting is a --flag.",
                  file=sys.stderr)
            sys.exit(2)
        return rest
    return parse


def check_writable(path, flag):
    """Raises `UserError` unless a file can be written in `path`'s nearest existing
    folder: a read-only or full disk is found before the work, not after it."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    probe = os.path.join(folder, f".write_test.{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)  # Enough to notice a full disk.
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"{flag}={path}: cannot write in {folder} ({e.strerror}); give a "
                        "writable folder with free space.") from None
    finally:
        if os.path.isfile(probe):
            os.remove(probe)
