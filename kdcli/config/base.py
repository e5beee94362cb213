"""How a config field is declared, read (YAML, flags), checked and resolved; which task uses it.

A field is declared with :func:`opt`: its default, help text, bounds, choices, the ``--help`` panel it is listed
in and the tasks that use it. :func:`resolve` builds a validated config from defaults < the ``--config`` YAML
file < the flags; an unknown key, a wrong type or an out-of-range value is a
:class:`~kdcli.infra.errors.UsageError` (exit 2) naming the key. :func:`check_task_options` refuses, with one
generic message, an option the run's task does not use.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from kdcli.infra.errors import UsageError

REQUIRED = dataclasses.MISSING


CLASSIFICATION = "classification"
LANGUAGE_MODEL = "language model"
TASKS = (CLASSIFICATION, LANGUAGE_MODEL)
"""The tasks a run can be (kdcli.tasks.pick_task decides from DATA): the names options declare in ``tasks``."""
PANELS = ("Data", "Teacher", "Student", "Optimisation", "Cache", "Language models", "Generation", "Output")
"""The ``--help`` panels, in the order they are listed."""


def opt(
    default: Any = REQUIRED,
    help: str = "",
    *,
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    repeat: bool = False,
    short: str | None = None,
    panel: str = "Output",
    tasks: tuple[str, ...] = TASKS,
) -> Any:
    """A config field with its help text and bounds (``min``/``max`` inclusive, ``gt``/``lt`` exclusive), the
    ``--help`` panel it is listed in and the tasks that use it (the others refuse it: :func:`check_task_options`)."""
    if panel not in PANELS:
        raise ValueError(f"unknown help panel {panel!r}")
    meta = dict(
        help=help,
        min=min,
        max=max,
        gt=gt,
        lt=lt,
        choices=choices,
        repeat=repeat,
        short=short,
        panel=panel,
        tasks=tuple(tasks),
    )
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


DEVICES = ("auto", "cpu", "cuda")
TEMPERATURE_MIN, TEMPERATURE_MAX = 0.01, 1000.0
"""Temperatures kdcli accepts (loss, eval and the ones a cache stores). Outside it the tempered log-probs and
their statistics leave float32/float16 (logp / T overflows, T^2 reaches inf) and nothing useful is left to learn."""


def cache_list(value) -> list:
    """``--cache`` as a list: one directory (the Python API, older configs) is a list of one, None an empty one."""
    if isinstance(value, str):
        return [value]
    return [] if value is None else value


def fields_of(cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


_ANNOTATION_NAMES = {
    "dict": dict,
    "list": list,
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "None": type(None),
}


def _parse_annotation(text: str) -> Any:
    """``"int | None"`` -> ``int | None`` by table lookup (never ``eval``): config fields use these names only."""
    parts = []
    for name in text.split("|"):
        name = name.strip().split("[", 1)[0]  # list[str] -> list
        if name not in _ANNOTATION_NAMES:
            raise TypeError(f"config field annotation {text!r}: {name!r} is not one of {sorted(_ANNOTATION_NAMES)}")
        parts.append(_ANNOTATION_NAMES[name])
    return parts[0] if len(parts) == 1 else typing.Union[tuple(parts)]  # noqa: UP007 - built at run time


def _base_type(tp: Any) -> tuple[type, bool]:
    """(underlying type, optional?) for annotations such as ``int | None``."""
    if isinstance(tp, str):
        tp = _parse_annotation(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def field_type(f: dataclasses.Field) -> tuple[type, bool]:
    return _base_type(f.type)


def _type_name(tp: type) -> str:
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        dict: "a mapping",
        list: "a list",
    }[tp]


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    tp, optional = field_type(f)
    if value is None:
        if optional:
            return None
        if tp is list and f.default_factory is not REQUIRED:  # type: ignore[misc]
            return []  # a repeatable option given as null: none (what a label-only run's config.yaml records)
        raise UsageError(f"config key '{key}' must be {_type_name(tp)}, got null")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"config key '{key}' must be a finite number; got {value!r}")
    if tp is list and isinstance(value, str):
        value = [value]
    ok = isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))
    if not ok:
        raise UsageError(f"config key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is list and not all(isinstance(v, str) for v in value):
        raise UsageError(f"config key '{key}' must be a list of strings")
    if tp is dict and not all(isinstance(k, str) for k in value):
        raise UsageError(f"config key '{key}' must be a mapping with string keys")
    if tp is dict:
        bad = nonfinite_value(value)
        if bad is not None:
            raise UsageError(
                f"config key '{key}': {bad[0]} is {bad[1]!r}; model and adapter arguments must be finite numbers"
            )
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise UsageError(f"config key '{key}' must be one of {', '.join(m['choices'])}; got {value!r}")
    bounds = [
        ("min", lambda v, b: v >= b, ">="),
        ("max", lambda v, b: v <= b, "<="),
        ("gt", lambda v, b: v > b, ">"),
        ("lt", lambda v, b: v < b, "<"),
    ]
    for name, test, sym in bounds:
        b = m.get(name)
        if b is not None and not test(value, b):
            raise UsageError(f"config key '{key}' must be {sym} {b:g}; got {value!r}")
    return value


def nonfinite_value(value: Any, where: str = "") -> tuple[str, Any] | None:
    """(path, value) of the first NaN/inf number in a (nested) YAML value: a float, or a string that reads as one
    ("nan", "inf", "-Infinity"), which a library would turn into a float (``--peft-arg lora_alpha=nan``)."""
    if isinstance(value, dict):
        for k, v in value.items():
            found = nonfinite_value(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = nonfinite_value(v, f"{where}[{i}]")
            if found:
                return found
    elif isinstance(value, float) and not math.isfinite(value):
        return where, value
    elif isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return where, value
    return None


class _OneValuePerKey(yaml.SafeLoader):
    """``yaml.SafeLoader`` (never executes code) that refuses a key given twice in one mapping, which PyYAML would
    silently resolve to the last -- the YAML side of the CLI's no-last-wins rule (kdcli/cli.py)."""

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else []:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: explicit keys override merged ones
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                again = key in first
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if again:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} given twice (first at line {first[key] + 1}); give it once",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    """Parse a YAML mapping with ``yaml.SafeLoader`` (never executes code); a key given twice is an error."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise UsageError(f"config file not found: {p}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config file {p}: {e.__class__.__name__}") from None
    try:
        data = yaml.load(text, Loader=_OneValuePerKey)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        loc = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise UsageError(f"malformed YAML in {p}{loc}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {p} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def parse_kv(items: list[str], key: str) -> dict:
    """``["hidden=[800,800]", "dropout=0.5"]`` -> ``{"hidden": [800, 800], "dropout": 0.5}`` (YAML values)."""
    out: dict = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--{key.replace('_', '-')} expects KEY=VALUE, got {item!r}")
        if name.strip() in out:  # --student-arg hidden=[8] --student-arg hidden=[16]: no silent last-wins
            raise UsageError(f"--{key.replace('_', '-')} {name.strip()}=... given twice; give each KEY once")
        try:
            out[name.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise UsageError(f"--{key.replace('_', '-')} {item!r}: the value is not valid YAML") from None
    return out


def parse_temperatures(value: Any, key: str = "temperatures") -> tuple[float, ...]:
    """``"1,2,4"``, ``4``, ``[1, 2, 4]`` or ``["1", "2"]`` -> sorted distinct temperatures, 1 always included (a
    sparse cache is exact at T = 1 for free). A value that is not a positive, finite number is a UsageError naming
    ``key``. For ``cache-teacher --temperatures`` (and ``--sampler-temperatures``)."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    out = {1.0}
    for item in items:
        try:
            t = float(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError):
            t = float("nan")
        if isinstance(item, bool) or not (t > 0 and t != float("inf")):
            raise UsageError(f"config key '{key}' must list positive temperatures, e.g. 1,2,4; got {item!r}")
        if not TEMPERATURE_MIN <= t <= TEMPERATURE_MAX:
            raise UsageError(
                f"config key '{key}': temperature {t:g} is outside [{TEMPERATURE_MIN:g}, "
                f"{TEMPERATURE_MAX:g}], where the stored statistics stay finite; e.g. 1,2,4"
            )
        out.add(t)
    return tuple(sorted(out))


def resolve(cls: type, config_path: str | Path | None = None, overrides: dict | None = None):
    """Build a validated ``cls`` from defaults < YAML file < flag overrides (``None`` means "not given")."""
    known = {f.name: f for f in fields_of(cls)}
    merged: dict[str, Any] = {}
    if config_path is not None:
        for key, value in read_yaml(config_path).items():
            if key not in known:
                close = difflib.get_close_matches(str(key), list(known), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise UsageError(f"unknown config key '{key}' in {config_path}{hint}")
            merged[key] = value
    for key, value in (overrides or {}).items():
        if key not in known:
            raise UsageError(f"unknown option '{key}'")
        if value is None:
            continue
        if known[key].type in ("dict", dict) and isinstance(merged.get(key), dict):
            value = {**merged[key], **value}  # flags add to / override the YAML mapping key by key
        merged[key] = value
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        if name in merged:
            kwargs[name] = _coerce(name, merged[name], f)
        elif f.default is REQUIRED and f.default_factory is REQUIRED:  # type: ignore[misc]
            raise UsageError(f"missing required option --{name.replace('_', '-')} (or '{name}:' in --config)")
    cfg = cls(**kwargs)
    cfg.given_keys = frozenset(merged)  # not a field: which options the user set (flags or YAML), see given()
    return cfg


def given(cfg: Any) -> frozenset[str]:
    """The options of ``cfg`` the user set on the command line or in --config, so that an option whose value would
    be ignored can be refused instead of silently dropped. A config built in Python (not by :func:`resolve`): the
    fields whose value differs from their default."""
    keys = getattr(cfg, "given_keys", None)
    if keys is not None:
        return keys
    out = set()
    for f in fields_of(type(cfg)):
        default = (
            f.default
            if f.default is not REQUIRED
            else (f.default_factory() if f.default_factory is not REQUIRED else REQUIRED)
        )  # type: ignore[misc]
        if default is not REQUIRED and getattr(cfg, f.name) != default:
            out.add(f.name)
    return frozenset(out)


def flag_name(name: str) -> str:
    """``student_args`` -> ``--student-arg`` (repeatable KEY=VALUE), ``batch_size`` -> ``--batch-size``."""
    if name.endswith("_args"):
        name = name[: -len("s")]
    return "--" + name.replace("_", "-")


def check_task_options(cfg: Any, task: str, data: str) -> None:
    """Refuse (exit 2, one line naming the option and the task) an option the user set that ``task`` does not use:
    one generic check instead of a guard per option and per task."""
    for f in fields_of(type(cfg)):
        if f.name in given(cfg) and task not in f.metadata.get("tasks", TASKS):
            users = " and ".join(f.metadata["tasks"])
            raise UsageError(
                f"{flag_name(f.name)} is for {users} runs; DATA {data} makes this a {task} run, which "
                "would ignore it: drop it"
            )


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def write_yaml(data: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
