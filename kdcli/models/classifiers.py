"""MODEL specs -> ``nn.Module``.

- built-in architectures by name: ``mlp``, ``cnn`` (keyword arguments from ``--student-arg``/``--teacher-arg``)
- ``path/to/file.py:factory``: a callable returning an ``nn.Module`` (it receives ``num_classes`` and
  ``input_shape`` when its signature accepts them)
- a kdcli run directory (``model.json`` + ``model.safetensors``): rebuilt with no other flags

Weights are read from safetensors or from a ``torch.save``-d ``state_dict`` with ``weights_only=True``: loading
weights never executes code.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcli.infra.errors import UsageError
from kdcli.models.plugins import PLUGIN_COPY, call_factory, is_plugin_spec, load_factory, run_dir_plugin
from kdcli.models.quant import finish_compressed, rebuild_compressed
from kdcli.models.weights import MODEL_JSON, WEIGHTS, count_parameters, load_weights, sha256_file


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] * len(hidden) -> Linear."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: list[int] | int = (256,),
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ):
        super().__init__()
        hidden = [hidden] if isinstance(hidden, int) else list(hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout:
            layers.append(nn.Dropout(input_dropout))
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, *input_shape) -> (b, num_classes)
        return self.net(x)


class CNN(nn.Module):
    """[Conv3x3 -> ReLU -> MaxPool2] * len(channels) -> Flatten -> Linear(hidden) -> ReLU -> Dropout -> Linear."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        channels: list[int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(input_shape) == 2:
            input_shape = (1, *input_shape)
        if len(input_shape) != 3:
            raise UsageError(f"cnn needs image inputs (channels, height, width); got input shape {input_shape}")
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for ch in channels:
            layers += [nn.Conv2d(c, ch, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = ch, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )
        self._image_shape = input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, c, h, w) -> (b, num_classes)
        x = x.reshape(x.shape[0], *self._image_shape)
        return self.head(self.features(x))


BUILTINS = {"mlp": MLP, "cnn": CNN}


@dataclass
class ModelInfo:
    """How a model was built: enough to rebuild it and to identify it in a cache manifest."""

    spec: str
    args: dict = field(default_factory=dict)
    num_classes: int = 0
    input_shape: list[int] = field(default_factory=list)
    weights_sha256: str | None = None
    num_parameters: int = 0
    source: dict | None = None  # a model loaded from a run dir: that run's model.json (its recipe)
    compression: dict | None = None  # kdcli compress's record (kdcli/models/quant.py), carried into later runs

    def identity(self) -> dict:
        return {
            "spec": self.spec,
            "args": self.args,
            "weights_sha256": self.weights_sha256,
            "num_parameters": self.num_parameters,
        }


def is_run_dir(spec: str) -> bool:
    return (Path(spec) / MODEL_JSON).is_file()


def _construct(spec: str, args: dict, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    if spec in BUILTINS:
        try:
            return BUILTINS[spec](tuple(input_shape), num_classes, **args)
        except TypeError as e:
            raise UsageError(f"bad arguments for built-in model {spec!r}: {e}") from None
    if is_plugin_spec(spec):
        factory, _ = load_factory(spec)
        model = call_factory(factory, spec, args, {"num_classes": num_classes, "input_shape": tuple(input_shape)})
        if not isinstance(model, nn.Module):
            raise UsageError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    raise UsageError(
        f"unknown MODEL {spec!r}; use a built-in ({', '.join(BUILTINS)}), path/to/file.py:factory "
        "or a kdcli run directory"
    )


def build_model(
    spec: str, args: dict | None, *, num_classes: int, input_shape: tuple[int, ...], weights: str | None = None
) -> tuple[nn.Module, ModelInfo]:
    """A MODEL spec (built-in, plugin or run dir) -> (module, info). Run dirs carry their own arguments."""
    args = dict(args or {})
    if is_run_dir(spec):
        if args:
            raise UsageError(f"{spec} is a kdcli run directory; it rebuilds itself, drop the model arguments")
        model, info = load_run_model(Path(spec), weights=weights)
        if info.num_classes != num_classes:
            raise UsageError(f"model {spec} outputs {info.num_classes} classes but the data has {num_classes}")
        return model, info
    torch_model = _construct(spec, args, num_classes, input_shape)
    info = ModelInfo(spec=spec, args=args, num_classes=num_classes, input_shape=list(input_shape))
    if weights:
        load_weights(torch_model, Path(weights))
        info.weights_sha256 = sha256_file(Path(weights))
    info.num_parameters = count_parameters(torch_model)
    check_output_width(torch_model, spec, num_classes, input_shape)
    return torch_model, info


def check_output_width(model: nn.Module, spec: str, num_classes: int, input_shape: tuple[int, ...]) -> None:
    """Run one dummy row to make sure the model maps input_shape -> num_classes logits."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            device = next(model.parameters(), torch.empty(0)).device
            out = model(torch.zeros((2, *input_shape), device=device))
    except Exception as e:
        raise UsageError(
            f"model {spec} cannot take inputs of shape {tuple(input_shape)}: "
            f"{e.__class__.__name__}: {str(e).splitlines()[0][:200]}"
        ) from None
    finally:
        model.train(was_training)
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise UsageError(
            f"model {spec} outputs shape {tuple(out.shape[1:])} per row but the data has {num_classes} classes"
        )


def save_run_model(run_dir: Path, model: nn.Module, info: ModelInfo) -> None:
    """Write model.safetensors + model.json (and a copy of a plugin's source) into ``run_dir``."""
    from safetensors.torch import save as safetensors_bytes

    from kdcli.infra.atomic import atomic_write_bytes, replace_atomically

    spec, args = info.spec, info.args
    if info.source is not None:  # started from a run dir (fine-tuning, compress): keep that run's recipe
        spec, args = info.source["spec"], info.source.get("args", {})
        path, _, name = spec.rpartition(":")
        if is_plugin_spec(spec) and not Path(path).is_absolute():
            spec = f"{Path(info.spec) / path}:{name}"  # its model_source.py, relative to that run dir
    if is_plugin_spec(spec):
        _, src = load_factory(spec)
        name = spec.rpartition(":")[2]
        if src.resolve() != (run_dir / PLUGIN_COPY).resolve():
            shutil.copyfile(src, run_dir / (PLUGIN_COPY + ".partial"))
            replace_atomically(run_dir / (PLUGIN_COPY + ".partial"), run_dir / PLUGIN_COPY)
        spec = f"{PLUGIN_COPY}:{name}"  # relative to the run dir: the run is self-contained
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(run_dir / WEIGHTS, safetensors_bytes(state))  # in memory first: disk errors are OSErrors
    meta = {
        "spec": spec,
        "args": args,
        "num_classes": info.num_classes,
        "input_shape": info.input_shape,
        "num_parameters": info.num_parameters,
    }
    if info.compression:
        meta["compression"] = info.compression
    atomic_write_bytes(run_dir / MODEL_JSON, json.dumps(meta, indent=2).encode())


def load_run_model(run_dir: Path | str, weights: str | None = None) -> tuple[nn.Module, ModelInfo]:
    run_dir = Path(run_dir)
    try:
        meta: dict[str, Any] = json.loads((run_dir / MODEL_JSON).read_text())
        spec, args = meta["spec"], meta.get("args", {})
        num_classes, input_shape = int(meta["num_classes"]), tuple(meta["input_shape"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{run_dir}/{MODEL_JSON} is not a valid kdcli model description: {e}") from None
    if is_plugin_spec(spec):  # a run of a file.py student carries its own copy of the plugin, and only that runs
        spec = run_dir_plugin(run_dir, spec)
    elif spec not in BUILTINS:
        raise UsageError(
            f"{run_dir}/{MODEL_JSON} names model {spec!r}, which is neither a built-in "
            f"({', '.join(BUILTINS)}) nor the run's own {PLUGIN_COPY}"
        )
    model = _construct(spec, args, num_classes, input_shape)
    wpath = Path(weights) if weights else run_dir / WEIGHTS
    if not wpath.is_file():
        raise UsageError(f"{run_dir} has no {WEIGHTS}: the run did not finish (resume it with --resume)")
    compression = meta.get("compression")
    rebuild_compressed(model, compression, wpath)  # int8 modules and pruned shapes, read from the weights file
    load_weights(model, wpath)
    finish_compressed(model, compression)
    info = ModelInfo(
        spec=str(run_dir),
        args={},
        num_classes=num_classes,
        input_shape=list(input_shape),
        weights_sha256=sha256_file(wpath),
        num_parameters=count_parameters(model),
        source=meta,
        compression=compression,
    )
    return model, info
