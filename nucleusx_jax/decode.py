"""Decoding on the recurrent state: the prompt once, then one compiled loop of recurrent steps.

The prompt ``[B, T]`` runs once in parallel mode (chunkwise when ``T > 4 * recurrent_chunk_size``) and leaves
the recurrent state: one :class:`~nucleusx_jax.retention.RetentionState` per layer, whose size never depends on
the length. Every new token is one recurrent step on that state.

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
from . import modeling
from .configuration import ForwardMode
from .inputs import check_inputs, prompt_forward_mode
from .retention import RetentionState

Array = jax.Array
Cache = Tuple[RetentionState, ...]


def top_k_filter(logits: Array, k: int) -> Array:
    """``logits`` ``[B, vocab]`` with all but the ``k`` largest per row set to -inf (ties: the lower index wins,
    as ``lax.top_k`` picks)."""
    k = min(k, logits.shape[-1])
    values, index = jax.lax.top_k(logits, k)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.full_like(logits, -jnp.inf).at[rows, index].set(values)


def top_p_filter(logits: Array, p: float) -> Array:
    """``logits`` ``[B, vocab]`` keeping, per row, the most likely tokens up to and including the first whose
    cumulative probability reaches ``p`` (at least one); the rest -inf."""
    values, index = jax.lax.top_k(logits, logits.shape[-1])  # sorted, descending
    below = jnp.cumsum(jax.nn.softmax(values, axis=-1), axis=-1) < p
    keep = jnp.roll(below, 1, axis=-1).at[:, 0].set(True)  # also the token that crosses p; the first always
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.full_like(logits, -jnp.inf).at[rows, index].set(jnp.where(keep, values, -jnp.inf))


class DecodeState(NamedTuple):
    """Everything one decoding step needs, all fixed-size: ``token`` ``[B]`` (the token just chosen),
    ``logits`` ``[B, vocab]`` float32 (the logits it was chosen from), ``cache`` (one state per layer),
    ``key`` (the PRNG key of the next choice), ``finished`` ``[B]`` (the row has produced an EOS)."""

    token: Array
    logits: Array
    cache: Cache
    key: Array
    finished: Array


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How tokens are chosen and when a row stops (hashable: a static argument of the compiled functions).

    Greedy, or sampled after temperature, top-k and top-p (in that order, as ``FlaxGenerationMixin``).
    A row that has produced one of ``eos_token_ids`` continues with ``pad_token_id``.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: Tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} is invalid: must be a number > 0")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} is invalid: must be an integer >= 0 (0 disables it)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} is invalid: must be in (0, 1] (1 disables it)")

    def choose(self, logits: Array, key: Array) -> Array:
        """Next tokens ``[B]`` int32 from logits ``[B, vocab]``."""
        if not self.do_sample:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.top_k != 0:
            logits = top_k_filter(logits, self.top_k)
        if self.top_p < 1.0:
            logits = top_p_filter(logits, self.top_p)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

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
        self.prefill = jax.jit(self._prefill, static_argnames=("mode", "chunk", "options"))
        self.step = jax.jit(self._step, static_argnames=("options",), donate_argnames=("state",))
        self.loop = jax.jit(self._loop, static_argnames=("steps", "options", "output_logits"),
                            donate_argnames=("state",))

    def _prefill(self, params: Any, input_ids: Array, mask: Optional[Array], segment_ids: Optional[Array], key: Array,
                 *, mode: str, chunk: int, options: DecodeOptions) -> DecodeState:
        """The prompt ``[B, T]`` once; the LM head only on its last position (with segments: its last real token,
        padding may follow it). Chooses the first new token."""

        def run(module: Any) -> Tuple[Array, Cache]:
            run = modeling.RunOptions.from_config(module.config, mode=mode, chunk_size=chunk, return_state=True)
            x, cache, _ = module.model(input_ids, mask, segment_ids=segment_ids, options=run)
            if segment_ids is None:
                return module.lm_logits(x[:, -1]), cache
            last = jnp.max(jnp.where(segment_ids != 0, jnp.arange(x.shape[1]), 0), axis=1)  # the last real token
            return module.lm_logits(x[jnp.arange(x.shape[0]), last]), cache

        logits, cache = self.module.apply({"params": params}, method=run)
        return options.advance(logits, cache, key, jnp.zeros(input_ids.shape[:1], bool))

    def _step(self, params: Any, state: DecodeState, *, options: DecodeOptions) -> DecodeState:
        """One recurrent step on ``state.token``, then the next choice. The token is real (mask 1) in every row
        still running; a finished row only repeats the pad token, so its state is left as it is (mask 0)."""
        mask = (~state.finished)[:, None].astype(jnp.int32)
        run = modeling.RunOptions.from_config(self.module.config, mode=ForwardMode.RECURRENT, return_state=True)
        logits, cache, _ = self.module.apply({"params": params}, state.token[:, None], mask, state.cache, options=run)
        return options.advance(logits[:, 0], cache, state.key, state.finished)

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
    length = np.shape(input_ids)[-1] if np.ndim(input_ids) else 0
    mode, chunk = prompt_forward_mode(model.config, length, recurrent_chunk_size, prompt_chunkwise_threshold)
    check_inputs(model.config, input_ids, attention_mask, mode, chunk, None, None, "causal_lm",
                 segment_ids=segment_ids)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    segments = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    key = prng_key if prng_key is not None else jax.random.PRNGKey(0)
    return compiled(model).prefill(params if params is not None else model.params, jnp.asarray(input_ids, jnp.int32),
                                   mask, segments, key, mode=mode, chunk=int(chunk), options=options)


def _start(
    model: Any, input_ids: Any, attention_mask: Any, max_new_tokens: Any, do_sample: bool,
    temperature: float, top_k: int, top_p: float, eos_token_id: Union[None, int, Sequence[int]],
    pad_token_id: Optional[int], prng_key: Optional[Array], params: Any, recurrent_chunk_size: Optional[int],
    prompt_chunkwise_threshold: Optional[int], segment_ids: Any,
) -> Tuple[int, DecodeOptions, DecodeState]:
    """What :func:`generate` and :func:`stream` share: check ``max_new_tokens``, resolve the decoding options
    and run the prompt. Returns ``(steps, options, state after the prompt)``."""
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an integer >= 1")
    options = decode_options(model, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id)
    state = prefill(model, input_ids, attention_mask, options=options, prng_key=prng_key, params=params,
                    recurrent_chunk_size=recurrent_chunk_size, prompt_chunkwise_threshold=prompt_chunkwise_threshold,
                    segment_ids=segment_ids)
    return int(max_new_tokens), options, state


def generate(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    prng_key: Optional[Array] = None,
    params: Any = None,
    recurrent_chunk_size: Optional[int] = None,
    prompt_chunkwise_threshold: Optional[int] = None,
    output_logits: bool = False,
    segment_ids: Any = None,
) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Prompt plus new tokens, ``[B, T + max_new_tokens]`` (pad after a row's EOS), like
    ``model.generate(...).sequences``; with ``output_logits`` also the logits of every choice
    ``[B, max_new_tokens, vocab]``. The new tokens come from one compiled loop of recurrent steps."""
    steps, options, state = _start(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k,
                                   top_p, eos_token_id, pad_token_id, prng_key, params, recurrent_chunk_size,
                                   prompt_chunkwise_threshold, segment_ids)
    tokens, logits, _ = compiled(model).loop(params if params is not None else model.params, state, steps=steps,
                                             options=options, output_logits=bool(output_logits))
    sequences = np.concatenate([np.asarray(input_ids, np.int32), np.asarray(tokens)], axis=1)
    return (sequences, np.asarray(logits)) if output_logits else sequences


def stream(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    prng_key: Optional[Array] = None,
    params: Any = None,
    recurrent_chunk_size: Optional[int] = None,
    prompt_chunkwise_threshold: Optional[int] = None,
    segment_ids: Any = None,
) -> Iterator[np.ndarray]:
    """Yield the new tokens ``[B]`` one by one as they are produced (the same tokens as :func:`generate`),
    until ``max_new_tokens`` or every row has produced an EOS. The prompt runs (and bad input raises) at the
    call, before the first token is asked for; every later token is one call of the same compiled step."""
    steps, options, state = _start(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k,
                                   top_p, eos_token_id, pad_token_id, prng_key, params, recurrent_chunk_size,
                                   prompt_chunkwise_threshold, segment_ids)
    step: Callable[..., DecodeState] = compiled(model).step
    weights = params if params is not None else model.params

    def tokens(state: DecodeState) -> Iterator[np.ndarray]:
        for i in range(steps):
            if i:
                state = step(weights, state, options=options)
            token, finished = jax.device_get((state.token, state.finished))
            yield token
            if finished.all():
                return

    return tokens(state)
