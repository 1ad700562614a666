"""The README's Python snippets run as written (offline, on the CPU)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) >= 2
    assert "pip install" in README.read_text().split("## What it does")[0], (
        "the commands are on the first screen"
    )


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet-{index}" for index in range(len(SNIPPETS))])
@pytest.mark.usefixtures("users_device")
def test_a_readme_snippet_runs_as_written(snippet, tmp_path, monkeypatch, capsys):
    if "transformers" in snippet:
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, str(README), "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out, "the snippet prints what it shows"
