"""No silent last-wins: an option that takes one value, given twice, is an error (exit 2, one line naming it) on
every command; options that take several values (list and KEY=VALUE fields: --model, --student-arg, ...) repeat.
The same for keys: a YAML --config key, or a KEY of a KEY=VALUE option, given twice is an error too.

Which options repeat is read from the config dataclasses (the schema: list and dict fields), not from click, and
every option click knows is checked against it, so a new option is covered the day it is added. More cases, with
the workspace hashed before and after: tests/test_bad_inputs.py ("repeated ...").
"""

from __future__ import annotations

import re

import pytest
import typer
from conftest import run_cli
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.config import CacheConfig, EvalConfig, TrainConfig, field_type, fields_of, read_yaml

runner = CliRunner()
CONFIGS = {"cache-teacher": CacheConfig, "train-student": TrainConfig, "eval": EvalConfig}


def click_command(path: str):
    cmd = typer.main.get_command(app)
    for name in path.split():
        cmd = cmd.commands[name]
    return cmd


def schema_repeatable(command: str) -> set[str]:
    """Flags of list and dict fields: the ones that take several values (``student_args`` -> --student-arg)."""
    if command not in CONFIGS:
        return set()
    out = set()
    for f in fields_of(CONFIGS[command]):
        if field_type(f)[0] in (list, dict):
            name = f.name[:-1] if f.name.endswith("_args") else f.name
            out.add("--" + name.replace("_", "-"))
    return out


def options(command: str) -> list[tuple[str, bool]]:
    """(first flag, is a switch) of every option of ``command`` but --help."""
    return [
        (p.opts[0], bool(p.is_flag))
        for p in click_command(command).params
        if p.param_type_name == "option" and p.opts[0] != "--help"
    ]


SINGLE = [
    (c, flag, switch)
    for c in [*CONFIGS, "cache verify"]
    for flag, switch in options(c)
    if flag not in schema_repeatable(c)
]


def test_the_schema_and_the_cli_agree_on_what_repeats():
    for command in [*CONFIGS, "cache verify"]:
        multiple = {p.opts[0] for p in click_command(command).params if getattr(p, "multiple", False)}
        assert multiple == schema_repeatable(command), command
    assert schema_repeatable("eval") >= {"--model", "--class-bias"}
    assert schema_repeatable("train-student") >= {"--student-arg", "--cache"}  # --cache: fused teachers
    assert schema_repeatable("eval") >= {"--cache"}
    assert ("train-student", "--cache-weights", False) in SINGLE and ("eval", "--combine", False) in SINGLE
    assert ("eval", "--json", True) in SINGLE and ("cache verify", "--data", False) in SINGLE
    assert len(SINGLE) > 60  # every option of four commands, not a handful


@pytest.mark.parametrize("command, flag, switch", SINGLE, ids=[f"{c} {f}" for c, f, _ in SINGLE])
def test_a_one_value_option_given_twice_is_refused(command, flag, switch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    twice = [flag, flag] if switch else [flag, "1", flag, "2"]
    r = runner.invoke(app, [*command.split(), *(["cachedir"] if command == "cache verify" else []), *twice])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.stderr
    what = "is a switch" if switch else "takes one value, and kdcli does not silently keep the last"
    assert re.fullmatch(
        rf"error: {re.escape(flag)}(/--no-[\w-]+)? given 2 times; it {what}: give it once "
        rf"\(see 'kdcli {command} --help'\)",
        lines[0],
    ), lines[0]
    assert r.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train-student", "--alpha", "0.1", "--alpha", "0.2", "--alpha", "0.3"], "--alpha given 3 times"),
        (["eval", "--data=a", "--model", "m", "--data", "b"], "--data given 2 times"),  # --opt=value counts
        (
            ["cache-teacher", "--teacher", "t", "--data", "d", "--out", "o", "--top-k", "5", "--top-k", "5"],
            "--top-k given 2 times",
        ),  # the same value twice too: one value means once
        (["train-student", "--config", "a.yaml", "--config", "b.yaml"], "--config given 2 times"),
        (
            ["train-student", "--data", "a", "--student-arg", "x=1", "--data", "b", "--lr", "1", "--lr", "2"],
            "--data given 2 times",
        ),  # the first repeated option, in the order given
    ],
)
def test_repetition_is_reported_before_anything_else(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, argv)
    assert r.exit_code == 2 and re.match(rf"error: {re.escape(message)}; ", r.stderr), r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        # several values: they go through to the config (and fail later on the missing data, not on repetition)
        (
            [
                "train-student",
                "--student",
                "mlp",
                "--student-arg",
                "hidden=[8]",
                "--student-arg",
                "dropout=0.1",
                "--data",
                "nope.npz",
                "--out",
                "o",
            ],
            "data file not found",
        ),
        (
            [
                "eval",
                "--model",
                "a",
                "--model",
                "b",
                "--class-bias",
                "0=1",
                "--class-bias",
                "1=2",
                "--data",
                "nope.npz",
            ],
            "data file not found|run directory|not found",
        ),
        # a token that looks like an option but is a value: --out's value is "--cache", so --cache is given once
        (
            ["train-student", "--out", "--cache", "--cache", "c", "--data", "nope.npz"],
            "missing required option --student",
        ),
    ],
)
def test_what_is_not_a_repetition_goes_through(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, argv)
    assert r.exit_code == 2 and "given 2 times" not in r.stderr, r.stderr
    assert re.search(message, r.stderr), r.stderr


def test_help_wins_over_a_repetition():
    r = runner.invoke(app, ["train-student", "--data", "a", "--data", "b", "--help"])
    assert r.exit_code == 0 and r.stdout.lstrip().startswith("Usage: kdcli train-student"), r.output


@pytest.mark.parametrize(
    "argv",
    [
        ["train-student", "--student", "mlp", "--data", "d.npz", "--out", "run", "--cache", "a", "--cache", "b"],
        ["eval", "--model", "run", "--data", "d.npz", "--cache", "a", "--cache", "b"],
    ],
)
def test_a_real_process_uses_every_cache_given(argv, tmp_path):
    """--cache takes several values (fused teachers, tests/test_fusion.py): every one is opened, the first
    first, so a missing first cache is the error, never silently dropped for the last one."""
    p = run_cli(*argv, cwd=tmp_path)
    assert p.returncode == 3 and p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr.splitlines() == ["error: cache directory not found: a"]
    assert list(tmp_path.iterdir()) == []


# -- the same rule for keys: in a YAML --config and inside a repeatable KEY=VALUE option --------------------------


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("epochs: 1\nlr: 0.1\nepochs: 2\n", "at line 3, column 1: key 'epochs' given twice (first at line 1)"),
        (
            "student_args:\n  hidden: [8]\n  hidden: [16]\n",
            "at line 3, column 3: key 'hidden' given twice (first at line 2)",
        ),
        ("{epochs: 1, epochs: 2}\n", "at line 1, column 13: key 'epochs' given twice (first at line 1)"),
    ],
)
def test_a_yaml_key_given_twice_is_refused(yaml_text, message, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml_text)
    r = runner.invoke(
        app,
        [
            "train-student",
            "--config",
            str(cfg),
            "--student",
            "mlp",
            "--data",
            str(tmp_path / "d.npz"),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert (r.exit_code, r.stderr) == (2, f"error: malformed YAML in {cfg} {message}; give it once\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_yaml_merge_keys_still_override(tmp_path):
    """``<<: *base`` then an explicit key is YAML's own override, not a repetition."""
    (tmp_path / "m.yaml").write_text("base: &b {epochs: 1, lr: 0.1}\n<<: *b\nepochs: 3\n")
    assert read_yaml(tmp_path / "m.yaml") == {"base": {"epochs": 1, "lr": 0.1}, "epochs": 3, "lr": 0.1}


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            [
                "train-student",
                "--student",
                "mlp",
                "--student-arg",
                "hidden=[8]",
                "--student-arg",
                "hidden=[16]",
                "--data",
                "d.npz",
                "--out",
                "o",
            ],
            "error: --student-arg hidden=... given twice; give each KEY once",
        ),
        (
            ["eval", "--model", "m", "--class-bias", "3=1.0", "--class-bias", "3=fit", "--data", "d.npz"],
            "error: --class-bias 3=... given twice; give each KEY once",
        ),
    ],
)
def test_a_key_given_twice_in_a_key_value_option_is_refused(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, argv)
    assert (r.exit_code, r.stderr) == (2, message + "\n")
    assert list(tmp_path.iterdir()) == []
