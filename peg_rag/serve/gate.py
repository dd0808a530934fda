"""What every API request passes around its work: the API key, the body's size and JSON,
the per-request limits, and a watch for a client that leaves before its answer."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect

from .errors import APIError
from .observe import ServerMetrics
from .settings import ServeSettings

T = TypeVar("T")
# JSON escapes a character in at most 6 bytes (\uXXXX); a body beyond that for max_chars
# cannot be a valid request, so it is refused before it is read whole.
_BYTES_PER_CHAR = 6
_BODY_OVERHEAD = 64 * 1024


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class Gate:
    """The checks of ``settings`` (API key, --max-inputs, --max-chars) for each request."""

    def __init__(self, settings: ServeSettings, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.max_body = settings.max_chars * _BYTES_PER_CHAR + _BODY_OVERHEAD

    def check_key(self, request: Request) -> None:
        """With --api-key, ``Authorization: Bearer KEY``, compared in constant time; else 401."""
        if self.settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, self.settings.api_key.encode()):
            raise APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def read_json(self, request: Request) -> Any:
        """The parsed body: 413 beyond the size any valid request can have, 400 if not JSON."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large(f"the body has {declared} bytes")
        body = bytearray()
        try:
            async for piece in request.stream():
                body += piece
                if len(body) > self.max_body:
                    raise self._too_large(f"the body exceeds {self.max_body} bytes")
        except ClientDisconnect:
            self.metrics.disconnects.inc()
            raise ClientGone from None
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise APIError(400, f"the body is not valid JSON: {exc}") from None

    def check_size(self, texts: list[str], field: str, *, also: str = "") -> None:
        """413 beyond --max-inputs texts or --max-chars characters (``also`` counts too)."""
        if len(texts) > self.settings.max_inputs:
            raise APIError(
                413,
                f"'{field}' has {len(texts)} items; this server takes at most "
                f"{self.settings.max_inputs} per request (--max-inputs)",
                code="too_many_inputs",
                param=field,
            )
        chars = sum(len(t) for t in texts) + len(also)
        if chars > self.settings.max_chars:
            raise self._too_large(f"the request has {chars} characters")

    def _too_large(self, what: str) -> APIError:
        return APIError(
            413,
            f"{what}; this server takes at most {self.settings.max_chars} characters per "
            "request (--max-chars)",
            code="request_too_large",
        )

    async def unless_gone(self, request: Request, work: Awaitable[T]) -> T:
        """``work``'s result, or ClientGone (``work`` cancelled, so its queued texts are
        dropped) if the client disconnects first."""

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            self.metrics.disconnects.inc()
            raise ClientGone
        return task.result()
