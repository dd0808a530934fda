"""A sentence-packing chunker for Chinese (and any) text.

Every chunk keeps its character offsets into the source text, so ``text[chunk.start:chunk.end]``
is exactly ``chunk.text``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from peg_rag.core.text import normalize_width, split_sentences


@dataclass(frozen=True)
class Chunk:
    """A piece of a source text: ``source[start:end] == text``; ``index`` counts from 0."""

    text: str
    start: int
    end: int
    index: int


class Chunker:
    """Pack whole sentences into chunks of at most ``chunk_size`` units.

    Units are tokens of ``tokenizer`` (a Hugging Face fast tokenizer, special tokens not
    counted) or characters when there is none. A chunk's size is the sum of its sentences'
    sizes, each counted on its own. Consecutive chunks share up to ``chunk_overlap`` units
    of whole trailing sentences. A sentence longer than ``chunk_size`` is cut hard into
    pieces that fit, at token boundaries. ``chunk_size=0`` keeps each text whole.
    """

    def __init__(
        self,
        chunk_size: int = 256,
        chunk_overlap: int = 32,
        *,
        tokenizer=None,
        normalize: bool = False,
    ) -> None:
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 keeps texts whole), got {chunk_size}")
        if chunk_size and not 0 <= chunk_overlap < chunk_size:
            raise ValueError(
                f"chunk_overlap must be in [0, chunk_size={chunk_size}), got {chunk_overlap}"
            )
        if tokenizer is not None and not getattr(tokenizer, "is_fast", False):
            raise ValueError("the chunker needs a fast (Rust) tokenizer for its offset mapping")
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap if chunk_size else 0
        self.tokenizer = tokenizer
        self.normalize = normalize

    def split(self, text: str) -> list[Chunk]:
        """Chunk one text; whitespace at chunk edges is trimmed and blank chunks dropped."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str, got {type(text).__name__}")
        if self.normalize:
            text = normalize_width(text)
        if not self.chunk_size:
            spans = [(0, len(text))]
        else:
            units, sizes = self._units(text)
            spans = [(units[i][0], units[j - 1][1]) for i, j in self._pack(sizes)]
        chunks: list[Chunk] = []
        for start, end in spans:
            piece = text[start:end]
            stripped = piece.strip()
            if stripped:
                start += len(piece) - len(piece.lstrip())
                chunks.append(Chunk(stripped, start, start + len(stripped), len(chunks)))
        return chunks

    def _sizes(self, pieces: Sequence[str]) -> list[int]:
        if self.tokenizer is None:
            return [len(p) for p in pieces]
        if not pieces:
            return []
        ids = self.tokenizer(list(pieces), add_special_tokens=False)["input_ids"]
        return [len(row) for row in ids]

    def _units(self, text: str) -> tuple[list[tuple[int, int]], list[int]]:
        """Sentence spans with their sizes, over-long sentences cut into pieces that fit."""
        # Only leading whitespace forms a blank span (other whitespace joins its sentence).
        spans = [(s, e) for s, e in split_sentences(text) if text[s:e].strip()]
        sizes = self._sizes([text[s:e] for s, e in spans])
        units: list[tuple[int, int]] = []
        unit_sizes: list[int] = []
        for (start, end), size in zip(spans, sizes, strict=True):
            if size <= self.chunk_size:
                units.append((start, end))
                unit_sizes.append(size)
                continue
            for piece in self._hard_cut(text, start, end):
                piece_text = text[piece[0] : piece[1]]
                # A blank piece (a cut sentence's trailing newline) is no unit: a chunk that
                # began with one would strip to the same start as the chunk after it.
                if piece_text.strip():
                    units.append(piece)
                    unit_sizes.append(self._sizes([piece_text])[0])
        return units, unit_sizes

    def _hard_cut(self, text: str, start: int, end: int) -> list[tuple[int, int]]:
        """Cut text[start:end] into consecutive pieces of at most chunk_size units each."""
        if self.tokenizer is None:
            return [(s, min(s + self.chunk_size, end)) for s in range(start, end, self.chunk_size)]
        offsets = self.tokenizer(
            text[start:end], add_special_tokens=False, return_offsets_mapping=True
        )["offset_mapping"]
        token_starts = [start + a for a, _ in offsets]
        pieces: list[tuple[int, int]] = []
        first = 0  # index of the piece's first token
        while first < len(token_starts):
            piece_start = start if not pieces else pieces[-1][1]
            last = min(first + self.chunk_size, len(token_starts))
            # A piece tokenized on its own can take a token more than its share (a
            # SentencePiece word-start marker, say), so step back until it fits.
            while True:
                piece_end = token_starts[last] if last < len(token_starts) else end
                if (
                    last - first <= 1
                    or self._sizes([text[piece_start:piece_end]])[0] <= self.chunk_size
                ):
                    break
                last -= 1
            pieces.append((piece_start, piece_end))
            first = last
        return pieces

    def _pack(self, sizes: list[int]) -> list[tuple[int, int]]:
        """Greedy packing of unit sizes into [i, j) ranges with sentence-level overlap."""
        ranges: list[tuple[int, int]] = []
        i, n = 0, len(sizes)
        fresh = 0  # first unit the previous chunk did not contain
        while i < n:
            j, total = i, 0
            while j < n and total + sizes[j] <= self.chunk_size:
                total += sizes[j]
                j += 1
            j = max(j, i + 1)  # a unit alone never exceeds chunk_size, but be safe
            ranges.append((i, j))
            if j == n:
                break
            # Carry trailing units of this chunk into the next, within the overlap budget,
            # but never the whole chunk (so every step advances), never a unit the previous
            # chunk also held (so no text lands in three chunks), and never so much that the
            # next unit no longer fits.
            k, carried = j, 0
            while k - 1 > max(i, fresh - 1) and carried + sizes[k - 1] <= self.chunk_overlap:
                k -= 1
                carried += sizes[k]
            while k < j and carried + sizes[j] > self.chunk_size:
                carried -= sizes[k]
                k += 1
            fresh, i = j, k
        return ranges
