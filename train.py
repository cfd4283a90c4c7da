"""Pretrain NucleusX: ``python train.py --config configs/tiny.yaml [--set section.key=value ...]``.

``--compile-only --topology v5p-128`` compiles the steps for a TPU slice on any host instead (docs/tpu.md).

Multi-host: on a TPU slice run the same command on every host (``jax.distributed`` is auto-detected); on a
GPU cluster add ``--coordinator HOST:PORT --num-processes N --process-id I`` on each process.
"""

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from nucleusx_jax.cli import reports_user_errors


@reports_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the flags, start ``jax.distributed`` if needed, run; returns 0. A bad config or option exits with
    status 2, a non-finite loss (or, with --compile-only, a run that does not fit) with 3, another run holding the run directory with 4 (one line on stderr)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML (sections model, data, optimizer, schedule, "
                                                   "train, mesh, checkpoint, logging), e.g. configs/tiny.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (YAML syntax), e.g. --set train.steps=10; repeatable")
    p.add_argument("--coordinator", help="jax.distributed coordinator HOST:PORT (process 0's address)")
    p.add_argument("--num-processes", type=int, help="number of processes in the job")
    p.add_argument("--process-id", type=int, help="this process's index in [0, num_processes)")
    p.add_argument("--compile-only", action="store_true",
                   help="compile the train and eval steps for --topology with the TPU compiler and report the\n"
                        "memory per chip; nothing runs (exit status 3 when it does not fit)")
    p.add_argument("--topology", help="TPU slice for --compile-only, e.g. v4-32, v5p-128, v5e-256, v6e-8;\n"
                   "or a GPU machine: h100x8, h100x1 (needs the [gpu] extra)")
    p.add_argument("--slices", type=int, default=1, help="--compile-only: slices joined over DCN (default 1)")
    p.add_argument("--report", help="--compile-only: also write the report as JSON to this path")
    p.add_argument("--fit", action="store_true", help="--compile-only: first find the fewest microbatches\n"
                   "(train.grad_accum, same global batch) that fit the chips' HBM, and report with them")
    p.add_argument("--serve", action="store_true", help="--compile-only: compile the server's batched decode step\n"
                   "and its longest prefill for a one-chip --topology (e.g. v5p-2) instead of training")
    p.add_argument("--max-batch", type=int, help="--serve: slots decoded together (default: the server's)")
    p.add_argument("--max-prompt-tokens", type=int, help="--serve: the longest prompt (default: the server's)")
    p.add_argument("--steps-per-call", type=int, help="--serve: decode steps per compiled call (default: the server's)")
    p.add_argument("--dtype", help="--serve: computation and weight dtype (default: the server's, float32)")
    args = p.parse_args(argv)
    if args.fit and not args.compile_only:
        raise ValueError("--fit goes with --compile-only --topology NAME")
    serving = {"max_batch": args.max_batch, "max_prompt_tokens": args.max_prompt_tokens,
               "steps_per_call": args.steps_per_call}
    if not args.serve and (args.dtype is not None or any(v is not None for v in serving.values())):
        raise ValueError("--max-batch, --max-prompt-tokens, --steps-per-call and --dtype go with --serve")
    if args.serve and (not args.compile_only or args.fit or args.slices != 1):
        raise ValueError("--serve goes with --compile-only --topology NAME, one slice and no --fit")
    if args.compile_only != (args.topology is not None):
        raise ValueError("--compile-only and --topology go together (--topology names the TPU slice to compile for)")
    if args.compile_only:  # before jax starts: no TPU backend on this host, libtpu only compiles
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for chatty in ("absl", "matplotlib"):  # orbax logs every save step at INFO through absl
        logging.getLogger(chatty).setLevel(logging.WARNING)

    from nucleusx_jax.train.config import load_config
    from nucleusx_jax.train.loop import init_distributed, run

    cfg = load_config(args.config, args.overrides)
    if args.serve:
        from nucleusx_jax.train import compile_serve

        compile_serve.run(cfg.model_config(), args.topology, args.dtype, args.report,
                          **{k: v for k, v in serving.items() if v is not None})
        return 0
    if args.compile_only:
        from nucleusx_jax.train import compile_only

        compile_only.run(cfg, args.topology, args.slices, args.report, args.fit)
        return 0
    init_distributed(args.coordinator, args.num_processes, args.process_id)
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
