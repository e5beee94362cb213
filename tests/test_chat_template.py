"""Chat templates render as transformers renders them, within time, step, size and memory limits
(kdcli/lm/chat_template.py): a template from a file kdcli reads never runs for minutes, fills the memory or
becomes an internal error."""

from __future__ import annotations

import time

import pytest
from lm_helpers import make_tokenizer

from kdcli.infra.errors import UsageError
from kdcli.lm import chat_template
from kdcli.lm.chat_template import render

MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]

TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # a default system prompt, loop variables, a namespace and the tokenizer's special tokens
    "features": (
        "{{ bos_token or '' }}{% set ns = namespace(n=0) %}{% if messages[0]['role'] != 'system' %}"
        "{{ '[SYS] default\\n' }}{% endif %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{{ loop.index ~ ':' ~ m['role'] | upper ~ ' ' ~ m['content'] | trim ~ eos_token ~ '\\n' }}"
        "{% endfor %}{{ 'turns=' ~ ns.n }}{% if add_generation_prompt %}{{ '\\nASSISTANT:' }}{% endif %}"
    ),
    "tojson and generation tags": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
        "{{ m.content | tojson }}{% endgeneration %}{% else %}{{ m | tojson }}{% endif %}"
        "{% endfor %}{{ dict(a=1) | tojson }}"
    ),
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path_factory.mktemp("tok") / "tok")))


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("gen", [False, True])
def test_renders_what_transformers_renders(tok, name, gen):
    template = TEMPLATES[name]
    for msgs in (MSGS, MSGS[1:], MSGS[1:3]):
        want = tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)
        assert render(tok, msgs, template, gen, "row 1") == want


BAD = {
    "nested range loops (~1e10 steps)": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        r"took more than [\d,]+ steps|took more than 5 s",
    ),
    "a string repeated 50,000,000 times": (
        "{{ messages[0]['content'] * 50000000 }}",
        r"a repeated string or list of more than [\d,]+ items",
    ),
    "doubling a string in a loop": (
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
        r"a string or list of more than [\d,]+ items",
    ),
    "a huge power": ("{{ 2 ** 100000000 }}", r"a power with an exponent above 1024"),
    "division by zero": ("{{ 1 / 0 }}", r"failed: ZeroDivisionError: division by zero"),
    "endless recursion": ("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", r"recursed without end"),
    "raise_exception": ("{{ raise_exception('only user/assistant roles') }}", r"failed: only user/assistant roles"),
    "not Jinja": ("{% for %}", r"is not a valid Jinja template"),
    "sandbox escape attempt": (
        "{{ messages.__class__.__mro__ }}",
        r"failed: access to attribute .__class__. of .list. object is unsafe",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_template_that_runs_away_or_fails_is_one_usage_error(tok, name):
    template, match = BAD[name]
    t0 = time.monotonic()
    with pytest.raises(UsageError, match=r"^row 7: --chat-template (stopped: it took |failed|recursed|is not)") as e:
        render(tok, MSGS, template, False, "row 7")
    assert e.match(match)
    assert time.monotonic() - t0 < chat_template.TIME_LIMIT_S + 5


def test_the_time_limit_holds_whatever_the_step_count(tok, monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_STEPS", 10**12)
    monkeypatch.setattr(chat_template, "TIME_LIMIT_S", 0.5)
    t0 = time.monotonic()
    with pytest.raises(UsageError, match=r"took more than 0\.5 s"):
        render(tok, MSGS, BAD["nested range loops (~1e10 steps)"][0], False, "row 1")
    assert time.monotonic() - t0 < 3
