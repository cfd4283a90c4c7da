"""The serving engine's failure and shutdown paths, without HTTP: a compiled step that fails at run time (a
host callback inside the model's decode raises) ends the requests it was running with ``error`` and the engine
keeps serving the next ones, whose greedy tokens are offline ``generate``'s; ``shutdown`` ends running and
waiting requests with ``cancelled`` and returns."""

import contextlib
import dataclasses
import threading
import time
from typing import Any, List

import jax
import numpy as np
import pytest

from nucleusx_jax import NucleusX, NucleusXConfig
from nucleusx_jax import generate as gen
from nucleusx_jax.serve import Engine, EngineStopped, SamplingParams
from nucleusx_jax.serve.backend import Backend

DEADLINE_S = 120  # every wait in this file
PROMPT = [1, 7, 12, 5]


@dataclasses.dataclass(frozen=True)
class FailingBackend(Backend):
    """The real backend whose decode step raises at run time while ``failures`` (a list, so that the test can
    change it) holds a positive count, one failure per step call."""

    failures: List[int] = dataclasses.field(default_factory=lambda: [0])

    def decode(self, params: Any, tokens: Any, active: Any, cache: Any):
        logits, cache = super().decode(params, tokens, active, cache)

        def check(x):
            if self.failures[0] > 0:
                self.failures[0] -= 1
                raise RuntimeError("injected device failure")
            return x

        return jax.pure_callback(check, jax.ShapeDtypeStruct(logits.shape, logits.dtype), logits), cache


@pytest.fixture(scope="module")
def model():
    cfg = NucleusXConfig(vocab_size=40, decoder_embed_dim=16, decoder_value_embed_dim=16, decoder_ffn_embed_dim=24,
                         decoder_layers=2, decoder_retention_heads=2, recurrent_chunk_size=4)
    return NucleusX(cfg, seed=0)


def engine_of(model, **kw) -> Engine:
    backend = FailingBackend(model.config, model.module, model.params)
    return Engine(backend, max_prompt_tokens=16, max_new_tokens=64, steps_per_call=2, **kw).start()


class Collected:
    """A request's events, and a wait for its end."""

    def __init__(self):
        self.events, self.ended = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.finish_reason is not None:
            self.ended.set()

    def wait(self):
        assert self.ended.wait(DEADLINE_S), f"no end after {DEADLINE_S} s: {self.events[-3:]}"
        return self.events[-1]

    def tokens(self):
        return [e.token for e in self.events if e.token is not None]


def greedy(model, n):
    return gen.generate(model, np.asarray([PROMPT]), max_new_tokens=n, eos_token_id=[])[0, len(PROMPT):].tolist()


@contextlib.contextmanager
def first_step_fails(model, max_batch, prompts):
    """A started engine whose first step call fails, with a greedy 8-token request per prompt submitted in
    order: yields ``(engine, [Collected per request])``; shuts the engine down after."""
    engine = engine_of(model, max_batch=max_batch, max_queue=4)
    engine.backend.failures[0] = 1
    try:
        requests = [Collected() for _ in prompts]
        for prompt, request in zip(prompts, requests):
            engine.submit(prompt, SamplingParams(max_tokens=8, temperature=0), request)
        yield engine, requests
    finally:
        engine.shutdown()


def test_a_failing_step_ends_its_requests_with_error(model):
    with first_step_fails(model, 2, [PROMPT, PROMPT[:2]]) as (engine, requests):
        for request in requests:
            end = request.wait()
            assert end.finish_reason == "error" and "injected device failure" in end.error, end
            assert request.tokens() == [] and [e.finish_reason for e in request.events] == ["error"]
        assert engine.running() == 0


# The step and insert are compiled with the slots donated: a failed call takes them with it, so the engine must
# start again from empty slots once it has ended the running requests.
def test_after_a_failing_step_the_engine_serves_waiting_and_new_requests(model):
    with first_step_fails(model, 1, [PROMPT, PROMPT]) as (engine, (first, queued)):  # one slot: the second waits
        assert first.wait().finish_reason == "error"
        assert queued.wait().finish_reason == "length"  # the waiting request was not lost ...
        assert queued.tokens() == greedy(model, 8)  # ... nor its state touched by the failure
        later = Collected()
        engine.submit(PROMPT, SamplingParams(max_tokens=5, temperature=0), later)
        assert later.wait().finish_reason == "length" and later.tokens() == greedy(model, 5)


def test_shutdown_cancels_running_and_waiting_requests(model):
    engine = engine_of(model, max_batch=1, max_queue=4)
    release = threading.Event()
    running, waiting = Collected(), Collected()

    def held(event):  # the engine thread stops in the first delivery until released
        running(event)
        if event.token is not None and len(running.events) == 1:
            assert release.wait(DEADLINE_S)

    engine.submit(PROMPT, SamplingParams(max_tokens=64, temperature=0), held)
    engine.submit(PROMPT, SamplingParams(max_tokens=64, temperature=0), waiting)
    deadline = time.monotonic() + DEADLINE_S
    while not running.events:
        assert time.monotonic() < deadline, "the first request got no token"
        time.sleep(0.01)
    stopper = threading.Thread(target=engine.shutdown, daemon=True)
    stopper.start()
    while not engine._stop:  # shutdown has asked the held engine thread to stop (no public view of it)
        assert time.monotonic() < deadline, "shutdown did not start"
        time.sleep(0.01)
    release.set()
    stopper.join(DEADLINE_S)
    assert not stopper.is_alive(), "shutdown did not return"
    assert running.wait().finish_reason == "cancelled" and len(running.tokens()) < 64
    assert waiting.wait().finish_reason == "cancelled" and waiting.tokens() == []
    assert [e.finish_reason for e in running.events + waiting.events if e.finish_reason] == ["cancelled"] * 2


def test_a_request_after_shutdown_is_refused(model):
    engine = engine_of(model, max_batch=1, max_queue=4)
    engine.shutdown()
    late = Collected()
    with pytest.raises(EngineStopped, match="shutting down"):
        engine.submit(PROMPT, SamplingParams(max_tokens=4, temperature=0), late)
    assert late.events == [] and engine.waiting() == 0


def test_abstract_step_inputs_are_the_layout_the_engine_allocates(model):
    """What ahead-of-time compilation reads (shapes, nothing allocated) matches the slots and rows the engine
    really builds and steps with: the step lowered on them accepts the real ones."""
    engine = Engine(Backend(model.config, model.module, model.params), max_batch=3, max_prompt_tokens=16)
    slots, rows = engine.abstract_step_inputs()
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves((slots, rows)))
    real_slots = engine._empty_slots()
    real_rows = engine._rows
    shapes = lambda tree: jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), tree)
    assert shapes(slots) == shapes(real_slots) and shapes(rows) == shapes(real_rows)
    assert rows.active.shape == (3,) and jax.tree.structure(slots) == jax.tree.structure(real_slots)
    compiled = engine.step.lower(model.params, slots, rows).compile()
    compiled(model.params, real_slots, type(real_rows)(*(np.array(a) for a in real_rows)))
