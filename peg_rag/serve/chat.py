"""The RAG chat behind ``POST /v1/chat/completions``: retrieve for the last question, number
the passages in the system prompt (the chat examples' prompt), and answer with the LLM, or
extractively when none is configured, in OpenAI's chat completion (chunk) schema.

The first chunk (or the completion) carries the numbered sources under ``peg_rag``, which
OpenAI clients ignore and the web page shows next to the ``[n]`` citations.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from peg_rag.apps.rag_chat import (
    NO_LLM_NOTICE,
    SYSTEM_PROMPT,
    LLMSettings,
    Source,
    context_block,
    extractive_answer,
)
from peg_rag.retrieval.results import RetrievalResult

from .errors import APIError
from .llm import stream_chat
from .schemas import ChatRequest


def question_of(request: ChatRequest) -> str:
    """The last user message: what is retrieved for."""
    for message in reversed(request.messages):
        if message.role == "user" and message.text().strip():
            return message.text()
    raise APIError(400, "messages: no user message with text to answer", param="messages")


def llm_messages(request: ChatRequest, sources: Sequence[Source]) -> list[dict[str, str]]:
    """Our system prompt with the numbered passages, then the conversation."""
    system = SYSTEM_PROMPT + "\n\n参考资料：\n" + context_block(sources)
    turns = [{"role": m.role, "content": m.text()} for m in request.messages]
    return [{"role": "system", "content": system}, *turns]


def sources_of(results: Sequence[RetrievalResult]) -> list[Source]:
    return [Source(r.id, r.text, r.score, str(r.metadata.get("title", ""))) for r in results]


async def answer_pieces(
    llm: LLMSettings | None, request: ChatRequest, sources: Sequence[Source]
) -> AsyncIterator[str]:
    """The answer's text as it is produced: the LLM's stream, or the notice that there is no
    LLM followed by the extractive answer."""
    if llm is None:
        yield NO_LLM_NOTICE + "\n\n" + extractive_answer(sources)
        return
    options = {"temperature": request.temperature, "top_p": request.top_p}
    async for piece in stream_chat(
        llm, llm_messages(request, sources), max_tokens=request.max_tokens, **options
    ):
        yield piece


class Completion:
    """OpenAI's chat completion objects for one answer."""

    def __init__(self, model: str, llm: LLMSettings | None, results: Sequence[RetrievalResult]):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.extra = {
            "peg_rag": {
                "llm": llm.model if llm else None,
                "sources": [{"n": n, **r.to_dict()} for n, r in enumerate(results, start=1)],
            }
        }

    def chunk(self, delta: dict[str, str], finish: str | None = None, first: bool = False) -> str:
        """One server-sent event of the stream."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if first:
            body.update(self.extra)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def whole(self, text: str) -> dict[str, Any]:
        """The non-streamed completion."""
        message = {"role": "assistant", "content": text}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": None,
            **self.extra,
        }
