"""``peg-rag serve`` over real HTTP: a uvicorn server on 127.0.0.1 in a thread, called with the
official ``openai`` client, LangChain's ``OpenAIEmbeddings`` and plain httpx."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
from helpers import CHINESE_TEXTS, build_tiny_model, build_tiny_reranker
from langchain_openai import OpenAIEmbeddings
from serve_utils import (
    REPLY,
    FakeLLM,
    build_index,
    fake_llm,
    prompted_model,
    running,
    wait_ready,
)

from peg_rag import HybridRetriever, PEGEncoder, Reranker
from peg_rag.apps.rag_chat import NO_LLM_NOTICE, SYSTEM_PROMPT
from peg_rag.serve import ServeSettings, create_app
from peg_rag.serve.models import load_models

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tiny-zh"  # the served model's folder name
QUERY = "异地就医怎么备案"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir) -> SimpleNamespace:
    """The prompted tiny model, a reranker, an index built with that model, one that records
    the reranker, and one built with another model."""
    root = tmp_path_factory.mktemp("serve")
    model = prompted_model(root / NAME, tiny_model_dir)
    reranker = build_tiny_reranker(root / "reranker")
    other = build_tiny_model(root / "other-model", seed=3)
    return SimpleNamespace(
        model=model,
        reranker=reranker,
        kb=build_index(root / "kb", model),
        reranked=build_index(root / "kb-reranked", model, reranker=str(reranker)),
        other=build_index(root / "kb-other", other),
    )


@pytest.fixture(scope="module")
def encoder(files) -> PEGEncoder:
    return PEGEncoder.from_pretrained(files.model, device="cpu")


@pytest.fixture(scope="module")
def llm():
    with fake_llm() as url:
        yield url


@pytest.fixture(scope="module")
def server(files, llm) -> str:
    """With an API key, a reranker, three indexes, the stand-in LLM and small limits."""
    settings = ServeSettings(
        model=str(files.model),
        reranker=str(files.reranker),
        indexes={"kb": files.kb, "kb-reranked": files.reranked, "kb-other": files.other},
        api_key=KEY,
        max_inputs=64,
        max_chars=5000,
        llm_model="fake-qwen",
        llm_base_url=llm,
        llm_api_key="llm-key",
    )
    with running(create_app(settings)) as url:
        wait_ready(url)
        yield url


@pytest.fixture(scope="module")
def plain(files) -> str:
    """No key, no LLM, --truncate, and CORS for one origin."""
    settings = ServeSettings(
        model=str(files.model),
        indexes={"kb": files.kb},
        truncate=True,
        cors_origin=["http://app.example"],
    )
    with running(create_app(settings)) as url:
        wait_ready(url)
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def post(base: str, path: str, body: object, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, headers=AUTH if headers is None else headers)


def embeddings_work(server: str, encoder: PEGEncoder) -> bool:
    """The server still answers a good request correctly."""
    answer = post(server, "/v1/embeddings", {"model": NAME, "input": CHINESE_TEXTS[0]})
    vector = answer.json()["data"][0]["embedding"]
    return np.allclose(vector, encoder.encode_passages(CHINESE_TEXTS[:1])[0], atol=1e-5)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text (0 if absent)."""
    inside = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + (f"{{{inside}}}" if labels else "")) + r" (\S+)"
    found = re.search(rf"^{pattern}$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# ---------------------------------------------------------------- embeddings


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_openai_client_gets_the_encoders_vectors(client, encoder, encoding_format):
    passages = client.embeddings.create(
        model=NAME, input=CHINESE_TEXTS, encoding_format=encoding_format
    )
    queries = client.embeddings.create(
        model=NAME,
        input=CHINESE_TEXTS,
        encoding_format=encoding_format,
        extra_body={"input_type": "query"},
    )
    aliased = client.embeddings.create(
        model=f"{NAME}:query", input=CHINESE_TEXTS, encoding_format=encoding_format
    )
    expected_p = encoder.encode_passages(CHINESE_TEXTS)
    expected_q = encoder.encode_queries(CHINESE_TEXTS)
    assert not np.allclose(expected_p, expected_q, atol=1e-3)  # the prompts matter
    for answer, expected in ((passages, expected_p), (queries, expected_q), (aliased, expected_q)):
        assert [d.index for d in answer.data] == list(range(len(CHINESE_TEXTS)))
        vectors = [d.embedding for d in answer.data]
        if encoding_format == "base64":  # asked for explicitly, the client leaves it encoded
            vectors = [np.frombuffer(base64.b64decode(v), dtype="<f4") for v in vectors]
        np.testing.assert_allclose(vectors, expected, atol=1e-5)
    tokens = sum(len(ids) for ids in encoder.tokenize(CHINESE_TEXTS, "passage")[0])
    assert passages.usage.prompt_tokens == passages.usage.total_tokens == tokens
    assert passages.model == NAME


def test_base64_is_little_endian_float32(server, encoder):
    body = {"model": NAME, "input": "医保报销", "encoding_format": "base64"}
    data = post(server, "/v1/embeddings", body).json()["data"][0]["embedding"]
    vector = np.frombuffer(base64.b64decode(data), dtype="<f4")
    np.testing.assert_allclose(vector, encoder.encode_passages(["医保报销"])[0], atol=1e-6)


def test_langchain_openai_embeddings(server, encoder):
    def langchain(model: str) -> OpenAIEmbeddings:
        return OpenAIEmbeddings(
            model=model, base_url=f"{server}/v1", api_key=KEY, check_embedding_ctx_length=False
        )

    documents = langchain(NAME).embed_documents(CHINESE_TEXTS)
    query = langchain(f"{NAME}:query").embed_query(QUERY)
    np.testing.assert_allclose(documents, encoder.encode_passages(CHINESE_TEXTS), atol=1e-5)
    np.testing.assert_allclose(query, encoder.encode_queries([QUERY])[0], atol=1e-5)


def test_concurrent_requests_of_different_sizes_each_get_their_own_rows(server, encoder):
    requests = [
        [f"{CHINESE_TEXTS[n % 8]}（第{n}问，{i}）" for i in range(n % 9 + 1)] for n in range(32)
    ]
    before = httpx.get(f"{server}/metrics", headers=AUTH).text

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as session:
            return await asyncio.gather(
                *(
                    session.post(f"{server}/v1/embeddings", json={"model": NAME, "input": texts})
                    for texts in requests
                )
            )

    answers = asyncio.run(send_all())
    for texts, answer in zip(requests, answers, strict=True):
        assert answer.status_code == 200, answer.text
        rows = [d["embedding"] for d in answer.json()["data"]]
        np.testing.assert_allclose(rows, encoder.encode_passages(texts), atol=1e-5)
    after = httpx.get(f"{server}/metrics", headers=AUTH).text
    passes = metric(after, "peg_rag_batch_requests_count", model="embeddings") - metric(
        before, "peg_rag_batch_requests_count", model="embeddings"
    )
    assert 1 <= passes < len(requests)  # requests shared forward passes


# ---------------------------------------------------------------- rerank, retrieve, models


def test_rerank_matches_the_reranker(server, files):
    reranker = Reranker.from_pretrained(files.reranker, device="cpu")
    documents = [CHINESE_TEXTS[5], {"text": CHINESE_TEXTS[0]}, CHINESE_TEXTS[2], CHINESE_TEXTS[6]]
    texts = [d["text"] if isinstance(d, dict) else d for d in documents]
    body = {"model": "reranker", "query": QUERY, "documents": documents}
    answer = post(server, "/v1/rerank", {**body, "top_n": 3, "return_documents": True}).json()
    logits = reranker.score(QUERY, texts)
    best = np.argsort(-logits, kind="stable")[:3].tolist()
    assert [r["index"] for r in answer["results"]] == best
    assert [r["relevance_score"] for r in answer["results"]] == pytest.approx(
        (1 / (1 + np.exp(-logits[best]))).tolist(), abs=1e-5
    )
    assert [r["document"]["text"] for r in answer["results"]] == [texts[i] for i in best]
    raw = post(server, "/v1/rerank", {**body, "raw_scores": True}).json()["results"]
    assert [r["relevance_score"] for r in raw] == pytest.approx(sorted(logits, reverse=True), 1e-4)
    assert all("document" not in r for r in raw)


def test_retrieve_returns_the_retrievers_results_with_stage_ranks(server, files):
    retriever = HybridRetriever.load(files.kb, device="cpu")
    for body, options in (
        ({}, {}),
        ({"filters": {"domain": "医保"}, "method": "dense"}, {"method": "dense"}),
    ):
        filters = body.get("filters")
        answer = post(server, "/v1/retrieve", {"index": "kb", "query": QUERY, "k": 4, **body})
        results = answer.json()["results"]
        expected = retriever.retrieve(QUERY, k=4, filters=filters, **options)
        assert [r["id"] for r in results] == [r.id for r in expected]
        assert [r["rank"] for r in results] == [1, 2, 3, 4]
        assert [r["score"] for r in results] == pytest.approx([r.score for r in expected])
        assert [r["ranks"] for r in results] == [r.ranks for r in expected]
        assert all(r["metadata"]["domain"] == "医保" for r in results) or filters is None
    reranked = post(server, "/v1/retrieve", {"index": "kb", "query": QUERY, "rerank": True})
    assert [r["ranks"]["rerank"] for r in reranked.json()["results"]] == [1, 2, 3, 4, 5]


def test_an_index_that_records_a_reranker_reranks_unless_told_not_to(server):
    body = {"index": "kb-reranked", "query": QUERY, "k": 3}
    default = post(server, "/v1/retrieve", body).json()["results"]
    off = post(server, "/v1/retrieve", {**body, "rerank": False}).json()["results"]
    assert [r["ranks"]["rerank"] for r in default] == [1, 2, 3]
    assert [r["ranks"]["rerank"] for r in off] == [None, None, None]


def test_indexes_share_the_models_they_have_in_common(files):
    settings = ServeSettings(
        model=str(files.model),
        reranker=str(files.reranker),
        indexes={"kb": files.kb, "kb-reranked": files.reranked, "kb-other": files.other},
    )
    models = load_models(settings)
    indexes = models.indexes
    assert indexes["kb"].retriever.encoder is models.encoder
    assert indexes["kb-reranked"].retriever.encoder is models.encoder
    assert indexes["kb-reranked"].retriever.reranker is models.reranker
    assert indexes["kb"].retriever.reranker is None  # it records none; rerank: true may add it
    assert indexes["kb-other"].retriever.encoder is not models.encoder


def test_backend_onnx_runs_every_model_on_onnx_runtime_with_the_same_vectors(files, encoder):
    pytest.importorskip("onnxruntime")
    settings = ServeSettings(
        model=str(files.model),
        reranker=str(files.reranker),
        indexes={"kb": files.kb},
        backend="onnx",
    )
    with running(create_app(settings)) as url:
        wait_ready(url)
        answer = post(url, "/v1/embeddings", {"model": NAME, "input": CHINESE_TEXTS[:3]})
        hits = post(url, "/v1/retrieve", {"index": "kb", "query": QUERY, "rerank": True})
    models = load_models(settings)
    runtimes = [models.encoder, models.reranker, models.indexes["kb"].retriever.encoder]
    assert [m.load_options["backend"] for m in runtimes] == ["onnx"] * 3
    vectors = np.array([row["embedding"] for row in answer.json()["data"]])
    expected = encoder.encode_passages(CHINESE_TEXTS[:3])
    assert np.allclose((vectors * expected).sum(axis=1), 1.0, atol=1e-4)
    assert [r["ranks"]["rerank"] for r in hits.json()["results"]] == [1, 2, 3, 4, 5]


def test_models_health_and_metrics(server):
    models = httpx.get(f"{server}/v1/models", headers=AUTH).json()
    kinds = {m["id"]: m["type"] for m in models["data"]}
    assert kinds == {
        NAME: "embedding",
        "reranker": "rerank",
        "kb": "index",
        "kb-reranked": "index",
        "kb-other": "index",
    }
    kb = next(m for m in models["data"] if m["id"] == "kb")
    assert kb["chunks"] == kb["documents"] == 30 and models["llm"] == "fake-qwen"
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}  # no key needed
    post(server, "/v1/embeddings", {"input": "医保"})
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    assert metric(text, "peg_rag_requests_total", route="/v1/embeddings", status="200") >= 1
    assert metric(text, "peg_rag_batch_texts_count", model="embeddings") >= 1
    assert "# TYPE peg_rag_request_seconds histogram" in text
    assert metric(text, "peg_rag_queue_seconds_count", model="embeddings") >= 1


# ---------------------------------------------------------------- errors


LONG = "医" * 300  # over the tiny model's 128 tokens
ERRORS = [
    ("/v1/embeddings", b"{not json", 400, "not valid JSON"),
    ("/v1/embeddings", [1, 2], 400, "must be a JSON object"),
    ("/v1/embeddings", {"input": ""}, 400, "'input' is empty"),
    ("/v1/embeddings", {"input": []}, 400, "'input' is an empty list"),
    ("/v1/embeddings", {"input": [101, 102]}, 400, "token ids at [0]: this server takes text"),
    ("/v1/embeddings", {"input": [[101, 102]]}, 400, "token ids"),
    ("/v1/embeddings", {"input": ["好", None]}, 400, "'input[1]' is NoneType"),
    ("/v1/embeddings", {"input": "好", "input_type": "document"}, 400, "input_type must be"),
    ("/v1/embeddings", {"input": "好", "encoding_format": "int8"}, 400, "encoding_format"),
    ("/v1/embeddings", {"input": "好", "dimensions": 8}, 400, "does not shorten"),
    ("/v1/embeddings", {"input": ["好", LONG]}, 400, "input[1] is longer than the model's 128"),
    (
        "/v1/embeddings",
        {"input": "好", "model": f"{NAME}:query", "input_type": "passage"},
        400,
        "says 'query' but input_type says 'passage'",
    ),
    ("/v1/embeddings", {"input": "好", "model": "text-embedding-3-small"}, 404, "not served"),
    ("/v1/embeddings", {"input": "好", "model": f"{NAME}:document"}, 404, "not served"),
    ("/v1/embeddings", {"input": ["好"] * 65}, 413, "at most 64 per request"),
    ("/v1/embeddings", {"input": ["好" * 2600, "好" * 2600]}, 413, "5200 characters"),
    ("/v1/embeddings", {"input": "好" * 200_000}, 413, "bytes"),
    ("/v1/rerank", {"query": "好", "documents": ["好"], "model": "bge"}, 404, "not served"),
    ("/v1/rerank", {"query": "好", "documents": []}, 400, "empty list"),
    ("/v1/rerank", {"query": " ", "documents": ["好"]}, 400, "'query' is empty"),
    ("/v1/retrieve", {"index": "nope", "query": "好"}, 404, "no index named 'nope'"),
    ("/v1/retrieve", {"index": "../kb", "query": "好"}, 404, "no index named '../kb'"),
    ("/v1/retrieve", {"index": "/etc", "query": "好"}, 404, "no index named '/etc'"),
    ("/v1/retrieve", {"index": "kb", "query": "好", "k": 0}, 400, "k: Input should be greater"),
    ("/v1/retrieve", {"index": "kb", "query": "好", "method": "magic"}, 400, "method"),
    ("/v1/retrieve", {"index": "kb", "query": "好", "filters": {"a": {"$re": 1}}}, 400, "$re"),
    ("/v1/chat/completions", {"model": "nope", "messages": []}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"model": "nope", "messages": [{"role": "user", "content": "好"}]},
        404,
        "no index named 'nope'",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), ERRORS)
def test_bad_requests_get_their_status_and_message_and_serving_goes_on(
    server, encoder, path, body, status, message
):
    if isinstance(body, bytes):
        answer = httpx.post(f"{server}{path}", content=body, headers=AUTH)
    else:
        answer = post(server, path, body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"
    assert embeddings_work(server, encoder)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}],
    ids=["missing", "wrong", "not-bearer"],
)
def test_api_routes_need_the_key_and_the_page_and_health_do_not(server, headers):
    for method, path in (("POST", "/v1/embeddings"), ("GET", "/v1/models"), ("GET", "/metrics")):
        answer = httpx.request(method, f"{server}{path}", json={"input": "好"}, headers=headers)
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "invalid_api_key"
        assert answer.headers["www-authenticate"] == "Bearer"
    for path in ("/health", "/", "/static/app.js", "/static/style.css"):
        assert httpx.get(f"{server}{path}", headers=headers).status_code == 200


def test_the_openai_client_reports_the_errors(client):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.embeddings.create(model="text-embedding-3-small", input="好")
    with pytest.raises(openai.BadRequestError, match="longer than the model's 128 tokens"):
        client.embeddings.create(model=NAME, input=LONG)
    wrong = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong.embeddings.create(model=NAME, input="好")


def test_unknown_routes_and_methods_answer_in_the_error_shape(server):
    missing = httpx.get(f"{server}/v1/nothing", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(f"{server}/v1/embeddings", headers=AUTH)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_with_truncate_long_texts_are_cut_and_counted(plain, encoder):
    answer = post(plain, "/v1/embeddings", {"input": ["好", LONG]}, headers={}).json()
    assert answer["truncated"] == 1
    assert answer["usage"]["prompt_tokens"] == len(encoder.tokenize(["好"], "passage")[0][0]) + 128
    np.testing.assert_allclose(
        answer["data"][1]["embedding"], encoder.encode_passages([LONG])[0], atol=1e-5
    )


def test_cors_is_off_unless_an_origin_is_given(server, plain):
    preflight = {
        "Origin": "http://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    assert (
        "access-control-allow-origin"
        not in httpx.options(f"{server}/v1/embeddings", headers=preflight).headers
    )
    assert (
        "access-control-allow-origin"
        not in httpx.get(f"{server}/health", headers={"Origin": "http://app.example"}).headers
    )
    allowed = httpx.options(f"{plain}/v1/embeddings", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://app.example"
    other = httpx.options(f"{plain}/v1/embeddings", headers={**preflight, "Origin": "http://x"})
    assert "access-control-allow-origin" not in other.headers


# ---------------------------------------------------------------- disconnects, loading


def test_clients_that_disconnect_mid_request_do_not_break_the_next(server, encoder):
    before = httpx.get(f"{server}/metrics", headers=AUTH).text
    texts = [f"{CHINESE_TEXTS[i % 8]}，第{i}段。" * 4 for i in range(60)]
    payload = httpx.Request(
        "POST", f"{server}/v1/embeddings", json={"input": texts}, headers=AUTH
    ).read()
    port = int(server.rsplit(":", 1)[1])
    for _ in range(8):  # send whole requests, then hang up without reading the answers
        with socket.create_connection(("127.0.0.1", port)) as sock:
            head = (
                f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n"
            )
            sock.sendall(head.encode() + payload)
    assert embeddings_work(server, encoder)
    after = httpx.get(f"{server}/metrics", headers=AUTH).text
    left = metric(after, "peg_rag_client_disconnects_total") - metric(
        before, "peg_rag_client_disconnects_total"
    )
    computed = metric(after, "peg_rag_batch_texts_sum", model="embeddings") - metric(
        before, "peg_rag_batch_texts_sum", model="embeddings"
    )
    assert left >= 1
    assert computed < 8 * len(texts)  # queued texts of departed clients were dropped


def test_model_routes_answer_503_while_the_models_load(files, encoder):
    release = threading.Event()

    def slow_loader(settings):
        assert release.wait(60)
        return load_models(settings)

    app = create_app(ServeSettings(model=str(files.model)), loader=slow_loader)
    with running(app) as url:
        loading = httpx.post(f"{url}/v1/embeddings", json={"input": "好"})
        assert loading.status_code == 503
        assert loading.json()["error"]["code"] == "model_loading"
        assert loading.headers["retry-after"] == "5"
        health = httpx.get(f"{url}/health")
        assert (health.status_code, health.json()) == (503, {"status": "loading"})
        release.set()
        wait_ready(url)
        assert embeddings_work(url, encoder)


def test_a_failed_load_is_reported(tmp_path):
    stopped: list[BaseException] = []
    app = create_app(ServeSettings(model=str(tmp_path / "missing")), on_load_error=stopped.append)
    with running(app) as url:
        for _ in range(600):
            if stopped:
                break
            time.sleep(0.05)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "missing" in health.json()["error"]
        answer = httpx.post(f"{url}/v1/embeddings", json={"input": "好"})
        assert answer.json()["error"]["code"] == "load_failed"
    assert len(stopped) == 1


# ---------------------------------------------------------------- chat


def test_chat_streams_the_llms_answer_with_numbered_sources(client, llm):
    FakeLLM.requests.clear()
    stream = client.chat.completions.create(
        model="kb", messages=[{"role": "user", "content": QUERY}], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(REPLY)
    sources = chunks[0].model_extra["peg_rag"]["sources"]
    assert [s["n"] for s in sources] == [1, 2, 3, 4] and chunks[0].model_extra["peg_rag"]["llm"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    [request] = FakeLLM.requests
    assert request["authorization"] == "Bearer llm-key"
    assert request["body"]["model"] == "fake-qwen" and request["body"]["stream"] is True
    system = request["body"]["messages"][0]["content"]
    assert system.startswith(SYSTEM_PROMPT)
    for source in sources:  # the numbers the answer cites are the sources the page shows
        assert f"[{source['n']}] " in system and source["text"] in system
    assert request["body"]["messages"][-1] == {"role": "user", "content": QUERY}


def test_chat_without_streaming(client):
    answer = client.chat.completions.create(
        model="kb", messages=[{"role": "user", "content": QUERY}], extra_body={"k": 2}
    )
    assert answer.choices[0].message.content == "".join(REPLY)
    assert len(answer.model_extra["peg_rag"]["sources"]) == 2


def test_chat_without_an_llm_says_so_and_answers_extractively(plain):
    chat = openai.OpenAI(base_url=f"{plain}/v1", api_key="unused", max_retries=0)
    answer = chat.chat.completions.create(model="kb", messages=[{"role": "user", "content": QUERY}])
    sources = answer.model_extra["peg_rag"]["sources"]
    content = answer.choices[0].message.content
    assert answer.model_extra["peg_rag"]["llm"] is None
    assert content.startswith(NO_LLM_NOTICE)
    assert f"[1] {sources[0]['text']}" in content


def test_an_unreachable_llm_is_a_502(files):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    settings = ServeSettings(
        model=str(files.model),
        indexes={"kb": files.kb},
        llm_model="m",
        llm_base_url=f"http://127.0.0.1:{port}/v1",
    )
    with running(create_app(settings)) as url:
        wait_ready(url)
        body = {"model": "kb", "messages": [{"role": "user", "content": QUERY}]}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert answer.status_code == 502 and "unreachable" in answer.json()["error"]["message"]
        streamed = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True})
        assert '"code": "llm_error"' in streamed.text


def test_the_page_is_served_with_a_content_security_policy(server):
    page = httpx.get(f"{server}/")
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/static/app.js">' in page.text
