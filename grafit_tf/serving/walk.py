"""Lists every file under a directory, so that none is silently skipped.

Regular files (directly or through symlinks) become `File`s; everything that
cannot be served (a symlink loop, a broken link, a fifo, an unreadable
directory) becomes a `Problem` with its reason. Directory symlinks are
followed unless they point back to an enclosing directory (a loop).

Paths in the outputs are relative to the root and always valid UTF-8: bytes of
a file name that are not UTF-8 are written as `\\xNN` escapes, and a backslash
in a name is written doubled (`\\\\`), so that the escaping is one-to-one: a file
literally named `a\\xe9.png` is shown as `a\\\\xe9.png`, one whose name holds
the byte 0xE9 as `a\\xe9.png` (`display`).
"""

import dataclasses
import errno
import os
import stat


@dataclasses.dataclass(frozen=True)
class File:
    """A regular file to decode.

    Attributes:
        path: the path to open (`root` joined with the name, as the OS has it).
        relpath: the path relative to the root, for the outputs (see `display`).
    """

    path: str
    relpath: str


@dataclasses.dataclass(frozen=True)
class Problem:
    """A directory entry that is not served, with the reason."""

    relpath: str
    reason: str


def display(relpath):
    """A relative path as valid UTF-8 text, escaped one-to-one.

    Undecodable bytes become `\\xNN` and a backslash becomes `\\\\` (where the
    OS separator is `/`; on Windows the backslash is the separator and no name
    holds one). Byte 0x5C is a backslash wherever it appears in UTF-8, so
    doubling it before decoding is exact.
    """
    raw = os.fsencode(relpath)
    if os.sep != "\\":
        raw = raw.replace(b"\\", b"\\\\")
    return raw.decode("utf-8", "backslashreplace")


def _kind(mode):
    for test, name in ((stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def walk(root, exclude=()):
    """All files under `root`, depth first, names sorted.

    Args:
        root: the directory.
        exclude: directories (paths) left out, e.g. the output folder when it
            lies inside `root`.

    Returns:
        `(files: list[File], problems: list[Problem])`.
    """
    files, problems = [], []
    skip = set()
    for path in exclude:
        try:
            st = os.stat(path)
            skip.add((st.st_dev, st.st_ino))
        except OSError:
            pass  # Not there yet: nothing to skip.
    top = os.stat(root)
    _walk_dir(root, "", {(top.st_dev, top.st_ino)}, skip, files, problems)
    return files, problems


def _walk_dir(path, rel, ancestors, skip, files, problems):
    """Appends the contents of directory `path` (relative path `rel`)."""
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
    except OSError as e:
        # The directory itself is the entry we cannot go through: record it,
        # since its files cannot be listed one by one.
        problems.append(Problem(display(rel or "."), f"unreadable directory: {_reason(e)}"))
        return
    for entry in entries:
        child_rel = os.path.join(rel, entry.name) if rel else entry.name
        shown = display(child_rel)
        try:
            st = entry.stat(follow_symlinks=True)
        except OSError as e:
            if e.errno == errno.ELOOP:
                problems.append(Problem(shown, "symlink loop (the link resolves to itself)"))
            elif entry.is_symlink() and e.errno == errno.ENOENT:
                problems.append(Problem(shown, "broken symlink (its target does not exist)"))
            else:
                problems.append(Problem(shown, f"cannot stat: {_reason(e)}"))
            continue
        key = (st.st_dev, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            if key in skip:
                continue
            if key in ancestors:
                problems.append(Problem(shown, "symlink loop (points to an enclosing directory)"))
                continue
            _walk_dir(entry.path, child_rel, ancestors | {key}, skip, files, problems)
        elif stat.S_ISREG(st.st_mode):
            files.append(File(entry.path, shown))
        else:
            problems.append(Problem(shown, f"{_kind(st.st_mode)}, not an image file"))


def _reason(error):
    return (error.strerror or str(error)).lower()
