"""The command line: options -> config -> one stage -> report. Nothing else lives here.

Each command's flags are generated from its config dataclass (kdcli/config.py), so a flag, its YAML key, its
default and its help text are declared once. Domain errors become one ``error: ...`` line on stderr and the
exit code the error carries (see kdcli/infra/errors.py); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import inspect
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from kdcli.config import (
    CLASSIFICATION,
    LANGUAGE_MODEL,
    PANELS,
    TASKS,
    CacheConfig,
    CompressConfig,
    EvalConfig,
    TrainConfig,
    field_type,
    fields_of,
    flag_name,
    parse_kv,
    resolve,
)
from kdcli.infra.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, CacheError, CheckFailed, KdError

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 a requested check failed, 2 bad usage/config/input, "
    "3 cache invalid or mismatched, 4 internal error, 130 interrupted."
)


def _err(msg: str) -> None:
    sys.stderr.write(msg.rstrip() + "\n")
    sys.stderr.flush()


def _click_exception(name: str) -> type[Exception]:
    """Click's exception class ``name`` (``UsageError``, ``ClickException``), found among the bases of the public
    ``typer.BadParameter``. Typer < 0.26 re-exports click's own classes, Typer >= 0.26 those of its private vendored
    copy (``typer._click``); kdcli names neither module, so it works with both (see tests/test_layering.py)."""
    for cls in typer.BadParameter.__mro__:
        if cls.__name__ == name:
            return cls
    raise ImportError(
        f"typer {typer.__version__}: typer.BadParameter has no base class {name}; kdcli needs a typer "
        "whose BadParameter derives from click's UsageError (pip install 'typer>=0.16')"
    )


USAGE_ERROR = _click_exception("UsageError")
CLICK_EXCEPTION = _click_exception("ClickException")


class SwitchHelp:
    """``--help`` shown like kdcli's other switches: no ``<bool>`` value placeholder."""

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt


class OneLineErrors(SwitchHelp, typer.core.TyperGroup):
    """Click's usage errors (bad flag, wrong type) as one ``error:`` line and exit 2, like kdcli's own."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(
                args=args, prog_name=prog_name or "kdcli", complete_var=complete_var, standalone_mode=False, **extra
            )
            code = rv if isinstance(rv, int) else 0
        except USAGE_ERROR as e:
            cmd = e.ctx.command_path if e.ctx is not None else "kdcli"
            if type(e).__name__ == "NoArgsIsHelpError":  # `kdcli` / `kdcli cache` alone: the help, not an "error:"
                _err(e.format_message())
            else:
                _err(f"error: {e.format_message()} (see '{cmd} --help')")
            code = EXIT_USAGE
        except typer.Abort:  # Ctrl-C / EOF while parsing
            _err("interrupted")
            code = EXIT_INTERRUPTED
        except typer.Exit as e:
            code = e.exit_code
        except CLICK_EXCEPTION as e:
            _err(f"error: {e.format_message()}")
            code = e.exit_code
        if standalone_mode:
            sys.exit(code)
        return code


class OneValuePerOption(SwitchHelp, typer.core.TyperCommand):
    """Refuses an option given twice when it takes one value (``--cache a --cache b``), which click would silently
    resolve to the last. Options that take several values (``--model``, ``--student-arg``) are repeatable."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if not ctx.resilient_parsing:  # (shell completion parses half-typed lines: let it)
            # The command's own parser, on a copy: it lists every option once per occurrence, in order, and only
            # splits tokens (no values converted, no callbacks run). Its errors are the ones the real parse raises.
            try:
                _, _, order = self.make_parser(ctx).parse_args(args=list(args))
            except USAGE_ERROR as e:  # e.g. "Option '--model' requires an argument": click leaves ctx out, and
                e.ctx = e.ctx or ctx  # the hint would name 'kdcli --help' instead of this command's
                raise
            if not any(p.is_eager for p in order):  # --help (eager) wins, as it does alone
                seen: dict[int, int] = {}
                for p in order:
                    seen[id(p)] = seen.get(id(p), 0) + 1
                for p in order:
                    if seen[id(p)] > 1 and p.param_type_name == "option" and not p.multiple:
                        name, n = "/".join(p.opts + p.secondary_opts), seen[id(p)]
                        what = (
                            "is a switch" if p.is_flag else "takes one value, and kdcli does not silently keep the last"
                        )
                        raise USAGE_ERROR(f"{name} given {n} times; it {what}: give it once", ctx=ctx)
        return super().parse_args(ctx, args)


# name: the program name CliRunner shows too (it would say "root"); python -m kdcli passes "kdcli" itself.
app = typer.Typer(
    cls=OneLineErrors,
    name="kdcli",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    help="Offline knowledge distillation: run the teacher once, cache its log-probabilities, train "
    "any number of students from the cache. " + EXIT_CODES_HELP,
)
cache_app = typer.Typer(
    cls=OneLineErrors,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Inspect, check, export and import teacher caches.",
)
app.add_typer(cache_app, name="cache")


def _print_version(value: bool) -> None:
    if value:
        from kdcli import __version__

        sys.stdout.write(f"kdcli {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the kdcli version and exit.", metavar=""
    ),
) -> None:
    """Offline knowledge distillation."""


def run_guarded(debug: bool, fn: Callable[[], Any]) -> Any:
    """Run one stage; map errors to (one stderr line, exit code). Inside the command, so CliRunner sees it."""
    try:
        return fn()
    except KdError as e:
        if debug:
            raise
        _err(f"error: {e}")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        _err("interrupted: whole shards/checkpoints already written are kept; re-run the same command to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except typer.Exit:
        raise
    except Exception as e:
        if debug:
            raise
        from kdcli.infra.atomic import is_disk_full

        if is_disk_full(e):  # any write path: a full disk is the environment's problem, not kdcli's (exit 2)
            _err(
                f"error: no space left on device ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); free "
                "some space and re-run the same command: whole shards/checkpoints already written are kept"
            )
            raise typer.Exit(EXIT_USAGE) from None
        first = (str(e).splitlines() or [""])[0][:300]
        _err(
            f"error: internal error {e.__class__.__name__}: {first} (re-run with --debug for the traceback, and "
            "please report it)"
        )
        raise typer.Exit(EXIT_INTERNAL) from None


def _flag(name: str, tp: type) -> str:
    return flag_name(name) if tp is dict else "--" + name.replace("_", "-")


ONLY = {CLASSIFICATION: "classification only", LANGUAGE_MODEL: "language models only"}


def help_order(cls: type) -> list:
    """The fields of a command in ``--help`` order: by panel (:data:`kdcli.config.PANELS`), then the command's own
    fields before those of the parts it inherits, then as declared."""
    own = set(cls.__dict__.get("__annotations__", {}))
    fields = fields_of(cls)
    return sorted(fields, key=lambda f: (PANELS.index(f.metadata["panel"]), f.name not in own, fields.index(f)))


# what an option's value is, where its field name would not say it
METAVARS = {
    "data": "DATA",
    "eval_data": "DATA",
    "bias_data": "DATA",
    "teacher": "MODEL",
    "student": "MODEL",
    "model": "MODEL",
    "cache": "CACHE_DIR",
    "out": "DIR",
    "teacher_weights": "FILE",
    "chat_template": "FILE",
    "cache_weights": "W1,W2,...",
    "plot": "FILE.png",
    "augment": "shift:N",
}


def metavar_of(f: dataclasses.Field, tp: type) -> str:
    """N, X, KEY=VALUE, a|b|c for a short list of choices, else what :data:`METAVARS` or the name says."""
    if tp is bool:
        return ""
    choices = f.metadata.get("choices")
    if choices and len("|".join(choices)) <= 24:
        return "|".join(choices)
    return METAVARS.get(f.name) or {int: "N", float: "X", dict: "KEY=VALUE"}.get(tp, f.name.upper())


def _option_params(cls: type) -> list[inspect.Parameter]:
    params = []
    for f in help_order(cls):
        tp, _ = field_type(f)
        help_text = f.metadata["help"]
        if f.default not in (None, dataclasses.MISSING) and tp is not bool:
            help_text += f" [default: {f.default}]"
        if f.metadata.get("choices"):
            help_text += f" [one of: {', '.join(f.metadata['choices'])}]"
        tasks = f.metadata.get("tasks", TASKS)
        if len(tasks) == 1:
            help_text += f" [{ONLY[tasks[0]]}]"
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        annotation = Optional[bool] if tp is bool else Optional[list[str]] if tp in (dict, list) else Optional[tp]
        metavar = metavar_of(f, tp)
        if required:  # checked by resolve() (it may come from --config), marked here
            help_text += " [required]"
        option = typer.Option(
            None,
            _flag(f.name, tp),
            help=escape(help_text),
            show_default=False,
            metavar=metavar,
            rich_help_panel=f.metadata["panel"],
        )
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    params.append(
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[Path],
            default=typer.Option(
                None,
                "--config",
                help="YAML file of options (keys = flag names with underscores); flags override it.",
                rich_help_panel="Output",
                metavar="FILE.yaml",
            ),
        )
    )
    params.append(
        inspect.Parameter(
            "debug",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(False, "--debug", help="Show tracebacks.", rich_help_panel="Output", metavar=""),
        )
    )
    return params


def command(target: typer.Typer, name: str, cls: type, run: Callable[[Any], int | None], epilog: str) -> None:
    """Register ``name`` on ``target`` with one flag per field of ``cls``; ``run(cfg)`` does the work."""
    params = _option_params(cls)
    kinds = {f.name: field_type(f)[0] for f in fields_of(cls)}

    def cmd(**kwargs: Any) -> None:
        config, debug = kwargs.pop("config"), kwargs.pop("debug")
        overrides: dict[str, Any] = {}
        for key, value in kwargs.items():
            if kinds[key] is dict:
                value = run_guarded(debug, lambda v=value, k=key: parse_kv(v, _flag(k, dict)[2:])) if value else None
            elif kinds[key] is list:
                value = list(value) if value else None
            overrides[key] = value
        cfg = run_guarded(debug, lambda: resolve(cls, config, overrides))
        code = run_guarded(debug, lambda: run(cfg))
        if code:
            raise typer.Exit(code)

    cmd.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cmd.__annotations__ = {p.name: p.annotation for p in params}
    cmd.__doc__ = (cls.__doc__ or "").strip()
    cmd.__name__ = name.replace("-", "_")
    target.command(name, cls=OneValuePerOption, epilog=epilog)(cmd)


def _cache_teacher(cfg: CacheConfig) -> None:
    from kdcli.infra.distributed import is_main_process
    from kdcli.report import show
    from kdcli.stages.cache import cache_teacher

    summary = cache_teacher(cfg)
    if is_main_process():  # under torchrun every rank returns the same summary; one prints it
        show(summary)


def _train_student(cfg: TrainConfig) -> None:
    from kdcli.infra.distributed import is_main_process
    from kdcli.report import show
    from kdcli.stages.train import train_student

    summary = train_student(cfg)
    if is_main_process():
        show(summary)


def _eval(cfg: EvalConfig) -> int:
    from kdcli.report import print_json, show
    from kdcli.stages.evaluate import evaluate

    if cfg.plot:
        from kdcli.infra import log
        from kdcli.plot import check_plot_path, plot_report

        check_plot_path(Path(cfg.plot))  # before any model is measured
    report = evaluate(cfg)
    if cfg.plot:
        log.info(f"plot: wrote {plot_report(report, Path(cfg.plot))}")
    if cfg.json:
        print_json(report)
    else:
        show(report)
    for line in report.failures:
        _err(f"check failed: {line}")
    return CheckFailed.exit_code if report.failures else 0


def _compress(cfg: CompressConfig) -> None:
    from kdcli.report import print_json, show
    from kdcli.stages.compress import compress

    summary = compress(cfg)
    if cfg.json:
        print_json(summary)
    else:
        show(summary)


command(
    app,
    "cache-teacher",
    CacheConfig,
    _cache_teacher,
    "Example: kdcli cache-teacher --teacher runs/teacher --data mnist:train --out cache/mnist --top-k 5",
)
command(
    app,
    "train-student",
    TrainConfig,
    _train_student,
    "Example: kdcli train-student --cache cache/mnist --student mlp --student-arg hidden=[256] "
    "--data mnist:train --out runs/student --temperature 4 --alpha 0.9",
)
command(
    app,
    "eval",
    EvalConfig,
    _eval,
    "Example: kdcli eval --model runs/teacher --model runs/student --data mnist:test --cache cache/test --json",
)
command(
    app,
    "compress",
    CompressConfig,
    _compress,
    "Example: kdcli compress --model runs/student --out runs/student-int8 --prune 0.5 --structured --quantize int8",
)


@cache_app.command("verify", cls=OneValuePerOption, epilog="Example: kdcli cache verify cache/mnist --json")
def cache_verify(
    cache_dir: Annotated[
        str,  # not Path: Path("s3://bucket/c") is "s3:/bucket/c"
        typer.Argument(
            show_default=False,
            metavar="CACHE_DIR",
            help="Cache directory (manifest.json + shard-*.h5), or an fsspec URL (s3://bucket/prefix).",
        ),
    ],
    data: Annotated[
        Optional[str],
        typer.Option(
            "--data",
            metavar="DATA",
            show_default=False,
            help="Also check every row hash against DATA (classification caches).",
        ),
    ] = None,
    json: Annotated[
        bool, typer.Option("--json", help="Print exactly one JSON document on stdout instead of a table.", metavar="")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.", metavar="")] = False,
) -> None:
    """Re-hash every shard against the manifest's sha256 and check its contents: datasets, dtypes and shapes, row
    coverage and order, finite values, log-probabilities that normalise, the data fingerprint. One row per shard
    on stdout; exit 0 when everything is right, 3 on any problem."""

    def run() -> None:
        from kdcli.cache.verify import verify_cache
        from kdcli.report import print_json, show

        report = verify_cache(cache_dir, data)
        if json:
            print_json(report)
        else:
            show(report)
        for note in report.notes:
            _err(f"note: {note}")
        if not report.ok:
            more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
            raise CacheError(f"cache {cache_dir} failed verification: {report.problems[0]}{more}; {report.fix}")

    run_guarded(debug, run)


CONVERT_EXIT_CODES = (
    "Exit 0 when written; 2 bad usage or input (an unknown format, a source that is not in the format, a missing "
    "--data or --tokenizer, a mode whose export would change the loss, an --out in the way); 3 a damaged or "
    "mismatched cache or source content (the row is named)."
)


def _switch(name: str, text: str):
    return typer.Option(name, help=text, metavar="")


@cache_app.command(
    "export",
    cls=OneValuePerOption,
    epilog="Example: kdcli cache export out/cache-lm --format axolotl --data train.jsonl --out out/kd-axolotl",
)
def cache_export(
    cache_dir: Annotated[
        str,  # not Path: Path("s3://bucket/c") is "s3:/bucket/c"
        typer.Argument(
            show_default=False,
            metavar="CACHE_DIR",
            help="The cache to export (complete): a directory or an fsspec URL (s3://bucket/prefix).",
        ),
    ],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            metavar="parquet|axolotl",
            show_default=False,
            help="parquet: kdcli's own columns, every kind and mode (import gives the same arrays back); axolotl: "
            "the dataset axolotl's KD plugin trains from (token caches of a top-k or small full cache).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            metavar="DIR",
            show_default=False,
            help="Directory the Parquet files (part-NNNNN.parquet, one per shard) are written to; new or empty.",
        ),
    ],
    data: Annotated[
        Optional[str],
        typer.Option(
            "--data",
            metavar="DATA",
            show_default=False,
            help="The DATA the (LM) cache was built from, checked against its fingerprint: adds input_ids and labels "
            "(required by axolotl).",
        ),
    ] = None,
    tokenizer: Annotated[
        Optional[str],
        typer.Option(
            "--tokenizer", metavar="TOKENIZER", show_default=False, help="A copy of the cache's tokenizer (for --data)."
        ),
    ] = None,
    temperature: Annotated[
        Optional[float],
        typer.Option(
            "--temperature",
            metavar="X",
            show_default=False,
            help="axolotl: the temperature the rows hold the teacher at (set kd_temperature to it). [default: 1]",
        ),
    ] = None,
    alignment: Annotated[
        Optional[str],
        typer.Option(
            "--alignment",
            metavar="next|token",
            show_default=False,
            help="axolotl: next = row t holds the prediction of token t+1 (axolotl's current loss); token = row t "
            "holds the distribution of token t (its dataset preparation). [default: next]",
        ),
    ] = None,
    overwrite: Annotated[
        bool, _switch("--overwrite", "Replace an earlier export at --out (swapped in whole when done).")
    ] = False,
    trust_remote_code: Annotated[
        bool, _switch("--trust-remote-code", "Let the tokenizer directory run its own code.")
    ] = False,
    json: Annotated[bool, _switch("--json", "Print exactly one JSON document on stdout instead of a table.")] = False,
    debug: Annotated[bool, _switch("--debug", "Show tracebacks.")] = False,
) -> None:
    """Write a cache as Parquet files another trainer reads. What the format cannot carry is said on stderr, one line
    each; a mode whose export would silently change the loss is refused."""

    def run() -> None:
        from kdcli.cache.formats.base import Options
        from kdcli.report import print_json, show
        from kdcli.stages.convert import ExportRequest, export_cache

        opts = Options(temperature=temperature, alignment=alignment)
        req = ExportRequest(cache_dir, format, str(out), data, tokenizer, trust_remote_code, overwrite, opts)
        summary = export_cache(req)
        print_json(summary) if json else show(summary)

    run_guarded(debug, run)


@cache_app.command(
    "import",
    cls=OneValuePerOption,
    epilog="Example: kdcli cache import kd-dataset/ --format axolotl --tokenizer teacher/ --out out/cache-imported",
)
def cache_import(
    source: Annotated[
        Path,
        typer.Argument(
            show_default=False,
            metavar="SRC",
            help="A kdcli Parquet export, an axolotl KD dataset (.parquet, a directory of them, or a save_to_disk "
            "directory) or a DistillKit capture directory.",
        ),
    ],
    format: Annotated[
        str,
        typer.Option("--format", metavar="parquet|axolotl|distillkit", show_default=False, help="The source's format."),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", metavar="CACHE_DIR", show_default=False, help="The kdcli cache to write; new or empty."),
    ],
    tokenizer: Annotated[
        Optional[str],
        typer.Option(
            "--tokenizer",
            metavar="TOKENIZER",
            show_default=False,
            help="axolotl, distillkit (required): the tokenizer that made the source's token ids, recorded in the "
            "manifest.",
        ),
    ] = None,
    temperature: Annotated[
        Optional[float],
        typer.Option(
            "--temperature",
            metavar="X",
            show_default=False,
            help="axolotl: the temperature the source's log-probs are at (undone on import). [default: 1]",
        ),
    ] = None,
    alignment: Annotated[
        Optional[str],
        typer.Option(
            "--alignment", metavar="next|token", show_default=False, help="axolotl: as for export. [default: next]"
        ),
    ] = None,
    vocab_size: Annotated[
        Optional[int],
        typer.Option(
            "--vocab-size",
            metavar="N",
            show_default=False,
            help="axolotl: the teacher's vocabulary size. [default: the tokenizer's length]",
        ),
    ] = None,
    ranks: Annotated[
        Optional[str],
        typer.Option(
            "--ranks",
            metavar="exact|all",
            show_default=False,
            help="distillkit: exact keeps the exactly stored top ranks (exact tail mass); all keeps every rank, the "
            "polynomial-approximated ones marked in the manifest. [default: exact]",
        ),
    ] = None,
    compression_config: Annotated[
        Optional[str],
        typer.Option(
            "--compression-config",
            metavar="FILE",
            show_default=False,
            help="distillkit: the capture's compression_config.yaml. [default: the one beside the capture]",
        ),
    ] = None,
    overwrite: Annotated[
        bool, _switch("--overwrite", "Replace a kdcli cache at --out (swapped in whole when done).")
    ] = False,
    trust_remote_code: Annotated[
        bool, _switch("--trust-remote-code", "Let the tokenizer directory run its own code.")
    ] = False,
    json: Annotated[bool, _switch("--json", "Print exactly one JSON document on stdout instead of a table.")] = False,
    debug: Annotated[bool, _switch("--debug", "Show tracebacks.")] = False,
) -> None:
    """Turn a capture into a normal kdcli cache (manifest, shards; verified before it is put in place). Where the
    source records no teacher or data fingerprint the manifest says so; the token ids are written beside the shards
    as DATA (CACHE_DIR/tokens.parquet) for train-student and eval."""

    def run() -> None:
        from kdcli.cache.formats.base import Options
        from kdcli.report import print_json, show
        from kdcli.stages.convert import ImportRequest, import_cache

        opts = Options(
            temperature=temperature,
            alignment=alignment,
            vocab_size=vocab_size,
            ranks=ranks,
            compression_config=compression_config,
        )
        req = ImportRequest(str(source), format, str(out), tokenizer, trust_remote_code, overwrite, opts)
        summary = import_cache(req)
        print_json(summary) if json else show(summary)

    run_guarded(debug, run)


def _sigterm(signum, frame):  # pragma: no cover - exercised by subprocess tests
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _sigterm)
    app()
