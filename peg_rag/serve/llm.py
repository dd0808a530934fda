"""Stream a chat answer from any OpenAI-compatible endpoint (OpenAI, Ollama, vLLM...).

A plain HTTP client over ``POST {base_url}/chat/completions`` with ``stream: true``: the
server needs the text deltas and nothing else of an LLM SDK.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from peg_rag.apps.rag_chat import LLMSettings

OPENAI_BASE_URL = "https://api.openai.com/v1"
TIMEOUT = httpx.Timeout(120.0, connect=10.0)


class LLMError(RuntimeError):
    """The LLM could not be reached or answered with an error."""


async def stream_chat(
    settings: LLMSettings, messages: Sequence[dict[str, str]], **options: Any
) -> AsyncIterator[str]:
    """The answer's text pieces as the LLM streams them. ``options`` (temperature,
    max_tokens...) go into the request; None values are left out."""
    url = (settings.base_url or OPENAI_BASE_URL).rstrip("/") + "/chat/completions"
    body = {"model": settings.model, "messages": list(messages), "stream": True}
    body.update({k: v for k, v in options.items() if v is not None})
    headers = {"Authorization": f"Bearer {settings.api_key}"}
    try:
        async with (
            httpx.AsyncClient(timeout=TIMEOUT) as client,
            client.stream("POST", url, json=body, headers=headers) as response,
        ):
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", "replace")[:300]
                raise LLMError(f"the LLM at {url} answered {response.status_code}: {detail}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    return
                for choice in json.loads(data).get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece
    except httpx.HTTPError as exc:
        raise LLMError(f"the LLM at {url} is unreachable: {type(exc).__name__}: {exc}") from exc
