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
  teacher (estimate) the cache mode defines and W its total: each mode's targets compute it on a chunk
  (:meth:`kdcli.cache.modes.base.Targets.head_grad`; the mode files say what p~ is).
- hard term ``(1 - alpha) * CE / N`` is ``(1 - alpha) / N * (softmax(z) - onehot(label))``.

Reverse KL and JSD (and students whose output layer is not a plain ``hidden @ W.T``) use the autograd path.
``train-student --precision bf16`` runs the three output-layer products in bfloat16 (see :func:`head_kd_loss`).
"""

from __future__ import annotations

import torch

from kdcli.cache.modes.base import HeadChunk, Targets
from kdcli.losses import LossParts

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


def _chunk(
    z: torch.Tensor,
    bufs: list[torch.Tensor],
    targets: Targets | None,
    y: torch.Tensor | None,
    rows: slice,
    T: float,
    c_soft: float,
    c_hard: float,
    approximate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, float, float, torch.Tensor | None]:
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
    shared_hard = c_hard if shared else 0.0
    mult = c_soft + shared_hard  # what multiplies q_T in the gradient
    g, f, soft_sum = targets.rows(rows).head_grad(
        HeadChunk(s=s, qT=qT, lse=lse, T=T, mult=mult, c_soft=c_soft, shared_hard=shared_hard, approximate=approximate)
    )
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
            g, scale, s_sum, h_sum, hit = _chunk(
                z, [b[:c] for b in bufs], targets, y, rows, T, c_soft, c_hard, approximate
            )
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


def head_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: Targets | None,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
    chunk: int = 128,
    precision: str = "fp32",
    approximate: bool = False,
) -> tuple[LossParts, int]:
    """``kd_loss(hidden @ weight.T, targets, labels, ...)`` with forward KL, and the number of tokens whose argmax
    is the label, without keeping (N, V) logits: (N, d) hidden states at the predicted positions, (V, d) weight.

    ``precision="bf16"`` runs the three products (logits, and the gradients for the hidden states and the weight)
    in bfloat16 with float32 softmax, loss and sums over chunks: ~1.5x faster on CPUs with AVX512-BF16, not exact
    (logits carry bfloat16's ~3 significant digits). ``approximate``: as for :func:`~kdcli.losses.kd_loss` (sparse
    targets at a temperature they do not store)."""
    stats: dict = {}
    with torch.autocast(hidden.device.type, enabled=False):  # the precision is chosen here, not by autocast
        total = _HeadKD.apply(
            hidden,
            weight,
            targets,
            labels,
            float(temperature),
            float(alpha),
            int(chunk),
            stats,
            precision == "bf16",
            bool(approximate),
        )
    soft = total.new_tensor(stats["soft"] if targets is not None and alpha > 0 else 0.0)
    hard = total.new_tensor(stats["hard"] if labels is not None and alpha < 1 else 0.0)
    return LossParts(total=total, soft=soft, hard=hard), stats["correct"]
