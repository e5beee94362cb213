"""Two real, different tokenizers trained in memory with ``tokenizers`` for the cross-tokenizer tests: a byte-level BPE
(GPT-2 style, as SmolLM2/Llama 3/Qwen) and a sentencepiece-style BPE (Metaspace ``▁``, byte fallback ``<0xNN>``, as
Llama 2/Mistral/Gemma), on a small corpus with non-ASCII text."""

from __future__ import annotations

import json

from tests.lm_helpers import CORPUS

UNICODE = [
    "héllo wörld, naïve café — déjà vu",
    "the snowman ☃ and the comet ☄ over 日本",
    "façade jalapeño Ünïcödé señor",
    "emoji 😀 grin and 🎭 masks",
]
XCORPUS = CORPUS + UNICODE
TEXT = "the quick brown fox — héllo wörld ☃ jumps  over\n\nthe lazy dog 日本 😀 to be or not"


def byte_level_bpe(vocab_size: int = 300):
    """GPT-2 style byte-level BPE with ``<pad>`` and ``<eos>`` (as tests/lm_helpers.make_tokenizer, in memory)."""
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
    tok.train_from_iterator(XCORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def trimmed(tok):
    """The same byte-level tokenizer with a ByteLevel post-processor that trims offsets (leading spaces of "Ġthe"
    outside its reported span, as many Hugging Face byte-level tokenizers do)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    inner.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<eos>", pad_token="<pad>")


def metaspace_bpe(vocab_size: int = 220):
    """A sentencepiece-style BPE: Metaspace ``▁`` (prepended to the first word), byte fallback with the 256
    ``<0xNN>`` pieces in the model's vocabulary (not added tokens), ``<unk>``/``<s>``/``</s>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(XCORPUS * 4, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # sentencepiece keeps the byte pieces in the model vocabulary
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    inner = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="</s>", bos_token="<s>", unk_token="<unk>")
