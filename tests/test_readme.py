"""README stays true to the code: its two set-up commands are what CI runs, and every
`ckmerge-ray` subcommand and `--flag` it shows exists in the CLI's parser.

Everything here is parsed out of README.md, .ci/run and pyproject.toml, so editing one of them
without the others makes a test fail."""

import re
import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
VENV = ["python3 -m venv .venv", ". .venv/bin/activate"]


def section(title_start: str) -> str:
    """The body of the '## <title_start>...' section, up to its first sub-heading or next section."""
    parts = re.split(rf"^## {re.escape(title_start)}.*$", README, maxsplit=1, flags=re.M)
    assert len(parts) == 2, f"README has no '## {title_start}' section"
    return re.split(r"^#{1,3} ", parts[1], maxsplit=1, flags=re.M)[0]


def bash_blocks(text: str):
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)


def readme_commands():
    """The Set-up section's two commands, each one line."""
    blocks = [b.strip() for b in bash_blocks(section("Set-up"))]
    assert all("\n" not in b for b in blocks), blocks
    return blocks


def steps(command: str):
    return [s.strip() for s in command.split("&&")]


def ci_command_lines():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [l for l in lines if l.strip() and not l.lstrip().startswith("#")]


def pip_install_args(step: str):
    words = shlex.split(step)
    assert words[:2] == ["pip", "install"], step
    return words[2:]


def test_readme_has_exactly_two_setup_commands():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    demo, test = (steps(c) for c in cmds)
    # both start from a fresh virtual environment, the same way
    assert demo[:2] == VENV and test[:2] == VENV
    assert len(demo) == len(test) == 4, (demo, test)
    assert demo[3] == "ckmerge-ray demo"
    assert test[3] == "python -m pytest"


def test_setup_commands_install_the_same_things():
    demo, test = (steps(c) for c in readme_commands())
    demo_args, test_args = pip_install_args(demo[2]), pip_install_args(test[2])
    # The test install is the demo install plus the [test] extra: same torch pin, same package.
    assert demo_args == ["torch==2.13.0", "-e", "."], demo_args
    assert test_args == ["torch==2.13.0", "-e", ".[test]"], test_args
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "test" in project["optional-dependencies"]
    # the pin satisfies the package's own torch requirement (torch>=2.4)
    torch_req = next(d for d in project["dependencies"] if re.match(r"torch\b", d))
    minimum = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", torch_req).group(1).split("."))
    pin = tuple(int(x) for x in demo_args[0].split("==")[1].split("."))
    assert pin >= minimum, (torch_req, demo_args[0])
    # `ckmerge-ray demo` is the console script the install creates, and `demo` its subcommand
    assert project["scripts"]["ckmerge-ray"] == "ckmerge_ray.cli:main"
    assert "demo" in subcommands()


def test_ci_runs_readme_test_command():
    ci = ci_command_lines()
    test_cmd = readme_commands()[1]
    # verbatim, as the last command of .ci/run (its exit status is CI's), under `set -e`
    assert ci[-1] == test_cmd, (ci[-1], test_cmd)
    assert any(re.match(r"set -\w*e", l) for l in ci[:-1]), "CI must stop on the first failure"
    # nothing before it installs anything else into the environment the test command builds
    assert not any("pip " in l for l in ci[:-1]), ci


def subcommands():
    from ckmerge_ray.cli import build_parser

    parser = build_parser()
    return parser._subparsers._group_actions[0].choices


def options_of(sub):
    return {o for a in sub._actions for o in a.option_strings}


def readme_cli_commands():
    """Every `ckmerge-ray ...` command README shows, in bash blocks (continuation lines joined)
    and in inline code, without trailing comments."""
    found = []
    for block in bash_blocks(README):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0]
            m = re.search(r"(?:^|\s)ckmerge-ray\s+(.*)", line)
            if m:
                found.append(m.group(1))
    found += re.findall(r"`ckmerge-ray\s+([^`]*)`", README)
    return found


# `--flags` shown in README's inline code that belong to other programs, named here by owner:
FOREIGN_FLAGS = {
    "--mmlu": "examples/tune_on_lmeval.py",
    "--quick": "benchmarks/*.py",
    "--checkout": "benchmarks/group_sigterm.py",
    "--dashboard-host": "ray start",
    "--object-spilling-directory": "ray start",
    "--shm-size": "docker run",
}


def test_cli_documents_what_readme_shows():
    subs = subcommands()
    commands = readme_cli_commands()
    shown = {c.split()[0] for c in commands if c.split()}
    # README shows every subcommand, and nothing else
    assert shown == set(subs), (shown, set(subs))
    for cmd in commands:
        name, rest = cmd.split()[0], cmd.split()[1:]
        flags = {w.split("=")[0] for w in re.findall(r"--[a-z][a-z0-9-]*", " ".join(rest))}
        missing = flags - options_of(subs[name])
        assert not missing, f"README shows `ckmerge-ray {name}` with {sorted(missing)}: not in the CLI"
    for name, sub in subs.items():  # a flag the parser requires is shown with its subcommand
        required = {a.option_strings[-1] for a in sub._actions if a.required and a.option_strings}
        for flag in required:
            assert any(flag in c.split() for c in commands if c.split()[0] == name), (name, flag)
    # inline `--flag` mentions (option tables, prose) exist in some subcommand
    every = set().union(*(options_of(s) for s in subs.values()))
    inline = {m for m in re.findall(r"`(--[a-z][a-z0-9-]*)", README)}
    assert inline, "README shows no inline --flag: the pattern is broken"
    missing = inline - every - set(FOREIGN_FLAGS)
    assert not missing, f"README shows {sorted(missing)}, which no ckmerge-ray subcommand has"
    # the foreign ones really are foreign (else they would hide a CLI flag from this check)
    assert not (set(FOREIGN_FLAGS) & every)
    assert "--mmlu" in (ROOT / "examples" / "tune_on_lmeval.py").read_text()
