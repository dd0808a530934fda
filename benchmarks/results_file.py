"""Write one benchmark's section of benchmarks/RESULTS.md, leaving the others alone."""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    """CPU model, core count and memory, plus the GPU when one is used."""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(
                ["lscpu"], capture_output=True, text=True
            ).stdout.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    import os

    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def header(title: str) -> str:
    """The heading block every section starts with: command, machine, date."""
    command = "python " + " ".join(sys.argv)
    return (
        f"## {title}\n\n"
        f"- Command: `{command}`\n"
        f"- Machine: {machine()}\n"
        f"- Date: {dt.date.today().isoformat()}\n"
    )


def update_section(key: str, body: str) -> None:
    """Replace the text between this key's markers in RESULTS.md, or append it."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text, encoding="utf-8")


def publish(key: str, title: str, body: str, results: object, args) -> None:
    """Print ``body``; write ``results`` to ``args.json`` if given; with ``args.write``,
    replace section ``key`` of RESULTS.md with ``title``'s header and ``body``."""
    print(body)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    if args.write:
        update_section(key, header(title) + "\n" + body)
