"""Lists every file under a directory, so that none is silently skipped.

Regular files (directly or through symlinks) become `File`s; everything that
cannot be served (a symlink loop, a broken link, a fifo, an unreadable
directory) becomes a `Problem` with its reason. Directory symlinks are
followed unless they point back to an enclosing directory (a loop). Paths are
relative to the root, as valid UTF-8 text (`display`).
"""

import dataclasses
import errno
import os
import stat

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
            files.append(File(entry.path, shown, st.st_size, st.st_mtime_ns))
        else:
            kind = next((name for test, name in _SPECIAL_FILES if test(st.st_mode)),
                        "not a regular file")
            problems.append(Problem(shown, f"{kind}, not an image file"))


def _reason(error):
    return (error.strerror or str(error)).lower()
