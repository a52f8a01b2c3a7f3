"""Rewrites one marked section of BENCHMARKS.md, leaving the rest as it is."""

import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def update_section(path, name, body):
    """Replaces the text between `<!-- name:begin -->` and `<!-- name:end -->`.

    Appends the section when the markers are absent.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = open(path, encoding="utf-8").read() if os.path.isfile(path) else "# Benchmarks\n"
    block = f"{begin}\n{body}{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n{block}\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def invocation(argv=None):
    """The command line that ran this bench, as a reader would retype it.

    Args:
        argv: the script path and its arguments; `sys.argv` when None.

    Returns:
        `python <script path relative to the repository> <shell-quoted arguments>`.
    """
    argv = sys.argv if argv is None else argv
    script = os.path.relpath(os.path.abspath(argv[0]), ROOT)
    return " ".join(["python", script, *(shlex.quote(a) for a in argv[1:])])


def publish(name, rows, body, update=True, extra=None, command=None):
    """A bench's result: `body` + command / date / machine footer, printed, saved as
    `bench/results/<name>.json` (command, date, the `extra` dict's keys and rows) and, if
    `update`, written into BENCHMARKS.md's `name` section. Returns the section text.

    `command`: the command line to credit; this process's own (`invocation()`) when None.
    """
    import datetime
    import json
    import platform

    command = invocation() if command is None else command
    section = (f"{body}\n\nCommand: `{command}`  \nDate: {datetime.date.today().isoformat()}. "
               f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), no GPU.\n")
    print(section)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", f"{name}.json"), "w") as f:
        json.dump({"command": command, "date": datetime.date.today().isoformat(),
                   **(extra or {}), "rows": rows}, f, indent=2)
    if update:
        update_section(os.path.join(ROOT, "BENCHMARKS.md"), name, section)
    return section
