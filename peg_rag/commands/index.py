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
import json
import os
from pathlib import Path
from typing import Any

from .common import add_encoder_arguments, load_encoder

SUFFIXES = (".txt", ".md", ".jsonl")
SOURCES_FILE = "sources.json"  # file path -> sha256 of its bytes at the last index run


def register(subparsers) -> None:
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
        "--chunk-size", type=int, default=256, help="max tokens per chunk; 0 keeps documents whole"
    )
    chunking.add_argument(
        "--chunk-overlap", type=int, help="units neighbouring chunks share (default: size // 8)"
    )
    chunking.add_argument(
        "--chunk-unit",
        choices=["token", "char"],
        default="token",
        help="count chunk sizes in encoder tokens or characters",
    )
    chunking.add_argument(
        "--normalize-width",
        action="store_true",
        help="map full-width forms to half-width in chunks",
    )
    chunking.add_argument("--user-dict", type=Path, help="jieba user dictionary for BM25")
    chunking.add_argument(
        "--english-stopwords", action="store_true", help="also drop English stopwords in BM25"
    )
    add_encoder_arguments(parser, required=False)
    parser.set_defaults(run=run)


def find_files(paths: list[Path]) -> list[Path]:
    """The input files: given files as they are, directories searched for SUFFIXES."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise ValueError(f"{path}: unsupported file type; use {', '.join(SUFFIXES)}")
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return list(dict.fromkeys(found))


def source_name(path: Path) -> str:
    """A stable name for a file: relative to the working directory when inside it."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def _jsonl_document(record: dict[str, Any], where, source: str):
    from peg_rag.hybrid import Document
    from peg_rag.jsonl import DataError
    from peg_rag.trainer.beir import corpus_text

    doc_id = record.get("id", record.get("_id"))
    if doc_id is None or str(doc_id) == "":
        raise DataError(where, "missing (give 'id', or '_id' as in BEIR)", "id")
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise DataError(where, f"expected an object, got {type(metadata).__name__}", "metadata")
    for key, value in metadata.items():
        if key == "doc_id" or not isinstance(value, (str, int, float, bool)):
            raise DataError(
                where, f"{key!r} must be a str, int, float or bool (and not 'doc_id')", "metadata"
            )
    title = record.get("title") or ""
    extra = {"source": source, **({"title": title} if title else {})}
    return Document(str(doc_id), corpus_text(record, where), {**extra, **metadata})


def read_documents(path: Path, source: str) -> list:
    """The documents of one input file."""
    from peg_rag.hybrid import Document
    from peg_rag.jsonl import read_jsonl

    if path.suffix == ".jsonl":
        return list(read_jsonl(path, lambda record, where: _jsonl_document(record, where, source)))
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    return [Document(source, text, {"source": source})]


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_index(args: argparse.Namespace):
    from peg_rag.bm25 import ChineseTokenizer
    from peg_rag.hybrid import CONFIG_FILE, HybridRetriever

    if (args.index_dir / CONFIG_FILE).is_file():
        retriever = HybridRetriever.load(
            args.index_dir,
            device=args.device,
            dtype=args.dtype,
            quantize=args.quantize,
            batch_size=args.batch_size,
            show_progress_bar=True,
        )
        saved = retriever.encoder_settings["model"]
        if args.model and args.model not in (saved, str(Path(args.model).resolve())):
            raise ValueError(
                f"{args.index_dir} was built with model {saved}; --model {args.model} differs "
                "(use a new --index-dir for another model)"
            )
        return retriever
    if not args.model:
        raise ValueError(f"{args.index_dir} holds no index yet; give --model to create one")
    tokenizer = ChineseTokenizer(user_dict=args.user_dict, english_stopwords=args.english_stopwords)
    return HybridRetriever.create(
        args.index_dir,
        load_encoder(args),
        tokenizer=tokenizer,
        chunk_size=args.chunk_size,
        chunk_overlap=args.chunk_overlap,
        chunk_unit=args.chunk_unit,
        normalize_width=args.normalize_width,
    )


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from peg_rag.hybrid import CONFIG_FILE

    files = find_files(args.paths)
    sources_path = args.index_dir / SOURCES_FILE
    known: dict[str, str] = {}
    if (args.index_dir / CONFIG_FILE).is_file() and sources_path.is_file():
        known = json.loads(sources_path.read_text("utf-8"))
    changed = {}
    for path in files:
        source = source_name(path)
        digest = _file_hash(path)
        if known.get(source) != digest:
            changed[source] = (path, digest)
    if not changed and (args.index_dir / CONFIG_FILE).is_file():
        print(f"{len(files)} files, all unchanged since the last run: nothing to do")
        return 0
    retriever = _open_index(args)
    documents: list = []
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
    tmp = sources_path.with_name(f".{SOURCES_FILE}.tmp")
    tmp.write_text(json.dumps(known, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, sources_path)
    print(
        f"{len(files)} files ({len(files) - len(changed)} unchanged and skipped): "
        f"{report.added} documents added, {report.replaced} replaced, {report.unchanged} "
        f"unchanged, {deleted} deleted, {report.chunks} chunks embedded; "
        f"{args.index_dir} holds {len(retriever.doc_ids())} documents in {len(retriever)} chunks"
    )
    return 0
