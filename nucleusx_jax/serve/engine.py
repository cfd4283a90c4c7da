"""Continuous batching on the fixed-size recurrent state, with no HTTP in it.

The engine holds ``max_batch`` *slots*: row ``i`` of one batched state (per layer ``kv`` ``[S, H, V, K]``,
``scale`` ``[S, H, 1, 1]``, ``seqlen`` ``[S]``) is the whole history of the request running in slot ``i``. A
background thread repeats:

1. **admit**: while a slot is free and requests wait, run a waiting prompt's tokens but the last once
   (:func:`nucleusx_jax.runtime.prefill`, the prompt right-padded to a power-of-two length so that few shapes
   compile; in the runtime's prompt form) and write its state, position and last token into the free slot;
2. **step**: one compiled call of ``steps_per_call`` recurrent steps for all ``S`` slots at once (inactive
   slots are masked and keep their state), each slot's next token sampled after each step with its own
   request's settings; the call is compiled once, whatever requests come and go;
3. **deliver**: each running request gets its token through its callback; a request that produced a stop token,
   reached ``max_tokens`` or was cancelled frees its slot at once. Delivery of a step's tokens overlaps the
   next step's computation.

Sampling is per row: :func:`nucleusx_jax.runtime.choose` with each row's own
:class:`~nucleusx_jax.runtime.Sampling` (temperature 0: greedy), drawn with the key
``fold_in(fold_in(fold_in(PRNGKey(seed_lo), seed_hi), choice), n)`` for the request's ``n``-th token: a seeded
request gets the same tokens whatever runs beside it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Any, Callable, Deque, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import checks, runtime
from ..types import Array, Cache
from .backend import Backend

logger = logging.getLogger(__name__)
MAX_LOGPROBS = 5  # the most alternatives a request may ask for (OpenAI's limit for completions)
MIN_PREFILL_BUCKET = 16  # the shortest padded prompt (runtime.bucket)


class RequestError(ValueError):
    """A request the engine refuses; ``param`` names the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """The bounded queue of waiting requests is full."""


class EngineStopped(RuntimeError):
    """The engine has been shut down: it takes no more requests."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it ends.

    ``temperature`` 0 is greedy; else temperature, ``top_k`` (0: off), ``top_p`` (1: off). ``seed`` (an integer
    in ``[0, 2**64)``) fixes the draws; ``choice`` tells apart the ``n`` completions of one seeded request.
    ``logprobs``: how many top alternatives to report per token (0-5). The request ends after ``max_tokens``
    tokens or at one of ``stop_token_ids`` (not delivered as a token).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    choice: int = 0
    logprobs: int = 0
    stop_token_ids: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        def is_int(x: Any) -> bool:
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise RequestError("max_tokens", f"max_tokens={self.max_tokens!r} is invalid: must be an integer >= 1")
        for name in ("temperature", "top_p", "top_k"):
            try:
                runtime.Sampling.checked(**{name: getattr(self, name)})
            except ValueError as e:
                raise RequestError(name, str(e)) from None
        if not is_int(self.seed) or not 0 <= self.seed < 2**64:
            raise RequestError("seed", f"seed={self.seed!r} is invalid: must be an integer in [0, 2**64)")
        if not is_int(self.choice) or self.choice < 0:
            raise RequestError("n", f"choice={self.choice!r} is invalid: must be an integer >= 0")
        if not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestError("logprobs", f"logprobs={self.logprobs!r} is invalid: must be an integer in "
                                           f"[0, {MAX_LOGPROBS}]")


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request receives: a token (``token``, its ``logprob`` under the model, and the ``top`` alternatives
    as ``(token, logprob)`` pairs), or the end (``finish_reason``: ``stop``, ``length``, ``cancelled`` or
    ``error``, with ``error`` its message)."""

    token: Optional[int] = None
    logprob: Optional[float] = None
    top: Tuple[Tuple[int, float], ...] = ()
    finish_reason: Optional[str] = None
    error: Optional[str] = None


class Request:
    """A submitted request. ``on_event`` is called from the engine's thread; :meth:`cancel` may be called from
    any thread (the slot is freed before the next step)."""

    def __init__(self, prompt: Sequence[int], params: SamplingParams, on_event: Callable[[Event], None]):
        self.prompt = [int(t) for t in prompt]
        self.params = params
        self.on_event = on_event
        self.generated = 0
        self.cancelled = threading.Event()
        self.done = False

    def cancel(self) -> None:
        self.cancelled.set()


class Slots(NamedTuple):
    """The device side of the slots: ``token`` ``[S]`` (each slot's next input), ``count`` ``[S]`` (tokens the
    slot's request has produced: the index of its next draw) and the states."""

    token: Array
    count: Array
    cache: Cache


class Rows(NamedTuple):
    """Per-slot settings, sent with every step (all ``[S]``): whether the slot runs, greedy / sampling
    settings, key material and whether top logprobs are wanted."""

    active: Array  # bool
    temperature: Array  # float32, 0: greedy
    top_k: Array  # int32, 0: off
    top_p: Array  # float32, 1: off
    seed_lo: Array  # uint32
    seed_hi: Array  # uint32
    choice: Array  # uint32
    want_top: Array  # bool


class StepOut(NamedTuple):
    """One step's results (``[S]`` each, ``[S, MAX_LOGPROBS]`` for the top alternatives)."""

    token: Array
    logprob: Array
    top_ids: Array
    top_logprobs: Array


def sample(logits: Array, rows: Rows, count: Array) -> Array:
    """Next tokens ``[S]`` int32 from logits ``[S, vocab]`` float32: :func:`nucleusx_jax.runtime.choose` with each
    row's settings (an inactive row greedy), its draw keyed by the row's seed, choice and ``count`` (its token
    index)."""

    def key(lo: Array, hi: Array, choice: Array, n: Array) -> Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(lo), hi), choice), n)

    keys = jax.vmap(key)(rows.seed_lo, rows.seed_hi, rows.choice, count)
    settings = runtime.Sampling(jnp.where(rows.active, rows.temperature, 0.0), rows.top_k, rows.top_p)
    return runtime.choose(logits, settings, keys)


class Engine:
    """Continuous batching over ``max_batch`` slots (see the module docstring).

    ``max_queue``: how many requests may wait for a slot (past it :meth:`submit` raises :class:`QueueFull`);
    ``max_prompt_tokens`` and ``max_new_tokens``: the largest prompt and ``max_tokens`` accepted;
    ``steps_per_call``: decode steps per compiled call (more: less host overhead per token, but new requests
    join and finished ones leave only between calls, and up to ``steps_per_call - 1`` steps of a finished
    request are wasted).
    """

    def __init__(self, backend: Backend, *, max_batch: int = 32, max_queue: int = 128,
                 max_prompt_tokens: int = 4096, max_new_tokens: int = 4096, steps_per_call: int = 4):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue),
                            ("max_prompt_tokens", max_prompt_tokens), ("max_new_tokens", max_new_tokens),
                            ("steps_per_call", steps_per_call)):
            checks.integer(name, value)
        self.backend = backend
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self.steps_per_call = steps_per_call
        self.vocab_size = backend.config.vocab_size
        self.step = jax.jit(self._step, donate_argnames=("slots",))
        self.insert = jax.jit(self._insert, donate_argnames=("slots",))
        self.prefill = jax.jit(self._prefill_fn, static_argnames=("mode", "chunk_size"))
        self._slots = self._empty_slots()
        self._rows = Rows(np.zeros(max_batch, bool), np.zeros(max_batch, np.float32), np.zeros(max_batch, np.int32),
                          np.ones(max_batch, np.float32), np.zeros(max_batch, np.uint32),
                          np.zeros(max_batch, np.uint32), np.zeros(max_batch, np.uint32), np.zeros(max_batch, bool))
        self._running: List[Optional[Request]] = [None] * max_batch
        self._waiting: Deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="nucleusx-serve-engine", daemon=True)

    def _empty_slots(self) -> Slots:
        """Every slot free: token 0, count 0, the empty state."""
        return Slots(jnp.zeros((self.max_batch,), jnp.int32), jnp.zeros((self.max_batch,), jnp.int32),  # 2 buffers
                     runtime.empty_cache(self.backend.config, self.max_batch, per_row=True))

    def abstract_step_inputs(self) -> Tuple[Slots, Rows]:
        """The shapes and dtypes of :attr:`step`'s ``slots`` and ``rows`` (``jax.ShapeDtypeStruct`` leaves), the
        layout this engine allocates, without allocating it: what compiling the step ahead of time needs."""
        rows = Rows(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in self._rows))
        return jax.eval_shape(self._empty_slots), rows

    def _slots_lost(self) -> bool:
        """Whether a failed call took the slots with it (they are donated to ``step`` and ``insert``)."""
        return any(leaf.is_deleted() for leaf in jax.tree.leaves(self._slots))

    # -------------------------------------------------------------------------------- compiled functions
    def _step(self, params: Any, slots: Slots, rows: Rows) -> Tuple[Slots, StepOut]:
        """``steps_per_call`` decode steps of every slot in one ``lax.scan``; outputs ``[steps_per_call, S]``."""

        def one(slots: Slots, _: None) -> Tuple[Slots, StepOut]:
            logits, cache = self.backend.decode(params, slots.token, rows.active, slots.cache)
            token = sample(logits, rows, slots.count)
            logprobs = jax.nn.log_softmax(logits, axis=-1)
            chosen = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
            top_lp, top_ids = jax.lax.cond(
                jnp.any(rows.want_top), lambda: tuple(jax.lax.top_k(logprobs, MAX_LOGPROBS)),
                lambda: (jnp.zeros((self.max_batch, MAX_LOGPROBS), jnp.float32),
                         jnp.zeros((self.max_batch, MAX_LOGPROBS), jnp.int32)))
            return Slots(token, slots.count + 1, cache), StepOut(token, chosen, top_ids, top_lp)

        return jax.lax.scan(one, slots, None, length=self.steps_per_call)

    @staticmethod
    def _insert(slots: Slots, slot: Array, state: Cache, position: Array, token: Array) -> Slots:
        """Slot ``slot`` takes a prompt's state (batch 1), its position and its next input token."""
        return Slots(slots.token.at[slot].set(token), slots.count.at[slot].set(0),
                     runtime.put_row(slots.cache, slot, state, position))

    def _prefill_fn(self, params: Any, ids: Array, mask: Array, *, mode: str, chunk_size: int) -> Cache:
        """A right-padded prompt ``[1, T]`` -> its state (no LM head; ``seqlen`` counts the pads)."""
        return runtime.prefill(self.backend.module, params, ids, mask, mode=mode, chunk_size=chunk_size,
                               logits=False)[1]

    # ------------------------------------------------------------------------------------ public API
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop the thread; waiting and running requests end with ``cancelled``."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join()

    def check_prompt(self, prompt: Sequence[int], param: str = "prompt") -> None:
        """Raise :class:`RequestError` for an empty or too long prompt, or ids outside the vocabulary."""
        if len(prompt) == 0:
            raise RequestError(param, f"{param} is empty: give at least one token")
        if len(prompt) > self.max_prompt_tokens:
            raise RequestError(param, f"{param} has {len(prompt)} tokens, more than the {self.max_prompt_tokens} "
                                      "allowed")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(param, f"{param} holds token ids outside [0, {self.vocab_size}): {bad[:10]}")

    def submit(self, prompt: Sequence[int], params: SamplingParams, on_event: Callable[[Event], None]) -> Request:
        """Queue a request; its events go to ``on_event`` (from the engine's thread). Raises
        :class:`RequestError` for a bad prompt or ``max_tokens``, :class:`QueueFull` past the queue bound,
        :class:`EngineStopped` after :meth:`shutdown`."""
        self.check_prompt(prompt)
        if params.max_tokens > self.max_new_tokens:
            raise RequestError("max_tokens", f"max_tokens={params.max_tokens} is more than the "
                                             f"{self.max_new_tokens} allowed")
        request = Request(prompt, params, on_event)
        with self._wake:
            if self._stop:
                raise EngineStopped("the server is shutting down and takes no more requests")
            if len(self._waiting) >= self.max_queue:  # requests cancelled while waiting leave the queue first
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled.is_set())
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the most allowed "
                                f"(--max-queue {self.max_queue}); retry later")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def running(self) -> int:
        """How many slots are in use."""
        return sum(r is not None for r in self._running)

    def waiting(self) -> int:
        """How many requests wait for a slot."""
        return len(self._waiting)

    # ----------------------------------------------------------------------------------- the thread
    def _run(self) -> None:
        """The loop. Steps are pipelined: step ``k + 1`` is dispatched before the tokens of step ``k`` are
        delivered, so the host's work overlaps the device's; a slot's token from a step dispatched after its
        request ended is dropped (each step remembers which request owned each slot)."""
        pending: Optional[Tuple[StepOut, List[Optional[Request]]]] = None
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not any(self._running) and pending is None:
                    self._wake.wait()
                if self._stop:
                    break
            try:
                self._free_cancelled()
                self._admit()
                launched = (self._dispatch(), list(self._running)) if any(self._running) else None
                if pending is not None:
                    self._deliver(jax.device_get(pending[0]), pending[1])
                pending = launched
            except Exception as e:  # noqa: BLE001 - the server must keep serving; every affected request is told
                logger.exception("engine step failed")
                pending = None
                for i, request in enumerate(self._running):
                    if request is not None:
                        self._finish(i, Event(finish_reason="error", error=f"{type(e).__name__}: {e}"))
                if self._slots_lost():  # every slot is free now: start again from empty ones
                    self._slots = self._empty_slots()
        for i, request in enumerate(self._running):
            if request is not None:
                self._finish(i, Event(finish_reason="cancelled"))
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for request in waiting:
            self._emit(request, Event(finish_reason="cancelled"))

    def _free_cancelled(self) -> None:
        for i, request in enumerate(self._running):
            if request is not None and request.cancelled.is_set():
                self._finish(i, Event(finish_reason="cancelled"))

    def _admit(self) -> None:
        """Fill free slots with waiting requests (cancelled ones are dropped)."""
        while None in self._running:
            with self._wake:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
            if request.cancelled.is_set():
                self._emit(request, Event(finish_reason="cancelled"))
                continue
            slot = self._running.index(None)
            try:
                self._slots = self.insert(self._slots, np.int32(slot), *self._prefill(request.prompt[:-1]),
                                          np.int32(request.prompt[-1]))
            except Exception as e:  # noqa: BLE001 - only this request fails, unless the slots went with it
                logger.exception("prefill failed")
                self._emit(request, Event(finish_reason="error", error=f"{type(e).__name__}: {e}"))
                if self._slots_lost():
                    raise  # the running requests' states are gone: _run ends them and frees the slots
                continue
            p = request.params
            values = dict(active=True, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                          seed_lo=p.seed & 0xFFFFFFFF, seed_hi=p.seed >> 32, choice=p.choice,
                          want_top=p.logprobs > 0)
            for name, value in values.items():
                getattr(self._rows, name)[slot] = value
            self._running[slot] = request

    def _prefill(self, prefix: Sequence[int]) -> Tuple[Cache, np.int32]:
        """The state after ``prefix`` (batch 1) and its length."""
        if not prefix:
            return runtime.empty_cache(self.backend.config, 1), np.int32(0)
        length, mode, chunk_size = self.prefill_form(len(prefix))
        ids, mask = runtime.pad_right([prefix], length, 1, 0)
        return self.prefill(self.backend.params, ids, mask, mode=mode, chunk_size=chunk_size), np.int32(len(prefix))

    def prefill_form(self, tokens: int) -> Tuple[int, str, int]:
        """``(length, mode, chunk_size)`` that a prefix of ``tokens`` tokens is prefilled with: right-padded to a
        power of two >= ``MIN_PREFILL_BUCKET``, in the runtime's prompt form for that length."""
        length = runtime.bucket(tokens, MIN_PREFILL_BUCKET)
        return (length, *runtime.prompt_form(self.backend.config, length))

    def _dispatch(self) -> StepOut:
        rows = Rows(*(np.array(a) for a in self._rows))  # a copy: the host arrays change between steps
        self._slots, out = self.step(self.backend.params, self._slots, rows)
        return out

    def _deliver(self, out: StepOut, owners: Sequence[Optional[Request]]) -> None:
        """Hand each slot's tokens of a call, in order, to the request that owned the slot then, while it runs
        (the tokens after its end are dropped)."""
        for step in range(self.steps_per_call):
            for i, request in enumerate(owners):
                if request is None or request.done:
                    continue
                if request.cancelled.is_set():
                    self._finish(i, Event(finish_reason="cancelled"))
                    continue
                token = int(out.token[step, i])
                request.generated += 1
                if token in request.params.stop_token_ids:
                    self._finish(i, Event(finish_reason="stop"))
                    continue
                k = request.params.logprobs
                top = tuple(zip(out.top_ids[step, i, :k].tolist(), out.top_logprobs[step, i, :k].tolist()))
                self._emit(request, Event(token=token, logprob=float(out.logprob[step, i]), top=top))
                if request.generated >= request.params.max_tokens:
                    self._finish(i, Event(finish_reason="length"))

    @staticmethod
    def _emit(request: Request, event: Event) -> None:
        """Hand ``event`` to the request; a callback that fails (its client is gone) cancels only its request."""
        try:
            request.on_event(event)
        except Exception:  # noqa: BLE001 - one request's receiver must not stop the others
            logger.exception("a request's event callback failed; cancelling the request")
            request.cancel()

    def _finish(self, slot: int, event: Event) -> None:
        request = self._running[slot]
        self._running[slot] = None
        self._rows.active[slot] = False
        self._rows.want_top[slot] = False
        request.done = True
        self._emit(request, event)
