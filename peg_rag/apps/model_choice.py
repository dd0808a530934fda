"""Which embedding model the demo and the chat examples use, found in this order: an
explicit ``--model`` or ``$PEG_RAG_MODEL``; then ``TownsWu/PEG`` from the Hugging Face Hub or
its local cache; then a fallback trained on the bundled knowledge base itself
(:mod:`.kb_model`), announced loudly and cached, so that a machine with no hub access still
runs the whole demo.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from peg_rag.core.extras import MissingExtraError
from peg_rag.core.model_files import ModelNotFoundError, resolve_model_dir

from .kb_model import Recipe, train_kb_model
from .sample_data import kb_documents

HUB_MODEL = "TownsWu/PEG"
ENV_MODEL = "PEG_RAG_MODEL"
BANNER_WIDTH = 78
FALLBACK_SOURCE = "fallback trained on the knowledge base"

Print = Callable[[str], None]


def find_pretrained(name: str = HUB_MODEL) -> Path | None:
    """The hub model's local directory (downloaded or already cached), None if unreachable."""
    try:
        return resolve_model_dir(name)
    except ModelNotFoundError:
        return None


def announce(lines: list[str], out: Print) -> None:
    """A banner that is hard to miss."""
    rule = "!" * BANNER_WIDTH
    out("\n".join([rule, *(f"!! {line}" for line in lines), rule]))


def fallback_model(cache: Path, recipe: Recipe, out: Print) -> Path:
    """The knowledge-base-trained model: from the cache, or trained now (and cached)."""
    documents = kb_documents()
    texts = [d.text for d in documents]
    target = cache / "fallback-models" / recipe.key(texts)
    if (target / "config.json").is_file():
        out(
            f"FALLBACK: no pretrained model reachable; using the small model trained on the "
            f"knowledge base earlier ({target})."
        )
        return target
    announce(
        [
            f"No pretrained model: {HUB_MODEL} is neither reachable on the Hugging Face Hub",
            "nor in the local cache, and no --model / $PEG_RAG_MODEL was given.",
            "FALLBACK: training a small PEG model from the sample knowledge base itself",
            f"({recipe.layers}-layer BERT, {recipe.hidden_size} wide, tokenizer built from the "
            f"passages, {recipe.steps} steps",
            "on pairs derived from passage titles and sentences; never the sample questions).",
            f"It is cached in {target.parent}, so this happens once. It is much weaker than",
            f"{HUB_MODEL}: give --model or $PEG_RAG_MODEL to use a pretrained model.",
        ],
        out,
    )
    started = time.perf_counter()
    pairs = [(d.metadata.get("title", ""), d.text) for d in documents]
    try:
        train_kb_model(pairs, target, recipe)
    except MissingExtraError as exc:
        raise MissingExtraError(
            f"the offline fallback model is trained on the spot, and {exc}; or give --model"
        ) from exc
    out(f"Fallback model trained in {time.perf_counter() - started:.0f} s: {target}")
    return target


def resolve_model(model: str | None, *, cache: Path, recipe: Recipe, out: Print) -> tuple[str, str]:
    """(model name or directory, how it was found): explicit, hub, or fallback."""
    if model:
        return model, "given with --model"
    if os.environ.get(ENV_MODEL):
        return os.environ[ENV_MODEL], f"from ${ENV_MODEL}"
    found = find_pretrained()
    if found is not None:
        return str(found), f"{HUB_MODEL} (Hugging Face Hub or local cache)"
    return str(fallback_model(cache, recipe, out)), FALLBACK_SOURCE
