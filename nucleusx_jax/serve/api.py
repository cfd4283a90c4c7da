"""The OpenAI-compatible HTTP API over an :class:`~nucleusx_jax.serve.engine.Engine` (FastAPI).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streaming as server-sent events or
not), ``GET /v1/models``, ``GET /health``. Text is turned into tokens here and back (the engine sees only ids);
stop strings are found here, and a request that hits one is cancelled in the engine at once. A client that
disconnects cancels its request. Errors are OpenAI-style JSON: 400 for a bad request (naming the field), 429
when the engine's queue is full.

Extensions to the OpenAI fields: ``top_k`` (0: off), ``ignore_eos`` (do not stop at the tokenizer's EOS) and
``return_token_ids`` (each choice also carries ``token_ids``, the generated ids).

Chat prompts use the tokenizer's chat template when it has one (an HF tokenizer with ``chat_template``), else
the plain default :func:`plain_chat_prompt`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Sequence, Tuple, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..tokenizer import HFTokenizer, Tokenizer
from .engine import Engine, Event, QueueFull, RequestError, SamplingParams

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions (chat: the server's --max-tokens-limit)
DISCONNECT_POLL_S = 0.25  # how often a running request checks that its client is still there


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, param: Optional[str], kind: str = "invalid_request_error",
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


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


class TextTracker:
    """Generated ids -> text pieces with stop strings cut exactly.

    The text of the generated ids is ``decode(context + ids)`` after ``decode(context)`` (``context``: the
    prompt's last tokens, so a leading space survives). A piece is held back while it ends in an incomplete
    UTF-8 sequence or could be the start of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int], stops: Sequence[str]):
        self.tokenizer, self.context, self.stops = tokenizer, list(context), [s for s in stops if s]
        self.base = tokenizer.decode(self.context)
        self.ids: List[int] = []
        self.text = ""  # the text so far (cut at a stop string once found)
        self.sent = 0  # characters of it already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; returns the text now safe to send. Sets ``stopped`` when a stop string appeared."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.context + self.ids)[len(self.base):]
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = text[:min(hits)], True
            return self._take(len(self.text))
        self.text = text
        if text.endswith("\ufffd"):
            return ""
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._take(len(text) - hold)

    def flush(self) -> str:
        """Everything not yet sent (the request ended)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece


class Choice:
    """One of the ``n`` completions of a request while it runs."""

    def __init__(self, index: int, tracker: TextTracker, tokenizer: Tokenizer):
        self.index, self.tracker, self.tokenizer = index, tracker, tokenizer
        self.finish_reason: Optional[str] = None
        self.logprobs: List[Tuple[int, float, Tuple[Tuple[int, float], ...]]] = []

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
        self.logprobs.append((event.token, event.logprob, event.top))
        piece = self.tracker.push(event.token)
        if self.tracker.stopped:
            self.finish_reason = "stop"
        return piece

    def logprobs_json(self, offset: int, start: int = 0) -> Dict[str, Any]:
        """The completions ``logprobs`` object of the tokens from ``start`` on whose text was returned (text
        offsets from ``offset``; a token's offset is where its own decoded piece would begin)."""
        tokens, token_logprobs, top, offsets = [], [], [], []
        pos = sum(len(self.tokenizer.decode([t])) for t, _, _ in self.logprobs[:start])
        for token, logprob, alternatives in self.logprobs[start:]:
            if pos >= len(self.tracker.text) and self.tracker.stopped:
                break
            piece = self.tokenizer.decode([token])
            tokens.append(piece)
            token_logprobs.append(logprob)
            top.append({self.tokenizer.decode([t]): lp for t, lp in alternatives})
            offsets.append(offset + pos)
            pos += len(piece)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


class Server:
    """The HTTP layer: request validation, tokenization, the engine bridge and the response formats."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str):
        if tokenizer.vocab_size > engine.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                             f"vocab_size={engine.vocab_size}: they do not belong together")
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.created = int(time.time())

    # ----------------------------------------------------------------------------------- requests
    def _params(self, body: _Sampling, max_tokens: Optional[int], logprobs: int, choice: int,
                seed: int) -> SamplingParams:
        if body.model != self.model_name:
            raise APIError(400, f"model={body.model!r} is not served here; this server serves "
                                f"{self.model_name!r}", "model", code="model_not_found")
        return SamplingParams(
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k, seed=seed, choice=choice,
            logprobs=logprobs, stop_token_ids=() if body.ignore_eos else (self.tokenizer.eos_id,))

    def _stops(self, body: _Sampling) -> List[str]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise RequestError("stop", f"stop has {len(stops)} strings; at most 4 are allowed")
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

    async def run(self, request: Request, prompt: List[int], body: _Sampling, max_tokens: Optional[int],
                  logprobs: int, param: str) -> Tuple[List[Choice], AsyncIterator[Tuple[Choice, str, Event]]]:
        """Submit the ``n`` choices; returns them and an iterator of ``(choice, new text, engine event)`` until
        all end.
        Leaving the iterator early (or the client going away) cancels what still runs."""
        if not 1 <= body.n <= self.engine.max_batch:
            raise RequestError("n", f"n={body.n} is invalid: must be in [1, {self.engine.max_batch}]")
        seed = body.seed if body.seed is not None else int.from_bytes(uuid.uuid4().bytes[:8], "little")
        params = [self._params(body, max_tokens, logprobs, i, seed) for i in range(body.n)]
        stops = self._stops(body)
        self.engine.check_prompt(prompt, param)
        beyond = [t for t in prompt if t >= self.tokenizer.vocab_size]
        if beyond:
            raise RequestError(param, f"{param} holds token ids the tokenizer cannot decode (vocab_size="
                                      f"{self.tokenizer.vocab_size}): {beyond[:10]}")
        loop = asyncio.get_running_loop()
        queue: "asyncio.Queue[Optional[Tuple[int, Event]]]" = asyncio.Queue()
        choices = [Choice(i, TextTracker(self.tokenizer, prompt[-4:], stops), self.tokenizer) for i in range(body.n)]
        submitted = []
        try:
            for i, p in enumerate(params):
                submitted.append(self.engine.submit(
                    prompt, p, lambda event, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, event))))
        except BaseException:
            for r in submitted:
                r.cancel()
            raise

        async def watch() -> None:
            """Tell the event stream when the client has gone away."""
            while not await request.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL_S)
            queue.put_nowait(None)

        async def events() -> AsyncIterator[Tuple[Choice, str, Event]]:
            watcher = asyncio.ensure_future(watch())
            try:
                while any(c.finish_reason is None for c in choices):
                    item = await queue.get()
                    if item is None:  # the client disconnected
                        return
                    i, event = item
                    piece = choices[i].on(event)
                    if choices[i].finish_reason is not None:
                        submitted[i].cancel()  # a stop string: the engine frees the slot before its next step
                    yield choices[i], piece, event
            finally:
                watcher.cancel()
                for r in submitted:
                    r.cancel()

        return choices, events()

    # --------------------------------------------------------------------------------- endpoints
    async def completions(self, request: Request, body: CompletionRequest) -> Any:
        if body.echo and body.logprobs:
            raise RequestError("echo", "echo together with logprobs (the prompt's logprobs) is not supported")
        prompt = self.completion_prompt(body)
        choices, events = await self.run(request, prompt, body, body.max_tokens, body.logprobs or 0, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = self.tokenizer.decode(prompt) if body.echo else ""

        def chunk(choice: Choice, text: str, finish: Optional[str]) -> Dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": [{"index": choice.index, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            async def sse() -> AsyncIterator[str]:
                async with aclosing(events):
                    if echo:
                        for c in choices:
                            yield _sse(chunk(c, echo, None))
                    async for c, piece, event in events:
                        out = chunk(c, piece, c.finish_reason)
                        if body.logprobs is not None and event.token is not None:
                            start = len(c.logprobs) - 1
                            out["choices"][0]["logprobs"] = c.logprobs_json(len(echo), start)
                        yield _sse(out)
                    yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        body_choices = await self._finish(events, choices, body, lambda c: {
            "index": c.index, "text": echo + c.tracker.text, "finish_reason": c.finish_reason,
            "logprobs": c.logprobs_json(len(echo)) if body.logprobs is not None else None})
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": body_choices, "usage": self._usage(prompt, choices)}

    async def chat(self, request: Request, body: ChatRequest) -> Any:
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise RequestError("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        prompt = self.chat_prompt(body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:  # as OpenAI's chat: until the end of the turn, here at most the server's limit
            max_tokens = self.engine.max_new_tokens
        choices, events = await self.run(request, prompt, body, max_tokens, 0, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, delta: Dict[str, Any], finish: Optional[str]) -> Dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}

        if body.stream:
            async def sse() -> AsyncIterator[str]:
                async with aclosing(events):
                    for c in choices:
                        yield _sse(chunk(c.index, {"role": "assistant", "content": ""}, None))
                    async for c, piece, _ in events:
                        if piece:
                            yield _sse(chunk(c.index, {"content": piece}, None))
                        if c.finish_reason is not None:
                            yield _sse(chunk(c.index, {}, c.finish_reason))
                    yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        body_choices = await self._finish(events, choices, body, lambda c: {
            "index": c.index, "message": {"role": "assistant", "content": c.tracker.text},
            "finish_reason": c.finish_reason, "logprobs": None})
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": body_choices, "usage": self._usage(prompt, choices)}

    @staticmethod
    async def _finish(events: Any, choices: Sequence[Choice], body: Any,
                      item: Callable[[Choice], Dict[str, Any]]) -> List[Dict[str, Any]]:
        """A non-streamed response's choices: wait for every event, then ``item(choice)`` for each (plus its
        ``token_ids`` when the request asks for them)."""
        async with aclosing(events):
            async for _ in events:
                pass
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


def _sse(data: Dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str) -> FastAPI:
    """The FastAPI app serving ``engine`` (started and stopped by the caller) as ``model_name``."""
    server = Server(engine, tokenizer, model_name)
    app = FastAPI(title="nucleusx-jax", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return APIError(400, f"the body is not valid JSON: {err.get('msg')}", "body").response()
        param = ".".join(loc) if loc else "body"
        return APIError(400, f"{param}: {err.get('msg')} (got {err.get('input')!r})", param).response()

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return APIError(400, str(exc), exc.param).response()

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        return APIError(429, str(exc), None, "rate_limit_error", "rate_limit_exceeded").response()

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Any:
        return await server.completions(request, body)

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest) -> Any:
        return await server.chat(request, body)

    @app.get("/v1/models")
    async def models() -> Dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "nucleusx-jax"}]}

    @app.get("/health")
    async def health() -> Dict[str, Any]:
        return {"status": "ok", "running": engine.running(), "waiting": engine.waiting()}

    return app
