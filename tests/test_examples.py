"""Each RAG chat example runs end to end offline: without an LLM (extractive answers), and
with a local OpenAI-compatible server that streams its answer."""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest
from helpers import build_tiny_reranker

from peg_rag import Reranker
from peg_rag.apps.rag_chat import NO_LLM_NOTICE, SYSTEM_PROMPT

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ["llama_index_chat", "langchain_chat"]
CLIENTS = {"llama_index_chat": "llama_index.llms.openai_like", "langchain_chat": "langchain_openai"}
REPLY = ["根据资料", "[1]，", "异地就医", "需要先备案。"]


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_llm(monkeypatch) -> None:
    for name in ("PEG_RAG_LLM_MODEL", "PEG_RAG_LLM_BASE_URL", "PEG_RAG_LLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("name", NAMES)
def test_example_answers_extractively_without_an_llm(name, tiny_model_dir, no_llm, capsys):
    code = example(name).main(
        ["--model", str(tiny_model_dir), "-q", "异地就医需要备案吗", "-k", "3", "--chunk-size", "0"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "300 documents indexed; LLM: none" in out and NO_LLM_NOTICE in out
    answer = out.split(NO_LLM_NOTICE)[1]
    cited = [line for line in answer.split("Sources:\n")[1].splitlines() if line.startswith("[")]
    assert [c[:4] for c in cited] == ["[1] ", "[2] ", "[3] "]
    assert answer.count("\n[1] ") == 2  # the passage and its citation


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory) -> Path:
    return build_tiny_reranker(tmp_path_factory.mktemp("examples") / "reranker")


@pytest.fixture
def reranked(monkeypatch) -> list[list[float]]:
    """The scores of each call to a Reranker, recorded."""
    calls: list[list[float]] = []
    score_pairs = Reranker.score_pairs

    def spy(self, pairs, **options):
        scores = score_pairs(self, pairs, **options)
        calls.append(scores.tolist())
        return scores

    monkeypatch.setattr(Reranker, "score_pairs", spy)
    return calls


def cited_scores(out: str) -> list[float]:
    """The scores of the cited sources: "[n] id  title  (score 1.2345)"."""
    lines = [line for line in out.split("Sources:\n")[1].splitlines() if line.startswith("[")]
    return [float(line.rsplit("(score ", 1)[1].rstrip(")")) for line in lines]


@pytest.mark.parametrize("name", NAMES)
def test_example_with_a_reranker_cites_its_best_passages(
    name, tiny_model_dir, reranker_dir, reranked, no_llm, capsys
):
    args = ["--model", str(tiny_model_dir), "--reranker", str(reranker_dir), "-q", "异地就医"]
    assert example(name).main([*args, "-k", "3", "--chunk-size", "0"]) == 0
    out = capsys.readouterr().out
    assert f"Reranker: {reranker_dir.resolve()} (sources are in its order" in out
    # The reranker saw the first stage's 30 best (the index's rerank_top_n), and the
    # sources are its 3 best, with its scores.
    [scores] = reranked
    assert len(scores) == 30
    assert cited_scores(out) == pytest.approx(sorted(scores, reverse=True)[:3], abs=1e-4)


def test_example_over_a_folder_of_files(tiny_model_dir, no_llm, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("公司年假每年十五天，需要提前一周申请。", encoding="utf-8")
    (tmp_path / "b.md").write_text("# 报销\n差旅费在出差结束后十日内报销。", encoding="utf-8")
    code = example("langchain_chat").main(
        [str(tmp_path), "--model", str(tiny_model_dir), "-q", "年假几天", "-k", "2"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "2 documents indexed" in out
    assert "公司年假每年十五天" in out and "差旅费" in out


class FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/chat/completions that streams REPLY as server-sent events and records requests."""

    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        self.send_response(200)
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(REPLY)}
            payload = {
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            }
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(payload).encode())
            return
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for n, piece in enumerate([*REPLY, None]):
            choice = {
                "index": 0,
                "delta": {"role": "assistant", "content": piece} if piece else {},
                "finish_reason": None if piece else "stop",
            }
            chunk = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": n,
                "model": body["model"],
                "choices": [choice],
            }
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_llm(monkeypatch) -> Iterator[list[dict]]:
    """A local OpenAI-compatible server, configured through the examples' variables."""
    FakeOpenAI.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PEG_RAG_LLM_MODEL", "fake-qwen")
    monkeypatch.setenv("PEG_RAG_LLM_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
    monkeypatch.setenv("PEG_RAG_LLM_API_KEY", "test-key")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield FakeOpenAI.requests
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name", NAMES)
def test_example_streams_an_llm_answer_with_sources(name, tiny_model_dir, fake_llm, capsys):
    pytest.importorskip(CLIENTS[name], reason="the 'llm' extra is not installed")
    question = "异地就医需要备案吗"
    code = example(name).main(
        ["--model", str(tiny_model_dir), "-q", question, "-k", "2", "--chunk-size", "0"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "LLM: fake-qwen" in out and NO_LLM_NOTICE not in out
    assert "".join(REPLY) + "\nSources:\n[1] " in out
    [request] = fake_llm
    assert request["model"] == "fake-qwen" and request["stream"] is True
    prompt = "\n".join(m["content"] for m in request["messages"])
    assert SYSTEM_PROMPT in prompt and question in prompt
    # The cited passages are the ones the LLM was given, numbered for citation.
    for line in out.split("Sources:\n")[1].splitlines()[:2]:
        citation, title, _ = line.split("  ")  # "[1] id", title, "(score ...)"
        number = citation.split()[0]
        assert title in prompt and number in prompt


def test_llama_index_chat_engine_reranks_before_numbering(
    tiny_model_dir, reranker_dir, reranked, fake_llm, capsys
):
    pytest.importorskip(CLIENTS["llama_index_chat"], reason="the 'llm' extra is not installed")
    args = ["--model", str(tiny_model_dir), "--reranker", str(reranker_dir), "-q", "异地就医"]
    assert example("llama_index_chat").main([*args, "-k", "2", "--chunk-size", "0"]) == 0
    out = capsys.readouterr().out
    [scores] = reranked
    assert cited_scores(out) == pytest.approx(sorted(scores, reverse=True)[:2], abs=1e-4)
    [request] = fake_llm
    prompt = "\n".join(m["content"] for m in request["messages"])
    assert "[1]" in prompt and "[2]" in prompt and "[3]" not in prompt  # the 2 kept, numbered
