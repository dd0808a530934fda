"""Atomic checkpoints: written to a temporary folder, then renamed into place.

A checkpoint folder ``checkpoints/checkpoint-<step>`` holds accelerate's state (model,
optimizer, scheduler, RNG of every process), the model as its ``save_pretrained`` writes it
under ``model/`` (PEGEncoder or Reranker, both loadable by sentence-transformers), and
``trainer_state.json`` (step, data position, best metric). A run killed while writing leaves
only a ``.tmp-checkpoint-<step>`` folder, which resuming ignores and removes, so it continues
from the previous complete checkpoint. Folders must be on a file system all processes share
(the rename is what makes a checkpoint visible).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

from peg_rag.core.files import read_json, recover_swaps, swap_dir, write_json

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class SavesPretrained(Protocol):
    """What checkpoints save: PEGEncoder and Reranker write themselves to a folder."""

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None: ...


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    steps = {
        p: int(match.group(1))
        for p in folder.iterdir()
        if (match := _NAME.match(p.name)) and (p / STATE_FILE).is_file()
    }
    return sorted(steps, key=steps.__getitem__)


def remove_partial(output_dir: Path) -> None:
    """Delete what interrupted writes left behind."""
    folder = output_dir / "checkpoints"
    if folder.is_dir():
        for path in folder.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)
    recover_swaps(output_dir)  # killed between the two renames of save_model_atomically
    for path in output_dir.glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    accelerator,
    model: SavesPretrained,
    output_dir: Path,
    step: int,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically on all processes; keep the newest ``keep``."""
    final = output_dir / "checkpoints" / f"checkpoint-{step}"
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        model.save_pretrained(tmp / "model")
        write_json(tmp / STATE_FILE, state, indent=2)
        if final.exists():  # the same step written again after a resume
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def save_model_atomically(model: SavesPretrained, target: Path) -> None:
    """Replace ``target`` with the model's files, never leaving a half-written folder there."""
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    swap_dir(tmp, target)


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE})")
    return read_json(path)
