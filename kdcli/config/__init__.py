"""Configs: every command's options, from the dataclass default, the ``--config`` YAML file and the flags.

- :mod:`kdcli.config.base`     -- how a field is declared (:func:`opt`: help, bounds, panel, tasks), read and checked
  (:func:`resolve`), and the one check that refuses an option the run's task does not use
- :mod:`kdcli.config.commands` -- the commands' configs, composed from shared parts
"""

from kdcli.config.base import (
    CLASSIFICATION,
    DEVICES,
    LANGUAGE_MODEL,
    PANELS,
    TASKS,
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
    cache_list,
    check_task_options,
    field_type,
    fields_of,
    flag_name,
    given,
    nonfinite_value,
    opt,
    parse_kv,
    parse_temperatures,
    read_yaml,
    resolve,
    to_dict,
    write_yaml,
)
from kdcli.config.commands import CacheConfig, CompressConfig, EvalConfig, TrainConfig

__all__ = [
    "CLASSIFICATION",
    "DEVICES",
    "LANGUAGE_MODEL",
    "PANELS",
    "TASKS",
    "TEMPERATURE_MAX",
    "TEMPERATURE_MIN",
    "CacheConfig",
    "CompressConfig",
    "EvalConfig",
    "TrainConfig",
    "cache_list",
    "check_task_options",
    "field_type",
    "fields_of",
    "flag_name",
    "given",
    "nonfinite_value",
    "opt",
    "parse_kv",
    "parse_temperatures",
    "read_yaml",
    "resolve",
    "to_dict",
    "write_yaml",
]
