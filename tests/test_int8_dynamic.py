"""``--quantize int8-dynamic`` at inference: per-row int8 activations, an exact integer product, both scales.

kdcli/models/quant.py's :func:`quantize_per_row` and ``QuantLinear(dynamic=True)`` are checked against references
that do not share its code: the error bound of rounding to a grid (float64), a float64 hand computation of the
whole layer, the same rows run one at a time, and a run dir written by the forward this one replaced (commit
ebdb538, ``tests/golden/int8-dynamic-ebdb538/``: an ``mlp`` 10-16-12-5 with random weights compressed with
``--quantize int8-dynamic``; ``forward_ebdb538.npz`` holds 24 input rows, each int8 layer's input and output, and
the logits that code computed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from kdcli.models import quant
from kdcli.models.classifiers import load_run_model
from kdcli.models.quant import QuantLinear, fast_int_mm, quantize_per_row

OLD_RUN = Path(__file__).parent / "golden" / "int8-dynamic-ebdb538"
TINY = torch.finfo(torch.float32).tiny


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one thread (conftest)."""


def rows_of_every_magnitude(n: int = 33, k: int = 37, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * torch.logspace(-3, 2, n)[:, None]  # (n, k)
    x[3] = 0.0  # an all-zero row
    x[4] = 1e-38 * torch.randn(k, generator=g)  # below 127 * the smallest normal float32: the scale floor
    x[5, 7] = -40.0  # one outlier sets its row's scale
    return x


def hand_reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """float64: each row to int8 with its own scale max|x_row| / 127, the integer product, both scales, the bias."""
    x64 = x.reshape(-1, layer.in_features).double()
    amax = x64.abs().amax(1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(x64 / scale).clamp(-127, 127)
    y = (q @ layer.weight_int8.double().T) * scale * layer.weight_scale.double()
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y.reshape(*x.shape[:-1], layer.out_features)


def dynamic_layer(k: int = 37, m: int = 19, bias: bool = True, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, m, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 1, m)[:, None])  # output channels of very different scales
    return QuantLinear.from_linear(lin, dynamic=True).eval()


def test_quantize_per_row_is_within_half_a_step_with_no_clamp():
    x = rows_of_every_magnitude()
    before = x.clone()
    q, scale = quantize_per_row(x)
    assert torch.equal(x, before)  # the input is not written to
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.dtype == torch.float32 and scale.shape == (33, 1)
    amax = x.double().abs().amax(1)
    for r in range(x.shape[0]):
        if amax[r] >= 127 * TINY:  # its own scale, and its largest value on +-127
            assert float(scale[r]) == pytest.approx(float(amax[r]) / 127, rel=1e-6)
            assert int(q[r].abs().max()) == 127
        else:  # zero and sub-1.5e-36 rows: the smallest normal float32 as the scale
            assert float(scale[r]) == TINY
    assert int(q.abs().max()) == 127 and not q[3].any()
    err = (q.double() * scale.double() - x.double()).abs()  # (n, k)
    assert bool((err <= scale.double() / 2 * (1 + 1e-6)).all())


def test_dynamic_layer_matches_a_float64_hand_computation():
    x = rows_of_every_magnitude()
    for layer in (dynamic_layer(), dynamic_layer(bias=False, seed=1)):
        with torch.inference_mode():
            got = layer(x)
            got3 = layer(x[:32].reshape(4, 8, 37))  # (b, L, in) like a language model's
            got1 = layer(x[:1])
        want = hand_reference(layer, x)
        assert got.dtype == torch.float32 and got.shape == (33, 19)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got3.double(), want[:32].reshape(4, 8, 19), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got1.double(), want[:1], rtol=1e-5, atol=1e-6)
        b = 0 if layer.bias is None else layer.bias.detach()
        torch.testing.assert_close(got[3], torch.zeros(19) + b)  # an all-zero row gives the bias exactly
    # the activations really are rounded: not the weight-only (int8) product
    layer = dynamic_layer()
    with torch.inference_mode():
        dyn = layer(x)
    weight_only = nn.functional.linear(x, layer.dequantized_weight(), layer.bias.detach())
    assert not torch.allclose(dyn, weight_only, rtol=1e-5, atol=1e-6)


def test_dynamic_layer_keeps_a_half_precision_input_dtype():
    layer = dynamic_layer()
    x = rows_of_every_magnitude()[:8]
    with torch.inference_mode():
        got = layer(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), hand_reference(layer, x.bfloat16().float()), rtol=1e-2, atol=1e-2)


def test_each_row_is_computed_as_if_alone():
    """Per-row scales: a row's output does not depend on the rows batched with it (a per-tensor scale would)."""
    layer = dynamic_layer()
    x = rows_of_every_magnitude()
    with torch.inference_mode():
        batch = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
        reordered = layer(x.flip(0)).flip(0)
    torch.testing.assert_close(alone, batch, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(reordered, batch, rtol=1e-6, atol=1e-7)


def test_the_integer_product_is_exact_at_the_int8_extremes(monkeypatch):
    """Every product +-127 * +-127 over 784 inputs: sums up to 12.6M, exact in int32 and in the float32 fallback
    (< 2^24); a kernel whose int16 pair sums saturate (oneDNN's AVX2 int8 GEMM) is off by up to ~1e5 here."""
    g = torch.Generator().manual_seed(2)
    layer = QuantLinear(784, 32, bias=False, dynamic=True).eval()
    layer.weight_int8.copy_(127 * (torch.randint(0, 2, (32, 784), generator=g) * 2 - 1))  # (32, 784) of +-127
    x = (torch.randint(0, 2, (20, 784), generator=g) * 2 - 1).float()  # +-1: every row quantises to +-127
    x[0] = 1.0  # row 0 meets the all-+127 weight signs head on
    layer.weight_int8[0] = 127
    want = hand_reference(layer, x)
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(quant, "fast_int_mm", lambda *args: False)
        with torch.inference_mode():
            got = layer(x)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert float(want[0, 0]) == 127 * 784  # the largest sum, 127 * 127 * 784, times the row's scale 1 / 127


def test_without_a_fast_int8_kernel_the_same_integers_are_multiplied_in_float(monkeypatch):
    """CPUs without AVX512-VNNI (where torch._int_mm is a scalar loop ~180x slower than float): same logits."""
    layer, x = dynamic_layer(), rows_of_every_magnitude()
    with torch.inference_mode():
        default = layer(x)
        monkeypatch.setattr(quant, "fast_int_mm", lambda *args: False)
        fallback = layer(x)
    assert torch.equal(fallback, default)  # in = 37: the float32 sums are the exact integers, then the same rescale
    torch.testing.assert_close(fallback.double(), hand_reference(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_int_mm_only_where_torch_runs_onednn_with_vnni(monkeypatch):
    cpu = torch.device("cpu")
    with torch.backends.mkldnn.flags(enabled=False):  # torch then runs its scalar loop
        assert not fast_int_mm(cpu, 64, 784, 128)
    for isa in ("avx2", "AVX512_CORE", "sse41"):  # oneDNN kept below VNNI: saturating int16 sums
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        assert not quant.cpu_int_mm_uses_vnni.__wrapped__()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert quant.cpu_int_mm_uses_vnni.__wrapped__() == bool(torch.cpu.get_capabilities().get("avx512_vnni"))
    cuda = torch.device("cuda")  # torch's CUDA limits (no GPU needed to ask)
    assert fast_int_mm(cuda, 17, 784, 128)
    assert not fast_int_mm(cuda, 16, 784, 128) and not fast_int_mm(cuda, 17, 780, 128)


def test_run_dir_written_before_the_faster_forward_loads_and_gives_its_logits():
    with safe_open(str(OLD_RUN / "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert json.loads((OLD_RUN / "model.json").read_text())["compression"]["quantize"] == "int8-dynamic"
    model, _ = load_run_model(OLD_RUN)
    model.eval()
    state = model.state_dict()
    assert set(state) == set(stored)  # the same tensor names: nothing added, nothing renamed
    for key, t in stored.items():
        assert state[key].dtype == t.dtype and torch.equal(state[key], t)
    old = np.load(OLD_RUN / "forward_ebdb538.npz", allow_pickle=False)
    for name in ("net.1", "net.3", "net.5"):  # each layer on the input the old code gave it: bitwise the same int8
        layer = model.get_submodule(name)  # activations, so the outputs differ only in the float rescale's rounding
        assert isinstance(layer, QuantLinear) and layer.dynamic
        with torch.inference_mode():
            got = layer(torch.from_numpy(old[f"{name}.in"]))
        want = torch.from_numpy(old[f"{name}.out"])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    with torch.inference_mode():
        logits = model(torch.from_numpy(old["x"]))
    want = torch.from_numpy(old["logits"])
    # whole model: a hidden value within an ulp of a rounding tie may land on the other int8 step on another CPU
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=2e-2 * float(want.abs().max()))
    assert torch.equal(logits.argmax(1), want.argmax(1))
