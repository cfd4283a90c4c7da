"""Evaluation: EleutherAI's lm-evaluation-harness (the ``eval`` extra): :class:`NucleusXLM`; and perplexity by
position (:mod:`nucleusx_jax.eval.positions`, no extra needed).

See :mod:`nucleusx_jax.eval.harness` for the model and :mod:`nucleusx_jax.eval.backend` for the compiled passes.
The harness's names load on first use, so that :mod:`~nucleusx_jax.eval.positions` runs without lm-eval.
"""

from typing import Any

__all__ = ["EvalOptions", "NucleusXLM", "evaluate_tasks"]


def __getattr__(name: str) -> Any:
    """``EvalOptions``, ``NucleusXLM`` and ``evaluate_tasks`` from :mod:`.harness` (importing it registers the
    ``nucleusx`` model with lm-eval)."""
    if name in __all__:
        from . import harness

        return getattr(harness, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
