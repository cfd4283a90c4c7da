"""The model side of evaluation: scoring on the recurrent state, over :mod:`nucleusx_jax.runtime`'s passes.

Everything here works on token ids; :mod:`nucleusx_jax.eval.harness` does the text, the batching and lm-eval.
Shapes: B rows, T positions, V vocabulary; log-probabilities are float32. The passes are:

* :meth:`Backend.prefix`: a (shared) context once, in the runtime's prompt form; returns the log-probabilities
  after its last token and the fixed-size recurrent state it leaves;
* :meth:`Backend.continuation`: continuations from rows of such a state, in the recurrent form;
* :meth:`Backend.window`: one window of a long document, carrying the state in and out (rolling perplexity
  with memory independent of the document length).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import decode, runtime
from ..model import NucleusX
from ..types import Array, Cache, Params


def target_scores(logits: Array, targets: Array) -> Tuple[Array, Array]:
    """logits ``[..., V]``, targets ``[...]`` -> (log p(target) float32, target == argmax)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logp, axis=-1) == targets


class Backend:
    """Compiled evaluation passes of one causal LM (``model.module``) with parameters ``params``."""

    def __init__(self, model: NucleusX, params: Params = None, *, prompt_chunkwise_threshold: Optional[int] = None):
        self.model = model
        self.config = model.config
        self.params = params if params is not None else model.params
        self.threshold = prompt_chunkwise_threshold
        self.module = model.module
        self._prefix = jax.jit(self._prefix_fn, static_argnames=("mode", "chunk_size"))
        self._continuation = jax.jit(self._continuation_fn)
        self._window = jax.jit(self._window_fn, donate_argnames=("cache",))

    # ---------------------------------------------------------------------------------------- traced
    def _prefix_fn(self, params: Params, ids: Array, mask: Array, *, mode: str,
                   chunk_size: int) -> Tuple[Array, Cache]:
        logits, cache = runtime.prefill(self.module, params, ids, mask, mode=mode, chunk_size=chunk_size)
        return jax.nn.log_softmax(logits, axis=-1), cache

    def _continuation_fn(self, params: Params, first_logp: Array, cache: Cache, rows: Array, ids: Array,
                         mask: Array) -> Tuple[Array, Array]:
        first = jnp.take(first_logp, rows, 0)  # [N, V]
        # The last continuation token is fed too (its prediction is unused): one shape, one compile per length.
        logits, _ = runtime.recurrent(self.module, params, ids, mask, runtime.take_rows(cache, rows))
        later_lp, later_greedy = target_scores(logits[:, :-1], ids[:, 1:])
        first_lp = jnp.take_along_axis(first, ids[:, :1], axis=-1)
        first_greedy = jnp.argmax(first, axis=-1)[:, None] == ids[:, :1]
        return (jnp.concatenate([first_lp, later_lp], axis=1),
                jnp.concatenate([first_greedy, later_greedy], axis=1))

    def _window_fn(self, params: Params, cache: Cache, ids: Array, mask: Array,
                   targets: Array) -> Tuple[Array, Cache]:
        logits, cache = runtime.recurrent(self.module, params, ids, mask, cache)
        lp, _ = target_scores(logits, targets)
        return jnp.sum(jnp.where(mask.astype(bool), lp, 0.0), axis=1), cache

    # ------------------------------------------------------------------------------------------ host
    def prefix(self, ids: np.ndarray, mask: np.ndarray) -> Tuple[Array, Cache]:
        """Left-padded contexts ``[B, T]`` -> (log-probabilities of the next token ``[B, V]``, state)."""
        mode, chunk_size = runtime.prompt_form(self.config, ids.shape[1], threshold=self.threshold)
        return self._prefix(self.params, jnp.asarray(ids), jnp.asarray(mask), mode=mode, chunk_size=int(chunk_size))

    def continuation(self, first_logp: Array, cache: Cache, rows: np.ndarray, ids: np.ndarray,
                     mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Continuations ``[N, L]`` (right-padded, mask 0 on pads), row ``n`` continuing context ``rows[n]`` of a
        :meth:`prefix` result -> (log p of each continuation token ``[N, L]``, greedy ``[N, L]``)."""
        lp, greedy = self._continuation(self.params, first_logp, cache, jnp.asarray(rows, jnp.int32),
                                        jnp.asarray(ids), jnp.asarray(mask))
        return np.asarray(lp), np.asarray(greedy)

    def empty_cache(self, batch: int) -> Cache:
        """The state before any token, for ``batch`` rows."""
        return runtime.empty_cache(self.config, batch)

    def window(self, cache: Cache, ids: np.ndarray, mask: np.ndarray,
               targets: np.ndarray) -> Tuple[np.ndarray, Cache]:
        """One window ``[B, W]`` continuing ``cache`` (donated); pads (mask 0) leave the state as it is.
        Returns (sum of log p(targets) over real positions ``[B]``, the new state)."""
        total, cache = self._window(self.params, cache, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(targets))
        return np.asarray(total), cache

    def window_memory(self, batch: int, width: int) -> int:
        """Bytes of device memory XLA plans for one :meth:`window` of ``[batch, width]`` (arguments, outputs and
        temporaries): the whole footprint of rolling perplexity, whatever the document length."""
        ids = jax.ShapeDtypeStruct((batch, width), jnp.int32)
        stats = self._window.lower(self.params, self.empty_cache(batch), ids, ids, ids).compile().memory_analysis()
        return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                   - stats.alias_size_in_bytes)

    def generate(self, ids: np.ndarray, mask: np.ndarray, rows: np.ndarray, *, steps: int,
                 options: decode.DecodeOptions, prng_key: Array) -> np.ndarray:
        """The prompts ``[B, T]`` (left-padded) once, then ``steps`` new tokens ``[N, steps]`` for each row
        ``n`` continuing prompt ``rows[n]`` (the compiled loop of :mod:`nucleusx_jax.decode`)."""
        state = decode.prefill(self.model, ids, mask, options=options, prng_key=prng_key, params=self.params,
                               prompt_chunkwise_threshold=self.threshold)
        tokens, _, _ = decode.compiled(self.model).loop(self.params, state.take(jnp.asarray(rows, jnp.int32)),
                                                        steps=steps, options=options, output_logits=False)
        return np.asarray(tokens)
