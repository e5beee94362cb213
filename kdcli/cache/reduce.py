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
        # A row with NaN/inf logits is refused by the caller after the fact (no device sync per batch); a
        # uniform stand-in keeps multinomial from failing (on CUDA: a device-side assert) before that check.
        probs = torch.nan_to_num(logp.exp(), nan=1.0, posinf=1.0, neginf=0.0)
        draws = torch.multinomial(probs, s, replacement=True, generator=generator)  # (rows, s)
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
    return storage_arrays({name: t.detach().cpu().numpy() for name, t in reduced.items()}, num_classes)


class HostCopy:
    """Reduced tensors on their way to the host, started without waiting for the device.

    On CUDA each tensor is copied into pinned host memory with ``non_blocking=True`` and an event is recorded
    behind the copies on the current stream: the caller goes on to queue the next batch's forward pass while the
    copies run, and :meth:`wait` blocks only on this batch's event. Only the reduced tensors ever leave the
    device. On the CPU the tensors already are host memory: ``wait`` returns them as arrays, nothing is copied.
    """

    def __init__(self, reduced: dict[str, torch.Tensor]):
        self._host: dict[str, torch.Tensor] = {}
        self._event = None
        for name, t in reduced.items():
            t = t.detach()
            if t.is_cuda:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                buf.copy_(t, non_blocking=True)
                self._host[name] = buf
            else:
                self._host[name] = t
        if any(t.is_cuda for t in reduced.values()):
            self._event = torch.cuda.Event()
            self._event.record()  # on the current stream, after the copies

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> dict[str, np.ndarray]:
        if self._event is not None:
            self._event.synchronize()
        return {name: t.numpy() for name, t in self._host.items()}


def storage_arrays(arrays: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """Host arrays -> their storage dtypes (uint16 ids when the classes fit, uint16 sample counts)."""
    out = {}
    for name, a in arrays.items():
        if name.endswith("_ids"):
            a = a.astype(numpy_id_dtype(num_classes))
        elif name == "sample_counts":
            a = a.astype(np.uint16)
        out[name] = a
    return out
