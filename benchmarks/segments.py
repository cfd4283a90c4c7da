"""The cost of document resets in the train step, robust to other processes sharing the CPU.

``python benchmarks/segments.py [--repeats N]``: the trainer's chunkwise train step (bench-small model, C = 256,
one device, :func:`benchmarks.run.train_step_call`) at 4 x 512 and 1 x 8192, without and with
``data.reset_at_document_boundaries``, timed alternately (off, on, off, on, ...) after one warm-up call each.
Prints the median process CPU time per step (user + system of all threads: what the step costs, whatever else
runs) and the median wall time, and their ratios on / off. ``python -m benchmarks`` gives the same rows as wall
times paired with a matmul.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.run import BENCH_SMALL, train_step_call  # noqa: E402  (sets XLA_FLAGS before jax starts)

import jax  # noqa: E402

from nucleusx_jax.configuration import NucleusXConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed calls per setting and shape")
    args = p.parse_args()
    config = NucleusXConfig(**BENCH_SMALL)
    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for batch, length in ((4, 512), (1, 8192)):
        calls = {reset: train_step_call(config, batch, length, 256, reset)[0] for reset in (False, True)}
        cpu = {reset: [] for reset in calls}
        wall = {reset: [] for reset in calls}
        for call in calls.values():
            jax.block_until_ready(call())
        for _ in range(args.repeats):
            for reset, call in calls.items():
                c, w = time.process_time(), time.perf_counter()
                jax.block_until_ready(call())
                cpu[reset].append(time.process_time() - c)
                wall[reset].append(time.perf_counter() - w)
        c = {r: statistics.median(v) for r, v in cpu.items()}
        w = {r: statistics.median(v) for r, v in wall.items()}
        print(f"train step chunkwise {batch}x{length}: CPU s/step off {c[False]:.2f} on {c[True]:.2f} "
              f"(x{c[True] / c[False]:.3f}); wall s/step off {w[False]:.2f} on {w[True]:.2f} "
              f"(x{w[True] / w[False]:.3f})", flush=True)


if __name__ == "__main__":
    main()
