"""Load test of ``peg-rag serve`` (issue 12): throughput, latency and memory under concurrency.

An async HTTP load generator (one Python thread, asyncio + httpx), bounded in requests and
time, that only targets 127.0.0.1. 1, 8 and 32 clients each send single-text
``/v1/embeddings`` requests, one after the other: short queries (the eval sets' queries) or
passages (cmrc2018-dev and cmedir-dev documents), seeded samples. Rows, side by side on the
same model and threads:

- ``batching on``: ``peg-rag serve --truncate`` (dynamic batching, the defaults);
- ``batching off``: the same server with ``--no-batching``, one request per forward pass;
- ``infinity``: infinity-emb (torch engine, fp32, CPU, the same model folder) from its own
  virtual environment, since its pins conflict with ours: ``--infinity-env DIR`` starts
  ``DIR/bin/infinity_emb v2`` on 127.0.0.1 after our rows (made with ``python3.11 -m venv
  DIR && DIR/bin/pip install torch==2.13.0 "infinity-emb[server,torch]"``), or
  ``--infinity-url`` names one already running. Texts carry the model's prompt there, as our
  server adds it.

Then the goals' other measures: p99 of a direct ``PEGEncoder`` call and of ``GET /health``
(the HTTP overhead) against the 1-client p99; the server's RSS after a warm-up and after
each quarter of ``--rss-requests`` more requests; and a 32-client run with faults mixed in
(clients that hang up, malformed bodies, over-limit requests), where every well-formed
request must succeed. ``--reuse`` takes the measurements of an earlier ``--json`` file and
measures only what it lacks (a run cut short, or a phase deleted from it).

    python benchmarks/serve_load.py [--model DIR] [--requests 2000] [--seconds 60] [--write]
        [--infinity-env /work/venvs/infinity | --infinity-url URL --infinity-model NAME]
        [--json FILE] [--reuse FILE]
    python benchmarks/serve_load.py --smoke --model DIR   # a few requests, to check it runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
from results_file import publish
from retrieval_common import EVAL, MODEL

from peg_rag.core.beir import load_beir
from peg_rag.core.model_files import read_st_settings

QUERY_SETS = ("kuake-qtr-dev", "cmedir-dev", "cmrc2018-dev")
PASSAGE_SETS = ("cmrc2018-dev", "cmedir-dev")
KINDS = {"queries": "query", "passages": "passage"}
MAX_INPUTS = 64  # the server's --max-inputs here, so that over-limit requests are cheap


@dataclass
class Run:
    """What one load run measured."""

    setup: str
    kind: str
    clients: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    def row(self) -> dict:
        ms = sorted(x * 1000 for x in self.latencies) or [float("nan")]

        def pct(p: float) -> float:
            return ms[min(len(ms) - 1, int(p * len(ms)))]

        done = len(self.latencies)
        return {
            "setup": self.setup,
            "kind": self.kind,
            "clients": self.clients,
            "requests": done,
            "errors": self.errors,
            "req_s": done / self.seconds if self.seconds else 0.0,
            "p50": pct(0.50),
            "p95": pct(0.95),
            "p99": pct(0.99),
        }


def sample_texts(count: int, seed: int = 0) -> dict[str, list[str]]:
    """Seeded samples of real queries and passages from the eval sets."""
    sets = {name: load_beir(EVAL / name) for name in set(QUERY_SETS) | set(PASSAGE_SETS)}
    queries = sorted(q for name in QUERY_SETS for q in sets[name].queries.values())
    passages = sorted(p for name in PASSAGE_SETS for p in sets[name].corpus.values() if p.strip())
    rng = random.Random(seed)
    return {
        "queries": rng.sample(queries, min(count, len(queries))),
        "passages": rng.sample(passages, min(count, len(passages))),
    }


def loopback_only(url: str) -> str:
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"{url}: this load generator only targets 127.0.0.1")
    return url.rstrip("/")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def peg_server(model: str, threads: int | None, *extra: str) -> Iterator[tuple[str, int]]:
    """``peg-rag serve`` in a subprocess; yields its /v1 URL and process id."""
    port = free_port()
    command = [sys.executable, "-m", "peg_rag.cli", "serve", "--model", model, "--truncate"]
    command += ["--port", str(port), "--log-level", "warning", "--max-inputs", str(MAX_INPUTS)]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    process = subprocess.Popen([*command, *extra], env=env)
    try:
        yield (
            wait_healthy(process, f"http://127.0.0.1:{port}", "peg-rag serve") + "/v1",
            process.pid,
        )
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)


@contextmanager
def infinity_server(env: Path, model: str, name: str, threads: int | None) -> Iterator[str]:
    """infinity-emb from the virtual environment ``env``, on a free port of 127.0.0.1."""
    port = free_port()
    command = [str(env / "bin" / "infinity_emb"), "v2", "--model-id", model]
    command += ["--served-model-name", name, "--engine", "torch", "--device", "cpu"]
    command += ["--dtype", "float32", "--host", "127.0.0.1", "--port", str(port)]
    environ = {**os.environ, "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    if threads:
        environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    process = subprocess.Popen(command, env=environ)
    try:
        yield wait_healthy(process, f"http://127.0.0.1:{port}", "infinity_emb")
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)


def wait_healthy(process: subprocess.Popen, base: str, what: str) -> str:
    """Wait (10 minutes at most) until ``base``/health answers 200; returns ``base``."""
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return base
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not become ready in 10 minutes")
        time.sleep(0.2)


def body_for(target: dict, kind: str, text: str) -> dict:
    """The request for one text: our server takes input_type; infinity gets the prompt."""
    if target["prompts"] is None:
        return {"model": target["model"], "input": text, "input_type": KINDS[kind]}
    return {"model": target["model"], "input": target["prompts"][kind] + text}


async def load(target: dict, kind: str, texts: list[str], clients: int, args) -> Run:
    """``clients`` clients sending one text per request until ``--requests`` are done or
    ``--seconds`` have passed."""
    run = Run(target["setup"], kind, clients)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    stream = iter(range(args.requests))
    deadline = time.perf_counter() + args.seconds
    async with httpx.AsyncClient(limits=limits, timeout=120) as session:
        for text in texts[: min(clients, 8)]:  # warm-up
            await session.post(f"{target['url']}/embeddings", json=body_for(target, kind, text))

        async def client() -> None:
            for n in stream:
                if time.perf_counter() > deadline:
                    return
                body = body_for(target, kind, texts[n % len(texts)])
                started = time.perf_counter()
                try:
                    answer = await session.post(f"{target['url']}/embeddings", json=body)
                    ok = answer.status_code == 200 and len(answer.json()["data"]) == 1
                except httpx.HTTPError:
                    ok = False
                if ok:
                    run.latencies.append(time.perf_counter() - started)
                else:
                    run.errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        run.seconds = time.perf_counter() - started
    return run


async def health_p99(url: str, count: int) -> float:
    """p99 of GET /health in ms: the HTTP overhead of one request."""
    base = url.removesuffix("/v1")
    times = []
    async with httpx.AsyncClient() as session:
        for _ in range(count):
            started = time.perf_counter()
            (await session.get(f"{base}/health")).raise_for_status()
            times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[min(len(times) - 1, int(0.99 * len(times)))]


def direct_p99(model: str, queries: list[str], threads: int | None) -> float:
    """p99 in ms of ``PEGEncoder.encode_queries([query])`` in this process, one at a time."""
    import torch

    from peg_rag import PEGEncoder

    if threads:
        torch.set_num_threads(threads)
    encoder = PEGEncoder.from_pretrained(model)
    for query in queries[:8]:
        encoder.encode_queries([query])
    times = []
    for query in queries:
        started = time.perf_counter()
        encoder.encode_queries([query])
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[min(len(times) - 1, int(0.99 * len(times)))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def faults(url: str, model: str, texts: list[str], requests: int, clients: int) -> dict:
    """A 32-client run where every fourth request is a fault: a client that hangs up after
    5 ms, a malformed body, or too many inputs. Counts how the well-formed ones fared."""
    counts = {"ok": 0, "failed": 0, "hung_up": 0, "malformed_400": 0, "over_limit_413": 0}
    unexpected: list[str] = []
    stream = iter(range(requests))
    limits = httpx.Limits(max_connections=clients * 2)
    async with httpx.AsyncClient(limits=limits, timeout=120) as session:

        async def client() -> None:
            for n in stream:
                text = texts[n % len(texts)]
                fault = n % 12
                if fault == 3:  # hang up mid-request
                    try:
                        await asyncio.wait_for(
                            session.post(f"{url}/embeddings", json={"input": text}), 0.005
                        )
                    except (asyncio.TimeoutError, httpx.HTTPError):
                        pass
                    counts["hung_up"] += 1
                elif fault == 7:
                    answer = await session.post(f"{url}/embeddings", content=b'{"input": [')
                    if answer.status_code == 400:
                        counts["malformed_400"] += 1
                    else:
                        unexpected.append(f"malformed body: {answer.status_code}")
                elif fault == 11:
                    body = {"input": [text] * (MAX_INPUTS + 1)}
                    answer = await session.post(f"{url}/embeddings", json=body)
                    if answer.status_code == 413:
                        counts["over_limit_413"] += 1
                    else:
                        unexpected.append(f"over-limit request: {answer.status_code}")
                else:
                    body = {"model": model, "input": text}
                    answer = await session.post(f"{url}/embeddings", json=body)
                    counts["ok" if answer.status_code == 200 else "failed"] += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return {**counts, "unexpected": unexpected[:5]}


def served_name(model: str) -> str:
    path = Path(model)
    return path.resolve().name if path.is_dir() else model


def memory(target: dict, pid: int, texts: list[str], args) -> dict:
    """The server's RSS after a warm-up of ``--rss-warmup`` requests and after each quarter
    of ``--rss-requests`` more, with a mixed stream (queries and passages) from 32 clients:
    growth that levels off is caches and the allocator settling; a leak keeps climbing."""
    clients = max(args.clients)

    def requests(count: int) -> int:
        bounded = argparse.Namespace(**{**vars(args), "requests": count, "seconds": 3600})
        return len(asyncio.run(load(target, "queries", texts, clients, bounded)).latencies)

    done = requests(args.rss_warmup)
    mb = [rss_mb(pid)]
    for _ in range(4):
        done += requests(args.rss_requests // 4)
        mb.append(rss_mb(pid))
    return {"requests": done - args.rss_warmup, "warmup": args.rss_warmup, "mb": mb}


def measure(args) -> dict:
    """Every measurement not already in ``--reuse``'s file (a run cut short, or one phase
    deleted from it to measure again)."""
    texts = sample_texts(args.texts)
    name = served_name(args.model)
    found = read_st_settings(Path(args.model)) if Path(args.model).is_dir() else None
    prompts = {
        "queries": (found.query_prompt if found else None) or "",
        "passages": (found.passage_prompt if found else None) or "",
    }
    report: dict = {"rows": [], "threads": args.threads or os.cpu_count()}
    if args.reuse:
        report = json.loads(Path(args.reuse).read_text(encoding="utf-8"))
    done = {row["setup"] for row in report["rows"]}
    extras = ("health_p99_ms", "rss", "faults")  # measured on the batching-on server
    setups = [("batching on", ()), ("batching off", ("--no-batching",))]
    for setup, flags in setups:
        missing = [k for k in extras if k not in report] if setup == "batching on" else []
        if setup in done and not missing:
            continue
        with peg_server(args.model, args.threads, *flags) as (url, pid):
            target = {"setup": setup, "url": url, "model": name, "prompts": None}
            for kind in KINDS if setup not in done else ():
                for clients in args.clients:
                    row = asyncio.run(load(target, kind, texts[kind], clients, args)).row()
                    report["rows"].append(row)
                    print(json.dumps(row), flush=True)
            if "health_p99_ms" in missing:
                report["health_p99_ms"] = asyncio.run(health_p99(url, args.health_requests))
            if "rss" in missing:
                mixed = texts["queries"] + texts["passages"]
                report["rss"] = memory(target, pid, mixed, args)
                print(json.dumps(report["rss"]), flush=True)
            if "faults" in missing:
                report["faults"] = asyncio.run(
                    faults(url, name, texts["queries"], args.fault_requests, max(args.clients))
                )
                print(json.dumps(report["faults"]), flush=True)
    if "infinity" not in done:
        if args.infinity_env:
            with infinity_server(args.infinity_env, args.model, name, args.threads) as url:
                report["rows"] += infinity_rows(url, name, prompts, texts, args)
        elif args.infinity_url:
            url = loopback_only(args.infinity_url)
            report["rows"] += infinity_rows(url, args.infinity_model or name, prompts, texts, args)
    if "direct_p99_ms" not in report:
        report["direct_p99_ms"] = direct_p99(
            args.model, texts["queries"][: args.health_requests], args.threads
        )
    return report


def infinity_rows(url: str, model: str, prompts: dict, texts: dict, args) -> list[dict]:
    target = {"setup": "infinity", "url": url, "model": model, "prompts": prompts}
    rows = []
    for kind in KINDS:
        for clients in args.clients:
            rows.append(asyncio.run(load(target, kind, texts[kind], clients, args)).row())
            print(json.dumps(rows[-1]), flush=True)
    return rows


def render(report: dict, args) -> str:
    rows = report["rows"]
    lines = [
        f"- Model `{args.model}`; the server (`peg-rag serve --truncate`, one worker thread for "
        f"the model) and the load generator (one asyncio thread, httpx) share the machine; "
        f"torch threads: {report['threads']}. Each client sends one text per request, "
        f"{args.requests} requests or {args.seconds} s per row, after warm-up.",
        "",
        "| setup | texts | clients | requests | errors | texts/s | p50 ms | p95 ms | p99 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['kind']} | {r['clients']} | {r['requests']} | {r['errors']} | "
            f"{r['req_s']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} |"
        )
    by = {(r["setup"], r["kind"], r["clients"]): r for r in rows}
    top = max(args.clients)
    lines.append("")
    for kind, goal in (("queries", 3.0), ("passages", 1.2)):
        on, off = by.get(("batching on", kind, top)), by.get(("batching off", kind, top))
        if on and off and off["req_s"]:
            ratio = on["req_s"] / off["req_s"]
            met = "met" if ratio >= goal and on["errors"] == 0 else "missed"
            lines.append(
                f"- {kind}, {top} clients: {ratio:.2f}x batching off (goal >= {goal}x): {met}"
            )
        inf = by.get(("infinity", kind, top))
        if on and inf and inf["req_s"]:
            ratio = on["req_s"] / inf["req_s"]
            lines.append(
                f"- {kind}, {top} clients: {ratio:.2f}x infinity (goal >= 1.0x): "
                f"{'met' if ratio >= 1.0 else 'missed'}"
            )
    single = by.get(("batching on", "queries", 1))
    if single:
        bound = 1.2 * (report["direct_p99_ms"] + report["health_p99_ms"])
        lines.append(
            f"- p99 at 1 client {single['p99']:.1f} ms vs 1.2 x (direct PEGEncoder p99 "
            f"{report['direct_p99_ms']:.1f} ms + GET /health p99 {report['health_p99_ms']:.1f} "
            f"ms) = {bound:.1f} ms: {'met' if single['p99'] <= bound else 'missed'}"
        )
    rss = report["rss"]
    growth = 100 * (rss["mb"][-1] - rss["mb"][0]) / rss["mb"][0]
    lines.append(
        f"- RSS across {rss['requests']} mixed requests from {top} clients after a warm-up of "
        f"{rss['warmup']}: {' -> '.join(f'{mb:.0f}' for mb in rss['mb'])} MB (after each "
        f"quarter): {growth:+.1f}% (goal < 5%): {'met' if growth < 5 else 'missed'}"
    )
    f = report["faults"]
    lines.append(
        f"- Faults mixed into a {top}-client run: {f['ok']} well-formed requests succeeded, "
        f"{f['failed']} failed; {f['hung_up']} clients hung up, {f['malformed_400']} malformed "
        f"bodies got 400, {f['over_limit_413']} over-limit requests got 413"
        + (f"; unexpected: {f['unexpected']}" if f["unexpected"] else "")
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(MODEL), help="(default: %(default)s)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=2000, help="per row, at most")
    parser.add_argument("--seconds", type=float, default=60, help="per row, at most")
    parser.add_argument("--texts", type=int, default=2000, help="sampled texts per kind")
    parser.add_argument("--threads", type=int, help="torch threads of server and direct calls")
    parser.add_argument("--health-requests", type=int, default=500)
    parser.add_argument("--rss-requests", type=int, default=20_000)
    parser.add_argument("--rss-warmup", type=int, default=3000)
    parser.add_argument("--fault-requests", type=int, default=2000)
    parser.add_argument("--infinity-env", type=Path, help="a virtual environment with infinity-emb")
    parser.add_argument("--infinity-url", help="an infinity-emb server on 127.0.0.1")
    parser.add_argument("--infinity-model", help="the model name infinity serves")
    parser.add_argument("--smoke", action="store_true", help="a few requests, 1 and 2 clients")
    parser.add_argument("--json", help="also write the measurements here")
    parser.add_argument("--reuse", help="a --json file: measure only what it lacks")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.requests, args.seconds, args.texts = [1, 2], 8, 20, 40
        args.health_requests, args.rss_requests, args.fault_requests = 20, 24, 24
        args.rss_warmup = 8
    if args.smoke and args.write:
        raise SystemExit("--smoke results are not worth writing")
    report = measure(args)
    title = "Serving (issue 12): peg-rag serve under load"
    publish("serve_load", title, render(report, args), report, args)


if __name__ == "__main__":
    main()
