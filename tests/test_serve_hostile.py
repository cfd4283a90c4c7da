"""The server against hostile and careless clients: the API key, the body limit, malformed bodies, stop-string
limits, slow and idle connections, the connection cap, disconnects, and the cost of text work per token.

One server for the module (a random tiny model with the tiny fixture's shapes and a SentencePiece tokenizer:
tests/conftest.py's ``write_served_model``), configured as the CLI configures it (:func:`~nucleusx_jax.serve.guard.server_config`) with small limits;
it binds port 0 and the tests read the port back."""

import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import time

import httpx
import numpy as np
import openai
import pytest

from nucleusx_jax import generate as gen
from nucleusx_jax.serve import Engine, create_app, load_backend
from nucleusx_jax.serve.guard import server_config
from nucleusx_jax.serve.text import MAX_STOP_CHARS, MAX_STOPS, StopMatcher, TextTracker
from nucleusx_jax.tokenizer import load_tokenizer

from conftest import SERVED_VOCAB, running_server, write_served_model

NAME, KEY = "tiny", "s3cret-key"
MAX_BYTES, MAX_CONNECTIONS, REQUEST_TIMEOUT = 64 * 1024, 12, 1.0


class CountingTokenizer:
    """A tokenizer that counts the ids it decodes and the characters it encodes (the server's text work,
    observed from outside)."""

    def __init__(self, tok):
        self.tok, self.decoded, self.encoded = tok, 0, 0
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id

    def encode(self, text):
        self.encoded += len(text)
        return self.tok.encode(text)

    def encode_batch(self, texts):
        return self.tok.encode_batch(texts)

    def decode(self, ids):
        self.decoded += len(ids)
        return self.tok.decode(ids)


class Hostile:
    def __init__(self, model, tok, engine, port):
        self.model, self.tok, self.engine, self.port = model, tok, engine, port
        self.url = f"http://127.0.0.1:{port}"
        self.auth = {"Authorization": f"Bearer {KEY}"}
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def post(self, path, **kw):
        return httpx.post(self.url + path, headers={**self.auth, **kw.pop("headers", {})}, timeout=60, **kw)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, served_tokenizer):
    d = str(tmp_path_factory.mktemp("hostile"))
    model = write_served_model(d, served_tokenizer, seed=5)
    tok = CountingTokenizer(load_tokenizer(os.path.join(d, "tokenizer.model")))
    engine = Engine(load_backend(d), max_batch=8, max_queue=16, max_prompt_tokens=64, max_new_tokens=4096).start()
    app = create_app(engine, tok, NAME, api_key=KEY, max_request_bytes=MAX_BYTES)
    with running_server(server_config(app, port=0, max_connections=MAX_CONNECTIONS, request_timeout=REQUEST_TIMEOUT,
                                      keep_alive=1)) as (_, port):
        yield Hostile(model, tok, engine, port)
    engine.shutdown()


def test_cli_key_from_the_environment_and_bad_limits_refused_before_loading(monkeypatch, capsys):
    from nucleusx_jax.serve.cli import main, parser

    for option, named in (("--max-connections=0", "max_connections"), ("--request-timeout=-1", "request_timeout"),
                          ("--ssl-keyfile=k.pem", "ssl_certfile"), ("--api-key=", "API key"),
                          ("--max-request-bytes=0", "max_request_bytes")):
        with pytest.raises(SystemExit) as e:
            main(["/nonexistent-model", option])  # the model would be a "does not exist" error
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and named in err and err.count("\n") == 1, err

    monkeypatch.setenv("NUCLEUSX_API_KEY", "from-env")
    assert parser().parse_args(["model"]).api_key == "from-env"
    assert parser().parse_args(["model", "--api-key", "given"]).api_key == "given"
    monkeypatch.delenv("NUCLEUSX_API_KEY")
    assert parser().parse_args(["model"]).api_key is None
    with pytest.raises(ValueError, match="ssl_certfile"):
        server_config(None, ssl_keyfile="key.pem")
    with pytest.raises(ValueError, match="API key is empty"):
        create_app(None, None, NAME, api_key="")
    with pytest.raises(ValueError, match="max_request_bytes"):
        create_app(None, None, NAME, max_request_bytes=0)


def test_tls_with_key_and_cert_files(hostile, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    key, cert = str(tmp_path / "key.pem"), str(tmp_path / "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    app = create_app(hostile.engine, hostile.tok, NAME, api_key=KEY)
    with running_server(server_config(app, port=0, ssl_keyfile=key, ssl_certfile=cert)) as (_, port):
        r = httpx.get(f"https://127.0.0.1:{port}/v1/models", headers=hostile.auth,
                      verify=ssl.create_default_context(cafile=cert))
        assert r.json()["data"][0]["id"] == NAME
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served there
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)


def assert_error(r, status, param=None):
    """``r`` is an OpenAI-style error with this status (and ``param``)."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def still_serving(hostile):
    out = hostile.client.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop")


# ---------------------------------------------------------------------------------------------- the key
def test_api_key_is_required_on_v1_but_not_health(hostile):
    body = {"model": NAME, "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}):
        for method, path, kw in (("POST", "/v1/completions", {"json": body}), ("GET", "/v1/models", {}),
                                 ("POST", "/v1/chat/completions", {"json": {}}), ("GET", "/v1/nothing", {})):
            r = httpx.request(method, hostile.url + path, headers=headers, **kw)
            err = assert_error(r, 401)
            assert err["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(hostile.url + "/health").json()["status"] == "ok"  # open without the key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=hostile.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert [m.id for m in hostile.client.models.list().data] == [NAME]


# ------------------------------------------------------------------------------------------ the body limit
def test_oversized_body_gets_413_fast(hostile):
    url = hostile.url + "/v1/completions"
    big = b'{"model": "tiny", "prompt": "' + b"a" * (50 * 2**20) + b'"}'
    start = time.perf_counter()
    r = httpx.post(url, content=big, headers={**hostile.auth, "content-type": "application/json"}, timeout=30)
    assert time.perf_counter() - start < 1.0
    assert "max-request-bytes" in assert_error(r, 413, "body")["message"]

    def chunks():  # no Content-Length: the bytes read are counted
        for _ in range(64):
            yield b"a" * 2**16

    r = httpx.post(url, content=chunks(), headers=hostile.auth, timeout=30)
    assert_error(r, 413, "body")
    r = hostile.post("/v1/completions", json={"model": NAME, "prompt": "a" * (MAX_BYTES - 100), "max_tokens": 1})
    assert_error(r, 400, "prompt")  # just under the limit: read, tokenized, then too many tokens
    still_serving(hostile)


# ------------------------------------------------------------------------------------- malformed requests
def test_malformed_bodies_get_400_in_the_openai_shape(hostile):
    url = "/v1/completions"
    json_headers = {"content-type": "application/json"}
    cases = [
        b'{"model": "tiny", "prompt": "\xff\xfe"}',  # invalid UTF-8
        b'{"model": "tiny", "prompt": "a\\ud800b"}',  # a lone surrogate
        b'{"model": "tiny", "prompt": "a", "stop": ["\\udfff"]}',
        b'{"model": "tiny", "prompt": "x", "user": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # deeply nested
        b"[1, 2]",
        b"",
    ]
    for raw in cases:
        assert_error(hostile.post(url, content=raw, headers=json_headers), 400, "body")
    chat = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d"}]}'
    assert_error(hostile.post("/v1/chat/completions", content=chat, headers=json_headers), 400, "body")
    pair = b'{"model": "tiny", "prompt": "a\\ud83d\\ude00", "max_tokens": 2}'  # a surrogate pair is fine
    assert hostile.post(url, content=pair, headers=json_headers).status_code == 200
    r = hostile.post(url, json={"model": NAME, "prompt": "x", "max_tokens": "9" * 5000})
    assert len(assert_error(r, 400, "max_tokens")["message"]) < 300  # the bad value is cut in the message
    assert_error(httpx.get(hostile.url + "/v1/nowhere", headers=hostile.auth), 404)
    assert_error(httpx.get(hostile.url + "/v1/completions", headers=hostile.auth), 405)
    assert_error(httpx.post(hostile.url + "/health"), 405)
    still_serving(hostile)


def test_more_messages_than_prompt_tokens_are_refused_while_parsing(hostile):
    """Each message costs at least one prompt token: too many are refused before a prompt is built."""
    messages = [{"role": "user", "content": ""}] * (hostile.engine.max_prompt_tokens + 1)
    hostile.tok.encoded = 0
    err = assert_error(hostile.post("/v1/chat/completions", json={"model": NAME, "messages": messages}), 400,
                       "messages")
    assert str(hostile.engine.max_prompt_tokens) in err["message"] and hostile.tok.encoded == 0


def test_engine_failure_is_a_500_in_the_openai_shape(hostile, monkeypatch):
    def boom(*args, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(hostile.engine, "submit", boom)
    err = assert_error(hostile.post("/v1/completions", json={"model": NAME, "prompt": "x"}), 500)
    assert err["type"] == "server_error"


def test_engine_failure_while_streaming_is_an_error_event(hostile, monkeypatch):
    body = {"model": NAME, "prompt": [5, 6], "max_tokens": 4096, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", hostile.url + "/v1/completions", json=body, headers=hostile.auth, timeout=60) as r:
        lines = (line for line in r.iter_lines() if line)
        assert json.loads(next(lines)[6:])["choices"][0]["finish_reason"] is None

        def boom(*args, **kw):
            raise RuntimeError("boom")

        monkeypatch.setattr(hostile.engine, "step", boom)
        rest = list(lines)
    monkeypatch.undo()
    assert rest[-1] == "data: [DONE]"
    err = json.loads(rest[-2][6:])["error"]
    assert err["type"] == "server_error" and "boom" in err["message"]
    still_serving(hostile)


def test_stop_strings_are_limited(hostile):
    body = {"model": NAME, "prompt": "x", "max_tokens": 4}
    assert "at most" in assert_error(hostile.post("/v1/completions", json={**body, "stop": ["a"] * (MAX_STOPS + 1)}),
                                     400, "stop")["message"]
    too_long = ["x", "y" * (MAX_STOP_CHARS + 1)]
    err = assert_error(hostile.post("/v1/chat/completions", json={
        "model": NAME, "messages": [{"role": "user", "content": "x"}], "stop": too_long}), 400, "stop")
    assert str(MAX_STOP_CHARS) in err["message"]
    longest = [c * MAX_STOP_CHARS for c in "qwzj"]
    assert hostile.post("/v1/completions", json={**body, "stop": longest}).status_code == 200


# ----------------------------------------------------------------------------------------- connections
def read_all(sock, timeout):
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data, True  # closed by the server
            data += chunk
    except socket.timeout:
        return data, False


def test_slow_and_idle_connections_are_closed(hostile):
    slow = socket.create_connection(("127.0.0.1", hostile.port))
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
    idle = socket.create_connection(("127.0.0.1", hostile.port))
    body = socket.create_connection(("127.0.0.1", hostile.port))  # a body that never ends
    body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                 b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\"")
    start = time.perf_counter()
    for sock in (slow, idle):
        data, closed = read_all(sock, 5 * REQUEST_TIMEOUT)
        assert closed and data.startswith(b"HTTP/1.1 408"), data
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    data, closed = read_all(body, 5 * REQUEST_TIMEOUT)
    assert closed
    assert time.perf_counter() - start < 4 * REQUEST_TIMEOUT
    for sock in (slow, idle, body):
        sock.close()
    still_serving(hostile)


def test_connections_past_the_cap_get_503(hostile):
    held = [socket.create_connection(("127.0.0.1", hostile.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", hostile.port))
        data, closed = read_all(extra, 5)
        assert closed and data.startswith(b"HTTP/1.1 503"), data
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"
        extra.close()
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    still_serving(hostile)


def test_oversized_head_gets_431_or_400(hostile):
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    for parts, status in (([head], b"431"), ([head[:50_000], head[50_000:]], b"400")):  # whole; trickled
        sock = socket.create_connection(("127.0.0.1", hostile.port))
        for part in parts:
            sock.sendall(part)
            time.sleep(0.1)
        data, closed = read_all(sock, 5)
        sock.close()
        assert closed and data.startswith(b"HTTP/1.1 " + status), data[:100]
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "invalid_request_error"


def test_disconnected_client_frees_its_slot_within_a_step(hostile):
    """The engine learns of a disconnect at once (no polling): few tokens are made after the client is gone."""
    seen = []
    submit = hostile.engine.submit

    def spy(*args, **kw):
        seen.append(submit(*args, **kw))
        return seen[-1]

    hostile.engine.submit = spy
    try:
        for stream in (False, True):
            seen.clear()
            sock = socket.create_connection(("127.0.0.1", hostile.port))
            body = json.dumps({"model": NAME, "prompt": [5, 6], "max_tokens": 4096, "ignore_eos": True,
                               "stream": stream}).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                         b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
                         b"\r\n\r\n" + body)
            while not seen or seen[0].generated < 50:
                time.sleep(0.01)
            at_close = seen[0].generated
            sock.close()
            deadline = time.time() + 10
            while not seen[0].done and time.time() < deadline:
                time.sleep(0.005)
            assert seen[0].done and seen[0].cancelled.is_set()
            assert seen[0].generated - at_close <= 6 * hostile.engine.steps_per_call, (stream, at_close,
                                                                                     seen[0].generated)
    finally:
        del hostile.engine.submit


# ------------------------------------------------------------------------------------ text work per token
def test_streaming_text_work_is_constant_per_token(hostile):
    """A streamed completion with n=2 and logprobs=5 decodes O(1) ids per token, not every earlier token again;
    and its text and logprobs still equal offline generate's and the tokenizer's."""
    ids = [hostile.tok.bos_id] + hostile.tok.encode("def foo(x):")
    new = 400
    ref = gen.generate(hostile.model, np.asarray([ids]), max_new_tokens=new, eos_token_id=[])[0, len(ids):].tolist()
    hostile.tok.decoded = 0
    pieces, offsets, tokens = {0: [], 1: []}, [], []
    for chunk in hostile.client.completions.create(model=NAME, prompt="def foo(x):", max_tokens=new, n=2,
                                                   temperature=0, logprobs=5, stream=True,
                                                   extra_body={"ignore_eos": True}):
        c = chunk.choices[0]
        pieces[c.index].append(c.text)
        if c.index == 0 and c.logprobs is not None:
            offsets += c.logprobs.text_offset
            tokens += c.logprobs.tokens
    assert hostile.tok.decoded <= 2 * new * 40, hostile.tok.decoded  # the old server: about 2 * new**2 / 2
    full = hostile.tok.tok.decode(ids + ref)[len(hostile.tok.tok.decode(ids)):]
    assert "".join(pieces[0]) == "".join(pieces[1]) == full
    assert tokens == [hostile.tok.tok.decode([t]) for t in ref]
    assert offsets == np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist()


def brute_force_cut(text, stops):
    """Where the text ends: before the first stop string to be completed (a tie: the longest)."""
    ends = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
    if not ends:
        return text, False
    end, neg = min(ends)
    return text[:end + neg], True


def test_text_tracker_against_full_decode_and_brute_force_stops(hostile):
    tok = hostile.tok.tok
    rng = random.Random(0)
    for trial in range(60):
        context = [tok.bos_id] + [rng.randrange(3, SERVED_VOCAB) for _ in range(rng.randrange(0, 4))]
        ids = [rng.randrange(3, SERVED_VOCAB) for _ in range(rng.randrange(1, 60))]
        full = tok.decode(context + ids)[len(tok.decode(context)):]
        stops = [] if trial % 3 == 0 else [full[i:i + rng.randrange(1, 6)] for i in
                                           (rng.randrange(0, max(1, len(full))) for _ in range(rng.randrange(1, 5)))]
        stops += ["never there"] if trial % 2 else []
        tracker = TextTracker(tok, context, stops)
        out = []
        for t in ids:
            out.append(tracker.push(t))
            if tracker.stopped:
                break
        out.append(tracker.flush())
        expected, stopped = brute_force_cut(full, [s for s in stops if s])
        assert ("".join(out), tracker.stopped) == (expected, stopped), (trial, stops)
        assert tracker.text == expected


def test_stop_matching_is_linear_in_the_text():
    stops = ["a" * MAX_STOP_CHARS + "b"] * 3 + ["c" * MAX_STOP_CHARS]
    matcher = StopMatcher(stops)
    start = time.perf_counter()
    for _ in range(2000):  # text that keeps every automaton at its longest partial match
        assert matcher.feed("a" * 4) is None
    assert matcher.held() == MAX_STOP_CHARS
    assert matcher.feed("b") == (1, MAX_STOP_CHARS + 1)
    assert time.perf_counter() - start < 5  # a quadratic matcher: about 8000 * 4 * 1024 steps
