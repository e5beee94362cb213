"""Big teachers and memory: cache-teacher --teacher-device-map auto (accelerate), --dtype bf16 loading Hugging Face
weights in bfloat16, train-student --gradient-checkpointing. Tiny random models only (tests/lm_helpers.py); the real
SmolLM2 memory numbers come from benchmarks/bench_teacher_memory.py (docs/lm.md)."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_cli
from lm_helpers import make_llama, make_tokenizer, text_rows, write_jsonl

from kdcli.config import CacheConfig, TrainConfig, resolve
from kdcli.infra.errors import UsageError
from kdcli.lm.hf import build_lm, enable_gradient_checkpointing, input_device, is_placed
from kdcli.lm.text import TextSettings, load_text, load_tokenizer
from kdcli.stages.cache import cache_teacher
from kdcli.stages.train import train_student
from kdcli.tasks.lm import student_loss


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigteach")
    tok = make_tokenizer(root / "tok")
    return {
        "root": root,
        "tok": tok,
        "teacher": make_llama(root / "teacher", tok),
        "text": write_jsonl(root / "text.jsonl", text_rows(12)),
    }


def cache(lm, out: Path, **kw):
    args = dict(teacher=str(lm["teacher"]), data=str(lm["text"]), out=str(out), max_length=32, shard_size=8, **kw)
    return cache_teacher(resolve(CacheConfig, None, args))


def shards(d: Path) -> list[dict]:
    out = []
    for s in json.loads((d / "manifest.json").read_text())["shards"]:
        with h5py.File(d / s["name"]) as f:
            out.append({k: f[k][()] for k in f})
    return out


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


# -- --teacher-device-map auto ---------------------------------------------------------------------------------------


def test_device_map_auto_gives_the_plain_cache(lm, tmp_path):
    """On a CPU-only machine accelerate puts every module on the CPU: the cache is the plain run's, array for array;
    the placement is recorded but is not part of the cache's identity (the plain cache is up to date for it)."""
    cache(lm, tmp_path / "plain", top_k=8)
    s = cache(lm, tmp_path / "auto", top_k=8, teacher_device_map="auto")
    assert s.status == "written"
    a, b = shards(tmp_path / "plain"), shards(tmp_path / "auto")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k
    ma, mb = manifest(tmp_path / "plain"), manifest(tmp_path / "auto")
    assert mb["teacher"]["device_map"] == {"": "cpu"} and "device_map" not in ma["teacher"]
    assert ma["settings"] == mb["settings"]
    again = cache(lm, tmp_path / "plain", top_k=8, teacher_device_map="auto")
    assert again.status == "up-to-date"


def test_placed_model_reads_inputs_on_its_embedding_device(lm):
    model, info = build_lm(str(lm["teacher"]), device_map="auto")
    assert is_placed(model) and info.device_map == {"": "cpu"}
    assert input_device(model, torch.device("meta")) == torch.device("cpu")  # never the pass's own device
    plain, _ = build_lm(str(lm["teacher"]))
    assert not is_placed(plain) and input_device(plain, torch.device("meta")) == torch.device("meta")


def test_device_map_refused_for_a_non_hf_teacher_on_the_command_line(lm, tmp_path):
    out = tmp_path / "c"
    p = run_cli(
        "cache-teacher",
        "--teacher",
        "transformer",
        "--teacher-weights",
        str(tmp_path / "w.safetensors"),
        "--tokenizer",
        lm["tok"],
        "--data",
        lm["text"],
        "--out",
        out,
        "--teacher-device-map",
        "auto",
    )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --teacher-device-map auto") and "Traceback" not in p.stderr
    assert "not one" in lines[0] and not out.exists()


def test_device_map_refused_for_a_classification_teacher(teacher_run, blobs_npz, tmp_path):
    with pytest.raises(
        UsageError, match="--teacher-device-map is for language model runs; DATA .* makes this a classification run"
    ):
        cache_teacher(
            resolve(
                CacheConfig,
                None,
                dict(teacher=str(teacher_run), data=str(blobs_npz), out=str(tmp_path / "c"), teacher_device_map="auto"),
            )
        )
    assert not (tmp_path / "c").exists()


def test_device_map_without_accelerate_names_the_extra(lm, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(UsageError) as e:
        cache(lm, tmp_path / "c", top_k=8, teacher_device_map="auto")
    assert "needs the accelerate package" in str(e.value) and "kdcli[hf]" in str(e.value)
    assert not (tmp_path / "c").exists()


# -- --dtype bf16 loads the weights in bfloat16 ----------------------------------------------------------------------


def test_bf16_teacher_loads_bf16_weights_and_caches_their_log_probs(lm, tmp_path):
    model, info = build_lm(str(lm["teacher"]), dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and info.load_dtype == "bfloat16"
    cache(lm, tmp_path / "fp32", mode="full")
    cache(lm, tmp_path / "bf16", mode="full", dtype="bf16")
    m = manifest(tmp_path / "bf16")
    assert m["settings"]["dtype"] == "bf16" and m["settings"]["weights_dtype"] == "bf16"
    assert m["teacher"]["load_dtype"] == "bfloat16" and "weights_dtype" not in manifest(tmp_path / "fp32")["settings"]
    # independent reference: transformers' own bf16 model, log-softmax in fp32, at every predicted position
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(lm["tok"]))
    data = load_text(str(lm["text"]), tok, TextSettings(max_length=32))
    refs = {}
    for dt in (torch.bfloat16, torch.float32):
        ref = AutoModelForCausalLM.from_pretrained(str(lm["teacher"]), dtype=dt).eval()
        with torch.no_grad():
            refs[dt] = [
                torch.log_softmax(ref(torch.tensor(s[None], dtype=torch.long)).logits[0, :-1].float(), -1)
                for s in data.ids
            ]
    got = torch.from_numpy(np.concatenate([s["logprobs"] for s in shards(tmp_path / "bf16")])).float()
    f32 = torch.from_numpy(np.concatenate([s["logprobs"] for s in shards(tmp_path / "fp32")])).float()
    want_bf16, want_f32 = torch.cat(refs[torch.bfloat16]), torch.cat(refs[torch.float32])
    assert got.shape == want_bf16.shape
    err_bf16 = (got - want_bf16).abs().max().item()
    assert err_bf16 < 0.1  # fp16 storage of log-probs down to about -30
    assert (f32 - want_f32).abs().max().item() < 0.02
    # the bf16 cache follows bf16 weights, not the fp32 teacher: its error to fp32 is several times larger
    assert (got - want_f32).abs().mean().item() > 3 * (got - want_bf16).abs().mean().item()


# -- train-student --gradient-checkpointing --------------------------------------------------------------------------


def _counting(modules) -> list[int]:
    calls = [0]
    for m in modules:
        m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("kind", ["transformer", "llama"])
def test_gradient_checkpointing_same_loss_and_gradients(lm, kind):
    tok = load_tokenizer(str(lm["tok"]))
    data = load_text(str(lm["text"]), tok, TextSettings(max_length=32))
    seqs = data.ids[:4]
    ids = torch.tensor(np.stack([s[:24] for s in seqs]), dtype=torch.long)
    idx = torch.arange(ids.shape[0] * 23).view(ids.shape[0], 23)
    idx = (idx // 23 * 24 + idx % 23).reshape(-1)  # every position but the last of each row
    labels = ids[:, 1:].reshape(-1)
    runs = []
    for ckpt in (False, True):
        if kind == "transformer":
            torch.manual_seed(0)
            model, _ = build_lm(
                "transformer", {"d_model": 32, "n_layers": 3, "n_heads": 2, "dropout": 0.2}, vocab_size=len(tok)
            )
            blocks = [b.mlp for b in model.blocks]
        else:
            model, _ = build_lm(str(lm["teacher"]))
            blocks = [b.mlp for b in model.model.layers]  # HF checkpoints forward(): the layer's hooks run once
        if ckpt:
            enable_gradient_checkpointing(model, kind)
        calls = _counting(blocks)
        model.train()
        torch.manual_seed(1)  # the same dropout draws; checkpointing must replay them in the recomputation
        parts, _ = student_loss(model, ids, torch.ones_like(ids), idx, None, labels, temperature=1.0, alpha=0.0)
        parts.total.backward()
        runs.append((parts.total.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, calls[0]))
    (l0, g0, c0), (l1, g1, c1) = runs
    assert c0 == len(blocks) and c1 == 2 * len(blocks)  # each block really ran again in the backward pass
    assert torch.allclose(l0, l1, rtol=0, atol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7), n


def test_train_student_with_gradient_checkpointing_matches_the_plain_run(lm, tmp_path):
    from safetensors.torch import load_file

    common = dict(
        student="transformer",
        data=str(lm["text"]),
        tokenizer=str(lm["tok"]),
        max_length=32,
        student_args={"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.1},
        epochs=1,
        batch_size=4,
        lr=3e-3,
        seed=3,
    )
    a = train_student(resolve(TrainConfig, None, dict(out=str(tmp_path / "plain"), **common)))
    b = train_student(
        resolve(TrainConfig, None, dict(out=str(tmp_path / "ckpt"), gradient_checkpointing=True, **common))
    )
    assert a.steps == b.steps > 1 and abs(a.final_train_loss - b.final_train_loss) < 1e-5
    wa, wb = (
        load_file(str(tmp_path / "plain" / "model.safetensors")),
        load_file(str(tmp_path / "ckpt" / "model.safetensors")),
    )
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), k


def test_gradient_checkpointing_refused_for_classification_and_plain_plugin_students(lm, blobs_npz, tmp_path):
    with pytest.raises(UsageError, match="--gradient-checkpointing is for language model runs; .* classification run"):
        train_student(
            resolve(
                TrainConfig,
                None,
                dict(student="mlp", data=str(blobs_npz), out=str(tmp_path / "r"), gradient_checkpointing=True),
            )
        )
    assert not (tmp_path / "r").exists()
    plugin = tmp_path / "plug.py"
    plugin.write_text(
        "import torch\n"
        "def make(vocab_size):\n"
        "    return torch.nn.Sequential(torch.nn.Embedding(vocab_size, 8), torch.nn.Linear(8, vocab_size))\n"
    )
    with pytest.raises(UsageError, match="does not support it"):
        train_student(
            resolve(
                TrainConfig,
                None,
                dict(
                    student=f"{plugin}:make",
                    data=str(lm["text"]),
                    tokenizer=str(lm["tok"]),
                    out=str(tmp_path / "p"),
                    gradient_checkpointing=True,
                ),
            )
        )
    assert not (tmp_path / "p").exists()  # a run that fails before anything to resume leaves no --out behind
