"""Serving benchmark: the OpenAI server on bench-small under 1, 8 and 32 concurrent streaming clients.

    python benchmarks/serve.py                               # clients 1 8 32, 128 new tokens, prompt 16
    python benchmarks/serve.py --clients 8 --new-tokens 64
    python benchmarks/serve.py --memory-requests 1000        # also: RSS over 1000 sequential requests

bench-small (the config of benchmarks/decode.py), random weights, float32, saved to a temporary directory with
a 32000-piece SentencePiece tokenizer; the server runs as ``python -m nucleusx_jax.serve`` in its own process,
one per concurrency level with ``--max-batch`` = the number of clients (the offline batch size; ``--max-batch
N`` serves every level from N slots). Each client streams a completion of a 16-token prompt (token ids,
greedy, EOS ignored, so every client gets exactly ``--new-tokens`` tokens). Per concurrency level, after a
warm-up round:

* **TTFT**: time from sending the request to its first token (p50, p99 over the clients of ``--rounds`` rounds);
* **aggregate tok/s**: all tokens / (last token of any client - first request sent);
* **decode tok/s**: the tokens after each client's first / (last token of any client - first token of any
  client): the decoding rate while the clients share the step (best round);
* **offline**: ``benchmarks/decode.py``'s compiled ``generate`` loop at the same batch and prompt (its decode
  tok/s, best of 3), run just before that level's server starts; the ratio is decode tok/s over it (target
  >= 0.8 at 8 and 32).

``--memory-requests N``: then N sequential requests (alternating streaming and not, prompts of 4-60 tokens,
8 new tokens) after 50 warm-up requests, on a server with 32 slots; the server's RSS before and after (target:
growth <= 50 MB).

Results are printed and written to ``benchmarks/results/serve.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runs from a checkout without an install

from benchmarks.decode import BENCH_SMALL, run_batch, write_json  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "serve.json")
PROMPT = 16
MB = 2.0**20


def make_model_dir(path: str, seed: int = 0) -> None:
    """bench-small with random weights, saved to ``path`` with a tokenizer of the model's 32000 pieces (trained
    on random words: any id the model draws can be decoded)."""
    from nucleusx_jax import NucleusX, NucleusXConfig
    from nucleusx_jax.tokenizer import train_tokenizer

    NucleusX(NucleusXConfig(**BENCH_SMALL), seed=seed).save_pretrained(path)
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(["".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(40000)])
    corpus = os.path.join(path, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(" ".join(words[row]) for row in rng.integers(0, len(words), (60000, 12))) + "\n")
    train_tokenizer([corpus], os.path.join(path, "tokenizer"), BENCH_SMALL["vocab_size"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_client(client: Any, url: str, prompt: List[int], new_tokens: int) -> Dict[str, float]:
    """Stream one completion; returns send / first / last token times and the token count."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    sent = time.perf_counter()
    first, last, tokens = None, None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if '"finish_reason": null' in line:  # one event per token; the last chunk only ends the stream
                now = time.perf_counter()
                first = first if first is not None else now
                last, tokens = now, tokens + 1
    if tokens != new_tokens:
        raise RuntimeError(f"a client got {tokens} tokens, expected {new_tokens}")
    return {"sent": sent, "first": first, "last": last, "tokens": tokens}


async def round_of(url: str, clients: int, new_tokens: int, seed: int) -> List[Dict[str, float]]:
    import httpx

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, BENCH_SMALL["vocab_size"], PROMPT).tolist() for _ in range(clients)]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        return await asyncio.gather(*(one_client(client, url, p, new_tokens) for p in prompts))


def figures(rounds: List[List[Dict[str, float]]]) -> Dict[str, float]:
    ttft = [c["first"] - c["sent"] for r in rounds for c in r]
    aggregate, decode = [], []
    for r in rounds:
        start, first, end = min(c["sent"] for c in r), min(c["first"] for c in r), max(c["last"] for c in r)
        aggregate.append(sum(c["tokens"] for c in r) / (end - start))
        decode.append(sum(c["tokens"] - 1 for c in r) / (end - first))
    return {"ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)), "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
            "aggregate_tok_s": max(aggregate), "decode_tok_s": max(decode)}


def memory_run(url: str, pid: int, requests: int) -> Dict[str, float]:
    """RSS of the server around ``requests`` sequential requests (after 50 warm-up requests)."""
    import httpx
    import psutil

    server = psutil.Process(pid)
    rng = np.random.default_rng(1)

    def request(i: int, client: Any) -> None:
        prompt = rng.integers(3, BENCH_SMALL["vocab_size"], int(rng.integers(4, 61))).tolist()
        body = {"model": "bench", "prompt": prompt, "max_tokens": 8, "ignore_eos": True, "stream": bool(i % 2)}
        r = client.post(url + "/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")

    with httpx.Client(timeout=600) as client:
        for i in range(50):
            request(i, client)
        before = server.memory_info().rss
        start = time.perf_counter()
        for i in range(requests):
            request(i, client)
        seconds = time.perf_counter() - start
        after = server.memory_info().rss
    return {"requests": requests, "rss_before_mb": before / MB, "rss_after_mb": after / MB,
            "rss_growth_mb": (after - before) / MB, "seconds": seconds}


@contextlib.contextmanager
def running_server(model_dir: str, max_batch: int, extra: Sequence[str] = ()) -> Iterator[Tuple[str, int]]:
    """``python -m nucleusx_jax.serve`` (with ``extra`` options) on a free port; yields its URL and process id
    once it answers."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen([sys.executable, "-m", "nucleusx_jax.serve", model_dir, "--port", str(port),
                               "--max-batch", str(max_batch), "--served-model-name", "bench", *extra], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        yield url, server.pid
    finally:
        server.terminate()
        server.wait(timeout=60)


def main(argv: Any = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per concurrency level")
    p.add_argument("--max-batch", type=int, help="the server's slots (default: one server per level with as "
                                                 "many slots as clients, the offline batch size)")
    p.add_argument("--memory-requests", type=int, default=0)
    p.add_argument("--output", default=RESULTS)
    args = p.parse_args(argv)

    results: Dict[str, Any] = {"config": BENCH_SMALL, "prompt": PROMPT, "new_tokens": args.new_tokens,
                               "cpu_count": os.cpu_count(), "command": " ".join(["python"] + sys.argv), "rows": []}
    with tempfile.TemporaryDirectory() as model_dir:
        make_model_dir(model_dir)
        for clients in args.clients:
            max_batch = args.max_batch or clients
            offline = run_batch(clients, [PROMPT], args.new_tokens, repeats=3)[0]["decode_tok_s"]  # just before
            with running_server(model_dir, max_batch) as (url, _):
                asyncio.run(round_of(url, clients, args.new_tokens, seed=0))  # warm-up (compiles the prefill)
                rounds = [asyncio.run(round_of(url, clients, args.new_tokens, seed=1 + i)) for i in range(args.rounds)]
            row = {"clients": clients, "max_batch": max_batch, **figures(rounds),
                   "offline_decode_tok_s": offline}
            row["decode_over_offline"] = row["decode_tok_s"] / row["offline_decode_tok_s"]
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            write_json(args.output, results)
        if args.memory_requests:
            with running_server(model_dir, args.max_batch or 32) as (url, pid):
                results["memory"] = memory_run(url, pid, args.memory_requests)
            print(json.dumps(results["memory"]), flush=True)
    write_json(args.output, results)
    print("clients  slots  TTFT p50 ms  TTFT p99 ms  aggregate tok/s  decode tok/s  offline tok/s  decode/offline")
    for r in results["rows"]:
        print(f"{r['clients']:7d}  {r['max_batch']:5d}  {r['ttft_p50_ms']:11.1f}  {r['ttft_p99_ms']:11.1f}  "
              f"{r['aggregate_tok_s']:15.1f}  {r['decode_tok_s']:12.1f}  {r['offline_decode_tok_s']:13.1f}  "
              f"{r['decode_over_offline']:14.2f}")
    if "memory" in results:
        m = results["memory"]
        print(f"{m['requests']} sequential requests: RSS {m['rss_before_mb']:.0f} -> {m['rss_after_mb']:.0f} MB "
              f"(growth {m['rss_growth_mb']:.1f} MB, target <= 50)")
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
