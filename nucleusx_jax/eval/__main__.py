"""CLI: the harness's own ``lm_eval`` command line with the ``nucleusx`` model registered and the default.

``python -m nucleusx_jax.eval --model_args pretrained=DIR,batch_size=8 --tasks hellaswag [lm_eval options]``
"""

from typing import Optional, Sequence

from lm_eval.__main__ import cli_evaluate, setup_parser

from . import harness
from ..cli import reports_user_errors


@reports_user_errors
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` with lm-eval's parser (``--model`` defaults to ``nucleusx``) and run its evaluation."""
    parser = setup_parser()
    parser.prog = "python -m nucleusx_jax.eval"
    parser.set_defaults(model=harness.MODEL_NAME)
    cli_evaluate(parser.parse_args(argv))


if __name__ == "__main__":
    main()
