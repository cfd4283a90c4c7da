"""The one place where serving touches the model: loading it, and its two raw forward calls.

Everything else in :mod:`nucleusx_jax.serve` sees a :class:`Backend`: the config, the parameters, and two pure
functions to be compiled by the engine:

* :meth:`Backend.prefill`: a right-padded prompt ``[1, T]`` -> the recurrent state after its real tokens;
* :meth:`Backend.decode`: one token per slot ``[S]`` on the slots' states -> logits ``[S, vocab]`` float32 and
  the new states. The states carry one position per row (``seqlen`` ``[S]``), so slots at different positions
  share one step.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from .. import retention
from ..configuration import ForwardMode, NucleusXConfig
from ..inputs import prompt_forward_mode
from ..model import compute_dtype, from_pretrained
from ..modeling import RunOptions, empty_cache

Array = jax.Array
Cache = Tuple[retention.RetentionState, ...]


@dataclasses.dataclass(frozen=True)
class Backend:
    """A causal LM's module, parameters and config (``module`` is a linen ``NucleusXForCausalLMModule``)."""

    config: NucleusXConfig
    module: Any
    params: Any

    def prompt_form(self, length: int) -> Tuple[str, int]:
        """``(forward_mode, chunk_size)`` of a prompt of ``length`` tokens: generation's choice (parallel, or
        chunkwise for long prompts)."""
        return prompt_forward_mode(self.config, length)

    def prefill(self, params: Any, input_ids: Array, mask: Array, *, mode: str, chunk: int) -> Cache:
        """Prompt ``[1, T]`` with ``mask`` ``[1, T]`` (1 on its real tokens, 0 on right padding) -> one state
        per layer (batch 1, ``seqlen`` ``[]``: set it to the real length). No LM head."""

        def run(module: Any) -> Cache:
            options = RunOptions.from_config(module.config, mode=mode, chunk_size=chunk, return_state=True)
            _, cache, _ = module.model(input_ids, mask, options=options)
            return cache

        return self.module.apply({"params": params}, method=run)

    def decode(self, params: Any, tokens: Array, active: Array, cache: Cache) -> Tuple[Array, Cache]:
        """One recurrent step: tokens ``[S]``, active ``[S]`` bool (inactive rows keep their state) -> logits
        ``[S, vocab]`` float32 and the new states."""
        options = RunOptions.from_config(self.config, mode=ForwardMode.RECURRENT, return_state=True)
        logits, cache, _ = self.module.apply({"params": params}, tokens[:, None], active[:, None].astype(jnp.int32),
                                             cache, options=options)
        return logits[:, 0].astype(jnp.float32), cache

    def empty_cache(self, slots: int) -> Cache:
        """Zero states for ``slots`` rows, each at position 0 (``seqlen`` ``[slots]``)."""
        return tuple(s._replace(seqlen=jnp.zeros((slots,), jnp.int32)) for s in empty_cache(self.config, slots))


def load_backend(model_dir: str, *, dtype: Optional[str] = None) -> Backend:
    """The causal LM in ``model_dir`` (flax or PyTorch weights); ``dtype`` (float32, bfloat16, float16) is the
    computation dtype, default float32."""
    compute = compute_dtype(dtype or "float32")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    model = from_pretrained(model_dir, dtype=compute)
    return Backend(model.config, model.module, model.params)
