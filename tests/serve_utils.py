"""What the server tests share: a real uvicorn on 127.0.0.1 in a thread, a small Chinese
index built with the tiny model, and a stand-in OpenAI-compatible LLM that streams."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from peg_rag import HybridRetriever, PEGEncoder
from peg_rag.apps.sample_data import kb_documents

# What the stand-in LLM streams, piece by piece: an answer citing sources 1 and 2.
REPLY = ["根据资料，", "异地就医需要先备案[1]。", "备案后可直接结算[2]。"]


def prompted_model(directory: Path, tiny_model_dir: Path) -> Path:
    """The tiny model saved with query and passage prompts and mean pooling, so queries and
    passages get visibly different vectors (its random [CLS] vectors are nearly all alike)."""
    encoder = PEGEncoder.from_pretrained(
        tiny_model_dir,
        query_prompt="查询：",
        passage_prompt="段落：",
        pooling="mean",
        device="cpu",
    )
    encoder.save_pretrained(directory)
    return directory


def build_index(directory: Path, model_dir: Path, reranker: Any = None) -> Path:
    """A hybrid index of 30 passages of the sample knowledge base (every tenth one)."""
    encoder = PEGEncoder.from_pretrained(model_dir, device="cpu")
    retriever = HybridRetriever.create(directory, encoder, chunk_size=0, reranker=reranker)
    retriever.add(kb_documents()[::10])
    return directory


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free port of 127.0.0.1; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_ready(base_url: str, timeout: float = 120) -> None:
    """Wait until /health says the models are loaded."""
    deadline = time.monotonic() + timeout
    while True:
        answer = httpx.get(f"{base_url}/health", timeout=10)
        if answer.status_code == 200:
            return
        assert answer.json()["status"] == "loading", answer.text
        assert time.monotonic() < deadline, "the models did not load in time"
        time.sleep(0.05)


class FakeLLM(BaseHTTPRequestHandler):
    """``POST /v1/chat/completions`` streaming REPLY as server-sent events; records requests."""

    requests: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"body": body, "authorization": self.headers["Authorization"]})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in [*REPLY, None]:
            delta = {"content": piece} if piece else {}
            choice = {"index": 0, "delta": delta, "finish_reason": None if piece else "stop"}
            chunk = {"id": "c1", "object": "chat.completion.chunk", "choices": [choice]}
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.05)  # a stream, not one write
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def fake_llm() -> Iterator[str]:
    """The stand-in LLM on a free port; yields its base URL (``.../v1``)."""
    FakeLLM.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        server.server_close()
