"""Nothing kdcli only reads can make it run code or read outside what it was given (docs/failures.md, "What
kdcli never does").

Each case plants a payload that would write a marker file if it ever ran (proved live where that is possible),
hands kdcli the poisoned input the way a user would (the CLI, in a real process where stdin matters), and checks
the one-line refusal, its exit code, an empty stdout, and that no marker exists:

- a run dir whose model.json names plugin code outside its own model_source.py (absolute, ``../``, another file of
  the run dir, a model_source.py that is a link out of it), for classification and language-model runs, through
  ``eval``, ``cache-teacher --teacher RUN``, ``train-student --student RUN`` and ``compress``;
- a peft adapter run whose ``peft.base`` names a plugin, a built-in, a missing path, or a base whose weights
  changed: refused before the base is loaded;
- a Hugging Face model dir whose config.json has ``auto_map`` (its own configuration/modeling code), with "y" on
  stdin: refused, nothing on stdout, no code run; ``--trust-remote-code`` is the one way in (and then it runs);
- a cache manifest whose shard names leave the cache (``../``, an absolute path): refused before any file outside
  is opened or sized; a saved dataset whose state.json lists files elsewhere: the same;
- pickles where kdcli reads weights, checkpoints, adapters, shards and data: refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_blobs
from lm_helpers import make_llama, make_tokenizer, text_rows, write_jsonl
from typer.testing import CliRunner

from kdcli.cli import app

EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


class Payload:
    """Unpickling this writes the marker: a pickle that proves whether a loader executes code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory, one_thread) -> Path:
    d = tmp_path_factory.mktemp("sec")
    marker = d / "PWNED"
    (d / "evil.py").write_text(EVIL.format(marker=str(marker)) + "def make(**kw):\n    return None\n")
    runner = CliRunner()

    def cli(*args):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.stderr[-2000:]

    x, y = make_blobs(n=200)
    np.savez(d / "blobs.npz", x=x, y=y)
    cli("train-student", "--student", "mlp", "--data", d / "blobs.npz", "--out", d / "cls-run", "--epochs", 1)
    cli("cache-teacher", "--teacher", d / "cls-run", "--data", d / "blobs.npz", "--out", d / "cls-cache")
    tok = make_tokenizer(d / "tok")
    make_llama(d / "llama", tok)
    write_jsonl(d / "text.jsonl", text_rows(8))
    cli(
        "cache-teacher",
        "--teacher",
        d / "llama",
        "--data",
        d / "text.jsonl",
        "--out",
        d / "lm-cache",
        "--max-length",
        32,
        "--top-k",
        4,
    )
    cli(
        "train-student",
        "--student",
        "transformer",
        "--student-arg",
        "d_model=16",
        "--student-arg",
        "n_layers=1",
        "--data",
        d / "text.jsonl",
        "--cache",
        d / "lm-cache",
        "--out",
        d / "lm-run",
        "--epochs",
        1,
    )
    cli(
        "train-student",
        "--student",
        d / "llama",
        "--peft",
        "lora",
        "--peft-save",
        "adapter",
        "--data",
        d / "text.jsonl",
        "--cache",
        d / "lm-cache",
        "--out",
        d / "adapter-run",
        "--epochs",
        1,
    )
    # the payloads are live: importing evil.py and unpickling a Payload both write the marker
    subprocess.run([sys.executable, str(d / "evil.py")], check=True)
    assert marker.exists()
    marker.unlink()
    torch.save(Payload(marker), d / "evil.pt")
    torch.load(d / "evil.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    return d


def hijack(ws: Path, run: str, name: str, edit) -> Path:
    """A copy of run dir ``run`` whose model.json is edited by ``edit(meta) -> meta``."""
    dst = ws / name
    if not dst.exists():
        shutil.copytree(ws / run, dst)
        meta = json.loads((dst / "model.json").read_text())
        (dst / "model.json").write_text(json.dumps(edit(meta)))
    return dst


def refused(ws: Path, argv: list, code: int, match: str, stdin: str | None = None, process: bool = False) -> str:
    """Run kdcli (in-process through typer's CliRunner, or as a real process: where stdin must be a real pipe);
    check the exit code, one error line matching ``match``, nothing on stdout, no marker. Returns stderr."""
    if process:
        p = subprocess.run(
            [sys.executable, "-m", "kdcli", *map(str, argv)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        rc, out, err = p.returncode, p.stdout, p.stderr
    else:
        r = CliRunner().invoke(app, [str(a) for a in argv], input=stdin)
        rc, out, err = r.exit_code, r.stdout, r.stderr
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert rc == code, err[-3000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert re.search(match, errors[0]), errors[0]
    assert out == "", out
    assert not (ws / "PWNED").exists(), "a file kdcli read made it run code"
    return err


OUTSIDE = {
    "absolute": lambda ws: f"{ws}/evil.py:make",
    "dot-dot": lambda ws: "../evil.py:make",
    "another file of the run": lambda ws: "helper.py:make",
}


@pytest.mark.parametrize("where", list(OUTSIDE))
@pytest.mark.parametrize("kind", ["cls", "lm"])
def test_run_dir_plugin_outside_its_model_source_never_runs(ws, kind, where, tmp_path):
    spec = OUTSIDE[where](ws)
    if kind == "cls":
        run = hijack(ws, "cls-run", f"h-cls-{where}", lambda m: {**m, "spec": spec})
        data = ws / "blobs.npz"
    else:
        run = hijack(ws, "lm-run", f"h-lm-{where}", lambda m: {**m, "model_kind": "plugin", "spec": spec})
        data = ws / "text.jsonl"
    shutil.copy(ws / "evil.py", run / "helper.py")
    msg = r"model\.json names plugin code .*; a run dir may only name its own model_source\.py"
    refused(ws, ["eval", "--model", run, "--data", data], 2, msg)
    refused(ws, ["cache-teacher", "--teacher", run, "--data", data, "--out", tmp_path / "c"], 2, msg)
    refused(ws, ["compress", "--model", run, "--out", tmp_path / "z", "--quantize", "int8"], 2, msg)
    assert not (tmp_path / "c").exists() and not (tmp_path / "z").exists()


def test_a_model_source_that_links_out_of_the_run_dir_never_runs(ws, tmp_path):
    run = hijack(ws, "cls-run", "h-link", lambda m: {**m, "spec": "model_source.py:make"})
    (run / "model_source.py").symlink_to(ws / "evil.py")
    refused(ws, ["eval", "--model", run, "--data", ws / "blobs.npz"], 2, r"model_source\.py is missing or a link out")
    refused(
        ws,
        ["train-student", "--student", run, "--data", ws / "blobs.npz", "--out", tmp_path / "r"],
        2,
        r"model_source\.py is missing or a link out",
    )
    assert not (tmp_path / "r").exists()


BASES = {
    "a plugin": (lambda ws: f"{ws}/evil.py:make", r"names '.*evil\.py:make' as its adapter's base; a base must be"),
    "a built-in name": (lambda ws: "transformer", r"names 'transformer' as its adapter's base; a base must be"),
    "a missing path": (lambda ws: f"{ws}/gone", r"as its adapter's base; a base must be"),
    "another model (weights changed)": (lambda ws: str(ws / "lm-run"), r"has changed since the adapter was trained"),
}


@pytest.mark.parametrize("base", list(BASES))
def test_an_adapter_base_is_checked_before_it_loads(ws, base):
    spec, match = BASES[base]
    run = hijack(
        ws, "adapter-run", f"h-peft-{base.split()[1]}", lambda m: {**m, "peft": {**m["peft"], "base": spec(ws)}}
    )
    refused(ws, ["eval", "--model", run, "--data", ws / "text.jsonl"], 2, match)


def _auto_map_dir(ws: Path) -> Path:
    d = ws / "remote-code-model"
    if not d.exists():
        shutil.copytree(ws / "llama", d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["auto_map"] = {
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilModel",
        }
        (d / "config.json").write_text(json.dumps(cfg))
        for name in ("configuration_evil.py", "modeling_evil.py"):
            (d / name).write_text(EVIL.format(marker=str(ws / "PWNED")))
    return d


def test_a_model_dir_with_its_own_code_is_refused_even_with_yes_on_stdin(ws, tmp_path):
    d = _auto_map_dir(ws)
    msg = r"asks to run its own code .*via auto_map.*unless you pass --trust-remote-code"
    refused(
        ws,
        ["cache-teacher", "--teacher", d, "--data", ws / "text.jsonl", "--out", tmp_path / "c", "--max-length", 32],
        2,
        msg,
        stdin="y\ny\n",
        process=True,
    )
    refused(ws, ["eval", "--model", d, "--data", ws / "text.jsonl"], 2, msg, stdin="y\n")
    refused(
        ws,
        [
            "train-student",
            "--student",
            d,
            "--data",
            ws / "text.jsonl",
            "--cache",
            ws / "lm-cache",
            "--out",
            tmp_path / "r",
        ],
        2,
        msg,
        stdin="y\n",
    )
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


def test_trust_remote_code_is_the_one_way_in(ws, tmp_path):
    """With --trust-remote-code transformers runs the directory's code (here a module that does nothing else, so
    loading then fails): the opt-in is real, and without it nothing ran (test above)."""
    d = _auto_map_dir(ws)
    r = CliRunner().invoke(app, ["eval", "--model", str(d), "--data", str(ws / "text.jsonl"), "--trust-remote-code"])
    try:
        assert (ws / "PWNED").exists(), r.stderr[-2000:]
        assert r.exit_code == 2 and "Traceback" not in r.stderr
    finally:
        (ws / "PWNED").unlink(missing_ok=True)


@pytest.mark.parametrize("name", ["../cls-cache/shard-00000.h5", "/etc/passwd", "shard-00000.h5/../../x.h5"])
def test_shard_names_never_leave_the_cache(ws, name):
    c = ws / f"c-escape-{abs(hash(name))}"
    shutil.copytree(ws / "cls-cache", c)
    m = json.loads((c / "manifest.json").read_text())
    m["shards"][0]["name"] = name
    (c / "manifest.json").write_text(json.dumps(m))
    msg = r"shard names are shard-NNNNN\.h5 inside the cache directory"
    refused(ws, ["eval", "--model", ws / "cls-run", "--data", ws / "blobs.npz", "--cache", c], 3, msg)
    refused(ws, ["cache", "verify", c], 3, msg)


def test_a_saved_dataset_cannot_point_outside_itself(ws, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(text_rows(4))
    ds.save_to_disk(str(tmp_path / "saved"))
    state = json.loads((tmp_path / "saved" / "state.json").read_text())
    shutil.copy(tmp_path / "saved" / state["_data_files"][0]["filename"], tmp_path / "elsewhere.arrow")
    state["_data_files"][0]["filename"] = "../elsewhere.arrow"
    (tmp_path / "saved" / "state.json").write_text(json.dumps(state))
    refused(
        ws,
        ["eval", "--model", ws / "lm-run", "--data", tmp_path / "saved"],
        2,
        r"state\.json lists the data file '\.\./elsewhere\.arrow'; a saved dataset's files are plain file names",
    )


def _pickled(ws: Path, dst: Path, name: str) -> Path:
    shutil.copy(ws / "evil.pt", dst / name)
    return dst


PICKLES = {
    "HF model dir with a pickle for weights (pytorch_model.bin)": (
        lambda ws, t: [
            "cache-teacher",
            "--teacher",
            _hf_with_bin(ws, t),
            "--data",
            ws / "text.jsonl",
            "--out",
            t / "c",
            "--max-length",
            32,
        ],
        2,
        r"cannot load a causal LM from .*",
    ),
    "run dir whose model.safetensors is a pickle": (
        lambda ws, t: [
            "eval",
            "--model",
            _pickled(ws, _copy(ws, "cls-run", t), "model.safetensors"),
            "--data",
            ws / "blobs.npz",
        ],
        2,
        r"cannot read safetensors file .*model\.safetensors",
    ),
    "adapter run whose adapter is a pickle (adapter_model.bin)": (
        lambda ws, t: ["eval", "--model", _adapter_bin(ws, t), "--data", ws / "text.jsonl"],
        2,
        r"has no adapter_model\.safetensors \(kdcli reads adapters as safetensors only\)",
    ),
    "cache shard that is a pickle": (
        lambda ws, t: ["eval", "--model", ws / "cls-run", "--data", ws / "blobs.npz", "--cache", _pickled_shard(ws, t)],
        3,
        r"shard-00000\.h5 has \d+ bytes, the manifest says",
    ),
    "teacher weights that are a pickle": (
        lambda ws, t: [
            "cache-teacher",
            "--teacher",
            "mlp",
            "--teacher-weights",
            ws / "evil.pt",
            "--data",
            ws / "blobs.npz",
            "--out",
            t / "c",
        ],
        2,
        r"refusing to load .*evil\.pt",
    ),
    "checkpoint that is a pickle": (
        lambda ws, t: ["train-student", "--student", "mlp", "--data", ws / "blobs.npz", "--out", _interrupted(ws, t)],
        2,
        r"cannot load .*checkpoint\.pt as a plain checkpoint",
    ),
}


def _copy(ws: Path, run: str, t: Path) -> Path:
    shutil.copytree(ws / run, t / run)
    return t / run


def _hf_with_bin(ws: Path, t: Path) -> Path:
    d = _copy(ws, "llama", t)
    (d / "model.safetensors").unlink()
    return _pickled(ws, d, "pytorch_model.bin")


def _adapter_bin(ws: Path, t: Path) -> Path:
    d = _copy(ws, "adapter-run", t)
    (d / "adapter_model.safetensors").unlink()
    return _pickled(ws, d, "adapter_model.bin")


def _pickled_shard(ws: Path, t: Path) -> Path:
    d = _copy(ws, "cls-cache", t)
    return _pickled(ws, d, "shard-00000.h5")


def _interrupted(ws: Path, t: Path) -> Path:
    d = t / "run"
    d.mkdir()
    shutil.copy(ws / "cls-run" / "config.yaml", d / "config.yaml")
    return _pickled(ws, d, "checkpoint.pt")


@pytest.mark.parametrize("case", list(PICKLES))
def test_pickles_are_never_unpickled(ws, tmp_path, case):
    argv, code, match = PICKLES[case]
    refused(ws, argv(ws, tmp_path), code, match)
