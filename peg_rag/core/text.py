"""Chinese text basics: width normalization and sentence splitting.

Width normalization maps one character to one character, so offsets into normalized text
are also offsets into the original; sentence spans tile the text without gaps. The chunker
(retrieval), BM25 (retrieval) and the demo's fallback model (apps) build on both.
"""

from __future__ import annotations

import re
import unicodedata

# Characters that end a sentence, and closing quotes/brackets that stay with the sentence
# they close. ASCII quotes are left out: an ASCII '"' after a full stop is as often the
# opening quote of the next sentence as the closing quote of this one.
SENTENCE_ENDS = "。！？!?；;…\n"
CLOSERS = "”’」』）】》〉〕］｝)]}"
_SENTENCE = re.compile(
    f"[^{re.escape(SENTENCE_ENDS)}]*[{re.escape(SENTENCE_ENDS)}]*[{re.escape(CLOSERS)}]*\\s*"
)


def _width_table() -> dict[int, str]:
    """Full-width ASCII, the ideographic space and half-width katakana/hangul to their
    canonical forms, keeping only one-character-to-one-character mappings."""
    table = {}
    for code in [0x3000, *range(0xFF01, 0xFFEF)]:
        mapped = unicodedata.normalize("NFKC", chr(code))
        if len(mapped) == 1 and mapped != chr(code):
            table[code] = mapped
    return table


_WIDTH_TABLE = _width_table()


def normalize_width(text: str) -> str:
    """Map full-width ASCII (ＡＢＣ１２３，？) to half-width and half-width katakana to
    full-width, as NFKC does, but character for character so the length never changes."""
    return text.translate(_WIDTH_TABLE)


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Split text into sentence spans ``(start, end)`` that tile it without gaps.

    A sentence ends at a run of 。！？!?；;… or newlines; closing quotes and brackets that
    follow stay with it, and so does the whitespace after it.
    """
    return [m.span() for m in _SENTENCE.finditer(text) if m.end() > m.start()]
