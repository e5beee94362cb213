"""Bytes per token of sparse token caches, from a real teacher's distributions: does `sample`'s zero-count padding
(distinct ids + counts in S slots) cost anything once gzip-compressed, against a ragged layout (distinct ids only)?

    python benchmarks/bench_sample_bytes.py FULL_LM_CACHE [--samples 12,24,50] [--priority 8,15,30] [--top-k 8,64]

FULL_LM_CACHE is a `--mode full` token cache (e.g. one bench_lm.py --keep wrote with the SmolLM2 teacher). Every
mode is reduced from its stored log-probs exactly as cache-teacher reduces a teacher's (kdcli.cache.reduce, stored
temperatures 1, 2, 4), turned into the stored dtypes (storage_arrays) and written as an in-memory HDF5 shard with
cache-teacher's default compression for token caches (gzip level 4 + byte shuffle, ~128 KiB chunks). Printed per
token: the mode's own arrays (not the per-sequence metadata or target log-probs, the same in every mode),
uncompressed and as stored, the mean number of distinct ids, and for sample the ragged alternative: the distinct
ids, counts and log-probs of each token back to back plus one uint8 count of distinct ids per token, compressed
the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np
import torch

from kdcli.cache.reduce import reduce_logits, storage_arrays
from kdcli.cache.writer import resolve_compression, shard_image

TEMPS = (1.0, 2.0, 4.0)


def stored_bytes(arrays: dict[str, np.ndarray], mode: str) -> int:
    return len(shard_image(arrays, {}, resolve_compression("gzip", token=True, mode=mode))) - len(
        shard_image({}, {}, None)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache")
    ap.add_argument("--samples", default="12,24,50")
    ap.add_argument("--priority", default="8,15,30")
    ap.add_argument("--top-k", default="8,64")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cache = Path(args.cache)
    m = json.loads((cache / "manifest.json").read_text())
    lp = np.concatenate([h5py.File(cache / s["name"], "r")["logprobs"][()] for s in m["shards"]])
    logp = torch.from_numpy(lp).float()
    n, V = logp.shape
    g = torch.Generator().manual_seed(args.seed)
    runs = (
        [("topk", int(k)) for k in args.top_k.split(",") if k]
        + [("sample", int(s)) for s in args.samples.split(",") if s]
        + [("priority", int(k)) for k in args.priority.split(",") if k]
    )
    print(f"{cache}: {n} tokens, vocabulary {V}; bytes per token of the mode's arrays (gzip-4 + shuffle)")
    print(f"{'mode':12} {'ids/token':>9} {'raw':>8} {'stored':>8} {'ragged raw':>11} {'ragged stored':>14}")
    out = {}
    for mode, k in runs:
        kw = {"top_k": k} if mode == "topk" else {"samples": k}
        red = reduce_logits(logp, mode, generator=g, temperatures=TEMPS, **kw)
        arrays = storage_arrays({a: t.numpy() for a, t in red.items()}, V)
        raw = sum(a.nbytes for a in arrays.values()) / n
        stored = stored_bytes(arrays, mode) / n
        row = {"raw": raw, "stored": stored}
        ids = ""
        if mode == "sample":
            used = arrays["sample_counts"] > 0
            row["unique_ids"] = float(used.sum(1).mean())
            ragged = {
                "n_unique": used.sum(1).astype(np.uint8),
                "ids": arrays["sample_ids"][used],
                "counts": arrays["sample_counts"][used],
                "logprobs": arrays["sample_logprobs"][used],
                "sample_logz_t": arrays["sample_logz_t"],
            }
            row["ragged_raw"] = sum(a.nbytes for a in ragged.values()) / n
            row["ragged_stored"] = stored_bytes(ragged, mode) / n
            ids = f"{row['unique_ids']:9.2f}"
        elif mode == "priority":
            row["unique_ids"] = float(arrays["priority_ids"].shape[1])
            ids = f"{row['unique_ids']:9.2f}"
        rag = f"{row['ragged_raw']:11.1f} {row['ragged_stored']:14.1f}" if "ragged_raw" in row else ""
        print(f"{mode + '-' + str(k):12} {ids or '':>9} {raw:8.1f} {stored:8.1f} {rag}")
        out[f"{mode}{k}"] = row
    print(json.dumps({"tokens": n, "vocab_size": V, "modes": out}))


if __name__ == "__main__":
    main()
