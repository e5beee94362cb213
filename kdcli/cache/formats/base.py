"""The interface every cache format converter implements (one file each, registered in
:mod:`kdcli.cache.formats`), and the options the commands hand them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from kdcli.cache.formats.common import BLOCK_VALUES, Advance, Imported, TokenizerInfo
from kdcli.cache.reader import CacheReader


@dataclass
class Options:
    """The format-specific options of ``kdcli cache export`` / ``import`` (None: not given). A format lists the
    ones it takes (:attr:`Format.export_options`, :attr:`Format.import_options`); the stage refuses the others."""

    temperature: float | None = None  # axolotl: the T the rows hold (export) / the source's log-probs are at (import)
    alignment: str | None = None  # axolotl: "next" or "token"
    vocab_size: int | None = None  # axolotl import: the teacher's vocabulary (default: the tokenizer's length)
    ranks: str | None = None  # distillkit import: "exact" or "all"
    compression_config: str | None = None  # distillkit import: the capture's compression_config.yaml
    block_values: int = BLOCK_VALUES  # values per block read/written (tests make it small)

    def given(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "block_values" and getattr(self, f.name) is not None]


class Format:
    """One format. ``exports`` / ``imports`` say what it does; the methods are called by
    :mod:`kdcli.stages.convert` after it has checked the paths (a converter writes into the directory it is given).
    """

    name: ClassVar[str]
    exports: ClassVar[bool] = False
    imports: ClassVar[bool] = False
    export_options: ClassVar[tuple[str, ...]] = ()
    import_options: ClassVar[tuple[str, ...]] = ()
    export_data: ClassVar[str] = "no"  # "no", "optional", "required": the token ids of the cache's DATA (--data)
    import_tokenizer: ClassVar[bool] = False  # the source records no tokenizer: --tokenizer is required
    import_passes: ClassVar[int] = 1  # reads of the source an import makes (progress: passes x source rows)
    summary: ClassVar[str] = ""  # one line for --help and docs

    def options(self, action: str) -> tuple[str, ...]:
        """The :class:`Options` this format takes for ``action`` ("export" or "import")."""
        return self.export_options if action == "export" else self.import_options

    # -- export ------------------------------------------------------------------------------------------------
    def plan_export(self, manifest: dict, opts: Options) -> list[str]:
        """Before anything is written: refuse (UsageError) a cache whose export would silently change the loss;
        return what the export cannot carry (one line each: said on stderr, listed in the summary)."""
        raise NotImplementedError

    def export(
        self, reader: CacheReader, out: Path, *, data: Any, opts: Options, progress: Advance
    ) -> tuple[int, int | None, int]:
        """Write the cache ``reader`` reads as Parquet files into the empty directory ``out``; ``data``: the
        :class:`~kdcli.lm.text.TokenData` of its rows (or None). Returns (rows, predicted tokens or None, files)."""
        raise NotImplementedError

    # -- import ------------------------------------------------------------------------------------------------
    def source_rows(self, src: Path, opts: Options) -> int:
        """Rows of the source (for progress), checking it is readable as this format (UsageError)."""
        raise NotImplementedError

    def import_into(
        self,
        src: Path,
        work: Path,
        *,
        final: Path,
        tokenizer: TokenizerInfo | None,
        opts: Options,
        progress: Advance,
    ) -> Imported:
        """Build a complete kdcli cache from ``src`` in the empty directory ``work`` (moved to ``final`` by the stage:
        paths recorded in the manifest name ``final``)."""
        raise NotImplementedError
