"""Hostile load on the OpenAI server: does ``/health`` stay fast, and is greedy output still exact?

    python benchmarks/serve_hostile.py                  # 32 clients, n=4, logprobs=5, 1024 tokens, 100 idle
    python benchmarks/serve_hostile.py --clients 8 --new-tokens 256 --idle 20     # a quick look

The model is the tiny test fixture's shape (tests/fixtures/nucleus_x_tiny: 2 layers, embed 64) with random
weights and a 512-piece SentencePiece tokenizer trained here on Python's docs; the server runs as ``python -m
nucleusx_jax.serve`` in its own process with an API key, ``--max-batch`` = clients x n, and its default
connection limits. At once:

* ``--clients`` streaming clients, each ``n=4, logprobs=5, max_tokens=--new-tokens``, greedy, EOS ignored;
* 1 streaming client with the largest stop strings allowed (4 of ``MAX_STOP_CHARS`` characters, each the
  generated text's first ``MAX_STOP_CHARS - 1`` characters plus one that never comes: every automaton sits at
  its longest partial match);
* ``--idle`` idle TCP connections that send nothing; each one the server closes (``--request-timeout``) is
  opened again;
* a prober in its own process: ``GET /health`` every 50 ms on a fresh connection, its latency recorded.

Afterwards every streamed choice's text must equal the tokenizer's decoding of offline ``generate``'s greedy
ids, and a non-streamed greedy request's ``token_ids`` must equal them. Printed, and written to
``benchmarks/results/serve_hostile.json``: /health latency p50 / p99 / max (target p99 <= 250 ms), the tokens
streamed and their rate, how often idle connections were closed, and the exactness checks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runs from a checkout without an install

from benchmarks.decode import write_json  # noqa: E402
from benchmarks.serve import running_server  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "serve_hostile.json")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "nucleus_x_tiny", "config.json")
KEY = "bench-key"
PROMPTS = ["def foo(x):", "The quick brown fox", "import os\n", "class Parser(object):\n    "]
PROBE_EVERY_S = 0.05


def make_model_dir(path: str) -> Any:
    """The tiny fixture's shape with vocab 512 and random weights, plus a tokenizer, saved to ``path``; returns
    the model."""
    from nucleusx_jax import NucleusX, NucleusXConfig
    from nucleusx_jax.tokenizer import train_tokenizer

    with open(FIXTURE) as f:
        cfg = {k: v for k, v in json.load(f).items() if k not in ("architectures", "transformers_version",
                                                                   "model_type")}
    model = NucleusX(NucleusXConfig(**{**cfg, "vocab_size": 512}), seed=3)
    model.save_pretrained(path)
    train_tokenizer(["builtin:pydoc"], os.path.join(path, "tokenizer"), 512, max_sentences=3000)
    return model


def probe(port: int, stop: Any, out: Any) -> None:
    """In its own process: ``GET /health`` every ``PROBE_EVERY_S`` on a fresh connection (a plain socket: no
    client library's cost in the figure) until ``stop`` is set; puts the latencies (s) on ``out``."""
    import socket

    latencies = []
    while not stop.is_set():
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        latencies.append(time.perf_counter() - start)
        if not data.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"/health answered {data[:100]!r}")
        time.sleep(max(0.0, PROBE_EVERY_S - (time.perf_counter() - start)))
    out.put(latencies)


async def stream(client: Any, url: str, body: Dict[str, Any]) -> Dict[int, str]:
    """One streamed completion; returns each choice's text."""
    texts: Dict[int, List[str]] = {}
    async with client.stream("POST", url + "/v1/completions", json=body,
                             headers={"Authorization": f"Bearer {KEY}"}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                texts.setdefault(choice["index"], []).append(choice["text"])
    return {i: "".join(t) for i, t in texts.items()}


async def idle_connections(port: int, count: int, done: asyncio.Event) -> int:
    """Hold ``count`` idle connections until ``done``; reopen each one the server closes. Returns the closes."""
    closed = 0

    async def one() -> None:
        nonlocal closed
        while not done.is_set():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            eof = asyncio.ensure_future(reader.read())
            finished = asyncio.ensure_future(done.wait())
            await asyncio.wait([eof, finished], return_when=asyncio.FIRST_COMPLETED)
            if eof.done():
                closed += 1
            for task in (eof, finished):
                task.cancel()
            writer.close()

    await asyncio.gather(*(one() for _ in range(count)))
    return closed


async def load(url: str, port: int, prompts: List[List[int]], stop_prompt: List[int], stops: List[str],
               args: Any) -> Dict[str, Any]:
    import httpx

    done = asyncio.Event()
    idle = asyncio.ensure_future(idle_connections(port, args.idle, done))
    common = {"model": "bench", "max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=1200, limits=httpx.Limits(max_connections=args.clients + 4)) as client:
        results = await asyncio.gather(
            *(stream(client, url, {**common, "prompt": p, "n": 4, "logprobs": 5}) for p in prompts),
            stream(client, url, {**common, "prompt": stop_prompt, "stop": stops}))
    seconds = time.perf_counter() - start
    done.set()
    return {"results": results, "seconds": seconds, "idle_closed": await idle}


def main(argv: Any = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--idle", type=int, default=100)
    p.add_argument("--output", default=RESULTS)
    args = p.parse_args(argv)

    import httpx
    from nucleusx_jax import generate as gen
    from nucleusx_jax.serve.text import MAX_STOP_CHARS
    from nucleusx_jax.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as model_dir:
        model = make_model_dir(model_dir)
        tok = load_tokenizer(os.path.join(model_dir, "tokenizer.model"))
        distinct = [[tok.bos_id] + tok.encode(t) for t in PROMPTS]
        refs = [np.asarray(gen.generate(model, np.asarray([ids]), max_new_tokens=args.new_tokens,
                                        eos_token_id=[]))[0, len(ids):].tolist() for ids in distinct]
        texts = [tok.decode(ids + ref)[len(tok.decode(ids)):] for ids, ref in zip(distinct, refs)]
        stop_text = (texts[0] * (MAX_STOP_CHARS // max(1, len(texts[0])) + 1))[:MAX_STOP_CHARS - 1]
        stops = [stop_text + c for c in "\x01\x02\x03\x04"]
        prompts = [distinct[i % len(distinct)] for i in range(args.clients)]
        extra = ["--api-key", KEY, "--max-tokens-limit", str(args.new_tokens)]
        with running_server(model_dir, 4 * args.clients + 1, extra=extra) as (url, _):
            port = int(url.rsplit(":", 1)[1])
            warm = {"model": "bench", "prompt": distinct[0], "max_tokens": 4, "temperature": 0}
            for _ in range(2):  # compiles the prefill and the step
                httpx.post(url + "/v1/completions", json=warm, headers={"Authorization": f"Bearer {KEY}"},
                           timeout=600).raise_for_status()
            ctx = multiprocessing.get_context("spawn")
            stop, latencies = ctx.Event(), ctx.Queue()
            prober = ctx.Process(target=probe, args=(port, stop, latencies))
            prober.start()
            time.sleep(1.0)
            ran = asyncio.run(load(url, port, prompts, distinct[0], stops, args))
            stop.set()
            health = np.asarray(latencies.get(timeout=120)) * 1e3
            prober.join(timeout=60)
            after = httpx.post(url + "/v1/completions", json={
                "model": "bench", "prompt": distinct[1], "max_tokens": args.new_tokens, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}, headers={"Authorization": f"Bearer {KEY}"},
                timeout=600).json()["choices"][0]["token_ids"]

    streamed_exact = all(all(r[i] == texts[j % len(texts)] for i in range(4)) and len(r) == 4
                         for j, r in enumerate(ran["results"][:-1]))
    result = {
        "command": " ".join(["python"] + sys.argv), "cpu_count": os.cpu_count(), "clients": args.clients, "n": 4,
        "logprobs": 5, "new_tokens": args.new_tokens, "idle_connections": args.idle,
        "stop_strings": [len(s) for s in stops],
        "seconds": ran["seconds"], "tokens_streamed": 4 * args.clients * args.new_tokens + args.new_tokens,
        "health_probes": int(health.size), "health_p50_ms": float(np.percentile(health, 50)),
        "health_p99_ms": float(np.percentile(health, 99)), "health_max_ms": float(health.max()),
        "idle_closed_by_server": ran["idle_closed"],
        "streamed_equal_generate": bool(streamed_exact),
        "stop_client_equal_generate": ran["results"][-1] == {0: texts[0]},
        "after_equal_generate": after == refs[1],
    }
    result["tokens_per_s"] = result["tokens_streamed"] / result["seconds"]
    write_json(args.output, result)
    print(json.dumps(result, indent=1))
    print(f"/health p99 {result['health_p99_ms']:.0f} ms (target <= 250), max {result['health_max_ms']:.0f} ms over "
          f"{result['health_probes']} probes; {result['tokens_streamed']} tokens in {result['seconds']:.0f} s; "
          f"greedy exact: streamed {streamed_exact}, stop client {result['stop_client_equal_generate']}, "
          f"after {result['after_equal_generate']}")
    return result


if __name__ == "__main__":
    main()
