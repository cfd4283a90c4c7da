"""The cost of ``chunkwise_normalization="exact"`` against ``"reference"``, robust to other processes sharing the CPU.

``python benchmarks/normalization.py [--lengths 2048,8192] [--repeats N]``: on the bench-small model, chunkwise
(C = 256), batch 1, one device, without segment ids (where the option matters), three calls per length, each
compiled once per normalisation and timed alternately (exact, reference, exact, ...) after a warm-up call:

* ``forward``: the logits of every position;
* ``train step``: the trainer's compiled train step (:func:`benchmarks.run.train_step_call`, no document resets);
* ``prefill``: what generation and evaluation run on a prompt: the state of every layer and the last position's
  logits.

Prints the median process CPU time per call (user + system of all threads: what the call costs, whatever else
runs), the median wall time, and their ratios exact / reference.
"""

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.run import BENCH_SMALL, train_step_call  # noqa: E402  (sets XLA_FLAGS before jax starts)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from nucleusx_jax.configuration import NucleusXConfig  # noqa: E402
from nucleusx_jax.modeling import NucleusXForCausalLMModule, RunOptions  # noqa: E402

CHUNK = 256
NORMS = ("exact", "reference")


def model_calls(config: NucleusXConfig, length: int) -> Dict[str, Callable[[], Any]]:
    """The ``forward`` and ``prefill`` calls of ``config`` on one row of ``length`` tokens."""
    module = NucleusXForCausalLMModule(config)
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    ids = jax.random.randint(jax.random.PRNGKey(length), (1, length), 0, config.vocab_size)
    forward_options = RunOptions.from_config(config, mode="chunkwise", chunk_size=CHUNK)
    prefill_options = RunOptions.from_config(config, mode="chunkwise", chunk_size=CHUNK, return_state=True)

    @jax.jit
    def forward(p: Any, ids: jax.Array) -> jax.Array:
        return module.apply({"params": p}, ids, options=forward_options)[0]

    @jax.jit
    def prefill(p: Any, ids: jax.Array) -> Any:
        def run(m: Any) -> Any:
            x, cache, _ = m.model(ids, options=prefill_options)
            return m.lm_logits(x[:, -1]), cache

        return module.apply({"params": p}, method=run)

    return {"forward": lambda: forward(params, ids), "prefill": lambda: prefill(params, ids)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="2048,8192", help="comma-separated T")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per normalisation and row")
    args = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for length in (int(x) for x in args.lengths.split(",")):
        configs = {n: NucleusXConfig(**BENCH_SMALL, chunkwise_normalization=n) for n in NORMS}
        rows: Dict[str, Dict[str, Callable[[], Any]]] = {"forward": {}, "train step": {}, "prefill": {}}
        for norm, config in configs.items():
            calls = model_calls(config, length)
            rows["forward"][norm], rows["prefill"][norm] = calls["forward"], calls["prefill"]
            rows["train step"][norm] = train_step_call(config, 1, length, CHUNK, False)[0]
        for name, calls in rows.items():
            cpu = {n: [] for n in NORMS}
            wall = {n: [] for n in NORMS}
            for call in calls.values():
                jax.block_until_ready(call())
            for _ in range(args.repeats):
                for norm, call in calls.items():
                    c, w = time.process_time(), time.perf_counter()
                    jax.block_until_ready(call())
                    cpu[norm].append(time.process_time() - c)
                    wall[norm].append(time.perf_counter() - w)
            c = {n: statistics.median(v) for n, v in cpu.items()}
            w = {n: statistics.median(v) for n, v in wall.items()}
            print(f"{name} 1x{length}: CPU s exact {c['exact']:.3f} reference {c['reference']:.3f} "
                  f"(x{c['exact'] / c['reference']:.3f}); wall s exact {w['exact']:.3f} reference "
                  f"{w['reference']:.3f} (x{w['exact'] / w['reference']:.3f})", flush=True)


if __name__ == "__main__":
    main()
