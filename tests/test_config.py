"""Strict config: YAML < flags, unknown keys / wrong types / out-of-range values name the key (exit 2)."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.config import CacheConfig, EvalConfig, TrainConfig, resolve
from kdcli.infra.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"train-student": TrainConfig, "cache-teacher": CacheConfig, "eval": EvalConfig}


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_flags_override_yaml(tmp_path):
    p = write(tmp_path, "student: mlp\ndata: a.npz\nout: r\nepochs: 3\nlr: 0.01\nstudent_args: {hidden: [8]}\n")
    cfg = resolve(TrainConfig, p, {"epochs": 5, "student_args": {"dropout": 0.1}})
    assert cfg.epochs == 5 and cfg.lr == 0.01 and cfg.student_args == {"hidden": [8], "dropout": 0.1}
    assert cfg.temperature == 4.0  # dataclass default


def test_int_accepted_for_float_but_not_bool_for_int(tmp_path):
    assert resolve(TrainConfig, None, {"student": "m", "data": "d", "out": "o", "lr": 1}).lr == 1.0
    with pytest.raises(UsageError, match="'epochs' must be an integer"):
        resolve(TrainConfig, write(tmp_path, "epochs: true\n"), {"student": "m", "data": "d", "out": "o"})


@pytest.mark.parametrize(
    "text,match",
    [
        ("epoch: 3\n", "unknown config key 'epoch'.*did you mean 'epochs'"),
        ("alpha: 1.5\n", "'alpha' must be <= 1"),
        ("alpha: -0.1\n", "'alpha' must be >= 0"),
        ("temperature: 0\n", "'temperature' must be >= 0.01"),
        ("temperature: -2\n", "'temperature' must be >= 0.01"),
        ("epochs: 0\n", "'epochs' must be >= 1"),
        ("lr: fast\n", "'lr' must be a number"),
        ("optimizer: lion\n", "'optimizer' must be one of adamw, adam, sgd"),
        ("student_args: [1, 2]\n", "'student_args' must be a mapping"),
        ("epochs: [1\n", "malformed YAML"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_bad_yaml_values_name_the_key(tmp_path, text, match):
    base = {"student": "m", "data": "d", "out": "o"}
    with pytest.raises(UsageError, match=match):
        resolve(TrainConfig, write(tmp_path, text), base)


def test_missing_required_option_is_named():
    with pytest.raises(UsageError, match="missing required option --student"):
        resolve(TrainConfig, None, {"data": "d", "out": "o"})


def test_cli_bad_flag_is_one_line_exit_2(tmp_path):
    r = CliRunner().invoke(
        app, ["train-student", "--student", "mlp", "--data", "d.npz", "--out", str(tmp_path / "o"), "--alpha", "2"]
    )
    assert r.exit_code == 2
    assert "error: config key 'alpha' must be <= 1; got 2.0" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["train-student", "--epochs", "many"])
    assert r.exit_code == 2 and "--epochs" in r.output and "Traceback" not in r.output


def test_every_shipped_example_config_validates():
    """Each YAML under examples/ (recursively) names its command on its first line and passes strict loading."""
    files = sorted(ROOT.glob("examples/**/*.yaml")) + sorted(ROOT.glob("examples/**/*.yml"))
    assert files, "no example configs found"
    for f in files:
        first = f.read_text().splitlines()[0]
        assert first.startswith("# command: "), f"{f} must start with '# command: <kdcli command>'"
        cls = COMMANDS[first.split(":", 1)[1].strip()]
        cfg = resolve(cls, f, {})
        assert isinstance(cfg, cls)
        assert yaml.safe_load(f.read_text())  # non-empty mapping


def test_version_flag():
    from kdcli import __version__

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"kdcli {__version__}"
