"""Chat templates rendered with limits: a template is code from a file kdcli reads, so it may not run forever,
fill the memory or crash kdcli.

The environment is the one transformers renders chat templates in (``transformers/utils/chat_template_utils.py``:
jinja2's ``ImmutableSandboxedEnvironment`` with ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, the
``{% generation %}`` tag, ``tojson``, ``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``) and it gets
the same variables (``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and the tokenizer's special
tokens), so a template renders to the same text as ``tokenizer.apply_chat_template(..., tokenize=False)``
(tests/test_chat_template.py checks it). On top of the sandbox (no attribute escapes, no unsafe calls):

- **time**: a render stops after :data:`TIME_LIMIT_S` seconds (checked at every loop step, call, attribute
  access, operator and output);
- **steps**: at most :data:`MAX_STEPS` of those per render (nested ``range(100000)`` loops stop in ~1 s, not hours);
- **size**: a string or list made by ``*`` or ``+`` longer than :data:`MAX_CHARS`, or a rendered text longer than
  it, stops the render before the allocation (``content * 50000000`` would take gigabytes);
- **memory**: the process may not grow by more than :data:`MAX_GROWTH_BYTES` during a render (read from
  ``/proc/self/statm`` every few thousand steps, where it exists);
- **errors**: anything the template raises (a division by zero, a recursion that never ends, an undefined
  value used as a number) is one :class:`~kdcli.infra.errors.UsageError` naming the row and the template.
"""

from __future__ import annotations

import functools
import json
import os
import time
from datetime import datetime
from typing import Any

from kdcli.infra.errors import UsageError

TIME_LIMIT_S = 5.0
MAX_STEPS = 2_000_000
MAX_CHARS = 4_000_000
MAX_GROWTH_BYTES = 1 << 30
_MEMORY_EVERY = 4096  # steps between two reads of the process size


class TemplateLimit(Exception):
    """A render went past one of the limits above."""


class _Budget:
    def __init__(self) -> None:
        self.deadline = time.monotonic() + TIME_LIMIT_S
        self.steps = 0
        self.start_rss = _rss()

    def tick(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateLimit(f"more than {MAX_STEPS:,} steps")
        if self.steps % 64 == 0 and time.monotonic() > self.deadline:
            raise TemplateLimit(f"more than {TIME_LIMIT_S:g} s")
        if self.steps % _MEMORY_EVERY == 0 and self.start_rss is not None:
            rss = _rss()
            if rss is not None and rss - self.start_rss > MAX_GROWTH_BYTES:
                raise TemplateLimit(f"more than {MAX_GROWTH_BYTES >> 20:,} MiB of memory")


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _size(x: Any) -> int | None:
    return len(x) if isinstance(x, (str, list, tuple)) else None


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-token marker): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class Limited(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+"})

        def budget(self) -> _Budget:
            return self.globals["__kdcli_budget__"]()

        def call_binop(self, context, operator, left, right):
            self.budget().tick()
            a, b = _size(left), _size(right)
            if operator == "*" and isinstance(right if a is not None else left, int):
                n = (a if a is not None else b) or 0
                if n * abs(right if a is not None else left) > MAX_CHARS:
                    raise TemplateLimit(f"a repeated string or list of more than {MAX_CHARS:,} items")
            elif operator == "+" and a is not None and b is not None and a + b > MAX_CHARS:
                raise TemplateLimit(f"a string or list of more than {MAX_CHARS:,} items")
            elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
                raise TemplateLimit("a power with an exponent above 1024")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
            __self.budget().tick()
            return super().call(__context, __obj, *args, **kwargs)

        def call_filter(self, name, value, args=None, kwargs=None, context=None, eval_ctx=None):
            self.budget().tick()
            return super().call_filter(name, value, args, kwargs, context, eval_ctx)

        def getattr(self, obj, attribute):
            self.budget().tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            self.budget().tick()
            return super().getitem(obj, argument)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def limited_range(*args):
        budget = env.budget()
        for i in range(*args):
            budget.tick()
            yield i

    def finalize(value):
        budget = env.budget()
        budget.tick()
        n = _size(value)
        if n is not None and n > MAX_CHARS:
            raise TemplateLimit(f"an output of more than {MAX_CHARS:,} characters")
        return value

    class TemplateNamespace(Namespace):  # as transformers: no underscore attributes on a namespace
        def __setitem__(self, name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace cannot store {name!r}")
            Namespace.__setitem__(self, name, value)

    env = Limited(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols], finalize=finalize
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=dict,
        namespace=TemplateNamespace,
        range=limited_range,
    )
    return env, env.from_string(template)


def tokenizer_template(tok) -> str | None:
    """The tokenizer's own chat template (the ``default`` one of a tokenizer with several), or None."""
    t = getattr(tok, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    return t if isinstance(t, str) else None


def render(tok, messages: list[dict], template: str | None, add_generation_prompt: bool, where: str) -> str:
    """``messages`` rendered with ``template`` (None: the tokenizer's own), as ``apply_chat_template(tokenize=False)``
    renders them, within the limits of the module docstring; any failure is one UsageError naming ``where``."""
    import jinja2

    origin = "--chat-template" if template is not None else "the tokenizer's chat template"
    text = template if template is not None else tokenizer_template(tok)
    if text is None:
        raise UsageError(f"{where}: the tokenizer has no chat template; pass --chat-template FILE")
    try:
        env, compiled = _compile(text)
    except jinja2.TemplateError as e:
        raise UsageError(f"{where}: {origin} is not a valid Jinja template ({str(e).splitlines()[0][:160]})") from None
    budget = _Budget()
    specials = {k: v for k, v in (getattr(tok, "special_tokens_map", None) or {}).items()}
    try:
        env.globals["__kdcli_budget__"] = lambda: budget
        out = compiled.render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **specials,
        )
    except TemplateLimit as e:
        raise UsageError(
            f"{where}: {origin} stopped: it took {e} (kdcli renders chat templates within limits; fix the template)"
        ) from None
    except RecursionError:
        raise UsageError(f"{where}: {origin} recursed without end") from None
    except MemoryError:
        raise UsageError(f"{where}: {origin} ran out of memory") from None
    except Exception as e:  # the template's own failure (raise_exception, 1/0, a bad filter): the input's fault
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:160]
        what = first if isinstance(e, jinja2.TemplateError) else f"{e.__class__.__name__}: {first}"
        raise UsageError(f"{where}: {origin} failed: {what}") from None
    if len(out) > MAX_CHARS:
        raise UsageError(f"{where}: {origin} rendered {len(out):,} characters (more than {MAX_CHARS:,})")
    return out
