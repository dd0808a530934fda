"""Where ONNX Runtime spends PEGEncoder's time: the share of each operator type, fp32 and int8.

Runs the ONNX files that ``backend="onnx"`` uses (exported and cached on first use) with
ONNX Runtime's profiler on the same passages as encode_throughput.py (a shuffled sample of the
2,000-text mix, batch size 32, max length 512), and prints each operator type's share of the
operator time, so a speed-up that falls short can be traced to what int8 leaves in fp32.

    python benchmarks/onnx_profile.py [--model DIR] [--texts 256]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from encode_throughput import passages

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def profile(model: Path, quantize: str | None, texts: list[str], folder: Path) -> Counter:
    """Microseconds per operator type over encoding ``texts``."""
    import onnxruntime as ort

    from peg_rag import PEGEncoder

    encoder = PEGEncoder.from_pretrained(model, backend="onnx", quantize=quantize, batch_size=32)
    encoder.encode_passages(texts[:32])  # warm-up, not profiled
    options = ort.SessionOptions()
    options.intra_op_num_threads = encoder.model.session.get_session_options().intra_op_num_threads
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / f"ort-{quantize or 'fp32'}")
    encoder.model.session = ort.InferenceSession(
        str(encoder.model.path), options, providers=["CPUExecutionProvider"]
    )
    encoder.encode_passages(texts)
    trace = json.loads(Path(encoder.model.session.end_profiling()).read_text(encoding="utf-8"))
    spent: Counter = Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "me5-small-zh")
    parser.add_argument("--eval-dir", type=Path, default=SHARED / "data" / "eval")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--folder", type=Path, default=Path("/tmp"), help="for the trace files")
    args = parser.parse_args()
    texts = passages(args.eval_dir, 1000)
    random.Random(0).shuffle(texts)  # as encode_throughput.py
    texts = texts[: args.texts]
    found = {q or "fp32": profile(args.model, q, texts, args.folder) for q in (None, "int8")}
    total = {name: sum(spent.values()) for name, spent in found.items()}
    print(
        f"{len(texts)} passages; operator time: "
        + ", ".join(f"{name} {total[name] / 1e6:.1f} s" for name in found)
    )
    print("| operator | fp32 share | int8 share | int8 / fp32 time |")
    print("| --- | ---: | ---: | ---: |")
    ops = sorted(set(found["fp32"]) | set(found["int8"]), key=lambda o: -found["int8"][o])
    for op in ops:
        fp32, int8 = found["fp32"][op], found["int8"][op]
        ratio = f"{int8 / fp32:.2f}" if fp32 else "-"
        print(
            f"| {op} | {100 * fp32 / total['fp32']:.1f}% | {100 * int8 / total['int8']:.1f}% "
            f"| {ratio} |"
        )


if __name__ == "__main__":
    main()
