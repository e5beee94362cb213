"""The part of the CLI that rests on Typer/Click, on whichever Typer is installed.

.ci/run also runs this file against the lowest Typer that pyproject.toml allows (pip install --target into a temp
dir, first on PYTHONPATH), so the declared floor is tested, not guessed. Typer < 0.26 is built on the ``click``
package, Typer >= 0.26 on a private vendored copy; kdcli uses neither by name (tests/test_layering.py).
"""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_blobs, run_cli
from typer.testing import CliRunner

from kdcli import __version__
from kdcli.cli import app
from kdcli.config import CacheConfig, EvalConfig, TrainConfig, fields_of

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

COMMANDS = {"cache-teacher": CacheConfig, "train-student": TrainConfig, "eval": EvalConfig, "cache verify": None}


def flags_of(cls) -> list[str]:
    """Every config field's flag, as README documents them: ``batch_size`` -> ``--batch-size``; a dict field
    ``student_args`` -> the repeatable ``--student-arg``."""
    out = []
    for f in fields_of(cls):
        name = f.name[:-1] if f.name.endswith("_args") else f.name
        out.append("--" + name.replace("_", "-"))
    return out


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def typer_floor() -> tuple[int, ...]:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"typer>=([\d.]+)', text)
    assert m, "pyproject.toml declares no typer>= floor"
    return tuple(int(x) for x in m.group(1).split("."))


def test_installed_typer_is_not_below_the_declared_floor():
    installed = tuple(int(x) for x in re.findall(r"\d+", version("typer"))[:3])
    assert installed >= typer_floor(), f"typer {version('typer')} is below the floor pyproject.toml declares"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_every_option(command):
    r = runner.invoke(app, [*command.split(), "--help"])
    assert r.exit_code == 0, r.output
    assert r.stdout.lstrip().startswith(f"Usage: kdcli {command} [OPTIONS]"), r.stdout[:200]
    expected = (
        ["--config", "--debug", *flags_of(COMMANDS[command])]
        if COMMANDS[command]
        else ["CACHE_DIR", "--data", "--json", "--debug"]
    )
    missing = [f for f in expected if not re.search(rf"(^|\s|,){re.escape(f)}(\s|$|,|/)", r.stdout, re.M)]
    assert not missing, f"{missing} not in:\n{r.stdout}"


def test_version():
    r = runner.invoke(app, ["--version"])
    assert (r.exit_code, r.stdout) == (0, f"kdcli {__version__}\n")


@pytest.mark.parametrize(
    "argv, where, pattern",
    [
        (["train-student", "--tempreature", "2"], "train-student", r"No such option:? '?--tempreature'?"),
        (["eval", "--min-accuracy", "high"], "eval", r"Invalid value for '--min-accuracy'"),
        (["train-student", "--epochs", "many"], "train-student", r"Invalid value for '--epochs'"),
        (["cache", "verify"], "cache verify", r"Missing argument 'CACHE_DIR'"),
        (["cache", "verify", "a", "b"], "cache verify", r"unexpected extra argument(\(s\))? \(b\)"),
        (["cache", "nope"], "cache", r"No such command '?nope'?"),
        (["eval", "--model"], "eval", r"Option '--model' requires an argument"),
    ],
)
def test_usage_errors_are_one_line_exit_2(argv, where, pattern, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, argv)
    line = one_error_line(r.stderr)
    assert r.exit_code == 2, line
    assert re.search(pattern, line), f"{pattern!r} not in {line!r}"
    assert line.endswith(f"(see 'kdcli {where} --help')"), line
    assert r.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("typer")
    x, y = make_blobs(n=200)
    np.savez(d / "blobs.npz", x=x, y=y)
    (d / "run.yaml").write_text("lr: 0.02\nseed: 3\n")
    return d


def test_every_kind_of_value_reaches_the_config(tiny):
    """int, float, str, a repeated KEY=VALUE dict, a bool switch, a YAML --config overridden by a flag: each arrives
    with its type (the resolved config the run dir records is the reference)."""
    out = tiny / "run"
    r = runner.invoke(
        app,
        [
            "train-student",
            "--student",
            "mlp",
            "--student-arg",
            "hidden=[8]",
            "--student-arg",
            "dropout=0.1",
            "--data",
            str(tiny / "blobs.npz"),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--config",
            str(tiny / "run.yaml"),
            "--seed",
            "5",
            "--schedule",
            "cosine",
        ],
    )
    assert r.exit_code == 0, r.stderr
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["student_args"] == {"hidden": [8], "dropout": 0.1}
    assert (cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["seed"], cfg["schedule"]) == (2, 64, 0.02, 5, "cosine")
    r = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(out),
            "--model",
            str(out),
            "--data",
            str(tiny / "blobs.npz"),
            "--json",
            "--min-accuracy",
            "0.0",
        ],
    )
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [m["model"] for m in doc["models"]] == [str(out), str(out)]
    r = runner.invoke(
        app, ["eval", "--model", str(out), "--data", str(tiny / "blobs.npz"), "--json", "--min-accuracy", "1.0"]
    )  # 2 epochs on noisy blobs: never 100%
    assert r.exit_code == 1 and json.loads(r.stdout)["failures"], r.stderr


def test_a_real_process_reports_usage_errors_in_one_line(tmp_path):
    p = run_cli("train-student", "--bogus", cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == ""
    assert re.search(r"No such option:? '?--bogus'?", one_error_line(p.stderr))
    p = run_cli("--version", cwd=tmp_path)
    assert (p.returncode, p.stdout) == (0, f"kdcli {__version__}\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [[], ["cache"]])
def test_a_group_alone_shows_its_help(argv):
    r = runner.invoke(app, argv)
    assert r.exit_code in (0, 2), r.output  # Click < 8.2: help on stdout, exit 0; since: on stderr, exit 2
    shown = r.stdout + r.stderr
    assert shown.lstrip().startswith(f"Usage: kdcli {' '.join(argv)}".rstrip() + " [OPTIONS] COMMAND"), shown[:200]
    assert "error:" not in shown and "Traceback" not in shown
