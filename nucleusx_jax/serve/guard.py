"""What stands between the network and the API: the API key, the request-size limit and connection limits.

* :class:`Guard` (ASGI middleware, before routing): a request head over ``MAX_HEADER_BYTES`` gets 431; every
  path but ``/health`` needs ``Authorization: Bearer KEY`` when a key is set (compared in constant time; 401),
  and a request body longer than ``max_request_bytes`` gets 413, from its ``Content-Length`` before anything is read, else as soon as the
  bytes read pass the limit. The body is read here and handed on whole.
* :func:`guarded_protocol`: uvicorn's h11 protocol plus a cap on open connections (503, then close) and a
  deadline to receive each whole request, head and body, from its first byte or the connection's opening
  (408, then close): slow or idle clients cannot hold connections.
* :func:`server_config`: the uvicorn configuration with all of them, the keep-alive timeout and the header-size
  limit.

Every refusal is an OpenAI-style error body, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import checks

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_REQUEST_TIMEOUT_S = 10.0  # to receive a whole request
DEFAULT_KEEP_ALIVE_S = 5  # idle time between requests on one connection
MAX_HEADER_BYTES = 16 * 2**10  # the request line and headers (h11's limit on an incomplete event)
OPEN_PATHS = ("/health",)  # paths served without the API key

Scope = Dict[str, Any]
Message = Dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def error_body(message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
               code: Optional[str] = None) -> bytes:
    """The OpenAI error object as JSON bytes."""
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def raw_response(status: int, body: bytes, close: bool = False,
                 extra: Tuple[Tuple[bytes, bytes], ...] = ()) -> Tuple[List[Tuple[bytes, bytes]], bytes]:
    """Headers and body of a JSON response."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    if close:
        headers.append((b"connection", b"close"))
    return headers, body


async def send_error(send: Send, status: int, body: bytes, close: bool = False,
                     extra: Tuple[Tuple[bytes, bytes], ...] = ()) -> None:
    headers, body = raw_response(status, body, close, extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def check_guard(api_key: Optional[str], max_request_bytes: int) -> None:
    """Raise ValueError for an empty key or a limit below 1 byte."""
    if api_key is not None and not api_key:
        raise ValueError("the API key is empty: give a key, or none to serve without one")
    checks.integer("max_request_bytes", max_request_bytes)


class Guard:
    """The API key and the body-size limit, checked before the app sees the request (see the module doc)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *, api_key: Optional[str],
                 max_request_bytes: int):
        check_guard(api_key, max_request_bytes)
        self.app, self.max_request_bytes = app, max_request_bytes
        self.key = None if api_key is None else api_key.encode()

    def authorized(self, scope: Scope) -> bool:
        """Whether the request carries ``Authorization: Bearer KEY`` (constant-time compare)."""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        head = sum(len(name) + len(value) + 4 for name, value in scope["headers"]) + len(scope["raw_path"])
        if head > MAX_HEADER_BYTES:
            return await send_error(send, 431, error_body(
                f"the request head has {head} bytes, more than the {MAX_HEADER_BYTES} allowed", None,
                code="request_header_too_large"), close=True)
        if self.key is not None and scope["path"] not in OPEN_PATHS and not self.authorized(scope):
            return await send_error(send, 401, error_body(
                "missing or wrong API key: send the header 'Authorization: Bearer KEY'", None,
                "invalid_request_error", "invalid_api_key"), extra=((b"www-authenticate", b"Bearer"),))
        too_large = error_body(f"the request body is larger than the {self.max_request_bytes} bytes allowed "
                               "(--max-request-bytes)", "body", code="request_too_large")
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    return await send_error(send, 400, error_body(
                        f"Content-Length {value[:40]!r} is not a number", "body"), close=True)
                if int(value) > self.max_request_bytes:
                    return await send_error(send, 413, too_large, close=True)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_request_bytes:
                return await send_error(send, 413, too_large, close=True)
        handed = False

        async def replay() -> Message:
            nonlocal handed
            if handed:
                return await receive()
            handed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a whole-request deadline (see the module doc)."""

    max_connections = DEFAULT_MAX_CONNECTIONS
    request_timeout = DEFAULT_REQUEST_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: Optional[asyncio.TimerHandle] = None
        self._armed_cycle: Any = None
        if len(self.connections) > self.max_connections:
            self._refuse(503, error_body(f"the server has {self.max_connections} open connections, the most "
                                         "allowed (--max-connections); retry later", None, "server_error",
                                         "too_many_connections"))
            return
        self._arm()

    def _arm(self) -> None:
        self._armed_cycle = self.cycle
        self._deadline = self.loop.call_later(self.request_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # refused or timed out: nothing more is read
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first byte of a request on a kept-alive connection
        super().data_received(data)
        if self.cycle is not None and self.cycle is not self._armed_cycle and not self.cycle.more_body:
            self._disarm()  # the whole request is in

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle is self._armed_cycle:  # the head is incomplete: nobody answers yet
            self._refuse(408, error_body(f"the request did not arrive within {self.request_timeout:g} s",
                                         None, code="request_timeout"))
        else:  # the app waits for the body; the disconnect ends it
            self.transport.close()

    def _refuse(self, status: int, body: bytes) -> None:
        """Write a whole JSON response outside h11 (no request is being answered) and close."""
        headers, body = raw_response(status, body, close=True)
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}".encode()]
        lines += [name + b": " + value for name, value in headers]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A malformed request (h11 cannot parse it, or its head is over ``MAX_HEADER_BYTES``)."""
        self._refuse(400, error_body(f"{msg} (malformed, or a request head over {MAX_HEADER_BYTES} bytes)"))


_REASONS = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}


def check_server(max_connections: int, request_timeout: float, keep_alive: int = DEFAULT_KEEP_ALIVE_S,
                 ssl_keyfile: Optional[str] = None, ssl_certfile: Optional[str] = None) -> None:
    """Raise ValueError for limits that cannot work, or half a TLS configuration."""
    checks.integer("max_connections", max_connections)
    if not request_timeout > 0:
        raise ValueError(f"request_timeout={request_timeout!r} is invalid: must be > 0 seconds")
    checks.integer("keep_alive", keep_alive, hint=" (seconds)")
    if (ssl_keyfile is None) != (ssl_certfile is None):
        raise ValueError("TLS needs both ssl_keyfile and ssl_certfile (or neither)")


def guarded_protocol(max_connections: int = DEFAULT_MAX_CONNECTIONS,
                     request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S) -> type:
    """uvicorn's h11 protocol class with these limits."""
    check_server(max_connections, request_timeout)
    return type("GuardedH11Protocol", (_GuardedH11Protocol,),
                {"max_connections": max_connections, "request_timeout": float(request_timeout)})


def server_config(app: Any, *, host: str = "127.0.0.1", port: int = 8000,
                  max_connections: int = DEFAULT_MAX_CONNECTIONS,
                  request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S, keep_alive: int = DEFAULT_KEEP_ALIVE_S,
                  ssl_keyfile: Optional[str] = None, ssl_certfile: Optional[str] = None,
                  log_level: str = "warning") -> uvicorn.Config:
    """The uvicorn configuration: h11 with :func:`guarded_protocol`'s limits, ``keep_alive`` seconds of idle
    between requests, request heads of at most ``MAX_HEADER_BYTES``, TLS when both files are given."""
    check_server(max_connections, request_timeout, keep_alive, ssl_keyfile, ssl_certfile)
    return uvicorn.Config(app, host=host, port=port, http=guarded_protocol(max_connections, request_timeout),
                          timeout_keep_alive=keep_alive, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile, log_level=log_level, lifespan="off")
