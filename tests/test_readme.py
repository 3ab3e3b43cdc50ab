"""README's set-up commands stay true: CI runs the same test command, and the demo entry exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_exactly_two_setup_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("ckmerge-ray demo") and "torch==2.13.0" in cmds[0]
    assert cmds[1].endswith("python -m pytest") and "'.[test]'" in cmds[1]


def test_ci_runs_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()


def test_cli_documents_what_readme_shows():
    from ckmerge_ray.cli import build_parser

    help_text = build_parser().format_help()
    assert "tune" in help_text and "demo" in help_text
