"""Help that guides: every --flag a help text or a documented command line mentions exists, required options are
marked, the width follows COLUMNS, the top-level list shows whole descriptions, the common options come first,
and ``kdcli --help`` never imports torch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kdcli.cli import app

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
runner = CliRunner()


def commands() -> dict:
    """'cache-teacher', ..., 'cache verify': every command by the words that run it."""
    out = {}
    for name, cmd in typer.main.get_command(app).commands.items():
        if hasattr(cmd, "commands"):  # a group (typer may bring its own click)
            out.update({f"{name} {sub}": c for sub, c in cmd.commands.items()})
        else:
            out[name] = cmd
    return out


def flags_of(cmd) -> set[str]:
    return {o for p in cmd.params for o in getattr(p, "opts", [])} | {"--help"}


def help_flag_problems(cmds: dict) -> list[str]:
    """``COMMAND: --flag`` for each option a help text names that its command lacks. Another command's option is
    fine where the text names that command ("see cache-teacher --temperatures")."""
    wrong = []
    for name, cmd in cmds.items():
        texts = [cmd.help or "", cmd.epilog or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        for text in texts:
            named = [other for other in cmds if other != name and re.search(rf"(?<![\w-]){other}(?![\w-])", text)]
            known = flags_of(cmd).union(*(flags_of(cmds[o]) for o in named))
            wrong += [f"{name}: {flag}" for flag in FLAG.findall(text) if flag not in known]
    return wrong


def test_every_flag_a_help_text_mentions_exists():
    cmds = commands()
    assert {"cache-teacher", "train-student", "eval", "compress", "cache verify"} <= set(cmds)
    assert not help_flag_problems(cmds)


def documented_command_lines() -> list[tuple[str, str, str]]:
    """(file, command, rest of the line) of every `kdcli COMMAND ...` in the README, docs/ and examples/."""
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").rglob("*.sh")]
    files += [*(ROOT / "examples").rglob("*.yaml")]
    cmds = commands()
    found = []
    for f in files:
        text = f.read_text().replace("\\\n", " ")  # shell continuation lines
        for m in re.finditer(r"kdcli\s+(cache\s+[a-z]+|[a-z][a-z-]+)([^\n`|;)]*)", text):
            cmd = re.sub(r"\s+", " ", m.group(1))
            if cmd in cmds:
                found.append((f.relative_to(ROOT).as_posix(), cmd, m.group(2)))
    return found


def test_every_flag_in_a_documented_command_line_exists():
    lines = documented_command_lines()
    assert len(lines) > 30  # the README, the docs and the examples are read
    cmds = commands()
    wrong = [
        f"{f}: kdcli {cmd} {flag}"
        for f, cmd, rest in lines
        for flag in FLAG.findall(rest)
        if flag not in flags_of(cmds[cmd])
    ]
    assert not wrong, f"documented command lines use options that do not exist: {wrong}"


def test_a_help_text_naming_a_missing_flag_is_caught(monkeypatch):
    """The check can fail: a help text naming --model-weights (which eval's once did) is reported."""
    cmds = commands()
    p = next(p for p in cmds["eval"].params if p.name == "model")
    monkeypatch.setattr(p, "help", p.help + " See --model-weights.")
    assert help_flag_problems(cmds) == ["eval: --model-weights"]


@pytest.mark.parametrize(
    "command, required",
    [
        ("train-student", ["--data", "--student", "--out"]),
        ("cache-teacher", ["--teacher", "--data", "--out"]),
        ("eval", ["--model", "--data"]),
        ("compress", ["--model", "--out"]),
    ],
)
def test_required_options_are_marked(command: str, required: list[str]):
    cmd = commands()[command]
    marked = {p.opts[0] for p in cmd.params if "[required]" in (getattr(p, "help", None) or "")}
    assert marked == set(required)


def test_help_width_follows_columns_and_descriptions_are_whole():
    wide = runner.invoke(app, ["train-student", "--help"], env={"COLUMNS": "150"})
    narrow = runner.invoke(app, ["train-student", "--help"], env={"COLUMNS": "90"})
    assert max(map(len, wide.stdout.splitlines())) == 150 and max(map(len, narrow.stdout.splitlines())) == 90
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "100"}).stdout
    assert "…" not in top
    words = " ".join(top.replace("│", " ").split())  # the rich box's borders and line breaks dropped
    for name, cmd in commands().items():
        if " " not in name:
            assert " ".join((cmd.help or "").split("\n\n")[0].split()) in words, name  # whole, not cut at "…"


def test_the_common_options_come_first():
    text = runner.invoke(app, ["train-student", "--help"], env={"COLUMNS": "200"}).stdout
    listed = [line.split()[1] for line in text.splitlines() if line.startswith("│ --")]  # options in help order
    common = [listed.index(f) for f in ("--data", "--cache", "--temperature", "--alpha", "--student", "--epochs")]
    for rare in ("--cache-weights", "--combine", "--peft-arg", "--fsdp", "--approximate-temperature"):
        assert max(common) < listed.index(rare), rare


def test_kdcli_help_imports_no_torch():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kdcli", "--help"], capture_output=True, text=True, env=env
    )
    assert p.returncode == 0 and "Usage" in p.stdout
    modules = {line.split("|")[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert "kdcli.cli" in modules  # the import log was read
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "numpy", "h5py", "transformers"))
    assert not heavy, heavy[:5]
