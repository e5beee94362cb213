"""Language models: text DATA -> token ids, Hugging Face / built-in causal LMs, token-level teacher caches.

- :mod:`kdcli.lm.text`     -- tokenizers (HF dir, GGUF file, tokenizer.json); JSONL / Parquet / saved-dataset rows
  (text, prompt/response, chat); packing/truncation, chat templates, row hashes, the teacher-only prompt
- :mod:`kdcli.lm.hf`       -- causal LMs: Hugging Face dirs and GGUF files, the built-in ``transformer`` student
- :mod:`kdcli.cache.tokens`    -- reading token-level shards (flattened tokens + offsets)
- :mod:`kdcli.lm.head_loss` -- the student's output layer and the distillation loss fused, chunk by chunk
- :mod:`kdcli.lm.align`    -- where tokens sit in the text (byte spans in segments), the vocabulary as strings, the
  id -> bucket map between two vocabularies, the positions two tokenizations share
- :mod:`kdcli.lm.xtok`     -- what a token cache records for students with another tokenizer, and how they read it
- :mod:`kdcli.lm.xtok_loss` -- the cross-tokenizer losses (aligned, ULD, hybrid) from a cache
- :mod:`kdcli.lm.bpb`      -- bits per byte, the tokenizer-free yardstick

These are inputs to the language-model task (:mod:`kdcli.tasks.lm`), which the one cache pass, training loop and
eval (kdcli.stages.cache, kdcli.stages.train, kdcli.stages.evaluate) use when :func:`is_text_spec` says DATA is text.
Hugging Face tokenizers and models need the ``hf`` extra (``pip install kdcli[hf]``); Parquet and saved-dataset DATA the
``data-lm`` extra (pyarrow).
"""


def is_text_spec(spec: str | None) -> bool:
    """True for DATA specs that are language-model text, optionally sliced (``file.jsonl[0:100]``): a ``.jsonl``
    or ``.parquet`` file, a directory holding ``.parquet`` files, or a directory written by the ``datasets``
    package's ``save_to_disk`` (``state.json`` + ``dataset_info.json``; a ``DatasetDict``'s ``dataset_dict.json``,
    which then asks for one split). Decided from paths and file names: no file is opened, pyarrow is not imported."""
    if not spec:
        return False
    from pathlib import Path

    from kdcli.data import split_slice

    base = split_slice(spec)[0]
    if base.endswith(".jsonl"):
        return True
    from kdcli.lm.text import arrow_kind

    return arrow_kind(Path(base)) is not None
