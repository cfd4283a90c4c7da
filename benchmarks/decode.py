"""Decode benchmark: prefill and decode throughput, memory, and the machine's weight-reading ceiling.

    python benchmarks/decode.py                      # all four cases, each in a fresh process
    python benchmarks/decode.py --batches 1 --prompts 16 4096 --new-tokens 256

bench-small config (vocab 32000, embed 512, value 1024, heads 4, ffn 1024, 4 layers, chunk 256), random
weights, float32 on the CPU. Each case (batch B, prompt P) runs in its own process:

* **prefill**: the prompt once (parallel, or chunkwise when P > 4 x chunk) -> prefill tokens/s = B*P / time;
* **decode**: ``new_tokens`` tokens from the compiled ``lax.while_loop`` (EOS disabled) -> decode tokens/s =
  B * (new_tokens - 1) model steps / time (the first new token comes from the prefill logits); best of
  ``--repeats`` runs;
* **memory**: peak RSS of the process, the RSS just before decoding, and the largest RSS growth while
  decoding (sampled every 2 ms), plus the exact size of the recurrent state;
* **ceiling** (batch 1 only): the time of one batch-1 pass of matrix-vector products over the real weight
  matrices (every projection and the LM head), in a compiled loop like the decode loop; 1 / that time is the
  tokens/s that reading the weights alone allows. Each decode run is paired with a ceiling run (other load
  on the machine slows both alike); printed: best decode over best ceiling, and the median paired ratio.

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

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "decode.json")
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
    """A compiled function timing ``passes`` batch-1 passes of matrix-vector products over
    ``weight_kernels(params)`` (call it with no arguments; it blocks until done).

    The passes run in one ``fori_loop`` (like the decode loop); each multiplies a carried vector (so nothing is
    hoisted out of the loop) by every kernel and feeds a scalar of the results back into the carry.
    """
    import jax
    import jax.numpy as jnp

    kernels = weight_kernels(params)

    def run(kernels: List[Any], v: Any) -> Any:
        def one_pass(_: Any, v: Any) -> Any:
            total = sum(jnp.sum(v[:, : w.shape[0]] @ w) for w in kernels)
            return v * (1.0 + 1e-30 * total)

        return jax.lax.fori_loop(0, passes, one_pass, v)

    v = jnp.full((1, max(w.shape[0] for w in kernels)), 0.01, jnp.float32)
    fn = jax.jit(run).lower(kernels, v).compile()
    return lambda: fn(kernels, v).block_until_ready()


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(batch: int, prompt: int, new_tokens: int, repeats: int = 3, seed: int = 0) -> Dict[str, Any]:
    """One (batch, prompt) case in this process; returns its figures."""
    import jax
    import jax.numpy as jnp

    from nucleusx_jax import FlaxNucleusXForCausalLM, NucleusXConfig
    from nucleusx_jax import generate as gen
    from nucleusx_jax.hf import prompt_forward_mode

    config = NucleusXConfig(**BENCH_SMALL)
    model = FlaxNucleusXForCausalLM(config, seed=seed)
    params = model.params
    ids = jnp.asarray(np.random.default_rng(seed).integers(3, config.vocab_size, (batch, prompt)), jnp.int32)
    options = gen.DecodeOptions(pad_token_id=0)  # no EOS: every row decodes all new_tokens
    mode, chunk = prompt_forward_mode(config, prompt)
    fns = gen.compiled(model)
    key = jax.random.PRNGKey(seed)

    start = time.perf_counter()
    prefill = fns.prefill.lower(params, ids, None, key, mode=mode, chunk=chunk, options=options).compile()
    prefill_compile = time.perf_counter() - start
    with RSSSampler() as prefill_rss:
        rss_start = prefill_rss.peak
        start = time.perf_counter()
        state = jax.block_until_ready(prefill(params, ids, None, key))
        prefill_s = time.perf_counter() - start

    start = time.perf_counter()
    loop = fns.loop.lower(params, state, steps=new_tokens, options=options, output_logits=False).compile()
    loop_compile = time.perf_counter() - start
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.cache))
    ceiling = ceiling_pass(params, new_tokens - 1) if batch == 1 else None
    runs, ceilings = [], []
    for _ in range(repeats):  # decode runs, each paired with a ceiling run: contention hits both alike
        fresh = jax.tree.map(jnp.copy, state)  # the loop donates its state
        jax.block_until_ready(fresh)
        with RSSSampler() as decode_rss:
            rss_before = decode_rss.peak
            start = time.perf_counter()
            tokens, _, _ = loop(params, fresh)
            tokens.block_until_ready()
            runs.append((time.perf_counter() - start, decode_rss.peak - rss_before, rss_before))
        if ceiling is not None:
            ceilings.append(_timed(ceiling))
    decode_s = min(r[0] for r in runs)
    decode_growth, rss_before_decode = max(r[1] for r in runs), runs[0][2]
    assert tokens.shape == (batch, new_tokens)
    result = {
        "batch": batch, "prompt": prompt, "new_tokens": new_tokens, "prompt_mode": mode,
        "prefill_s": prefill_s, "prefill_tok_s": batch * prompt / prefill_s,
        "decode_s": decode_s, "decode_tok_s": batch * (new_tokens - 1) / decode_s,
        "decode_step_ms": 1e3 * decode_s / (new_tokens - 1),
        "prefill_compile_s": prefill_compile, "loop_compile_s": loop_compile,
        "rss_before_prefill_mb": rss_start / MB, "prefill_peak_rss_mb": prefill_rss.peak / MB,
        "rss_before_decode_mb": rss_before_decode / MB, "decode_rss_growth_mb": decode_growth / MB,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
        "state_mb": state_bytes / MB,
    }
    if ceiling is not None:
        result["ceiling_tok_s"] = (new_tokens - 1) / min(ceilings)
        result["weights_mb"] = sum(w.size * w.dtype.itemsize for w in weight_kernels(params)) / MB
        result["decode_over_ceiling"] = result["decode_tok_s"] / result["ceiling_tok_s"]
        result["paired_ratios"] = [c / r[0] for c, r in zip(ceilings, runs)]  # decode tok/s over ceiling, per pair
        result["median_paired_ratio"] = float(np.median(result["paired_ratios"]))
    return result


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as JSON to a temporary file next to ``path``, then rename it into place."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def report(results: List[Dict[str, Any]]) -> str:
    """The results as a table, then the three targets checked."""
    lines = ["batch prompt mode       prefill tok/s  decode tok/s  step ms  peak RSS MB  decode growth MB  "
             "state MB  ceiling tok/s  decode/ceiling"]
    for r in results:
        ceiling = f"{r['ceiling_tok_s']:13.1f}  {r['decode_over_ceiling']:14.2f}" if "ceiling_tok_s" in r else ""
        lines.append(f"{r['batch']:5d} {r['prompt']:6d} {r['prompt_mode']:10s} {r['prefill_tok_s']:13.1f}  "
                     f"{r['decode_tok_s']:12.1f}  {r['decode_step_ms']:7.2f}  {r['peak_rss_mb']:11.0f}  "
                     f"{r['decode_rss_growth_mb']:16.1f}  {r['state_mb']:8.2f}  {ceiling}")
    by = {(r["batch"], r["prompt"]): r for r in results}
    for b in sorted({r["batch"] for r in results}):
        prompts = sorted(p for (bb, p) in by if bb == b)
        if len(prompts) > 1:
            short, long = by[(b, prompts[0])], by[(b, prompts[-1])]
            lines.append(f"batch {b}: decode tok/s at prompt {prompts[-1]} / prompt {prompts[0]} = "
                         f"{long['decode_tok_s'] / short['decode_tok_s']:.3f} (target >= 0.90); decode RSS growth "
                         f"{long['decode_rss_growth_mb']:.1f} vs {short['decode_rss_growth_mb']:.1f} MB, state "
                         f"{long['state_mb']:.2f} vs {short['state_mb']:.2f} MB")
    for r in results:
        if "ceiling_tok_s" in r:
            lines.append(f"batch 1, prompt {r['prompt']}: decode {r['decode_tok_s']:.1f} tok/s, ceiling "
                         f"{r['ceiling_tok_s']:.1f} tok/s ({r['weights_mb']:.0f} MB of weights), "
                         f"ratio {r['decode_over_ceiling']:.2f} (median of the paired runs "
                         f"{r['median_paired_ratio']:.2f}; target >= 0.75)")
    return "\n".join(lines)


def main(argv: Any = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompts", type=int, nargs="+", default=[16, 4096])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed decode runs per case (the best is reported)")
    p.add_argument("--output", default=RESULTS)
    p.add_argument("--case", type=int, nargs=2, metavar=("BATCH", "PROMPT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        raise SystemExit(f"--new-tokens must be >= 2 (one from the prefill, at least one decode step), "
                         f"got {args.new_tokens}")
    if args.case:  # child process: one case, JSON on the last stdout line
        print(json.dumps(run_case(args.case[0], args.case[1], args.new_tokens, args.repeats)))
        return []
    results = []
    for batch in args.batches:
        for prompt in args.prompts:
            print(f"case batch={batch} prompt={prompt} ...", flush=True)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", str(batch), str(prompt),
                                  "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"case batch={batch} prompt={prompt} failed:\n{out.stderr[-4000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import jax

    write_json(args.output, {"config": BENCH_SMALL, "dtype": "float32", "backend": jax.default_backend(),
                             "cpu_count": os.cpu_count(), "command": " ".join(["python"] + sys.argv),
                             "results": results})
    print(report(results))
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
