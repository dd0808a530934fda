"""The FastAPI application of ``peg-rag serve``: its routes and the page.

Each API route checks the key (:class:`.gate.Gate`), parses its body into a schema, asks
the runtime for the loaded models (503 while they load) and hands model work to a batcher
or the model thread (:mod:`.runtime`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import numpy as np

from peg_rag.core.extras import require

require("fastapi", "serve", "peg-rag serve")
require("httpx", "serve", "peg-rag serve")
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse

from peg_rag.apps.rag_chat import ENV_API_KEY, ENV_BASE_URL, ENV_MODEL, LLMSettings
from peg_rag.retrieval.results import RetrievalResult

from . import models as served
from .chat import Completion, answer_pieces, question_of, sources_of
from .errors import APIError, install_handlers
from .gate import ClientGone, Gate
from .llm import LLMError
from .observe import ObserveRequests, ServerMetrics
from .prometheus import CONTENT_TYPE
from .runtime import Runtime
from .schemas import (
    ENCODING_FORMATS,
    ChatRequest,
    EmbeddingRequest,
    RerankRequest,
    RetrieveRequest,
    document_texts,
    embedding_kind,
    parse,
    texts_of,
)
from .settings import ServeSettings, served_name

_PAGE = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def llm_settings(settings: ServeSettings) -> LLMSettings | None:
    """The chat LLM of the settings (their PEG_RAG_LLM_* variables or flags), None if unset."""
    return LLMSettings.from_env(
        {
            ENV_MODEL: settings.llm_model or "",
            ENV_BASE_URL: settings.llm_base_url or "",
            ENV_API_KEY: settings.llm_api_key or "",
        }
    )


def vector_json(row: np.ndarray, encoding_format: str) -> Any:
    """A vector as OpenAI sends it: a list of floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode()
    return row.tolist()


def create_app(
    settings: ServeSettings,
    *,
    loader: Callable[[ServeSettings], served.Models] = served.load_models,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The application. ``loader`` loads the models (in a worker thread, after start-up);
    ``on_load_error`` is called if it fails (the CLI stops the server)."""
    llm = llm_settings(settings)
    metrics = ServerMetrics()
    gate = Gate(settings, metrics)
    runtime = Runtime(settings, metrics, loader, on_load_error)
    reranker_name = served_name(settings.reranker) if settings.reranker else None
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(runtime.load())
        try:
            yield
        finally:
            loading.cancel()
            await runtime.close()

    app = FastAPI(
        title="peg-rag serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    install_handlers(app)

    async def client_gone(_: Request, __: Exception) -> Response:
        # Nobody reads this; the status tells the metrics and the access log what happened.
        return Response(status_code=499)

    app.add_exception_handler(ClientGone, client_gone)
    api = APIRouter(dependencies=[Depends(gate.check_key)])

    @api.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        models = runtime.ready().models
        entry = {"object": "model", "created": started, "owned_by": "peg-rag"}
        data = [
            {
                "id": settings.name,
                **entry,
                "type": "embedding",
                "dimensions": models.encoder.dim,
                "max_tokens": models.encoder.max_length,
            }
        ]
        if models.reranker is not None:
            data.append({"id": reranker_name, **entry, "type": "rerank"})
        for name, index in models.indexes.items():
            data.append({"id": name, **entry, "type": "index", **index.describe()})
        return {"object": "list", "data": data, "llm": llm.model if llm else None}

    @api.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        now = runtime.ready()
        body = parse(EmbeddingRequest, await gate.read_json(request))
        kind = embedding_kind(body, settings.name)
        if body.encoding_format not in ENCODING_FORMATS:
            raise APIError(
                400,
                f"encoding_format must be 'float' or 'base64', got {body.encoding_format!r}",
                param="encoding_format",
            )
        encoder = now.models.encoder
        if body.dimensions not in (None, encoder.dim):
            raise APIError(
                400,
                f"dimensions={body.dimensions}: this model makes {encoder.dim}-dimensional "
                "vectors and does not shorten them",
                param="dimensions",
            )
        texts = texts_of(body.input, "input")
        gate.check_size(texts, "input")
        prompt = encoder.query_prompt if kind == "query" else encoder.passage_prompt
        counts = await runtime.in_token_thread(now.texts.texts, texts, prompt)
        limit = encoder.max_length
        over = [i for i, n in enumerate(counts) if n > limit]
        if over and not settings.truncate:
            raise APIError(
                400,
                f"input[{over[0]}] is longer than the model's {limit} tokens "
                f"({len(over)} input(s) are); shorten it, or start the server with --truncate",
                code="context_length_exceeded",
                param="input",
            )
        counts = [min(n, limit) for n in counts]
        work = now.embedder.submit([(t, kind) for t in texts], counts)
        rows = await gate.unless_gone(request, work)
        tokens = sum(counts)
        data = [
            {"object": "embedding", "index": i, "embedding": vector_json(row, body.encoding_format)}
            for i, row in enumerate(rows)
        ]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": body.model or settings.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "truncated": len(over),
            }
        )

    @api.post("/v1/rerank")
    async def rerank(request: Request) -> dict[str, Any]:
        now = runtime.ready()
        if now.reranker is None or now.pairs is None:
            raise APIError(
                404, "no reranker is served here (start with --reranker)", code="model_not_found"
            )
        body = parse(RerankRequest, await gate.read_json(request))
        if body.model not in (None, reranker_name):
            raise APIError(
                404,
                f"model {body.model!r} is not served here; the reranker is {reranker_name!r}",
                code="model_not_found",
                param="model",
            )
        [query] = texts_of(body.query, "query")
        documents = document_texts(body.documents)
        gate.check_size(documents, "documents", also=query)
        counts = await runtime.in_token_thread(now.pairs.pairs, query, documents)
        work = now.reranker.submit([(query, d) for d in documents], counts)
        logits = np.asarray(await gate.unless_gone(request, work), dtype=np.float64)
        scores = logits if body.raw_scores else 1.0 / (1.0 + np.exp(-logits))
        results = []
        for i in np.argsort(-scores, kind="stable")[: body.top_n].tolist():
            result: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
            if body.return_documents:
                result["document"] = {"text": documents[i]}
            results.append(result)
        return {
            "id": uuid.uuid4().hex,
            "model": reranker_name,
            "results": results,
            "usage": {"total_tokens": sum(counts)},
        }

    def find_index(name: str, param: str) -> served.Index:
        indexes = runtime.ready().models.indexes
        if name not in indexes:
            listed = ", ".join(map(repr, indexes)) or "none"
            raise APIError(
                404,
                f"no index named {name!r} is served here (served: {listed})",
                code="index_not_found",
                param=param,
            )
        return indexes[name]

    async def retrieve(
        request: Request, index: served.Index, query: str, **options: Any
    ) -> list[RetrievalResult]:
        retriever = index.retriever
        try:
            work = runtime.in_model_thread(lambda: retriever.retrieve(query, **options))
            return await gate.unless_gone(request, work)
        except (ValueError, TypeError) as exc:  # bad filters, weights, k...
            raise APIError(400, str(exc)) from None

    @api.post("/v1/retrieve")
    async def retrieve_route(request: Request) -> dict[str, Any]:
        runtime.ready()
        body = parse(RetrieveRequest, await gate.read_json(request))
        index = find_index(body.index, "index")
        [query] = texts_of(body.query, "query")
        gate.check_size([query], "query")
        reranker: Any = None if body.rerank is None else False  # None: the index's default
        if body.rerank:
            reranker = index.retriever.reranker or index.fallback_reranker
            if reranker is None:
                raise APIError(
                    400,
                    f"index {body.index!r} has no reranker and the server was started "
                    "without --reranker",
                    param="rerank",
                )
        results = await retrieve(
            request,
            index,
            query,
            k=body.k,
            filters=body.filters,
            method=body.method,
            fusion=body.fusion,
            weights=body.weights,
            candidates=body.candidates,
            reranker=reranker,
            rerank_top_n=body.rerank_top_n,
        )
        return {
            "object": "list",
            "index": body.index,
            "query": query,
            "results": [{"rank": n, **r.to_dict()} for n, r in enumerate(results, start=1)],
        }

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        runtime.ready()
        body = parse(ChatRequest, await gate.read_json(request))
        index = find_index(body.model, "model")
        question = question_of(body)
        gate.check_size([question], "messages")
        results = await retrieve(request, index, question, k=body.k, filters=body.filters)
        completion = Completion(body.model, llm, results)
        sources = sources_of(results)
        if not body.stream:
            try:
                text = "".join([piece async for piece in answer_pieces(llm, body, sources)])
            except LLMError as exc:
                raise APIError(502, str(exc), code="llm_error") from None
            return completion.whole(text)

        async def events() -> AsyncIterator[str]:
            yield completion.chunk({"role": "assistant", "content": ""}, first=True)
            try:
                async for piece in answer_pieces(llm, body, sources):
                    yield completion.chunk({"content": piece})
            except LLMError as exc:  # the stream has started: report in-band, as OpenAI does
                error = APIError(502, str(exc), code="llm_error").body()
                yield f"data: {json.dumps(error, ensure_ascii=False)}\n\n"
                return
            yield completion.chunk({}, finish="stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @api.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(api)

    @app.get("/health")
    async def health() -> JSONResponse:
        status = runtime.status
        if status == "error":
            return JSONResponse({"status": status, "error": runtime.error}, status_code=503)
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    # The page's three files, read once: no request chooses a path to read.
    for path, (file, media_type) in _PAGE.items():
        content = (resources.files("peg_rag.serve") / "static" / file).read_bytes()
        app.add_api_route(path, _page_file(content, media_type), methods=["GET"])

    if settings.cors_origin:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    routes = {getattr(route, "path", "") for route in [*api.routes, *app.routes]} - {""}
    app.add_middleware(ObserveRequests, metrics=metrics, routes=routes)
    return app


def _page_file(content: bytes, media_type: str) -> Callable[[], Any]:
    async def serve_file() -> Response:
        return Response(content, media_type=media_type, headers=_PAGE_HEADERS)

    return serve_file
