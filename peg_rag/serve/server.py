"""Run the server: check the settings, start uvicorn, stop if the models fail to load."""

from __future__ import annotations

import ipaddress
import logging

from peg_rag.core.extras import require
from peg_rag.retrieval.index_files import is_index

from .settings import ServeSettings

logger = logging.getLogger("peg_rag")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_server(settings: ServeSettings) -> int:
    """Serve until interrupted; 0 on a clean stop, 2 when the models failed to load."""
    uvicorn = require("uvicorn", "serve", "peg-rag serve")
    from .app import create_app

    for name, directory in settings.indexes.items():
        if not is_index(directory):
            raise ValueError(f"--index {name}={directory}: not a peg-rag index directory")
    if not _is_loopback(settings.host) and settings.api_key is None:
        logger.warning(
            "listening on %s without --api-key: anyone who reaches this port can use it",
            settings.host,
        )
    failures: list[BaseException] = []

    def stop(exc: BaseException) -> None:
        failures.append(exc)
        server.should_exit = True

    app = create_app(settings, on_load_error=stop)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it stopped on
        pass
    return 2 if failures else 0
