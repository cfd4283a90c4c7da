"""Pretrain NucleusX: ``python train.py --config configs/tiny.yaml [--set section.key=value ...]``.

Multi-host: on a TPU slice run the same command on every host (``jax.distributed`` is auto-detected); on a
GPU cluster add ``--coordinator HOST:PORT --num-processes N --process-id I`` on each process.
"""

import argparse
import logging
import sys
from typing import Optional, Sequence

from nucleusx_jax.cli import reports_user_errors


@reports_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the flags, start ``jax.distributed`` if needed, run; returns 0. A bad config or option exits with
    status 2, a non-finite loss with 3, another run holding the run directory with 4 (one line on stderr)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML (sections model, data, optimizer, schedule, "
                                                   "train, mesh, checkpoint, logging), e.g. configs/tiny.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (YAML syntax), e.g. --set train.steps=10; repeatable")
    p.add_argument("--coordinator", help="jax.distributed coordinator HOST:PORT (process 0's address)")
    p.add_argument("--num-processes", type=int, help="number of processes in the job")
    p.add_argument("--process-id", type=int, help="this process's index in [0, num_processes)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for chatty in ("absl", "matplotlib"):  # orbax logs every save step at INFO through absl
        logging.getLogger(chatty).setLevel(logging.WARNING)

    from nucleusx_jax.train.config import load_config
    from nucleusx_jax.train.loop import init_distributed, run

    cfg = load_config(args.config, args.overrides)
    init_distributed(args.coordinator, args.num_processes, args.process_id)
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
