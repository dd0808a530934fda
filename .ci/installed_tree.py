"""Lay out the Python files of peg-rag in DEST as an install does, for static checks.

The package-dir mapping in pyproject.toml puts trainer/ and integrations/ inside the
installed peg_rag/ (as peg_rag.trainer and peg_rag.integrations). A copy of that tree is
where tests/test_layers.py writes deliberate violations, and where
benchmarks/startup_time.py compares two versions.

    python .ci/installed_tree.py DEST
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def lay_out(dest: Path, repo: Path = REPO) -> None:
    """Copy the packages of the checkout ``repo`` into ``dest``."""
    config = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = config["package-dir"]
    for package in config["packages"]:
        # The longest mapped prefix decides the folder, as setuptools does.
        root = max((p for p in roots if package == p or package.startswith(p + ".")), key=len)
        source = repo / roots[root] / Path(*package.split(".")[len(root.split(".")) :])
        target = dest / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for file in source.glob("*.py"):
            shutil.copy2(file, target / file.name)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    lay_out(Path(sys.argv[1]))
