"""Hugging Face students as practitioners use them: the run dir IS a Hugging Face model directory (transformers
loads and generates from it; run dirs of earlier kdcli still load), the built-in ``llama`` student, the fused
output-layer loss on HF students (against the autograd path), and LoRA / prompt-tuned students with peft (run
dirs, eval, exact resume, bad inputs).

Tiny models made here (tests/lm_helpers.py): a BPE tokenizer, random 1-2 layer Llamas, one top-k cache."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli
from lm_helpers import make_llama, make_tokenizer, text_rows, write_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdcli.cache.modes import targets_from_arrays
from kdcli.cache.tokens import TokenCacheReader
from kdcli.cli import app
from kdcli.config import CacheConfig, EvalConfig, TrainConfig, resolve
from kdcli.lm.hf import build_lm, fused_head_weight, lm_logits, load_lm_run
from kdcli.lm.text import load_text, load_tokenizer, loss_positions, pad_batch
from kdcli.stages.cache import cache_teacher
from kdcli.stages.evaluate import evaluate
from kdcli.stages.train import train_student
from kdcli.tasks.lm import settings_from_manifest, student_loss

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

runner = CliRunner()
SMALL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("hfstud")
    tok = make_tokenizer(d / "tok")
    teacher = make_llama(d / "teacher", tok)
    data = write_jsonl(d / "text.jsonl", text_rows(24))
    cache_teacher(
        resolve(
            CacheConfig,
            None,
            dict(teacher=str(teacher), data=str(data), out=str(d / "c"), max_length=32, top_k=8, shard_size=8),
        )
    )
    base = make_llama(d / "base", tok, hidden=16, layers=1, seed=1)  # a "pretrained" student to adapt
    return {"d": d, "tok": tok, "teacher": teacher, "data": data, "cache": d / "c", "base": base}


def train(ws, out, **kw):
    args = dict(
        cache=str(ws["cache"]), data=str(ws["data"]), out=str(ws["d"] / out), epochs=1, batch_size=8, lr=3e-3, seed=2
    )
    return train_student(resolve(TrainConfig, None, {**args, **kw}))


def batch(ws, rows=range(6)):
    """A cached batch: (ids, mask, flat positions, labels, targets) exactly as TokenTrainJob.step builds it."""
    r = TokenCacheReader(str(ws["cache"]))
    tok = load_tokenizer(str(ws["tok"]))
    data = load_text(
        str(ws["data"]), tok, settings_from_manifest(r.manifest), vocab_size=r.vocab_size, target_masks=True
    )
    rows = np.asarray(list(rows))
    seqs = [data.ids[i] for i in rows]
    ids, mask = pad_batch(seqs, tok.pad_token_id)
    idx, labels = loss_positions(seqs, data.first_target[rows], ids.shape[1], data.masks(rows))
    arrays = r.read_rows(int(rows[0]), int(rows[-1]) + 1)
    targets = targets_from_arrays(arrays, r.mode, r.vocab_size, temperatures=(1.0, 2.0, 4.0))
    return (torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(idx), torch.from_numpy(labels), targets)


# -- 4. HF-native run dirs -----------------------------------------------------------------------------------------


def test_llama_student_run_dir_is_a_hugging_face_model_dir(ws):
    s = train(ws, "llama", student="llama", student_args=SMALL)
    run = ws["d"] / "llama"
    names = {p.name for p in run.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.json",
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
    } <= names and "tokenizer" not in names
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 16 and cfg["vocab_size"] == 300
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(run)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(run))
    assert hf.config.eos_token_id == tok.eos_token_id == hf.generation_config.eos_token_id
    ours, info = load_lm_run(run)
    assert info.num_parameters == s.student_parameters == sum(p.numel() for p in hf.parameters())
    ids = torch.tensor([tok("the quick brown fox")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lm_logits(ours.eval(), ids), rtol=0, atol=0)
        out = hf.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    # kdcli's own eval reads it with no other flag than the data (its tokenizer is the run dir's)
    rep = evaluate(resolve(EvalConfig, None, {"model": [str(run)], "data": str(ws["data"]), "cache": str(ws["cache"])}))
    assert rep.models[0].kl_to_teacher > 0 and rep.models[0].num_parameters == s.student_parameters
    # and without a cache: the tokenizer and text settings come from the run dir
    alone = evaluate(resolve(EvalConfig, None, {"model": [str(run)], "data": str(ws["data"])}))
    assert alone.models[0].perplexity == pytest.approx(rep.models[0].perplexity, rel=1e-6)


def test_large_students_are_saved_in_shards_that_transformers_loads(ws, monkeypatch):
    import kdcli.lm.hf as hf_mod

    monkeypatch.setattr(hf_mod, "HF_SHARD_SIZE", "20KB")
    train(ws, "sharded", student=str(ws["base"]), epochs=1)
    run = ws["d"] / "sharded"
    shards = sorted(run.glob("model-*-of-*.safetensors"))
    assert (
        len(shards) >= 2
        and (run / "model.safetensors.index.json").is_file()
        and not (run / "model.safetensors").exists()
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(run))
    ours, _ = load_lm_run(run)
    a, b = hf.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from kdcli.models.stats import bytes_on_disk  # compress/eval's size: every model file, no training leftovers

    model_files = [
        *shards,
        *(
            run / n
            for n in (
                "model.safetensors.index.json",
                "config.json",
                "generation_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "model.json",
            )
        ),
    ]
    assert bytes_on_disk(run) == sum(f.stat().st_size for f in model_files)
    # a later save of the same run dir unsharded leaves no stale shard behind
    monkeypatch.setattr(hf_mod, "HF_SHARD_SIZE", "5GB")
    train(ws, "sharded", student=str(ws["base"]), epochs=1, overwrite=True)
    assert not list(run.glob("model-*-of-*.safetensors")) and (run / "model.safetensors").is_file()


def test_run_dirs_of_earlier_kdcli_still_load_and_evaluate(ws, tmp_path):
    """The layout before HF-native run dirs: model.safetensors (safetensors.save_model) + model.json with the HF
    config + tokenizer/."""
    from safetensors.torch import save_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ws["base"])).eval()
    run = tmp_path / "old"
    (run / "tokenizer").mkdir(parents=True)
    save_model(hf, str(run / "model.safetensors"))
    load_tokenizer(str(ws["tok"])).save_pretrained(str(run / "tokenizer"))
    (run / "model.json").write_text(
        json.dumps(
            {
                "kind": "lm",
                "spec": str(ws["base"]),
                "model_kind": "hf",
                "args": {},
                "vocab_size": 300,
                "num_parameters": 1,
                "hf_config": hf.config.to_dict(),
                "tokenizer": {},
                "text": {"max_length": 32},
            }
        )
    )
    model, info = build_lm(str(run))
    ids = torch.tensor([[5, 9, 17, 3, 40]])
    with torch.no_grad():
        torch.testing.assert_close(lm_logits(model.eval(), ids), hf(ids).logits, rtol=0, atol=0)
    rep = evaluate(
        resolve(
            EvalConfig, None, {"model": [str(run), str(ws["base"])], "data": str(ws["data"]), "cache": str(ws["cache"])}
        )
    )
    assert rep.models[0].perplexity == pytest.approx(rep.models[1].perplexity, rel=1e-6)


# -- the fused output-layer loss on HF students ---------------------------------------------------------------------


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("kind", ["untied", "tied", "lora", "prompt"])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_fused_loss_on_hf_students_equals_the_autograd_path(ws, kind, alpha):
    """Same value, soft/hard parts, correct count and gradients (every trainable parameter) as kd_loss on the
    model's own logits at the predicted positions."""
    from kdcli.lm.adapters import add_adapter

    torch.manual_seed(0)
    if kind == "tied":
        model, _ = build_lm("llama", {**SMALL, "tie_word_embeddings": True}, vocab_size=300)
    else:
        model, _ = build_lm(str(ws["base"]))
    if kind in ("lora", "prompt"):
        args = (
            {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}
            if kind == "lora"
            else {"num_virtual_tokens": 3}
        )
        model = add_adapter(model, kind, args, tokenizer=load_tokenizer(str(ws["tok"])), student="base")
        if kind == "lora":  # LoRA's B starts at zero: move it so the adapter matters in the check
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.1)
    assert fused_head_weight(model) is not None
    ids, mask, idx, y, targets = batch(ws)
    kw = dict(temperature=2.0, alpha=alpha)
    fused, c1 = student_loss(model, ids, mask, idx, targets, y, fused=True, **kw)
    fused.total.backward()
    g1 = _grads(model)
    model.zero_grad()
    ref, c2 = student_loss(model, ids, mask, idx, targets, y, fused=False, **kw)
    ref.total.backward()
    g2 = _grads(model)
    assert int(c1) == int(c2)
    for a, b in ((fused.total, ref.total), (fused.soft, ref.soft), (fused.hard, ref.hard)):
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fused_path_is_refused_where_logits_are_not_the_plain_head(ws):
    from kdcli.lm.adapters import add_adapter

    model, _ = build_lm(str(ws["base"]))
    lora_head = add_adapter(
        model, "lora", {"r": 2, "target_modules": ["lm_head"]}, tokenizer=load_tokenizer(str(ws["tok"])), student="base"
    )
    assert fused_head_weight(lora_head) is None  # the head has a LoRA update: not hidden @ W.T
    other, _ = build_lm(str(ws["base"]))
    other.config.final_logit_softcapping = 30.0  # Gemma-2-style soft-capping
    assert fused_head_weight(other) is None
    other.config.final_logit_softcapping = None
    other.config.model_type = "some_new_arch"  # an architecture kdcli does not know: logits path
    assert fused_head_weight(other) is None


# -- 5. peft students -------------------------------------------------------------------------------------------------


def test_prompt_tuned_logits_drop_the_virtual_positions_as_peft_does(ws):
    """lm_logits of a prompt-tuned model = peft's own forward with the num_virtual_tokens leading logits cut."""
    from kdcli.lm.adapters import add_adapter

    model, _ = build_lm(str(ws["base"]))
    model = add_adapter(
        model, "prompt", {"num_virtual_tokens": 5}, tokenizer=load_tokenizer(str(ws["tok"])), student="base"
    ).eval()
    ids = torch.tensor([[5, 9, 17, 3, 40, 2], [7, 8, 9, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
        ours = lm_logits(model, ids, mask)
    assert theirs.shape[1] == ids.shape[1] + 5
    torch.testing.assert_close(ours, theirs[:, 5:], rtol=1e-6, atol=1e-6)


def test_init_text_starts_the_soft_prompt_as_peft_text_init_does(ws):
    from kdcli.lm.adapters import add_adapter

    text = "the quick brown fox"
    model, _ = build_lm(str(ws["base"]))
    ours = add_adapter(
        model,
        "prompt",
        {"num_virtual_tokens": 7, "init_text": text},
        tokenizer=load_tokenizer(str(ws["tok"])),
        student="base",
    )
    base, _ = build_lm(str(ws["base"]))
    cfg = peft.PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=7,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(ws["tok"]),
    )
    theirs = peft.get_peft_model(base, cfg)
    a = ours.prompt_encoder["default"].embedding.weight
    b = theirs.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lora_merged_and_adapter_run_dirs_load_and_evaluate_alike(ws):
    merged = train(ws, "lora", student=str(ws["base"]), peft="lora", peft_args={"r": 4})
    adapter = train(ws, "lora-ad", student=str(ws["base"]), peft="lora", peft_args={"r": 4}, peft_save="adapter")
    assert merged.trainable_parameters == adapter.trainable_parameters == 4 * (16 + 16) + 4 * (16 + 8)  # q, v
    assert merged.student_parameters > 20 * merged.trainable_parameters
    m_run, a_run = ws["d"] / "lora", ws["d"] / "lora-ad"
    assert (m_run / "config.json").is_file() and not (m_run / "adapter_config.json").exists()
    assert (a_run / "adapter_model.safetensors").is_file() and not (a_run / "config.json").exists()
    assert json.loads((a_run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(ws["base"])
    meta = json.loads((a_run / "model.json").read_text())
    assert meta["layout"] == "adapter" and meta["peft"]["base"] == str(ws["base"]) and meta["peft"]["method"] == "lora"
    # the merged model is a plain transformers model: base weights + B @ A * alpha / r folded in
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(m_run))
    assert not any("lora" in k for k in hf.state_dict())
    base = transformers.AutoModelForCausalLM.from_pretrained(str(ws["base"]))
    assert not torch.equal(
        hf.state_dict()["model.layers.0.self_attn.q_proj.weight"],
        base.state_dict()["model.layers.0.self_attn.q_proj.weight"],
    )
    assert torch.equal(
        hf.state_dict()["model.layers.0.mlp.up_proj.weight"], base.state_dict()["model.layers.0.mlp.up_proj.weight"]
    )  # not a target: untouched
    rep = evaluate(
        resolve(
            EvalConfig,
            None,
            {"model": [str(m_run), str(a_run), str(ws["base"])], "data": str(ws["data"]), "cache": str(ws["cache"])},
        )
    )
    m, a, b = rep.models
    assert m.perplexity == pytest.approx(a.perplexity, rel=1e-5) and m.kl_to_teacher == pytest.approx(
        a.kl_to_teacher, rel=1e-5
    )
    assert m.kl_to_teacher < b.kl_to_teacher  # distillation moved the adapted student toward the teacher
    # the same seed trained the same adapter either way
    ad = load_file(str(a_run / "adapter_model.safetensors"))
    assert len(ad) == 4 and all("lora_" in k for k in ad)


def test_prompt_tuned_run_trains_saves_and_evaluates(ws):
    s = train(
        ws,
        "prompt",
        student=str(ws["base"]),
        peft="prompt",
        epochs=2,
        lr=3e-2,
        peft_args={"num_virtual_tokens": 4, "init_text": "the quick"},
    )
    assert s.trainable_parameters == 4 * 16
    run = ws["d"] / "prompt"
    meta = json.loads((run / "model.json").read_text())
    assert meta["layout"] == "adapter" and meta["peft"]["method"] == "prompt"
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 4
    assert cfg["base_model_name_or_path"] == str(ws["base"])
    saved = load_file(str(run / "adapter_model.safetensors"))
    assert [v.shape for v in saved.values()] == [(4, 16)]
    rep = evaluate(
        resolve(
            EvalConfig, None, {"model": [str(run), str(ws["base"])], "data": str(ws["data"]), "cache": str(ws["cache"])}
        )
    )
    p, b = rep.models
    assert p.num_tokens == b.num_tokens and p.kl_to_teacher < b.kl_to_teacher
    # the base must be the one the prompt was trained on
    from kdcli.infra.errors import UsageError

    meta["peft"]["base_sha256"] = "0" * 64
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="has changed"):
        load_lm_run(run)


@pytest.mark.parametrize(
    "method,args",
    [("lora", ["--peft-arg", "r=4", "--peft-save", "adapter"]), ("prompt", ["--peft-arg", "num_virtual_tokens=3"])],
)
def test_a_killed_peft_run_resumes_to_the_uninterrupted_adapter(ws, method, args):
    common = [
        "train-student",
        "--cache",
        ws["cache"],
        "--data",
        ws["data"],
        "--student",
        ws["base"],
        "--peft",
        method,
        *args,
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--checkpoint-every",
        "3",
        "--seed",
        "4",
        "--device",
        "cpu",
    ]
    full, cut = ws["d"] / f"full-{method}", ws["d"] / f"cut-{method}"
    run_cli(*common, "--out", full, check=True, env={"OMP_NUM_THREADS": "1"})
    p = run_cli(*common, "--out", cut, env={"OMP_NUM_THREADS": "1", "KDCLI_TEST_KILL_AT": "train-step:7"})
    assert p.returncode != 0 and (cut / "checkpoint.pt").exists() and not (cut / "model.json").exists()
    p = run_cli(*common, "--out", cut, check=True, env={"OMP_NUM_THREADS": "1"})
    assert "resuming" in p.stderr
    a, b = load_file(str(full / "adapter_model.safetensors")), load_file(str(cut / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(str(full / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for v in first.values())


# -- bad inputs ------------------------------------------------------------------------------------------------------


def test_bad_peft_inputs_exit_2_with_one_line(ws, tmp_path, blobs_npz):
    base = ["train-student", "--cache", ws["cache"], "--data", ws["data"], "--epochs", "1"]
    cases = [
        (
            [*base, "--student", ws["base"], "--peft", "lora", "--peft-arg", "target_modules=[q_proj,qkv]"],
            "target modules ['qkv'] are not in",
        ),
        ([*base, "--student", ws["base"], "--peft", "prompt", "--peft-save", "merged"], "cannot be merged"),
        ([*base, "--student", "llama", "--peft", "prompt"], "has no saved weights"),
        (
            [*base, "--student", "transformer", "--peft", "lora", "--peft-save", "merged"],
            "adapts a Hugging Face causal LM",
        ),
        ([*base, "--student", ws["base"], "--peft-arg", "r=4"], "add --peft lora"),
        ([*base, "--student", ws["base"], "--peft", "lora", "--peft-arg", "rank=4"], "bad --peft-arg for lora"),
        (
            ["train-student", "--data", blobs_npz, "--student", "mlp", "--peft", "lora"],
            "--peft is for language model runs",
        ),
    ]
    for i, (args, msg) in enumerate(cases):
        out = tmp_path / f"r{i}"
        r = runner.invoke(app, [*map(str, args), "--out", str(out)])
        assert r.exit_code == 2, (args, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (out / "model.json").exists() and not (out / "config.yaml").exists()
    # the modules found are named, so the user can pick targets
    r = runner.invoke(app, [*map(str, cases[0][0]), "--out", str(tmp_path / "x")])
    assert "adaptable modules are: down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj" in r.stderr


def test_peft_without_the_package_names_the_extra(ws, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    r = runner.invoke(
        app,
        [
            "train-student",
            "--cache",
            str(ws["cache"]),
            "--data",
            str(ws["data"]),
            "--student",
            str(ws["base"]),
            "--peft",
            "lora",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert r.exit_code == 2 and "kdcli[peft]" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


def test_ddp_prompt_tuned_run_resumes_to_the_uninterrupted_adapter(ws):
    """2 processes (gloo): the soft prompt is computed inside the DDP-wrapped forward (LMForward), so its gradient
    is averaged over ranks; a run killed after step 3 resumes to the uninterrupted run's adapter, bit for bit."""
    import subprocess

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kdcli"]
    common = [
        "train-student",
        "--cache",
        ws["cache"],
        "--data",
        ws["data"],
        "--student",
        ws["base"],
        "--peft",
        "prompt",
        "--peft-arg",
        "num_virtual_tokens=3",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--checkpoint-every",
        "2",
        "--seed",
        "4",
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}

    def launch(out, extra_env=None):
        return subprocess.run(
            [*torchrun, *map(str, common), "--out", str(out)],
            capture_output=True,
            text=True,
            env={**env, **(extra_env or {})},
            timeout=300,
        )

    full, cut = ws["d"] / "ddp-full", ws["d"] / "ddp-cut"
    p = launch(full)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "global batch 8" in p.stderr and "--peft prompt: 48 trainable" in p.stderr
    assert launch(cut, {"KDCLI_TEST_KILL_AT": "train-step:3"}).returncode != 0
    assert (cut / "checkpoint.pt").exists()
    p = launch(cut)
    assert p.returncode == 0 and "resuming" in p.stderr, p.stderr[-2000:]
    a, b = load_file(str(full / "adapter_model.safetensors")), load_file(str(cut / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rep = evaluate(
        resolve(EvalConfig, None, {"model": [str(full)], "data": str(ws["data"]), "cache": str(ws["cache"])})
    )
    assert rep.models[0].num_tokens > 0


def test_a_dequantized_gguf_model_saves_like_any_hf_model(tmp_path):
    """transformers de-quantizes a GGUF file into plain Linear layers when no GGUF kernel package is installed but
    keeps its quantizer attached, so save_pretrained refused ("quantized with gguf and is not serializable") and a
    LoRA student started from the SmolLM2 GGUF could not be saved merged. kdcli drops that marker (only then)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kdcli.lm import hf

    class GgufHfQuantizer:  # the attributes kdcli looks at, as transformers 5.x sets them for a de-quantized file
        packed_modules: dict = {}

        def is_serializable(self, *a, **k):
            return False

    model = AutoModelForCausalLM.from_pretrained(str(make_llama(tmp_path / "m", make_tokenizer(tmp_path / "tok"))))
    model.hf_quantizer = GgufHfQuantizer()
    hf._drop_dequantized_gguf_marker(model)
    assert model.hf_quantizer is None
    model.save_pretrained(str(tmp_path / "saved"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    packed = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    packed.hf_quantizer = GgufHfQuantizer()
    packed.hf_quantizer.packed_modules = {"model.layers.0.mlp.up_proj": object()}  # still packed: left alone
    hf._drop_dequantized_gguf_marker(packed)
    assert packed.hf_quantizer is not None
