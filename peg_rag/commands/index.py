"""``peg-rag index``: build or update a hybrid (BM25 + dense) index from files.

Inputs are .txt and .md files (one document each, id = the file's path) and .jsonl files
(one document per line: ``{"id", "text", "title"?, "metadata"?}``, or BEIR's ``corpus.jsonl``
with ``_id``). Directories are searched recursively for those suffixes.

Updates are incremental. A file whose bytes hash as last time is skipped without being
read; in a changed file, documents whose text and metadata are unchanged are skipped too,
changed ones are replaced, and documents that disappeared from it are deleted.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from tqdm.auto import tqdm

from peg_rag import retrieval
from peg_rag.core.documents import Document, find_files, read_documents, source_name
from peg_rag.core.files import read_json, write_json
from peg_rag.retrieval.settings import (
    BM25_TOKENIZERS,
    CHUNK_UNITS,
    DEFAULT_BM25_TOKENIZER,
    HybridSettings,
)

from .common import add_encoder_arguments, load_encoder, load_reranker

DEFAULTS = HybridSettings()
SOURCES_FILE = "sources.json"  # file path -> sha256 of its bytes at the last index run


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index",
        help="build or update a hybrid BM25 + dense index from .txt/.md/.jsonl files",
        description="Chunk, embed and index documents into DIR (created with --model on the "
        "first run; later runs update it incrementally).",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or directories")
    parser.add_argument("--index-dir", type=Path, required=True, metavar="DIR")
    chunking = parser.add_argument_group("chunking and BM25 (new indexes only)")
    chunking.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULTS.chunk_size,
        help="max tokens per chunk; 0 keeps documents whole",
    )
    chunking.add_argument(
        "--chunk-overlap", type=int, help="units neighbouring chunks share (default: size // 8)"
    )
    chunking.add_argument(
        "--chunk-unit",
        choices=CHUNK_UNITS,
        default=DEFAULTS.chunk_unit,
        help="count chunk sizes in encoder tokens or characters",
    )
    chunking.add_argument(
        "--normalize-width",
        action="store_true",
        help="map full-width forms to half-width in chunks",
    )
    chunking.add_argument(
        "--bm25-tokenizer",
        choices=BM25_TOKENIZERS,
        help="word segmenter under BM25: jieba (pure Python) or rjieba (jieba-rs, faster); "
        f"default: {DEFAULT_BM25_TOKENIZER}",
    )
    chunking.add_argument("--user-dict", type=Path, help="jieba user dictionary for BM25")
    chunking.add_argument(
        "--english-stopwords", action="store_true", help="also drop English stopwords in BM25"
    )
    chunking.add_argument(
        "--reranker",
        metavar="MODEL",
        help="record this cross-encoder as the index's default second stage",
    )
    chunking.add_argument(
        "--rerank-top-n",
        type=int,
        default=DEFAULTS.rerank_top_n,
        help="fused results the reranker reorders",
    )
    add_encoder_arguments(parser, required=False)
    parser.set_defaults(run=run)


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_index(args: argparse.Namespace) -> retrieval.HybridRetriever:
    if retrieval.is_index(args.index_dir):
        retriever = retrieval.HybridRetriever.load(
            args.index_dir,
            backend=args.backend,
            device=args.device,
            dtype=args.dtype,
            quantize=args.quantize,
            batch_size=args.batch_size,
            show_progress_bar=True,
            reranker=False,  # indexing never reranks
        )
        saved = retriever.encoder_settings["model"]
        if args.model and args.model not in (saved, str(Path(args.model).resolve())):
            raise ValueError(
                f"{args.index_dir} was built with model {saved}; --model {args.model} differs "
                "(use a new --index-dir for another model)"
            )
        segmenter = retriever.bm25.tokenizer.segmenter
        if args.bm25_tokenizer not in (None, segmenter):
            raise ValueError(
                f"{args.index_dir} was built with --bm25-tokenizer {segmenter}; an index keeps "
                f"its BM25 tokenizer (use a new --index-dir for {args.bm25_tokenizer})"
            )
        return retriever
    if not args.model:
        raise ValueError(f"{args.index_dir} holds no index yet; give --model to create one")
    tokenizer = retrieval.ChineseTokenizer(
        segmenter=args.bm25_tokenizer or DEFAULT_BM25_TOKENIZER,
        user_dict=args.user_dict,
        english_stopwords=args.english_stopwords,
    )
    return retrieval.HybridRetriever.create(
        args.index_dir,
        load_encoder(args),
        tokenizer=tokenizer,
        chunk_size=args.chunk_size,
        chunk_overlap=args.chunk_overlap,
        chunk_unit=args.chunk_unit,
        normalize_width=args.normalize_width,
        reranker=load_reranker(args),
        rerank_top_n=args.rerank_top_n,
    )


def run(args: argparse.Namespace) -> int:
    files = find_files(args.paths)
    sources_path = args.index_dir / SOURCES_FILE
    known: dict[str, str] = {}
    if retrieval.is_index(args.index_dir) and sources_path.is_file():
        known = read_json(sources_path)
    changed = {}
    for path in files:
        source = source_name(path)
        digest = _file_hash(path)
        if known.get(source) != digest:
            changed[source] = (path, digest)
    if not changed and retrieval.is_index(args.index_dir):
        print(f"{len(files)} files, all unchanged since the last run: nothing to do")
        return 0
    retriever = _open_index(args)
    documents: list[Document] = []
    owner: dict[str, str] = {}
    for source, (path, _) in tqdm(changed.items(), desc="Reading", unit="file"):
        for doc in read_documents(path, source):
            if doc.id in owner:
                raise ValueError(
                    f"document id {doc.id!r} appears in both {owner[doc.id]} and {source}"
                )
            owner[doc.id] = source
            documents.append(doc)
    report = retriever.add(documents, show_progress=True)
    # Documents that a changed file no longer contains.
    previous = retriever.doc_ids(filters={"source": {"$in": list(changed)}})
    deleted = retriever.delete([doc_id for doc_id in previous if doc_id not in owner])
    known.update({source: digest for source, (_, digest) in changed.items()})
    write_json(sources_path, known)
    print(
        f"{len(files)} files ({len(files) - len(changed)} unchanged and skipped): "
        f"{report.added} documents added, {report.replaced} replaced, {report.unchanged} "
        f"unchanged, {deleted} deleted, {report.chunks} chunks embedded; "
        f"{args.index_dir} holds {len(retriever.doc_ids())} documents in {len(retriever)} chunks"
    )
    return 0
