"""Inference on the recurrent state, written once: decoding (:mod:`.decode`), evaluation (:mod:`.eval`), serving
(:mod:`.serve`), the HF adapter's generate hooks and the generate CLI all run a causal LM on its cache through
this module, and only this module reaches into the linen module (``module.model``, ``module.lm_logits``,
``module.apply``).

Shapes: B rows, T positions, W positions of a recurrent pass, V vocabulary. A cache
(:data:`~nucleusx_jax.types.Cache`) is one :class:`~nucleusx_jax.retention.RetentionState` per layer: ``kv``
``[B, H, Dv, Dk]`` float32, ``scale`` ``[B, H, 1, 1]`` float32 and ``seqlen`` ``[]`` (one position for every
row) or ``[B]`` (a position per row: the server's slots, or a prefill with segments). Its size never depends on
the length.

* **the cache**: :func:`empty_cache`, :func:`take_rows`, :func:`put_row`, :func:`check_cache`; for chunkwise
  windows that continue one another, :func:`empty_carried_cache` and :func:`check_carried`;
* **the prompt policy**: :func:`prompt_form` (parallel, or chunkwise past a threshold, and the chunk size);
  batch prompts are padded on the left (:func:`pad_left`: mask 0 on the pads, the last position real), the
  server's one-row prompt on the right to a bucket length (:func:`pad_right`, :func:`bucket`; the state's
  position is then set to the real length by :func:`put_row`);
* **the passes**, pure functions of ``(module, params, ...)`` that the callers ``jax.jit`` (with ``module`` bound,
  they lower from abstract arguments alone): :func:`prefill` (a prompt once, to the state and the logits of its
  last real token), :func:`recurrent` (W tokens continuing a state) and :func:`step` (one token per row);
* **the sampler**: :class:`Sampling` and :func:`choose`, with one meaning of each setting whether the batch
  shares it (Python numbers, compiled in) or each row has its own (arrays ``[B]``, traced).

The one loader that goes with it, :func:`nucleusx_jax.loading.load`, is a module of its own: the model's
``generate`` uses this module, so this module does not import the model.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, retention
from .checks import shape_of
from .configuration import ForwardMode, NucleusXConfig
from .modeling import RunOptions
from .types import Array, Cache, CarriedCache, Params


# ------------------------------------------------------------------------------------------------ the cache
def empty_cache(config: NucleusXConfig, batch: int, *, per_row: bool = False) -> Cache:
    """The state before any token for ``batch`` rows: zeros, ``seqlen`` ``[]`` (or ``[batch]`` with ``per_row``).
    Each layer gets its own buffers, so the cache can be donated."""
    states = (retention.empty_state(batch, config.decoder_retention_heads, config.key_head_dim,
                                    config.value_head_dim) for _ in range(config.decoder_layers))
    if per_row:
        return tuple(s._replace(seqlen=jnp.zeros((batch,), jnp.int32)) for s in states)
    return tuple(states)


def take_rows(cache: Cache, rows: Array) -> Cache:
    """Rows ``rows`` ``[N]`` of ``cache`` (repeats allowed): the states those rows left, ``[N, ...]``. A shared
    ``seqlen`` ``[]`` stays shared."""
    def take(x: Array) -> Array:
        return jnp.take(x, rows, 0) if jnp.ndim(x) else x

    return tuple(retention.RetentionState(take(s.kv), take(s.scale), take(s.seqlen)) for s in cache)


def put_row(cache: Cache, slot: Array, state: Cache, position: Array) -> Cache:
    """``cache`` (``seqlen`` ``[S]``) with row ``slot`` replaced by the batch-1 ``state`` at ``position`` ``[]``
    (the real length of a right-padded prompt)."""
    return tuple(s._replace(kv=s.kv.at[slot].set(p.kv[0]), scale=s.scale.at[slot].set(p.scale[0]),
                            seqlen=s.seqlen.at[slot].set(position)) for s, p in zip(cache, state))


def _check_layers(config: NucleusXConfig, cache: Any) -> None:
    """A ValueError unless ``cache`` holds one state per layer of ``config``."""
    if len(cache) != config.decoder_layers:
        raise ValueError(f"past_key_values has {len(cache)} layers but this model has "
                         f"decoder_layers={config.decoder_layers}: it comes from a different config")


def check_cache(config: NucleusXConfig, cache: Any, batch: int) -> Cache:
    """``cache`` (``past_key_values``: per layer a :class:`~nucleusx_jax.retention.RetentionState` or a
    ``(kv, scale, seqlen)`` triple) checked on the host against ``config`` and ``batch`` rows, as float32 states
    with ``scale`` broadcast to ``[batch, H, 1, 1]``; a cache of another config or batch is a ValueError."""
    h, kd, vd = config.decoder_retention_heads, config.key_head_dim, config.value_head_dim
    _check_layers(config, cache)
    states = []
    for i, layer in enumerate(cache):
        if len(layer) != 3:
            raise ValueError(f"past_key_values[{i}] must be (kv, scale, seqlen), got {len(layer)} items")
        kv, scale, seqlen = layer
        if shape_of(kv) != (batch, h, vd, kd):
            raise ValueError(f"past_key_values[{i}] kv has shape {shape_of(kv)} but this model and batch expect "
                             f"{(batch, h, vd, kd)} [batch, heads, value_head_dim, key_head_dim]: "
                             "it comes from a different config or batch")
        if shape_of(scale) not in ((batch, h, 1, 1), (1, h, 1, 1)):
            raise ValueError(f"past_key_values[{i}] scale has shape {shape_of(scale)}, expected {(batch, h, 1, 1)}")
        if shape_of(seqlen) not in ((), (1,), (batch,)):
            raise ValueError(f"past_key_values[{i}] seqlen has shape {shape_of(seqlen)}, expected () or ({batch},) "
                             "(a position per row, left by segment_ids): it comes from a different batch")
        states.append(retention.RetentionState(
            jnp.asarray(kv, jnp.float32),
            jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (batch, h, 1, 1)),
            jnp.asarray(seqlen, jnp.int32).reshape(() if shape_of(seqlen) in ((), (1,)) else (batch,)),
        ))
    return tuple(states)


def empty_carried_cache(config: NucleusXConfig, batch: int) -> CarriedCache:
    """The :class:`~nucleusx_jax.retention.CarriedState` of every layer before any token, for ``batch`` rows:
    pass it as ``past_key_values`` with ``forward_mode="chunkwise"`` to run a long input window by window."""
    return tuple(retention.empty_carried(batch, config.decoder_retention_heads, config.key_head_dim,
                                         config.value_head_dim) for _ in range(config.decoder_layers))


def check_carried(config: NucleusXConfig, cache: Any, batch: int) -> CarriedCache:
    """``cache`` (one :class:`~nucleusx_jax.retention.CarriedState` per layer) checked on the host against
    ``config`` and ``batch`` rows, as float32 states with ``count`` int32 ``[batch]``; a cache of another config
    or batch is a ValueError."""
    h, kd, vd = config.decoder_retention_heads, config.key_head_dim, config.value_head_dim
    _check_layers(config, cache)
    states = []
    for i, s in enumerate(cache):
        want = {"kv": (batch, h, kd, vd), "z": (batch, h, kd, 1), "count": (batch,)}
        for name, shape in want.items():
            x = getattr(s, name)
            if not (x is None and name == "z") and shape_of(x) != shape:
                raise ValueError(f"past_key_values[{i}].{name} has shape {shape_of(x)} but this model and batch "
                                 f"expect {shape}: it comes from a different config or batch")
        states.append(retention.CarriedState(jnp.asarray(s.kv, jnp.float32),
                                             None if s.z is None else jnp.asarray(s.z, jnp.float32),
                                             jnp.asarray(s.count, jnp.int32)))
    return tuple(states)


# ------------------------------------------------------------------------------------------ the prompt policy
def prompt_form(config: NucleusXConfig, length: int, *, chunk_size: Optional[int] = None,
                threshold: Optional[int] = None) -> Tuple[str, int]:
    """How a prompt of ``length`` tokens runs once: ``(mode, chunk_size)``. Parallel, or chunkwise when
    ``length > threshold`` (default ``4 * chunk_size``); ``chunk_size`` defaults to the config's
    ``recurrent_chunk_size``."""
    chunk_size = config.recurrent_chunk_size if chunk_size is None else chunk_size
    threshold = 4 * chunk_size if threshold is None else checks.integer("prompt_chunkwise_threshold", threshold)
    return (ForwardMode.CHUNKWISE.value if length > threshold else ForwardMode.PARALLEL.value), chunk_size


def bucket(length: int, minimum: int = 1) -> int:
    """The padded length that ``length`` tokens run at: the smallest power of two >= ``length`` and
    ``minimum`` (few lengths, so few compiled shapes)."""
    return max(minimum, 1 << max(0, length - 1).bit_length())


def pad_left(seqs: Sequence[Sequence[int]], length: int, rows: int, pad: int) -> Tuple[np.ndarray, np.ndarray]:
    """``rows`` x ``length`` ids and mask (int32, 1 on real tokens), sequence ``i`` right-aligned in row ``i``
    (a batch of prompts: every row's last position is real); spare rows repeat sequence 0."""
    return _pad(seqs, length, rows, pad, left=True)


def pad_right(seqs: Sequence[Sequence[int]], length: int, rows: int, pad: int) -> Tuple[np.ndarray, np.ndarray]:
    """As :func:`pad_left`, sequence ``i`` left-aligned (continuations, windows, the server's slot prompt)."""
    return _pad(seqs, length, rows, pad, left=False)


def _pad(seqs: Sequence[Sequence[int]], length: int, rows: int, pad: int, *,
         left: bool) -> Tuple[np.ndarray, np.ndarray]:
    ids = np.full((rows, length), pad, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i in range(rows):
        s = seqs[i] if i < len(seqs) else seqs[0]
        where = slice(length - len(s), length) if left else slice(0, len(s))
        ids[i, where], mask[i, where] = s, 1
    return ids, mask


# -------------------------------------------------------------------------------------------------- the passes
def prefill(module: Any, params: Params, ids: Array, mask: Optional[Array], segment_ids: Optional[Array] = None,
            *, mode: str, chunk_size: int, logits: bool = True) -> Tuple[Optional[Array], Cache]:
    """A prompt ``[B, T]`` once in ``mode`` (parallel or chunkwise with ``chunk_size``) -> (the logits ``[B, V]``
    float32 after each row's last real token, or None without ``logits``: no LM head; the state it leaves).

    ``module``: a ``NucleusXForCausalLMModule``. ``mask`` ``[B, T]`` (0 on padding, left or right) and
    ``segment_ids`` ``[B, T]`` (documents packed in a row, 0 = padding: the state is each row's last document's)
    may be None. With right padding the state's ``seqlen`` counts the pads too: set the real length
    (:func:`put_row`)."""

    def run(m: Any) -> Tuple[Optional[Array], Cache]:
        options = RunOptions.from_config(m.config, mode=mode, chunk_size=chunk_size, return_state=True)
        x, cache, _ = m.model(ids, mask, segment_ids=segment_ids, options=options)
        if not logits:
            return None, cache
        real = mask if mask is not None else segment_ids
        if real is None:
            return m.lm_logits(x[:, -1]).astype(jnp.float32), cache
        last = jnp.max(jnp.where(real != 0, jnp.arange(x.shape[1]), 0), axis=1)  # the last real token
        return m.lm_logits(x[jnp.arange(x.shape[0]), last]).astype(jnp.float32), cache

    return module.apply({"params": params}, method=run)


def recurrent(module: Any, params: Params, ids: Array, mask: Array, cache: Cache) -> Tuple[Array, Cache]:
    """``ids`` ``[B, W]`` continuing ``cache`` in the recurrent form -> (logits ``[B, W, V]`` float32, the new
    state). A position with ``mask`` 0 keeps its row's ``kv`` and ``scale`` (its position still advances:
    padding belongs after a row's last real token)."""
    options = RunOptions.from_config(module.config, mode=ForwardMode.RECURRENT, return_state=True)
    out, cache, _ = module.apply({"params": params}, ids, mask, cache, options=options)
    return out.astype(jnp.float32), cache


def step(module: Any, params: Params, tokens: Array, active: Array, cache: Cache) -> Tuple[Array, Cache]:
    """One recurrent step: ``tokens`` ``[B]``, ``active`` ``[B]`` bool (an inactive row keeps its ``kv`` and
    ``scale``: a finished row, a free slot) -> (logits ``[B, V]`` float32, the new state)."""
    out, cache = recurrent(module, params, tokens[:, None], active[:, None].astype(jnp.int32), cache)
    return out[:, 0], cache


# ------------------------------------------------------------------------------------------------- the sampler
class Sampling(NamedTuple):
    """How the next token is chosen from logits ``[B, V]``, in one meaning everywhere.

    ``temperature`` 0 is greedy (the argmax); otherwise the logits are divided by it, then ``top_k`` (0: off)
    keeps the k largest (ties: the lower index) and ``top_p`` (1: off) the most likely tokens up to and
    including the first whose cumulative probability reaches it, in that order and exactly as transformers'
    Flax warpers do; then one draw. Each field is a Python number shared by the batch (compiled in) or an array
    ``[B]``, one value per row (traced). :meth:`checked` validates Python numbers.
    """

    temperature: Any = 0.0
    top_k: Any = 0
    top_p: Any = 1.0

    @classmethod
    def checked(cls, temperature: Any = 0.0, top_k: Any = 0, top_p: Any = 1.0) -> "Sampling":
        """The settings when valid, else a ValueError naming the bad one."""
        number = isinstance(temperature, (int, float, np.integer, np.floating)) and not isinstance(temperature, bool)
        if not number or not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature={temperature!r} is invalid: must be a number >= 0 (0: greedy)")
        checks.integer("top_k", top_k, minimum=0, hint=" (0: off)")
        number = isinstance(top_p, (int, float, np.integer, np.floating)) and not isinstance(top_p, bool)
        if not number or not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r} is invalid: must be in (0, 1] (1: off)")
        return cls(float(temperature), int(top_k), float(top_p))


def filter_logits(logits: Array, top_k: Any, top_p: Any) -> Array:
    """``logits`` ``[B, V]`` with what :class:`Sampling`'s ``top_k`` then ``top_p`` (numbers or ``[B]``) drop
    set to -inf. One sort gives how many tokens a row keeps and the smallest kept value; the tokens are then
    picked by comparison (ties at that value: the lower indices), with no scatter."""
    batch, vocab = logits.shape
    values, _ = jax.lax.top_k(logits, vocab)  # sorted, descending; ties: the lower index first
    top_k, top_p = jnp.broadcast_to(top_k, (batch,)), jnp.broadcast_to(top_p, (batch,))
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ranked = jnp.where(jnp.arange(vocab) < k[:, None], values, -jnp.inf)
    below = jnp.sum(jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1) < top_p[:, None], axis=-1)
    kept = jnp.where(top_p < 1, jnp.minimum(k, below + 1), k)  # top-p also keeps the token that crosses p
    last = jnp.take_along_axis(values, kept[:, None] - 1, axis=-1)  # [B, 1]
    above, ties = logits > last, logits == last
    room = kept[:, None] - jnp.sum(above, axis=-1, keepdims=True)
    keep = above | (ties & (jnp.cumsum(ties, axis=-1) <= room))
    return jnp.where(keep, logits, -jnp.inf)


def _draw(key: Array, logits: Array) -> Array:
    """One draw per row: with one key over the whole batch (``FlaxGenerationMixin``'s), or with a key per row
    (``[B]`` typed or ``[B, 2]`` raw keys: a row's draw does not depend on the others)."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if jnp.ndim(key) == (1 if typed else 2):
        return jax.vmap(jax.random.categorical)(key, logits)
    return jax.random.categorical(key, logits, axis=-1)


def choose(logits: Array, sampling: Sampling, key: Array) -> Array:
    """The next tokens ``[B]`` int32 from ``logits`` ``[B, V]`` under ``sampling``; ``key``: one PRNG key for the
    batch, or one per row (see :func:`_draw`). Filtering is skipped when no row needs it, sampling when every
    row is greedy."""
    logits = logits.astype(jnp.float32)
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    batch = logits.shape[:1]
    temperature = jnp.broadcast_to(jnp.asarray(sampling.temperature, jnp.float32), batch)
    top_k = jnp.broadcast_to(jnp.asarray(sampling.top_k, jnp.int32), batch)
    top_p = jnp.broadcast_to(jnp.asarray(sampling.top_p, jnp.float32), batch)
    greedy = temperature == 0

    def sampled() -> Array:
        scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
        masked = jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1)), lambda: filter_logits(scaled, top_k, top_p),
                              lambda: scaled)
        return jnp.where(greedy, argmax, _draw(key, masked).astype(jnp.int32))

    return jax.lax.cond(jnp.all(greedy), lambda: argmax, sampled)

