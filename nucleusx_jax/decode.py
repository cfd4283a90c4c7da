"""Decoding on the recurrent state: the prompt once, then one compiled loop of recurrent steps.

The prompt ``[B, T]`` (left-padded) runs once in the form of :func:`nucleusx_jax.runtime.prompt_form` (parallel,
chunkwise when ``T > 4 * recurrent_chunk_size``) and leaves the recurrent state: one
:class:`~nucleusx_jax.retention.RetentionState` per layer, whose size never depends on the length. Every new
token is one recurrent step on that state. The passes and the sampler are :mod:`nucleusx_jax.runtime`'s; this
module adds transformers' sampling options, EOS handling and the loop.

* :func:`generate`: the new tokens come from one ``lax.while_loop`` compiled once per shape, with the state in
  its carry (no host round trip per token); greedy or sampled (temperature, top-k, top-p, applied and keyed
  exactly as transformers' ``FlaxGenerationMixin`` does, so a fixed ``prng_key`` gives the mixin's tokens);
* :func:`stream`: a Python generator yielding each token as it is produced, from one jit-compiled step reused
  for every token (its state buffers are donated).

``model`` is anything with a causal-LM ``module``, a ``config`` and ``params``: the core
:class:`~nucleusx_jax.model.NucleusX` or the HF adapter's ``FlaxNucleusXForCausalLM``. The command line is
:mod:`nucleusx_jax.generate`.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, modeling, runtime
from .inputs import check_prompt
from .types import Array, Cache


class DecodeState(NamedTuple):
    """Everything one decoding step needs, all fixed-size: ``token`` ``[B]`` (the token just chosen),
    ``logits`` ``[B, vocab]`` float32 (the logits it was chosen from), ``cache`` (one state per layer),
    ``key`` (the PRNG key of the next choice), ``finished`` ``[B]`` (the row has produced an EOS)."""

    token: Array
    logits: Array
    cache: Cache
    key: Array
    finished: Array

    def take(self, rows: Array) -> "DecodeState":
        """Rows ``rows`` ``[N]`` (repeats allowed: several continuations of one prompt); the key is shared."""
        return DecodeState(self.token[rows], self.logits[rows], runtime.take_rows(self.cache, rows), self.key,
                           self.finished[rows])


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How tokens are chosen and when a row stops (hashable: a static argument of the compiled functions).

    transformers' spelling of :class:`~nucleusx_jax.runtime.Sampling`: greedy (``do_sample=False``, whatever the
    other settings: temperature 0), or sampled after temperature (> 0), top-k and top-p (in that order, as
    ``FlaxGenerationMixin``). A row that has produced one of ``eos_token_ids`` continues with ``pad_token_id``.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: Tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        runtime.Sampling.checked(self.temperature, self.top_k, self.top_p)
        if self.do_sample and self.temperature == 0:
            raise ValueError("temperature=0 is invalid with do_sample=True: must be > 0 (greedy is do_sample=False)")

    @property
    def sampling(self) -> runtime.Sampling:
        """The runtime's settings: temperature 0 (greedy) unless ``do_sample``."""
        return runtime.Sampling(float(self.temperature) if self.do_sample else 0.0, self.top_k, self.top_p)

    def choose(self, logits: Array, key: Array) -> Array:
        """Next tokens ``[B]`` int32 from logits ``[B, vocab]`` (one draw over the batch with ``key``)."""
        return runtime.choose(logits, self.sampling, key)

    def advance(self, logits: Array, cache: Cache, key: Array, finished: Array) -> DecodeState:
        """Choose from ``logits`` ``[B, vocab]``; finished rows get the pad token. Splits ``key`` like the mixin."""
        logits = logits.astype(jnp.float32)
        use, key = jax.random.split(key)
        token = jnp.where(finished, self.pad_token_id, self.choose(logits, use))
        if self.eos_token_ids:
            finished = finished | jnp.isin(token, jnp.asarray(self.eos_token_ids, jnp.int32))
        return DecodeState(token, logits, cache, key, finished)


def decode_options(
    model: Any,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
) -> DecodeOptions:
    """:class:`DecodeOptions` with the mixin's defaults: EOS and pad from the model's generation config (the HF
    adapter's ``generation_config``, else its ``config``), the pad token falling back to the (first) EOS."""
    gen = getattr(model, "generation_config", model.config)
    eos = gen.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = () if eos is None else tuple(int(e) for e in np.atleast_1d(eos))
    pad = gen.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return DecodeOptions(bool(do_sample), temperature, top_k, top_p, eos_ids, int(pad))


class _Compiled:
    """The jit-compiled prefill, step and loop of one model (each compiled once per shape and options)."""

    def __init__(self, model: Any):
        self.module = model.module
        self.prefill = jax.jit(self._prefill, static_argnames=("mode", "chunk_size", "options"))
        self.step = jax.jit(self._step, static_argnames=("options",), donate_argnames=("state",))
        self.loop = jax.jit(self._loop, static_argnames=("steps", "options", "output_logits"),
                            donate_argnames=("state",))

    def _prefill(self, params: Any, input_ids: Array, mask: Optional[Array], segment_ids: Optional[Array], key: Array,
                 *, mode: str, chunk_size: int, options: DecodeOptions) -> DecodeState:
        """The prompt ``[B, T]`` once (:func:`nucleusx_jax.runtime.prefill`), then the first new token."""
        logits, cache = runtime.prefill(self.module, params, input_ids, mask, segment_ids, mode=mode,
                                        chunk_size=chunk_size)
        return options.advance(logits, cache, key, jnp.zeros(input_ids.shape[:1], bool))

    def _step(self, params: Any, state: DecodeState, *, options: DecodeOptions) -> DecodeState:
        """One recurrent step on ``state.token``, then the next choice. A finished row only repeats the pad
        token, so its state is left as it is (inactive)."""
        logits, cache = runtime.step(self.module, params, state.token, ~state.finished, state.cache)
        return options.advance(logits, cache, state.key, state.finished)

    def _loop(self, params: Any, state: DecodeState, *, steps: int, options: DecodeOptions,
              output_logits: bool) -> Tuple[Array, Optional[Array], DecodeState]:
        """``steps`` tokens ``[B, steps]`` (the first is ``state.token``) in one ``lax.while_loop`` that stops
        early once every row is finished; with ``output_logits`` also their logits ``[B, steps, vocab]``."""
        batch, vocab = state.logits.shape
        tokens = jnp.full((batch, steps), options.pad_token_id, jnp.int32).at[:, 0].set(state.token)
        logits = jnp.zeros((batch, steps, vocab) if output_logits else (0,), jnp.float32)
        if output_logits:
            logits = logits.at[:, 0].set(state.logits)

        def cond(carry: Tuple[Array, DecodeState, Array, Array]) -> Array:
            i, s, _, _ = carry
            return (i < steps) & ~jnp.all(s.finished)

        def body(carry: Tuple[Array, DecodeState, Array, Array]) -> Tuple[Array, DecodeState, Array, Array]:
            i, s, toks, lg = carry
            s = self._step(params, s, options=options)
            toks = jax.lax.dynamic_update_slice(toks, s.token[:, None], (0, i))
            if output_logits:
                lg = jax.lax.dynamic_update_slice(lg, s.logits[:, None], (0, i, 0))
            return i + 1, s, toks, lg

        _, state, tokens, logits = jax.lax.while_loop(cond, body, (jnp.asarray(1), state, tokens, logits))
        return tokens, (logits if output_logits else None), state


_COMPILED: "weakref.WeakKeyDictionary[Any, _Compiled]" = weakref.WeakKeyDictionary()


def compiled(model: Any) -> _Compiled:
    """The compiled functions of ``model`` (made once per model object)."""
    if not isinstance(getattr(model, "module", None), modeling.NucleusXForCausalLMModule):
        raise TypeError(f"generation needs a causal LM (NucleusX with head 'causal_lm' or FlaxNucleusXForCausalLM), "
                        f"got {type(model).__name__}")
    if model not in _COMPILED:
        _COMPILED[model] = _Compiled(model)
    return _COMPILED[model]


def prefill(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    options: DecodeOptions,
    prng_key: Optional[Array] = None,
    params: Any = None,
    recurrent_chunk_size: Optional[int] = None,
    prompt_chunkwise_threshold: Optional[int] = None,
    segment_ids: Any = None,
) -> DecodeState:
    """Run the prompt ``[B, T]`` (left-padded rows: ``attention_mask`` 0 on the pads) once and choose the first
    new token. With ``segment_ids`` ``[B, T]`` (documents packed in a row, 0 = padding) decoding continues each
    row's last document as if it were the whole prompt. Bad input (empty prompt, ids outside the vocabulary, a
    mask or segment ids of another shape, invalid segment ids) raises ValueError."""
    mode, chunk_size = check_prompt(model.config, input_ids, attention_mask, chunk_size=recurrent_chunk_size,
                                    threshold=prompt_chunkwise_threshold, segment_ids=segment_ids)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    segments = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    key = prng_key if prng_key is not None else jax.random.PRNGKey(0)
    return compiled(model).prefill(params if params is not None else model.params, jnp.asarray(input_ids, jnp.int32),
                                   mask, segments, key, mode=mode, chunk_size=int(chunk_size), options=options)


def _start(
    model: Any, input_ids: Any, attention_mask: Any = None, *, max_new_tokens: int, do_sample: bool = False,
    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: Union[None, int, Sequence[int]] = None,
    pad_token_id: Optional[int] = None, prng_key: Optional[Array] = None, params: Any = None,
    recurrent_chunk_size: Optional[int] = None, prompt_chunkwise_threshold: Optional[int] = None,
    segment_ids: Any = None,
) -> Tuple[int, DecodeOptions, DecodeState, Any]:
    """What :func:`generate` and :func:`stream` share, and their keyword arguments: check ``max_new_tokens``,
    resolve the decoding options (:func:`decode_options`) and run the prompt (:func:`prefill`). Returns
    ``(steps, options, state after the prompt, params)``."""
    checks.integer("max_new_tokens", max_new_tokens)
    options = decode_options(model, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id)
    params = params if params is not None else model.params
    state = prefill(model, input_ids, attention_mask, options=options, prng_key=prng_key, params=params,
                    recurrent_chunk_size=recurrent_chunk_size, prompt_chunkwise_threshold=prompt_chunkwise_threshold,
                    segment_ids=segment_ids)
    return int(max_new_tokens), options, state, params


def generate(model: Any, input_ids: Any, attention_mask: Any = None, *, output_logits: bool = False,
             **kwargs: Any) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Prompt plus new tokens, ``[B, T + max_new_tokens]`` (pad after a row's EOS), like
    ``model.generate(...).sequences``; with ``output_logits`` also the logits of every choice
    ``[B, max_new_tokens, vocab]``. The new tokens come from one compiled loop of recurrent steps. ``kwargs``:
    ``max_new_tokens`` (required), ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``,
    ``pad_token_id``, ``prng_key``, ``params``, ``recurrent_chunk_size``, ``prompt_chunkwise_threshold``,
    ``segment_ids`` (see :func:`_start`)."""
    steps, options, state, params = _start(model, input_ids, attention_mask, **kwargs)
    tokens, logits, _ = compiled(model).loop(params, state, steps=steps, options=options,
                                             output_logits=bool(output_logits))
    sequences = np.concatenate([np.asarray(input_ids, np.int32), np.asarray(tokens)], axis=1)
    return (sequences, np.asarray(logits)) if output_logits else sequences


def stream(model: Any, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> Iterator[np.ndarray]:
    """Yield the new tokens ``[B]`` one by one as they are produced (the same tokens as :func:`generate`, the
    same keyword arguments but ``output_logits``), until ``max_new_tokens`` or every row has produced an EOS.
    The prompt runs (and bad input raises) at the call, before the first token is asked for; every later token
    is one call of the same compiled step."""
    steps, options, state, params = _start(model, input_ids, attention_mask, **kwargs)
    step: Callable[..., DecodeState] = compiled(model).step

    def tokens(state: DecodeState) -> Iterator[np.ndarray]:
        for i in range(steps):
            if i:
                state = step(params, state, options=options)
            token, finished = jax.device_get((state.token, state.finished))
            yield token
            if finished.all():
                return

    return tokens(state)
