"""``path/to/file.py:factory`` specs: the only place kdcli runs user code.

A plugin file is imported as a module and ``factory`` is looked up in it. Configs, caches and checkpoints never
execute code; a plugin is code by design, and only runs because the user named it on the command line or in YAML.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdcli.infra.errors import KdError, UsageError

PLUGIN_COPY = "model_source.py"  # a run dir's own copy of the plugin that built its model


def is_plugin_spec(spec: str) -> bool:
    path, sep, name = spec.rpartition(":")
    return bool(sep) and path.endswith(".py") and bool(name)


def check_model_spec(spec: str, flag: str, builtins) -> None:
    """Refuse (exit 2) a MODEL path that does not exist (``--student runs/typo: not found``) before anything is
    loaded. Only what reads as a path is checked (a separator, a leading ``.`` or ``~``, a file suffix), and of
    ``MODEL@WEIGHTS`` the MODEL part; built-in names, plugins (``file.py:factory``) and weights files have their
    own messages."""
    base = spec.rsplit("@", 1)[0] if "@" in spec and not Path(spec).exists() else spec
    if base in builtins or is_plugin_spec(base):
        return
    p = Path(base)
    looks_like_path = "/" in base or os.sep in base or base.startswith((".", "~")) or bool(p.suffix)
    if looks_like_path and not p.expanduser().exists():
        kinds = f"a built-in ({', '.join(sorted(builtins))}), " if builtins else ""
        raise UsageError(
            f"{flag} {spec}: {base} not found; MODEL is {kinds}path/to/file.py:factory, or an existing run "
            "directory, model directory or file"
        )


def load_factory(spec: str) -> tuple[Callable[..., Any], Path]:
    """Import ``file.py`` and return ``(factory, resolved path)``."""
    path_s, _, name = spec.rpartition(":")
    path = Path(path_s).expanduser().resolve()
    if not path.is_file():
        raise UsageError(f"plugin file not found: {path_s} (from spec {spec!r})")
    mod_name = "kdcli_plugin_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        module = sys.modules[mod_name]
    else:
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise UsageError(f"cannot import plugin file {path}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:  # user code: report it as a usage problem, not a kdcli bug
            del sys.modules[mod_name]
            raise UsageError(f"importing plugin {path.name} failed: {e.__class__.__name__}: {e}") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"plugin {path.name} has no callable named {name!r}")
    return factory, path


def call_factory(factory: Callable[..., Any], spec: str, kwargs: dict, offered: dict) -> Any:
    """Call ``factory(**kwargs)``, adding each ``offered`` keyword (num_classes, input_shape) it accepts."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    call = dict(kwargs)
    for key, value in offered.items():
        if key not in call and (takes_any or key in params):
            call[key] = value
    try:
        return factory(**call)
    except TypeError as e:
        raise UsageError(f"{spec}: bad arguments {sorted(call)}: {e}") from e
    except KdError:
        raise
    except Exception as e:  # a bug in the user's code is a usage problem (exit 2), not a kdcli bug (exit 4)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"{spec} raised {e.__class__.__name__}: {first} (an error in the plugin's own code)") from e


def run_dir_plugin(run_dir: Path, spec: object) -> str:
    """The plugin spec a run dir's ``model.json`` names, as an absolute spec: only ``model_source.py:NAME``, the
    copy of the plugin that train-student put into that run dir. Any other path (absolute, ``../``, another file
    of the run dir, a link leading out of it) is refused (exit 2): a file kdcli reads never makes it run code the
    user did not name on the command line."""
    path, sep, name = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or path != PLUGIN_COPY or not name.isidentifier():
        raise UsageError(
            f"{run_dir}/model.json names plugin code {spec!r}; a run dir may only name its own "
            f"{PLUGIN_COPY} (kdcli never runs code that a file it reads points to)"
        )
    src = Path(run_dir) / PLUGIN_COPY
    if not src.is_file() or src.resolve().parent != Path(run_dir).resolve():
        raise UsageError(
            f"{src} is missing or a link out of the run dir; kdcli only runs the {PLUGIN_COPY} a run dir holds itself"
        )
    return f"{src.resolve()}:{name}"
