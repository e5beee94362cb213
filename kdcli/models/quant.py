"""What a compressed model is, and how a loader rebuilds one from ``model.json`` + ``model.safetensors`` alone.

``kdcli compress`` (kdcli/stages/compress.py) writes run dirs whose ``model.json`` carries a ``compression`` record::

    {"quantize": "int8", "prune": 0.5, "structured": true, "source": "/abs/RUN", ...}

and whose weights differ from what the recipe (spec + args) builds in two ways, both read from the safetensors
header (never from pickled objects):

- **int8 Linear layers**: ``N.weight_int8`` (int8, out x in) + ``N.weight_scale`` (float32, one per output
  channel) + ``N.bias`` in place of ``N.weight``/``N.bias``; the loader swaps :class:`QuantLinear` in.
- **structured pruning**: a Linear with fewer rows (and the next one with fewer columns); the loader rebuilds
  ``nn.Linear`` with the stored shape.

Unstructured pruning keeps every shape; :func:`keep_zeros` makes fine-tuning preserve the zeros.

Why a small module of our own rather than PyTorch's dynamic quantisation (``torch.ao.quantization``): that API
is deprecated in the installed torch (its quantized-tensor constructors are announced for removal) and its
modules' state holds packed ScriptObjects that safetensors cannot store. :class:`QuantLinear` is plain tensors:
the stored int8 + scales are the model. Two ways to run it, recorded in ``model.json``:

- ``int8`` (default): ``(x @ W_int8^T) * scale + bias`` in float: the dequantised weights exactly, the same logits
  on every device, autograd flows through it (biases and other float parameters can be fine-tuned). No int8
  kernel: on CPU it runs at about float speed; the win is 4x smaller Linear weights on disk and in memory.
- ``int8-dynamic``: at inference the input rows are quantised to int8 as well (:func:`quantize_per_row`) and
  multiplied with the int8 x int8 -> int32 kernel ``torch._int_mm`` (what PyTorch's dynamic quantisation does, with
  per-row activation scales): on an AVX512-VNNI CPU 2-3x faster than float at batch 1,024, about float speed at
  batch 1 for 800-wide layers, slower at batch 1 for small ones (docs/compress.md, "How int8-dynamic runs on CPU").
  Where torch has no fast int8 kernel (:func:`fast_int_mm`) the same integers are multiplied in float32.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.infra.errors import UsageError

INT8_SUFFIX = ".weight_int8"
SCALE_SUFFIX = ".weight_scale"


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (int8 (out, in), float32 scale (out,)): symmetric, ``scale = max|w_row| / 127``.

    Every weight is within half a scale step of ``q * scale``; an all-zero row gets scale 1 (and q = 0).
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)  # (out,)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_per_row(rows: torch.Tensor, dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, in) float32 -> (q (n, in), float32 scale (n, 1)): symmetric, ``scale = max|x_row| / 127``.

    ``q = round(x / scale)`` (round half to even), so every value is within half a step of ``q * scale`` and
    ``|q| <= 127`` without a clamp (``|x| <= max|x_row|``; IEEE division is correctly rounded). The scale is never
    below the smallest normal float32, 1.2e-38 (an all-zero row gets q = 0, as with any scale; a row whose max is
    below ``127 * 1.2e-38`` is rounded on that grid, coarser than its own). ``dtype``: int8, or float32 for the
    same integers as floats. Only one (n, in) float temporary is made: ``|x|`` is written over by ``x / scale`` and
    rounded in place (that buffer is the float32 result; for int8 it is freed when this returns). Non-finite
    inputs give undefined q.
    """
    buf = rows.abs()  # (n, in)
    scale = buf.amax(dim=1, keepdim=True).div_(127.0).clamp_min_(torch.finfo(torch.float32).tiny)  # (n, 1)
    q = torch.div(rows, scale, out=buf).round_()
    return (q if dtype == torch.float32 else q.to(dtype)), scale


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which its int8 GEMM has no VNNI and its int16 pair sums saturate
NO_VNNI_ISA_CAPS = {"SSE41", "AVX", "AVX2", "AVX512_CORE"}


@functools.cache
def cpu_int_mm_uses_vnni() -> bool:
    """Whether torch sends ``torch._int_mm`` on CPU to oneDNN's VNNI kernel: torch's own test (AVX512-VNNI, from
    cpuinfo, ``torch.cpu.get_capabilities()``), and no ``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA`` that keeps
    oneDNN below VNNI (it then runs its AVX2 int8 kernel, whose saturating int16 sums give wrong products: measured
    with ``ONEDNN_MAX_CPU_ISA=AVX2`` on an AVX512-VNNI CPU, errors up to 1.7e5 in sums of 784 products)."""
    caps = torch.cpu.get_capabilities()
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    capped = isa in NO_VNNI_ISA_CAPS or (isa.startswith("AVX2_VNNI") and not caps.get("avx_vnni", False))
    return bool(caps.get("avx512_vnni", False)) and not capped


def fast_int_mm(device: torch.device, n: int, k: int, m: int) -> bool:
    """Whether ``torch._int_mm`` runs a fast int8 kernel for an (n, k) x (k, m) product on ``device``.

    CPU: torch 2.13 uses oneDNN's int8 GEMM only where the CPU has AVX512-VNNI (Cascade Lake and later Xeons, AMD
    Zen 4; AMX CPUs have it too) and oneDNN is enabled; elsewhere (AVX2-only CPUs: AMD Zen 2/3, most Intel client
    CPUs; AVX-512 without VNNI: Skylake-SP) it runs a scalar triple loop, exact but measured ~600x slower than
    oneDNN and ~180x slower than the float product (aten/src/ATen/native/LinearAlgebra.cpp ``_int_mm_out_cpu``;
    pytorch/pytorch#136942 moved those CPUs off oneDNN, whose AVX2 int8 kernel saturates int16 sums). Other
    devices: torch's CUDA limits (more than 16 rows, k and m multiples of 8).
    """
    if getattr(torch, "_int_mm", None) is None:  # private in torch 2.13 (tests/test_layering.py ALLOWED_PRIVATE)
        return False
    if device.type == "cpu":
        return cpu_int_mm_uses_vnni() and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    return n > 16 and k % 8 == 0 and m % 8 == 0


class QuantLinear(nn.Module):
    """``y = (x @ W_int8^T) * scale + bias``: int8 weights with one float32 scale per output channel.

    The int8 weights and scales are buffers (saved in the state dict, never trained); the bias is a parameter.
    ``dynamic=True`` (``--quantize int8-dynamic``) also quantises the activations when no gradient is being
    recorded (eval, inference): each input row to int8 with its own scale ``max|x_row| / 127``
    (:func:`quantize_per_row`), an exact int8 x int8 -> int32 product, rescaled by both scales; a row's output does
    not depend on the rows batched with it. It adds the activation rounding to the weight rounding. With gradients
    enabled (fine-tuning) it computes the weight-only product.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dynamic: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.dynamic = in_features, out_features, dynamic
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, dynamic: bool = False) -> QuantLinear:
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dynamic=dynamic)
        q, scale = quantize_per_channel(linear.weight)
        m.weight_int8.copy_(q)
        m.weight_scale.copy_(scale)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach().float())
        return m.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.dynamic and not torch.is_grad_enabled():
            return self._forward_int8_activations(x)
        y = F.linear(x, self.weight_int8.to(x.dtype)) * self.weight_scale.to(x.dtype)  # scale the output, not W
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _forward_int8_activations(self, x: torch.Tensor) -> torch.Tensor:
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # (n, in)
        if rows.dtype != torch.float32:
            rows = rows.float()
        n, k, m = rows.shape[0], self.in_features, self.out_features
        if fast_int_mm(rows.device, n, k, m):
            xq, x_scale = quantize_per_row(rows)  # (n, in) int8, (n, 1); the float temporary is freed on return
            acc = torch._int_mm(xq, self.weight_int8.t())  # (n, out) int32, exact; W^T as a view: oneDNN's fast layout
        else:  # the same integers multiplied in float32: exact while every |sum| < 2^24, i.e. for in <= 1040
            xq, x_scale = quantize_per_row(rows, torch.float32)
            acc = F.linear(xq, self.weight_int8.to(torch.float32))  # (n, out)
        y = acc * x_scale  # (n, out) float32: the one output allocation
        if self.bias is None:
            y.mul_(self.weight_scale)
        else:
            torch.addcmul(self.bias, y, self.weight_scale, out=y)  # bias + y * w_scale, in place
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], m)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int8{' weights and activations' if self.dynamic else ' weights'}"
        )


def quantized_weight_count(model: nn.Module) -> int:
    """Weights held as int8 buffers (not parameters): count them as parameters of the model."""
    return sum(m.weight_int8.numel() for m in model.modules() if isinstance(m, QuantLinear))


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"cannot read safetensors file {path}: {e}") from None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def compression_steps(record: dict | None) -> list[dict]:
    """A run compressed twice records the earlier step under ``previous``: every step, latest first."""
    steps = []
    while isinstance(record, dict):
        steps.append(record)
        record = record.get("previous")
    return steps


def rebuild_compressed(model: nn.Module, record: dict | None, weights: Path) -> nn.Module:
    """Swap in the modules a compressed run's weights need: QuantLinear where the file has ``N.weight_int8``,
    ``nn.Linear`` of the stored shape where structured pruning shrank one. No record: the model as it is."""
    if not record:
        return model
    steps = compression_steps(record)
    structured = any(step.get("structured") for step in steps)
    dynamic = any(step.get("quantize") == "int8-dynamic" for step in steps)
    shapes = safetensors_shapes(weights)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or not name:
            continue
        has_bias = f"{name}.bias" in shapes
        if name + INT8_SUFFIX in shapes:
            out_f, in_f = shapes[name + INT8_SUFFIX]
            new: nn.Module = QuantLinear(in_f, out_f, bias=has_bias, dynamic=dynamic)
        elif (
            structured
            and f"{name}.weight" in shapes
            and (shapes[f"{name}.weight"] != tuple(mod.weight.shape) or has_bias != (mod.bias is not None))
        ):
            out_f, in_f = shapes[f"{name}.weight"]
            new = nn.Linear(in_f, out_f, bias=has_bias)
        else:
            continue
        set_submodule(model, name, new.to(mod.weight.device))
    return model


def keep_zeros(model: nn.Module) -> int:
    """Make fine-tuning keep an unstructured-pruned model's zeros: mask each float Linear weight's gradient.

    With a zero gradient a zero weight stays exactly zero under SGD (momentum, weight decay) and Adam/AdamW
    (moments stay 0, decoupled decay scales 0). Returns the number of layers masked. Needs no state-dict entries.
    """
    n = 0
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and mod.weight.requires_grad:
            mask = mod.weight.detach() != 0
            if bool(mask.all()):
                continue
            holder = {"mask": mask}

            def hook(grad: torch.Tensor, holder=holder) -> torch.Tensor:
                m = holder["mask"]
                if m.device != grad.device:
                    m = holder["mask"] = m.to(grad.device)
                return grad * m

            mod.weight.register_hook(hook)
            n += 1
    return n


def finish_compressed(model: nn.Module, record: dict | None) -> nn.Module:
    """After the weights are loaded: unstructured-pruned runs keep their zeros when fine-tuned."""
    if any(step.get("prune") and not step.get("structured") for step in compression_steps(record)):
        keep_zeros(model)
    return model
