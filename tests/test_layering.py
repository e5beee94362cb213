"""Layering: kdcli's import graph has no cycles, no kdcli module reaches into another's private names, and no
kdcli module leans on a third-party package's private modules (``typer._click`` exists only in Typer >= 0.26).

The checker reads every ``kdcli/**/*.py`` with ``ast`` -- nothing is imported -- and sees every import: top level,
inside functions, under ``if TYPE_CHECKING``, relative ones resolved against the importing module's package.

How an import becomes an edge of the graph:
- ``import kdcli.lm.text`` and ``from kdcli.lm import text`` (``text`` a submodule) -> ``kdcli.lm.text``;
- ``from kdcli.lm import is_text_spec`` (a name defined in the package) and ``import kdcli.lm`` -> ``kdcli.lm``,
  i.e. ``kdcli/lm/__init__.py``;
- the parent packages Python initialises on the way (``kdcli``, ``kdcli.lm``) are not edges: counting them would
  flag every package whose ``__init__`` names a submodule, and a real cycle through an ``__init__`` is still caught
  because reaching a name *defined* there is an edge to it.

The self-tests at the end run the same checker on synthetic sources, so a silent checker cannot pass for a clean
codebase.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "kdcli"
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}


def is_private(name: str) -> bool:
    """``_x`` and ``__x`` are private; ``__x__`` (``__version__``, ``__future__``) is not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def module_of(relpath: str) -> tuple[str, bool]:
    """``kdcli/lm/__init__.py`` -> (``kdcli.lm``, True); ``kdcli/lm/text.py`` -> (``kdcli.lm.text``, False)."""
    parts = relpath[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


@dataclass
class Graph:
    modules: dict[str, str] = field(default_factory=dict)  # module -> relpath
    edges: dict[str, dict[str, str]] = field(default_factory=dict)  # src -> dst -> "relpath:line: statement"
    # "relpath:line: qualified.name", in file and line order:
    private: list[str] = field(default_factory=list)  # (2) private kdcli names reached from another module
    third_party_private: list[str] = field(default_factory=list)  # (3) private modules of other packages


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def analyse(sources: dict[str, str]) -> Graph:
    """``sources``: relpath (``kdcli/lm/text.py``) -> source text. Returns the import graph and the offenders."""
    g = Graph()
    packages = set()
    priv: set[tuple[str, int, str]] = set()  # (relpath, line, qualified name)
    third: set[tuple[str, int, str]] = set()
    for rel in sources:
        mod, is_pkg = module_of(rel)
        g.modules[mod] = rel
        if is_pkg:
            packages.add(mod)

    def owning_module(dotted: str) -> str | None:
        """The longest prefix of ``dotted`` that is a kdcli module (``kdcli.lm.text.f`` -> ``kdcli.lm.text``)."""
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in g.modules:
                return ".".join(parts[:n])
        return None

    for rel, text in sorted(sources.items()):
        src, is_pkg = module_of(rel)
        tree = ast.parse(text, filename=rel)
        g.edges.setdefault(src, {})
        lines = text.splitlines()
        kdcli_names: dict[str, str] = {}  # local name -> kdcli module it is bound to
        other_names: dict[str, str] = {}  # local name -> third-party module (path) it is bound to

        def where(node: ast.AST) -> str:
            return f"{rel}:{node.lineno}: {lines[node.lineno - 1].strip()}"

        def edge(dst: str | None, node: ast.AST) -> None:
            if dst is not None and dst != src:
                g.edges[src].setdefault(dst, where(node))

        def third_party(dotted: str, node: ast.AST) -> None:
            if dotted.split(".")[0] not in STDLIB and any(is_private(p) for p in dotted.split(".")):
                third.add((rel, node.lineno, dotted))

        def private(qualified: str, node: ast.AST) -> None:
            priv.add((rel, node.lineno, qualified))

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _in_package(alias.name):
                        edge(owning_module(alias.name), node)
                        target = alias.name if alias.asname else alias.name.split(".")[0]
                        kdcli_names[alias.asname or alias.name.split(".")[0]] = owning_module(target) or target
                        if any(is_private(p) for p in alias.name.split(".")):
                            private(alias.name, node)
                    else:
                        third_party(alias.name, node)
                        other_names[alias.asname or alias.name.split(".")[0]] = (
                            alias.name if alias.asname else alias.name.split(".")[0]
                        )
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: level 1 is this module's package, each further level one up
                    base = src if is_pkg else src.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    frm = f"{base}.{node.module}" if node.module else base
                else:
                    frm = node.module or ""
                if not _in_package(frm):
                    for alias in node.names:
                        third_party(f"{frm}.{alias.name}", node)
                        other_names[alias.asname or alias.name] = f"{frm}.{alias.name}"
                    continue
                if any(is_private(p) for p in frm.split(".")):
                    private(frm, node)
                for alias in node.names:
                    sub = f"{frm}.{alias.name}"
                    if sub in g.modules:  # from kdcli.lm import text -> the submodule
                        edge(sub, node)
                        kdcli_names[alias.asname or alias.name] = sub
                    else:  # a name defined in frm (or *): an edge to frm itself
                        edge(owning_module(frm), node)
                    if is_private(alias.name) and owning_module(frm) != src:
                        private(sub, node)

        # Attribute access through a bound module name: kdcli: mod._y (walking submodules: kdcli.lm.text._y);
        # third party: pkg._y right after an imported name (typer._click). getattr(mod, "_y") counts too.
        for node in ast.walk(tree):
            chain: list[str] = []
            cur: ast.AST = node
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "getattr"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                chain, cur = [node.args[1].value], node.args[0]
            elif not isinstance(node, ast.Attribute):
                continue
            while isinstance(cur, ast.Attribute):
                chain.insert(0, cur.attr)
                cur = cur.value
            if not isinstance(cur, ast.Name):
                continue
            if cur.id in kdcli_names:
                mod = kdcli_names[cur.id]
                for attr in chain:
                    if is_private(attr):
                        if mod != src:
                            private(f"{mod}.{attr}", node)
                        break
                    if f"{mod}.{attr}" not in g.modules:
                        break
                    mod = f"{mod}.{attr}"
            elif cur.id in other_names and chain and is_private(chain[0]):
                third_party(f"{other_names[cur.id]}.{chain[0]}", node)
    g.private = [f"{r}:{n}: {q}" for r, n, q in sorted(priv)]
    g.third_party_private = [f"{r}:{n}: {q}" for r, n, q in sorted(third)]
    return g


def strongly_connected(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """Tarjan's algorithm: the strongly connected components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def one_cycle(edges: dict[str, dict[str, str]], comp: list[str]) -> list[str]:
    """A shortest cycle through ``comp[0]`` inside the component (BFS), as the modules in order."""
    start, members = comp[0], set(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, {})):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if w in members and w not in parent and w != start:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {comp}")  # cannot happen for an SCC of size > 1


def cycle_report(g: Graph) -> list[str]:
    lines = []
    for comp in strongly_connected(g.edges):
        cyc = one_cycle(g.edges, comp)
        lines.append(f"cycle among {len(comp)} modules {{{', '.join(comp)}}}; e.g. {' -> '.join(cyc)}:")
        lines += [f"    {g.edges[a][b]}" for a, b in zip(cyc, cyc[1:])]
    return lines


def read_package() -> dict[str, str]:
    return {
        p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in sorted((ROOT / PACKAGE).rglob("*.py"))
    }


# ---------------------------------------------------------------------------------------------------- the codebase


def test_the_checker_sees_the_whole_package():
    g = analyse(read_package())
    assert {"kdcli.cli", "kdcli.config", "kdcli.lm", "kdcli.lm.text", "kdcli.cache.writer"} <= set(g.modules)
    # Known edges of each kind: top level, inside a function, `from pkg import submodule`, `from pkg import name`.
    assert "kdcli.config" in g.edges["kdcli.cli"]  # top-level from-import
    assert "kdcli.cache.verify" in g.edges["kdcli.cli"]  # inside a function
    assert "kdcli.infra.crashpoints" in g.edges["kdcli.infra.atomic"]  # from kdcli import crashpoints: the submodule
    assert "kdcli" in g.edges["kdcli.cache.manifest"]  # from kdcli import __version__: the package itself


def test_no_import_cycles():
    g = analyse(read_package())
    report = cycle_report(g)
    if report:
        pytest.fail(
            f"{len(strongly_connected(g.edges))} import cycle(s) (modules that import, "
            "directly or not, themselves; imports inside functions count):\n" + "\n".join(report),
            pytrace=False,
        )


def test_no_module_uses_another_modules_private_names():
    private = analyse(read_package()).private
    if private:
        pytest.fail(
            f"{len(private)} private name(s) of one kdcli module used by another (make it public, or move "
            "it where both can use it):\n  " + "\n  ".join(private),
            pytrace=False,
        )


# Private third-party names kdcli uses on purpose, each with why and what happens when it is gone.
ALLOWED_PRIVATE = {
    "torch._int_mm": "the int8 x int8 -> int32 matmul behind `compress --quantize int8-dynamic` (what PyTorch's own "
    "dynamic quantisation and torchao call); no public equivalent in torch 2.13. kdcli/models/quant.py "
    "checks for it and falls back to the float product where a torch lacks it.",
}


def test_no_private_modules_of_third_party_packages():
    private = [p for p in analyse(read_package()).third_party_private if p.rpartition(": ")[2] not in ALLOWED_PRIVATE]
    if private:
        pytest.fail(
            f"{len(private)} use(s) of a third-party package's private module/name (they change or vanish "
            "between releases; use the package's public API):\n  " + "\n  ".join(private),
            pytrace=False,
        )


# ---------------------------------------------------------------------------------------------- the checker itself


def test_checker_finds_a_cycle_through_a_function_level_relative_import_and_a_package_init():
    g = analyse(
        {
            "kdcli/__init__.py": "",
            "kdcli/a.py": "from kdcli.b import f\n",
            "kdcli/b.py": "def f():\n    from .c import g\n",  # function level, relative
            "kdcli/c.py": "import kdcli.a\n",
            "kdcli/lm/__init__.py": "from kdcli.lm import text\ndef spec(): pass\n",
            "kdcli/lm/text.py": "def t():\n    from . import spec\n",  # a name defined in the package __init__
            "kdcli/lm/hf.py": "from ..lm import text\n",  # not part of any cycle
        }
    )
    assert strongly_connected(g.edges) == [["kdcli.a", "kdcli.b", "kdcli.c"], ["kdcli.lm", "kdcli.lm.text"]]
    assert one_cycle(g.edges, ["kdcli.a", "kdcli.b", "kdcli.c"]) == ["kdcli.a", "kdcli.b", "kdcli.c", "kdcli.a"]
    assert g.edges["kdcli.lm.hf"] == {"kdcli.lm.text": "kdcli/lm/hf.py:1: from ..lm import text"}
    report = cycle_report(g)
    assert report[0].startswith("cycle among 3 modules {kdcli.a, kdcli.b, kdcli.c}")
    assert "    kdcli/b.py:2: from .c import g" in report


def test_checker_finds_private_names_imported_or_reached_as_attributes():
    g = analyse(
        {
            "kdcli/__init__.py": "__version__ = '1'\n",
            "kdcli/x.py": "_helper = 1\ndef _own(): return _helper\n",
            "kdcli/lm/__init__.py": "",
            "kdcli/lm/text.py": "_tok = 2\n",
            "kdcli/y.py": (
                "from kdcli import __version__\n"  # dunder: fine
                "from kdcli.x import _helper\n"  # 2
                "def f():\n"
                "    from .x import _own as own\n"  # 4, relative and aliased
                "import kdcli.lm.text\n"
                "import kdcli.x as xx\n"
                "from kdcli.lm import text\n"
                "a = kdcli.lm.text._tok\n"  # 8, through the package path
                "b = xx._helper\n"  # 9
                "c = text._tok + len(text.__name__)\n"  # 10 (dunder fine)
                "d = getattr(xx, '_own')\n"  # 11
            ),
        }
    )
    assert g.private == [
        "kdcli/y.py:2: kdcli.x._helper",
        "kdcli/y.py:4: kdcli.x._own",
        "kdcli/y.py:8: kdcli.lm.text._tok",
        "kdcli/y.py:9: kdcli.x._helper",
        "kdcli/y.py:10: kdcli.lm.text._tok",
        "kdcli/y.py:11: kdcli.x._own",
    ]
    clean = analyse({"kdcli/__init__.py": "", "kdcli/x.py": "_a = 1\nimport kdcli.x as me\nb = me._a\n"})
    assert clean.private == []  # a module's own private names are its business


def test_checker_finds_third_party_private_modules():
    g = analyse(
        {
            "kdcli/__init__.py": "",
            "kdcli/cli.py": (
                "import typer\n"
                "import os, sys\n"
                "from typer._click import exceptions\n"  # 3
                "import torch.utils._pytree as pt\n"  # 4
                "from torch import _dynamo\n"  # 5
                "try:\n"
                "    pass\n"
                "except typer._click.exceptions.UsageError:\n"  # 8
                "    os._exit(1)\n"  # stdlib: not a third-party package
                "x = typer.core.TyperGroup\n"
                "y = getattr(typer, '_click')\n"  # 11
            ),
        }
    )
    assert g.third_party_private == [
        "kdcli/cli.py:3: typer._click.exceptions",
        "kdcli/cli.py:4: torch.utils._pytree",
        "kdcli/cli.py:5: torch._dynamo",
        "kdcli/cli.py:8: typer._click",
        "kdcli/cli.py:11: typer._click",
    ]
    assert g.private == []


def test_checker_passes_a_clean_graph():
    g = analyse(
        {
            "kdcli/__init__.py": "__version__ = '1'\n",
            "kdcli/errors.py": "class KdError(Exception): pass\n",
            "kdcli/config.py": "from kdcli.errors import KdError\nfrom . import __version__\n",
            "kdcli/cache/__init__.py": "",
            "kdcli/cache/manifest.py": "from ..config import *\nfrom kdcli import errors\nimport typer\nimport os\n"
            "def f():\n    import kdcli.errors as e\n    return e.KdError, os._exit\n",
            "kdcli/cli.py": "import typer\nfrom kdcli.cache import manifest\nx = typer.Exit\n",
        }
    )
    assert g.edges["kdcli.cache.manifest"] == {
        "kdcli.config": "kdcli/cache/manifest.py:1: from ..config import *",
        "kdcli.errors": "kdcli/cache/manifest.py:2: from kdcli import errors",
    }
    assert g.edges["kdcli.cli"] == {"kdcli.cache.manifest": "kdcli/cli.py:2: from kdcli.cache import manifest"}
    assert strongly_connected(g.edges) == [] and cycle_report(g) == []
    assert g.private == [] and g.third_party_private == []


def test_a_cache_mode_is_named_only_in_its_own_file_and_the_registry():
    """Issue [2/6]: a cache mode lives in one file. Code elsewhere asks the mode (``get_mode(name).sampled``, a
    Targets method such as ``surely_kept``) instead of testing its name: ``"priority"`` is the mode added last and
    the one every new consumer is tempted to special-case (the cross-tokenizer loss did)."""
    pkg = Path(__file__).resolve().parents[1] / "kdcli"
    named = sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py") if '"priority"' in p.read_text())
    assert named == ["cache/modes/__init__.py", "cache/modes/priority.py"]
