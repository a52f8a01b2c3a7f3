"""Rewrites one marked section of BENCHMARKS.md, leaving the rest as it is."""

import os


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
