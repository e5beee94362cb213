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
  outside I, repeats) with log-prob -inf (``Targets.padded``). At T != 1 the tempered mixture's normaliser needs every
  class of every teacher: refused unless ``--approximate-temperature`` (the uniform-tail approximation on those
  buckets).
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

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from kdcli.cache.modes import get_mode, modes
from kdcli.cache.modes.base import WeightedIdTargets, logmeanexp
from kdcli.cache.modes.full import COMBINES
from kdcli.cache.reader import Block, CacheReader, temperature_kwargs
from kdcli.infra.errors import CacheError, UsageError

SAME_ROW_KEYS = ("row_index", "sample_index", "row_hash", "lengths", "aug_params")
MIXTURE = "mixture"  # what sampled teachers fuse to: their own targets side by side (not a cache mode)


def _teacher_keys() -> frozenset[str]:
    """Every dataset name a mode stores (what a fused block replaces), per-temperature statistics included."""
    return frozenset(k for m in modes() for k in m.keys_ + ((m.stat_key,) if m.stat_key else ()))


@dataclass
class MixtureTargets(WeightedIdTargets):
    """Fused sample/priority teachers: every part's targets and weight; the soft term is ``sum_k w_k`` (part k's
    unbiased estimate), computed over their ids side by side (``ids``: theirs, concatenated)."""

    parts: tuple = ()
    part_weights: tuple = ()

    mode: ClassVar[str] = MIXTURE

    def top1(self):
        raise ValueError("a mixture of sampled teachers has no known top-1 class")

    def check_divergence(self, divergence):
        check_mixture_divergence(divergence)

    def id_weights(self, temperature, approximate=False):
        ws, ps, us, tot = [], [], [], 0.0
        for part, pw in zip(self.parts, self.part_weights):
            w, p_log, used, W = part.id_weights(temperature, approximate)
            ws.append(w * pw)
            ps.append(p_log)
            us.append(used)
            tot = tot + pw * (W if W is not None else torch.ones_like(w[:, 0]))
        return torch.cat(ws, dim=1), torch.cat(ps, dim=1), torch.cat(us, dim=1), tot


def check_mixture_divergence(divergence: str) -> None:
    """UsageError (exit 2): a mixture of sampled teachers trains with forward KL only."""
    if divergence != "forward":
        raise UsageError(
            f"--divergence {divergence}: fused sample/priority caches train with forward KL only "
            "(the weighted mean of the teachers' KLs has the gradient of the KL to their mixture; "
            "no such identity holds for reverse KL or JSD): use --divergence forward"
        )


def mixture_targets(parts, weights) -> MixtureTargets:
    """The targets of fused sample/priority teachers: every part's targets and its weight (the weights sum to 1)."""
    parts = tuple(parts)
    return MixtureTargets(
        parts[0].num_classes,
        ids=torch.cat([p.ids for p in parts], dim=1),
        parts=parts,
        part_weights=tuple(float(w) for w in weights),
    )


def part_key(k: int, key: str) -> str:
    """The name of teacher k's array ``key`` in a mixture block."""
    return f"t{k}/{key}"


def fused_mode(names: list[str], combine: str) -> str:
    """What K caches of these modes fuse to: the mode itself for modes that fuse exactly (full) or on buckets (topk),
    or ``mixture`` (sampled teachers side by side); UsageError (exit 2) for anything else."""
    kinds = {get_mode(n).fusion for n in names}
    if len(set(names)) == 1 and kinds == {"exact"}:
        return names[0]
    if combine != "mean":
        raise UsageError(
            f"--combine {combine} needs full caches (its normaliser sums every teacher's probability of "
            f"every class; these are {'/'.join(sorted(set(names)))} caches): use --combine mean, or "
            "rebuild them with cache-teacher --mode full"
        )
    if len(set(names)) == 1 and kinds == {"buckets"}:
        return names[0]
    if kinds == {MIXTURE}:
        return MIXTURE
    raise UsageError(
        f"cannot fuse {' + '.join(sorted(set(names)))} caches: fuse caches of one kind (all full, all "
        "topk, or sample/priority); rebuild the others with the same cache-teacher --mode"
    )


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
        raise UsageError(
            f"--cache-weights has {len(ws)} value(s) but {n} --cache value(s) were given; give one "
            "weight per cache, in the same order"
        )
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
        self.fusion = MIXTURE if mode == MIXTURE else get_mode(mode).fusion
        first = readers[0]
        for r in readers[1:]:
            diff = first_difference(first.manifest, r.manifest)
            if diff:
                raise CacheError(
                    f"cannot fuse caches {first.dir} and {r.dir}: {diff}; fused caches must be built "
                    "from the same data, classes/vocabulary, tokenizer and rows"
                )
        self.readers, self.weights, self.combine = list(readers), tuple(float(w) for w in weights), combine
        self.dir = first.dir
        self.mode = mode
        self.live = [k for k, w in enumerate(self.weights) if w > 0]  # a zero-weight teacher takes no part
        self.num_rows, self.num_classes = first.num_rows, first.num_classes
        self.shards = first.shards  # the first cache's blocks set the lock-step reads
        if hasattr(first, "vocab_size"):
            self.vocab_size = first.vocab_size
        self.token = first.manifest.get("kind") == "token"
        self.location = first.location
        self._kept = {}
        self.manifest = self._fused_manifest()

    def _fused_manifest(self) -> dict:
        first = self.readers[0].manifest
        m = dict(first)
        m["mode"] = self.mode
        if not self.exact:  # exact / unbiased at T = 1 only (module docstring)
            m.update(temperatures=[1.0], stat_temperatures=[], stat_dtype=None, sampler_temperatures=None)
        m["teacher"] = {
            "spec": self.describe(),
            "num_parameters": sum(int(r.manifest["teacher"].get("num_parameters") or 0) for r in self.readers),
            "fused": [
                {
                    "cache": str(r.dir),
                    "weight": w,
                    "teacher": r.manifest["teacher"].get("spec"),
                    "teacher_prompt": (r.manifest.get("text") or {}).get("teacher_prompt"),
                }
                for r, w in zip(self.readers, self.weights)
            ],
        }
        if "text" in first:
            prompts = [(r.manifest.get("text") or {}).get("teacher_prompt") for r in self.readers]
            m["text"] = {**first["text"], "teacher_prompt": prompts[0] if len(set(map(str, prompts))) == 1 else None}
        return m

    def describe(self) -> str:
        parts = ", ".join(f"{w:.3g} x {r.dir}" for r, w in zip(self.readers, self.weights))
        what = "mean" if self.combine == "mean" else "geometric mean"
        return f"{what} of {len(self.readers)} teachers ({parts})"

    @property
    def exact(self) -> bool:
        """The fused teacher is exact at every T (full caches)."""
        return self.fusion == "exact"

    def exactness(self) -> str:
        """How the fused target relates to the fused teacher (the training log's line)."""
        return {
            "exact": f"exact ({self.mode} caches, fused per {{unit}})",
            "buckets": f"exact over the buckets of the ids every teacher kept + one tail ({self.mode} caches, "
            "fused per {unit}, T = 1)",
            MIXTURE: "unbiased gradient of the KL to the mixture (sampled caches: the weighted mean of the "
            "teachers' KLs, fused per {unit}, T = 1)",
        }[self.fusion]

    @property
    def loss_note(self) -> str:
        if self.fusion == MIXTURE:
            return "unbiased gradient; the value adds the teachers' Jensen-Shannon divergence"
        return get_mode(self.mode).loss_note

    @property
    def approximation(self) -> str:
        if self.fusion == MIXTURE:
            return "the mean of the tempered teachers"
        return get_mode(self.mode).approximation

    def check_divergence(self, divergence: str) -> None:
        """A mixture of sampled teachers trains with forward KL only (:class:`MixtureTargets`)."""
        if self.fusion == MIXTURE:
            check_mixture_divergence(divergence)

    def targets(self, arrays: dict[str, np.ndarray]):
        """The fused teacher's targets of a block: the fused arrays' (padded, for bucketed fusion), or a mixture of
        the teachers' own."""
        if self.fusion == MIXTURE:
            parts = tuple(
                r.targets({key: arrays[part_key(k, key)] for key in self.part_keys(k)})
                for k, r in ((k, self.readers[k]) for k in self.live)
            )
            return mixture_targets(parts, [self.weights[k] for k in self.live])
        t = get_mode(self.mode).targets(arrays, self.num_classes, **temperature_kwargs(self.manifest))
        if self.fusion == "buckets":
            t.padded = True
        return t

    def check_use(self, temperature: float, approximate: bool, evaluating: bool) -> None:
        """Refuse (exit 2) what a sparse fused teacher cannot serve: T != 1 without the documented approximation,
        and ``eval`` against a mixture of sampled teachers (the divergence: :func:`kdcli.losses.check_divergence`)."""
        if self.exact:
            return
        if evaluating and self.fusion == MIXTURE:
            raise UsageError(
                "eval cannot measure KL or agreement against fused sample/priority caches (the fused "
                "teacher's probability of a class one teacher drew is unknown to the others' caches): "
                "evaluate against full or topk caches of the held-out data"
            )
        if abs(float(temperature) - 1.0) > 1e-6 and not approximate:
            raise UsageError(
                f"fused {self.readers[0].mode} caches are exact only at T = 1, not at T = "
                f"{float(temperature):g} (tempering a mixture needs every teacher's probability of "
                "every class): use --temperature 1, full caches, or accept the documented approximation "
                "with --approximate-temperature"
            )

    # -- checks ------------------------------------------------------------------------------------------------
    def check_data(self, data_identity: dict) -> None:
        for r in self.readers:
            r.check_data(data_identity)

    def close(self) -> None:
        for r in self.readers:
            r.close()

    # remote caches: every cache fetches the group's rows ahead (its own shards), in lock-step
    def prefetch(self, group) -> None:
        key = tuple(group)
        self.readers[0].prefetch(group)
        starts = [self.shards[p.block.shard]["row_start"] for p in group]
        ranges = [(s + p.block.start, s + p.block.stop) for s, p in zip(starts, group)]
        for r in self.readers[1:]:
            r.prefetch_rows(key, ranges)

    def wait(self, key) -> None:
        for r in self.readers:
            r.wait(key)

    def release(self, key) -> None:
        for r in self.readers:
            r.release(key)

    @property
    def keys(self) -> tuple[str, ...]:
        if self.exact:
            return self.readers[0].keys
        base = tuple(k for k in self.readers[0].keys if k not in _teacher_keys())
        if self.fusion == "buckets":
            return base + get_mode(self.mode).keys_
        return base + tuple(part_key(k, key) for k in self.live for key in self.part_keys(k))

    def part_keys(self, k: int) -> tuple[str, ...]:
        r = self.readers[k]
        return get_mode(r.mode).keys(r.manifest.get("temperatures"))

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
                    raise CacheError(
                        f"cannot fuse caches {self.readers[0].dir} and {r.dir}: row {start + bad} "
                        f"differs ({k}); fused caches must hold the same rows in the same order"
                    )
        live = [parts[k] for k in self.live]
        ws = [self.weights[k] for k in self.live]
        if self.exact:  # a zero-weight teacher takes no part (0 * -inf)
            return {**head, **get_mode(self.mode).fuse(live, ws, self.combine)}
        out = {k: v for k, v in head.items() if k not in _teacher_keys()}
        if "target_logprobs" in head:  # each teacher's log-prob of the next token: the mixture's is exact
            out["target_logprobs"] = logmeanexp([p["target_logprobs"] for p in live], ws).astype(np.float32)
        if self.fusion == "buckets":
            out.update(get_mode(self.mode).fuse(live, ws, self.combine))
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


__all__ = [
    "COMBINES",
    "FusedReader",
    "MixtureTargets",
    "first_difference",
    "fused_mode",
    "mixture_targets",
    "open_fused",
    "parse_cache_weights",
    "part_key",
]
