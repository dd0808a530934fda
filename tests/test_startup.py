"""``import peg_rag`` and ``peg-rag --help`` load no heavy library; the public names still
resolve, on first use."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

import peg_rag
from peg_rag.cli import build_parser

HEAVY = (
    "torch",
    "transformers",
    "chromadb",
    "bm25s",
    "scipy",
    "jieba",
    "rjieba",
    "fastapi",
    "uvicorn",
    "onnxruntime",
    "onnx",
)


def loaded_after(code: str) -> list[str]:
    """The HEAVY modules a fresh interpreter has imported after running ``code``."""
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.splitlines()[-1])


def test_importing_the_package_loads_no_heavy_library():
    assert loaded_after("import peg_rag, peg_rag.core, peg_rag.retrieval, peg_rag.trainer") == []


def verbs() -> list[str]:
    """Every verb the CLI registers (so a new one is checked without editing this test)."""
    actions = build_parser()._actions
    return sorted(next(a for a in actions if isinstance(a, argparse._SubParsersAction)).choices)


def test_the_whole_command_line_parser_loads_no_heavy_library():
    assert {"score", "merge", "train-reranker", "serve", "export"} <= set(verbs())
    code = "import contextlib, io\nfrom peg_rag.cli import main\n"
    code += "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
    code += "    main(['--help'])\n"
    for command in verbs():
        code += "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        code += f"    main([{command!r}, '--help'])\n"
    assert loaded_after(code) == []


def test_public_names_resolve_on_first_use():
    from peg_rag.core.encoder import PEGEncoder
    from peg_rag.retrieval.hybrid import HybridRetriever

    assert peg_rag.PEGEncoder is PEGEncoder and peg_rag.HybridRetriever is HybridRetriever
    assert {"PEGEncoder", "HybridRetriever", "Document", "ChromaStore"} <= set(dir(peg_rag))
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        _ = peg_rag.Nope
