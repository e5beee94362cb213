"""``cache-teacher --generate``: the options that make the teacher write the answers (a part of
:class:`~kdcli.config.commands.CacheConfig`), and the check that refuses them without ``--generate``.

The names are fixed by the issue that asked for them (scripts rely on them) and are distinct from the cache's
``--top-k`` / ``--temperatures`` and the loss's ``--temperature``: ``--max-new-tokens``, ``--generations-per-prompt``,
``--sample``, ``--gen-temperature``, ``--top-p``; ``--seed`` (shared with the sampled cache modes) seeds the draws.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdcli.config.base import LANGUAGE_MODEL, TEMPERATURE_MAX, TEMPERATURE_MIN, fields_of, flag_name, given, opt
from kdcli.infra.errors import UsageError

LM = (LANGUAGE_MODEL,)


@dataclass(kw_only=True)
class Generation:
    """The teacher answers DATA's prompts; the cache covers exactly its answers (docs/lm.md, "The teacher writes
    the answers")."""

    generate: bool = opt(
        False,
        'LM: the teacher answers DATA\'s prompt rows ({"prompt": ...}, or chat rows whose last '
        "turn is the user's), seeing --teacher-prompt; the answers are written to "
        "CACHE_DIR/answers.jsonl as chat rows without the teacher prompt (train-student --data "
        "CACHE_DIR/answers.jsonl --cache CACHE_DIR), and the cache holds the teacher's "
        "distributions at exactly the answer tokens, taken from the logits generation computed "
        "(no second pass). Greedy unless --sample; stops at the end-of-turn / EOS token.",
        panel="Generation",
        tasks=LM,
    )
    max_new_tokens: int = opt(
        256,
        "--generate: answer tokens per generation at most (the end-of-turn token not counted; a "
        "longer answer is closed there, finish_reason length). Also capped so prompt + answer fit "
        "--max-length.",
        min=1,
        panel="Generation",
        tasks=LM,
    )
    generations_per_prompt: int = opt(
        1,
        "--generate --sample: answers per prompt row, each its own answers row (and cache row).",
        min=1,
        panel="Generation",
        tasks=LM,
    )
    sample: bool = opt(
        False,
        "--generate: sample the answers from softmax(logits / --gen-temperature), top-p "
        "filtered, instead of greedy. Each draw depends only on --seed, the prompt's content and "
        "the generation index: re-runs, resumed runs and torchrun runs give the same answers.",
        panel="Generation",
        tasks=LM,
    )
    gen_temperature: float = opt(
        1.0,
        "--sample: the temperature the answers are drawn at (not the cache's or the loss's).",
        min=TEMPERATURE_MIN,
        max=TEMPERATURE_MAX,
        panel="Generation",
        tasks=LM,
    )
    top_p: float = opt(
        1.0,
        "--sample: nucleus sampling, draw from the smallest set of most probable tokens with mass >= P.",
        gt=0.0,
        max=1.0,
        panel="Generation",
        tasks=LM,
    )
    answers_parquet: bool = opt(
        False,
        "--generate: also write the answers as CACHE_DIR/answers.parquet (the same rows; needs pyarrow).",
        panel="Generation",
        tasks=LM,
    )


GENERATION_OPTIONS = tuple(f.name for f in fields_of(Generation) if f.name != "generate")


def check_generation_options(cfg) -> None:
    """Refuse (exit 2, one line) a generation option given without ``--generate``, and with it an option that only
    shapes text rows: either would be ignored."""
    if getattr(cfg, "generate", False):
        if "no_pack" in given(cfg):
            raise UsageError(
                "--no-pack shapes text rows; --generate reads prompt rows, each answer its own sequence: drop it"
            )
        return
    for name in GENERATION_OPTIONS:
        if name in given(cfg):
            raise UsageError(
                f"{flag_name(name)} shapes the answers the teacher writes with --generate; without --generate the "
                "cache covers DATA's own text and would ignore it: add --generate or drop it"
            )
