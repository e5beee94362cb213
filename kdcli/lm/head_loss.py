"""The student's output layer and the distillation loss in one pass over the vocabulary, a chunk of tokens at a time.

An LM student's step is dominated by its last layer: ``hidden (N, d) @ W.T (d, V)`` gives ``N x V`` logits
(V = 49,152 for SmolLM2), and autograd then keeps that matrix, its log-softmax, a masked copy for the top-k tail and
their gradients (each ``4 N V`` bytes: 100 MB for 512 tokens) and streams through them a dozen times.
:func:`head_kd_loss` computes the same loss *and its gradient* chunk by chunk in the forward pass (the gradient of
every supported term is a closed form in the student's softmax, below), so nothing V-wide outlives a chunk and the
backward pass is two small multiplications. It is exact: the same value and gradients as
``kd_loss(hidden @ W.T, ...)`` to float rounding (``tests/test_lm_head_loss.py`` checks it against that path).

Gradients with respect to the logits z (s = z / T, q = softmax(s), N predicted tokens):

- soft term ``alpha * T^2 * KL(p || q) / N`` (forward KL only) is ``alpha * T / N * (q - p~)``, where p~ is the
  teacher distribution the mode defines: ``full`` the softmax of the cached log-probs at T; ``sample`` the
  self-normalised draw weights on the drawn ids, 0 elsewhere; ``topk`` the bucket probability on each of the k ids
  and, on every other id m, the teacher's tail mass spread as the student spreads its own:
  ``p_tail * q_m / q_tail``.
- hard term ``(1 - alpha) * CE / N`` is ``(1 - alpha) / N * (softmax(z) - onehot(label))``.

Reverse KL and JSD (and students whose output layer is not a plain ``hidden @ W.T``) use the autograd path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdcli.losses import LossParts, Targets, _div_rows, sample_weights, topk_bucket_logprobs

TINY_TAIL = 1e-30  # below this the student's tail mass is recomputed in log space (float32 underflow)


def _chunk(z: torch.Tensor, z_max: torch.Tensor, targets: Targets | None, y: torch.Tensor | None, rows: slice,
           T: float, c_soft: float, c_hard: float) -> tuple[torch.Tensor, float, float]:
    """Gradient of the loss w.r.t. one chunk of logits z (c, V), and the chunk's summed KL and CE.

    ``z_max`` (c, 1) is each row's largest logit. The gradient is built in place in one V-wide buffer:
    ``c_soft * (q_T - p~) + c_hard * (softmax(z) - onehot)``; at T = 1 the two softmaxes are the same tensor and
    are computed once. Softmaxes are kept unnormalised (``exp(s - max)``) until the last multiplication.
    """
    soft_sum = hard_sum = 0.0
    yc = y[rows] if y is not None and c_hard else None
    soft = targets is not None and c_soft != 0.0
    shared = soft and yc is not None and T == 1.0
    g = None
    if soft:
        s = z / T if T != 1.0 else z
        m = z_max / T
        g = torch.sub(s, m).exp_()  # unnormalised q_T; becomes the gradient in place
        total = g.sum(dim=1, keepdim=True)  # (c, 1)
        lse = m + torch.log(total)
        mult = c_soft + (c_hard if shared else 0.0)  # what multiplies q_T in the gradient
        if targets.mode == "full":
            p_log = F.log_softmax(targets.logprobs[rows] / T, dim=1)
            p = p_log.exp()
            soft_sum = float(torch.where(p > 0, p * (p_log - (s - lse)), torch.zeros_like(p)).sum())
            g.mul_(mult / total).sub_(p, alpha=c_soft)
        elif targets.mode == "topk":
            p_log = topk_bucket_logprobs(targets.id_logprobs[rows], targets.tail_logmass[rows], targets.num_classes, T)
            ids = targets.ids[rows]
            k = ids.shape[1]
            q_ids = g.gather(1, ids) / total
            g.scatter_(1, ids, 0.0)
            tail = g.sum(dim=1)  # the student's unnormalised mass outside the teacher's top k (no cancellation)
            tail_log = torch.log(tail) - torch.log(total[:, 0])
            tiny = torch.nonzero(tail < TINY_TAIL).squeeze(1)
            masked = None
            if len(tiny):  # float32 underflow: redo those rows' tail in log space
                masked = s[tiny].scatter(1, ids[tiny], -math.inf)
                tail_log[tiny] = torch.logsumexp(masked, dim=1) - lse[tiny, 0]
            s_buckets = torch.cat([s.gather(1, ids) - lse, tail_log[:, None]], dim=1)
            soft_sum = float(_div_rows(p_log, s_buckets, "forward", 0.5).sum())
            p_b = p_log.exp()
            # every other id m: mult * q_m - c_soft * p_tail * q_m / q_tail
            g.mul_(((mult - c_soft * p_b[:, k] / tail_log.exp()) / total[:, 0])[:, None])
            if masked is not None:  # those rows with q_m / q_tail in log space
                within = torch.exp(masked - (lse[tiny, 0] + tail_log[tiny])[:, None])
                g[tiny] = mult * torch.exp(masked - lse[tiny]) - c_soft * p_b[tiny, k][:, None] * within
            g.scatter_(1, ids, mult * q_ids - c_soft * p_b[:, :k])
        elif targets.mode == "sample":
            w, p_log, used, _ = sample_weights(targets.counts[rows], targets.id_logprobs[rows], T)
            w = torch.where(used, w, torch.zeros_like(w))
            ids = targets.ids[rows]
            s_at = s.gather(1, ids) - lse
            soft_sum = float(torch.where(used, w * (p_log - s_at), torch.zeros_like(w)).sum())
            g.mul_(mult / total).scatter_add_(1, ids, -c_soft * w)
        else:
            raise ValueError(f"unknown target mode {targets.mode!r}")
    if yc is not None:
        if shared:
            lse1 = lse
        else:
            e = torch.sub(z, z_max).exp_()
            total1 = e.sum(dim=1, keepdim=True)
            lse1 = z_max + torch.log(total1)
            e.mul_(c_hard / total1)
            g = e if g is None else g.add_(e)
        hard_sum = float((lse1[:, 0] - z.gather(1, yc[:, None])[:, 0]).sum())
        g.scatter_add_(1, yc[:, None], torch.full((len(yc), 1), -c_hard, dtype=g.dtype, device=g.device))
    if g is None:
        g = torch.zeros_like(z)
    return g, soft_sum, hard_sum


class _HeadKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, y, T, alpha, chunk, stats):  # noqa: D102 (see head_kd_loss)
        n = h.shape[0]
        hf, wf = h.float(), weight.float()
        c_soft = alpha * T / max(n, 1) if targets is not None else 0.0
        c_hard = (1.0 - alpha) / max(n, 1) if y is not None else 0.0
        grad_h = torch.empty_like(hf)
        grad_w = torch.zeros_like(wf)
        soft = hard = 0.0
        correct = 0
        for a in range(0, n, chunk):
            rows = slice(a, min(a + chunk, n))
            z = hf[rows] @ wf.T  # (c, V)
            z_max, top1 = z.max(dim=1, keepdim=True)
            if y is not None:
                correct += int((top1[:, 0] == y[rows]).sum())
            g, s_sum, h_sum = _chunk(z, z_max, targets, y, rows, T, c_soft, c_hard)
            soft += s_sum
            hard += h_sum
            torch.matmul(g, wf, out=grad_h[rows])
            grad_w.addmm_(g.T, hf[rows])
        ctx.save_for_backward(grad_h.to(h.dtype), grad_w.to(weight.dtype))
        stats.update(soft=T * T * soft / max(n, 1), hard=hard / max(n, 1), correct=correct)
        return h.new_tensor(alpha * stats["soft"] + (1.0 - alpha) * stats["hard"])  # each 0 when its term is off

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None, None, None


def head_kd_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: Targets | None, labels: torch.Tensor | None,
                 *, temperature: float, alpha: float, chunk: int = 64) -> tuple[LossParts, int]:
    """``kd_loss(hidden @ weight.T, targets, labels, ...)`` with forward KL, and the number of tokens whose argmax
    is the label, without keeping (N, V) logits: (N, d) hidden states at the predicted positions, (V, d) weight."""
    stats: dict = {}
    total = _HeadKD.apply(hidden, weight, targets, labels, float(temperature), float(alpha), int(chunk), stats)
    soft = total.new_tensor(stats["soft"] if targets is not None and alpha > 0 else 0.0)
    hard = total.new_tensor(stats["hard"] if labels is not None and alpha < 1 else 0.0)
    return LossParts(total=total, soft=soft, hard=hard), stats["correct"]
