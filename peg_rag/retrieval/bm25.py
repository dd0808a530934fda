"""BM25 over jieba tokens, on bm25s, with the tokenizer configuration persisted in the index.

Whitespace or ``\\w+`` tokenizers see a whole Chinese sentence as one token, so a Chinese
query matches almost nothing. Here jieba segments the text (search mode by default, which
also emits the shorter words inside long ones), then tokens are lowercased, width-normalized,
and punctuation and stopwords are dropped. Every Chinese character is also indexed on its
own, so a query still matches when jieba segments it differently from the document
(孕妇 / 怀孕, 术后 / 手术后); on the shared medical sets this lifted BM25 nDCG@10 by about
six points (benchmarks/RESULTS.md). The same settings must tokenize queries and
documents, so they are saved with the index (JSON) next to its arrays (numpy, never pickle).

The segmenter is jieba itself (pure Python) or rjieba, the bindings of jieba-rs: the same
dictionary and algorithm in Rust, about 20 times faster, whose words differ from jieba's on
some texts.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import bm25s
import jieba
import numpy as np
from tqdm.auto import tqdm

from peg_rag.core.files import read_json, write_json
from peg_rag.core.text import normalize_width

from .settings import BM25_TOKENIZERS, DEFAULT_BM25_TOKENIZER, BM25Tokenizer, check_choice

logger = logging.getLogger("peg_rag")
jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict" lines on every start

FORMAT_VERSION = 1
_TOKENIZER_FILE = "tokenizer.json"
_INDEX_FILE = "bm25.json"
_ARRAYS_FILE = "bm25.npz"
# Chinese characters: the CJK unified ideographs, extension A and compatibility ideographs.
_CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF))
# A letter or digit: exactly what str.isalnum() accepts (\w without the underscore).
_ALNUM = re.compile(r"[^\W_]")


def bundled_stopwords(language: str) -> list[str]:
    """The stopword list shipped with peg-rag for ``"zh"`` or ``"en"``."""
    if language not in ("zh", "en"):
        raise ValueError(f"bundled stopwords exist for 'zh' and 'en', not {language!r}")
    text = resources.files("peg_rag.data").joinpath(f"stopwords_{language}.txt").read_text("utf-8")
    return [w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#")]


def read_user_dict(path: str | os.PathLike[str]) -> list[list[Any]]:
    """Read a jieba user dictionary (``word [freq] [tag]`` per line) into JSON-able entries."""
    entries: list[list[Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) > 3:
                raise ValueError(f"{path}:{number}: expected 'word [freq] [tag]', got {line!r}")
            freq: int | None = None
            tag: str | None = None
            for extra in fields[1:]:
                if extra.isdigit() and freq is None and tag is None:
                    freq = int(extra)
                else:
                    tag = extra
            entries.append([fields[0], freq, tag])
    return entries


# Loading a dictionary takes most of a second with jieba (a tenth with rjieba), so segmenters
# are shared per kind and set of user words. Each is private to peg-rag: user words never
# leak into jieba's or rjieba's global state.
_SEGMENTERS: dict[tuple[str, str], Any] = {}


def _new_jieba(user_words: list[list[Any]]) -> jieba.Tokenizer:
    segmenter = jieba.Tokenizer()
    base = _SEGMENTERS.get(("jieba", "[]"))
    if user_words and base is not None:
        # Start from the loaded default dictionary instead of reading it again.
        segmenter.FREQ, segmenter.total = dict(base.FREQ), base.total
        segmenter.initialized = True
    else:
        segmenter.initialize()
    for word, freq, tag in user_words:
        segmenter.add_word(word, freq, tag)
    return segmenter


def _new_rjieba(user_words: list[list[Any]]) -> Any:
    # Imported here: importing rjieba builds its global default segmenter (0.1 s).
    import rjieba

    segmenter = rjieba.Jieba()
    for word, freq, tag in user_words:
        segmenter.add_word(word, freq, tag)
    return segmenter


_NEW_SEGMENTER = {"jieba": _new_jieba, "rjieba": _new_rjieba}


def _chinese_chars_except(excluded: Iterable[str]) -> re.Pattern[str]:
    """A pattern for one Chinese character other than the ``excluded`` ones: the ranges with
    a hole at each, so that findall needs no filtering afterwards (twice as fast)."""
    holes = sorted({ord(ch) for ch in excluded if len(ch) == 1})
    spans = []
    for low, high in _CJK_RANGES:
        start = low
        for hole in (h for h in holes if low <= h <= high):
            if start < hole:
                spans.append((start, hole - 1))
            start = hole + 1
        if start <= high:
            spans.append((start, high))
    return re.compile("[" + "".join(f"{chr(a)}-{chr(b)}" for a, b in spans) + "]")


class _Vocabulary(dict[str, int]):
    """Word -> id, where looking up a new word numbers it (the next id), so that a row's
    words map to ids in one ``map`` instead of a Python loop."""

    def __missing__(self, word: str) -> int:
        self[word] = number = len(self)
        return number


class ChineseTokenizer:
    """jieba segmentation plus the normalization BM25 needs; fully described by to_json().

    - ``segmenter``: "jieba" (pure Python) or "rjieba" (jieba-rs, about 20x faster);
      see ``DEFAULT_BM25_TOKENIZER`` in :mod:`.settings` for the default.
    - ``mode``: "search" (jieba's cut_for_search: long words and the words inside them)
      or "precise" (jieba.cut).
    - ``user_dict``: a jieba user-dictionary file, or ``user_words`` entries
      ``[word, freq|None, tag|None]``; both are copied into the configuration and added to
      either segmenter's dictionary.
    - ``stopwords``: the words to drop; defaults to the bundled Chinese list, plus the
      bundled English list with ``english_stopwords=True``.
    - ``char_unigrams``: also emit each Chinese character that is not a stopword.
    """

    def __init__(
        self,
        *,
        segmenter: BM25Tokenizer = DEFAULT_BM25_TOKENIZER,
        mode: str = "search",
        hmm: bool = True,
        lowercase: bool = True,
        normalize: bool = True,
        stopwords: Iterable[str] | None = None,
        english_stopwords: bool = False,
        user_dict: str | os.PathLike[str] | None = None,
        user_words: Iterable[Sequence[Any]] = (),
        char_unigrams: bool = True,
    ) -> None:
        if mode not in ("search", "precise"):
            raise ValueError(f"mode must be 'search' or 'precise', got {mode!r}")
        check_choice("segmenter", segmenter, BM25_TOKENIZERS)
        self.segmenter = segmenter
        self.mode = mode
        self.hmm = hmm
        self.lowercase = lowercase
        self.normalize = normalize
        self.char_unigrams = char_unigrams
        if stopwords is None:
            stopwords = bundled_stopwords("zh") + (
                bundled_stopwords("en") if english_stopwords else []
            )
        self.stopwords = sorted({self._clean(w) for w in stopwords if w.strip()})
        self.user_words = [list(entry) for entry in user_words]
        if user_dict is not None:
            self.user_words += read_user_dict(user_dict)
        self._stopword_set = frozenset(self.stopwords)
        self._chars = _chinese_chars_except(self._stopword_set)
        self._cut: Callable[[str], Iterable[str]] | None = None

    def _clean(self, text: str) -> str:
        if self.normalize:
            text = normalize_width(text)
        return text.lower() if self.lowercase else text

    def _words(self) -> Callable[[str], Iterable[str]]:
        """The segmenting function, on a private segmenter (never the library's global one)
        with the user words added."""
        if self._cut is None:
            key = (self.segmenter, json.dumps(self.user_words, ensure_ascii=False))
            if key not in _SEGMENTERS:
                _SEGMENTERS[key] = _NEW_SEGMENTER[self.segmenter](self.user_words)
            engine = _SEGMENTERS[key]
            cut = engine.cut_for_search if self.mode == "search" else engine.cut
            # jieba and rjieba spell the HMM keyword differently.
            self._cut = partial(cut, **{"HMM" if self.segmenter == "jieba" else "hmm": self.hmm})
        return self._cut

    def __call__(self, text: str) -> list[str]:
        """Tokens of one text: segmented, normalized, without punctuation and stopwords."""
        text = self._clean(text)
        words = self._words()(text)
        stop = self._stopword_set
        has_alnum = _ALNUM.search
        # A token without a letter or digit is punctuation or whitespace.
        tokens = [w for w in words if w not in stop and has_alnum(w)]
        if self.char_unigrams:
            tokens += self._chars.findall(text)
        return tokens

    def to_json(self) -> dict[str, Any]:
        return {
            "segmenter": self.segmenter,
            "mode": self.mode,
            "hmm": self.hmm,
            "lowercase": self.lowercase,
            "normalize": self.normalize,
            "stopwords": self.stopwords,
            "user_words": self.user_words,
            "char_unigrams": self.char_unigrams,
        }

    @classmethod
    def from_json(cls, config: dict[str, Any]) -> ChineseTokenizer:
        return cls(
            # Configurations saved before rjieba was offered have no key: they used jieba.
            segmenter=config.get("segmenter", "jieba"),
            mode=config["mode"],
            hmm=config["hmm"],
            lowercase=config["lowercase"],
            normalize=config["normalize"],
            stopwords=config["stopwords"],
            user_words=config["user_words"],
            char_unigrams=config["char_unigrams"],
        )


class BM25Index:
    """A BM25 index of texts under string ids, with add/delete and filter masks.

    It keeps every row's token ids, so adding or deleting rows only marks the bm25s score
    matrix stale; the matrix (whose IDF depends on all rows) is rebuilt on the next search
    or save. Row order is insertion order with deleted rows removed.
    """

    METHODS = ("lucene", "robertson", "atire")

    def __init__(
        self,
        tokenizer: ChineseTokenizer | None = None,
        *,
        k1: float = 1.2,
        b: float = 0.75,
        method: str = "lucene",
    ) -> None:
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}")
        self.tokenizer = tokenizer or ChineseTokenizer()
        self.k1 = k1
        self.b = b
        self.method = method
        self.ids: list[str] = []
        self._row: dict[str, int] = {}
        self._tokens: list[np.ndarray] = []  # token ids of each row
        self._vocab = _Vocabulary()
        self._model = None  # bm25s.BM25, None while stale

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item: object) -> bool:
        return item in self._row

    def row(self, item: str) -> int:
        """The row of an id (the position its score has in :meth:`scores`)."""
        return self._row[item]

    def tokenize_many(self, texts: Sequence[str], show_progress: bool = False) -> list[list[str]]:
        return [
            self.tokenizer(t) for t in tqdm(texts, desc="BM25 tokenize", disable=not show_progress)
        ]

    def add(self, ids: Sequence[str], texts: Sequence[str], *, show_progress: bool = False) -> None:
        """Add texts under new ids; an id already present raises ValueError."""
        self.add_tokens(ids, self.tokenize_many(texts, show_progress))

    def add_tokens(self, ids: Sequence[str], tokens: Sequence[Sequence[str]]) -> None:
        """Add pre-tokenized rows (from :meth:`tokenize_many`)."""
        if len(ids) != len(tokens):
            raise ValueError(f"{len(ids)} ids but {len(tokens)} token lists")
        clash = [i for i in ids if i in self._row]
        if clash or len(set(ids)) != len(ids):
            raise ValueError(f"ids already in the index or repeated: {(clash or list(ids))[:5]}")
        word_id = self._vocab.__getitem__  # numbers new words
        for item, words in zip(ids, tokens, strict=True):
            self._row[item] = len(self.ids)
            self.ids.append(item)
            self._tokens.append(np.array(list(map(word_id, words)), dtype=np.int32))
        self._model = None

    def delete(self, ids: Iterable[str]) -> int:
        """Remove ids (unknown ones are ignored); returns how many were removed."""
        doomed = {i for i in ids if i in self._row}
        if not doomed:
            return 0
        keep = [r for r, item in enumerate(self.ids) if item not in doomed]
        self.ids = [self.ids[r] for r in keep]
        self._tokens = [self._tokens[r] for r in keep]
        self._row = {item: r for r, item in enumerate(self.ids)}
        self._model = None
        return len(doomed)

    def _built(self):
        """The bm25s model over the current rows, rebuilt when stale."""
        if self._model is None:
            self._prune_vocab()
            matrix = None
            if self.ids:
                matrix = _score_matrix(self._tokens, len(self._vocab), self.k1, self.b, self.method)
            self._model = _scorer(self, matrix)
        return self._model

    def _prune_vocab(self) -> None:
        """Forget words no row uses any more (after deletes), renumbering the rest."""
        flat = np.concatenate(self._tokens) if self._tokens else np.empty(0, np.int32)
        used = np.unique(flat)
        if len(used) == len(self._vocab):
            return
        remap = np.full(len(self._vocab), -1, dtype=np.int32)
        remap[used] = np.arange(len(used), dtype=np.int32)
        self._tokens = [remap[t] for t in self._tokens]
        words = list(self._vocab)
        self._vocab = _Vocabulary((words[old], new) for new, old in enumerate(used.tolist()))

    def query_ids(self, query: str) -> list[int]:
        """Vocabulary ids of a query's tokens; tokens no document has are dropped."""
        return [self._vocab[w] for w in self.tokenizer(query) if w in self._vocab]

    def scores(self, query: str, mask: np.ndarray | None = None) -> np.ndarray:
        """BM25 score of every row (0 where the query shares no token, or mask is 0)."""
        model = self._built()
        token_ids = self.query_ids(query)
        if not token_ids or not self.ids:
            return np.zeros(len(self.ids), dtype=np.float32)
        # Rebuilding renumbers the vocabulary, so ask for ids after _built().
        return model.get_scores_from_ids(token_ids, weight_mask=mask)

    def search(
        self, query: str, k: int = 10, mask: np.ndarray | None = None
    ) -> list[tuple[str, float]]:
        """The top k (id, score) pairs with a positive score, best first.

        An empty or stopword-only query, or one that shares no token with any row,
        returns an empty list. ``mask`` (one 0/1 value per row) excludes rows.
        """
        scores = self.scores(query, mask)
        rows = top_k(scores, k)
        return [(self.ids[r], float(scores[r])) for r in rows]

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the tokenizer (JSON), parameters (JSON) and arrays (.npz) to a directory."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        model = self._built()
        lengths = np.array([len(t) for t in self._tokens], dtype=np.int64)
        arrays: dict[str, np.ndarray] = {
            "tokens": np.concatenate(self._tokens) if self._tokens else np.empty(0, np.int32),
            "lengths": lengths,
        }
        if self.ids:
            arrays.update({name: model.scores[name] for name in ("data", "indices", "indptr")})
        np.savez(path / _ARRAYS_FILE, allow_pickle=False, **arrays)  # type: ignore[arg-type]
        write_json(path / _TOKENIZER_FILE, self.tokenizer.to_json())
        write_json(
            path / _INDEX_FILE,
            {
                "format_version": FORMAT_VERSION,
                "k1": self.k1,
                "b": self.b,
                "method": self.method,
                "ids": self.ids,
                "vocab": list(self._vocab),
            },
        )

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> BM25Index:
        """Read an index written by :meth:`save`, score matrix included (no rebuild)."""
        path = Path(directory)
        config = read_json(path / _INDEX_FILE)
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path / _INDEX_FILE}: unsupported format_version")
        index = cls(
            ChineseTokenizer.from_json(read_json(path / _TOKENIZER_FILE)),
            k1=config["k1"],
            b=config["b"],
            method=config["method"],
        )
        with np.load(path / _ARRAYS_FILE, allow_pickle=False) as arrays:
            tokens = arrays["tokens"]
            bounds = np.concatenate([[0], np.cumsum(arrays["lengths"])])
            index._tokens = [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            matrix = {n: arrays[n] for n in ("data", "indices", "indptr") if n in arrays}
        index.ids = list(config["ids"])
        index._row = {item: r for r, item in enumerate(index.ids)}
        index._vocab = _Vocabulary((word, i) for i, word in enumerate(config["vocab"]))
        if len(index._tokens) != len(index.ids):
            raise ValueError(f"{path}: {len(index.ids)} ids but {len(index._tokens)} token rows")
        index._model = _scorer(index, matrix if index.ids else None)
        return index


def _scorer(index: BM25Index, matrix: dict[str, np.ndarray] | None) -> bm25s.BM25:
    """A bm25s model that scores queries against ``index`` with its score matrix (None when
    the index has no rows)."""
    # bm25s sets its own logger to DEBUG, which floods any INFO-level setup.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    model = bm25s.BM25(k1=index.k1, b=index.b, method=index.method)
    model.nonoccurrence_array = None  # only BM25L/BM25+ use it, and METHODS has neither
    if matrix is not None:
        model.scores = {**matrix, "num_docs": len(index.ids)}
        model.vocab_dict = index._vocab
    return model


def _score_matrix(
    tokens: Sequence[np.ndarray], n_words: int, k1: float, b: float, method: str
) -> dict[str, np.ndarray]:
    """The BM25 score of each word in each row, laid out as bm25s keeps it: a CSC matrix
    (``data``, ``indices``, ``indptr``) with a column per word and a row per text.

    These are the numbers ``bm25s.BM25.index`` computes for the three METHODS, but for all
    rows at once in numpy rather than row by row in Python, which took most of the indexing
    time once the tokenizer was rjieba. Every word id below ``n_words`` must occur.
    """
    n_rows = len(tokens)
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    words = np.concatenate(tokens).astype(np.int64)
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), lengths)
    # Sorted (word, row) keys are in CSC order; how often each occurs is its term frequency.
    keys, counts = np.unique(words * n_rows + rows, return_counts=True)
    word, row = np.divmod(keys, n_rows)
    df = np.bincount(word, minlength=n_words)
    ratio = (n_rows - df + 0.5) / (df + 0.5)
    if method == "lucene":
        idf = np.log(1 + ratio)
    elif method == "robertson":
        idf = np.log(np.maximum(ratio, 1))  # bm25s clips negative IDF to 0
    else:
        idf = np.log(n_rows / df)
    tf = counts.astype(np.float32)
    norm = k1 * (1 - b + b * lengths[row] / lengths.mean())
    saturation = tf * (k1 + 1) / (tf + norm) if method == "atire" else tf / (norm + tf)
    return {
        "data": (idf.astype(np.float32)[word] * saturation).astype(np.float32),
        "indices": row.astype(np.int32),
        "indptr": np.concatenate([[0], np.cumsum(df)]),
    }


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest positive scores, best first (ties by lower index)."""
    positive = np.flatnonzero(scores > 0)
    if len(positive) > k:
        part = np.argpartition(-scores[positive], k - 1)[:k]
        positive = positive[part]
    order = np.lexsort((positive, -scores[positive]))
    return positive[order]
