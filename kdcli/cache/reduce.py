"""Teacher logits -> what a cache row stores. Runs on the teacher's device; only the reduced tensors leave it.

All modes start from ``log_softmax(z)`` at T = 1 in fp32. Log-probabilities (not probabilities) are stored, in
fp16: ``softmax(logp / T) == softmax(z / T)`` for every T, so one cache serves every temperature, and fp16
log-probs keep the tail that fp16 probabilities would flush.

- ``full``:   ``logprobs`` (rows, C)
- ``topk``:   ``topk_ids`` (rows, k), ``topk_logprobs`` (rows, k), ``tail_logmass`` (rows,) = log of the
              probability mass outside the top k, computed exactly as a logsumexp over the other classes
- ``sample``: ``sample_ids`` (rows, S) and ``sample_counts`` (rows, S): S draws from the teacher's T = 1
              distribution, merged into distinct ids with their counts (unused slots have count 0), plus
              ``sample_logprobs`` (rows, S), the teacher's log-prob of each id (for T != 1 reweighting)
"""

from __future__ import annotations

import numpy as np
import torch

MODES = ("full", "topk", "sample")
LOGPROB_DTYPE = torch.float16


def numpy_id_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint16) if num_classes <= 65536 else np.dtype(np.int32)


def reduce_logits(logits: torch.Tensor, mode: str, *, top_k: int | None = None, samples: int | None = None,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """(rows, C) logits -> dict of per-row tensors, still on the logits' device."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (rows, C) fp32
    if mode == "full":
        return {"logprobs": logp.to(LOGPROB_DTYPE)}
    if mode == "topk":
        k = min(int(top_k), logp.shape[-1])
        vals, ids = torch.topk(logp, k, dim=-1)  # (rows, k), sorted descending
        rest = logp.scatter(-1, ids, float("-inf"))
        tail = torch.logsumexp(rest, dim=-1)  # (rows,) log mass outside the top k (-inf when k == C)
        return {"topk_ids": ids.to(torch.int32), "topk_logprobs": vals.to(LOGPROB_DTYPE),
                "tail_logmass": tail.to(torch.float32)}
    if mode == "sample":
        s = int(samples)
        draws = torch.multinomial(logp.exp(), s, replacement=True, generator=generator)  # (rows, s)
        ids, counts = _merge_draws(draws)
        lp = torch.gather(logp, -1, ids.long())
        lp = torch.where(counts > 0, lp, torch.zeros_like(lp))
        return {"sample_ids": ids.to(torch.int32), "sample_counts": counts.to(torch.int32),
                "sample_logprobs": lp.to(LOGPROB_DTYPE)}
    raise ValueError(f"unknown cache mode {mode!r}")


def _merge_draws(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, s) draws -> (ids, counts), each (rows, s): distinct ids first, zero counts after."""
    d, _ = torch.sort(draws, dim=-1)
    first = torch.ones_like(d, dtype=torch.bool)
    first[:, 1:] = d[:, 1:] != d[:, :-1]
    slot = torch.cumsum(first.long(), dim=-1) - 1  # (rows, s) run index of each draw
    counts = torch.zeros_like(d).scatter_add_(-1, slot, torch.ones_like(d))
    ids = torch.zeros_like(d).scatter_(-1, slot, d)
    return ids, counts


def to_host(reduced: dict[str, torch.Tensor], num_classes: int) -> dict[str, np.ndarray]:
    """Copy reduced tensors to numpy with their storage dtypes (uint16 ids when the classes fit)."""
    out = {}
    for name, t in reduced.items():
        a = t.detach().cpu().numpy()
        if name.endswith("_ids"):
            a = a.astype(numpy_id_dtype(num_classes))
        elif name == "sample_counts":
            a = a.astype(np.uint16)
        out[name] = a
    return out
