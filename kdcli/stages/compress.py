"""compress(cfg): a trained run dir -> a smaller run dir (magnitude pruning, then int8 Linear weights).

The result is an ordinary kdcli run dir: ``kdcli eval --model RUN2`` measures it and ``kdcli train-student
--student RUN2`` fine-tunes it. Its ``model.json`` keeps the source's recipe (spec + args) and adds a
``compression`` record; the loaders (kdcli/models/classifiers.py, kdcli/lm/hf.py) rebuild the compressed modules and
shapes from the safetensors header (kdcli/models/quant.py). Classification and language-model runs go through the same
code; only loading and saving differ.

- ``--prune F``: ``torch.nn.utils.prune.l1_unstructured`` zeroes ``round(F * n)`` weights of each Linear (smallest
  |w|), made permanent with ``prune.remove``. Shapes and bytes on disk stay (dense storage); non-zero counts drop.
  A fine-tuned pruned run keeps its zeros (gradient masks, :func:`kdcli.models.quant.keep_zeros`).
- ``--prune F --structured``: ``prune.ln_structured`` (L2 norm, dim 0) removes ``round(F * units)`` output units
  of every *hidden* Linear: one followed, through element-wise modules (activations, dropout), by another Linear
  in an ``nn.Sequential`` (MLP students, a CNN's head, the transformer's feed-forward blocks). The next Linear
  loses the matching input columns, and the removed units' constant output ``act(bias)`` is folded into its bias,
  so the shrunk model computes exactly what the masked model computes (in eval mode).
- ``--quantize int8``: each Linear -> :class:`~kdcli.models.quant.QuantLinear` (int8 weights, per-output-channel
  float32 scales). Why this and not PyTorch's dynamic quantisation: see kdcli/models/quant.py.

Linear weights tied to another tensor (a language model's head tied to its token embedding) are left alone.
Everything is computed in memory and written to a temporary directory next to ``--out``, reloaded through the
loader and checked, then renamed into place: a failure leaves nothing behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from kdcli import __version__
from kdcli.config import CompressConfig, to_dict, write_yaml
from kdcli.infra import log
from kdcli.infra.atomic import fsync_dir
from kdcli.infra.errors import KdError, UsageError
from kdcli.infra.fmt import TableData, human_bytes
from kdcli.infra.outdir import check_out, make_dir, remove_stale, swap_in
from kdcli.models.classifiers import is_run_dir, load_run_model, save_run_model
from kdcli.models.quant import QuantLinear, set_submodule
from kdcli.models.stats import bytes_on_disk, nonzero_parameters
from kdcli.models.weights import MODEL_JSON, count_parameters

COMPRESS_CONFIG = "compress.yaml"

# Modules that act on each unit independently: a removed unit's output stays a constant through them.
ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Mish,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Dropout,
    nn.AlphaDropout,
    nn.Identity,
)


@dataclass
class ModelSize:
    parameters: int  # int8 weights included; tied tensors once
    nonzero_parameters: int
    bytes_on_disk: int  # the run dir's model files (modelstats.bytes_on_disk)


@dataclass
class CompressSummary:
    source: str
    out: str
    kind: str  # "classify" or "lm"
    quantize: str | None
    prune: float | None
    structured: bool
    quantized_layers: list[str]
    pruned_layers: list[str]
    skipped: list[str]  # "layer: why it was left alone"
    before: ModelSize
    after: ModelSize
    seconds: float
    notes: list[str] = field(default_factory=list)

    def table(self) -> TableData:
        """Parameters, non-zero parameters and bytes, before and after."""
        what = []
        if self.prune is not None:
            what.append(f"pruned {self.prune:g}" + (" structured" if self.structured else ""))
        if self.quantize:
            what.append(self.quantize)

        def ratio(b: int, a: int) -> str:
            return f"{b / a:.2f}x" if a else "-"

        b, a = self.before, self.after
        layers = []
        if self.pruned_layers:
            layers.append(f"{len(self.pruned_layers)} pruned")
        if self.quantized_layers:
            layers.append(f"{len(self.quantized_layers)} int8")
        rows = [
            ["parameters", f"{b.parameters:,}", f"{a.parameters:,}", ratio(b.parameters, a.parameters)],
            [
                "non-zero parameters",
                f"{b.nonzero_parameters:,}",
                f"{a.nonzero_parameters:,}",
                ratio(b.nonzero_parameters, a.nonzero_parameters),
            ],
            [
                "bytes on disk",
                human_bytes(b.bytes_on_disk),
                human_bytes(a.bytes_on_disk),
                ratio(b.bytes_on_disk, a.bytes_on_disk),
            ],
            ["Linear layers", "", ", ".join(layers), ""],
        ]
        if self.skipped:
            rows.append(["left alone", "", "; ".join(self.skipped), ""])
        return TableData(
            title=f"compress {self.source} -> {self.out} ({', '.join(what)}; {self.kind})",
            header=["", "before", "after", "before / after"],
            rows=rows,
            justify=["left", "right", "right", "right"],
        )


# -- choosing layers -----------------------------------------------------------------------------------------------


def linear_layers(model: nn.Module) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """(name, Linear) for every nn.Linear whose weight is its own; ``skipped`` names the tied ones."""
    owners: dict[int, set[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        owners.setdefault(t.data_ptr(), set()).add(key.rpartition(".")[0])
    found, skipped = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            others = owners.get(mod.weight.data_ptr(), set()) - {name}
            if others:
                skipped.append(f"{name}: weight tied to {sorted(others)[0]}")
            else:
                found.append((name, mod))
    return found, skipped


def hidden_pairs(model: nn.Module) -> list[tuple[nn.Sequential, int, int, str]]:
    """(sequential, i, k, name of the i-th) for each Linear i followed by Linear k through element-wise modules."""
    own = {id(m) for _, m in linear_layers(model)[0]}
    pairs = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        mods = list(seq)
        for i, a in enumerate(mods):
            if not isinstance(a, nn.Linear) or id(a) not in own:
                continue
            k = i + 1
            while k < len(mods) and isinstance(mods[k], ELEMENTWISE):
                k += 1
            if k < len(mods) and isinstance(mods[k], nn.Linear) and id(mods[k]) in own:
                pairs.append((seq, i, k, f"{seq_name}.{i}" if seq_name else str(i)))
    return pairs


# -- pruning and quantisation (in place) ---------------------------------------------------------------------------


def prune_unstructured(model: nn.Module, fraction: float) -> list[str]:
    """Zero ``round(fraction * n)`` smallest-|w| entries of every own Linear weight (permanent)."""
    names = []
    for name, lin in linear_layers(model)[0]:
        torch_prune.l1_unstructured(lin, "weight", amount=int(round(fraction * lin.weight.numel())))
        torch_prune.remove(lin, "weight")
        names.append(name)
    return names


@torch.no_grad()
def _shrink(seq: nn.Sequential, i: int, k: int, keep: torch.Tensor) -> None:
    """Drop the rows of ``seq[i]`` outside ``keep`` and the matching columns of ``seq[k]``.

    A removed unit (its weight row is zero: masked) outputs ``act(bias)`` whatever the input; that constant times
    the dropped columns is folded into ``seq[k]``'s bias, so the outputs stay those of the masked model.
    """
    a, b = seq[i], seq[k]
    gone = ~keep
    new_a = nn.Linear(a.in_features, int(keep.sum()), bias=a.bias is not None).to(a.weight.device)
    new_a.weight.copy_(a.weight[keep])
    if a.bias is not None:
        new_a.bias.copy_(a.bias[keep])
    fold = torch.zeros(b.out_features, device=b.weight.device)
    if a.bias is not None and bool(gone.any()):
        const = a.bias[gone]
        for m in list(seq)[i + 1 : k]:  # element-wise modules, in eval mode (dropout = identity)
            const = m(const)
        fold = b.weight[:, gone] @ const
    has_bias = b.bias is not None or bool(fold.ne(0).any())
    new_b = nn.Linear(int(keep.sum()), b.out_features, bias=has_bias).to(b.weight.device)
    new_b.weight.copy_(b.weight[:, keep])
    if has_bias:
        new_b.bias.copy_((b.bias if b.bias is not None else 0) + fold)
    seq[i], seq[k] = new_a, new_b


def prune_structured(model: nn.Module, fraction: float) -> list[str]:
    """Remove ``round(fraction * units)`` lowest-L2-norm output units of every hidden Linear (at least one unit
    stays), and their inputs in the next Linear. The model must be in eval mode. Returns the hidden layers' names.

    Every layer's units are chosen on its own original weights first (``prune.ln_structured``: the masked model),
    then the shapes shrink, so the result computes what the masked model computes.
    """
    pairs = hidden_pairs(model)
    keeps = []
    for seq, i, _, _ in pairs:
        a = seq[i]
        torch_prune.ln_structured(
            a, "weight", amount=min(int(round(fraction * a.out_features)), a.out_features - 1), n=2, dim=0
        )
        keeps.append(a.weight_mask.amax(dim=1) > 0)  # (out,) the rows the mask keeps
        torch_prune.remove(a, "weight")
    for (seq, i, k, _), keep in zip(pairs, keeps):  # rows of seq[i] and columns of seq[k]: order does not matter
        _shrink(seq, i, k, keep)
    return [name for *_, name in pairs]


def quantize_int8(model: nn.Module, dynamic: bool = False) -> list[str]:
    names = []
    for name, lin in linear_layers(model)[0]:
        set_submodule(model, name, QuantLinear.from_linear(lin, dynamic=dynamic))
        names.append(name)
    return names


# -- the stage -----------------------------------------------------------------------------------------------------


def is_compress_output(d: Path) -> bool:
    """A directory ``kdcli compress`` wrote (its model.json and compress.yaml): what --overwrite may replace."""
    return (d / MODEL_JSON).is_file() and (d / COMPRESS_CONFIG).is_file()


def _check_request(cfg: CompressConfig) -> tuple[Path, Path]:
    if cfg.structured and cfg.prune is None:
        raise UsageError("--structured needs --prune FRACTION (the fraction of each hidden layer's units to remove)")
    if cfg.quantize is None and cfg.prune is None:
        raise UsageError("nothing to do: give --quantize int8 and/or --prune FRACTION")
    src, out = Path(cfg.model), Path(cfg.out)
    if not src.exists():
        raise UsageError(f"--model {cfg.model}: not found; give the run dir train-student wrote")
    if not is_run_dir(cfg.model):
        raise UsageError(
            f"--model {cfg.model} is not a kdcli run directory (no model.json); compress the run dir "
            "train-student wrote"
        )
    check_out(out)
    if out.resolve() == src.resolve():
        raise UsageError(f"--out {cfg.out} is the --model run itself; write the compressed run to a new directory")
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise UsageError(
                f"--out {cfg.out} already exists and is not empty; pass --overwrite to replace it, or choose a new one"
            )
        if not is_compress_output(out):
            raise UsageError(
                f"--overwrite: {cfg.out} is not a run kdcli compress wrote; kdcli only replaces its own "
                "outputs: choose another --out"
            )
    return src, out


def _load(src: Path):
    from kdcli.lm.hf import is_lm_run_dir

    if is_lm_run_dir(str(src)):
        from kdcli.lm.hf import load_lm_run, read_lm_meta

        if read_lm_meta(src).get("layout") == "adapter":
            method = (read_lm_meta(src).get("peft") or {}).get("method", "peft")
            raise UsageError(
                f"--model {src} holds a {method} adapter, not a whole model; compress shrinks whole "
                "models: train LoRA with --peft-save merged and compress that run"
            )

        return "lm", *load_lm_run(src)
    return "classify", *load_run_model(src)


def _save(kind: str, src: Path, dest: Path, model: nn.Module, info) -> None:
    if kind == "lm":
        from kdcli.lm.hf import read_lm_meta, save_lm_run
        from kdcli.lm.text import load_tokenizer

        meta = read_lm_meta(src)
        save_lm_run(
            dest,
            model,
            info,
            tokenizer=load_tokenizer(str(src)),
            tokenizer_id=meta.get("tokenizer"),
            text=meta.get("text"),
        )
    else:
        save_run_model(dest, model, info)


def _record(cfg: CompressConfig, src: Path, info, quantized: list[str], pruned: list[str]) -> dict:
    """model.json's ``compression``: this step; an earlier one (a compressed run compressed again) under
    ``previous`` (the loaders read every step: kdcli.models.quant.compression_steps)."""
    method = {}
    if cfg.prune is not None:
        method["prune"] = (
            "ln_structured n=2 dim=0 per hidden Linear; removed units' act(bias) folded into the next bias"
            if cfg.structured
            else "l1_unstructured per Linear"
        )
    if cfg.quantize:
        method["quantize"] = "symmetric int8 per output channel, scale = max|w_row|/127 (QuantLinear)"
        if cfg.quantize == "int8-dynamic":
            method["activations"] = "int8 per row at run time, scale = max|x_row|/127, torch._int_mm (no grad only)"
    rec = {
        "quantize": cfg.quantize,
        "prune": cfg.prune,
        "structured": bool(cfg.structured),
        "source": str(src.resolve()),
        "source_sha256": info.weights_sha256,
        "quantized_layers": quantized,
        "pruned_layers": pruned,
        "method": method,
        "kdcli_version": __version__,
    }
    if info.compression:
        rec["previous"] = info.compression
    return rec


def compress(cfg: CompressConfig) -> CompressSummary:
    t0 = time.perf_counter()
    src, out = _check_request(cfg)
    kind, model, info = _load(src)
    model.eval()
    before = ModelSize(count_parameters(model), nonzero_parameters(model), bytes_on_disk(src))
    own, skipped = linear_layers(model)
    what = f"--quantize {cfg.quantize}" if cfg.quantize else "--prune"
    if not own:
        already = sum(isinstance(m, QuantLinear) for m in model.modules())
        if already:
            why = f"its {already} Linear layers are already int8" + ("; prune before quantising" if cfg.prune else "")
        elif skipped:
            why = f"it has no nn.Linear layer of its own ({skipped[0]})"
        else:
            why = "it has no nn.Linear layer"
        raise UsageError(f"{what}: nothing to compress in {cfg.model}: {why}")
    pruned: list[str] = []
    if cfg.prune is not None and cfg.structured:
        pruned = prune_structured(model, cfg.prune)
        if not pruned:
            raise UsageError(
                f"--structured: {cfg.model} has no hidden Linear (a Linear followed, through "
                "activations/dropout, by another Linear in an nn.Sequential) whose units can be "
                "removed; drop --structured to prune weights without changing shapes"
            )
    elif cfg.prune is not None:
        pruned = prune_unstructured(model, cfg.prune)
    quantized = quantize_int8(model, dynamic=cfg.quantize == "int8-dynamic") if cfg.quantize else []
    info.compression = _record(cfg, src, info, quantized, pruned)
    info.num_parameters = count_parameters(model)
    after_params, after_nonzero = info.num_parameters, nonzero_parameters(model)

    out_parent = out.resolve().parent
    make_dir(out_parent)
    remove_stale(out)  # hidden .partial directories of a killed compress
    tmp = out_parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
    tmp.mkdir()  # (mkdtemp would make it 0700)
    try:
        _save(kind, src, tmp, model, info)
        write_yaml(to_dict(cfg), tmp / COMPRESS_CONFIG)
        _check_reload(kind, tmp, model)
        if out.exists() and not any(out.iterdir()):
            out.rmdir()  # an empty --out: the new run takes its place
        if out.exists():  # --overwrite of an earlier compress run: swapped in one step, then removed
            swap_in(tmp, out)
        else:
            try:
                os.replace(tmp, out)
            except OSError as e:
                raise UsageError(
                    f"--out {cfg.out} could not be created ({e.strerror}): did something write to it meanwhile?"
                ) from None
            fsync_dir(out_parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    notes = []
    if cfg.prune is not None and not cfg.structured:
        notes.append(
            "unstructured pruning keeps every shape: bytes on disk only drop with --quantize or "
            "--structured (safetensors stores dense tensors)"
        )
    if quantized:
        notes.append(
            "fine-tuning this run (train-student --student) trains its float parameters only (biases, "
            "norms, embeddings); to fine-tune all weights, fine-tune the pruned run, then quantise"
        )
    for n in notes:
        log.info(n)
    after = ModelSize(after_params, after_nonzero, bytes_on_disk(out))
    return CompressSummary(
        source=str(src),
        out=str(out),
        kind=kind,
        quantize=cfg.quantize,
        prune=cfg.prune,
        structured=bool(cfg.structured),
        quantized_layers=quantized,
        pruned_layers=pruned,
        skipped=skipped,
        before=before,
        after=after,
        seconds=time.perf_counter() - t0,
        notes=notes,
    )


def _check_reload(kind: str, run_dir: Path, model: nn.Module) -> None:
    """The written run, rebuilt by the loader eval and train-student use, holds exactly the compressed weights."""
    _, loaded, _ = _load(run_dir)
    want, got = model.state_dict(), loaded.state_dict()
    bad = sorted(set(want) ^ set(got)) or [
        k for k in want if want[k].shape != got[k].shape or not torch.equal(want[k].cpu(), got[k].cpu())
    ]
    if bad:
        raise KdError(f"the compressed run does not reload as written (first difference: {bad[0]}); please report it")
