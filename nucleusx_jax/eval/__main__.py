"""CLI: the harness's own ``lm_eval run`` command line with the ``nucleusx`` model registered and the default.

``python -m nucleusx_jax.eval --model_args pretrained=DIR,batch_size=8 --tasks hellaswag [lm_eval options]``

Needs lm-eval >= 0.4.10, whose command line has subcommands (the evaluation is ``run``); 0.4.9 and older had
``setup_parser`` and could not read task YAMLs outside the package.
"""

import argparse
from typing import Optional, Sequence

from lm_eval._cli.run import Run

from . import harness
from ..cli import reports_user_errors

PROG = "python -m nucleusx_jax.eval"


def run_parser() -> argparse.ArgumentParser:
    """lm-eval's parser of its ``run`` subcommand; parsed arguments run with ``args.func(args)``."""
    subcommands = argparse.ArgumentParser().add_subparsers()
    Run.create(subcommands)
    parser = subcommands.choices["run"]
    parser.prog = PROG
    parser.usage = f"{PROG} --model_args pretrained=DIR[,option=value...] --tasks TASK [lm_eval options]"
    parser.set_defaults(model=harness.MODEL_NAME, device=harness.JAX_DEVICE)
    return parser


@reports_user_errors
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` with lm-eval's parser (``--model`` defaults to ``nucleusx``) and run its evaluation."""
    args = run_parser().parse_args(argv)
    if args.device != harness.JAX_DEVICE:
        raise ValueError(f"--device {args.device} is not supported: leave it out; JAX runs on its default backend "
                         "(choose it with JAX_PLATFORMS=cpu|gpu|tpu)")
    args.func(args)


if __name__ == "__main__":
    main()
