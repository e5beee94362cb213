"""Cross-tokenizer alignment (kdcli.lm.align) and bits per byte (kdcli.lm.bpb) with two real, different tokenizers
trained here: where tokens sit in the text (UTF-8 byte spans), the vocabulary as strings, the id -> bucket map, and
the positions where both predict from the same text. References: the text's own bytes, hand-written spans, and
kdcli's own tokenization of the same rows (kdcli.lm.text.load_text)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from kdcli.infra.errors import UsageError
from kdcli.lm.align import (
    EOS_KEY,
    NO_SEGMENT,
    TokenSpans,
    VocabMap,
    VocabStrings,
    align_keys,
    span_keys,
    text_segment,
    token_spans,
    vocab_map,
    vocab_strings,
)
from kdcli.lm.bpb import BitsPerByte, bits_per_byte, cached_nll
from kdcli.lm.text import TextSettings, load_text
from tests.lm_helpers import write_jsonl
from tests.xtok_helpers import TEXT, byte_level_bpe, metaspace_bpe, trimmed


@pytest.fixture(scope="module")
def toks():
    bl, ms = byte_level_bpe(), metaspace_bpe()
    return {"bl": (bl, vocab_strings(bl)), "ms": (ms, vocab_strings(ms)), "tr": (trimmed(bl), None)}


def spans_by_hand(pieces: list[str], eos_at: tuple = ()) -> TokenSpans:
    """Spans of consecutive pieces (ids = position), with zero-width tokens inserted before the piece indices in
    ``eos_at``."""
    start, end, pos = [], [], 0
    for i, p in enumerate(pieces):
        if i in eos_at:
            start.append(pos)
            end.append(pos)
        n = len(p.encode())
        start.append(pos)
        end.append(pos + n)
        pos += n
    ids = np.arange(len(start), dtype=np.int64)
    return TokenSpans(ids, np.array(start, dtype=np.int64), np.array(end, dtype=np.int64), pos)


# -- spans -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bl", "ms"])
def test_spans_tile_the_text_in_bytes(toks, name):
    tok, v = toks[name]
    data = TEXT.encode()
    s = token_spans(tok, TEXT, v)
    assert list(s.ids) == tok(TEXT, add_special_tokens=False)["input_ids"]
    assert s.num_bytes == len(data) and s.start[0] == 0 and s.end[-1] == len(data)
    assert np.array_equal(s.start[1:], s.end[:-1]) and (s.widths() >= 0).all()
    # every token covers exactly the bytes it spells, but sentencepiece's dummy-prefix space before the first word
    spelled = [v.span_bytes(int(i)) == data[a:b] for i, a, b in zip(s.ids, s.start, s.end)]
    if name == "bl":
        assert all(spelled)
        assert b"".join(v.surfaces[int(i)] for i in s.ids) == data
    else:
        assert v.surfaces[int(s.ids[0])] == b" " + data[s.start[0] : s.end[0]] and all(spelled[1:])


def test_multibyte_characters_split_by_byte(toks):
    """A byte-level BPE splits an unmerged character into one token per byte; the tokenizer reports the same
    character span for all of them; in bytes each gets its own."""
    tok, v = toks["bl"]
    text = "a ☃ b"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    s = token_spans(tok, text, v)
    snow = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if text[a:b] == "☃"]
    assert len(snow) >= 2 and len({tuple(enc["offset_mapping"][i]) for i in snow}) == 1  # same char span
    assert len({int(s.start[i]) for i in snow}) == len(snow)  # distinct byte spans
    touching = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a <= 2 < b]  # " ☃" and the rest of "☃"
    assert b"".join(text.encode()[s.start[i] : s.end[i]] for i in touching) == " ☃".encode()
    assert all(s.end[i] - s.start[i] == len(v.surfaces[int(s.ids[i])]) for i in touching)


def test_trimmed_offsets_give_the_same_spans(toks):
    """With trim_offsets the tokenizer leaves the leading space out of "Ġb"'s span (and gives a lone "Ġ" an empty
    one); spans put it back, so both tokenizers (same ids) get identical spans."""
    bl, v = toks["bl"]
    tr = toks["tr"][0]
    enc = tr(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    assert any(a == b for a, b in enc["offset_mapping"])  # the trimmed lone spaces
    a, b = token_spans(bl, TEXT, v), token_spans(tr, TEXT, v)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.start, b.start) and np.array_equal(a.end, b.end)


def test_sentencepiece_dummy_prefix_is_zero_width(toks):
    """A lone "▁" the tokenizer prepends before a word it cannot merge with shares that word's offsets; it covers
    nothing and the word starts at byte 0."""
    tok, v = toks["ms"]
    text = "жук x"
    s = token_spans(tok, text, v)
    first = v.surfaces[int(s.ids[0])]
    assert first == b" "  # the prepended ▁ on its own: ж is not in the vocabulary (byte fallback follows)
    assert s.start[0] == s.end[0] == 0 and s.start[1] == 0
    assert text.encode()[s.start[1] : s.end[1]] == v.surfaces[int(s.ids[1])]


def test_special_token_written_in_the_text_covers_its_characters(toks):
    tok, v = toks["bl"]
    text = "to be<eos> or not"
    s = token_spans(tok, text, v)
    i = list(s.ids).index(tok.eos_token_id)
    assert text.encode()[s.start[i] : s.end[i]] == b"<eos>" and v.surfaces[tok.eos_token_id] == "<eos>"


def test_slow_tokenizer_is_a_usage_error():
    slow = SimpleNamespace(is_fast=False, name_or_path="my-slow-tok")
    with pytest.raises(UsageError, match="fast tokenizer.*my-slow-tok"):
        token_spans(slow, "text")
    with pytest.raises(UsageError, match="fast tokenizer"):
        vocab_strings(slow)


# -- the vocabulary as strings -----------------------------------------------------------------------------------


def test_vocab_strings(toks):
    bl, vb = toks["bl"]
    ms, vm = toks["ms"]
    assert vb.kind == "byte_level" and vm.kind == "metaspace"
    assert vb.surfaces[bl.convert_tokens_to_ids("Ġ")] == b" " and vb.surfaces[bl.convert_tokens_to_ids("Ċ")] == b"\n"
    assert vb.surfaces[bl.convert_tokens_to_ids("Ã")] == b"\xc3"  # part of a UTF-8 character: its raw byte
    assert vm.surfaces[ms.convert_tokens_to_ids("<0xC3>")] == b"\xc3"  # byte fallback: the same byte
    assert vm.surfaces[ms.convert_tokens_to_ids("▁the")] == b" the"
    assert vb.surfaces[bl.eos_token_id] == "<eos>" and vm.surfaces[ms.eos_token_id] == "</s>"  # specials: str
    assert len(set(vb.surfaces)) == len(vb)  # a byte-level BPE spells every id differently
    padded = vocab_strings(bl, vocab_size=len(bl) + 3)
    assert padded.surfaces[-3:] == (None, None, None) and padded.surfaces[: len(bl)] == vb.surfaces
    for v in (vb, vm, padded):
        back = VocabStrings.from_json(v.to_json())
        assert back == v and back.sha256 == v.sha256
    assert vocab_strings(bl).sha256 == vb.sha256 != vm.sha256


def test_vocab_map_same_tokenizer_is_the_identity(toks):
    for name in ("bl", "ms"):
        v = toks[name][1]
        m = vocab_map(v, v)
        ident = VocabMap.identity(len(v))
        if len(set(v.surfaces)) == len(v):
            assert np.array_equal(m.teacher_bucket, ident.teacher_bucket) and m.sha256 == ident.sha256
        assert np.array_equal(m.teacher_bucket, m.student_bucket)


def test_vocab_map_matches_equal_strings_only(toks):
    vb, vm = toks["bl"][1], toks["ms"][1]
    m = vocab_map(vb, vm)
    assert 0 < m.num_matched < min(len(vb), len(vm))
    tc, sc = m.teacher_counts(), m.student_counts()
    for t_id in range(len(vb)):
        b = m.teacher_bucket[t_id]
        s_ids = np.flatnonzero(m.student_bucket == b)
        if b == m.rest:
            assert vb.surfaces[t_id] not in {vm.surfaces[i] for i in range(len(vm)) if m.student_bucket[i] != m.rest}
        else:
            assert all(vm.surfaces[i] == vb.surfaces[t_id] or (vb.surfaces[t_id] == "<eos>") for i in s_ids)
    # byte-level 0xC3 and the byte-fallback <0xC3> piece are the same event
    assert m.teacher_bucket[list(vb.surfaces).index(b"\xc3")] == m.student_bucket[list(vm.surfaces).index(b"\xc3")]
    # both EOS share a bucket (pair_eos), whatever they are called; without pairing they do not match
    assert m.teacher_bucket[vb.eos_id] == m.student_bucket[vm.eos_id] < m.rest
    apart = vocab_map(vb, vm, pair_eos=False)
    assert apart.teacher_bucket[vb.eos_id] == apart.rest
    s = m.summary()
    assert s["teacher_matched_ids"] == int(tc[: m.rest].sum()) and s["student_matched_ids"] == int(sc[: m.rest].sum())
    assert s["sha256"] == m.sha256 != apart.sha256


def test_vocab_map_merges_duplicate_strings():
    """Several ids spelling one string share one bucket on each side (their probabilities add up)."""
    t = VocabStrings((b"a", b" ", b"b", b" ", "<s>", None), None, "literal")  # " " twice (▁ and <0x20>)
    s = VocabStrings((b" ", b"b", b"c", b"a", b"a"), None, "literal")
    m = vocab_map(t, s)
    assert m.num_matched == 3  # a, " ", b (in teacher id order); <s>, None, c -> rest
    assert list(m.teacher_bucket) == [0, 1, 2, 1, 3, 3] and list(m.student_bucket) == [1, 2, 3, 0, 0]
    assert m.summary()["merged_buckets"] == 2 and EOS_KEY not in t.surfaces


# -- segments, keys, alignment --------------------------------------------------------------------------------


def segment_text(text: str, sp, i: int) -> bytes:
    return text.encode()[sp.start[i] : sp.end[i]]


@pytest.mark.parametrize("name", ["bl", "ms"])
@pytest.mark.parametrize("pack", [True, False])
def test_text_rows_keep_their_ids_and_key_every_token(toks, tmp_path, name, pack):
    """load_text(spans=True) gives the same sequences as without; every token of a document covers the bytes it
    spells inside its document, keys are distinct, and each document's EOS is zero-width at its end."""
    tok, v = toks[name]
    docs = [TEXT, "to be or not to be", "héllo wörld ☃"]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs])
    settings = TextSettings(max_length=12, pack=pack)
    plain, data = load_text(str(path), tok, settings), load_text(str(path), tok, settings, spans=True)
    assert len(plain.ids) == len(data.ids) and all(np.array_equal(a, b) for a, b in zip(plain.ids, data.ids))
    assert data.segments["count"] == 3 and data.segments["kind"] == "text"
    keys = np.concatenate([sp.keys() for sp in data.spans])
    assert len(set(keys[keys >= 0].tolist())) == int((keys >= 0).sum())
    for ids, sp in zip(data.ids, data.spans):
        for i, t in enumerate(ids):
            seg = int(sp.segment[i])
            if t == tok.eos_token_id:
                assert seg >= 0 and sp.start[i] == sp.end[i] == len(docs[seg].encode())
            elif seg != NO_SEGMENT:
                if name == "bl" or sp.start[i] > 0:  # (sentencepiece's dummy-prefix space is not in the text)
                    assert segment_text(docs[seg], sp, i) == v.span_bytes(int(t))
            else:
                assert sp.start[i] == sp.end[i]  # only zero-width tokens go without a key
    other = load_text(str(path), toks["ms" if name == "bl" else "bl"][0], settings, spans=True)
    assert other.segments == data.segments  # the segments are the text's, not the tokenizer's


def test_prompt_rows_have_a_prompt_and_a_response_segment(toks, tmp_path):
    tok, v = toks["bl"]
    rows = [{"prompt": "quote:", "response": " to be ☃"}, {"prompt": "name", "response": "héllo"}]
    data = load_text(str(write_jsonl(tmp_path / "p.jsonl", rows)), tok, TextSettings(max_length=64), spans=True)
    assert data.segments["count"] == 4
    sp = data.spans[0]
    r0 = int(data.response_start[0])
    assert set(sp.segment[:r0].tolist()) == {0} and set(sp.segment[r0:].tolist()) == {1}
    assert sp.start[r0] == 0 and sp.end[-1] == len(" to be ☃".encode()) == sp.start[-1]  # EOS zero-width at the end


def test_chat_rows_key_the_assistant_content_and_the_end_of_turn(tmp_path):
    """Chat rows: each assistant turn's content is a segment; its tokens are keyed relative to the content, the
    first token of the end-of-turn marker is zero-width at the content's end; headers and other turns have no key.
    Two templates that write different headers and markers give the same keys for the content."""

    tok = byte_level_bpe()
    t1 = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<eos>{% endfor %}"
    t2 = "{% for m in messages %}### {{ m.role }}:\n{{ m.content }}\n<pad>{% endfor %}"
    msgs = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "to be ☃ or not"}]},
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b c"},
                {"role": "user", "content": "d"},
                {"role": "assistant", "content": " the end "},
            ]
        },
    ]
    path = write_jsonl(tmp_path / "c.jsonl", msgs)
    keys = []
    for tpl in (t1, t2):
        data = load_text(str(path), tok, TextSettings(max_length=256, chat_template=tpl), spans=True, target_masks=True)
        assert data.segments == {"kind": "chat", "count": 3, "sha256": data.segments["sha256"]}
        k = []
        for r, (ids, sp) in enumerate(zip(data.ids, data.spans)):
            mask = data.target_mask[r] if data.target_mask is not None else np.arange(len(ids)) >= data.first_target[r]
            k.append(sorted(sp.keys()[mask & (sp.segment >= 0)].tolist()))
            ends = np.flatnonzero((sp.segment >= 0) & (sp.start == sp.end))
            assert len(ends) == (1 if r == 0 else 2)
        keys.append(k)
    assert keys[0] == keys[1]  # the same content keys whatever the template
    assert (2 << 32 | len(b"the end")) in keys[0][1]  # a turn's content is stripped


def test_slow_tokenizer_spans_are_a_usage_error(tmp_path):
    slow = SimpleNamespace(is_fast=False, name_or_path="my-slow-tok", eos_token_id=0)
    with pytest.raises(UsageError, match="fast tokenizer.*my-slow-tok"):
        load_text(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}])), slow, TextSettings(), spans=True)


def test_align_keys_by_hand():
    """teacher "ab"|" cd" vs student "a"|"b"|" c"|"d" in segment 3: only " c"/" cd" start at a shared boundary."""
    t = span_keys(np.array([3, 3]), np.array([0, 2]))
    s = span_keys(np.array([3, 3, 3, 3]), np.array([0, 1, 2, 4]))
    si, ti = align_keys(t[1:], s[1:])  # the first token of each is not predicted
    assert list(si) == [1] and list(ti) == [0]
    si, ti = align_keys(np.array([-1, 5, 7]), np.array([7, -1, 5, 9]))
    assert list(si) == [0, 2] and list(ti) == [2, 1]  # ordered by the student; -1 never aligns


def test_two_tokenizers_align_at_shared_boundaries(toks):
    """Every aligned pair starts at the same byte, every shared boundary is aligned, and both EOS align."""
    (bt, bv), (mt, mv) = toks["bl"], toks["ms"]
    t_ids, t = text_segment(bt, bv, TEXT, 0, bt.eos_token_id)
    s_ids, s = text_segment(mt, mv, TEXT, 0, mt.eos_token_id)
    tk, sk = t.keys()[1:], s.keys()[1:]
    si, ti = align_keys(tk, sk)
    assert np.array_equal(t.start[1:][ti], s.start[1:][si]) and np.all(np.diff(si) > 0)
    shared = set(tk[tk >= 0].tolist()) & set(sk[sk >= 0].tolist())
    assert len(si) == len(shared) and 0.3 < len(si) / len(sk) < 1.0
    assert s_ids[1:][si[-1]] == mt.eos_token_id and t_ids[1:][ti[-1]] == bt.eos_token_id


# -- bits per byte -----------------------------------------------------------------------------------------------


def test_bits_per_byte(toks):
    assert bits_per_byte(10 * math.log(2.0), 5) == pytest.approx(2.0)
    assert math.isnan(bits_per_byte(1.0, 0))
    lp = np.array([-0.5, -1.25, -0.25], dtype=np.float16)
    assert cached_nll(lp) == pytest.approx(2.0)
    acc = BitsPerByte()
    acc.add(3 * math.log(2.0), 2, 1)
    acc.add(1 * math.log(2.0), 2, 1)
    assert acc.value == pytest.approx(1.0) and acc.bytes_per_token == 2.0


def test_vocab_map_projection_by_hand():
    t = VocabStrings((b" hello", b" hel", b" h", b"x", "<s>"), None, "literal")
    s = VocabStrings((b" hel", b" h", b" help", b"y", b" hi"), None, "literal")
    strict, proj = vocab_map(t, s), vocab_map(t, s, project=True)
    assert strict.num_matched == proj.num_matched == 2  # " hel" (0), " h" (1)
    assert list(strict.teacher_bucket) == [2, 0, 1, 2, 2] and list(strict.student_bucket) == [0, 1, 2, 2, 2]
    assert list(proj.teacher_bucket) == [0, 0, 1, 2, 2]  # " hello" -> " hel"; "x", "<s>": no shared prefix
    assert list(proj.student_bucket) == [0, 1, 0, 2, 1]  # " help" -> " hel", " hi" -> " h"
    assert proj.sha256 != strict.sha256 and proj.summary()["projected"]
