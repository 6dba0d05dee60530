"""The README's quickstart runs as written, and its links point at files that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    code = re.search(r"## Quickstart.*?```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it saves to runs/quickstart
    exec(compile(code, "README.md quickstart", "exec"), {})
    out = capsys.readouterr().out
    assert "lora: 221,184 trainable" in out and "| c | lora |" in out
    assert (tmp_path / "runs" / "quickstart" / "petune.json").exists()


def test_readme_is_a_front_door_and_the_manual_links_resolve():
    assert len(README.encode()) <= 12 * 1024
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / d / "README.md"
                                                                  for d in ("recipes", "benchmarks", "lab"))]
    for page in pages:
        prose = re.sub(r"```.*?```|`[^`]*`", "", page.read_text(), flags=re.S)  # links, not code
        for target in re.findall(r"\]\(([^)#]+)\)", prose):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}"
