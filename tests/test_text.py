"""Chinese sentence splitting, width normalization and the chunker's guarantees."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from peg_rag.core.text import normalize_width, split_sentences
from peg_rag.retrieval.chunker import Chunker

# Text drawn from CJK characters, sentence ends, closers, spaces, newlines and some ASCII.
ALPHABET = (
    list("医保报销材料需要准备哪些高血压患者饮食") + list("。！？!?；;…”）」\n ,，") + list("ab1")
)
texts = st.text(alphabet=ALPHABET, min_size=0, max_size=300)


def test_split_sentences_keeps_closers_and_tiles_the_text():
    text = "他说：“今天很好。”我们走吧！好啊？？\n\n第二段；内容……结束"
    spans = split_sentences(text)
    assert [text[a:b] for a, b in spans] == [
        "他说：“今天很好。”",
        "我们走吧！",
        "好啊？？\n\n",
        "第二段；",
        "内容……",
        "结束",
    ]
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_split_sentences_ascii_punctuation_and_empty():
    assert [s for s in split_sentences("Hi! OK? yes; no")] == [(0, 4), (4, 8), (8, 13), (13, 15)]
    assert split_sentences("") == []


def test_normalize_width_maps_one_to_one():
    text = "ＡＢＣ１２３，？！（）　ｶﾀｶﾅ 中文。"
    out = normalize_width(text)
    assert out == "ABC123,?!() カタカナ 中文。"
    assert len(out) == len(text)


def _check_chunks(text: str, chunks, size_of, chunk_size: int, overlap: int) -> None:
    covered = [False] * len(text)
    for c in chunks:
        assert text[c.start : c.end] == c.text
        assert c.text and c.text == c.text.strip()
        assert size_of(c.text) <= chunk_size
        for i in range(c.start, c.end):
            covered[i] = True
    # Nothing lost: every non-space character is in some chunk.
    assert all(covered[i] for i, ch in enumerate(text) if not ch.isspace())
    # Nothing duplicated beyond the overlap: only neighbours share text, and at most overlap.
    for i, (a, b) in enumerate(zip(chunks, chunks[1:], strict=False)):
        assert a.start < b.start and a.end <= b.end
        assert size_of(text[b.start : max(b.start, a.end)]) <= overlap
        if i + 2 < len(chunks):
            assert chunks[i + 2].start >= a.end
    assert [c.index for c in chunks] == list(range(len(chunks)))


def _cuts_only_long_sentences(text: str, chunks, size_of, chunk_size: int) -> None:
    """A chunk edge inside a sentence (ignoring its edge whitespace) needs a long sentence."""
    spans = split_sentences(text)
    for c in chunks:
        for edge in (c.start, c.end):
            for s, e in spans:
                if s < edge < e and text[s:edge].strip() and text[edge:e].strip():
                    assert size_of(text[s:e]) > chunk_size, (text[s:e], edge)


@settings(max_examples=200, deadline=None)
@given(texts, st.integers(1, 40), st.integers(0, 39))
@example("111\n1;1", 3, 2)  # a cut sentence's blank tail once made two chunks start alike
def test_chunker_properties_in_characters(text, chunk_size, overlap):
    overlap = min(overlap, chunk_size - 1)
    chunks = Chunker(chunk_size, overlap).split(text)
    _check_chunks(text, chunks, len, chunk_size, overlap)
    _cuts_only_long_sentences(text, chunks, len, chunk_size)


@pytest.fixture(scope="module")
def char_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@settings(max_examples=60, deadline=None)
@given(texts, st.integers(2, 30), st.integers(0, 29))
def test_chunker_properties_in_tokens(char_tokenizer, text, chunk_size, overlap):
    overlap = min(overlap, chunk_size - 1)

    def size_of(piece: str) -> int:
        return len(char_tokenizer(piece, add_special_tokens=False)["input_ids"])

    chunks = Chunker(chunk_size, overlap, tokenizer=char_tokenizer).split(text)
    _check_chunks(text, chunks, size_of, chunk_size, overlap)
    _cuts_only_long_sentences(text, chunks, size_of, chunk_size)


def test_sentences_are_packed_whole_with_overlap():
    text = "第一句话。第二句话。第三句话。第四句话。"
    chunks = Chunker(10, 5).split(text)
    assert [c.text for c in chunks] == [
        "第一句话。第二句话。",
        "第二句话。第三句话。",
        "第三句话。第四句话。",
    ]


def test_long_sentence_is_cut_hard_and_chunk_size_zero_keeps_text_whole():
    text = "甲" * 25 + "。短句。"
    chunks = Chunker(10, 0).split(text)
    # 26 characters cut into 10 + 10 + 6; the last piece ("甲甲甲甲甲。") packs with "短句。".
    assert [len(c.text) for c in chunks] == [10, 10, 9]
    assert Chunker(0).split("  整篇。文档。 ")[0].text == "整篇。文档。"


@pytest.mark.slow
def test_hard_cut_fits_a_sentencepiece_tokenizer(me5_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(me5_dir)
    text = "这是一个没有标点符号的非常长的句子" * 20 + "。再来一句 with some English words。"
    chunks = Chunker(16, 4, tokenizer=tokenizer).split(text)
    sizes = [len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) for c in chunks]
    assert max(sizes) <= 16 and min(sizes[:-1]) > 8
    assert all(text[c.start : c.end] == c.text for c in chunks)


def test_chunker_rejects_bad_settings(char_tokenizer):
    with pytest.raises(ValueError, match="chunk_overlap"):
        Chunker(10, 10)
    with pytest.raises(ValueError, match="chunk_size"):
        Chunker(-1)
    with pytest.raises(TypeError):
        Chunker(10, 2).split(None)


def test_normalize_option_keeps_offsets_valid():
    text = "ＣＴ检查结果。ＭＲＩ也要做！"
    chunks = Chunker(8, 0, normalize=True).split(text)
    assert [c.text for c in chunks] == ["CT检查结果。", "MRI也要做!"]
    assert [text[c.start : c.end] for c in chunks] == ["ＣＴ检查结果。", "ＭＲＩ也要做！"]
