"""The bad-input battery: every case exits with its documented code, says what is wrong in one ``error:`` line on
stderr, shows no traceback, and leaves every existing output byte-for-byte as it was.

Most cases run the real CLI in-process (typer's CliRunner: the same command path a shell runs, ~0.1 s a case);
the ones that need a real process (Ctrl-C, a real file-size limit) are subprocesses at the end of the file.
The workspace (a teacher run, its cache, a finished student run) is built once; damaged caches are copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import make_blobs
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.config import CacheConfig, TrainConfig
from kdcli.infra import crashpoints
from kdcli.models.weights import sha256_file
from kdcli.stages.cache import cache_teacher
from kdcli.stages.train import train_student

PLUGINS = '''
import torch
from torch import nn


def narrow(num_classes, input_shape):
    return nn.Linear(input_shape[0], 3)  # always 3 outputs, whatever the data's classes


class NanAbove(nn.Module):
    """A teacher that returns NaN logits for rows whose first feature is huge (row 300 of nanrow.npz)."""

    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.lin = nn.Linear(input_shape[0], num_classes)

    def forward(self, x):
        out = self.lin(x)
        return torch.where((x[:, :1] > 1e5), torch.full_like(out, float("nan")), out)


def nan_teacher(num_classes, input_shape):
    return NanAbove(num_classes, input_shape)


def boom(num_classes, input_shape):
    raise RuntimeError("the user's factory has a bug")
'''


class Evil:
    """Unpickling this calls open(marker, "w"): a payload that proves whether a loader executes code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory, one_thread) -> Path:
    d = tmp_path_factory.mktemp("bad")
    _build(d)
    return d


def _build(d: Path) -> None:
    x, y = make_blobs(n=600)
    np.savez(d / "blobs.npz", x=x, y=y)
    xo, yo = make_blobs(n=600, seed=1)
    np.savez(d / "other.npz", x=xo, y=yo)
    perm = np.arange(600)
    perm[[0, 1]] = perm[[1, 0]]
    np.savez(d / "reordered.npz", x=x[perm], y=y[perm])
    np.savez(d / "six.npz", x=x, y=np.where(np.arange(600) == 5, 5, y))  # one label 5: six classes
    np.savez(d / "negative.npz", x=x, y=np.where(np.arange(600) == 7, -1, y))
    np.savez(d / "fractional.npz", x=x, y=y + 0.5)
    xn = x.copy()
    xn[3, 2] = np.nan
    np.savez(d / "nan_inputs.npz", x=xn, y=y)
    xb = x.copy()
    xb[300, 0] = 1e6
    np.savez(d / "nanrow.npz", x=xb, y=y)
    np.savez(d / "empty.npz", x=np.zeros((0, 8), np.float32), y=np.zeros((0,), np.int64))
    np.savez(d / "no_y.npz", x=x)
    (d / "garbage.npz").write_bytes(os.urandom(256))
    x10, y10 = make_blobs(n=200, classes=10, seed=3)
    np.savez(d / "ten.npz", x=x10, y=y10)
    (d / "plugins.py").write_text(PLUGINS)

    train_student(
        TrainConfig(
            student="mlp",
            student_args={"hidden": [32]},
            data=str(d / "blobs.npz"),
            out=str(d / "teacher"),
            epochs=2,
            lr=3e-3,
        )
    )
    train_student(TrainConfig(student="mlp", data=str(d / "ten.npz"), out=str(d / "ten_run"), epochs=1))
    cache_teacher(
        CacheConfig(teacher=str(d / "teacher"), data=str(d / "blobs.npz"), out=str(d / "cache"), shard_size=128)
    )
    train_student(
        TrainConfig(student="mlp", data=str(d / "blobs.npz"), cache=str(d / "cache"), out=str(d / "student"), epochs=1)
    )
    from safetensors.torch import save_file

    from kdcli.models.classifiers import build_model

    for name, factory in (("narrow", "narrow"), ("nan", "nan_teacher")):
        model, _ = (
            build_model(f"{d}/plugins.py:{factory}", {}, num_classes=4, input_shape=(8,))
            if name == "nan"
            else (torch.nn.Linear(8, 3), None)
        )
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / f"{name}.safetensors"))

    # malicious pickles: prove the payload is live (a plain unpickle runs it), then keep the real markers absent
    torch.save(Evil(d / "proof-marker"), d / "evil.pt")
    torch.load(d / "evil.pt", weights_only=False)
    assert (d / "proof-marker").exists()
    (d / "proof-marker").unlink()
    torch.save(Evil(d / "PWNED"), d / "evil.pt")
    (d / "interrupted").mkdir()  # a run dir as a killed train-student leaves it, but with a poisoned checkpoint
    shutil.copy(d / "student" / "config.yaml", d / "interrupted" / "config.yaml")
    shutil.copy(d / "evil.pt", d / "interrupted" / "checkpoint.pt")
    shutil.copytree(d / "student", d / "hijacked_run")  # model.json pointing at code outside the run dir
    (d / "evil_plugin.py").write_text(f"open({str(d / 'PWNED')!r}, 'w')\ndef f(**kw):\n    pass\n")
    meta = json.loads((d / "hijacked_run" / "model.json").read_text())
    (d / "hijacked_run" / "model.json").write_text(json.dumps({**meta, "spec": f"{d}/evil_plugin.py:f"}))
    (d / "evil.yaml").write_text(f"epochs: !!python/object/apply:os.system ['touch {d / 'PWNED'}']\n")

    _damaged_caches(d)
    _damaged_manifests(d)
    _lm_workspace(d)


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "to be or not"}]}
RUNAWAY_TEMPLATES = {
    "divide": "{{ 1 / 0 }}",
    "recurse": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "repeat": "{{ messages[0]['content'] * 50000000 }}",
}


def _lm_workspace(d: Path) -> None:
    """A tiny tokenizer + llama, text / chat / damaged data, an LM cache and a LoRA adapter run."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from lm_helpers import make_llama, make_tokenizer, text_rows, write_jsonl

    tok = make_tokenizer(d / "tok")
    make_llama(d / "llama", tok)
    write_jsonl(d / "text.jsonl", text_rows(8))
    (d / "bad_utf8.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    (d / "deep.jsonl").write_text('{"text": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    write_jsonl(
        d / "sharegpt_bad_role.jsonl",
        [{"conversations": [{"from": {}, "value": "hi"}, {"from": "gpt", "value": "yo"}]}],
    )
    write_jsonl(d / "chat.jsonl", [CHAT_ROW] * 3)
    write_jsonl(d / "prompts.jsonl", [{"prompt": "to be or not"}, {"prompt": "the quick"}])  # cache-teacher --generate
    write_jsonl(d / "empty_prompt.jsonl", [{"prompt": "to be or not"}, {"prompt": " "}])
    for name, text in {**RUNAWAY_TEMPLATES, "chatml": CHATML}.items():
        (d / f"tpl_{name}.jinja").write_text(text)
    table = pa.Table.from_pylist(text_rows(64))
    pq.write_table(table, d / "text.parquet", compression="none", data_page_size=256)
    raw = bytearray((d / "text.parquet").read_bytes())
    raw[400:900] = b"\x00" * 500  # a corrupted data page; the footer (and so the schema) stays readable
    (d / "corrupt.parquet").write_bytes(bytes(raw))
    import datasets

    datasets.Dataset.from_list(text_rows(64)).save_to_disk(str(d / "saved"))
    shutil.copytree(d / "saved", d / "saved_truncated")
    arrow = next((d / "saved_truncated").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-300])
    (d / "empty_dir").mkdir()
    runner = CliRunner()
    for argv in (
        [
            "cache-teacher",
            "--teacher",
            d / "llama",
            "--data",
            d / "text.jsonl",
            "--out",
            d / "lm_cache",
            "--max-length",
            32,
            "--top-k",
            4,
        ],
        [
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
            d / "lm_cache",
            "--out",
            d / "adapter_run",
            "--epochs",
            1,
        ],
    ):
        r = runner.invoke(app, [str(a) for a in argv])
        assert r.exit_code == 0, r.stderr[-2000:]
    shutil.copytree(d / "llama", d / "remote_code_model")  # a model dir that asks to run its own code
    cfg = json.loads((d / "remote_code_model" / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "remote_code_model" / "config.json").write_text(json.dumps(cfg))
    (d / "remote_code_model" / "modeling_evil.py").write_text(f"open({str(d / 'PWNED')!r}, 'w')\n")
    shutil.copytree(d / "llama", d / "pickled_model")  # a model dir whose weights are a pickle
    (d / "pickled_model" / "model.safetensors").unlink()
    shutil.copy(d / "evil.pt", d / "pickled_model" / "pytorch_model.bin")
    (d / "a_file").write_text("not a directory")
    # cross-tokenizer: another tokenizer, one without offsets (ByT5's is slow-only), a cache from before token spans
    make_tokenizer(d / "tok2", vocab_size=280)
    from transformers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(str(d / "slow_tok"))
    shutil.copytree(d / "lm_cache", d / "lm_cache_nospans")
    m = json.loads((d / "lm_cache_nospans" / "manifest.json").read_text())
    del m["xtok"]
    (d / "lm_cache_nospans" / "manifest.json").write_text(json.dumps(m, indent=2))
    shutil.copytree(d / "lm_cache_nospans", d / "lm_cache_imported")  # what `kdcli cache import` records
    m["imported"], m["text"]["data_kind"] = {"format": "axolotl", "source": "x"}, "tokens"
    (d / "lm_cache_imported" / "manifest.json").write_text(json.dumps(m, indent=2))
    write_jsonl(d / "tokens.jsonl", [{"input_ids": [5, 6, 7, 8, 9, 10]}] * 4)  # pre-tokenized rows: no text
    (d / "hf_like").mkdir()  # what a Hugging Face model dir holds: never a kdcli run
    for name in ("config.json", "model.safetensors"):
        shutil.copy(d / "llama" / name, d / "hf_like" / name)


def _damaged_manifests(d: Path) -> None:
    """Copies of the cache whose manifest.json has one field damaged (the manifest itself is valid JSON)."""
    edits = {
        "m_shard_not_object": lambda m: m["shards"].__setitem__(0, "shard-00000.h5"),
        "m_shard_no_name": lambda m: m["shards"][0].pop("name"),
        "m_shards_null": lambda m: m.__setitem__("shards", None),
        "m_num_rows_text": lambda m: m.__setitem__("num_rows", "abc"),
        "m_data_null": lambda m: m.__setitem__("data", None),
        "m_mode_bogus": lambda m: m.__setitem__("mode", "bogus"),
        "m_shard_outside": lambda m: m["shards"][0].__setitem__("name", "../cache/shard-00000.h5"),
        "m_shard_absolute": lambda m: m["shards"][0].__setitem__("name", "/etc/passwd"),
    }
    for name, edit in edits.items():
        shutil.copytree(d / "cache", d / name)
        m = json.loads((d / name / "manifest.json").read_text())
        edit(m)
        (d / name / "manifest.json").write_text(json.dumps(m))


def _rehash(cache: Path, shard: str) -> None:
    """Make the manifest agree with an edited shard: only the content checks can then find the damage."""
    m = json.loads((cache / "manifest.json").read_text())
    for s in m["shards"]:
        if s["name"] == shard:
            s["bytes"], s["sha256"] = (cache / shard).stat().st_size, sha256_file(cache / shard)
    (cache / "manifest.json").write_text(json.dumps(m))


def _flip(path: Path, offset: int, mask: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= mask
    path.write_bytes(bytes(b))


def _damaged_caches(d: Path) -> None:
    def copy(name: str) -> Path:
        shutil.copytree(d / "cache", d / name)
        return d / name

    copy("cache_copy")  # the same cache at another path: a second teacher for the fusion cases
    s1 = "shard-00001.h5"
    with h5py.File(d / "cache" / s1, "r") as f:
        lp_offset = f["logprobs"].id.get_offset()
    c = copy("c_truncated")
    (c / s1).write_bytes((c / s1).read_bytes()[:-200])
    _flip(copy("c_flip_sign") / s1, lp_offset + 1, 0x80)  # sign bit of row 128's first fp16 log-prob
    _flip(copy("c_flip_low") / s1, lp_offset + 2, 0x01)  # lowest mantissa bit of one log-prob
    _flip(copy("c_flip_header") / s1, 0, 0x01)  # the HDF5 signature
    (copy("c_missing_shard") / "shard-00002.h5").unlink()
    (copy("c_no_manifest") / "manifest.json").unlink()
    c = copy("c_incomplete")
    m = json.loads((c / "manifest.json").read_text())
    m["complete"] = False
    (c / "manifest.json").write_text(json.dumps(m))
    c = copy("c_bad_json")
    (c / "manifest.json").write_text((c / "manifest.json").read_text()[:100])
    c = copy("c_nan")
    with h5py.File(c / s1, "r+") as f:
        f["logprobs"][5, 2] = np.nan
    _rehash(c, s1)
    c = copy("c_unnormalised")
    with h5py.File(c / s1, "r+") as f:
        f["logprobs"][10] = f["logprobs"][10] - np.float16(1.0)  # finite, <= 0, but the row's mass is e^-1
    _rehash(c, s1)
    c = copy("c_rows_swapped")
    with h5py.File(c / s1, "r+") as f:
        for k in f:
            a = f[k][()]
            a[[3, 4]] = a[[4, 3]]
            f[k][...] = a
    _rehash(c, s1)
    (d / "locked").mkdir()


@dataclass
class Case:
    args: Callable[[Path, Path], list]  # (workspace, fresh out dir) -> argv
    code: int
    message: str  # regex searched in the one error line
    env: dict = field(default_factory=dict)
    marker: bool = False  # a malicious file: check the payload did not run


def train(*extra, data="blobs.npz"):
    return lambda d, o: ["train-student", "--student", "mlp", "--data", d / data, "--out", o, "--epochs", 1, *extra]


def distill(cache: str, *extra, data="blobs.npz"):
    return lambda d, o: [
        "train-student",
        "--student",
        "mlp",
        "--data",
        d / data,
        "--out",
        o,
        "--epochs",
        1,
        "--cache",
        d / cache,
        *extra,
    ]


def xtok_train(*extra, tokenizer="tok2", cache="lm_cache", data="text.jsonl"):
    """train-student of a built-in LM student with its own tokenizer from the LM cache (T = 1: the cache's)."""
    return lambda d, o: [
        "train-student",
        "--student",
        "transformer",
        "--tokenizer",
        d / tokenizer,
        "--data",
        d / data,
        "--cache",
        d / cache,
        "--temperature",
        1,
        "--out",
        o,
        "--epochs",
        1,
        *extra,
    ]


def cache_cmd(*extra, data="blobs.npz", teacher="WS/teacher"):
    """cache-teacher argv; ``WS/`` in ``teacher`` and ``extra`` stands for the workspace."""
    return lambda d, o: [
        "cache-teacher",
        "--teacher",
        teacher,
        "--data",
        d / data,
        "--out",
        o,
        "--shard-size",
        128,
        "--batch-size",
        50,
        *extra,
    ]


def yaml_train(text: str):
    def args(d: Path, o: Path) -> list:
        cfg = o.parent / f"{o.name}.yaml"  # written before the snapshot is taken
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(text)
        return ["train-student", "--student", "mlp", "--data", d / "blobs.npz", "--out", o, "--config", cfg]

    return args


CASES: dict[str, Case] = {
    # -- config and flags (exit 2) --
    "malformed YAML": Case(yaml_train("epochs: [1, 2\n"), 2, r"malformed YAML in .*\.yaml at line \d+"),
    "YAML that is not a mapping": Case(yaml_train("- 1\n- 2\n"), 2, r"must hold a mapping of option: value"),
    "unknown YAML key": Case(
        yaml_train("tempreature: 2\n"), 2, r"unknown config key 'tempreature' .*did you mean 'temperature'"
    ),
    "YAML key given twice": Case(
        yaml_train("alpha: 0.5\nepochs: 1\nalpha: 0.9\n"),
        2,
        r"at line 3, column 1: key 'alpha' given twice \(first at line 1\); give it once",
    ),
    "KEY given twice in --student-arg": Case(
        train("--student-arg", "hidden=[8]", "--student-arg", "hidden=[16]"),
        2,
        r"--student-arg hidden=\.\.\. given twice; give each KEY once",
    ),
    "wrong type in YAML": Case(yaml_train("epochs: ten\n"), 2, r"config key 'epochs' must be an integer, got str"),
    "wrong type flag": Case(train("--lr", "fast"), 2, r"Invalid value for '--lr'"),
    "unknown flag": Case(train("--tempreature", 2), 2, r"No such option:? '?--tempreature"),
    # an option that takes one value, given twice: refused before anything runs (no silent last-wins)
    "fused caches, a weight per cache missing (train-student)": Case(
        lambda d, o: distill("cache")(d, o) + ["--cache", d / "cache_copy", "--cache-weights", "1,2,3"],
        2,
        r"--cache-weights has 3 value\(s\) but 2 --cache value\(s\) were given",
    ),
    "fused caches, the second damaged (eval: every --cache is read, none silently dropped)": Case(
        lambda d, o: [
            "eval",
            "--model",
            d / "student",
            "--data",
            d / "blobs.npz",
            "--cache",
            d / "cache",
            "--cache",
            d / "c_nan",
        ],
        3,
        r"c_nan: shard .* is damaged",
    ),
    "repeated --out (cache-teacher), the last an existing cache": Case(
        lambda d, o: cache_cmd("--overwrite")(d, o) + ["--out", d / "cache"], 2, r"--out given 2 times"
    ),
    "repeated --overwrite (train-student) into a finished run": Case(
        lambda d, o: train("--overwrite", "--overwrite")(d, d / "student"),
        2,
        r"--overwrite given 2 times; it is "
        r"a switch",
    ),
    "repeated --data (cache verify)": Case(
        lambda d, o: ["cache", "verify", d / "cache", "--data", d / "blobs.npz", "--data", d / "other.npz"],
        2,
        r"--data given 2 times",
    ),
    "missing required option": Case(
        lambda d, o: ["train-student", "--student", "mlp", "--out", o], 2, r"missing required option --data"
    ),
    "alpha above 1": Case(distill("cache", "--alpha", 1.5), 2, r"config key 'alpha' must be <= 1; got 1\.5"),
    "alpha below 0 (YAML)": Case(yaml_train("alpha: -0.1\n"), 2, r"config key 'alpha' must be >= 0; got -0\.1"),
    "alpha without a cache": Case(train("--alpha", 0.5), 2, r"--alpha 0\.5 weights a teacher term but no --cache"),
    "temperature zero": Case(distill("cache", "--temperature", 0), 2, r"config key 'temperature' must be >= 0\.01"),
    "temperature negative (YAML)": Case(yaml_train("temperature: -2\n"), 2, r"'temperature' must be >= 0\.01; got -2"),
    "config file missing": Case(
        lambda d, o: train()(d, o) + ["--config", d / "nope.yaml"], 2, r"config file not found: .*nope\.yaml"
    ),
    "config file unreadable (a directory)": Case(
        lambda d, o: train()(d, o) + ["--config", d / "teacher"],
        2,
        r"cannot read config file .*teacher: IsADirectoryError",
    ),
    "YAML that would run code": Case(
        lambda d, o: train()(d, o) + ["--config", d / "evil.yaml"],
        2,
        r"malformed YAML in .*evil\.yaml.*could not determine a constructor",
        marker=True,
    ),
    # -- data (exit 2) --
    "data file missing": Case(train(data="nope.npz"), 2, r"data file not found: .*nope\.npz"),
    "data file unreadable": Case(train(data="garbage.npz"), 2, r"cannot read data file .*garbage\.npz"),
    "data without labels": Case(train(data="no_y.npz"), 2, r"has no array 'y'"),
    "empty dataset": Case(train(data="empty.npz"), 2, r"the dataset is empty"),
    "negative label": Case(train(data="negative.npz"), 2, r"labels must be >= 0; found -1"),
    "fractional labels": Case(train(data="fractional.npz"), 2, r"labels y must be integers"),
    "NaN in inputs": Case(train(data="nan_inputs.npz"), 2, r"inputs x contain NaN"),
    "unknown DATA spec": Case(
        lambda d, o: ["train-student", "--student", "mlp", "--data", "rows.csv", "--out", o],
        2,
        r"unrecognised DATA spec 'rows\.csv'",
    ),
    "labels out of range for the teacher": Case(
        cache_cmd(data="six.npz"), 2, r"six\.npz: label 5 is out of range for 4 classes"
    ),
    # -- models and weights (exit 2) --
    "teacher output width != classes": Case(
        cache_cmd("--teacher-weights", "WS/narrow.safetensors", teacher="WS/plugins.py:narrow"),
        2,
        r"outputs shape \(3,\) per row but the data has 4 classes",
    ),
    "student output width != classes": Case(
        lambda d, o: ["train-student", "--student", f"{d}/plugins.py:narrow", "--data", d / "blobs.npz", "--out", o],
        2,
        r"outputs shape \(3,\) per row but the data has 4 classes",
    ),
    "vocab mismatch: student run with 10 classes, cache with 4": Case(
        lambda d, o: [
            "train-student",
            "--student",
            d / "ten_run",
            "--data",
            d / "blobs.npz",
            "--cache",
            d / "cache",
            "--out",
            o,
        ],
        2,
        r"ten_run outputs 10 classes but the data has 4",
    ),
    "vocab mismatch: data with 6 classes, cache with 4": Case(
        distill("cache", data="six.npz"), 3, r"does not match the data"
    ),
    "teacher weights of another shape": Case(
        cache_cmd("--teacher-arg", "hidden=[16]", "--teacher-weights", "WS/teacher/model.safetensors", teacher="mlp"),
        2,
        r"net\.1\.(weight|bias) has shape \(32,( 8)?\), the model expects "
        r"\(16,( 8)?\)",
    ),
    "teacher weights file missing": Case(
        cache_cmd("--teacher-weights", "WS/nope.safetensors", teacher="mlp"), 2, r"weights file not found"
    ),
    "malicious pickle as teacher weights": Case(
        cache_cmd("--teacher-weights", "WS/evil.pt", teacher="mlp"),
        2,
        r"refusing to load .*evil\.pt: not a plain tensor state_dict \(it "
        r"would call [\w.]*open while loading",
        marker=True,
    ),
    "malicious pickle as a run's checkpoint": Case(
        lambda d, o: [
            "train-student",
            "--student",
            "mlp",
            "--data",
            d / "blobs.npz",
            "--cache",
            d / "cache",
            "--out",
            d / "interrupted",
            "--epochs",
            1,
        ],
        2,
        r"cannot load .*interrupted/checkpoint\.pt as a plain checkpoint \(it would call [\w.]*open",
        marker=True,
    ),
    "run dir whose model.json names outside code": Case(
        lambda d, o: ["eval", "--model", d / "hijacked_run", "--data", d / "blobs.npz"],
        2,
        r"hijacked_run/model\.json names plugin code '.*evil_plugin\.py:f'; a run dir may only name its own "
        r"model_source\.py",
        marker=True,
    ),
    "unknown model": Case(
        lambda d, o: ["train-student", "--student", "resnet9000", "--data", d / "blobs.npz", "--out", o],
        2,
        r"unknown MODEL 'resnet9000'",
    ),
    "student run dir missing": Case(
        lambda d, o: ["train-student", "--student", d / "runs" / "typo", "--data", d / "blobs.npz", "--out", o],
        2,
        r"--student .*runs/typo: .*runs/typo not found; MODEL is a built-in \(cnn, mlp\)",
    ),
    "eval model run dir missing": Case(
        lambda d, o: ["eval", "--model", d / "no-such-run", "--data", d / "blobs.npz"],
        2,
        r"--model .*no-such-run: .*no-such-run not found",
    ),
    "teacher file missing": Case(
        lambda d, o: ["cache-teacher", "--teacher", d / "teacher.gguf", "--data", d / "blobs.npz", "--out", o],
        2,
        r"--teacher .*teacher\.gguf: .*teacher\.gguf not found",
    ),
    "plugin file missing": Case(
        lambda d, o: ["train-student", "--student", "nope.py:make", "--data", d / "blobs.npz", "--out", o],
        2,
        r"plugin file not found: nope\.py",
    ),
    "plugin raises": Case(
        lambda d, o: ["train-student", "--student", f"{d}/plugins.py:boom", "--data", d / "blobs.npz", "--out", o],
        2,
        r"plugins\.py:boom raised RuntimeError: the user's factory has a bug",
    ),
    "top-k keeps every class": Case(cache_cmd("--top-k", 4), 2, r"--top-k 4 keeps every one of the 4 classes"),
    # -- outputs that must not be clobbered --
    "train into a finished run": Case(
        lambda d, o: train()(d, d / "student"), 2, r"already holds a finished run; pass --overwrite"
    ),
    "train-student --out is a file": Case(
        lambda d, o: train()(d, d / "blobs.npz"), 2, r"--out .*blobs\.npz exists and is not a directory"
    ),
    "cache-teacher --out is a file": Case(
        lambda d, o: cache_cmd()(d, d / "blobs.npz"), 2, r"--out .*blobs\.npz exists and is not a directory"
    ),
    "cache into a different cache": Case(
        lambda d, o: cache_cmd("--top-k", 2)(d, d / "cache"), 3, r"holds a different cache \(setting mode differs"
    ),
    "cache into a dir being written": Case(
        lambda d, o: cache_cmd()(d, d / "locked"), 3, r"locked is being written by pid \d+ on .*; wait for it to finish"
    ),
    # -- caches: mismatched (exit 3) --
    "cache from another dataset": Case(distill("cache", data="other.npz"), 3, r"does not match the data"),
    "reordered data": Case(distill("cache", data="reordered.npz"), 3, r"rows reordered, edited or relabelled"),
    "eval against a cache of other data": Case(
        lambda d, o: ["eval", "--model", d / "student", "--data", d / "other.npz", "--cache", d / "cache"],
        3,
        r"does not match the data",
    ),
    "cache dir missing": Case(distill("nope"), 3, r"cache directory not found: .*nope"),
    # -- caches: damaged (exit 3) --
    "manifest missing": Case(distill("c_no_manifest"), 3, r"has no manifest\.json"),
    "manifest complete: false": Case(distill("c_incomplete"), 3, r"is incomplete \(complete: false\)"),
    "manifest not JSON": Case(distill("c_bad_json"), 3, r"is not valid JSON"),
    "truncated shard": Case(distill("c_truncated"), 3, r"shard-00001\.h5 has \d+ bytes, the manifest says \d+"),
    "missing shard": Case(distill("c_missing_shard"), 3, r"shard shard-00002\.h5 is missing"),
    "bit flip: sign of a log-prob (train-student)": Case(
        distill("c_flip_sign"),
        3,
        r"shard-00001\.h5 is damaged: logprobs has a positive "
        r"log-probability at row 128",
    ),
    "bit flip: HDF5 signature (train-student)": Case(
        distill("c_flip_header"), 3, r"cannot open shard .*shard-00001\.h5"
    ),
    "bit flip: low mantissa bit (cache verify)": Case(
        lambda d, o: ["cache", "verify", d / "c_flip_low"], 3, r"shard-00001\.h5: sha256 differs from the manifest"
    ),
    "NaN in a shard, manifest re-hashed (train-student)": Case(distill("c_nan"), 3, r"logprobs has NaN/inf at row 133"),
    "NaN in a shard, manifest re-hashed (cache verify)": Case(
        lambda d, o: ["cache", "verify", d / "c_nan"], 3, r"shard-00001\.h5: logprobs has NaN/inf at row 133"
    ),
    "log-probs that do not normalise, manifest re-hashed": Case(
        distill("c_unnormalised"),
        3,
        r"logprobs does not normalise at row 138: "
        r"logsumexp = -1\.0",
    ),
    "rows swapped in a shard, manifest re-hashed": Case(
        distill("c_rows_swapped"), 3, r"row_index is not continuous: position 131 holds 132"
    ),
    "cache verify of a missing dir": Case(
        lambda d, o: ["cache", "verify", d / "nope"], 3, r"cache directory not found"
    ),
    # -- the teacher, the disk --
    "NaN/inf teacher logits": Case(
        cache_cmd("--teacher-weights", "WS/nan.safetensors", data="nanrow.npz", teacher="WS/plugins.py:nan_teacher"),
        2,
        r"teacher produced NaN/inf logits at row 300 \(sample 300\)",
    ),
    "disk full while writing a shard": Case(
        cache_cmd(),
        2,
        r"no space left on device while writing .*shard-00001",
        env={"KDCLI_TEST_KILL_AT": "shard-partial:2:ENOSPC"},
    ),
    "disk full while writing the manifest": Case(
        cache_cmd(),
        2,
        r"no space left on device while writing .*manifest\.json",
        env={"KDCLI_TEST_KILL_AT": "manifest.json.partial:3:ENOSPC"},
    ),
    "disk full while writing a checkpoint": Case(
        train("--checkpoint-every", 2),
        2,
        r"no space left on device while writing .*checkpoint\.pt",
        env={"KDCLI_TEST_KILL_AT": "checkpoint.pt.partial:1:ENOSPC"},
    ),
    # -- non-finite or impossible settings (issue 18): refused before anything is written ------------------------
    "temperature inf": Case(
        distill("cache", "--temperature", "inf"), 2, r"config key 'temperature' must be a finite number; got inf"
    ),
    "temperature 1e300": Case(
        distill("cache", "--temperature", "1e300"), 2, r"config key 'temperature' must be <= 1000"
    ),
    "lr inf": Case(train("--lr", "inf"), 2, r"config key 'lr' must be a finite number; got inf"),
    "lr nan (YAML)": Case(yaml_train("lr: .nan\n"), 2, r"config key 'lr' must be a finite number; got nan"),
    "student arg nan": Case(
        train("--student-arg", "dropout=nan"),
        2,
        r"config key 'student_args': dropout is 'nan'; model and adapter arguments must be finite",
    ),
    "student arg inf in a list (YAML)": Case(
        yaml_train("student_args: {hidden: [8, .inf]}\n"), 2, r"'student_args': hidden\[1\] is inf"
    ),
    "eval temperature inf": Case(
        lambda d, o: [
            "eval",
            "--model",
            d / "student",
            "--data",
            d / "blobs.npz",
            "--cache",
            d / "cache",
            "--temperature",
            "inf",
        ],
        2,
        r"must be a finite number",
    ),
    "cache temperatures 1e300": Case(
        cache_cmd("--top-k", 2, "--temperatures", "1e300"),
        2,
        r"temperature 1e\+300 is outside \[0\.01, 1000\], where the stored statistics",
    ),
    "cache temperatures 1e-5": Case(
        cache_cmd("--mode", "sample", "--temperatures", "1,1e-5"), 2, r"temperature 1e-05 is outside \[0\.01, 1000\]"
    ),
    "priority samples > classes": Case(
        cache_cmd("--mode", "priority", "--samples", 5),
        2,
        r"--mode priority --samples 5 is more than the 4 classes there are to keep",
    ),
    "priority samples > vocabulary (LM)": Case(
        lambda d, o: [
            "cache-teacher",
            "--teacher",
            d / "llama",
            "--data",
            d / "text.jsonl",
            "--out",
            o,
            "--max-length",
            32,
            "--mode",
            "priority",
            "--samples",
            400,
        ],
        2,
        r"--samples 400 is more than the 300 vocabulary entries there are to keep",
    ),
    "cross-tokenizer: a student tokenizer without offsets": Case(
        xtok_train("--cross-tokenizer", "aligned", tokenizer="slow_tok"),
        2,
        r"--cross-tokenizer \(the tokenizer .*slow_tok\) needs a fast tokenizer with character offsets",
    ),
    "cross-tokenizer: a cache without token spans": Case(
        xtok_train("--cross-tokenizer", "uld", cache="lm_cache_nospans"),
        2,
        r"records no token spans .* re-cache with this kdcli",
    ),
    "cross-tokenizer: an imported cache (token ids without their text)": Case(
        xtok_train("--cross-tokenizer", "aligned", cache="lm_cache_imported"),
        2,
        r"was imported \(axolotl\): its rows are token ids without their text.* kdcli cache-teacher",
    ),
    "cross-tokenizer: pre-tokenized DATA": Case(
        xtok_train("--cross-tokenizer", "aligned", data="tokens.jsonl"),
        2,
        r"--cross-tokenizer: .*tokens\.jsonl holds pre-tokenized rows .*give the text rows",
    ),
    "cross-tokenizer: an unknown method": Case(
        xtok_train("--cross-tokenizer", "dskd"), 2, r"'cross_tokenizer' must be one of aligned, uld, hybrid; got 'dskd'"
    ),
    "cross-tokenizer with classification data": Case(
        distill("cache", "--cross-tokenizer", "aligned"), 2, r"--cross-tokenizer is for language model runs"
    ),
    "another tokenizer without --cross-tokenizer": Case(
        xtok_train(), 2, r"--tokenizer .*tok2 differs from the tokenizer that built cache .*pass --cross-tokenizer"
    ),
    "cross-tokenizer options without --cross-tokenizer": Case(
        xtok_train("--vocab-map", "prefix"), 2, r"--vocab-map configures --cross-tokenizer"
    ),
    "cross-tokenizer uld with --divergence": Case(
        xtok_train("--cross-tokenizer", "uld", "--divergence", "reverse"), 2, r"uld is a distance of its own"
    ),
    "eval --cross-tokenizer without a cache": Case(
        lambda d, o: ["eval", "--model", d / "llama", "--data", d / "text.jsonl", "--cross-tokenizer", "aligned"],
        2,
        r"--cross-tokenizer .* add --cache",
    ),
    "eval --cross-tokenizer with a cache without token spans": Case(
        lambda d, o: [
            "eval",
            "--model",
            d / "llama",
            "--data",
            d / "text.jsonl",
            "--cache",
            d / "lm_cache_nospans",
            "--temperature",
            1,
            "--cross-tokenizer",
            "aligned",
        ],
        2,
        r"records no token spans",
    ),
    "training that diverges (NaN loss)": Case(
        train("--lr", "1e30", "--optimizer", "sgd"), 4, r"training diverged: the loss became NaN or infinite in epoch 1"
    ),
    # -- options that would be silently ignored --
    "--top-k with --mode full": Case(
        cache_cmd("--mode", "full", "--top-k", 2), 2, r"--top-k applies to --mode topk; a full cache would ignore it"
    ),
    "--samples with --mode topk": Case(
        cache_cmd("--top-k", 2, "--samples", 3),
        2,
        r"--samples applies to --mode sample and priority; a topk cache would ignore",
    ),
    "--temperatures with a full cache": Case(
        cache_cmd("--temperatures", "2"), 2, r"a full cache is exact at every T and would ignore it"
    ),
    "--cache-weights with one --cache": Case(
        distill("cache", "--cache-weights", "0.5"), 2, r"--cache-weights weights several --cache values; 1 was given"
    ),
    "--combine with one --cache": Case(
        distill("cache", "--combine", "geometric"), 2, r"--combine fuses several --cache values; one was given"
    ),
    "the same cache twice": Case(
        lambda d, o: distill("cache")(d, o) + ["--cache", d / "cache"],
        2,
        r"--cache .* is given twice .*a teacher fused with itself is that teacher",
    ),
    # -- damaged manifest fields (exit 3, never an internal error) --
    "manifest: a shard entry that is not an object": Case(
        distill("m_shard_not_object"), 3, r"shard entry 0 must be an object, got str; the manifest is"
    ),
    "manifest: a shard without a name": Case(distill("m_shard_no_name"), 3, r"shard entry 0 has name None"),
    "manifest: shards null": Case(distill("m_shards_null"), 3, r"'shards' must be a list, got null"),
    "manifest: num_rows not a number": Case(
        distill("m_num_rows_text"), 3, r"'num_rows' must be a non-negative integer, got 'abc'"
    ),
    "manifest: data null": Case(distill("m_data_null"), 3, r"'data' must be an object, got NoneType"),
    "manifest: mode bogus": Case(distill("m_mode_bogus"), 3, r"unknown cache mode 'bogus'"),
    "manifest: a shard name outside the cache (eval)": Case(
        lambda d, o: ["eval", "--model", d / "student", "--data", d / "blobs.npz", "--cache", d / "m_shard_outside"],
        3,
        r"shard entry 0 has name '\.\./cache/shard-00000\.h5'; shard names are shard-NNNNN\.h5 inside",
    ),
    "manifest: an absolute shard name (cache verify)": Case(
        lambda d, o: ["cache", "verify", d / "m_shard_absolute"], 3, r"shard entry 0 has name '/etc/passwd'"
    ),
    # -- outputs: checked before anything runs, never deleted first, never someone else's --
    "train-student --out under a file": Case(
        lambda d, o: train()(d, d / "a_file" / "sub"), 2, r"--out .*a_file/sub: .*a_file is a file, not a directory"
    ),
    "cache-teacher --out under a file": Case(
        lambda d, o: cache_cmd()(d, d / "a_file" / "sub"), 2, r"a_file is a file, not a directory"
    ),
    "compress --out under a file": Case(
        lambda d, o: ["compress", "--model", d / "student", "--out", d / "a_file" / "sub", "--quantize", "int8"],
        2,
        r"a_file is a file, not a directory",
    ),
    "--out in /proc": Case(
        lambda d, o: train()(d, Path("/proc/self/kdcli-run")), 2, r"--out /proc/self/kdcli-run: cannot create"
    ),
    "--overwrite of a finished run with a bad --student-arg": Case(
        lambda d, o: train("--overwrite", "--student-arg", "hidden=oops")(d, d / "student"),
        2,
        r"bad arguments for built-in model 'mlp'",
    ),
    "--overwrite of a Hugging Face model dir": Case(
        lambda d, o: train("--overwrite")(d, d / "hf_like"), 2, r"--overwrite: .*hf_like is not a kdcli run directory"
    ),
    "--overwrite of a cache (train-student)": Case(
        lambda d, o: train("--overwrite")(d, d / "cache"), 2, r"is not a kdcli run directory \(manifest\.json"
    ),
    "--overwrite of a model dir (cache-teacher)": Case(
        lambda d, o: cache_cmd("--overwrite")(d, d / "hf_like"), 2, r"hf_like is not empty and holds no kdcli cache"
    ),
    # -- an option of the other task: one generic refusal, naming the option and the task --
    "--tokenizer with classification data (cache-teacher)": Case(
        cache_cmd("--tokenizer", "WS/tok"),
        2,
        r"--tokenizer is for language model runs; DATA "
        r".*blobs\.npz makes this a classification run",
    ),
    "--max-norm with text data (train-student)": Case(
        lambda d, o: [
            "train-student",
            "--student",
            "transformer",
            "--data",
            d / "text.jsonl",
            "--cache",
            d / "lm_cache",
            "--out",
            o,
            "--max-norm",
            2,
        ],
        2,
        r"--max-norm is for classification runs; DATA .*text\.jsonl makes this a language model run",
    ),
    "--views with text data (cache-teacher)": Case(
        lambda d, o: [
            "cache-teacher",
            "--teacher",
            d / "llama",
            "--data",
            d / "text.jsonl",
            "--out",
            o,
            "--views",
            2,
            "--augment",
            "shift:1",
        ],
        2,
        r"--views is for classification runs",
    ),
    "--plot with text data (eval)": Case(
        lambda d, o: ["eval", "--model", d / "llama", "--data", d / "text.jsonl", "--plot", o / "p.png"],
        2,
        r"--plot is for classification runs",
    ),
    # -- language-model data and models (exit 2, never an internal error) --
    "JSONL with invalid UTF-8": Case(
        lambda d, o: ["eval", "--model", d / "llama", "--data", d / "bad_utf8.jsonl"],
        2,
        r"bad_utf8\.jsonl line 2: not valid UTF-8 \(byte 0xe9",
    ),
    "JSONL nested 200,000 deep": Case(
        lambda d, o: ["eval", "--model", d / "llama", "--data", d / "deep.jsonl"],
        2,
        r"deep\.jsonl line 1: JSON nested too deeply to read",
    ),
    "ShareGPT turn with a non-string role": Case(
        lambda d, o: [
            "eval",
            "--model",
            d / "llama",
            "--data",
            d / "sharegpt_bad_role.jsonl",
            "--chat-template",
            d / "tpl_chatml.jinja",
        ],
        2,
        r"turn 1 needs a string \"from\", got dict",
    ),
    **{
        f"chat template that {what}": Case(
            lambda d, o, n=name: [
                "eval",
                "--model",
                d / "llama",
                "--data",
                d / "chat.jsonl",
                "--chat-template",
                d / f"tpl_{n}.jinja",
            ],
            2,
            match,
        )
        for name, what, match in (
            ("divide", "divides by zero", r"chat\.jsonl line 1: --chat-template failed: ZeroDivisionError"),
            ("recurse", "recurses", r"--chat-template recursed without end"),
            ("loops", "loops 1e10 times", r"--chat-template stopped: it took more than"),
            ("repeat", "builds a 50,000,000-times string", r"a repeated string or list of more than"),
        )
    },
    "Parquet with a corrupted data page": Case(
        lambda d, o: ["eval", "--model", d / "llama", "--data", d / "corrupt.parquet"],
        2,
        r"corrupt\.parquet.*(damaged|not a Parquet file)",
    ),
    "saved dataset with a truncated Arrow file": Case(
        lambda d, o: ["eval", "--model", d / "llama", "--data", d / "saved_truncated"],
        2,
        r"saved_truncated.*(damaged|is not an Arrow stream)",
    ),
    "a slice that is not [start:stop]": Case(
        lambda d, o: cache_cmd(data="text.parquet[a:b]", teacher="WS/llama")(d, o),
        2,
        r"DATA .*text\.parquet\[a:b\].*a slice is \[start:stop\] with integers",
    ),
    "DATA an empty directory": Case(
        lambda d, o: cache_cmd(data="empty_dir", teacher="WS/llama")(d, o),
        2,
        r"DATA .*empty_dir is a directory without \.parquet files or a saved dataset",
    ),
    # -- cache-teacher --generate: the teacher answers prompt rows (exit 2, nothing written) --
    "--generate on rows without a prompt": Case(
        lambda d, o: cache_cmd("--generate", data="text.jsonl", teacher="WS/llama")(d, o),
        2,
        r"text\.jsonl line 1: --generate needs prompt rows .* found a text row",
    ),
    "--generate on an empty prompt": Case(
        lambda d, o: cache_cmd("--generate", data="empty_prompt.jsonl", teacher="WS/llama")(d, o),
        2,
        r"empty_prompt\.jsonl line 2: empty prompt",
    ),
    "--generate --max-new-tokens 0": Case(
        lambda d, o: cache_cmd("--generate", "--max-new-tokens", 0, data="prompts.jsonl", teacher="WS/llama")(d, o),
        2,
        r"config key 'max_new_tokens' must be >= 1; got 0",
    ),
    "a generation option without --generate": Case(
        lambda d, o: cache_cmd("--sample", data="text.jsonl", teacher="WS/llama")(d, o),
        2,
        r"--sample shapes the answers the teacher writes with --generate; .*add --generate or drop it",
    ),
    "--generate with classification data": Case(
        cache_cmd("--generate"),
        2,
        r"--generate is for language model runs; DATA .*blobs\.npz makes this a classification run",
    ),
    "--generate --gen-temperature without --sample": Case(
        lambda d, o: cache_cmd("--generate", "--gen-temperature", 0.7, data="prompts.jsonl", teacher="WS/llama")(d, o),
        2,
        r"--gen-temperature/--top-p shape sampled answers; add --sample",
    ),
    "compress of a LoRA adapter run": Case(
        lambda d, o: ["compress", "--model", d / "adapter_run", "--out", o, "--quantize", "int8"],
        2,
        r"holds a lora adapter, not a whole model; compress shrinks whole models",
    ),
    "a model dir that asks to run its own code": Case(
        lambda d, o: [
            "cache-teacher",
            "--teacher",
            d / "remote_code_model",
            "--data",
            d / "text.jsonl",
            "--out",
            o,
            "--max-length",
            32,
        ],
        2,
        r"asks to run its own code .*unless you pass --trust-remote-code",
        marker=True,
    ),
    "a model dir whose weights are a pickle (.bin)": Case(
        lambda d, o: ["eval", "--model", d / "pickled_model", "--data", d / "text.jsonl"],
        2,
        r"cannot load a causal LM from .*pickled_model",
        marker=True,
    ),
    # -- cache export / import: 2 for usage and input, 3 for damaged or mismatched content --
    "cache export: an unknown format": Case(
        lambda d, o: ["cache", "export", d / "lm_cache", "--format", "hdf6", "--out", o],
        2,
        r"unknown export format 'hdf6'; use one of parquet, axolotl",
    ),
    "cache import: an unknown format": Case(
        lambda d, o: ["cache", "import", d / "text.parquet", "--format", "csv", "--out", o],
        2,
        r"unknown import format 'csv'; use one of parquet, axolotl, distillkit",
    ),
    "cache import --format parquet: a Parquet file without kdcli's columns and metadata": Case(
        lambda d, o: ["cache", "import", d / "text.parquet", "--format", "parquet", "--out", o],
        2,
        r"has no kdcli manifest in its metadata: not a kdcli Parquet export",
    ),
    "cache import --format axolotl: a Parquet file without axolotl's columns": Case(
        lambda d, o: [
            "cache",
            "import",
            d / "text.parquet",
            "--format",
            "axolotl",
            "--tokenizer",
            d / "tok",
            "--out",
            o,
        ],
        2,
        r"lacks the column 'input_ids': not an axolotl KD dataset",
    ),
    "cache import --format axolotl without --tokenizer": Case(
        lambda d, o: ["cache", "import", d / "text.parquet", "--format", "axolotl", "--out", o],
        2,
        r"the axolotl source records no tokenizer: pass --tokenizer",
    ),
    "cache import --format distillkit without --tokenizer": Case(
        lambda d, o: ["cache", "import", d / "saved", "--format", "distillkit", "--out", o],
        2,
        r"distillkit source records no tokenizer: pass --tokenizer",
    ),
    "cache import: an option of another format": Case(
        lambda d, o: ["cache", "import", d / "text.parquet", "--format", "axolotl", "--ranks", "all", "--out", o],
        2,
        r"--ranks applies to import --format distillkit; import --format axolotl would ignore it",
    ),
    "cache import --overwrite of a directory that is not a cache": Case(
        lambda d, o: [
            "cache",
            "import",
            d / "text.parquet",
            "--format",
            "parquet",
            "--out",
            d / "teacher",
            "--overwrite",
        ],
        2,
        r"--overwrite: .*teacher is not a kdcli cache",
    ),
    "cache export --format axolotl of a classification cache": Case(
        lambda d, o: ["cache", "export", d / "cache", "--format", "axolotl", "--out", o],
        2,
        r"this is a classification cache: export it with --format parquet",
    ),
    "cache export --format axolotl without --data": Case(
        lambda d, o: ["cache", "export", d / "lm_cache", "--format", "axolotl", "--out", o],
        2,
        r"export --format axolotl needs --data",
    ),
    "cache export --format axolotl with other data than the cache's": Case(
        lambda d, o: [
            "cache",
            "export",
            d / "lm_cache",
            "--format",
            "axolotl",
            "--data",
            d / "text.parquet",
            "--out",
            o,
        ],
        3,
        r"was built from \d+ rows of .* but .*text\.parquet' has \d+ rows",
    ),
    "cache export --out that is a file": Case(
        lambda d, o: ["cache", "export", d / "lm_cache", "--format", "parquet", "--out", d / "blobs.npz"],
        2,
        r"--out .*blobs\.npz exists and is not a directory",
    ),
    "cache export --overwrite of a directory that is not an export": Case(
        lambda d, o: ["cache", "export", d / "cache", "--format", "parquet", "--out", d / "teacher", "--overwrite"],
        2,
        r"--overwrite: .*teacher is not a directory kdcli cache export wrote",
    ),
    "cache export of a damaged cache names the shard": Case(
        lambda d, o: ["cache", "export", d / "c_nan", "--format", "parquet", "--out", o],
        3,
        r"shard-00001\.h5 is damaged: logprobs has NaN/inf at row 133",
    ),
}


def argv_of(case: Case, ws: Path, out: Path) -> list[str]:
    return [str(a).replace("WS/", f"{ws}/") for a in case.args(ws, out)]


def snapshot(root: Path, skip: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and skip not in p.parents
    }


def assert_one_error_line(stderr: str, pattern: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [x for x in stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert re.search(pattern, errors[0]), f"{pattern!r} not in {errors[0]!r}"
    return errors[0]


@pytest.fixture(scope="module")
def lock_holder(ws):
    """A live process holding ws/locked/.lock, as a running cache-teacher would."""
    code = (
        "import fcntl, json, os, socket, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps({'host': socket.gethostname(), "
        "'pid': os.getpid()}).encode()); print('locked', flush=True); time.sleep(600)"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(ws / "locked" / ".lock")], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    yield p
    p.kill()
    p.wait()


def test_battery_has_at_least_100_cases():
    assert len(CASES) >= 100


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(ws, lock_holder, tmp_path, name):
    case = CASES[name]
    out = ws / "out" / re.sub(r"\W+", "-", name)  # a fresh output dir per case, inside the snapshot root
    argv = argv_of(case, ws, out)
    before = snapshot(ws, skip=out)
    crashpoints.reset()
    r = CliRunner().invoke(app, argv, env=case.env)
    line = assert_one_error_line(r.stderr, case.message)
    assert r.exit_code == case.code, f"exit {r.exit_code}: {line}"
    assert not r.stdout.strip() or argv[:2] == ["cache", "verify"], r.stdout  # no result printed on failure
    assert snapshot(ws, skip=out) == before, "an existing file was created, changed or deleted"
    if out.exists():  # whatever a failed run leaves in its own new directory is whole
        assert not list(out.rglob("*.partial")) and not (out / ".lock").exists()
    if case.marker:
        assert not (ws / "PWNED").exists(), "loading a file executed code"


def test_disk_full_keeps_whole_shards_and_resumes(ws, tmp_path):
    """After a (simulated) full disk, the shards already published are whole and the same command resumes."""
    out = tmp_path / "cache"
    argv = argv_of(CASES["disk full while writing a shard"], ws, out)
    crashpoints.reset()
    r = CliRunner().invoke(app, argv, env={"KDCLI_TEST_KILL_AT": "shard-partial:3:ENOSPC"})
    assert r.exit_code == 2 and "no space left on device" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is False and [s["name"] for s in m["shards"]] == ["shard-00000.h5", "shard-00001.h5"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.h5", "shard-00001.h5"]
    crashpoints.reset()
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0 and "skipping 256 of 600 rows" in r.stderr
    ref = {s["name"]: s["sha256"] for s in json.loads((ws / "cache" / "manifest.json").read_text())["shards"]}
    assert {s["name"]: s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]} == ref


def _fsize_limit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))  # writes past 10 kB fail with EFBIG


@pytest.mark.parametrize("command", ["cache-teacher", "train-student"])
def test_real_write_failure_is_a_clean_exit_2(ws, tmp_path, command):
    """A real OS-level write failure (RLIMIT_FSIZE: the kernel refuses to grow a file past 10 kB), in a real
    process: one error line, exit 2, no traceback, no crash, nothing torn at a final name."""
    out = tmp_path / "out"
    if command == "cache-teacher":  # 256-row shards are 12 kB
        argv = [
            "cache-teacher",
            "--teacher",
            ws / "teacher",
            "--data",
            ws / "blobs.npz",
            "--out",
            out,
            "--shard-size",
            256,
        ]
    else:  # a 26k-parameter model: its checkpoint is ~300 kB
        argv = [
            "train-student",
            "--student",
            "mlp",
            "--student-arg",
            "hidden=[2000]",
            "--data",
            ws / "blobs.npz",
            "--out",
            out,
            "--epochs",
            2,
        ]
    before = snapshot(ws, skip=out)
    p = subprocess.run(
        [sys.executable, "-m", "kdcli", *map(str, argv)],
        capture_output=True,
        text=True,
        preexec_fn=_fsize_limit,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert p.returncode == 2, p.stderr[-3000:]
    assert_one_error_line(p.stderr, r"no space left on device .*(shard-00000\.h5|checkpoint\.pt)")
    assert "Exception ignored" not in p.stderr
    assert snapshot(ws, skip=out) == before
    assert not list(out.glob("*.partial")) and not (out / ".lock").exists()
    assert not list(out.glob("shard-*.h5")) and not (out / "checkpoint.pt").exists()


def test_ctrl_c_exits_130_and_touches_nothing(ws, tmp_path):
    """Ctrl-C (SIGINT) to a real train-student mid-epoch, reading the existing cache: exit 130, one line, the
    cache and every other output unchanged, the run dir holds only whole files. (SIGTERM and the resume that
    follows: tests/test_resume.py; cache-teacher interrupted mid-shard: tests/test_reliability.py.)"""
    out = tmp_path / "run"
    before = snapshot(ws, skip=out)
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kdcli",
            "train-student",
            "--student",
            "mlp",
            "--data",
            str(ws / "blobs.npz"),
            "--cache",
            str(ws / "cache"),
            "--out",
            str(out),
            "--epochs",
            "3",
            "--batch-size",
            "32",
            "--checkpoint-every",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "KDCLI_TEST_KILL_AT": "train-step:12:STOP"},
    )
    t0 = time.monotonic()
    while True:
        pid, status = os.waitpid(p.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            break
        assert not pid and time.monotonic() - t0 < 120, "never reached step 12"
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGINT)
    os.kill(p.pid, signal.SIGCONT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr and stdout == ""
    assert stderr.strip().splitlines()[-1] == (
        "interrupted: whole shards/checkpoints already written are kept; re-run the same command to resume"
    )
    assert snapshot(ws, skip=out) == before
    assert sorted(x.name for x in out.iterdir()) == ["checkpoint.pt", "config.yaml"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["global_step"] == 10
