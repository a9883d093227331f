"""uvicorn around the app, with the limits a server facing unknown clients needs.

uvicorn bounds an idle keep-alive connection, but not a client that sends half its headers and then
stays silent: that connection (and its file descriptor) lives until the client leaves. The HTTP
protocol here adds a deadline on a request's headers and a cap on open connections; the app itself
bounds the time to read a body (``ServeSettings.body_timeout``). On SIGTERM (or SIGINT) the server
stops accepting, gives running and waiting generations ``shutdown_grace`` seconds, then ends them
with an error their clients see, and exits.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import socket
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from medusa.errors import MedusaError

log = logging.getLogger(__name__)

# A request's headers that did not arrive in time: the answer written straight to the socket (no
# request was parsed, so the HTTP library has nothing to answer), then the connection is closed.
REQUEST_TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
REFUSED_LOG_INTERVAL = 10.0  # seconds between two log lines about refused connections


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    header_timeout: float = 10.0  # seconds a client has to send a request's headers, from its first byte
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 256  # open connections; more are closed at once
    # Past this many open connections or requests in flight a request gets 503. Off by default: uvicorn
    # counts every open connection, so a crowd of slow clients would turn /health into 503 too.
    limit_concurrency: int | None = None
    max_header_bytes: int = 16 * 1024  # a request's headers, all together
    shutdown_grace: float = 5.0  # seconds generations may go on after SIGTERM before they are ended
    log_level: str = "info"

    def __post_init__(self) -> None:
        for name in ("header_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise MedusaError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        if self.shutdown_grace < 0:
            raise MedusaError(f"shutdown_grace must be 0 or more seconds, got {self.shutdown_grace}")
        for name in ("max_connections", "limit_concurrency", "max_header_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise MedusaError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise MedusaError(f"port must lie in 0..65535 (0: any free port), got {self.port}")


class _Config(uvicorn.Config):
    """uvicorn's settings plus the two the protocol below reads."""

    def __init__(self, app: FastAPI, server: ServerConfig) -> None:
        # The server's own lines (one per refused request, with its id) go where uvicorn's go.
        log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
        log_config["loggers"]["medusa"] = {"handlers": ["default"], "level": server.log_level.upper()}
        super().__init__(
            app,
            host=server.host,
            port=server.port,
            log_level=server.log_level,
            lifespan="on",
            http=_Protocol,
            log_config=log_config,
            timeout_keep_alive=server.keep_alive_timeout,
            limit_concurrency=server.limit_concurrency,
            h11_max_incomplete_event_size=server.max_header_bytes,
            # A backstop: handlers still running this long after the generations were ended are cancelled.
            timeout_graceful_shutdown=server.shutdown_grace + 5,
        )
        self.header_timeout = server.header_timeout
        self.max_connections = server.max_connections


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1, plus a deadline on a request's headers and a cap on open connections.

    The deadline runs whenever no handler is at work on the connection and the client owes bytes:
    from the connection's start, and from the first byte of each later request, until its headers
    are in. Idle keep-alive connections are uvicorn's own timer's."""

    _refused_logged = 0.0
    header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.config.max_connections:
            now = time.monotonic()
            if now - _Protocol._refused_logged > REFUSED_LOG_INTERVAL:
                _Protocol._refused_logged = now
                log.warning(
                    "refusing connections: %d are open, the most this server keeps (--max-connections)",
                    len(self.connections) - 1,
                )
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._handler_at_work():
            self._cancel_header_timer()
        elif self.header_timer is None:
            self._arm_header_timer()

    def on_response_complete(self) -> None:
        self._cancel_header_timer()  # the connection is idle: the keep-alive timer guards it now
        super().on_response_complete()

    def _handler_at_work(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        if not self.transport.is_closing():
            self.header_timer = self.loop.call_later(self.config.header_timeout, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timeout(self) -> None:
        self.header_timer = None
        if self.transport.is_closing() or self._handler_at_work():
            return
        log.debug("closing a connection whose request did not arrive within %gs", self.config.header_timeout)
        self.transport.write(REQUEST_TIMEOUT_RESPONSE)
        self.transport.close()


class _Server(uvicorn.Server):
    """On shutdown, ends the generations after the grace period while uvicorn closes connections."""

    def __init__(self, config: _Config, app: FastAPI, grace: float) -> None:
        super().__init__(config)
        self.app, self.grace = app, grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        draining = asyncio.create_task(self.app.state.medusa.drain(self.grace))
        try:
            await super().shutdown(sockets)
        finally:
            await draining


def make_server(app: FastAPI, config: ServerConfig) -> uvicorn.Server:
    """A uvicorn server for an app made by ``create_app``; ``run()`` it, or ``run(sockets=...)``."""
    return _Server(_Config(app, config), app, config.shutdown_grace)


def run_server(app: FastAPI, config: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT, then shut down within ``config.shutdown_grace`` seconds (plus a step)."""
    make_server(app, config).run()
