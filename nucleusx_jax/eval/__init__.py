"""Evaluation with EleutherAI's lm-evaluation-harness (the ``eval`` extra): :class:`NucleusXLM`.

See :mod:`nucleusx_jax.eval.harness` for the model and :mod:`nucleusx_jax.eval.backend` for the compiled passes.
"""

from .harness import EvalOptions, NucleusXLM, evaluate_tasks

__all__ = ["EvalOptions", "NucleusXLM", "evaluate_tasks"]
