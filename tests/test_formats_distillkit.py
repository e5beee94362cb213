"""DistillKit's compressed captures: a tiny capture built with our own encoder from DistillKit's spec (byte layout of
distillkit/compression/monotonic_logprobs.py and bitpack.py, row layout of sample_logits_vllm.py / pack_logits.py),
decoded back, imported through the CLI as a kdcli top-k cache (exact ranks by default, all ranks on request) that
trains, refusals."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from format_helpers import kdcli
from lm_helpers import make_llama, make_tokenizer

from kdcli.cache.formats.distillkit import (
    CompressionConfig,
    decode_ids,
    decode_logprobs,
    encode_ids,
    encode_logprobs,
    pack_bits,
    unpack_bits,
)
from kdcli.cache.tokens import TokenCacheReader
from kdcli.lm.text import token_row_hashes

V = 300
RECOMMENDED = {
    "d": V,
    "k": 32,
    "exact_k": 8,
    "exact_dtype": "bfloat16",
    "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"],
    "term_dtype": "float32",
    "residual_bins": [],
    "delta_encoding": False,
    "error_diffusion": False,
}
EXACT_F32 = {**RECOMMENDED, "exact_dtype": "float32", "delta_encoding": True}
BINS = {
    **RECOMMENDED,
    "exact_dtype": "float16",
    "polynomial_terms": [0, 1],
    "term_dtype": "bfloat16",
    "residual_bins": [
        {"scale_dtype": "float16", "element_bits": 4, "num_elements": 16},
        {"scale_dtype": "bfloat16", "element_bits": 1, "num_elements": 4},
    ],
    "delta_encoding": True,
    "error_diffusion": True,
    "normalize_t": True,
}


def teacher_logprobs(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, V, generator=g) * 3, -1)  # (n, V) a peaked teacher


def test_bits_round_trip_msb_first():
    x = np.array([[0, 1, 299, 256, 5]], dtype=np.int64)
    b = pack_bits(x, 9)
    assert b.shape == (1, math.ceil(5 * 9 / 8))
    # MSB first: bits 0-8 hold 0, bits 9-17 hold 1 (000000001), bits 18-26 hold 299 (100101011): byte 2 = bits
    # 16-23 = 0, 1, then 299's first six bits 100101
    assert b[0, 0] == 0 and b[0, 1] == 0 and b[0, 2] == 0b0_1_100101
    np.testing.assert_array_equal(unpack_bits(b, 9, 5), x)


@pytest.mark.parametrize("cfg", [RECOMMENDED, EXACT_F32, BINS], ids=["recommended", "exact-f32-delta", "bins"])
def test_decoder_reads_back_the_encoding(cfg):
    c = CompressionConfig.from_dict(cfg)
    vals, ids = torch.topk(teacher_logprobs(50), c.k, -1)
    lb, ib = encode_logprobs(vals.numpy(), c), encode_ids(ids.numpy(), c)
    assert lb.shape == (50, c.logprob_bytes()) and ib.shape == (50, c.index_bytes())
    np.testing.assert_array_equal(decode_ids(ib, c), ids.numpy())  # ids: exact
    dec = decode_logprobs(lb, c).float()
    # the exact ranks: the stored dtype's rounding of the teacher's values (delta encoding: a float32 cumsum)
    rel = {"float32": 2.0**-20, "float16": 2.0**-10, "bfloat16": 2.0**-7}[c.exact_dtype]
    exact = dec[:, : c.exact_k]
    assert (exact - vals[:, : c.exact_k]).abs().max() <= rel * vals[:, : c.exact_k].abs().max() + 1e-5
    # the approximated ranks are not exact (that is what the importer refuses to pass off as exact)
    assert (dec[:, c.exact_k :] - vals[:, c.exact_k :]).abs().max() > 1e-3


def write_capture(d, cfg: dict, docs: list[np.ndarray], packed_len: int | None = None):
    """A capture directory as DistillKit's sample-logits writes it: compression_config.yaml + data_0.parquet with
    input_ids, compressed_logprobs, bytepacked_indices; position t holds the teacher's top-k for token t + 1
    (vLLM prompt log-probs without the empty first one). ``packed_len``: rows packed like distillkit-pack-logits
    (attention_mask numbers the documents, input_ids cut to the positions)."""
    d.mkdir()
    (d / "compression_config.yaml").write_text(yaml.safe_dump(cfg))
    c = CompressionConfig.from_dict(cfg)
    truth, rows = [], []
    for i, ids in enumerate(docs):
        logp = teacher_logprobs(len(ids) - 1, seed=i + 1)  # (positions, V)
        vals, top = torch.topk(logp, c.k, -1)
        truth.append(logp)
        rows.append(
            {
                "input_ids": ids.astype(np.uint64).tolist(),
                "compressed_logprobs": encode_logprobs(vals.numpy(), c).tolist(),
                "bytepacked_indices": encode_ids(top.numpy(), c).tolist(),
            }
        )
    if packed_len is not None:
        row = {"input_ids": [], "compressed_logprobs": [], "bytepacked_indices": [], "attention_mask": []}
        for j, r in enumerate(rows):
            n = len(r["compressed_logprobs"])  # truncated to the positions (pack_logits' _truncate_row)
            row["input_ids"] += r["input_ids"][:n]
            row["compressed_logprobs"] += r["compressed_logprobs"]
            row["bytepacked_indices"] += r["bytepacked_indices"]
            row["attention_mask"] += [j + 1] * n
        rows = [row]
    schema = pa.schema(
        [
            ("input_ids", pa.list_(pa.uint64())),
            ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
            ("bytepacked_indices", pa.list_(pa.list_(pa.uint8()))),
        ]
        + ([("attention_mask", pa.list_(pa.int64()))] if packed_len is not None else [])
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), d / "data_0.parquet")
    return truth


def docs():
    rng = np.random.default_rng(0)
    return [rng.integers(2, V, size=n) for n in (9, 6, 12)]


def read(d):
    r = TokenCacheReader(d)
    return r.read_rows(0, r.num_rows), r.manifest


def test_import_keeps_the_exact_ranks_and_their_exact_tail(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    ds = docs()
    truth = write_capture(tmp_path / "cap", EXACT_F32, ds)
    kdcli("cache", "import", tmp_path / "cap", "--format", "distillkit", "--out", tmp_path / "c", code=2,
          err="records no tokenizer")  # fmt: skip
    assert not (tmp_path / "c").exists()
    r = kdcli("cache", "import", tmp_path / "cap", "--format", "distillkit", "--out", tmp_path / "c", "--tokenizer",
              tok, "--json")  # fmt: skip
    s = json.loads(r.stdout)
    kdcli("cache", "verify", tmp_path / "c")
    a, m = read(tmp_path / "c")
    assert m["top_k"] == 8 and m["teacher"]["recorded"] is False
    assert s["rows"] == 3 and s["tokens"] == sum(len(x) - 1 for x in ds)
    logp = torch.cat(truth)  # (tokens, V) the teacher, float32
    vals, ids = torch.topk(logp, 8, -1)
    np.testing.assert_array_equal(a["topk_ids"], ids.numpy())
    np.testing.assert_array_equal(a["topk_logprobs"], vals.numpy().astype(np.float16))  # float32 exact -> fp16
    tail = torch.logsumexp(logp.scatter(1, ids, -math.inf), -1)  # the exact mass outside the top 8
    np.testing.assert_allclose(a["tail_logmass"].astype(np.float32), tail.numpy(), atol=2.0**-9, rtol=2.0**-9)
    nxt = torch.from_numpy(np.concatenate([x[1:] for x in ds])).long()
    inside = (ids == nxt[:, None]).any(1).numpy()
    np.testing.assert_allclose(
        a["target_logprobs"][inside].astype(np.float32),
        logp.gather(1, nxt[:, None])[:, 0].numpy()[inside],
        atol=2.0**-8,
    )
    assert (
        a["target_logprobs"][~inside].astype(np.float32)
        >= logp.gather(1, nxt[:, None])[:, 0].numpy()[~inside] - 2.0**-8
    ).all()  # an upper bound where the next token is not among the ids
    for r, x in enumerate(ds):
        assert a["row_hash"][r] == token_row_hashes([x.astype(np.int32)], np.array([1]))[0]
    # the capture's token ids are the DATA: a student with the capture's vocabulary trains on the import
    make_llama(tmp_path / "student", tok)
    kdcli("train-student", "--cache", tmp_path / "c", "--data", s["data"], "--student", tmp_path / "student",
          "--epochs", 1, "--temperature", 1, "--out", tmp_path / "run")  # fmt: skip


def test_import_all_ranks_is_marked_approximate_and_packed_rows_are_split(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    ds = docs()
    write_capture(tmp_path / "cap", RECOMMENDED, ds, packed_len=sum(len(x) - 1 for x in ds))
    r = kdcli("cache", "import", tmp_path / "cap", "--format", "distillkit", "--out", tmp_path / "c", "--tokenizer",
              tok, "--ranks", "all", "--json")  # fmt: skip
    s = json.loads(r.stdout)
    kdcli("cache", "verify", tmp_path / "c")
    a, m = read(tmp_path / "c")
    assert m["top_k"] == 32 and any("polynomial approximation" in x for x in m["imported"]["approximate"])
    # packing cut each document's last token: its last position is dropped, the documents stay apart
    assert s["rows"] == 3 and list(a["lengths"]) == [len(x) - 2 for x in ds] and "dropped" in s["notes"][0]
    assert (np.diff(a["topk_logprobs"].astype(np.float32), axis=1) <= 0).all()  # re-sorted


def test_refusals(tmp_path):
    tok = str(make_tokenizer(tmp_path / "tok"))

    def imp(src, *extra, **kw):
        kdcli(
            "cache", "import", src, "--format", "distillkit", "--out", tmp_path / "o", "--tokenizer", tok, *extra, **kw
        )

    write_capture(tmp_path / "cap", {**RECOMMENDED, "exact_k": 0}, docs())
    imp(tmp_path / "cap", code=2, err="exact_k = 0")
    imp(tmp_path / "cap", "--ranks", "some", code=2, err="--ranks some")
    (tmp_path / "cap" / "compression_config.yaml").unlink()
    imp(tmp_path / "cap", code=2, err="no DistillKit compression config")
    (tmp_path / "leg").mkdir()
    (tmp_path / "leg" / "compression_config.yaml").write_text(yaml.safe_dump(RECOMMENDED))
    pq.write_table(
        pa.table({"input_ids": [[1, 2]], "packed_indices": [[[1]]], "exact_values": [[[0.0]]], "coeffs": [[[0.0]]]}),
        tmp_path / "leg" / "data_0.parquet",
    )
    imp(tmp_path / "leg", code=2, err="legacy format")
    write_capture(tmp_path / "cap2", EXACT_F32, docs())
    (tmp_path / "cap2" / "compression_config.yaml").write_text(yaml.safe_dump({**EXACT_F32, "k": 16}))
    imp(tmp_path / "cap2", code=3, err="bytes per position")
    imp(tmp_path / "cap2", "--temperature", 2, code=2, err="--temperature applies to import --format axolotl")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("o", ".o"))]
