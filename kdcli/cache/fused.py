"""Fused teachers: K caches over the same data read in lock-step and combined into one teacher.

``train-student --cache A --cache B [--cache-weights 0.7,0.3] [--combine mean|geometric]`` (and ``eval``) train
on / measure against one teacher made of K cached teachers, with weights ``w_k`` (normalised to sum to 1):

- ``mean`` (default): the mixture ``p(i) = sum_k w_k p_k(i)`` (Hinton et al. 2015, section 4: an ensemble's
  soft targets are the mean of its members' probabilities);
- ``geometric``: the renormalised weighted geometric mean ``p(i) ∝ prod_k p_k(i)^w_k`` (the weighted mean of the
  log-probabilities, renormalised: a product of experts).

The fused teacher is a distribution at T = 1; the loss tempers it like any cached teacher (``q_T ∝ p^(1/T)``).
Note that the KL to a mixture is not the mixture of the KLs: the fused distribution is built per row (per token
for language models) before any divergence is taken.

Only ``full`` caches are fused, and there the fusion is exact (up to the fp16 rounding of the stored
log-probabilities; the fused row is computed in float64 and renormalised). Sparse caches (``topk``, ``sample``,
``priority``) are refused: tempering a mixture at T != 1 needs every teacher's probability of every class, and a
sparse cache knows it only on its own ids (a topk teacher's tail, a sampled teacher's unsampled classes), so a
fused sparse target would rest on an assumption about the tails that no stored statistic makes exact or
unbiased. Cache the teachers with ``--mode full`` to fuse them.

The fused reader looks like one ``full`` cache to everything downstream (the training order, DDP shares,
DataLoader workers, eval): its blocks are the first cache's, every other cache reads the same global rows
(``read_rows``, one or two contiguous reads), so the K caches are read in lock-step and memory stays flat (one
block per cache). Every block checks that the caches hold the same rows (row index, sample index, row hash,
predicted tokens per row, augmentation parameters); the task then checks the fused rows' hashes against the data.
"""

from __future__ import annotations

import os

import numpy as np

from kdcli.cache.reader import Block, CacheReader
from kdcli.errors import CacheError, UsageError

COMBINES = ("mean", "geometric")
SAME_ROW_KEYS = ("row_index", "sample_index", "row_hash", "lengths", "aug_params")


def parse_cache_weights(text: str | None, n: int) -> tuple[float, ...]:
    """``"0.5,0.3,0.2"`` -> weights normalised to sum to 1 (default: equal). UsageError (exit 2) unless there is
    one non-negative finite number per cache and their sum is > 0."""
    if text is None or not str(text).strip():
        return tuple([1.0 / n] * n)
    try:
        ws = [float(x) for x in str(text).split(",")]
    except ValueError:
        raise UsageError(f"--cache-weights {text!r}: expected comma-separated numbers, e.g. 0.5,0.3,0.2") from None
    if len(ws) != n:
        raise UsageError(f"--cache-weights has {len(ws)} value(s) but {n} --cache value(s) were given; give one "
                         "weight per cache, in the same order")
    if any(not np.isfinite(w) or w < 0 for w in ws):
        raise UsageError(f"--cache-weights {text!r}: every weight must be a finite number >= 0")
    total = sum(ws)
    if total <= 0:
        raise UsageError(f"--cache-weights {text!r}: the weights must sum to more than 0")
    return tuple(w / total for w in ws)


def _text_settings(m: dict) -> dict | None:
    t = m.get("text")
    return None if t is None else {k: v for k, v in t.items() if k != "teacher_prompt"}


# What must be equal for caches to be fused, in the order differences are reported: (what, getter).
_SAME = (
    ("kind", lambda m: m.get("kind", "classification")),
    ("data rows", lambda m: m["data"].get("num_samples")),
    ("data fingerprint", lambda m: m["data"].get("fingerprint")),
    ("cache rows", lambda m: m["num_rows"]),
    ("classes / vocabulary size", lambda m: m["num_classes"]),
    ("tokenizer", lambda m: (m.get("tokenizer") or {}).get("sha256")),
    ("text settings (max length, packing, templates, data kind)", _text_settings),
    ("views", lambda m: m.get("views", 1)),
    ("augmentation", lambda m: m.get("augment")),
    ("augmentation seed", lambda m: m["settings"].get("seed") if m.get("views", 1) > 1 else None),
)


def first_difference(a: dict, b: dict) -> str | None:
    """The first property two cache manifests must share for fusion and do not (None: they can be fused)."""
    for what, get in _SAME:
        va, vb = get(a), get(b)
        if va != vb:
            short = lambda v: (str(v)[:60] + "...") if len(str(v)) > 60 else str(v)  # noqa: E731
            return f"{what} differ ({short(va)} vs {short(vb)})"
    return None


def _fuse_logprobs(parts: list[np.ndarray], weights: tuple[float, ...], combine: str,
                   targets: list[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows, C) log-probs of K teachers -> the fused (rows, C) log-probs (float32), and the fused log-prob of
    each row's target (token caches' ``target_logprobs``), both with the same normaliser."""
    live = [k for k, w in enumerate(weights) if w > 0]  # a zero-weight teacher takes no part (0 * -inf)
    if combine == "mean":
        stack = np.stack([parts[k].astype(np.float64) + np.log(weights[k]) for k in live])
        m = stack.max(axis=0)
        m = np.where(np.isfinite(m), m, 0.0)
        fused = np.log(np.exp(stack - m).sum(axis=0)) + m  # log sum_k w_k p_k(i)
        tgt = None
        if targets is not None:
            ts = np.stack([targets[k].astype(np.float64) + np.log(weights[k]) for k in live])
            tm = ts.max(axis=0)
            tm = np.where(np.isfinite(tm), tm, 0.0)
            tgt = np.log(np.exp(ts - tm).sum(axis=0)) + tm
    elif combine == "geometric":
        fused = sum(weights[k] * parts[k].astype(np.float64) for k in live)  # sum_k w_k log p_k(i)
        tgt = None if targets is None else sum(weights[k] * targets[k].astype(np.float64) for k in live)
    else:
        raise ValueError(f"unknown combine {combine!r}; use one of {COMBINES}")
    m = fused.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(fused - m).sum(axis=-1, keepdims=True)) + m  # renormalise (exact for geometric; fp16
    fused = fused - log_z  # rounding only for mean)
    if tgt is not None:
        tgt = tgt - log_z[..., 0]
    return fused.astype(np.float32), None if tgt is None else tgt.astype(np.float32)


class FusedReader(CacheReader):
    """K compatible ``full`` caches read in lock-step, yielding the fused teacher as one ``full`` cache."""

    def __init__(self, readers: list[CacheReader], weights: tuple[float, ...], combine: str = "mean"):
        if len(readers) < 2:
            raise ValueError("FusedReader needs at least two caches")
        if combine not in COMBINES:
            raise UsageError(f"--combine {combine!r}: use one of {', '.join(COMBINES)}")
        if len(weights) != len(readers):
            raise ValueError("one weight per cache")
        for r in readers:
            if r.mode != "full":
                raise UsageError(
                    f"cache {r.dir} is a {r.mode} cache: fused teachers (--cache given {len(readers)} times) need "
                    "full caches (the probability of every class from every teacher; a sparse cache's tails are "
                    "unknown, so no fused target would be exact or unbiased): rebuild it with cache-teacher --mode "
                    "full, or train from one cache")
        first = readers[0]
        for r in readers[1:]:
            diff = first_difference(first.manifest, r.manifest)
            if diff:
                raise CacheError(f"cannot fuse caches {first.dir} and {r.dir}: {diff}; fused caches must be built "
                                 "from the same data, classes/vocabulary, tokenizer and rows")
        self.readers, self.weights, self.combine = list(readers), tuple(float(w) for w in weights), combine
        self.dir = first.dir
        self.mode = "full"
        self.num_rows, self.num_classes = first.num_rows, first.num_classes
        self.shards = first.shards  # the first cache's blocks set the lock-step reads
        if hasattr(first, "vocab_size"):
            self.vocab_size = first.vocab_size
        self.token = first.manifest.get("kind") == "token"
        self._files, self._pid, self._kept = {}, os.getpid(), {}
        self.manifest = self._fused_manifest()

    def _fused_manifest(self) -> dict:
        first = self.readers[0].manifest
        m = dict(first)
        m["mode"] = "full"
        m["teacher"] = {"spec": self.describe(),
                        "num_parameters": sum(int(r.manifest["teacher"].get("num_parameters") or 0)
                                              for r in self.readers),
                        "fused": [{"cache": str(r.dir), "weight": w, "teacher": r.manifest["teacher"].get("spec"),
                                   "teacher_prompt": (r.manifest.get("text") or {}).get("teacher_prompt")}
                                  for r, w in zip(self.readers, self.weights)]}
        if "text" in first:
            prompts = [(r.manifest.get("text") or {}).get("teacher_prompt") for r in self.readers]
            m["text"] = {**first["text"], "teacher_prompt": prompts[0] if len(set(map(str, prompts))) == 1 else None}
        return m

    def describe(self) -> str:
        parts = ", ".join(f"{w:.3g} x {r.dir}" for r, w in zip(self.readers, self.weights))
        what = "mean" if self.combine == "mean" else "geometric mean"
        return f"{what} of {len(self.readers)} teachers ({parts})"

    # -- checks ------------------------------------------------------------------------------------------------
    def check_data(self, data_identity: dict) -> None:
        for r in self.readers:
            r.check_data(data_identity)

    def close(self) -> None:
        for r in self.readers:
            r.close()

    @property
    def keys(self) -> tuple[str, ...]:
        return self.readers[0].keys

    def row_bytes(self) -> int:
        return sum(r.row_bytes() for r in self.readers)

    def default_block_rows(self) -> int:
        return self.readers[0].default_block_rows()  # the same block size as the first cache alone

    def kept_rows(self, block_rows: int, keep: np.ndarray | None) -> np.ndarray:
        return self.readers[0].kept_rows(block_rows, keep)  # every cache holds the same samples in the same rows

    def take(self, buf, rows):  # row selection of the first cache's layout (ragged for token caches)
        return self.readers[0].take(buf, rows)

    def slice_rows(self, buf, a, b):
        return self.readers[0].slice_rows(buf, a, b)

    # -- reads -------------------------------------------------------------------------------------------------
    def _fuse(self, parts: list[dict[str, np.ndarray]], start: int) -> dict[str, np.ndarray]:
        head = parts[0]
        for r, p in zip(self.readers[1:], parts[1:]):
            for k in SAME_ROW_KEYS:
                if k in head and (k not in p or not np.array_equal(head[k], p[k])):
                    bad = 0
                    if k in p and len(p[k]) == len(head[k]):
                        bad = int(np.flatnonzero(np.any((head[k] != p[k]).reshape(len(head[k]), -1), axis=1))[0])
                    raise CacheError(f"cannot fuse caches {self.readers[0].dir} and {r.dir}: row {start + bad} "
                                     f"differs ({k}); fused caches must hold the same rows in the same order")
        out = dict(head)
        tgt = [p["target_logprobs"] for p in parts] if "target_logprobs" in head else None
        out["logprobs"], fused_t = _fuse_logprobs([p["logprobs"] for p in parts], self.weights, self.combine, tgt)
        if fused_t is not None:
            out["target_logprobs"] = fused_t
        return out

    def read_rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return self._fuse([r.read_rows(start, stop) for r in self.readers], start)

    def read_block(self, b: Block) -> dict[str, np.ndarray]:
        start = self.shards[b.shard]["row_start"] + b.start
        stop = self.shards[b.shard]["row_start"] + b.stop
        parts = [self.readers[0].read_block(b)] + [r.read_rows(start, stop) for r in self.readers[1:]]
        return self._fuse(parts, start)


def open_fused(readers: list[CacheReader], weights: str | None, combine: str) -> CacheReader:
    """One reader for ``--cache`` given once (the cache itself) or several times (a :class:`FusedReader`)."""
    ws = parse_cache_weights(weights, len(readers))
    if len(readers) == 1:
        if combine not in COMBINES:
            raise UsageError(f"--combine {combine!r}: use one of {', '.join(COMBINES)}")
        return readers[0]
    return FusedReader(readers, ws, combine)


__all__ = ["COMBINES", "FusedReader", "first_difference", "open_fused", "parse_cache_weights"]
