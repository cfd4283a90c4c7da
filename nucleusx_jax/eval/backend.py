"""The model side of evaluation, in one place: loading a directory and the compiled forward passes.

Everything here works on token ids; :mod:`nucleusx_jax.eval.harness` does the text, the batching and lm-eval.
Shapes: B rows, T positions, V vocabulary; log-probabilities are float32. The passes are:

* :meth:`Backend.prefix`: a (shared) context, in the parallel form (chunkwise past the prompt threshold);
  returns the log-probabilities after its last token and the fixed-size recurrent state it leaves (one
  :class:`~nucleusx_jax.retention.RetentionState` per layer);
* :meth:`Backend.continuation`: continuations from rows of such a state, in the recurrent form;
* :meth:`Backend.window`: one window of a long document, carrying the state in and out (rolling perplexity
  with memory independent of the document length).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import decode, retention
from ..configuration import ForwardMode
from ..inputs import prompt_forward_mode
from ..model import NucleusX, compute_dtype, from_pretrained
from ..modeling import RunOptions, empty_cache

Array = jax.Array
Cache = Tuple[retention.RetentionState, ...]


def load_model(pretrained: str, dtype: str) -> NucleusX:
    """A causal LM from our (flax) or a PyTorch model directory, computing in ``dtype`` (a name in ``model.COMPUTE_DTYPES``)."""
    compute = compute_dtype(dtype)
    if not os.path.isdir(pretrained):
        raise FileNotFoundError(f"pretrained={pretrained!r} is not a model directory")
    return from_pretrained(pretrained, dtype=compute)


def _target_scores(logits: Array, targets: Array) -> Tuple[Array, Array]:
    """logits ``[..., V]``, targets ``[...]`` -> (log p(target) float32, target == argmax)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logp, axis=-1) == targets


class Backend:
    """Compiled evaluation passes of one causal LM (``model.module``) with parameters ``params``."""

    def __init__(self, model: NucleusX, params: Any = None, *,
                 prompt_chunkwise_threshold: Optional[int] = None):
        self.model = model
        self.config = model.config
        self.params = params if params is not None else model.params
        self.threshold = prompt_chunkwise_threshold
        self.module = model.module
        self._recurrent = RunOptions.from_config(self.config, mode=ForwardMode.RECURRENT, return_state=True)
        self._prefix = jax.jit(self._prefix_fn, static_argnames=("mode", "chunk"))
        self._continuation = jax.jit(self._continuation_fn)
        self._window = jax.jit(self._window_fn, donate_argnames=("cache",))

    def _mode(self, length: int) -> Tuple[str, int]:
        return prompt_forward_mode(self.config, length, None, self.threshold)

    # ---------------------------------------------------------------------------------------- traced
    def _prefix_fn(self, params: Any, ids: Array, mask: Array, *, mode: str, chunk: int) -> Tuple[Array, Cache]:
        def run(module: Any) -> Tuple[Array, Cache]:
            options = RunOptions.from_config(module.config, mode=mode, chunk_size=chunk, return_state=True)
            x, cache, _ = module.model(ids, mask, options=options)
            return module.lm_logits(x[:, -1]), cache

        logits, cache = self.module.apply({"params": params}, method=run)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), cache

    def _continuation_fn(self, params: Any, first_logp: Array, cache: Cache, rows: Array, ids: Array,
                         mask: Array) -> Tuple[Array, Array]:
        cache = tuple(retention.RetentionState(jnp.take(s.kv, rows, 0), jnp.take(s.scale, rows, 0), s.seqlen)
                      for s in cache)
        first = jnp.take(first_logp, rows, 0)  # [N, V]
        # The last continuation token is fed too (its prediction is unused): one shape, one compile per length.
        logits, _, _ = self.module.apply({"params": params}, ids, mask, cache, options=self._recurrent)
        later_lp, later_greedy = _target_scores(logits[:, :-1], ids[:, 1:])
        first_lp = jnp.take_along_axis(first, ids[:, :1], axis=-1)
        first_greedy = jnp.argmax(first, axis=-1)[:, None] == ids[:, :1]
        return (jnp.concatenate([first_lp, later_lp], axis=1),
                jnp.concatenate([first_greedy, later_greedy], axis=1))

    def _window_fn(self, params: Any, cache: Cache, ids: Array, mask: Array, targets: Array) -> Tuple[Array, Cache]:
        logits, cache, _ = self.module.apply({"params": params}, ids, mask, cache, options=self._recurrent)
        lp, _ = _target_scores(logits, targets)
        return jnp.sum(jnp.where(mask.astype(bool), lp, 0.0), axis=1), cache

    # ------------------------------------------------------------------------------------------ host
    def prefix(self, ids: np.ndarray, mask: np.ndarray) -> Tuple[Array, Cache]:
        """Left-padded contexts ``[B, T]`` -> (log-probabilities of the next token ``[B, V]``, state)."""
        mode, chunk = self._mode(ids.shape[1])
        return self._prefix(self.params, jnp.asarray(ids), jnp.asarray(mask), mode=mode, chunk=int(chunk))

    def continuation(self, first_logp: Array, cache: Cache, rows: np.ndarray, ids: np.ndarray,
                     mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Continuations ``[N, L]`` (right-padded, mask 0 on pads), row ``n`` continuing context ``rows[n]`` of a
        :meth:`prefix` result -> (log p of each continuation token ``[N, L]``, greedy ``[N, L]``)."""
        lp, greedy = self._continuation(self.params, first_logp, cache, jnp.asarray(rows, jnp.int32),
                                        jnp.asarray(ids), jnp.asarray(mask))
        return np.asarray(lp), np.asarray(greedy)

    def empty_cache(self, batch: int) -> Cache:
        """The state before any token, for ``batch`` rows."""
        return empty_cache(self.config, batch)

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
        take = jnp.asarray(rows, jnp.int32)
        state = decode.DecodeState(
            token=state.token[take], logits=state.logits[take],
            cache=tuple(retention.RetentionState(s.kv[take], s.scale[take], s.seqlen) for s in state.cache),
            key=state.key, finished=state.finished[take])
        tokens, _, _ = decode.compiled(self.model).loop(self.params, state, steps=steps, options=options,
                                                          output_logits=False)
        return np.asarray(tokens)
