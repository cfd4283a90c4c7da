"""The cost per step of carrying the retention state across windows (``train.carry_state``): the trainer's
compiled train step with and without it, on the same batch.

``python benchmarks/carry_step.py [--repeats 31] [--batch 16] [--length 128] [--chunk 64]``: configs/tiny.yaml's
model, chunkwise (XLA, exact normalisation), float32, one device, AdamW; windows of random tokens holding
EOS-ended documents of 1 to 400 tokens (``data.reset_at_document_boundaries``), every row continuing its state.
Both steps are compiled and warmed up, then timed alternately (a, b, a, b, ...) so both see the same state of a
shared machine. Prints the median and fastest wall time of each and the ratio of the medians.
"""

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from nucleusx_jax import sharding as shd  # noqa: E402
from nucleusx_jax.train.config import load_config  # noqa: E402
from nucleusx_jax.train.step import make_trainer  # noqa: E402

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")


def step_call(carry: bool, batch: int, length: int, chunk: int) -> Callable[[], Any]:
    """One call of the compiled train step (its state fed back) on a fixed batch; compiled at the first call."""
    cfg = load_config(TINY, [f"train.global_batch={batch}", f"data.seq_len={length}", "model.forward_mode=chunkwise",
                             f"model.recurrent_chunk_size={chunk}", "data.stream_rows=true",
                             f"train.carry_state={str(carry).lower()}", "mesh.data=1"])
    trainer = make_trainer(cfg, shd.make_mesh({"data": 1}, jax.devices()[:1]))
    state = [trainer.init_state()]
    vocab, eos = cfg.model_config().vocab_size, cfg.model_config().eos_token_id
    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, length + 1), 3, vocab)
    ends = jnp.cumsum(jax.random.randint(jax.random.PRNGKey(1), (batch, length), 1, 401), axis=1)
    is_end = jnp.zeros((batch, length + 1), bool).at[jnp.arange(batch)[:, None], ends].set(True, mode="drop")
    inputs = [jax.device_put(jnp.where(is_end, eos, tokens), trainer.batch_sharding)]
    if carry:
        inputs.append(jax.device_put(jnp.ones((batch,), bool), trainer.row_sharding))

    def call() -> Any:
        state[0], metrics = trainer.train_step(state[0], *inputs)
        return metrics

    return call


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=64)
    args = parser.parse_args(argv)
    calls: Dict[str, Callable[[], Any]] = {name: step_call(name == "carried state", args.batch, args.length,
                                                           args.chunk) for name in ("no state", "carried state")}
    for call in calls.values():  # compile, then one warm call
        jax.block_until_ready(call())
        jax.block_until_ready(call())
    times: Dict[str, list] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    for name, seconds in times.items():
        print(f"{name:>14}: median {statistics.median(seconds) * 1e3:7.2f} ms, fastest {min(seconds) * 1e3:7.2f} ms "
              f"({args.repeats} steps of {args.batch} x {args.length} tokens, chunk {args.chunk})")
    ratio = statistics.median(times["carried state"]) / statistics.median(times["no state"])
    print(f"carried / none (medians): {ratio:.3f}")


if __name__ == "__main__":
    main()
