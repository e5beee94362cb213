"""Token-level caches, LM training and LM eval end to end on a tiny random Llama teacher (built from a config).

Checks the exact files and arrays written, against the teacher run directly (an independent computation), and the
CLI contract: exit codes, one-line errors, --json on stdout.
"""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_cli
from lm_helpers import make_llama, make_tokenizer, prompt_rows, text_rows, write_jsonl
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.config import CacheConfig, EvalConfig, TrainConfig, resolve
from kdcli.infra.errors import CacheError
from kdcli.lm.text import TextSettings, load_text, load_tokenizer, teacher_sequences
from kdcli.stages.cache import cache_teacher
from kdcli.stages.evaluate import evaluate
from kdcli.stages.train import train_student

runner = CliRunner()
STUDENT = {"d_model": 32, "n_layers": 1, "n_heads": 2}


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    tok = make_tokenizer(root / "tok")
    teacher = make_llama(root / "teacher", tok)
    return {
        "root": root,
        "tok": tok,
        "teacher": teacher,
        "text": write_jsonl(root / "text.jsonl", text_rows(24)),
        "pr": write_jsonl(root / "pr.jsonl", prompt_rows(16)),
    }


def cache(lm, out, **kw):
    args = dict(teacher=str(lm["teacher"]), data=str(lm["text"]), out=str(out), max_length=32, shard_size=8, **kw)
    return cache_teacher(resolve(CacheConfig, None, args))


def teacher_logp(lm, seq: np.ndarray) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(lm["teacher"])).eval()
    with torch.no_grad():
        return torch.log_softmax(m(torch.tensor(seq[None], dtype=torch.long)).logits[0].float(), -1)


def read_shards(d: Path) -> dict:
    parts = []
    for s in json.loads((d / "manifest.json").read_text())["shards"]:
        with h5py.File(d / s["name"]) as f:
            parts.append({k: f[k][()] for k in f})
    return parts


def test_topk_cache_layout_and_values(lm, tmp_path):
    s = cache(lm, tmp_path / "c", top_k=8)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["kind"] == "token" and m["complete"] is True and m["mode"] == "topk" and m["vocab_size"] == 300
    assert m["tokenizer"]["vocab_size"] == 300 and len(m["tokenizer"]["sha256"]) == 64
    assert m["id_dtype"] == "uint16" and m["data"]["num_targets"] == s.num_tokens
    parts = read_shards(tmp_path / "c")
    assert len(parts) == s.num_shards > 1
    tok = load_tokenizer(str(lm["teacher"]))
    data = load_text(str(lm["text"]), tok, TextSettings(max_length=32))
    total = 0
    for p in parts:
        n_tok = int(p["offsets"][-1])
        assert p["offsets"][0] == 0 and len(p["offsets"]) == len(p["row_index"]) + 1
        assert p["topk_ids"].dtype == np.uint16 and p["topk_ids"].shape == (n_tok, 8)  # ragged, no padding
        assert p["topk_logprobs"].dtype == np.float16 and p["tail_logmass"].shape == (n_tok,)
        assert (np.diff(p["offsets"]) == data.num_targets[p["row_index"]]).all()
        assert (p["row_hash"] == data.row_hash[p["row_index"]]).all()
        total += n_tok
    assert total == data.num_targets.sum()
    # independent check: run the teacher on row 3 and compare the cached entries
    row = 3
    p = parts[0]
    a, b = p["offsets"][row], p["offsets"][row + 1]
    logp = teacher_logp(lm, data.ids[row])[:-1]  # position t predicts token t + 1
    vals, ids = torch.topk(logp, 8, dim=-1)
    assert (p["topk_ids"][a:b] == ids.numpy()).all()
    assert np.allclose(p["topk_logprobs"][a:b], vals.numpy(), atol=2e-3, rtol=1e-3)
    tail = torch.log1p(-vals.exp().sum(-1).clamp(max=1 - 1e-6))
    assert np.allclose(p["tail_logmass"][a:b], tail.numpy(), atol=5e-3)
    tgt = logp.gather(1, torch.tensor(data.ids[row][1:], dtype=torch.long)[:, None])[:, 0]
    assert np.allclose(p["target_logprobs"][a:b], tgt.numpy(), atol=2e-3, rtol=1e-3)


def test_sample_cache_counts_and_bytes(lm, tmp_path):
    s = cache(lm, tmp_path / "c", mode="sample", samples=12, compression="none")  # on-disk bytes >= payload
    parts = read_shards(tmp_path / "c")
    p = parts[0]
    assert p["sample_counts"].dtype == np.uint8 and (p["sample_counts"].sum(1) == 12).all()
    assert p["sample_ids"].dtype == np.uint16
    # 12 slots x (2 B id + 1 B count + 2 B log-prob) + 2 B target log-prob = 62 B/token; the rest is per-row
    # (offsets, hashes) and per-file HDF5 overhead, which dominates only in a cache this tiny
    payload = sum(
        q[k].nbytes for q in parts for k in ("sample_ids", "sample_counts", "sample_logprobs", "target_logprobs")
    )
    assert payload / s.num_tokens == 62 and s.bytes_per_token > 62
    # the summary's distinct ids per token, counted independently from the stored counts
    distinct = np.concatenate([(q["sample_counts"] > 0).sum(1) for q in parts])
    assert len(distinct) == s.num_tokens and s.unique_ids == pytest.approx(distinct.mean())
    assert 1 <= s.unique_ids < 12  # a peaked teacher repeats ids: fewer distinct ids than draws


def test_sparse_caches_are_gzipped_and_report_distinct_ids_per_token(lm, tmp_path):
    """auto compression gzips every sparse token cache (priority too); the table shows B/token beside the distinct
    ids per token (sample and priority only)."""
    pri = cache(lm, tmp_path / "p", mode="priority", samples=6)
    assert pri.compression.startswith("gzip") and pri.unique_ids == 6.0
    smp = cache(lm, tmp_path / "s", mode="sample", samples=24)
    top = cache(lm, tmp_path / "t", top_k=8)
    assert smp.compression.startswith("gzip") and top.unique_ids is None
    from rich.console import Console

    from kdcli.report import render

    con = Console(record=True, width=200)
    con.print(render(smp.table()))
    assert f"{smp.bytes_per_token:.1f} B/token for {smp.unique_ids:.1f} distinct ids/token" in con.export_text()


def test_rerun_is_a_noop_and_other_settings_refuse(lm, tmp_path):
    cache(lm, tmp_path / "c", top_k=8)
    assert cache(lm, tmp_path / "c", top_k=8).status == "up-to-date"
    with pytest.raises(CacheError, match="top_k"):
        cache(lm, tmp_path / "c", top_k=4)
    r = runner.invoke(
        app,
        [
            "cache-teacher",
            "--teacher",
            str(lm["teacher"]),
            "--data",
            str(lm["text"]),
            "--out",
            str(tmp_path / "c"),
            "--top-k",
            "8",
            "--max-length",
            "16",
        ],
    )
    assert r.exit_code == 3 and "max_length" in r.stderr and "--overwrite" in r.stderr
    assert cache(lm, tmp_path / "c", top_k=4, overwrite=True).status == "written"


def test_resume_from_whole_shards(lm, tmp_path):
    full = cache(lm, tmp_path / "c", top_k=8)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    last = m["shards"].pop()
    (tmp_path / "c" / last["name"]).unlink()
    m["complete"] = False
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    again = cache(lm, tmp_path / "c", top_k=8)
    assert again.status == "resumed" and again.rows_skipped == last["row_start"] and again.bytes == full.bytes


def test_prompt_distillation_cache_is_aligned_to_the_response(lm, tmp_path):
    tp = "You speak only in riddles.\n{prompt}"
    args = dict(
        teacher=str(lm["teacher"]),
        data=str(lm["pr"]),
        out=str(tmp_path / "c"),
        max_length=32,
        top_k=8,
        teacher_prompt=tp,
    )
    s = cache_teacher(resolve(CacheConfig, None, args))
    tok = load_tokenizer(str(lm["teacher"]))
    data = load_text(str(lm["pr"]), tok, TextSettings(max_length=32))
    assert s.num_tokens == data.num_targets.sum()  # response tokens only
    seqs, first = teacher_sequences(data, tok, tp)
    p = read_shards(tmp_path / "c")[0]
    row = 2
    a, b = p["offsets"][row], p["offsets"][row + 1]
    logp = teacher_logp(lm, seqs[row])[first[row] - 1 : -1]  # the teacher's positions that predict the response
    resp = torch.tensor(data.ids[row][data.first_target[row] :], dtype=torch.long)
    assert np.allclose(p["target_logprobs"][a:b], logp.gather(1, resp[:, None])[:, 0].numpy(), atol=2e-3, rtol=1e-3)
    assert (p["topk_ids"][a:b] == torch.topk(logp, 8, -1).indices.numpy()).all()
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["settings"]["teacher_prompt"] == tp
    # without the teacher prompt the cached distributions differ (the context matters)
    args.update(out=str(tmp_path / "plain"), teacher_prompt=None)
    cache_teacher(resolve(CacheConfig, None, args))
    q = read_shards(tmp_path / "plain")[0]
    assert not np.allclose(q["target_logprobs"][a:b], p["target_logprobs"][a:b], atol=1e-3)


def test_train_and_eval_cli(lm, tmp_path):
    c, run = tmp_path / "c", tmp_path / "run"
    cache(lm, c, mode="sample", samples=16)
    r = runner.invoke(
        app,
        [
            "train-student",
            "--cache",
            str(c),
            "--student",
            "transformer",
            "--data",
            str(lm["text"]),
            "--out",
            str(run),
            "--epochs",
            "3",
            "--batch-size",
            "4",
            "--lr",
            "3e-3",
            "--temperature",
            "1",
            "--divergence",
            "reverse",
            "--val-fraction",
            "0.2",
            *sum([["--student-arg", f"{k}={v}"] for k, v in STUDENT.items()], []),
        ],
    )
    assert r.exit_code == 0, r.stderr
    assert "KL(student_T || teacher_T)" in r.stderr
    assert {"model.safetensors", "model.json", "config.yaml", "metrics.jsonl", "summary.json", "tokenizer"} <= {
        p.name for p in run.iterdir()
    }
    assert not (run / "checkpoint.pt").exists()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all("val_perplexity" in x for x in lines)
    assert lines[-1]["train_soft"] < lines[0]["train_soft"]
    r = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(run),
            "--model",
            str(lm["teacher"]),
            "--data",
            str(lm["text"]),
            "--cache",
            str(c),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    student, teacher = rep["models"]
    assert rep["kind"] == "lm" and rep["teacher"]["mode"] == "sample"
    assert 1.0 < student["perplexity"] < 300 * 2 and 0.0 <= student["agreement"] <= 1.0
    assert teacher["perplexity"] == pytest.approx(rep["teacher"]["perplexity"], rel=2e-3)  # cache vs re-run
    assert teacher["num_parameters"] > 0 and student["tokens_per_second"] > 0
    # eval without a cache: the run dir brings its tokenizer and sequence settings
    r = runner.invoke(app, ["eval", "--model", str(run), "--data", str(lm["text"]), "--min-accuracy", "0.99"])
    assert r.exit_code == 1 and "check failed" in r.stderr and "perplexity" in r.stdout


def test_vocab_mismatch_exits_3_naming_both_sizes(lm, tmp_path):
    c = tmp_path / "c"
    cache(lm, c, top_k=8)
    r = runner.invoke(
        app,
        [
            "train-student",
            "--cache",
            str(c),
            "--student",
            "transformer",
            "--data",
            str(lm["text"]),
            "--out",
            str(tmp_path / "run"),
            "--student-arg",
            "vocab_size=320",
            "--student-arg",
            "d_model=32",
        ],
    )
    assert r.exit_code == 3 and "300" in r.stderr and "320" in r.stderr and r.stderr.startswith("error:")
    assert "Traceback" not in r.stderr
    big = make_llama(tmp_path / "big", lm["tok"], vocab_size=320)
    r = runner.invoke(
        app,
        [
            "train-student",
            "--cache",
            str(c),
            "--student",
            str(big),
            "--data",
            str(lm["text"]),
            "--out",
            str(tmp_path / "run2"),
        ],
    )
    assert r.exit_code == 3 and "300" in r.stderr and "320" in r.stderr


def test_data_mismatch_exits_3_another_tokenizer_exits_2(lm, tmp_path):
    c = tmp_path / "c"
    cache(lm, c, top_k=8)
    rows = text_rows(24)
    rows[5] = {"text": rows[5]["text"] + " and more"}
    edited = write_jsonl(tmp_path / "edited.jsonl", rows)
    r = runner.invoke(
        app,
        [
            "train-student",
            "--cache",
            str(c),
            "--student",
            "transformer",
            "--data",
            str(edited),
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert r.exit_code == 3 and "does not match the data" in r.stderr
    other = make_tokenizer(tmp_path / "tok2", vocab_size=280)
    r = runner.invoke(
        app,
        [
            "train-student",
            "--cache",
            str(c),
            "--student",
            "transformer",
            "--data",
            str(lm["text"]),
            "--out",
            str(tmp_path / "run"),
            "--tokenizer",
            str(other),
        ],
    )
    # another tokenizer is a usage error naming the flag that distils across tokenizers (docs/lm.md)
    assert r.exit_code == 2 and "differs from the tokenizer that built" in r.stderr and "--cross-tokenizer" in r.stderr


def test_hf_student_and_resume_match_an_uninterrupted_run(lm, tmp_path, monkeypatch):
    c = tmp_path / "c"
    cache(lm, c, top_k=8)
    student = make_llama(tmp_path / "student", lm["tok"], hidden=16, layers=1, seed=1)
    base = dict(
        cache=str(c),
        student=str(student),
        data=str(lm["text"]),
        epochs=2,
        batch_size=4,
        lr=1e-3,
        divergence="jsd",
        checkpoint_every=3,
        temperature=2.0,
    )
    full = train_student(resolve(TrainConfig, None, {**base, "out": str(tmp_path / "full")}))
    import kdcli.tasks.lm as lt

    calls = {"n": 0}
    real = lt.kd_loss

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(lt, "kd_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        train_student(resolve(TrainConfig, None, {**base, "out": str(tmp_path / "cut")}))
    monkeypatch.setattr(lt, "kd_loss", real)
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    resumed = train_student(resolve(TrainConfig, None, {**base, "out": str(tmp_path / "cut"), "resume": True}))
    assert resumed.resumed_from_step == 6 and resumed.steps == full.steps
    from safetensors.torch import load_file

    a, b = (
        load_file(str(tmp_path / "full" / "model.safetensors")),
        load_file(str(tmp_path / "cut" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rep = evaluate(
        resolve(EvalConfig, None, {"model": [str(tmp_path / "full")], "data": str(lm["text"]), "cache": str(c)})
    )
    assert rep.models[0].kl_to_teacher is not None and rep.models[0].num_parameters == full.student_parameters


def test_label_only_lm_training_needs_a_tokenizer(lm, tmp_path):
    r = runner.invoke(
        app, ["train-student", "--student", "transformer", "--data", str(lm["text"]), "--out", str(tmp_path / "run")]
    )
    assert r.exit_code == 2 and "--tokenizer" in r.stderr
    s = train_student(
        resolve(
            TrainConfig,
            None,
            dict(
                student="transformer",
                student_args=STUDENT,
                data=str(lm["pr"]),
                out=str(tmp_path / "run"),
                tokenizer=str(lm["tok"]),
                epochs=1,
                max_length=32,
                batch_size=8,
            ),
        )
    )
    assert s.loss_formula.startswith("loss = CE") and s.train_tokens > 0


def test_cli_subprocess_prints_one_table_and_bytes_per_token(lm, tmp_path):
    p = run_cli(
        "cache-teacher",
        "--teacher",
        lm["teacher"],
        "--data",
        lm["pr"],
        "--out",
        tmp_path / "c",
        "--top-k",
        "4",
        "--max-length",
        "32",
        "--teacher-prompt",
        "Be terse.\n{prompt}",
        check=True,
    )
    assert "B/token" in p.stdout and "caching teacher" in p.stderr and "caching teacher" not in p.stdout
    p = run_cli(
        "cache-teacher",
        "--teacher",
        lm["teacher"],
        "--data",
        tmp_path / "missing.jsonl",
        "--out",
        tmp_path / "d",
        "--top-k",
        "4",
    )
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: data file not found")


def test_damaged_token_cache_stops_training_and_verify_passes_a_good_one(lm, tmp_path):
    c = tmp_path / "c"
    cache(lm, c, top_k=8)
    r = runner.invoke(app, ["cache", "verify", str(c)])
    assert r.exit_code == 0, r.stderr
    name = json.loads((c / "manifest.json").read_text())["shards"][1]["name"]
    with h5py.File(c / name, "r+") as f:  # same size, a NaN where a log-prob was
        v = f["topk_logprobs"][()]
        v[3, 0] = np.nan
        f["topk_logprobs"][...] = v
    r = runner.invoke(
        app,
        [
            "train-student",
            "--cache",
            str(c),
            "--student",
            "transformer",
            "--data",
            str(lm["text"]),
            "--out",
            str(tmp_path / "run"),
            *sum([["--student-arg", f"{k}={v}"] for k, v in STUDENT.items()], []),
        ],
    )
    assert r.exit_code == 3 and "damaged" in r.stderr, r.stderr


def test_a_teacher_without_weights_is_refused(lm, tmp_path):
    r = runner.invoke(
        app,
        [
            "cache-teacher",
            "--teacher",
            "transformer",
            "--tokenizer",
            str(lm["tok"]),
            "--data",
            str(lm["text"]),
            "--out",
            str(tmp_path / "c"),
            "--top-k",
            "4",
        ],
    )
    assert r.exit_code == 2 and "has no weights" in r.stderr and not (tmp_path / "c").exists()


@pytest.mark.parametrize("student_kind", ["transformer", "hf"])
def test_bf16_precision_trains_float32_weights(lm, tmp_path, student_kind):
    """--precision bf16 (fused head for the built-in transformer, autocast for an HF student): the loss falls and
    the saved weights stay float32, close to (not equal to) an fp32 run's."""
    c = tmp_path / "c"
    cache(lm, c, top_k=8)
    student = (
        "transformer"
        if student_kind == "transformer"
        else str(make_llama(tmp_path / "student", lm["tok"], hidden=16, layers=1, seed=1))
    )
    args = {"student_args": STUDENT} if student_kind == "transformer" else {}
    from safetensors.torch import load_file

    weights, summaries = [], []
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        s = train_student(
            resolve(
                TrainConfig,
                None,
                dict(
                    cache=str(c),
                    student=student,
                    data=str(lm["text"]),
                    epochs=3,
                    batch_size=4,
                    lr=3e-3,
                    temperature=1.0,
                    precision=precision,
                    out=str(run),
                    seed=0,
                    **args,
                ),
            )
        )
        summaries.append(s)
        weights.append(load_file(str(run / "model.safetensors")))
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert lines[-1]["train_soft"] < lines[0]["train_soft"]
    assert all(v.dtype == torch.float32 for v in weights[1].values())
    diffs = [float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0]]
    assert 0 < max(diffs) < 0.05


@pytest.mark.parametrize("command", ["cache-teacher", "train-student"])
def test_out_naming_a_file_is_a_usage_error_for_text_data_too(lm, tmp_path, command):
    """Was exit 4 ("internal error ... please report it") for .jsonl data, 2 for classification data."""
    target = tmp_path / "taken.txt"
    target.write_text("not a directory\n")
    common = ["--data", str(lm["text"]), "--out", str(target)]
    args = (
        ["--teacher", str(lm["teacher"]), "--max-length", "32", *common]
        if command == "cache-teacher"
        else [
            "--student",
            "transformer",
            *sum([["--student-arg", f"{k}={v}"] for k, v in STUDENT.items()], []),
            "--tokenizer",
            str(lm["tok"]),
            *common,
        ]
    )
    r = runner.invoke(app, [command, *args])
    assert r.exit_code == 2, r.stderr
    assert f"--out {target} exists and is not a directory" in r.stderr and "internal error" not in r.stderr
    assert target.read_text() == "not a directory\n"  # untouched
