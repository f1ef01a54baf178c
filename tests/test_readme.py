"""The README keeps its promises: the two commands first, and the API list equal to ``__all__``."""

from __future__ import annotations

import re
from pathlib import Path

import learnable_memory

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_starts_with_the_demo_and_test_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block is not None and README.index("```bash") < README.index("\n## ")
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == [
        "bash .ci/setup && .venv/bin/learnable-memory demo",
        "bash .ci/setup && .venv/bin/python -m pytest -n 2 --dist loadfile",
    ]
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert commands[1] in ci


def test_api_list_matches_all():
    section = README.split("<!-- api:start -->")[1].split("<!-- api:end -->")[0]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    listed = {name for line in table for name in re.findall(r"`([A-Za-z_]+)(?:\(|`)", line.split("|")[1])}
    assert listed == set(learnable_memory.__all__)
    for name in learnable_memory.__all__:
        assert getattr(learnable_memory, name).__doc__ or name == "MODES", f"{name} has no docstring"
