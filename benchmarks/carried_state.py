"""The cost of continuing a state: retention's chunkwise form (XLA) forward+backward, without a state
(:func:`nucleusx_jax.retention.chunkwise_retention`) against continuing one and handing the next on
(:func:`nucleusx_jax.retention.chunkwise_carry`, the gradient also to the incoming state).

``python benchmarks/carried_state.py [--length 2048] [--repeats 7]``: bench-small heads (H=4, K=128, V=256),
C = 256, batch 2, exact normalisation, float32, one device; both compiled once and timed alternately after a
warm-up call. Prints the fastest wall time of each (robust to other processes sharing the CPU) and the ratio.
"""

import argparse
import os
import sys
import time
from typing import Callable, Dict, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nucleusx_jax import retention as ret  # noqa: E402

BATCH, HEADS, KEY, VALUE, CHUNK = 2, 4, 128, 256, 256


def calls(length: int) -> Dict[str, Callable[[], object]]:
    """The two compiled forward+backward calls on random inputs of ``length`` tokens."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(BATCH, HEADS, length, d)), jnp.float32) for d in (KEY, KEY, VALUE))
    k = k * KEY**-0.5
    log_decay = jnp.asarray(ret.log_decay_table(HEADS, True))
    state = ret.chunkwise_carry(q, k, v, log_decay, CHUNK, None)[1]
    plain = jax.jit(jax.grad(lambda q, k, v: ret.chunkwise_retention(q, k, v, log_decay, CHUNK).sum(), (0, 1, 2)))

    def carried(q: jax.Array, k: jax.Array, v: jax.Array, kv: jax.Array) -> jax.Array:
        out, after = ret.chunkwise_carry(q, k, v, log_decay, CHUNK, state._replace(kv=kv))
        return out.sum() + after.kv.sum()

    carry = jax.jit(jax.grad(carried, (0, 1, 2, 3)))
    return {"no state": lambda: plain(q, k, v), "carried state": lambda: carry(q, k, v, state.kv)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    fns = calls(args.length)
    for fn in fns.values():
        jax.block_until_ready(fn())
    best = {name: float("inf") for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - start)
    for name, seconds in best.items():
        print(f"{name:>14}: {seconds * 1e3:8.1f} ms (fastest of {args.repeats}), T={args.length}")
    print(f"carried / none: {best['carried state'] / best['no state']:.3f}")


if __name__ == "__main__":
    main()
