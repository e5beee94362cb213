"""axolotl's KD dataset layout, through the CLI: the export holds the columns axolotl's loader, collator and loss read
(both alignments) and loads the way axolotl loads a local directory; export -> import keeps the loss (axolotl's
top-k KL for a top-k cache; train-student's own loss, to float rounding, for a cache the layout carries whole); a
dataset written by hand in axolotl's layout imports, trains and evaluates; refusals are one line."""

import json
import math

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from format_helpers import kdcli, run_dir_metrics
from lm_helpers import make_llama, make_tokenizer, prompt_rows, text_rows, write_jsonl

from kdcli.cache.formats.axolotl import MAX_FULL_CLASSES, AxolotlFormat
from kdcli.cache.formats.base import Options
from kdcli.cache.manifest import stored_temperatures
from kdcli.cache.modes import targets_from_arrays
from kdcli.cache.tokens import TokenCacheReader
from kdcli.config import CacheConfig, resolve
from kdcli.infra.errors import UsageError
from kdcli.lm.text import load_tokenizer, token_row_hashes, tokenizer_identity
from kdcli.losses import soft_kl
from kdcli.stages.cache import cache_teacher

COLUMNS = ["input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("ax")
    tok = make_tokenizer(root / "tok")
    teacher = make_llama(root / "teacher", tok)
    out = {
        "root": root,
        "tok": tok,
        "teacher": teacher,
        "text": write_jsonl(root / "text.jsonl", text_rows(12)),
        "pr": write_jsonl(root / "pr.jsonl", prompt_rows(8)),
    }
    for name, data, kw in (
        ("topk", "text", {"top_k": 8}),
        ("full", "text", {"mode": "full"}),
        ("sample", "text", {"mode": "sample", "samples": 8}),
        ("pr", "pr", {"top_k": 4, "temperatures": "2,4"}),
    ):
        args = dict(teacher=str(teacher), data=str(out[data]), out=str(root / name), max_length=32, shard_size=4, **kw)
        cache_teacher(resolve(CacheConfig, None, args))
    return out


def cache_arrays(d):
    r = TokenCacheReader(d)
    return r.read_rows(0, r.num_rows), r.manifest


def student_logits(n: int, V: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, V, generator=g) * 2  # a fixed student: (tokens, V)


def axolotl_topk_kl(student: torch.Tensor, ids: np.ndarray, lp: np.ndarray) -> torch.Tensor:
    """axolotl's forward KL per position (axolotl-ai-cloud/axolotl src/axolotl/integrations/kd/kernels/liger.py,
    re-derived): sum over the K ids of p_teacher * (log p_teacher - log s), s the student's full log-softmax (no
    kd_normalize_topk), the teacher's K values taken as they are stored."""
    s = torch.log_softmax(student.double(), -1).gather(1, torch.from_numpy(ids).long())
    t = torch.from_numpy(lp).double()
    return (t.exp() * (t - s)).sum(-1)


def load_like_axolotl(d):
    """What axolotl's ``_load_from_local_path`` (src/axolotl/utils/data/shared.py) does with a local directory:
    ``load_from_disk``, and on FileNotFoundError ``load_dataset(path)``; then the split."""
    try:
        ds = datasets.load_from_disk(str(d))
    except FileNotFoundError:
        ds = datasets.load_dataset(str(d))
    return ds["train"]


@pytest.mark.parametrize("alignment", ["next", "token"])
def test_export_holds_what_axolotls_loader_collator_and_loss_read(lm, tmp_path, alignment):
    r = kdcli("cache", "export", lm["root"] / "pr", "--format", "axolotl", "--data", lm["pr"], "--out", tmp_path / "a",
              "--alignment", alignment, "--json")  # fmt: skip
    s = json.loads(r.stdout)
    warnings = [x for x in r.stderr.splitlines() if x.startswith("warning: export --format axolotl")]
    assert len(warnings) == len(s["lost"]) == 3
    assert "tail_logmass" in r.stderr and "T = 2, 4" in r.stderr and "kd_temperature: 1" in r.stderr
    ds = load_like_axolotl(tmp_path / "a")
    assert ds.column_names == COLUMNS  # _is_dataset_already_tokenized: input_ids, attention_mask, labels
    arrays, m = cache_arrays(lm["root"] / "pr")
    off = np.concatenate([[0], np.cumsum(arrays["lengths"])])
    tok = load_tokenizer(str(lm["teacher"]))
    for r, row in enumerate(ds):
        L = len(row["input_ids"])
        assert all(len(row[c]) == L for c in COLUMNS[1:]) and row["attention_mask"] == [1] * L
        prompt = tok(f"quote {r}:", add_special_tokens=False)["input_ids"]
        assert row["input_ids"][: len(prompt)] == prompt  # the response follows the prompt
        pred = [t for t in range(L) if row["labels"][t] != -100]
        assert pred == list(range(len(prompt), L))
        assert [row["input_ids"][t] for t in pred] == [row["labels"][t] for t in pred]
        at = [t - 1 for t in pred] if alignment == "next" else pred  # which target row predicts each token
        assert [t for t in range(L) if row["target_mask"][t] == [1] * 4] == at
        assert all(row["target_mask"][t] == [0] * 4 for t in range(L) if t not in at)
        ids = np.array([row["target_token_ids"][t] for t in at])
        lp = np.array([row["target_logprobs"][t] for t in at], dtype=np.float32)
        np.testing.assert_array_equal(ids, arrays["topk_ids"][off[r] : off[r + 1]])
        want = torch.log_softmax(torch.from_numpy(arrays["topk_logprobs"][off[r] : off[r + 1]].astype(np.float32)), -1)
        np.testing.assert_allclose(lp, want.numpy(), rtol=1e-6, atol=1e-6)  # renormalised over the K ids at T = 1
    meta = pq.ParquetFile(tmp_path / "a" / "part-00000.parquet").schema_arrow.metadata[b"kdcli.axolotl"]
    assert json.loads(meta)["alignment"] == alignment


def test_topk_round_trip_loss_is_axolotls_loss(lm, tmp_path):
    """export -> import of a top-k cache: kdcli's loss on the imported cache is the loss axolotl computes on the
    exported rows (the tail is what the layout drops: the imported cache says so)."""
    kdcli("cache", "export", lm["root"] / "topk", "--format", "axolotl", "--data", lm["text"], "--out", tmp_path / "a")
    r = kdcli("cache", "import", tmp_path / "a", "--format", "axolotl", "--tokenizer", lm["teacher"], "--out",
              tmp_path / "back", "--json")  # fmt: skip
    i = json.loads(r.stdout)
    arrays, m = cache_arrays(tmp_path / "back")
    orig, om = cache_arrays(lm["root"] / "topk")
    assert m["data"]["fingerprint"] == om["data"]["fingerprint"]  # same sequences, same predicted tokens
    assert m["teacher"]["weights_sha256"] == om["teacher"]["weights_sha256"]  # from the kdcli.axolotl metadata
    assert any("tail mass" in u for u in i["unrecorded"]) and m["imported"]["positions"]["renormalized"] == i["tokens"]
    np.testing.assert_array_equal(arrays["topk_ids"], orig["topk_ids"])
    assert np.isneginf(arrays["tail_logmass"]).all()
    ds = load_like_axolotl(tmp_path / "a")
    ids = np.concatenate([np.array(r["target_token_ids"])[np.array(r["target_mask"])[:, 0] == 1] for r in ds])
    lp = np.concatenate([np.array(r["target_logprobs"])[np.array(r["target_mask"])[:, 0] == 1] for r in ds])
    V = m["num_classes"]
    student = student_logits(len(ids), V)
    ref = axolotl_topk_kl(student, ids, lp)
    got = soft_kl(student, targets_from_arrays(arrays, "topk", V, **stored_temperatures(m)), 1.0).double()
    ent = -(np.exp(lp) * lp).sum(-1)  # fp16 storage moves each log-prob by <= 2^-11 relative
    np.testing.assert_array_less(np.abs((got - ref).numpy()), 2.0**-10 * (1 + ent + ref.abs().numpy()))


def test_full_cache_round_trip_is_a_full_cache_with_the_same_loss(lm, tmp_path):
    """A full cache over 300 classes goes out as K = V ids: everything is carried, so the import is a full cache
    again (every class listed at every position), exact at every temperature, and train-student on it and its own
    token ids gives the original cache's loss at T = 2, to float rounding."""
    r = kdcli("cache", "export", lm["root"] / "full", "--format", "axolotl", "--data", lm["text"], "--out",
              tmp_path / "f", "--json")  # fmt: skip
    assert not any("tail" in x for x in json.loads(r.stdout)["lost"])
    r = kdcli("cache", "import", tmp_path / "f", "--format", "axolotl", "--tokenizer", lm["tok"], "--out",
              tmp_path / "back", "--json")  # fmt: skip
    data = json.loads(r.stdout)["data"]
    arrays, m = cache_arrays(tmp_path / "back")
    orig, om = cache_arrays(lm["root"] / "full")
    assert m["mode"] == "full" and m["imported"]["positions"]["target_bound"] == 0
    for k in ("logprobs", "target_logprobs"):  # the fp16 values renormalised in float32, stored in fp16 again
        np.testing.assert_allclose(arrays[k].astype(np.float32), orig[k].astype(np.float32), atol=2**-8, rtol=2**-9)
    # --block-rows 4 (the original's shard size): the same batches from caches sharded differently
    common = ["--student", lm["teacher"], "--epochs", 1, "--temperature", 2, "--batch-size", 4, "--block-rows", 4]
    kdcli("train-student", "--cache", lm["root"] / "full", "--data", lm["text"], "--out", tmp_path / "a", *common)
    kdcli("train-student", "--cache", tmp_path / "back", "--data", data, "--out", tmp_path / "b", *common)
    a, b = run_dir_metrics(tmp_path / "a")[0], run_dir_metrics(tmp_path / "b")[0]
    for key in ("train_loss", "train_soft", "train_hard"):
        assert math.isclose(a[key], b[key], rel_tol=1e-3), (key, a[key], b[key])


def hand_written_rows(K: int = 4):
    """Three rows in axolotl's prepared layout ('next' alignment: target row t is the teacher's prediction of token
    t + 1), as a user's pipeline writes them: Python lists, -100 labels, padding rows of ids 0..K-1 at -inf,
    renormalised positions (sum 1) and raw ones (sum < 1), a two-run mask (two assistant turns)."""
    rng = np.random.default_rng(0)
    seqs = [[5, 17, 40, 41, 42, 9], [7, 8, 9, 10, 11, 12, 13, 14], [3, 4, 5, 6, 7]]
    predicted = [[3, 4, 5], [2, 3, 6, 7], [1, 2, 3, 4]]  # token positions whose prediction is trained
    rows, truth = [], []
    for s, pred in zip(seqs, predicted):
        L = len(s)
        tid = [list(range(K)) for _ in range(L)]
        tlp = [[-math.inf] * K for _ in range(L)]
        tm = [[0] * K for _ in range(L)]
        for j, p in enumerate(pred):
            ids = rng.choice(np.arange(20, 300), size=K, replace=False)
            raw = j % 2 == 1
            lp = np.log(rng.dirichlet(np.ones(K)) * (0.8 if raw else 1.0))
            tid[p - 1], tlp[p - 1], tm[p - 1] = ids.tolist(), lp.tolist(), [1] * K
            truth.append((ids, lp, raw))
        labels = [s[t] if t in pred else -100 for t in range(L)]
        rows.append(
            {"input_ids": s, "attention_mask": [1] * L, "labels": labels, "target_token_ids": tid,
             "target_logprobs": tlp, "target_mask": tm}
        )  # fmt: skip
    return rows, seqs, predicted, truth


def test_a_dataset_written_in_axolotls_layout_imports_trains_and_evaluates(lm, tmp_path):
    rows, seqs, predicted, truth = hand_written_rows()
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "kd.parquet"))
    ds.save_to_disk(str(tmp_path / "kd_saved"))
    kdcli("cache", "import", tmp_path / "kd.parquet", "--format", "axolotl", "--out", tmp_path / "c", code=2,
          err="records no tokenizer: pass --tokenizer")  # fmt: skip
    assert not (tmp_path / "c").exists()
    r = kdcli("cache", "import", tmp_path / "kd.parquet", "--format", "axolotl", "--tokenizer", lm["tok"], "--out",
              tmp_path / "c", "--json")  # fmt: skip
    i = json.loads(r.stdout)
    kdcli("cache", "verify", tmp_path / "c")
    arrays, m = cache_arrays(tmp_path / "c")
    assert m["teacher"]["recorded"] is False and m["teacher"]["weights_sha256"] is None
    assert any("teacher" in u for u in m["imported"]["unrecorded"]) and m["data"]["fingerprint_source"]
    assert m["tokenizer"] == tokenizer_identity(load_tokenizer(str(lm["tok"])), str(lm["tok"]))
    assert m["top_k"] == 4 and m["num_classes"] == 300 and i["rows"] == 3 and i["tokens"] == 11
    # targets: what the test wrote, sorted by log-prob; renormalised rows have an empty tail, raw rows 1 - sum
    np.testing.assert_array_equal(arrays["lengths"], [len(p) for p in predicted])
    for j, (ids, lp, raw) in enumerate(truth):
        order = np.argsort(-lp, kind="stable")
        np.testing.assert_array_equal(arrays["topk_ids"][j], ids[order])
        want = (lp - (0 if raw else np.log(np.exp(lp).sum())))[order].astype(np.float16)
        np.testing.assert_array_equal(arrays["topk_logprobs"][j], want)
        want_tail = np.log1p(-np.exp(lp).sum()) if raw else -np.inf
        np.testing.assert_array_equal(arrays["tail_logmass"][j], np.float16(want_tail))
    # row identity: the token ids and the predicted positions, as kdcli hashes a tokenized row
    for r, (s, pred) in enumerate(zip(seqs, predicted)):
        mask = np.zeros(len(s), bool)
        mask[pred] = True
        assert arrays["row_hash"][r] == token_row_hashes([np.array(s, np.int32)], np.array([pred[0]]), [mask])[0]
    # the token ids beside the cache are pre-tokenized DATA: the labels say which tokens are predicted
    t = pq.read_table(i["data"]).to_pylist()
    assert [x["input_ids"] for x in t] == seqs
    assert [[p for p, lab in enumerate(x["labels"]) if lab != -100] for x in t] == predicted
    # it trains and evaluates (a student with the teacher's vocabulary), reading nothing but the import; at T = 1,
    # the one temperature an imported top-k cache stores
    kdcli("train-student", "--cache", tmp_path / "c", "--data", i["data"], "--student", lm["teacher"], "--epochs", 1,
          "--temperature", 1, "--out", tmp_path / "run")  # fmt: skip
    assert run_dir_metrics(tmp_path / "run")[0]["train_soft"] > 0
    e = json.loads(kdcli("eval", "--model", tmp_path / "run", "--cache", tmp_path / "c", "--data", i["data"],
                         "--temperature", 1, "--json").stdout)  # fmt: skip
    assert e["num_tokens"] == 11 and e["models"][0]["kl_to_teacher"] is not None
    table = kdcli("eval", "--model", tmp_path / "run", "--cache", tmp_path / "c", "--data", i["data"], "--temperature",
                  1, "--latency-repeats", 1).stdout  # fmt: skip
    assert "teacher (from the cache, topk): not recorded (an imported cache), perplexity" in table
    # the same rows from a save_to_disk directory, and in axolotl's dataset-side ('token') alignment
    kdcli("cache", "import", tmp_path / "kd_saved", "--format", "axolotl", "--tokenizer", lm["tok"], "--out",
          tmp_path / "c2")  # fmt: skip
    shifted = [
        {**r, **{c: r[c][-1:] + r[c][:-1] for c in ("target_token_ids", "target_logprobs", "target_mask")}}
        for r in rows
    ]  # row t+1 now holds what row t held (the last row held padding)
    datasets.Dataset.from_list(shifted).to_parquet(str(tmp_path / "tok.parquet"))
    kdcli("cache", "import", tmp_path / "tok.parquet", "--format", "axolotl", "--tokenizer", lm["tok"], "--out",
          tmp_path / "c3", "--alignment", "token")  # fmt: skip
    for d in ("c2", "c3"):
        other, _ = cache_arrays(tmp_path / d)
        for k in arrays:
            np.testing.assert_array_equal(other[k], arrays[k])


def test_refusals_say_one_line_and_write_nothing(lm, tmp_path):
    text, tok = lm["text"], lm["tok"]

    def export(cache, *extra, **kw):
        kdcli("cache", "export", lm["root"] / cache, "--format", "axolotl", "--out", tmp_path / "o", *extra, **kw)

    def imp(src, *extra, **kw):
        kdcli("cache", "import", src, "--format", "axolotl", "--out", tmp_path / "o", "--tokenizer", tok, *extra, **kw)

    export("sample", "--data", text, code=2, err="cannot be exported to axolotl")
    export("topk", code=2, err="needs --data")
    export("topk", "--data", lm["pr"], code=3, err="was built from 17 rows")
    export("topk", "--data", text, "--alignment", "shifted", code=2, err="--alignment shifted")
    export("topk", "--data", text, "--temperature", "0", code=2, err="positive")
    export("topk", "--data", text, "--vocab-size", 5, code=2, err="No such option")  # an import-only option
    big = {"mode": "full", "num_classes": MAX_FULL_CLASSES + 1, "kind": "token"}
    with pytest.raises(UsageError, match="build a topk cache"):
        AxolotlFormat().plan_export(big, Options())
    rows, *_ = hand_written_rows()
    t = pa.Table.from_pylist(rows)
    pq.write_table(t.drop_columns(["target_mask"]), tmp_path / "nomask.parquet")
    imp(tmp_path / "nomask.parquet", code=2, err="lacks the column 'target_mask'")
    pq.write_table(pa.table({"messages": [["hi"]], "logprobs": [[[-0.1]]]}), tmp_path / "raw.parquet")
    imp(tmp_path / "raw.parquet", code=2, err="raw axolotl KD dataset")
    logits = [
        {**r, "target_logprobs": [[abs(x) + 3 if x != -math.inf else x for x in p] for p in r["target_logprobs"]]}
        for r in rows
    ]
    pq.write_table(pa.Table.from_pylist(logits), tmp_path / "logits.parquet")
    imp(tmp_path / "logits.parquet", code=3, err="log-probs")
    pq.write_table(t, tmp_path / "ok.parquet")
    imp(tmp_path / "ok.parquet", "--vocab-size", 400, "--ranks", "all", code=2, err="--ranks applies to import")
    imp(tmp_path / "ok.parquet", "--vocab-size", 100, code=2, err="smaller than the tokenizer")
    far = [{**r, "target_token_ids": [[i + 300 * (i >= 20) for i in p] for p in r["target_token_ids"]]} for r in rows]
    pq.write_table(pa.Table.from_pylist(far), tmp_path / "far.parquet")
    imp(tmp_path / "far.parquet", code=3, err="outside the vocabulary of 300 (pass --vocab-size")
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == ["far.parquet", "logits.parquet", "nomask.parquet", "ok.parquet", "raw.parquet"]
