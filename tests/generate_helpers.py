"""Fixtures for the ``cache-teacher --generate`` tests: a word-level tokenizer whose decoded text always re-tokenizes
to the ids it came from, so a tiny random teacher's answers line up with the student's rows (no row is rescored and
every cached position comes from the logits generation computed), and prompt rows."""

from __future__ import annotations

import json
from pathlib import Path

from lm_helpers import CORPUS, make_llama
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.infra import crashpoints

# A turn is "role\ncontent<eos>\n"; the generation prompt "assistant\n": the end-of-turn token is <eos>.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}\n{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant\n{% endif %}"
)
PERSONA = "Answer like a poet."
SPECIALS = ["<pad>", "<eos>", "[UNK]"]


def make_word_tokenizer(directory: Path, chat_template: str | None = TEMPLATE) -> Path:
    """A WordLevel tokenizer over the corpus's words, digits, ':' and the chat roles; whitespace and punctuation
    split words, decoding joins them with one space, so decode -> encode gives back the ids (specials included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for line in CORPUS for w in line.split()} | set("0123456789") | {":", "user", "assistant"})
    vocab = {t: i for i, t in enumerate(SPECIALS + ["system"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="[UNK]")
    if chat_template is not None:
        fast.chat_template = chat_template
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return directory


def word_teacher(root: Path, **kw) -> tuple[Path, Path]:
    """(teacher dir, tokenizer dir): a random tiny Llama over the word tokenizer (its files beside the weights)."""
    tok = make_word_tokenizer(root / "wtok")
    return make_llama(root / "wteacher", tok, **kw), tok


def prompt_rows(n: int) -> list[dict]:
    return [{"prompt": f"quote {i}: {CORPUS[i % len(CORPUS)].rsplit(' ', 2)[0]}"} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(*argv, code: int = 0, env: dict | None = None):
    """kdcli in-process as a user runs it (fault-injection crash points reset), asserting its exit code."""
    crashpoints.reset()
    r = CliRunner().invoke(app, [str(a) for a in argv], env=env)
    assert r.exit_code == code, r.stderr[-3000:]
    return r
