"""Lists every file under a directory, so that none is silently skipped.

Regular files (directly or through symlinks) become `File`s; everything that
cannot be served (a symlink loop, a broken link, a fifo, an unreadable
directory) becomes a `Problem` with its reason. Directory symlinks are
followed unless they point back to an enclosing directory (a loop). Paths are
relative to the root, as valid UTF-8 text (`display`).

`listed` reads the files to serve from a text file instead, one path a line.
"""

import dataclasses
import errno
import os
import stat

from grafit_tf.errors import UserError

_SPECIAL_FILES = ((stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


@dataclasses.dataclass(frozen=True)
class File:
    """A regular file to decode."""

    path: str  # To open: `root` joined with the name, as the OS has it.
    relpath: str  # Relative to the root, for the outputs (see `display`).
    size: int = 0  # Bytes, and the modification time: a changed file is served again.
    mtime_ns: int = 0


@dataclasses.dataclass(frozen=True)
class Problem:
    """A directory entry that is not served, with the reason."""

    relpath: str
    reason: str


def display(relpath):
    """A relative path as valid UTF-8 text, escaped one-to-one.

    Undecodable bytes become `\\xNN` and a backslash `\\\\` (`a\\\\xe9.png` is a file
    named `a\\xe9.png`, `a\\xe9.png` one holding the byte 0xE9). Byte 0x5C is a
    backslash wherever it appears in UTF-8, so doubling it before decoding is
    exact (not on Windows, where it is the separator).
    """
    raw = os.fsencode(relpath)
    if os.sep != "\\":
        raw = raw.replace(b"\\", b"\\\\")
    return raw.decode("utf-8", "backslashreplace")


def walk(root, exclude=()):
    """`(files: list[File], problems: list[Problem])` under `root`, depth first, names sorted.

    `exclude`: directories left out, e.g. the output folder inside `root`.
    """
    files, problems, skip = [], [], set()
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
        # Recorded as a whole, since its files cannot be listed one by one.
        problems.append(Problem(display(rel or "."), f"unreadable directory: {_reason(e)}"))
        return
    for entry in entries:
        child_rel = os.path.join(rel, entry.name) if rel else entry.name
        shown = display(child_rel)
        try:
            st = entry.stat(follow_symlinks=True)
        except OSError as e:
            problems.append(Problem(shown, _stat_failure(e, entry.is_symlink())))
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
            files.append(File(entry.path, shown, st.st_size, st.st_mtime_ns))
        else:
            problems.append(Problem(shown, _not_a_file(st.st_mode)))


def listed(list_path):
    """`(files, problems)` of the paths that text file `list_path` lists, one a line.

    A relative path is relative to the list's folder. The outputs name a file by
    its path relative to that folder (an absolute line too), or by its absolute
    path when it lies outside. Blank lines are skipped and surrounding whitespace
    ignored; a file listed twice is served once; a listed path that is missing,
    a directory or not a regular file is a `Problem`.

    Raises:
        UserError: the list cannot be read or is not text.
    """
    try:
        with open(list_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{list_path}: cannot read the list of images ({_reason(e)}).") from None
    if b"\0" in data:
        raise UserError(f"{list_path}: not a text file listing image paths (one a line).")
    base = os.path.dirname(os.path.abspath(list_path))
    files, problems, seen = [], [], set()
    for line in data.splitlines():  # Bytes: names that are not UTF-8 open as listed.
        if not line.strip():
            continue
        path = os.path.normpath(os.path.join(base, os.fsdecode(line.strip())))
        if path in seen:
            continue
        seen.add(path)
        rel = os.path.relpath(path, base)
        shown = display(path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel)
        try:
            st = os.stat(path)
        except OSError as e:
            problems.append(Problem(shown, _stat_failure(e, os.path.islink(path))))
            continue
        if stat.S_ISREG(st.st_mode):
            files.append(File(path, shown, st.st_size, st.st_mtime_ns))
        elif stat.S_ISDIR(st.st_mode):
            problems.append(Problem(shown, "a directory, not an image file (a list names "
                                    "files; give a folder itself as --images)"))
        else:
            problems.append(Problem(shown, _not_a_file(st.st_mode)))
    return files, problems


def _stat_failure(error, is_link):
    if error.errno == errno.ELOOP:
        return "symlink loop (the link resolves to itself)"
    if is_link and error.errno == errno.ENOENT:
        return "broken symlink (its target does not exist)"
    return f"cannot stat: {_reason(error)}"


def _not_a_file(mode):
    kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "not a regular file")
    return f"{kind}, not an image file"


def _reason(error):
    return (error.strerror or str(error)).lower()
