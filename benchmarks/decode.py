"""Decode benchmark: prefill and decode throughput, memory, and the machine's weight-reading ceiling.

    python benchmarks/decode.py                      # batches 1 and 8 x prompts 16 and 4096
    python benchmarks/decode.py --batches 1 --prompts 16 4096 --new-tokens 256

bench-small config (vocab 32000, embed 512, value 1024, heads 4, ffn 1024, 4 layers, chunk 256), random
weights, float32 on the CPU. Each batch size runs in its own process, over every prompt length:

* **prefill**: the prompt once (parallel, or chunkwise when P > 4 x chunk) -> prefill tokens/s = B*P / time,
  and the peak RSS sampled while it runs (the prompt's activations);
* **decode**: ``new_tokens`` tokens from the compiled ``lax.while_loop`` (EOS disabled) -> decode tokens/s =
  B * (new_tokens - 1) model steps / time (the first new token comes from the prefill logits); best of
  ``--repeats`` runs. The states of all prompt lengths have the same shapes, so one compiled loop decodes
  them all, and its runs alternate between the prompts: other load on the machine falls on each alike. The
  median run-by-run ratio to the first prompt is the constant-time-per-token figure;
* **memory**: the largest RSS growth while decoding (sampled every 2 ms) and the exact size of the state;
* **ceiling** (batch 1 only): the time of one batch-1 pass of matrix-vector products over the real weight
  matrices (every projection and the LM head), in a compiled loop like the decode loop; 1 / that time is the
  tokens/s that reading the weights alone allows. A ceiling run follows each round of decode runs; printed:
  best decode over best ceiling, and the median paired ratio.

Compilation is done ahead of time (``.lower().compile()``) and reported apart. Results are printed and
written to ``benchmarks/results/decode.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runs from a checkout without an install, as its own child processes do
RESULTS = os.path.join(ROOT, "benchmarks", "results", "decode.json")
BENCH_SMALL = dict(vocab_size=32000, decoder_embed_dim=512, decoder_value_embed_dim=1024, decoder_retention_heads=4,
                   decoder_ffn_embed_dim=1024, decoder_layers=4, recurrent_chunk_size=256)
MB = 2.0**20


class RSSSampler:
    """Largest resident set size seen by a background thread (every ``interval`` s) between start and stop."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "RSSSampler":
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def weight_kernels(params: Any) -> List[Any]:
    """Every dense kernel ``[in, out]`` of the model: the retention and GLU projections and the LM head."""
    from flax.traverse_util import flatten_dict

    return [w for path, w in sorted(flatten_dict(params).items()) if path[-1] == "kernel"]


def ceiling_pass(params: Any, passes: int) -> Any:
    """A compiled function running ``passes`` batch-1 passes of matrix-vector products over every projection
    and the LM head (call it with no arguments; it blocks until done).

    Each pass follows the model's data flow with nothing but the products: per layer ``q, k, v, g`` from the
    layer input, ``out_proj`` on ``v + g``, then ``gate`` and ``fc1`` from the result and ``fc2`` on their sum;
    the LM head last, with a scalar of the logits fed back so no pass can be hoisted out of the ``fori_loop``.
    """
    import jax
    import jax.numpy as jnp

    kernels = {"layers": [{name: w["kernel"] for part in ("retention", "ffn") for name, w in layer[part].items()}
                          for _, layer in sorted(params["model"].items()) if _.startswith("layers_")],
               "lm_head": params["lm_head"]["kernel"]}

    def run(kernels: Dict[str, Any], x: Any) -> Any:
        def one_pass(_: Any, x: Any) -> Any:
            for w in kernels["layers"]:
                qk = x @ w["q_proj"] + x @ w["k_proj"]
                x = x + 1e-3 * ((x @ w["v_proj"] + x @ w["g_proj"]) @ w["out_proj"] + qk)
                x = x + 1e-3 * ((x @ w["gate"] + x @ w["fc1"]) @ w["fc2"])
            x = x * jax.lax.rsqrt(jnp.mean(x * x) + 1e-6)  # keep the values ordinary (no denormals)
            return x + 1e-30 * jnp.sum(x @ kernels["lm_head"])

        return jax.lax.fori_loop(0, passes, one_pass, x)

    x = jnp.full((1, params["lm_head"]["kernel"].shape[0]), 0.01, jnp.float32)
    fn = jax.jit(run).lower(kernels, x).compile()
    return lambda: fn(kernels, x).block_until_ready()


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_batch(batch: int, prompts: List[int], new_tokens: int, repeats: int = 5, seed: int = 0) -> List[Dict[str, Any]]:
    """Every prompt length at one batch size, in this process; returns one dict of figures per prompt.

    The states that the prompts leave have the same shapes, so one compiled decode loop serves them all; its
    timed runs alternate between the prompts (and, at batch 1, the ceiling), so load from other processes
    falls on all of them alike.
    """
    import jax
    import jax.numpy as jnp

    from nucleusx_jax import NucleusX, NucleusXConfig
    from nucleusx_jax import decode as gen
    from nucleusx_jax.runtime import prompt_form

    config = NucleusXConfig(**BENCH_SMALL)
    model = NucleusX(config, seed=seed)
    params = model.params
    options = gen.DecodeOptions(pad_token_id=0)  # no EOS: every row decodes all new_tokens
    fns = gen.compiled(model)
    key = jax.random.PRNGKey(seed)
    results, states = [], []
    for prompt in prompts:
        ids = jnp.asarray(np.random.default_rng(seed).integers(3, config.vocab_size, (batch, prompt)), jnp.int32)
        mode, chunk_size = prompt_form(config, prompt)
        start = time.perf_counter()
        prefill = fns.prefill.lower(params, ids, None, None, key, mode=mode, chunk_size=chunk_size,
                                   options=options).compile()
        compile_s = time.perf_counter() - start
        with RSSSampler() as rss:
            rss_before = rss.peak
            start = time.perf_counter()
            states.append(jax.block_until_ready(prefill(params, ids, None, None, key)))
            prefill_s = time.perf_counter() - start
        results.append({
            "batch": batch, "prompt": prompt, "new_tokens": new_tokens, "prompt_mode": mode,
            "prefill_s": prefill_s, "prefill_tok_s": batch * prompt / prefill_s, "prefill_compile_s": compile_s,
            "rss_before_prefill_mb": rss_before / MB, "prefill_peak_rss_mb": rss.peak / MB,
            "state_mb": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(states[-1].cache)) / MB,
            "decode_runs_s": [], "decode_rss_growth_mb": 0.0,
        })
        del prefill, ids

    start = time.perf_counter()
    loop = fns.loop.lower(params, states[0], steps=new_tokens, options=options, output_logits=False).compile()
    loop_compile = time.perf_counter() - start
    ceiling = ceiling_pass(params, new_tokens - 1) if batch == 1 else None
    loop(params, jax.tree.map(jnp.copy, states[0]))[0].block_until_ready()  # warm-up runs, not timed
    if ceiling is not None:
        ceiling()
    ceilings = []
    for _ in range(repeats):
        for state, result in zip(states, results):
            fresh = jax.tree.map(jnp.copy, state)  # the loop donates its state
            jax.block_until_ready(fresh)
            with RSSSampler() as rss:
                rss_before = rss.peak
                start = time.perf_counter()
                tokens, _, _ = loop(params, fresh)
                tokens.block_until_ready()
                result["decode_runs_s"].append(time.perf_counter() - start)
            assert tokens.shape == (batch, new_tokens)
            result["decode_rss_growth_mb"] = max(result["decode_rss_growth_mb"], (rss.peak - rss_before) / MB)
        if ceiling is not None:
            ceilings.append(_timed(ceiling))

    first = results[0]["decode_runs_s"]
    for result in results:
        runs = result["decode_runs_s"]
        result.update({
            "decode_s": min(runs), "decode_tok_s": batch * (new_tokens - 1) / min(runs),
            "decode_step_ms": 1e3 * min(runs) / (new_tokens - 1), "loop_compile_s": loop_compile,
            # decode tok/s relative to the first prompt's, run by run (median)
            "decode_vs_first_prompt": float(np.median([f / r for f, r in zip(first, runs)])),
            "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
        })
        if ceiling is not None:
            result["ceiling_tok_s"] = (new_tokens - 1) / min(ceilings)
            result["weights_mb"] = sum(w.size * w.dtype.itemsize for w in weight_kernels(params)) / MB
            result["decode_over_ceiling"] = result["decode_tok_s"] / result["ceiling_tok_s"]
            result["median_paired_ratio"] = float(np.median([c / r for c, r in zip(ceilings, runs)]))
    return results


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as JSON to a temporary file next to ``path``, then rename it into place."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def report(results: List[Dict[str, Any]]) -> str:
    """The results as a table, then the three targets checked."""
    lines = ["batch prompt mode       prefill tok/s  decode tok/s  step ms  prefill peak RSS MB  decode growth MB  "
             "state MB  ceiling tok/s  decode/ceiling"]
    for r in results:
        ceiling = f"{r['ceiling_tok_s']:13.1f}  {r['decode_over_ceiling']:14.2f}" if "ceiling_tok_s" in r else ""
        lines.append(f"{r['batch']:5d} {r['prompt']:6d} {r['prompt_mode']:10s} {r['prefill_tok_s']:13.1f}  "
                     f"{r['decode_tok_s']:12.1f}  {r['decode_step_ms']:7.2f}  {r['prefill_peak_rss_mb']:19.0f}  "
                     f"{r['decode_rss_growth_mb']:16.1f}  {r['state_mb']:8.2f}  {ceiling}")
    first = {}
    for r in results:
        if first.setdefault(r["batch"], r["prompt"]) != r["prompt"]:
            lines.append(f"batch {r['batch']}, prompt {r['prompt']}: decode tok/s over the first prompt's, median of "
                         f"the alternating runs = {r['decode_vs_first_prompt']:.3f} (target >= 0.90); decode RSS "
                         f"growth {r['decode_rss_growth_mb']:.1f} MB, state {r['state_mb']:.2f} MB")
        if "ceiling_tok_s" in r:
            lines.append(f"batch 1, prompt {r['prompt']}: decode {r['decode_tok_s']:.1f} tok/s, ceiling "
                         f"{r['ceiling_tok_s']:.1f} tok/s ({r['weights_mb']:.0f} MB of weights), "
                         f"median paired ratio {r['median_paired_ratio']:.2f} (target >= 0.75; best over best "
                         f"{r['decode_over_ceiling']:.2f})")
    return "\n".join(lines)


def main(argv: Any = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompts", type=int, nargs="+", default=[16, 4096])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="timed decode runs per prompt (the best is reported)")
    p.add_argument("--output", default=RESULTS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)  # child process: one batch size
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        raise SystemExit(f"--new-tokens must be >= 2 (one from the prefill, at least one decode step), "
                         f"got {args.new_tokens}")
    if args.batch is not None:  # JSON on the last stdout line
        print(json.dumps(run_batch(args.batch, args.prompts, args.new_tokens, args.repeats)))
        return []
    results = []
    for batch in args.batches:
        print(f"batch {batch}, prompts {args.prompts} ...", flush=True)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--batch", str(batch), "--prompts",
                              *map(str, args.prompts), "--new-tokens", str(args.new_tokens), "--repeats",
                              str(args.repeats)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"batch {batch} failed:\n{out.stderr[-4000:]}")
        results.extend(json.loads(out.stdout.strip().splitlines()[-1]))
    import jax

    write_json(args.output, {"config": BENCH_SMALL, "dtype": "float32", "backend": jax.default_backend(),
                             "cpu_count": os.cpu_count(), "command": " ".join(["python"] + sys.argv),
                             "results": results})
    print(report(results))
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
