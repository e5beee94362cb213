"""Shared by tests/test_formats_*.py: the CLI run in-process with its exit code and one-line error checked."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from kdcli.cli import app


def kdcli(*args, code: int = 0, err: str | None = None):
    """Run ``kdcli ARGS`` in-process (typer's CliRunner: the command path a shell runs); check the exit code and,
    on failure, that stderr ends in exactly one ``error:`` line (containing ``err``) with no traceback."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, f"exit {r.exit_code}: {r.stderr}{r.stdout}"
    if code:
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert "Traceback" not in r.stderr and lines[-1].startswith("error:"), r.stderr
        assert sum(x.startswith("error:") for x in lines) == 1, r.stderr
        assert not r.stdout.strip(), r.stdout
        if err is not None:
            assert err in lines[-1], lines[-1]
    return r


def run_dir_metrics(d: Path) -> list[dict]:
    """The per-epoch records train-student wrote (metrics.jsonl)."""
    return [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
