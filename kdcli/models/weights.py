"""Model weights and run-dir files, for every task: read (safetensors, or a plain state_dict with
``torch.load(weights_only=True)``: loading weights never executes code), count, size and hash them."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from torch import nn

from kdcli.infra.errors import UsageError
from kdcli.models.quant import quantized_weight_count

MODEL_JSON = "model.json"  # a run dir's recipe: how to rebuild its model
WEIGHTS = "model.safetensors"


def count_parameters(model: nn.Module) -> int:
    """Parameters, int8-quantised weights (buffers of QuantLinear) included; tied tensors once."""
    return sum(p.numel() for p in model.parameters()) + quantized_weight_count(model)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch.save'd state_dict; never unpickles arbitrary objects."""
    if not path.is_file():
        raise UsageError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(f"cannot read safetensors file {path}: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything but tensors and containers
        raise UsageError(
            f"refusing to load {path}: not a plain tensor state_dict ({unpickling_problem(e)}); "
            "save the weights with safetensors or as a state_dict of tensors"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{path} does not hold a state_dict of tensors")
    return obj


def unpickling_problem(e: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` refused, in a few words (its own message spans a dozen lines)."""
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"it would call {m.group(1)} while loading, and loading never runs code"
    lines = [x.strip() for x in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if x.strip()]
    return f"{e.__class__.__name__}: {lines[0][:160]}" if lines else e.__class__.__name__


def load_weights(model: nn.Module, path: Path) -> None:
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise UsageError(
            f"weights {path.name} do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise UsageError(
                f"weights {path.name}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}"
            )
    model.load_state_dict(state)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, tied tensors counted once."""
    seen: dict[int, int] = {}
    for t in list(model.state_dict().values()):
        seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values())
