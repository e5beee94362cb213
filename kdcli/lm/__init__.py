"""Language models: JSONL text -> token ids, Hugging Face / built-in causal LMs, token-level teacher caches.

- :mod:`kdcli.lm.text`     -- tokenizers (HF dir, GGUF file, tokenizer.json), JSONL rows, packing/truncation, row hashes
- :mod:`kdcli.lm.hf`       -- causal LMs: Hugging Face dirs and GGUF files, the built-in ``transformer`` student
- :mod:`kdcli.lm.cache`    -- reading token-level shards (flattened tokens + offsets)
- :mod:`kdcli.lm.head_loss` -- the student's output layer and the distillation loss fused, chunk by chunk

These are inputs to the language-model task (:mod:`kdcli.tasks.lm`), which the one cache pass, training loop and
eval (kdcli.teacher, kdcli.train, kdcli.evaluate) use when DATA is text.
Everything here needs the ``hf`` extra only for Hugging Face tokenizers and models (``pip install kdcli[hf]``).
"""


def is_text_spec(spec: str | None) -> bool:
    """True for DATA specs that are JSONL text (optionally sliced: ``file.jsonl[0:100]``)."""
    if not spec:
        return False
    from kdcli.data import split_slice

    return split_slice(spec)[0].endswith(".jsonl")
