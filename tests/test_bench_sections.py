"""bench/sections.py: a bench rewrites only its own section and records its command."""

import json
import os

from bench import sections
from tests.conftest import REPO


def test_update_section_replaces_only_its_block(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("# B\n\nbefore\n<!-- t:begin -->\nold\n<!-- t:end -->\nafter\n")
    sections.update_section(str(path), "t", "new\n")
    assert path.read_text() == "# B\n\nbefore\n<!-- t:begin -->\nnew\n<!-- t:end -->\nafter\n"
    sections.update_section(str(path), "u", "other\n")  # No markers yet: appended.
    assert path.read_text().endswith("after\n\n<!-- u:begin -->\nother\n<!-- u:end -->\n")
    assert "new\n" in path.read_text()


def test_invocation_is_repo_relative_and_shell_quoted():
    argv = [os.path.join(REPO, "bench", "quality.py"), "--seeds=3", "--override=--tau=0.1 x"]
    assert (sections.invocation(argv)
            == "python bench/quality.py --seeds=3 '--override=--tau=0.1 x'")


def test_publish_writes_results_json_without_touching_benchmarks(monkeypatch, tmp_path):
    fake_root = tmp_path / "repo"  # publish writes under the repository root.
    monkeypatch.setattr(sections, "ROOT", str(fake_root))
    text = sections.publish("demo", [{"m": 1}], "| m |", update=False,
                            extra={"config": "c.cfg"}, command="python bench/x.py")
    saved = json.loads((fake_root / "bench" / "results" / "demo.json").read_text())
    assert saved["command"] == "python bench/x.py" and saved["rows"] == [{"m": 1}]
    assert saved["config"] == "c.cfg"
    assert text.startswith("| m |") and "Command: `python bench/x.py`" in text
    assert not (fake_root / "BENCHMARKS.md").exists()
