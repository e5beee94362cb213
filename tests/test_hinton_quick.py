"""examples/hinton-mnist/run.sh, exercised three ways.

- every ``kdcli`` command the script runs, in quick AND full mode, parses and resolves to a valid config (a stand-in
  ``kdcli`` on PATH records the argv; nothing is trained): an option renamed in the CLI breaks this test, not the
  example (< 5 s);
- quick mode replayed in one process (the script's exact argv through the CLI, ~9 commands on MNIST slices): the
  CI-sized run, it checks the files, the comparison table, the omit-3 rows and the PNG;
- quick mode as a real subprocess script (slow: one interpreter start and MNIST load per command).
"""

import os
import stat
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.config import CacheConfig, EvalConfig, TrainConfig, field_type, fields_of, parse_kv, resolve
from kdcli.data import split_filter, split_slice
from kdcli.models.classifiers import BUILTINS, build_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "hinton-mnist" / "run.sh"
CONFIGS = {"cache-teacher": CacheConfig, "train-student": TrainConfig, "eval": EvalConfig}
runner = CliRunner()


def record_commands(tmp_path: Path, out: Path, quick: bool) -> list[list[str]]:
    """Run the script with a stand-in kdcli that only records its arguments; one list per command."""
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir(exist_ok=True)
    shim = shim_dir / "kdcli"
    shim.write_text(
        "#!/usr/bin/env bash\n{ for a in \"$@\"; do printf '%s\\x1f' \"$a\"; done; printf '\\n'; } "
        '>> "$KDCLI_ARGV_LOG"\n'
    )
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / f"argv-{int(quick)}.log"
    env = {
        **os.environ,
        "PATH": f"{shim_dir}{os.pathsep}{os.environ['PATH']}",
        "KDCLI_ARGV_LOG": str(log),
        "QUICK": "1" if quick else "0",
    }
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]


def resolve_argv(argv: list[str]):
    """Parse argv exactly as the CLI does (click parser + config resolution), without running the command."""
    name, rest = argv[0], argv[1:]
    cls = CONFIGS[name]
    cmd = typer.main.get_command(app).commands[name]
    params = dict(cmd.make_context(name, list(rest)).params)
    config = params.pop("config")
    params.pop("debug")
    kinds = {f.name: field_type(f)[0] for f in fields_of(cls)}
    overrides = {}
    for key, value in params.items():
        if kinds[key] is dict:
            value = parse_kv(value, key) if value else None
        elif kinds[key] is list:
            value = list(value) if value else None
        overrides[key] = value
    return name, resolve(cls, config, overrides)


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_every_command_of_the_script_resolves(tmp_path: Path, quick: bool):
    out = tmp_path / "out"
    commands = record_commands(tmp_path, out, quick)
    names = [c[0] for c in commands]
    assert names == [
        "train-student",
        "cache-teacher",
        "cache-teacher",
        "train-student",
        "train-student",
        "eval",
        "cache-teacher",
        "train-student",
        "eval",
    ]
    cfgs = [resolve_argv(c) for c in commands]
    for name, cfg in cfgs:
        for spec in filter(
            None, [getattr(cfg, "data", None), getattr(cfg, "eval_data", None), getattr(cfg, "bias_data", None)]
        ):
            base, _ = split_filter(spec)
            assert split_slice(base)[0] in ("mnist:train", "mnist:test"), spec
        if name == "train-student" and cfg.student in BUILTINS:  # model arguments build the model
            build_model(cfg.student, cfg.student_args, num_classes=10, input_shape=(1, 28, 28))
    teacher, cache, _, baseline, distilled, ev, cache3, omit3, ev3 = (c for _, c in cfgs)
    assert teacher.augment == "shift:2" and teacher.student_args["dropout"] > 0
    assert cache.views > 1 and cache.augment == "shift:2" and cache.teacher == teacher.out
    # the same student and the same budget (training rows) for the baseline and the distilled student
    assert baseline.student_args == distilled.student_args == {"hidden": [800, 800]}
    assert not baseline.cache and distilled.cache == [cache.out]  # --cache is a list (repeat it to fuse teachers)
    assert baseline.epochs == distilled.epochs * cache.views and baseline.batch_size == distilled.batch_size
    assert ev.model == [teacher.out, baseline.out, distilled.out] and ev.plot and ev.cache
    assert "?omit=3" in cache3.data and omit3.data == cache3.data and omit3.cache == [cache3.out]
    assert ev3.class_bias == {"3": "fit"} and ev3.bias_data and ev3.bias_data != ev3.data


def test_quick_mode_in_one_process(tmp_path: Path):
    """The script's quick-mode commands, argv for argv, through the CLI in this process."""
    out = tmp_path / "out"
    outputs = []
    for argv in record_commands(tmp_path, out, quick=True):
        res = runner.invoke(app, argv)
        assert res.exit_code == 0, f"kdcli {' '.join(argv)}\n{res.output}"
        outputs.append(res.stdout)
    for run in ("teacher", "baseline", "distilled", "distilled-omit3"):
        assert (out / run / "model.safetensors").is_file() and (out / run / "metrics.jsonl").is_file()
    for cache in ("cache-train", "cache-test", "cache-omit3"):
        assert (out / cache / "manifest.json").is_file()
    assert (out / "hinton-mnist.png").read_bytes()[:4] == b"\x89PNG"
    table, omit3 = outputs[5], outputs[8]
    for row in (
        "errors",
        "accuracy",
        "NLL",
        "ECE",
        "agreement w/ teacher",
        "parameters",
        "samples/s",
        "teacher",
        "baseline",
        "distilled",
    ):
        assert row in table
    assert "errors on class 3 (of" in omit3 and "class bias" in omit3 and "errors before bias" in omit3


@pytest.mark.slow
def test_quick_mode_script(tmp_path: Path):
    """QUICK=1 bash examples/hinton-mnist/run.sh, as CI or a user runs it (each command a new process)."""
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env={**os.environ, "QUICK": "1"}, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "agreement w/ teacher" in proc.stdout and "errors on class 3 (of" in proc.stdout
    assert (out / "hinton-mnist.png").is_file() and "[hinton-mnist] done" in proc.stderr
