"""The OpenAI-compatible server, driven over HTTP on 127.0.0.1 by the real ``openai`` client (one server for the
module: a random tiny model with the tiny fixture's shapes and a SentencePiece tokenizer trained here).

References are independent: token ids and logprobs from offline ``nucleusx_jax.generate``, text from the
tokenizer's own ``decode`` of the prompt plus those ids (``echo``), and the engine's compile cache observed from
outside (``jitted._cache_size()``)."""

import asyncio
import contextlib
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn

from nucleusx_jax import generate as gen
from nucleusx_jax.serve import Engine, SamplingParams, create_app, load_backend, plain_chat_prompt
from nucleusx_jax.serve.engine import Rows, sample
from nucleusx_jax.tokenizer import load_tokenizer

from conftest import SERVED_VOCAB as VOCAB, write_served_model

MAX_BATCH, MAX_QUEUE, MAX_PROMPT, MAX_NEW = 32, 32, 64, 4096
NAME = "tiny"
PROMPTS = ["def foo(x):", "The quick brown fox", "import os\n", "a", "class Parser(object):\n    "]


class Served:
    def __init__(self, model, tokenizer, engine, url):
        self.model, self.tok, self.engine, self.url = model, tokenizer, engine, url
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def reference(self, ids, max_tokens, eos=True):
        """Greedy new ids from offline generate, cut before the EOS."""
        out = gen.generate(self.model, np.asarray([ids]), max_new_tokens=max_tokens,
                           eos_token_id=self.tok.eos_id if eos else [], pad_token_id=self.tok.pad_id)[0, len(ids):]
        out = out.tolist()
        return out[:out.index(self.tok.eos_id)] if eos and self.tok.eos_id in out else out

    def ids(self, text):
        return [self.tok.bos_id] + self.tok.encode(text)


START_DEADLINE_S = 120  # for a server to start; every wait in this file has a deadline


@contextlib.contextmanager
def serving(engine, tokenizer):
    """uvicorn serving ``create_app(engine, tokenizer)`` on a socket bound to port 0 here (no port picked in
    advance): yields its URL once it accepts requests."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tokenizer, NAME), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_DEADLINE_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, served_tokenizer):
    d = str(tmp_path_factory.mktemp("served"))
    model = write_served_model(d, served_tokenizer, seed=3)
    tokenizer = load_tokenizer(os.path.join(d, "tokenizer.model"))
    engine = Engine(load_backend(d), max_batch=MAX_BATCH, max_queue=MAX_QUEUE, max_prompt_tokens=MAX_PROMPT,
                    max_new_tokens=MAX_NEW).start()
    with serving(engine, tokenizer) as url:
        yield Served(model, tokenizer, engine, url)
    engine.shutdown()


def wait_for(condition, what, seconds=60):
    """Poll ``condition()`` until true; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.02)


def complete(served, prompt, **kw):
    kw.setdefault("extra_body", {})["return_token_ids"] = True
    return served.client.completions.create(model=NAME, prompt=prompt, **kw)


def stream_text(served, prompt, **kw):
    pieces, finish = [], None
    for chunk in served.client.completions.create(model=NAME, prompt=prompt, stream=True, **kw):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    return "".join(pieces), finish


# ------------------------------------------------------------------------------------------ engine, no HTTP
def test_rows_at_different_positions_step_like_each_row_alone(served):
    """The per-row position (seqlen [S]) in one step gives each row what a batch-1 recurrent call gives."""
    backend = served.engine.backend
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    caches = []
    for p in prompts:
        out = served.model(np.asarray([p]), forward_mode="parallel", use_cache=True)
        caches.append(out.past_key_values)
        nxt = served.model(np.asarray([[3]]), past_key_values=out.past_key_values)
        caches[-1] = (caches[-1], np.asarray(nxt.logits[0, 0]))
    stacked = tuple(layer._replace(kv=jnp.concatenate([caches[0][0][i].kv, caches[1][0][i].kv]),
                                   scale=jnp.concatenate([caches[0][0][i].scale, caches[1][0][i].scale]),
                                   seqlen=jnp.asarray([5, 2], jnp.int32))
                    for i, layer in enumerate(caches[0][0]))
    logits, cache = backend.decode(backend.params, jnp.asarray([3, 3]), jnp.asarray([True, True]), stacked)
    np.testing.assert_allclose(np.asarray(logits), np.stack([caches[0][1], caches[1][1]]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache[0].seqlen), [6, 3])


def test_sample_rows_follow_their_own_settings():
    """Greedy rows take the argmax; top_k=1 and a tiny top_p take it too; top_k=3 never leaves the top 3; the
    draws depend on the seed, choice and token index only."""
    logits = jax.random.normal(jax.random.PRNGKey(0), (6, 50)) * 3
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]

    def rows(temperature, top_k, top_p, seed, choice=0):
        n = logits.shape[0]
        return Rows(np.ones(n, bool), np.asarray(temperature, np.float32), np.asarray(top_k, np.int32),
                    np.asarray(top_p, np.float32), np.asarray(seed, np.uint32), np.zeros(n, np.uint32),
                    np.full(n, choice, np.uint32), np.zeros(n, bool))

    fn = jax.jit(sample)
    r = rows([0, 1, 1, 2, 1, 1], [0, 1, 0, 3, 3, 0], [1, 1, 1e-6, 1, 1, 1], [7, 7, 7, 7, 8, 9])
    seen = set()
    for n in range(40):
        tok = np.asarray(fn(logits, r, jnp.full((6,), n)))
        np.testing.assert_array_equal(tok[:3], np.argmax(np.asarray(logits), -1)[:3])
        assert tok[3] in top3[3] and tok[4] in top3[4]
        seen.add(int(tok[5]))
    assert len(seen) > 3  # a plain temperature-1 draw varies with the token index
    again = np.asarray(fn(logits, r, jnp.full((6,), 5)))
    np.testing.assert_array_equal(again, np.asarray(fn(logits, r, jnp.full((6,), 5))))
    other = rows([1] * 6, [0] * 6, [1] * 6, [7] * 6, choice=1)
    draws = [np.asarray(fn(logits, rows([1] * 6, [0] * 6, [1] * 6, [7] * 6), jnp.full((6,), n))) for n in range(8)]
    draws_other = [np.asarray(fn(logits, other, jnp.full((6,), n))) for n in range(8)]
    assert not np.array_equal(np.stack(draws), np.stack(draws_other))


def test_sampling_params_are_checked():
    for kw, param in [(dict(max_tokens=0), "max_tokens"), (dict(max_tokens=4, temperature=-1), "temperature"),
                      (dict(max_tokens=4, top_p=0), "top_p"), (dict(max_tokens=4, top_k=-2), "top_k"),
                      (dict(max_tokens=4, seed=-1), "seed"), (dict(max_tokens=4, logprobs=6), "logprobs")]:
        with pytest.raises(ValueError, match=param) as e:
            SamplingParams(**kw)
        assert e.value.param == param


# ---------------------------------------------------------------------------------------------- over HTTP
def test_models_and_health(served):
    assert [m.id for m in served.client.models.list().data] == [NAME]
    health = httpx.get(served.url + "/health").json()
    assert health["status"] == "ok"


def test_greedy_completions_equal_generate(served):
    for prompt in PROMPTS:
        ids = served.ids(prompt)
        ref = served.reference(ids, 24)
        out = complete(served, prompt, max_tokens=24, temperature=0, echo=True)
        choice = out.choices[0]
        assert choice.model_extra["token_ids"] == ref
        assert choice.text == served.tok.decode(ids + ref)  # echo: the prompt's text, then the completion's
        assert choice.finish_reason == ("length" if len(ref) == 24 else "stop")
        assert out.usage.completion_tokens == len(ref) and out.usage.prompt_tokens == len(ids)
        plain = complete(served, prompt, max_tokens=24, temperature=0).choices[0].text
        assert choice.text.endswith(plain) and stream_text(served, prompt, max_tokens=24, temperature=0) == (
            plain, choice.finish_reason)
    ids = [7, 300, 12, 45, 46]  # a prompt of token ids is used as it is (no BOS)
    out = complete(served, ids, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].model_extra["token_ids"] == served.reference(ids, 10, eos=False)


def test_logprobs_are_the_models(served):
    ids = served.ids(PROMPTS[0])
    _, logits = gen.generate(served.model, np.asarray([ids]), max_new_tokens=8, eos_token_id=[], output_logits=True)
    logprobs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[0]), axis=-1))
    out = complete(served, PROMPTS[0], max_tokens=8, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    ref_ids = choice.model_extra["token_ids"]
    np.testing.assert_allclose(choice.logprobs.token_logprobs, logprobs[np.arange(8), ref_ids], atol=1e-4)
    for top, row in zip(choice.logprobs.top_logprobs, logprobs):
        np.testing.assert_allclose(sorted(top.values(), reverse=True), np.sort(row)[::-1][:len(top)], atol=1e-4)
    assert choice.logprobs.tokens == [served.tok.decode([t]) for t in ref_ids]


def test_chat_greedy_stream_and_not(served):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]

    class M:  # plain_chat_prompt reads attributes
        def __init__(self, d):
            self.role, self.content = d["role"], d["content"]

    ids = served.ids(plain_chat_prompt([M(m) for m in messages]))
    ref = served.reference(ids, 20)
    out = served.client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                                extra_body={"return_token_ids": True})
    assert out.choices[0].model_extra["token_ids"] == ref
    assert out.choices[0].message.role == "assistant"
    text = out.choices[0].message.content
    pieces, finish = [], None
    for chunk in served.client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                                       stream=True):
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == text and finish == out.choices[0].finish_reason


def test_stop_strings_cut_exactly(served):
    prompt = PROMPTS[1]
    full = complete(served, prompt, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) > 12
    for stop in (full[6:9], [full[10:12], "never-there"], full[-3:]):
        first = min(full.index(s) for s in ([stop] if isinstance(stop, str) else stop) if s in full)
        kw = dict(max_tokens=40, temperature=0, stop=stop, extra_body={"ignore_eos": True})
        out = complete(served, prompt, **kw).choices[0]
        assert (out.text, out.finish_reason) == (full[:first], "stop")
        assert stream_text(served, prompt, **kw) == (full[:first], "stop")


def test_seeded_request_same_alone_and_among_15_others(served):
    kw = dict(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234, extra_body={"top_k": 40, "ignore_eos": True})
    alone = complete(served, PROMPTS[0], **kw).choices[0]
    assert complete(served, PROMPTS[0], **{**kw, "seed": 99}).choices[0].text != alone.text

    def one(i):
        if i == 7:
            return complete(served, PROMPTS[0], **kw).choices[0]
        return complete(served, PROMPTS[i % len(PROMPTS)], max_tokens=8 + 3 * i, temperature=0.5 + 0.1 * (i % 5),
                        seed=i, extra_body={"ignore_eos": True}).choices[0]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert results[7].model_extra["token_ids"] == alone.model_extra["token_ids"]
    assert results[7].text == alone.text
    two = complete(served, PROMPTS[0], n=2, **kw).choices
    assert two[0].text == alone.text and two[1].text != alone.text  # choice 0 is the single request's draw


def test_32_concurrent_streaming_clients(served):
    words = ["def", "class", "import", "return", "self", "value", "list", "print"]
    prompts = [served.ids(f"{words[i % 8]} {words[i // 8]}") for i in range(32)]  # token ids: of real text
    refs = [served.reference(p, 16, eos=False) for p in prompts]
    steps_before = served.engine.step._cache_size()

    async def client(i):
        async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0) as c:
            pieces, finish = [], None
            async for chunk in await c.completions.create(model=NAME, prompt=prompts[i], max_tokens=16,
                                                          temperature=0, echo=True, stream=True,
                                                          extra_body={"ignore_eos": True}):
                pieces.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            return "".join(pieces), finish

    async def main():
        return await asyncio.gather(*(client(i) for i in range(32)))

    results = asyncio.run(main())
    for prompt, ref, (text, finish) in zip(prompts, refs, results):
        assert (text, finish) == (served.tok.decode(prompt + ref), "length")  # echo: prompt then completion
    # one compiled step for every slot, whatever came and went
    assert served.engine.step._cache_size() == steps_before == 1


def test_bad_requests_get_400_naming_the_field(served):
    url = served.url + "/v1/completions"
    good = {"model": NAME, "prompt": "hello", "max_tokens": 2}
    cases = [
        ({**good, "model": "gpt-4"}, "model"),
        ({**good, "max_tokens": -1}, "max_tokens"),
        ({**good, "max_tokens": 10**9}, "max_tokens"),
        ({**good, "max_tokens": "5"}, "max_tokens"),
        ({**good, "temperature": "hot"}, "temperature"),
        ({**good, "prompt": 5}, "prompt"),
        ({**good, "prompt": ""}, "prompt"),
        ({**good, "prompt": []}, "prompt"),
        ({**good, "prompt": list(range(MAX_PROMPT + 1))}, "prompt"),
        ({**good, "prompt": [VOCAB]}, "prompt"),
        ({**good, "n": 0}, "n"),
        ({**good, "top_p": 1.5}, "top_p"),
        ({**good, "stop": 3}, "stop"),
        ({**good, "frequency_penalty": 0.5}, "frequency_penalty"),
    ]
    for body, param in cases:
        r = httpx.post(url, json=body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"].split(".")[0] == param and err["type"] == "invalid_request_error", (body, err)
        assert param in err["message"] or param == "model"
    r = httpx.post(url, content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = httpx.post(served.url + "/v1/chat/completions", json={"model": NAME, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        served.client.completions.create(model=NAME, prompt="x", max_tokens=-5)
    assert e.value.status_code == 400
    assert complete(served, "hello", max_tokens=3, temperature=0).choices[0].finish_reason  # still serving


def test_full_queue_gets_429_then_serving_goes_on(served):
    """An engine with one slot and a queue of one, blocked (its thread not started yet): the first request
    waits in the queue, the second is refused with 429; once the engine runs, the first is served in full."""
    engine = Engine(served.engine.backend, max_batch=1, max_queue=1, max_prompt_tokens=MAX_PROMPT, max_new_tokens=8)
    body = {"model": NAME, "prompt": [5, 6, 7], "max_tokens": 8, "ignore_eos": True}
    started = []

    async def main(url):
        async with httpx.AsyncClient(timeout=120) as c:
            first = asyncio.ensure_future(c.post(url + "/v1/completions", json=body))
            deadline = time.monotonic() + 60
            while engine.waiting() < 1:
                assert not first.done() and time.monotonic() < deadline, "the first request never queued"
                await asyncio.sleep(0.02)
            refused = await c.post(url + "/v1/completions", json=body)
            started.append(engine.start())
            return await first, refused

    with serving(engine, served.tok) as url:
        try:
            accepted, refused = asyncio.run(main(url))
            assert accepted.status_code == 200 and accepted.json()["usage"]["completion_tokens"] == 8
            assert refused.status_code == 429, refused.text
            err = refused.json()["error"]
            assert err["type"] == "rate_limit_error" and "waiting" in err["message"]
            again = httpx.post(url + "/v1/completions", json=body, timeout=120)
            assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 8
        finally:
            if started:
                engine.shutdown()


def test_client_disconnect_cancels(served):
    seen = []
    submit = served.engine.submit

    def spy(*args, **kw):  # observes the engine's requests from outside
        seen.append(submit(*args, **kw))
        return seen[-1]

    served.engine.submit = spy
    try:
        body = {"model": NAME, "prompt": [5, 6], "max_tokens": MAX_NEW, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        wait_for(lambda: len(seen) == 1, "the streamed request to reach the engine")

        async def give_up():  # a non-streaming client that gives up once its request is running
            async with httpx.AsyncClient(timeout=120) as c:
                post = asyncio.ensure_future(c.post(served.url + "/v1/completions", json={**body, "stream": False}))
                deadline = time.monotonic() + 60
                while len(seen) < 2:
                    assert not post.done() and time.monotonic() < deadline, "the request never reached the engine"
                    await asyncio.sleep(0.02)
                post.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await post

        asyncio.run(give_up())
        wait_for(lambda: all(r.done for r in seen), "both requests to end")
    finally:
        del served.engine.submit
    states = [(r.done, r.cancelled.is_set(), r.generated) for r in seen]
    assert len(seen) == 2 and all(done and cancelled and n < MAX_NEW for done, cancelled, n in states), states
    assert httpx.get(served.url + "/health").json()["running"] == 0
