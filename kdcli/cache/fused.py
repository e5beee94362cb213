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

What each cache mode fuses to (docs/fusion.md has the reasoning and the measured errors):

- ``full``: exact for both combinations (up to the fp16 rounding of the stored log-probabilities; the fused row is
  computed in float64 and renormalised), at every T.
- ``topk`` (``mean`` only): the mixture *bucketed* on the classes every teacher kept (the intersection I of their
  top-k ids) plus one tail bucket. Mixing commutes with bucketing, so ``p(i) = sum_k w_k p_k(i)`` for i in I and
  the tail ``sum_k w_k (tail_k + p_k(S_k minus I))`` are exact: the loss is the exact KL between the fused
  teacher's and the student's (|I| + 1)-bucket distributions at T = 1 (a lower bound of the full KL, like one
  topk cache). The reader yields topk arrays laid out on the union of the teachers' ids, unused slots (ids
  outside I, repeats) with log-prob -inf (``Targets.padded``). At T != 1 the tempered mixture's normaliser needs every class of every
  teacher: refused unless ``--approximate-temperature`` (the uniform-tail approximation on those buckets).
- ``sample`` / ``priority`` (``mean`` only, any mix of the two): a *mixture* target, the teachers' own targets
  side by side (arrays ``t{k}/...``). The soft term is ``sum_k w_k KL(p_k || s)``, each estimated without bias
  from its own cache. For forward KL at T = 1 that is ``KL(sum_k w_k p_k || s)`` plus the teachers' generalised
  Jensen-Shannon divergence ``H(p) - sum_k w_k H(p_k)``, which does not depend on the student: the same gradient,
  so training on it is unbiased training on the mixture. The fused teacher's log-prob of a class one teacher drew
  is unknown to the others' caches, so the KL value itself (and the fused top-1) cannot be estimated: ``eval``
  refuses these, and reverse KL / JSD (no such identity) are refused. At T != 1: refused unless
  ``--approximate-temperature`` (then the mixture of the *tempered* teachers, each exact/unbiased at its stored T).
- ``geometric`` needs every teacher's probability of every class (its normaliser sums over all of them): full
  caches only.

The fused reader looks like one cache to everything downstream (the training order, DDP shares,
DataLoader workers, eval): its blocks are the first cache's, every other cache reads the same global rows
(``read_rows``, one or two contiguous reads), so the K caches are read in lock-step and memory stays flat (one
block per cache). Every block checks that the caches hold the same rows (row index, sample index, row hash,
predicted tokens per row, augmentation parameters); the task then checks the fused rows' hashes against the data.
"""

from __future__ import annotations

import os

import numpy as np

from kdcli.cache.manifest import MODE_KEYS, STAT_KEYS, mode_keys
from kdcli.cache.reader import Block, CacheReader
from kdcli.errors import CacheError, UsageError

COMBINES = ("mean", "geometric")
SAME_ROW_KEYS = ("row_index", "sample_index", "row_hash", "lengths", "aug_params")
_TEACHER_KEYS = frozenset(k for ks in MODE_KEYS.values() for k in ks) | frozenset(STAT_KEYS.values())


def part_key(k: int, key: str) -> str:
    """The name of teacher k's array ``key`` in a mixture block."""
    return f"t{k}/{key}"


def fused_mode(modes: list[str], combine: str) -> str:
    """What K caches of these modes fuse to: ``full``, ``topk`` (the intersection buckets) or ``mixture``
    (sample/priority teachers side by side); UsageError (exit 2) for anything else."""
    kinds = set(modes)
    if kinds == {"full"}:
        return "full"
    if combine != "mean":
        raise UsageError(f"--combine {combine} needs full caches (its normaliser sums every teacher's probability of "
                         f"every class; these are {'/'.join(sorted(kinds))} caches): use --combine mean, or rebuild "
                         "them with cache-teacher --mode full")
    if kinds == {"topk"}:
        return "topk"
    if kinds <= {"sample", "priority"}:
        return "mixture"
    raise UsageError(f"cannot fuse {' + '.join(sorted(kinds))} caches: fuse caches of one kind (all full, all topk, "
                     "or sample/priority); rebuild the others with the same cache-teacher --mode")


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
    top = max(ws)
    if top <= 0:
        raise UsageError(f"--cache-weights {text!r}: the weights must sum to more than 0")
    ws = [w / top for w in ws]  # scaled first: 1e308,1e308 must not overflow to inf in the sum
    total = sum(ws)
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


def _logsumexp(a: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
    """log sum exp along ``axis``, shifted by the maximum (-inf where every term is -inf)."""
    m = a.max(axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    out = np.log(np.exp(a - m).sum(axis=axis, keepdims=True)) + m
    return out if keepdims else out.squeeze(axis)


def _logmeanexp(xs: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """log sum_k w_k exp(xs[k]) in float64 (-inf where every term is -inf)."""
    return _logsumexp(np.stack([x.astype(np.float64) + np.log(w) for x, w in zip(xs, weights)]), axis=0)


def fuse_topk(ids: list[np.ndarray], logprobs: list[np.ndarray], tails: list[np.ndarray],
              weights: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K teachers' topk rows (ids (n, k_j), log-probs, log tail mass (n,)) -> the mixture on the buckets of the ids
    every teacher kept + one tail: (ids (n, sum k_j), log-probs, log tail (n,)), float32. Exact: mixing commutes
    with bucketing (module docstring).

    The slots are the union of the teachers' ids (repeats included); a slot is *used* (finite log-prob) at the
    first occurrence of an id every teacher kept, and every other slot's class is in the tail. Slots are sorted by
    ``sum_{k kept i} w_k p_k(i)``: exact for the shared ids, a lower bound for the others (a repeat sorts last), so
    slot 0 is the fused teacher's most likely class as far as the caches know it (``Targets.top1``)."""
    allids = np.concatenate(ids, axis=1)  # (n, K)
    n, width = allids.shape
    known = np.zeros((n, width))  # sum over the teachers that kept the id of w_k p_k(id)
    count = np.zeros((n, width), dtype=np.int64)  # how many teachers kept it
    eqs = [allids[:, :, None] == idj[:, None, :] for idj in ids]  # (n, K, k_j): slot == teacher j's id
    for eq, lpj, wj in zip(eqs, logprobs, weights):
        known += wj * np.where(eq, np.exp(lpj[:, None, :].astype(np.float64)), 0.0).sum(axis=2)
        count += eq.any(axis=2)
    first = np.ones((n, width), dtype=bool)  # the first occurrence of each id in the row
    for j in range(1, width):
        first[:, j] = ~(allids[:, :j] == allids[:, j:j + 1]).any(axis=1)
    shared = first & (count == len(ids))
    with np.errstate(divide="ignore"):
        fused = np.where(shared, np.log(known), -np.inf)
        key = np.where(first, np.log(known), -np.inf)
    # the tail: every teacher's own tail plus its mass on the ids not shared by all, mixed
    tail_parts = []
    for eq, lpj, tj in zip(eqs, logprobs, tails):
        in_i = (eq & shared[:, :, None]).any(axis=1)  # (n, k_j): teacher j's ids that are shared
        ext = np.concatenate([tj[:, None].astype(np.float64), np.where(in_i, -np.inf, lpj.astype(np.float64))], 1)
        tail_parts.append(_logsumexp(ext, axis=1))
    tail = np.minimum(_logmeanexp(tail_parts, weights), 0.0)
    order = np.argsort(-key, axis=1, kind="stable")
    return (np.take_along_axis(allids, order, axis=1), np.take_along_axis(fused, order, axis=1).astype(np.float32),
            tail.astype(np.float32))


def _fuse_logprobs(parts: list[np.ndarray], weights: tuple[float, ...], combine: str,
                   targets: list[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows, C) log-probs of K teachers -> the fused (rows, C) log-probs (float32), and the fused log-prob of
    each row's target (token caches' ``target_logprobs``), both with the same normaliser."""
    live = [k for k, w in enumerate(weights) if w > 0]  # a zero-weight teacher takes no part (0 * -inf)
    if combine == "mean":
        ws = [weights[k] for k in live]
        fused = _logmeanexp([parts[k] for k in live], ws)  # log sum_k w_k p_k(i)
        tgt = None if targets is None else _logmeanexp([targets[k] for k in live], ws)
    elif combine == "geometric":
        fused = sum(weights[k] * parts[k].astype(np.float64) for k in live)  # sum_k w_k log p_k(i)
        tgt = None if targets is None else sum(weights[k] * targets[k].astype(np.float64) for k in live)
    else:
        raise ValueError(f"unknown combine {combine!r}; use one of {COMBINES}")
    log_z = _logsumexp(fused, axis=-1, keepdims=True)  # renormalise (exact for geometric; fp16 rounding only for
    fused = fused - log_z  # mean)
    if tgt is not None:
        tgt = tgt - log_z[..., 0]
    return fused.astype(np.float32), None if tgt is None else tgt.astype(np.float32)


class FusedReader(CacheReader):
    """K compatible caches read in lock-step, yielding the fused teacher as one cache of ``mode`` ``full``,
    ``topk`` or ``mixture`` (module docstring)."""

    def __init__(self, readers: list[CacheReader], weights: tuple[float, ...], combine: str = "mean"):
        if len(readers) < 2:
            raise ValueError("FusedReader needs at least two caches")
        if combine not in COMBINES:
            raise UsageError(f"--combine {combine!r}: use one of {', '.join(COMBINES)}")
        if len(weights) != len(readers):
            raise ValueError("one weight per cache")
        mode = fused_mode([r.mode for r in readers], combine)
        first = readers[0]
        for r in readers[1:]:
            diff = first_difference(first.manifest, r.manifest)
            if diff:
                raise CacheError(f"cannot fuse caches {first.dir} and {r.dir}: {diff}; fused caches must be built "
                                 "from the same data, classes/vocabulary, tokenizer and rows")
        self.readers, self.weights, self.combine = list(readers), tuple(float(w) for w in weights), combine
        self.dir = first.dir
        self.mode = mode
        self.live = [k for k, w in enumerate(self.weights) if w > 0]  # a zero-weight teacher takes no part
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
        m["mode"] = self.mode
        if self.mode != "full":  # exact / unbiased at T = 1 only (module docstring)
            m.update(temperatures=[1.0], stat_temperatures=[], stat_dtype=None, sampler_temperatures=None)
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

    def exactness(self) -> str:
        """How the fused target relates to the fused teacher (the training log's line)."""
        return {"full": "exact (full caches, fused per {unit})",
                "topk": "exact over the buckets of the ids every teacher kept + one tail (topk caches, fused per "
                        "{unit}, T = 1)",
                "mixture": "unbiased gradient of the KL to the mixture (sample/priority caches: the weighted mean of "
                           "the teachers' KLs, fused per {unit}, T = 1)"}[self.mode]

    def check_use(self, temperature: float, approximate: bool, evaluating: bool) -> None:
        """Refuse (exit 2) what a sparse fused teacher cannot serve: T != 1 without the documented approximation,
        and ``eval`` against a mixture of sampled teachers (the divergence: :func:`kdcli.losses.check_divergence`)."""
        if self.mode == "full":
            return
        if evaluating and self.mode == "mixture":
            raise UsageError("eval cannot measure KL or agreement against fused sample/priority caches (the fused "
                             "teacher's probability of a class one teacher drew is unknown to the others' caches): "
                             "evaluate against full or topk caches of the held-out data")
        if abs(float(temperature) - 1.0) > 1e-6 and not approximate:
            raise UsageError(f"fused {self.readers[0].mode} caches are exact only at T = 1, not at T = "
                             f"{float(temperature):g} (tempering a mixture needs every teacher's probability of "
                             "every class): use --temperature 1, full caches, or accept the documented approximation "
                             "with --approximate-temperature")

    # -- checks ------------------------------------------------------------------------------------------------
    def check_data(self, data_identity: dict) -> None:
        for r in self.readers:
            r.check_data(data_identity)

    def close(self) -> None:
        for r in self.readers:
            r.close()

    @property
    def keys(self) -> tuple[str, ...]:
        if self.mode == "full":
            return self.readers[0].keys
        base = tuple(k for k in self.readers[0].keys if k not in _TEACHER_KEYS)
        if self.mode == "topk":
            return base + MODE_KEYS["topk"]
        return base + tuple(part_key(k, key) for k in self.live for key in self.part_keys(k))

    def part_keys(self, k: int) -> tuple[str, ...]:
        r = self.readers[k]
        return mode_keys(r.mode, r.manifest.get("temperatures"))

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
        if self.mode == "full":
            out = dict(head)
            tgt = [p["target_logprobs"] for p in parts] if "target_logprobs" in head else None
            out["logprobs"], fused_t = _fuse_logprobs([p["logprobs"] for p in parts], self.weights, self.combine,
                                                      tgt)
            if fused_t is not None:
                out["target_logprobs"] = fused_t
            return out
        out = {k: v for k, v in head.items() if k not in _TEACHER_KEYS}
        live = [parts[k] for k in self.live]
        ws = [self.weights[k] for k in self.live]
        if "target_logprobs" in head:  # each teacher's log-prob of the next token: the mixture's is exact
            out["target_logprobs"] = _logmeanexp([p["target_logprobs"] for p in live], ws).astype(np.float32)
        if self.mode == "topk":
            out["topk_ids"], out["topk_logprobs"], out["tail_logmass"] = fuse_topk(
                [p["topk_ids"] for p in live], [p["topk_logprobs"] for p in live], [p["tail_logmass"] for p in live],
                ws)
        else:
            for k in self.live:
                for key in self.part_keys(k):
                    out[part_key(k, key)] = parts[k][key]
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


__all__ = ["COMBINES", "FusedReader", "first_difference", "fuse_topk", "fused_mode", "open_fused", "parse_cache_weights",
           "part_key"]
