"""The student's output layer and the distillation loss in one pass over the vocabulary, a chunk of tokens at a time.

An LM student's step is dominated by its last layer: ``hidden (N, d) @ W.T (d, V)`` gives ``N x V`` logits
(V = 49,152 for SmolLM2), and autograd then keeps that matrix, its log-softmax, a masked copy for the top-k tail and
their gradients (each ``4 N V`` bytes: 100 MB for 512 tokens) and streams through them a dozen times.
:func:`head_kd_loss` computes the same loss *and its gradient* chunk by chunk in the forward pass (the gradient of
every supported term is a closed form in the student's softmax, below), so nothing V-wide outlives a chunk and the
backward pass is two small multiplications. It is exact: the same value and gradients as
``kd_loss(hidden @ W.T, ...)`` to float rounding (``tests/test_lm_head_loss.py`` checks it against that path).

Gradients with respect to the logits z (s = z / T, q = softmax(s), N predicted tokens):

- soft term ``alpha * T^2 * KL(p || q) / N`` (forward KL only) is ``alpha * T / N * (W q - p~)``, where p~ is the
  teacher (estimate) the mode defines and W its total: ``full`` the softmax of the cached log-probs at T (W = 1);
  ``sample`` and ``priority`` the weights of :func:`kdcli.losses.id_weights` on the stored ids, 0 elsewhere:
  unnormalised (W = their row sum, an unbiased estimate of 1) at a stored T, self-normalised (W = 1) for ``sample``
  at T = 1 and for the approximation at an unstored T; ``topk`` the bucket probability on each of the k ids
  and, on every other id m, the teacher's tail mass spread as the student spreads its own:
  ``p_tail * q_m / q_tail`` (W = 1).
- hard term ``(1 - alpha) * CE / N`` is ``(1 - alpha) / N * (softmax(z) - onehot(label))``.

Reverse KL and JSD (and students whose output layer is not a plain ``hidden @ W.T``) use the autograd path.
``train-student --precision bf16`` runs the three output-layer products in bfloat16 (see :func:`head_kd_loss`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdcli.losses import LossParts, Targets, div_rows, id_weights, padded_head, teacher_buckets

TINY_TAIL = 1e-30  # below this the student's tail mass is recomputed in log space (float32 underflow)


_SCRATCH: dict[tuple, list[torch.Tensor]] = {}


def _scratch(like: torch.Tensor, rows: int, cols: int, dtype: torch.dtype, count: int) -> list[torch.Tensor]:
    """``count`` (rows, cols) buffers kept between steps: a fresh 25 MB tensor per chunk buffer and step costs
    page faults (the CPU allocator hands large blocks back to the OS), measured at ~10-30 ms of a ~150 ms step.
    One set per (device, dtype, width, count); the largest row count seen is kept and sliced."""
    key = (like.device, dtype, cols, count)
    have = _SCRATCH.get(key)
    if have is None or have[0].shape[0] < rows:
        have = _SCRATCH[key] = [like.new_empty(rows, cols, dtype=dtype) for _ in range(count)]
    return [b[:rows] for b in have]


def _softmax_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """softmax(x) along dim 1 written into ``out``: one fused pass per row (a 49k-wide row stays in cache)."""
    return torch.ops.aten._softmax.out(x, 1, False, out=out)


def _fold(g: torch.Tensor, f: torch.Tensor, ids: torch.Tensor,
          vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradient ``f[:, None] * g`` with ``vals`` at ``ids`` instead, kept as (g', f) with the row factor f left
    for the output-layer products (one V-wide pass saved): g' at ids holds ``vals / f``. Rows where f is 0 or not
    finite cannot be folded; then the factor is applied here and (g, None) returned."""
    if bool(torch.isfinite(f).all()) and bool((f.abs() > 1e-30).all()):
        return g.scatter_(1, ids, vals / f[:, None]), f
    return g.mul_(f[:, None]).scatter_(1, ids, vals), None


def _tail_grad_in_log_space(x: torch.Tensor, lse: torch.Tensor, tail_log: torch.Tensor, p_tail: torch.Tensor,
                            mult: float, c_soft: float) -> torch.Tensor:
    """The topk gradient on tail classes, ``mult * q_m - c_soft * p_tail * q_m / q_tail``, from the tempered logits
    ``x`` of rows whose student tail mass underflows float32 (q_m = exp(x - lse), q_tail = exp(tail_log))."""
    return mult * torch.exp(x - lse[:, None]) - c_soft * p_tail[:, None] * torch.exp(x - (lse + tail_log)[:, None])


def _topk_padded(qT: torch.Tensor, s: torch.Tensor, lse: torch.Tensor, t: Targets, T: float, approximate: bool,
                 mult: float, c_soft: float) -> tuple[torch.Tensor, None, float]:
    """The topk term for fused topk targets (``Targets.padded``: ids may repeat, slots with log-prob -inf are tail
    classes; kdcli.cache.fused): the same bucketed KL and gradient as the plain topk branch, with the head classes
    as a (c, V) mask instead of a scatter over distinct ids. Returns the gradient with its row factor applied."""
    p_log = teacher_buckets(t, T, approximate)  # (c, k + 1), -inf on unused slots
    ids, k = t.ids, t.ids.shape[1]
    used, head = padded_head(t, qT)
    tail_log = torch.log(qT.masked_fill(head, 0.0).sum(dim=1))  # the student's mass outside the head, summed directly
    tiny = torch.nonzero(tail_log < math.log(TINY_TAIL)).squeeze(1)
    if len(tiny):  # float32 underflow: those rows' tail in log space
        tail_log[tiny] = torch.logsumexp(s[tiny].masked_fill(head[tiny], -math.inf), dim=1) - lse[tiny]
    s_at = torch.where(used, s.gather(1, ids) - lse[:, None], -math.inf)
    soft_sum = float(div_rows(p_log, torch.cat([s_at, tail_log[:, None]], dim=1), "forward", 0.5).sum())
    p_b = p_log.exp()
    p_head = torch.zeros_like(qT).scatter_add_(1, ids, torch.where(used, p_b[:, :k], 0.0))
    # head class i: mult * q_i - c_soft * p_i; tail class m: mult * q_m - c_soft * p_tail * q_m / q_tail
    tail_grad = qT * (mult - c_soft * p_b[:, k] / tail_log.exp())[:, None]
    if len(tiny):
        tail_grad[tiny] = _tail_grad_in_log_space(s[tiny], lse[tiny], tail_log[tiny], p_b[tiny, k], mult, c_soft)
    return torch.where(head, qT * mult - c_soft * p_head, tail_grad), None, soft_sum


def _chunk(z: torch.Tensor, bufs: list[torch.Tensor], targets: Targets | None, y: torch.Tensor | None, rows: slice,
           T: float, c_soft: float, c_hard: float,
           approximate: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, float, float, torch.Tensor | None]:
    """The gradient of the loss w.r.t. one chunk of logits z (c, V), the chunk's summed KL and CE, and for each row
    whether its label is the argmax (a label tied for the largest logit counts as hit).

    The gradient comes back as ``(g, scale)``: it is ``scale[:, None] * g`` (``g`` itself when scale is None); the
    per-row factor is applied to the small (c, d) operands of the output-layer products instead of to g. ``g`` lives
    in ``bufs`` (reused across chunks: no page faults on fresh 12 MB buffers); z is divided by T in place.
    Softmaxes are normalised (one fused pass per row); log q at any id is ``s - lse`` with
    ``lse = max(s) - log(max(q))``, so ids the student gives less than float32's range keep a finite log-prob.
    """
    soft = targets is not None and c_soft != 0.0
    yc = y[rows] if y is not None else None
    hard = yc is not None and c_hard != 0.0
    c = z.shape[0]
    z_max = z.amax(dim=1)  # (amax is ~30x faster than max-with-indices over 49k-wide rows)
    hit = (z.gather(1, yc[:, None])[:, 0] >= z_max) if yc is not None else None  # the label is the argmax
    if not soft and not hard:
        return bufs[0].zero_(), None, 0.0, 0.0, hit
    soft_sum = hard_sum = 0.0
    shared = soft and hard and T == 1.0  # one softmax serves both terms
    q1 = None
    if hard:
        q1 = _softmax_into(z, bufs[0])
        lse1 = z_max - torch.log(q1.amax(dim=1))  # q is largest where z is: q_max = exp(z_max - lse)
        hard_sum = float((lse1 - z.gather(1, yc[:, None])[:, 0]).sum())
    if not soft:  # hard term alone: c_hard * (q1 - onehot)
        f = torch.full((c,), c_hard, dtype=z.dtype, device=z.device)
        g = q1.scatter_add_(1, yc[:, None], torch.full((c, 1), -1.0, dtype=z.dtype, device=z.device))
        return g, f, 0.0, hard_sum, hit
    s = z.div_(T) if T != 1.0 else z
    if shared:
        qT, lse = q1, lse1
    else:
        qT = _softmax_into(s, bufs[1] if hard else bufs[0])
        lse = z_max / T - torch.log(qT.amax(dim=1))
    mult = c_soft + (c_hard if shared else 0.0)  # what multiplies q_T in the gradient
    mode = targets.mode
    if mode == "full":
        p_log = F.log_softmax(targets.logprobs[rows] / T, dim=1)
        p = p_log.exp()
        soft_sum = float(torch.where(p > 0, p * (p_log - (s - lse[:, None])), torch.zeros_like(p)).sum())
        g, f = qT.mul_(mult).sub_(p, alpha=c_soft), None
    elif mode == "topk" and targets.padded:
        g, f, soft_sum = _topk_padded(qT, s, lse, targets.rows(rows), T, approximate, mult, c_soft)
    elif mode == "topk":
        p_log = teacher_buckets(targets.rows(rows), T, approximate)
        ids = targets.ids[rows]
        k = ids.shape[1]
        q_ids = qT.gather(1, ids)
        # the student's mass outside the teacher's top k: 1 - sum(q_ids), summed directly where that cancels
        tail = (1.0 - q_ids.sum(dim=1)).clamp_min(0.0)
        direct = torch.nonzero(tail < 0.05).squeeze(1)
        if len(direct):
            tail[direct] = qT[direct].scatter(1, ids[direct], 0.0).sum(dim=1)
        tail_log = torch.log(tail)
        tiny = torch.nonzero(tail < TINY_TAIL).squeeze(1)
        masked = None
        if len(tiny):  # float32 underflow: redo those rows' tail in log space
            masked = s[tiny].scatter(1, ids[tiny], -math.inf)
            tail_log[tiny] = torch.logsumexp(masked, dim=1) - lse[tiny]
        s_buckets = torch.cat([s.gather(1, ids) - lse[:, None], tail_log[:, None]], dim=1)
        soft_sum = float(div_rows(p_log, s_buckets, "forward", 0.5).sum())
        p_b = p_log.exp()
        # every other id m: mult * q_m - c_soft * p_tail * q_m / q_tail = f * q_m
        f = mult - c_soft * p_b[:, k] / tail_log.exp()
        if masked is not None:  # those rows' gradient in log space, at its final scale (f = 1 for them)
            qT[tiny] = _tail_grad_in_log_space(masked, lse[tiny], tail_log[tiny], p_b[tiny, k], mult, c_soft)
            f[tiny] = 1.0
        g, f = _fold(qT, f, ids, mult * q_ids - c_soft * p_b[:, :k])
    elif mode in ("sample", "priority", "mixture"):
        w, p_log, used, W = id_weights(targets.rows(rows), T, approximate)  # W: None where w sums to 1
        w = torch.where(used, w, torch.zeros_like(w))
        ids = targets.ids[rows]
        s_at = s.gather(1, ids) - lse[:, None]
        soft_sum = float(torch.where(used, w * (p_log - s_at), torch.zeros_like(w)).sum())
        if W is None:
            g, f = qT.scatter_add_(1, ids, -(c_soft / mult) * w), torch.full((c,), mult, dtype=z.dtype,
                                                                              device=z.device)
        else:  # unnormalised weights: q_T is multiplied by c_soft * W (+ c_hard when the softmax is shared)
            f = c_soft * W + (c_hard if shared else 0.0)
            g = qT.scatter_add_(1, ids, -(c_soft / f)[:, None] * w)
    else:
        raise ValueError(f"unknown target mode {mode!r}")
    if hard:
        if not shared:  # softmax(z) is a second buffer: bring the soft part to its final scale, then add
            if f is not None:
                g.mul_(f[:, None])
            g, f = g.add_(q1, alpha=c_hard), None
        add = torch.full((c, 1), -c_hard, dtype=z.dtype, device=z.device)
        g.scatter_add_(1, yc[:, None], add if f is None else add / f[:, None])
    return g, f, soft_sum, hard_sum, hit


class _HeadKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, y, T, alpha, chunk, stats, bf16, approximate):  # noqa: D102 (see head_kd_loss)
        n = h.shape[0]
        hf, wf = h.float(), weight.float()
        if bf16:  # the three products in bfloat16; softmax, loss and the gradients' sums over chunks in float32
            hb, wb = h.bfloat16(), weight.bfloat16()
        c_soft = alpha * T / max(n, 1) if targets is not None else 0.0
        c_hard = (1.0 - alpha) / max(n, 1) if y is not None else 0.0
        grad_h = torch.empty_like(hf)
        grad_w = torch.zeros_like(wf) if n == 0 else torch.empty_like(wf)
        soft = hard = 0.0
        correct = 0
        width = min(chunk, max(n, 1))
        zbuf, *bufs = _scratch(hf, width, wf.shape[0], torch.float32, 3 if T != 1.0 and alpha < 1.0 else 2)
        if bf16:
            zb, gb = _scratch(hf, width, wf.shape[0], torch.bfloat16, 2)
        for a in range(0, n, chunk):
            rows = slice(a, min(a + chunk, n))
            c = rows.stop - rows.start
            if bf16:
                z = zbuf[:c].copy_(torch.matmul(hb[rows], wb.T, out=zb[:c]))
            else:
                z = torch.matmul(hf[rows], wf.T, out=zbuf[:c])  # (c, V)
            g, scale, s_sum, h_sum, hit = _chunk(z, [b[:c] for b in bufs], targets, y, rows, T, c_soft, c_hard,
                                                 approximate)
            if hit is not None:
                correct += int(hit.sum())
            soft += s_sum
            hard += h_sum
            hs = hf[rows] if scale is None else hf[rows] * scale[:, None]
            if bf16:
                g = gb[:c].copy_(g)
                grad_h[rows] = torch.matmul(g, wb)
                gw = torch.matmul(g.T, hs.bfloat16())
                grad_w.copy_(gw) if a == 0 else grad_w.add_(gw)
            else:
                torch.matmul(g, wf, out=grad_h[rows])
                torch.matmul(g.T, hs, out=grad_w) if a == 0 else grad_w.addmm_(g.T, hs)
            if scale is not None:
                grad_h[rows] *= scale[:, None]
        ctx.save_for_backward(grad_h.to(h.dtype), grad_w.to(weight.dtype))
        stats.update(soft=T * T * soft / max(n, 1), hard=hard / max(n, 1), correct=correct)
        return h.new_tensor(alpha * stats["soft"] + (1.0 - alpha) * stats["hard"])  # each 0 when its term is off

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None, None, None, None, None


def head_kd_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: Targets | None, labels: torch.Tensor | None,
                 *, temperature: float, alpha: float, chunk: int = 128, precision: str = "fp32",
                 approximate: bool = False) -> tuple[LossParts, int]:
    """``kd_loss(hidden @ weight.T, targets, labels, ...)`` with forward KL, and the number of tokens whose argmax
    is the label, without keeping (N, V) logits: (N, d) hidden states at the predicted positions, (V, d) weight.

    ``precision="bf16"`` runs the three products (logits, and the gradients for the hidden states and the weight)
    in bfloat16 with float32 softmax, loss and sums over chunks: ~1.5x faster on CPUs with AVX512-BF16, not exact
    (logits carry bfloat16's ~3 significant digits). ``approximate``: as for :func:`~kdcli.losses.kd_loss` (sparse
    targets at a temperature they do not store)."""
    stats: dict = {}
    with torch.autocast(hidden.device.type, enabled=False):  # the precision is chosen here, not by autocast
        total = _HeadKD.apply(hidden, weight, targets, labels, float(temperature), float(alpha), int(chunk), stats,
                              precision == "bf16", bool(approximate))
    soft = total.new_tensor(stats["soft"] if targets is not None and alpha > 0 else 0.0)
    hard = total.new_tensor(stats["hard"] if labels is not None and alpha < 1 else 0.0)
    return LossParts(total=total, soft=soft, hard=hard), stats["correct"]
