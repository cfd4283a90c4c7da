"""``python -m nucleusx_jax.serve MODEL_DIR``: serve a NucleusX model over the OpenAI HTTP API.

The listening socket is bound before the model loads (a busy port fails at once), and the address it is bound to
is printed as ``serving on http://HOST:PORT`` once the server starts: with ``--port 0`` the system picks a free
port, and that line reports it.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
from types import FrameType
from typing import List, Optional, Sequence

import uvicorn

from ..checks import integer
from ..cli import reports_user_errors
from ..tokenizer import load_tokenizer
from .api import create_app
from ..model import COMPUTE_DTYPES
from .backend import load_backend
from .engine import Engine
from .guard import (DEFAULT_KEEP_ALIVE_S, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_REQUEST_BYTES,
                    DEFAULT_REQUEST_TIMEOUT_S, check_guard, check_server, server_config)

API_KEY_ENV = "NUCLEUSX_API_KEY"
logger = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def parser() -> argparse.ArgumentParser:
    """The command line (``--api-key`` defaults to ``$NUCLEUSX_API_KEY`` as it is when this is called)."""
    p = argparse.ArgumentParser(prog="python -m nucleusx_jax.serve", description=__doc__.split("\n")[0])
    p.add_argument("model_dir", help="a flax or PyTorch NucleusX causal-LM directory")
    p.add_argument("--tokenizer", help="SentencePiece .model file or HF tokenizer dir (default: MODEL_DIR)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: a free port the system picks (printed at start)")
    p.add_argument("--max-batch", type=int, default=32, help="slots: requests decoded together")
    p.add_argument("--max-queue", type=int, default=128, help="requests that may wait for a slot (then 429)")
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="the largest max_tokens accepted")
    p.add_argument("--steps-per-call", type=int, default=4,
                   help="decode steps per compiled call (requests join and leave between calls)")
    p.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), default="float32", help="computation dtype")
    p.add_argument("--served-model-name", help="the model id clients use (default: MODEL_DIR's base name)")
    p.add_argument("--switch-interval", type=float, default=5e-4,
                   help="Python's thread switch interval in s (default 0.5 ms, Python's own is 5 ms): the engine "
                        "thread waits at most this long for the GIL while the HTTP thread works")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on every path but /health (default: ${API_KEY_ENV})")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="larger request bodies get 413 before they are read")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   help="open connections; more are answered 503 and closed")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                   help="seconds to receive a whole request (head and body) from its first byte or the "
                        "connection's opening; then 408 and close")
    p.add_argument("--timeout-keep-alive", type=int, default=DEFAULT_KEEP_ALIVE_S,
                   help="seconds an idle connection is kept open between requests")
    p.add_argument("--ssl-keyfile", help="serve HTTPS with this private key (with --ssl-certfile)")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate chain (with --ssl-keyfile)")
    return p


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` (IPv6 when ``host`` holds a colon; port 0: the system picks one),
    not yet listening; ``OSError`` naming the address when it cannot be bound."""
    integer("port", port, minimum=0, maximum=65535)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def address(sock: socket.socket, tls: bool) -> str:
    """The URL a bound socket serves at."""
    host, port = sock.getsockname()[:2]
    return f"{'https' if tls else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"


class Server(uvicorn.Server):
    """uvicorn's server, printing ``serving on URL`` (``url``: where its socket is bound) once it accepts
    connections."""

    def __init__(self, config: uvicorn.Config, url: str):
        super().__init__(config)
        self.url = url
        self.interrupted = False  # stopped by SIGINT

    async def startup(self, sockets: Optional[List[socket.socket]] = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(f"serving on {self.url}", flush=True)

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        self.interrupted = self.interrupted or sig == signal.SIGINT
        super().handle_exit(sig, frame)


@reports_user_errors
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)
    if not args.switch_interval > 0:
        raise ValueError(f"switch_interval={args.switch_interval!r} is invalid: must be a number > 0 (seconds)")
    sys.setswitchinterval(args.switch_interval)
    for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_tokens_limit", "steps_per_call"):
        integer(name, getattr(args, name))  # by the option's name, before the model loads
    check_guard(args.api_key, args.max_request_bytes)  # before the model loads
    check_server(args.max_connections, args.request_timeout, args.timeout_keep_alive, args.ssl_keyfile,
                 args.ssl_certfile)
    if args.api_key is None and not _is_loopback(args.host):
        logger.warning("serving on %s without an API key: anyone who reaches it may use it (--api-key or $%s)",
                       args.host, API_KEY_ENV)

    sock = bind(args.host, args.port)
    try:
        serve(args, sock)
    finally:
        sock.close()


def serve(args: argparse.Namespace, sock: socket.socket) -> None:
    """Load the model and serve it on ``sock`` until the server is stopped (SIGINT or SIGTERM)."""
    tokenizer = load_tokenizer(args.tokenizer or args.model_dir)
    engine = Engine(load_backend(args.model_dir, dtype=args.dtype), max_batch=args.max_batch,
                    max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                    max_new_tokens=args.max_tokens_limit, steps_per_call=args.steps_per_call)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model_dir))
    app = create_app(engine, tokenizer, name, api_key=args.api_key, max_request_bytes=args.max_request_bytes)
    config = server_config(app, host=args.host, port=args.port, max_connections=args.max_connections,
                           request_timeout=args.request_timeout, keep_alive=args.timeout_keep_alive,
                           ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)
    server = Server(config, address(sock, tls=args.ssl_certfile is not None))
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown()
    if server.interrupted:  # uvicorn raises the signal again, which a process that inherited SIGINT ignored drops
        raise KeyboardInterrupt
