"""Bits per byte: the tokenizer-free yardstick for language models with different tokenizers.

``bpb = NLL / (ln 2 * bytes)``: the total next-token negative log-likelihood in nats over the predicted tokens,
divided by the number of UTF-8 bytes of the text those tokens cover (their spans inside their segments,
:mod:`kdcli.lm.align`). Two models that predict the same text pay for the same bytes whatever their tokenizers, so
their bpb compare where perplexities per token do not (Gao et al. 2020, "The Pile", section 3; Radford et al. 2019
report bits per character the same way). A zero-width token (the EOS kdcli appends after a document or response,
a chat turn's end-of-turn marker) adds its NLL and no bytes: "where the segment ends" is information both models
must predict. Tokens outside every segment (a chat template's headers, when predicted) add their NLL and no bytes
either. *Approximation*: each model skips its own first token of a row (nothing predicts it), so the covered bytes
differ slightly between tokenizers (a row's first word); both are reported. The teacher's bpb comes from a cache
without the teacher: the stored ``target_logprobs`` are its log-probs of the tokens that follow (fp16) and the
stored spans their bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def covered_bytes(start: np.ndarray, end: np.ndarray) -> int:
    """UTF-8 bytes covered by predicted tokens with these spans (zero-width and unkeyed tokens: 0)."""
    return int((np.asarray(end, dtype=np.int64) - np.asarray(start, dtype=np.int64)).sum())


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
    """Total NLL in nats over ``num_bytes`` bytes -> bits per byte; nan when no byte was predicted."""
    return float(nll_nats) / (math.log(2.0) * num_bytes) if num_bytes > 0 else float("nan")


def cached_nll(target_logprobs: np.ndarray) -> float:
    """The teacher's total NLL in nats from a cache's ``target_logprobs`` (summed in float64)."""
    return -float(np.asarray(target_logprobs, dtype=np.float64).sum())


@dataclass
class BitsPerByte:
    """Accumulates NLL and covered bytes over batches; ``value`` is the bits per byte so far."""

    nll: float = 0.0
    bytes: int = 0
    tokens: int = 0

    def add(self, nll_nats: float, num_bytes: int, num_tokens: int = 0) -> None:
        self.nll += float(nll_nats)
        self.bytes += int(num_bytes)
        self.tokens += int(num_tokens)

    @property
    def value(self) -> float:
        return bits_per_byte(self.nll, self.bytes)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)
