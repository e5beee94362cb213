"""Cross-tokenizer distillation losses from a token cache: the teacher's cached next-token distribution at an aligned
position (:func:`kdcli.lm.align.align_keys`) against the student's, whose vocabulary differs.

Notation as in :mod:`kdcli.losses`: the cache stores the teacher's log-probs at T = 1; q_T is the teacher at T,
s_T the student at T. A :class:`~kdcli.lm.align.VocabMap` partitions both vocabularies into the same buckets: one per
surface string both sides have (``matched``) and one ``rest`` bucket per side. ``P`` and ``Q`` below are the
teacher's and the student's distributions *coarsened* onto the buckets (a bucket's probability is the sum over its
ids). Every function returns per-row values **without** the T^2 factor (as :func:`kdcli.losses.soft_kl`);
:func:`xtok_kd_loss` applies T^2 and mixes in the student's cross-entropy.

``aligned`` -- D(P || Q) over the buckets (forward KL; reverse KL and JSD for full and topk caches):

- ``full``: exact. P from the cached log-probs, Q from the student's, at T.
- ``topk``: exact on the buckets both sides know. Per row, a matched bucket is *known* when every teacher id in it
  is among the stored top k (for the usual one-id bucket: its id was stored); its mass is exact at a stored T
  (``TopkTargets.buckets``). Everything else -- unmatched top-k ids, matched strings outside the top k,
  the tail -- is one bucket whose mass is 1 minus the known ones (exactly the cached tail plus the other stored
  slots). The student is coarsened the same way: its mass on the known buckets' ids, and the rest. This is the
  exact divergence between the two distributions on {known buckets} + rest, a lower bound on the full-cache value
  (data-processing inequality), as the same-tokenizer top-k loss is.
- ``sample`` / ``priority`` (forward KL only): ``sum_j w_j (log P(b_j) - log Q(b_j))`` over the stored ids j with
  the unbiased weights of ``WeightedIdTargets.id_weights`` (b_j the bucket of id j). The cross-entropy part
  ``-sum_b P(b) log Q(b) = -sum_i q_T(i) log Q(b(i))`` is a sum over the teacher vocabulary weighted by q_T, so its
  estimate and its gradient (the only part that trains) are unbiased at a stored T. The teacher's negative entropy
  ``sum_b P(b) log P(b)`` uses the exact ``log q_T(i)`` for a bucket holding one teacher id (unbiased, as in the
  same-tokenizer loss) and, for the rest bucket and merged buckets, the plug-in ``log P^(b)`` with
  ``P^(b) = sum_{j in b} w_j`` (consistent, biased low by Jensen): the *reported value* assumes that plug-in.

*One side without a rest* (every student string is also the teacher's, say: a student vocabulary inside the
teacher's): the other side's rest mass has no counterpart and the KL would be infinite. Then ``full`` and
``sample``/``priority`` compare the two distributions *given* the matched buckets, ``D(P(.|M) || Q(.|M))``
(``sample``/``priority``: where the teacher has a rest, its matched slots' weights self-normalised, a consistent
ratio estimate, biased; where only the student has one, P(M) = 1 and the estimate stays unbiased);
``topk`` needs nothing (its rest always holds the tail and the unknown buckets). ``vocab_map(..., project=True)``
(longest shared prefix) leaves nearly nothing in the rest on either side.

``uld`` -- Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal
Logit Distillation Loss"; Nicolas-BZRD/llm-recipes ``models/distillation_model.py``): the L1 distance between the
two probability vectors sorted in decreasing order, the shorter padded with zeros, i.e. ``sum_r |p_(r) - s_(r)|``
(the paper's closed form of a Wasserstein-1 distance). It needs no string match. From a sparse cache the teacher's
sorted vector is known exactly on a *certain prefix* -- stored ids provably larger than every class not stored --
and only its remaining total mass beyond it: ULD is then ``sum_{r < k'} |p_(r) - s_(r)| + |P_tail - S_tail|`` with
``S_tail`` the student's sorted mass from rank k' on, a lower bound on the full ULD (triangle inequality), equal
when the teacher's tail is all below (or all above) the student's rank by rank. The certain prefix: ``topk`` all k
stored ids; ``priority`` the kept ids with ``pi_i >= tau`` (every unkept class has ``pi < tau``, and pi, p and q_T
are ordered alike) or ``q_T(i) >= R``; ``sample`` the drawn ids with ``q_T(i) >= R``, where ``R = 1 - sum_stored
q_T`` bounds every unstored class's probability.

``hybrid`` -- GOLD's split (huggingface/trl ``trl/experimental/gold/gold_trainer.py``, ``ULDLoss`` with
``uld_use_hybrid_loss``): ``aligned`` on the buckets plus ``uld_weight`` times ULD between the teacher's and the
student's probabilities *inside* the rest bucket (GOLD compares the matched probabilities with a JSD of unnormalised
vectors; here the matched part is the proper coarsened divergence above, and ULD only shapes what it cannot
compare). ``full``: exact. ``topk``: the rest is the row's unknown part (prefix: the stored slots outside known
buckets; remainder: the tail), as above. ``sample`` / ``priority``: the rest bucket's remainder mass is the plug-in
estimate ``sum_{j in rest} w_j`` minus the certain prefix: biased.

Identity (tests/test_xtok_loss.py, and through the CLI tests/test_xtok_cli.py): with the same tokenizer on both sides
(every boundary coincides, every id is its own bucket) ``aligned`` is :func:`kdcli.losses.soft_kl` and
:func:`xtok_kd_loss` is :func:`kdcli.losses.kd_loss`, value and gradient, for every cache mode.

Speed: a vocabulary map is mostly one id per bucket, so the bucketed log-probs copy those columns and sum only the
shared ones (:class:`GroupPlan`); when every matched bucket holds one teacher id (a byte-level teacher, the identity)
the stored slots need no pairwise bucket comparisons; ULD compares the student's top k, not its sorted vocabulary.
One step of the 1.4M-parameter student of examples/lm-cross-tokenizer (8 rows, ~1,000 tokens, V_student 4,096, the
top-64 SmolLM2 cache read included), one thread, median CPU time (docs/performance.md): labels only 163 ms,
``aligned`` 311 ms, ``uld`` 244 ms, ``hybrid`` 381 ms (before these shortcuts: 437, 732, 1,028 ms).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kdcli.cache.modes import get_mode
from kdcli.cache.modes.base import DIVERGENCES, Targets, WeightedIdTargets, div_rows
from kdcli.config.commands import CROSS_TOKENIZER_METHODS
from kdcli.infra.errors import UsageError
from kdcli.lm.align import BucketNumbers, VocabMap
from kdcli.losses import LossParts

METHODS = CROSS_TOKENIZER_METHODS
LOGIT_BUDGET = 1 << 24
"""Student logits (rows x V) the cross-tokenizer loss keeps at once on the chunked output layer: 64 MiB in float32
(a 512-token batch of a 32k vocabulary fits; a 128k one runs in chunks of 128 rows)."""
NEG_INF = float("-inf")


@dataclass(frozen=True)
class GroupPlan:
    """How :func:`group_logsumexp` sums columns into groups, split once: the columns alone in their group (copied)
    and the others (summed). A vocabulary map is mostly one id per bucket, so most columns are copies."""

    num_groups: int
    single_ids: torch.Tensor  # (s,) columns alone in their group
    multi_ids: torch.Tensor  # (m,) columns sharing a group
    multi_local: torch.Tensor  # (m,) their group among ``multi_groups``
    groups: torch.Tensor  # (s + g,) the group of each output column: single_ids' groups, then multi_groups

    @classmethod
    def of(cls, group: np.ndarray, num_groups: int, device) -> GroupPlan:
        group = np.asarray(group, dtype=np.int64)
        count = np.bincount(group, minlength=num_groups)
        single = count[group] == 1
        multi_groups, local = np.unique(group[~single], return_inverse=True)

        def t(a) -> torch.Tensor:
            return torch.as_tensor(np.asarray(a, dtype=np.int64), device=device)

        return cls(
            num_groups,
            t(np.flatnonzero(single)),
            t(np.flatnonzero(~single)),
            t(local.reshape(-1)),
            t(np.concatenate([group[single], multi_groups])),
        )

    def logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        """(n, V) -> (n, num_groups): :func:`group_logsumexp`, the one-column groups copied (value and gradient)."""
        cols = [x[:, self.single_ids]]
        if len(self.multi_ids):
            g = int(self.multi_local.max()) + 1
            cols.append(group_logsumexp(x[:, self.multi_ids], self.multi_local, g))
        out = torch.full((x.shape[0], self.num_groups), NEG_INF, dtype=x.dtype, device=x.device)
        return out.index_copy(1, self.groups, torch.cat(cols, dim=1))


@dataclass(frozen=True)
class Buckets(BucketNumbers):
    """A :class:`~kdcli.lm.align.VocabMap` as tensors on the student's device."""

    teacher: torch.Tensor  # (V_teacher,) int64 bucket of each teacher id
    student: torch.Tensor  # (V_student,) int64 bucket of each student id
    teacher_count: torch.Tensor  # (num_buckets,) int64 teacher ids per bucket
    num_matched: int
    teacher_rest: bool = True  # the rest bucket holds a teacher id
    student_rest: bool = True  # ... a student id
    teacher_plan: GroupPlan | None = None
    student_plan: GroupPlan | None = None
    teacher_single: bool = False  # every matched bucket holds one teacher id (no sums over stored slots needed)

    @property
    def condition(self) -> bool:
        """One side's rest bucket holds no id and the other's does: compare the distributions given "matched"."""
        return self.teacher_rest != self.student_rest

    @classmethod
    def of(cls, vmap: VocabMap, device: torch.device | str = "cpu") -> Buckets:
        t = torch.as_tensor(vmap.teacher_bucket, dtype=torch.int64, device=device)
        s = torch.as_tensor(vmap.student_bucket, dtype=torch.int64, device=device)
        t_rest, s_rest = bool((t == vmap.rest).any()), bool((s == vmap.rest).any())
        count = torch.bincount(t, minlength=vmap.num_buckets)
        G = vmap.num_buckets
        return cls(
            t,
            s,
            count,
            vmap.num_matched,
            t_rest,
            s_rest,
            GroupPlan.of(vmap.teacher_bucket, G, device),
            GroupPlan.of(vmap.student_bucket, G, device),
            bool((count[: vmap.num_matched] <= 1).all()),
        )

    def student_log(self, s_log: torch.Tensor) -> torch.Tensor:
        """(n, V_student) log-probs -> (n, num_buckets) the student's bucket log-probs."""
        if self.student_plan is not None:
            return self.student_plan.logsumexp(s_log)
        return group_logsumexp(s_log, self.student, self.num_buckets)

    def teacher_log(self, p_log: torch.Tensor) -> torch.Tensor:
        if self.teacher_plan is not None:
            return self.teacher_plan.logsumexp(p_log)
        return group_logsumexp(p_log, self.teacher, self.num_buckets)


def group_logsumexp(x: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(n, V) log-values and (V,) group of each column -> (n, num_groups) ``log sum_{v in g} exp(x[:, v])`` (-inf
    for an empty group). Stable (the per-group max is subtracted; detached: it only shifts), exact for one-column
    groups (``x`` itself, value and gradient)."""
    n = x.shape[0]
    idx = group.unsqueeze(0).expand(n, -1)  # (n, V)
    m = torch.full((n, num_groups), NEG_INF, dtype=x.dtype, device=x.device)
    m = m.scatter_reduce(1, idx, x.detach(), reduce="amax", include_self=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # (n, G)
    e = torch.exp(x - m.gather(1, idx))  # (n, V) <= 1
    s = torch.zeros((n, num_groups), dtype=x.dtype, device=x.device).scatter_add(1, idx, e)
    return torch.log(s) + m


def _student_log(student_logits: torch.Tensor, T: float) -> torch.Tensor:
    z = student_logits if student_logits.dtype == torch.float64 else student_logits.float()
    return F.log_softmax(z / T, dim=-1)  # (n, V_student)


def _check(targets: Targets, buckets: Buckets, student_logits: torch.Tensor) -> None:
    if targets.num_classes != buckets.teacher.shape[0]:
        raise ValueError(f"targets have {targets.num_classes} classes, the vocabulary map {buckets.teacher.shape[0]}")
    if student_logits.shape[-1] != buckets.student.shape[0]:
        raise ValueError(
            f"student logits have {student_logits.shape[-1]} classes, the vocabulary map {buckets.student.shape[0]}"
        )


def _same_bucket(b: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """(n, k, k) True where slot j' (used) is in slot j's bucket."""
    return (b[:, :, None] == b[:, None, :]) & used[:, None, :]


def _bucket_mask(b: torch.Tensor, on: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """(n, G) True for the buckets of the slots where ``on`` (n, k) is True (counted, not scattered: slots that
    share a bucket cannot overwrite each other)."""
    z = torch.zeros(b.shape[0], num_buckets, dtype=torch.int32, device=b.device)
    return z.scatter_add(1, b, on.to(torch.int32)) > 0


def _topk_known(targets: Targets, buckets: Buckets, T: float, approximate: bool):
    """For topk targets: ``(head, tail, b, known, rep, group)``, each (n, k) but tail (n,): the teacher's bucket
    log-probs at T (``TopkTargets.buckets``), each slot's bucket, whether the slot's bucket is known (matched, every
    teacher id of it stored in the row), whether the slot represents its bucket (its first used slot), and the
    bucket's teacher log-mass at the representative slot."""
    hb = targets.buckets(T, approximate)  # (n, k + 1)
    head, tail = hb[:, :-1], hb[:, -1]
    ids = targets.ids
    used = targets.id_logprobs > NEG_INF if targets.padded else torch.ones_like(ids, dtype=torch.bool)
    b = buckets.teacher[ids]  # (n, k)
    if buckets.teacher_single and not targets.padded:  # distinct ids, one per bucket: no (n, k, k) comparisons
        known = used & (b < buckets.rest)
        return head, tail, b, known, known, head
    same = _same_bucket(b, used)  # (n, k, k)
    known = used & (b < buckets.rest) & (same.sum(-1) == buckets.teacher_count[b])
    earlier = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril(-1)
    rep = known & ~(same & earlier).any(-1)
    group = torch.logsumexp(torch.where(same, head[:, None, :], NEG_INF), dim=-1)  # (n, k) = head for 1-id buckets
    return head, tail, b, known, rep, group


def aligned_divergence(
    student_logits: torch.Tensor,
    targets: Targets,
    buckets: Buckets,
    temperature: float,
    divergence: str = "forward",
    beta: float = 0.5,
    *,
    approximate: bool = False,
) -> torch.Tensor:
    """(n,) divergence between the teacher's and the student's bucket distributions at T (module docstring), per
    aligned row: ``student_logits`` (n, V_student) and ``targets`` (n rows) at the same context boundary."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; use one of {DIVERGENCES}")
    _check(targets, buckets, student_logits)
    T = float(temperature)
    s_log = _student_log(student_logits, T)
    G = buckets.num_buckets
    Q = buckets.student_log(s_log)  # (n, G) the student's bucket log-probs
    if targets.mode == "full":
        p_log = F.log_softmax(targets.logprobs.to(s_log.dtype) / T, dim=-1)  # (n, V_teacher)
        P = buckets.teacher_log(p_log)  # (n, G)
        if buckets.condition:  # given "matched": the rest bucket dropped, both sides renormalised
            P, Q = P[:, :-1], Q[:, :-1]
            P, Q = P - torch.logsumexp(P, 1, keepdim=True), Q - torch.logsumexp(Q, 1, keepdim=True)
        return div_rows(P, Q, divergence, beta)
    if targets.mode == "topk":
        head, tail, b, known, rep, group = _topk_known(targets, buckets, T, approximate)
        p_known = torch.where(rep, group, NEG_INF)  # (n, k): one column per known bucket, -inf placeholders
        p_rest = torch.logsumexp(torch.cat([torch.where(known, NEG_INF, head), tail[:, None]], dim=1), dim=1)
        q_known = torch.where(rep, Q.gather(1, b), NEG_INF)
        in_known = _bucket_mask(b, rep, G)  # (n, G): the row's known buckets
        q_rest = torch.logsumexp(Q.masked_fill(in_known, NEG_INF), dim=1)
        return div_rows(
            torch.cat([p_known, p_rest[:, None]], 1), torch.cat([q_known, q_rest[:, None]], 1), divergence, beta
        )
    if isinstance(targets, WeightedIdTargets):
        if divergence != "forward":
            raise UsageError(
                f"--cross-tokenizer aligned with a {targets.mode} cache trains with forward KL only (the "
                "student-side terms of reverse KL and JSD need the teacher's mass on buckets the sample "
                "does not determine); use --divergence forward, or a topk/full cache"
            )
        w, p_log, used, _ = targets.id_weights(T, approximate)  # (n, S)
        b = buckets.teacher[targets.ids]  # (n, S)
        single = buckets.teacher_count[b] == 1
        if buckets.teacher_single:  # only the rest bucket holds several stored slots: its plug-in mass per row
            in_rest = used & (b == buckets.rest)
            rest_w = torch.where(in_rest, w, torch.zeros_like(w)).sum(dim=1, keepdim=True)
            p_hat = torch.where(b == buckets.rest, rest_w, w)
        else:
            p_hat = (_same_bucket(b, used) * w[:, None, :]).sum(-1)  # (n, S) plug-in P^(b_j)
        p_at = torch.where(single, p_log, torch.log(p_hat.clamp_min(torch.finfo(p_hat.dtype).tiny)))
        q_at = Q.gather(1, b)
        if buckets.condition:  # given "matched"
            q_at = q_at - torch.logsumexp(Q[:, :-1], 1, keepdim=True)
            if buckets.teacher_rest:  # P(matched) < 1, estimated: self-normalised over the matched slots (ratio)
                used = used & (b < buckets.rest)
                log_m = torch.log(torch.where(used, w, torch.zeros_like(w)).sum(1, keepdim=True).clamp_min(1e-30))
                w, p_at = w / log_m.exp(), p_at - log_m
        return torch.where(used, w * (p_at - q_at), torch.zeros_like(w)).sum(dim=1)
    raise ValueError(f"unknown target mode {targets.mode!r}")


# -- ULD -----------------------------------------------------------------------------------------------------------


def sorted_l1(
    t_prefix: torch.Tensor, t_count: torch.Tensor, t_rest: torch.Tensor, s_probs: torch.Tensor
) -> torch.Tensor:
    """(n,) ``sum_{r < k'} |p_(r) - s_(r)| + |t_rest - sum_{r >= k'} s_(r)|``: ``t_prefix`` (n, k) the teacher's
    known largest probabilities (any order; zeros beyond ``t_count`` (n,) = k' per row), ``t_rest`` (n,) the
    teacher's mass beyond them, ``s_probs`` (n, V) the student's probabilities (sorted here). With k' = the whole
    teacher vocabulary and t_rest = 0 this is ULD's padded sorted L1."""
    t_sorted = t_prefix.sort(dim=1, descending=True).values
    k, V = t_sorted.shape[1], s_probs.shape[1]
    if k < V:  # only the student's k largest are compared one by one: a top-k, not a sort of the vocabulary
        s_sorted = s_probs.topk(k, dim=1).values
    else:
        s_sorted = s_probs.sort(dim=1, descending=True).values
    W = max(k, s_sorted.shape[1])
    tp = F.pad(t_sorted, (0, W - k))
    sp = F.pad(s_sorted, (0, W - s_sorted.shape[1]))
    in_prefix = torch.arange(W, device=sp.device)[None, :] < t_count[:, None]  # (n, W)
    head = torch.where(in_prefix, (tp - sp).abs(), torch.zeros_like(sp)).sum(dim=1)
    s_rest = s_probs.sum(dim=1) - torch.where(in_prefix, sp, torch.zeros_like(sp)).sum(dim=1)
    return head + (t_rest - s_rest).abs()


def _certain(targets: Targets, q: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """(n, S) stored ids provably larger than every unstored class (module docstring)."""
    R = (1.0 - torch.where(used, q, torch.zeros_like(q)).sum(dim=1, keepdim=True)).clamp_min(0.0)
    return (used & (q >= R)) | targets.surely_kept(used)


def _teacher_sorted_view(
    targets: Targets, T: float, approximate: bool, dtype: torch.dtype, buckets: Buckets | None = None
):
    """``(prefix, count, rest, student_keep)`` for :func:`sorted_l1`: the teacher's certain prefix and the mass
    beyond it, over the whole vocabulary (``buckets`` None) or inside the rest bucket of the aligned partition
    (``buckets`` given: hybrid); ``student_keep`` (n, V_student) bool or None: which student ids the comparison
    covers."""
    n = targets.logprobs.shape[0] if targets.dense else targets.ids.shape[0]
    if targets.mode == "full":
        q = torch.softmax(targets.logprobs.to(dtype) / T, dim=-1)  # (n, V_teacher)
        keep_s = None
        if buckets is not None:
            q = torch.where(buckets.teacher[None, :] == buckets.rest, q, torch.zeros_like(q))
            keep_s = (buckets.student == buckets.rest)[None, :].expand(n, -1)
        count = torch.full((n,), q.shape[1], dtype=torch.int64, device=q.device)
        return q, count, torch.zeros(n, dtype=dtype, device=q.device), keep_s
    if targets.mode == "topk":
        if buckets is not None:
            head, tail, b, known, rep, _ = _topk_known(targets, buckets, T, approximate)
            q, used = head.to(dtype).exp(), ~known & (targets.id_logprobs > NEG_INF)
            in_known = _bucket_mask(b, rep, buckets.num_buckets)
            keep_s = ~in_known.gather(1, buckets.student[None, :].expand(n, -1))
        else:
            hb = targets.buckets(T, approximate).to(dtype)
            q, tail, used, keep_s = hb[:, :-1].exp(), hb[:, -1], targets.id_logprobs > NEG_INF, None
        # every unstored class is below the smallest stored one, unless the slots are fused teachers' (padded)
        certain = used if not targets.padded else used & (q >= tail.to(dtype).exp()[:, None])
        prefix = torch.where(certain, q, torch.zeros_like(q))
        rest = tail.to(dtype).exp() + torch.where(used & ~certain, q, torch.zeros_like(q)).sum(dim=1)
        return prefix, certain.sum(dim=1), rest, keep_s
    if isinstance(targets, WeightedIdTargets):  # sample, priority
        w, p_log, used, _ = targets.id_weights(T, approximate)
        q = torch.where(used, p_log.to(dtype).exp(), torch.zeros_like(p_log, dtype=dtype))
        certain = _certain(targets, q, used)
        if buckets is None:
            prefix = torch.where(certain, q, torch.zeros_like(q))
            rest = (1.0 - prefix.sum(dim=1)).clamp_min(0.0)
            return prefix, certain.sum(dim=1), rest, None
        in_rest = buckets.teacher[targets.ids] == buckets.rest
        certain = certain & in_rest
        prefix = torch.where(certain, q, torch.zeros_like(q))
        p_rest_hat = torch.where(used & in_rest, w.to(dtype), torch.zeros_like(q)).sum(dim=1)
        keep_s = (buckets.student == buckets.rest)[None, :].expand(n, -1)
        return prefix, certain.sum(dim=1), (p_rest_hat - prefix.sum(dim=1)).clamp_min(0.0), keep_s
    raise UsageError(
        f"--cross-tokenizer uld cannot use {targets.mode} targets (fused sampled teachers do not "
        "determine which classes are the largest); use a topk, priority, sample or full cache"
    )


def uld_distance(
    student_logits: torch.Tensor,
    targets: Targets,
    temperature: float,
    *,
    approximate: bool = False,
    buckets: Buckets | None = None,
) -> torch.Tensor:
    """(n,) ULD between the teacher's and the student's distributions at T (module docstring); with ``buckets``,
    only inside the rest bucket of the aligned partition (the ``hybrid`` term)."""
    T = float(temperature)
    s_log = _student_log(student_logits, T)
    if buckets is not None:
        _check(targets, buckets, student_logits)
    prefix, count, rest, keep_s = _teacher_sorted_view(targets, T, approximate, s_log.dtype, buckets)
    s = s_log.exp()
    if keep_s is not None:
        s = torch.where(keep_s, s, torch.zeros_like(s))
    return sorted_l1(prefix, count, rest, s)


# -- the training loss ---------------------------------------------------------------------------------------------


def soft_rows(
    method: str,
    student_logits: torch.Tensor,
    targets: Targets,
    buckets: Buckets,
    temperature: float,
    *,
    divergence: str = "forward",
    beta: float = 0.5,
    uld_weight: float = 1.0,
    approximate: bool = False,
) -> torch.Tensor:
    """(n,) the soft term of ``method`` per aligned row, without T^2."""
    if method == "aligned":
        return aligned_divergence(
            student_logits, targets, buckets, temperature, divergence, beta, approximate=approximate
        )
    if method == "uld":
        return uld_distance(student_logits, targets, temperature, approximate=approximate)
    if method == "hybrid":
        return aligned_divergence(
            student_logits, targets, buckets, temperature, divergence, beta, approximate=approximate
        ) + uld_weight * uld_distance(student_logits, targets, temperature, approximate=approximate, buckets=buckets)
    raise UsageError(f"unknown --cross-tokenizer method {method!r}; use one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class XtokLoss:
    """What the soft term needs besides the tensors: the method, its settings and the vocabulary map."""

    method: str
    buckets: Buckets
    temperature: float
    alpha: float
    divergence: str = "forward"
    beta: float = 0.5
    uld_weight: float = 1.0
    approximate: bool = False

    def soft_rows(self, student_logits: torch.Tensor, targets: Targets) -> torch.Tensor:
        return soft_rows(
            self.method,
            student_logits,
            targets,
            self.buckets,
            self.temperature,
            divergence=self.divergence,
            beta=self.beta,
            uld_weight=self.uld_weight,
            approximate=self.approximate,
        )


def _sums(
    z: torch.Tensor, targets: Targets | None, rows: torch.Tensor, labels: torch.Tensor | None, spec: XtokLoss
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(soft sum without T^2 over ``rows`` of ``z`` (n, V), the summed CE, correct argmaxes) of one chunk."""
    zero = z.sum() * 0.0
    soft = spec.soft_rows(z[rows], targets).sum() if targets is not None and len(rows) else zero
    hard, correct = zero, torch.zeros((), dtype=torch.int64, device=z.device)
    if labels is not None:
        zf = z if z.dtype == torch.float64 else z.float()
        if spec.alpha < 1:
            hard = F.cross_entropy(zf, labels, reduction="sum")
        correct = (zf.detach().argmax(-1) == labels).sum()
    return soft, hard, correct


def _head_sums(h, weight, targets, rows, labels, spec):
    return _sums(h @ weight.T, targets, rows, labels, spec)  # (c, V) logits: recomputed in the backward pass


def xtok_kd_loss(
    student_logits: torch.Tensor | None,
    targets: Targets | None,
    aligned_rows: torch.Tensor | None,
    labels: torch.Tensor | None,
    spec: XtokLoss,
    *,
    hidden: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    chunk: int | None = None,
) -> tuple[LossParts, torch.Tensor]:
    """``alpha * T^2 * (1/N) * sum_{aligned} D + (1 - alpha) * (1/N) * sum CE``, N the student's predicted tokens,
    and how many argmaxes hit the label (a tensor on the device).

    ``student_logits`` (N, V_student) at every predicted student position -- or, for a student whose logits are
    ``hidden @ weight.T`` (:func:`kdcli.lm.hf.fused_head_weight`), ``hidden`` (N, d) and ``weight`` (V, d) with
    ``student_logits`` None: then the logits are kept for at most :data:`LOGIT_BUDGET` (rows x V) values at a
    time. A batch whose logits fit is one chunk, computed once; a larger one runs ``chunk`` rows at a time (default:
    as many as fit the budget) under activation checkpointing (``torch.utils.checkpoint``): one chunk's logits are
    alive at a time and recomputed in the backward pass (the same value and gradients to float rounding; the output
    layer's products and the soft term run twice).
    ``labels`` (N,) the next tokens, ``aligned_rows`` (A,) the student rows (ascending) that align with the A rows of
    ``targets`` (the teacher's cached positions, gathered in the same order). Both terms are averaged over all N
    student positions: a position that does not align contributes no soft term (the per-token objective is
    ``alpha T^2 D 1[aligned] + (1 - alpha) CE``, so batches with few aligned positions are not up-weighted); with
    every position aligned this is :func:`kdcli.losses.kd_loss`'s convention exactly. T^2 scales every method (for
    ULD a convention, keeping the soft weight's meaning across methods)."""
    fused = student_logits is None
    if fused and chunk is None:
        chunk = max(1, LOGIT_BUDGET // max(int(weight.shape[0]), 1))
        if hidden.shape[0] <= chunk:  # the whole batch's logits fit: no recomputation
            student_logits, fused = hidden @ weight.T, False
    N = hidden.shape[0] if fused else student_logits.shape[0]
    denom = float(max(N, 1))
    use_soft = targets is not None and spec.alpha > 0 and aligned_rows is not None and len(aligned_rows) > 0
    rows_all = aligned_rows if use_soft else None
    parts = []
    for a in range(0, max(N, 1), chunk if fused else max(N, 1)):
        b = min(a + (chunk if fused else N), N)
        if use_soft:
            lo, hi = (int(x) for x in torch.searchsorted(rows_all, torch.tensor([a, b], device=rows_all.device)))
            t_c = targets.take(torch.arange(lo, hi, device=rows_all.device)) if hi > lo else None
            r_c = rows_all[lo:hi] - a
        else:
            t_c, r_c = None, torch.zeros(0, dtype=torch.int64)
        y_c = labels[a:b] if labels is not None else None
        if fused:
            parts.append(checkpoint(_head_sums, hidden[a:b], weight, t_c, r_c, y_c, spec, use_reentrant=False))
        else:
            parts.append(_sums(student_logits[a:b], t_c, r_c, y_c, spec))
    soft_sum, hard_sum, correct = (torch.stack([p[k] for p in parts]).sum() for k in range(3))
    soft = (spec.temperature**2) * soft_sum / denom
    hard = hard_sum / denom
    if not use_soft:
        soft = soft * 0.0
    if labels is None or spec.alpha >= 1:
        hard = hard * 0.0
    return LossParts(total=spec.alpha * soft + (1.0 - spec.alpha) * hard, soft=soft, hard=hard), correct


def top1_agreement(student_logits: torch.Tensor, targets: Targets, buckets: Buckets) -> torch.Tensor:
    """(n,) bool: the student's and the teacher's most likely tokens spell the same matched string (two unmatched
    tokens never agree: their strings are not comparable)."""
    t = buckets.teacher[targets.top1()]
    s = buckets.student[student_logits.argmax(dim=-1)]
    return (t == s) & (t < buckets.rest)


def describe_method(method: str, mode: str) -> str:
    """What the soft term of ``method`` is on a ``mode`` cache, for the line printed when training starts."""
    what = {
        ("aligned", "full"): "exact KL on matched strings + rest",
        ("aligned", "topk"): "exact KL on the matched strings among the top k + rest",
        ("aligned", "sampled"): "unbiased cross-entropy on matched strings + rest (plug-in rest entropy)",
        ("uld", "full"): "exact sorted-probability L1",
        ("uld", "topk"): "sorted L1, exact on the top k, lower bound on the tail",
    }
    return what.get(
        (method, "sampled" if get_mode(mode).sampled else mode),
        {
            "uld": "sorted L1 on the certain prefix, lower bound on the rest",
            "hybrid": "aligned + ULD inside the rest bucket",
        }.get(method, method),
    )
