"""walk.listed: the files to serve read from a list, one path a line."""

import os

import pytest

from grafit_tf.errors import UserError
from grafit_tf.serving import walk


def _touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_a_list_names_files_like_the_walk_of_their_folder(tmp_path):
    root = tmp_path / "images"
    a = _touch(root / "coat" / "1.png", b"abc")
    _touch(root / "bag" / "2.png")
    outside = _touch(tmp_path / "elsewhere" / "3.png")
    os.mkdir(root / "empty")
    os.symlink("gone.png", root / "dangling.png")
    os.mkfifo(root / "pipe")
    names = root / "list.txt"
    names.write_bytes(b"coat/1.png\r\n\n  bag/2.png  \n./coat/1.png\n" + a.encode() + b"\n"
                      + outside.encode() + b"\nmissing.png\nempty\ndangling.png\npipe\n")

    files, problems = walk.listed(str(names))

    walked = {f.relpath: f for f in walk.walk(str(root))[0]}
    assert [f.relpath for f in files] == ["coat/1.png", "bag/2.png", outside]
    assert files[0] == walked["coat/1.png"] and files[1] == walked["bag/2.png"]
    assert (files[0].size, files[2].path) == (3, outside)
    reasons = {p.relpath: p.reason for p in problems}
    assert list(reasons) == ["missing.png", "empty", "dangling.png", "pipe"]
    assert "no such file" in reasons["missing.png"] and "directory" in reasons["empty"]
    assert "broken symlink" in reasons["dangling.png"] and "fifo" in reasons["pipe"]


def test_names_that_are_not_utf8_open_and_show_escaped(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")
    _touch(os.path.join(tmp_path, name))
    (tmp_path / "list.txt").write_bytes(b"caf\xe9.png\n")

    files, problems = walk.listed(str(tmp_path / "list.txt"))

    assert problems == [] and [f.relpath for f in files] == ["caf\\xe9.png"]
    assert os.path.isfile(files[0].path)


@pytest.mark.parametrize("case", ["missing", "binary"])
def test_an_unusable_list_is_a_user_error(tmp_path, case):
    path = tmp_path / "list.txt"
    if case == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    with pytest.raises(UserError, match="list.txt: (cannot read|not a text file)"):
        walk.listed(str(path))
