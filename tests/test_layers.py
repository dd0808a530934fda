"""The layer contracts (pyproject.toml, ARCHITECTURE.md) hold, and they catch violations.

import-linter walks peg_rag/ on disk; the tests run it on a copy of the installed layout
(.ci/installed_tree.py), where trainer/ and integrations/ sit inside peg_rag/, so that they
can add violations without touching the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    subprocess.run(
        [sys.executable, str(REPO / ".ci" / "installed_tree.py"), str(tmp_path)], check=True
    )
    return tmp_path


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
    )


def add_import(tree: Path, module: str, statement: str) -> None:
    path = tree / Path(*module.split(".")).with_suffix(".py")
    path.write_text(path.read_text(encoding="utf-8") + f"\n{statement}  # deliberate\n")


def test_the_installed_layout_keeps_every_contract(tree):
    assert (tree / "peg_rag" / "trainer" / "loss.py").is_file()
    assert (tree / "peg_rag" / "integrations" / "langchain.py").is_file()
    result = lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "statement", "contract"),
    [
        ("peg_rag.core.text", "import peg_rag.retrieval.fusion", "One-way layers"),
        ("peg_rag.retrieval.evaluate", "import peg_rag.trainer.loss", "One-way layers"),
        ("peg_rag.trainer.mine", "from peg_rag.commands import common", "One-way layers"),
        ("peg_rag.integrations.hybrid", "import peg_rag.trainer.data", "Integrations use only"),
        ("peg_rag.apps.rag_chat", "import peg_rag.serve.settings", "One-way layers"),
        ("peg_rag.integrations.hybrid", "import peg_rag.serve.app", "Integrations use only"),
        ("peg_rag.core.records", "import peg_rag.core.documents", "No import cycles"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tree, module, statement, contract):
    add_import(tree, module, statement)
    result = lint(tree)
    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(line.startswith(contract) for line in broken), result.stdout
