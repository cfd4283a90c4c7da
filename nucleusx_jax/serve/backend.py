"""The model the server runs: its config, linen module and parameters, loaded by :func:`load_backend`.

The engine compiles :mod:`nucleusx_jax.runtime`'s passes on it: a slot's right-padded prompt ``[1, T]`` once
(:func:`~nucleusx_jax.runtime.prefill`, no LM head), then one token per slot ``[S]`` on the slots' states
(:meth:`Backend.decode`). The states carry one position per row (``seqlen`` ``[S]``), so slots at different
positions share one step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

from .. import runtime
from ..configuration import NucleusXConfig
from ..loading import load
from ..types import Array, Cache, Params


@dataclasses.dataclass(frozen=True)
class Backend:
    """A causal LM's module, parameters and config (``module`` is a linen ``NucleusXForCausalLMModule``)."""

    config: NucleusXConfig
    module: Any
    params: Params

    def decode(self, params: Params, tokens: Array, active: Array, cache: Cache) -> Tuple[Array, Cache]:
        """One recurrent step (:func:`nucleusx_jax.runtime.step`): tokens ``[S]``, active ``[S]`` bool (inactive
        rows keep their ``kv`` and ``scale``) -> logits ``[S, vocab]`` float32 and the new states."""
        return runtime.step(self.module, params, tokens, active, cache)


def load_backend(model_dir: str, *, dtype: Optional[str] = None) -> Backend:
    """The causal LM at ``model_dir`` (:func:`nucleusx_jax.loading.load`: local flax or PyTorch, ``gs://...``
    or a Hub id); ``dtype`` (float32, bfloat16, float16) is the computation dtype, default float32."""
    model = load(model_dir, dtype=dtype or "float32")
    return Backend(model.config, model.module, model.params)
