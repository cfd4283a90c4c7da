"""The OpenAI-compatible HTTP API over an :class:`~nucleusx_jax.serve.engine.Engine` (FastAPI).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streaming as server-sent events or
not), ``GET /v1/models``, ``GET /health``. Text is turned into tokens here and back (the engine sees only ids,
:mod:`.text` turns them into text); a request that hits a stop string is cancelled in the engine at once. Every
request's parsing, tokenizing, detokenizing, stop matching and JSON building run in worker threads, in O(1)
work per generated token, so the event loop stays free. A client that disconnects cancels its request.
Errors are OpenAI-style JSON: 400 for a bad request (naming the field), 401 without the API key, 404, 405, 413
for a body over the limit, 429 when the engine's queue is full, 500 (see also :mod:`.guard`).

Extensions to the OpenAI fields: ``top_k`` (0: off), ``ignore_eos`` (do not stop at the tokenizer's EOS) and
``return_token_ids`` (each choice also carries ``token_ids``, the generated ids).

Chat prompts use the tokenizer's chat template when it has one (an HF tokenizer with ``chat_template``), else
the plain default :func:`plain_chat_prompt`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Awaitable, Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..tokenizer import HFTokenizer, Tokenizer
from .engine import Engine, EngineStopped, Event, QueueFull, RequestError, SamplingParams
from .engine import Request as EngineRequest
from .guard import DEFAULT_MAX_REQUEST_BYTES, Guard, check_guard, error_body
from .text import MAX_STOP_CHARS, MAX_STOPS, TextTracker

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions (chat: the server's --max-tokens-limit)
PREPARE_THREADS = 4  # requests parsed and tokenized at once
# threads turning engine events into text: each one more contends for the GIL with the event loop (under
# benchmarks/serve_hostile.py's load, /health p99 was 221 ms with 2, 103 ms with 1)
TEXT_THREADS = 1
logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, param: Optional[str], kind: str = "invalid_request_error",
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> Response:
        return Response(error_body(self.message, self.param, self.kind, self.code), status_code=self.status,
                        media_type="application/json")


class _Sampling(BaseModel):
    """Fields shared by both endpoints (strict types: ``"5"`` is not an integer)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Union[None, str, List[str]] = None
    n: int = 1
    stream: bool = False
    user: Optional[str] = None
    ignore_eos: bool = False
    return_token_ids: bool = False


class CompletionRequest(_Sampling):
    prompt: Union[str, List[int]]
    logprobs: Optional[int] = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: str
    content: str
    name: Optional[str] = None


class ChatRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None


def plain_chat_prompt(messages: Sequence[ChatMessage]) -> str:
    """The chat prompt without a template: one ``role: content`` line per message, then ``assistant:``."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


class Choice:
    """One of the ``n`` completions of a request while it runs."""

    def __init__(self, index: int, tracker: TextTracker, tokenizer: Tokenizer, logprobs: bool):
        self.index, self.tracker, self.tokenizer, self.logprobs = index, tracker, tokenizer, logprobs
        self.finish_reason: Optional[str] = None
        self.entries: List[Tuple[str, float, Dict[str, float], int]] = []  # per token: text, logprob, top, offset
        self.offset = 0  # where the next token's own decoded piece begins

    def on(self, event: Event) -> str:
        """Apply an engine event; returns the new text piece (which may be empty)."""
        if event.finish_reason is not None:
            if self.finish_reason is None:
                if event.finish_reason == "error":
                    raise APIError(500, f"the engine failed: {event.error}", None, "server_error")
                self.finish_reason = event.finish_reason
            return self.tracker.flush()
        if self.finish_reason is not None:
            return ""
        if self.logprobs:
            piece = self.tokenizer.decode([event.token])
            top = {self.tokenizer.decode([t]): lp for t, lp in event.top}
            self.entries.append((piece, event.logprob, top, self.offset))
            self.offset += len(piece)
        piece = self.tracker.push(event.token)
        if self.tracker.stopped:
            self.finish_reason = "stop"
        return piece

    def logprobs_json(self, base: int, start: int = 0) -> Dict[str, Any]:
        """The completions ``logprobs`` object of the tokens from ``start`` on whose text was returned (text
        offsets from ``base``; a token's offset is where its own decoded piece would begin)."""
        entries = self.entries[start:]
        if self.tracker.stopped:
            entries = [e for e in entries if e[3] < self.tracker.length]
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [e[2] for e in entries], "text_offset": [base + e[3] for e in entries]}


Render = Callable[[Choice, str, Event], List[str]]


class Run:
    """The ``n`` choices of one request while they run. The engine's thread hands events in (:meth:`put`); the
    event loop is woken once per batch of them, and each batch is applied to the choices (and rendered) in a
    worker thread. A client that goes away cancels the engine requests at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, choices: List[Choice], limiter: anyio.CapacityLimiter):
        self.loop, self.choices, self.limiter = loop, choices, limiter
        self.submitted: List[EngineRequest] = []
        self.items: Deque[Tuple[int, Event]] = collections.deque()
        self.ready = asyncio.Event()
        self.woken = False
        self.gone = False
        self.watcher: Optional[asyncio.Future] = None  # the task that waits for the client to go away

    def put(self, index: int, event: Event) -> None:
        """Called from the engine's thread."""
        self.items.append((index, event))
        if not self.woken:
            self.woken = True
            self.loop.call_soon_threadsafe(self.ready.set)

    def cancel(self) -> None:
        for r in self.submitted:
            r.cancel()

    async def watch(self, receive: Callable[[], Awaitable[Dict[str, Any]]]) -> None:
        """Wait for the client to disconnect, then cancel."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self.cancel()
        self.ready.set()

    def apply(self, items: Sequence[Tuple[int, Event]], render: Optional[Render]) -> List[str]:
        """Events -> the choices' text (and ``render``'s output of each event of a running choice)."""
        out: List[str] = []
        for i, event in items:
            choice = self.choices[i]
            was_running = choice.finish_reason is None
            piece = choice.on(event)
            if choice.finish_reason is not None:
                self.submitted[i].cancel()  # a stop string: the engine frees the slot before its next step
            if render is not None and was_running:
                out.extend(render(choice, piece, event))
        return out

    async def outputs(self, render: Optional[Render] = None) -> AsyncIterator[List[str]]:
        """``render``'s output per batch of events until every choice ends (or the client goes away)."""
        try:
            while any(c.finish_reason is None for c in self.choices):
                await self.ready.wait()
                self.ready.clear()
                self.woken = False
                if self.gone:
                    return
                items = [self.items.popleft() for _ in range(len(self.items))]
                if items:
                    yield await anyio.to_thread.run_sync(self.apply, items, render, limiter=self.limiter)
        finally:
            if self.watcher is not None:
                self.watcher.cancel()
            self.cancel()


class Server:
    """The HTTP layer: request validation, tokenization, the engine bridge and the response formats. Parsing,
    tokenizing and building responses run in worker threads (at most ``PREPARE_THREADS`` requests are parsed
    and tokenized at once; ``TEXT_THREADS`` turn the batches of events into text)."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str):
        if tokenizer.vocab_size > engine.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                             f"vocab_size={engine.vocab_size}: they do not belong together")
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.created = int(time.time())
        self.prepare_limiter = anyio.CapacityLimiter(PREPARE_THREADS)
        self.text_limiter = anyio.CapacityLimiter(TEXT_THREADS)
        # every message costs at least one prompt token: more messages than that are refused while parsing
        self.chat_request = create_model("ChatRequest", __base__=ChatRequest, messages=(
            List[ChatMessage], Field(min_length=1, max_length=engine.max_prompt_tokens)))

    # ----------------------------------------------------------------------------------- requests
    def _params(self, body: _Sampling, max_tokens: Optional[int], logprobs: int, choice: int,
                seed: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k, seed=seed, choice=choice,
            logprobs=logprobs, stop_token_ids=() if body.ignore_eos else (self.tokenizer.eos_id,))

    @staticmethod
    def _stops(body: _Sampling) -> List[str]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOPS:
            raise RequestError("stop", f"stop has {len(stops)} strings; at most {MAX_STOPS} are allowed")
        long = [len(s) for s in stops if len(s) > MAX_STOP_CHARS]
        if long:
            raise RequestError("stop", f"a stop string has {long[0]} characters; at most {MAX_STOP_CHARS} "
                                       "are allowed")
        return stops

    def completion_prompt(self, body: CompletionRequest) -> List[int]:
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise RequestError("prompt", "prompt is empty: give some text or token ids")
            return [self.tokenizer.bos_id] + self.tokenizer.encode(body.prompt)
        return list(body.prompt)

    def chat_prompt(self, body: ChatRequest) -> List[int]:
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        if isinstance(self.tokenizer, HFTokenizer) and self.tokenizer.tok.chat_template:
            return list(self.tokenizer.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        return [self.tokenizer.bos_id] + self.tokenizer.encode(plain_chat_prompt(body.messages))

    def prepare(self, raw: bytes, kind: type, param: str) -> Tuple[Any, List[int], List[SamplingParams], List[str]]:
        """A request body -> the parsed request, its prompt ids, the ``n`` choices' sampling and the stop
        strings; raises for anything invalid. Runs in a worker thread."""
        body = kind.model_validate_json(raw)
        if body.model != self.model_name:
            raise APIError(400, f"model={body.model!r} is not served here; this server serves "
                                f"{self.model_name!r}", "model", code="model_not_found")
        if not 1 <= body.n <= self.engine.max_batch:
            raise RequestError("n", f"n={body.n} is invalid: must be in [1, {self.engine.max_batch}]")
        stops = self._stops(body)
        if isinstance(body, CompletionRequest):
            if body.echo and body.logprobs:
                raise RequestError("echo", "echo together with logprobs (the prompt's logprobs) is not supported")
            max_tokens, prompt = body.max_tokens, self.completion_prompt(body)
        else:
            if body.max_tokens is not None and body.max_completion_tokens is not None:
                raise RequestError("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            if max_tokens is None:  # as OpenAI's chat: until the end of the turn, here at most the server's limit
                max_tokens = self.engine.max_new_tokens
            prompt = self.chat_prompt(body)
        seed = body.seed if body.seed is not None else int.from_bytes(uuid.uuid4().bytes[:8], "little")
        logprobs = (body.logprobs or 0) if isinstance(body, CompletionRequest) else 0
        params = [self._params(body, max_tokens, logprobs, i, seed) for i in range(body.n)]
        self.engine.check_prompt(prompt, param)
        beyond = [t for t in prompt if t >= self.tokenizer.vocab_size]
        if beyond:
            raise RequestError(param, f"{param} holds token ids the tokenizer cannot decode (vocab_size="
                                      f"{self.tokenizer.vocab_size}): {beyond[:10]}")
        return body, prompt, params, stops

    async def start(self, request: Request, kind: type, param: str) -> Tuple[Any, List[int], Run]:
        """Parse and tokenize the request (off the loop), submit its ``n`` choices; returns the parsed request,
        its prompt and the :class:`Run`."""
        raw = await request.body()
        body, prompt, params, stops = await anyio.to_thread.run_sync(
            self.prepare, raw, kind, param, limiter=self.prepare_limiter)
        want = getattr(body, "logprobs", None) is not None
        choices = [Choice(i, TextTracker(self.tokenizer, prompt[-4:], stops), self.tokenizer, want)
                   for i in range(body.n)]
        run = Run(asyncio.get_running_loop(), choices, self.text_limiter)
        try:
            for i, p in enumerate(params):
                run.submitted.append(self.engine.submit(prompt, p, lambda event, i=i: run.put(i, event)))
        except BaseException:
            run.cancel()
            raise
        run.watcher = asyncio.ensure_future(run.watch(request.receive))  # from now on, even if never read
        return body, prompt, run

    # --------------------------------------------------------------------------------- endpoints
    async def completions(self, request: Request) -> Response:
        body, prompt, run = await self.start(request, CompletionRequest, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = await anyio.to_thread.run_sync(self.tokenizer.decode, prompt) if body.echo else ""

        def chunk(choice: Choice, text: str, finish: Optional[str]) -> Dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": [{"index": choice.index, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            def render(c: Choice, piece: str, event: Event) -> List[str]:
                out = chunk(c, piece, c.finish_reason)
                if body.logprobs is not None and event.token is not None:
                    out["choices"][0]["logprobs"] = c.logprobs_json(len(echo), len(c.entries) - 1)
                return [_sse(out)]

            first = "".join(_sse(chunk(c, echo, None)) for c in run.choices) if echo else ""
            return StreamingResponse(_stream(first, run.outputs(render)), media_type="text/event-stream")

        def build() -> bytes:
            return _json({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                          "choices": self._items(run.choices, body, lambda c: {
                              "index": c.index, "text": echo + c.tracker.text, "finish_reason": c.finish_reason,
                              "logprobs": c.logprobs_json(len(echo)) if body.logprobs is not None else None}),
                          "usage": self._usage(prompt, run.choices)})

        return await self._finish(run, build)

    async def chat(self, request: Request) -> Response:
        body, prompt, run = await self.start(request, self.chat_request, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, delta: Dict[str, Any], finish: Optional[str]) -> str:
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                         "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})

        if body.stream:
            def render(c: Choice, piece: str, _: Event) -> List[str]:
                out = [chunk(c.index, {"content": piece}, None)] if piece else []
                return out + ([chunk(c.index, {}, c.finish_reason)] if c.finish_reason is not None else [])

            first = "".join(chunk(c.index, {"role": "assistant", "content": ""}, None) for c in run.choices)
            return StreamingResponse(_stream(first, run.outputs(render)), media_type="text/event-stream")

        def build() -> bytes:
            return _json({"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                          "choices": self._items(run.choices, body, lambda c: {
                              "index": c.index, "message": {"role": "assistant", "content": c.tracker.text},
                              "finish_reason": c.finish_reason, "logprobs": None}),
                          "usage": self._usage(prompt, run.choices)})

        return await self._finish(run, build)

    @staticmethod
    async def _finish(run: Run, build: Callable[[], bytes]) -> Response:
        """A non-streamed response: wait for every event, then ``build`` the body (off the loop)."""
        async with aclosing(run.outputs()) as outputs:
            async for _ in outputs:
                pass
        if run.gone:
            return Response(status_code=499)  # nobody reads it
        return Response(await anyio.to_thread.run_sync(build), media_type="application/json")

    @staticmethod
    def _items(choices: Sequence[Choice], body: Any, item: Callable[[Choice], Dict[str, Any]]) -> List[Dict[str, Any]]:
        """``item(choice)`` for each choice, plus its ``token_ids`` when the request asks for them."""
        out = []
        for c in choices:
            entry = item(c)
            if body.return_token_ids:
                entry["token_ids"] = c.tracker.ids
            out.append(entry)
        return out

    @staticmethod
    def _usage(prompt: Sequence[int], choices: Sequence[Choice]) -> Dict[str, int]:
        completion = sum(len(c.tracker.ids) for c in choices)
        return {"prompt_tokens": len(prompt), "completion_tokens": completion,
                "total_tokens": len(prompt) + completion}


async def _stream(first: str, outputs: AsyncIterator[List[str]]) -> AsyncIterator[str]:
    """Server-sent events: ``first``, each batch of ``outputs``, then ``[DONE]``; a failure after the response
    began is one more event, ``{"error": {...}}`` (the OpenAI shape), before ``[DONE]``."""
    if first:
        yield first
    async with aclosing(outputs):
        try:
            async for pieces in outputs:
                if pieces:
                    yield "".join(pieces)
        except APIError as e:
            yield "data: " + error_body(e.message, e.param, e.kind, e.code).decode() + "\n\n"
    yield "data: [DONE]\n\n"


def _json(data: Dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def _sse(data: Dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, *, api_key: Optional[str] = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The FastAPI app serving ``engine`` (started and stopped by the caller) as ``model_name``. With
    ``api_key``, every path but ``/health`` needs ``Authorization: Bearer API_KEY``; bodies over
    ``max_request_bytes`` get 413 (see :class:`~nucleusx_jax.serve.guard.Guard`)."""
    check_guard(api_key, max_request_bytes)
    server = Server(engine, tokenizer, model_name)
    app = FastAPI(title="nucleusx-jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, max_request_bytes=max_request_bytes)

    @app.exception_handler(ValidationError)
    async def invalid(_: Request, exc: ValidationError) -> Response:
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            return APIError(400, f"the body is not valid JSON: {err.get('msg')}", "body").response()
        loc = [str(x) for x in err.get("loc", ())]
        param = ".".join(loc) if loc else "body"
        return APIError(400, f"{param}: {err.get('msg')} (got {_short(err.get('input'))})", param).response()

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> Response:
        return APIError(400, str(exc), exc.param).response()

    @app.exception_handler(EngineStopped)
    async def stopped(_: Request, exc: EngineStopped) -> Response:
        return APIError(503, str(exc), None, "server_error", "shutting_down").response()

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, exc: QueueFull) -> Response:
        return APIError(429, str(exc), None, "rate_limit_error", "rate_limit_exceeded").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {404: f"no route {request.url.path!r}; this server has /v1/completions, /v1/chat/completions, "
                        "/v1/models and /health",
                   405: f"{request.method} is not allowed on {request.url.path!r}"}.get(exc.status_code, exc.detail)
        return APIError(exc.status_code, str(message), None).response()

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> Response:
        logger.error("request failed", exc_info=exc)
        return APIError(500, f"internal error: {type(exc).__name__}", None, "server_error").response()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.completions(request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await server.chat(request)

    @app.get("/v1/models")
    async def models() -> Dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "nucleusx-jax"}]}

    @app.get("/health")
    async def health() -> Dict[str, Any]:
        return {"status": "ok", "running": engine.running(), "waiting": engine.waiting()}

    return app
