"""The README stays true: its quick-start commands, CI, and every CLI command documented."""

from __future__ import annotations

import re
from pathlib import Path

from narr_assets.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def quick_start() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_quick_start_has_two_commands_and_ci_runs_the_second():
    commands = quick_start()
    assert len(commands) == 2
    assert "narr materialize" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


def test_every_narr_command_is_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:
        assert f"narr {name}" in README, f"`narr {name}` is not in README.md"


def test_every_environment_variable_is_documented():
    source = (ROOT / "narr_assets" / "settings.py").read_text()
    for var in sorted(set(re.findall(r'"(NARR_[A-Z_]+)"', source))):
        assert f"`{var}`" in README, f"{var} is not documented in README.md"


def test_every_test_the_reliability_table_names_exists():
    section = README[README.index("## Reliability") :]
    section = section[: section.index("\n## ", 1)]
    named = re.findall(r"`(test_[a-z_]+\.py)::(test_[a-z0-9_]+)`", section)
    assert len(named) >= 30
    missing = [
        f"{file}::{name}"
        for file, name in named
        if not re.search(rf"^(async )?def {name}\(", (ROOT / "tests" / file).read_text(), re.M)
    ]
    assert missing == []
