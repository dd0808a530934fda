"""Packaging: every sub-package ships, and the package-dir mapping resolves."""

from __future__ import annotations

from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *relative.parts]))
    assert found == set(config["packages"])


def test_trainer_and_integrations_map_into_peg_rag():
    import peg_rag.integrations
    import peg_rag.trainer

    # resolve(): from the checkout they may load through the peg_rag/trainer symlink
    assert Path(peg_rag.trainer.__file__).resolve().parent == REPO / "trainer"
    assert Path(peg_rag.integrations.__file__).resolve().parent == REPO / "integrations"
