"""User-facing errors.

A `UserError` is a mistake in the command line, the configuration or the data
on disk. Entry points print its message as one line and exit non-zero, without
a traceback: the message itself says what is wrong and how to fix it.
"""


class UserError(Exception):
    """A problem the user can fix; the message is shown as one line (exit 2)."""


class RunFailed(Exception):
    """A run that started but could not finish (a loss that became NaN): one line
    saying what to do (exit 1)."""
