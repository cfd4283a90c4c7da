"""Retention as pure JAX functions: tables, the parallel, chunkwise and recurrent forms, and the state.

Shapes use B batch, H heads, T length, K key head dim, V value head dim, C chunk size.
``q`` and ``k`` are ``[B, H, T, K]`` and already rotated (``k`` also scaled by ``K**-0.5``); ``v`` is
``[B, H, T, V]``; ``mask`` is ``[B, T]`` with 1 for real tokens and 0 for padding, or ``None``.

Every form returns the retention output ``[B, H, T, V]`` before the per-head RMSNorm. The three forms
differ from each other only by a positive scalar per output row (as in the PyTorch reference), which
that RMSNorm removes up to its epsilon.

The recurrent state is a :class:`RetentionState`, laid out like the reference's cache
``(prev_key_value, scale, seqlen)``:

* ``kv``: ``[B, H, V, K]`` float32, ``sum_t w_t v_t k_t^T / sqrt(scale)`` with ``w_t = gamma**(L - t)`` over
  the real tokens ``t`` and ``L`` the last real position;
* ``scale``: ``[B, H, 1, 1]`` float32, ``sum_t w_t`` (``sum_{i<n} gamma**i`` for ``n`` real tokens);
* ``seqlen``: ``[]`` int32, tokens processed including padding (the next token's position); or ``[B]``, one
  position per row (rows at different positions, e.g. the slots of a serving batch).

All three forms hand over the same state, so decoding can continue after any of them.
"""

from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
F32 = jnp.float32


class RetentionState(NamedTuple):
    """Recurrent state of one retention layer (see the module docstring for the exact quantities)."""

    kv: Array  # [B, H, V, K] float32
    scale: Array  # [B, H, 1, 1] float32
    seqlen: Array  # [] or [B] int32


# --------------------------------------------------------------------------------------------- tables
def _f32(x: np.ndarray) -> np.ndarray:
    """Round to float32: the reference computes its tables in float32, and its rounding points matter."""
    return np.asarray(x, np.float64).astype(np.float32)


def _linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """torch's float32 ``linspace``: a float32 step, each half computed from its own end, then rounded."""
    start, end = float(np.float32(start)), float(np.float32(end))
    if num == 1:
        return _f32(np.array([start]))
    step = float(np.float32(np.float32(end) - np.float32(start)) / np.float32(num - 1))
    i = np.arange(num, dtype=np.float64)
    return _f32(np.where(i < num // 2, start + step * i, end - step * (num - 1 - i)))


def log_decay_table(num_heads: int, use_lm_decay: bool) -> np.ndarray:
    """Per-head ``log(gamma)``, ``[H]`` float32.

    Default scheme: ``gamma_h = 1 - 2**(-5 - h)``. ``use_lm_decay``: ``gamma = 1 - exp(x)`` with ``x`` spaced
    evenly from ``log(1/32)`` to ``log(1/512)`` (the RetNet paper's language-model allocation). Each step is
    rounded to float32 where the reference rounds, so e.g. ``1 - 2**-25`` becomes 1 (no decay) exactly as in
    the reference; each value is within one float32 ulp of the reference's buffer.
    """
    if use_lm_decay:
        x = _linspace_f32(_f32(np.log(1 / 32)), _f32(np.log(1 / 512)), num_heads)
        one_minus = np.float32(1) - _f32(np.exp(x.astype(np.float64)))
    else:
        one_minus = np.float32(1) - _f32(2.0 ** (-5.0 - np.arange(num_heads)))
    return _f32(np.log(one_minus.astype(np.float64)))


def angle_table(key_head_dim: int) -> np.ndarray:
    """Rotation frequencies ``[K]`` float32: ``1 / 10000**linspace(0, 1, K/2)``, each repeated twice
    (rounded to float32 at the reference's steps)."""
    power = _f32(10000.0 ** _linspace_f32(0.0, 1.0, key_head_dim // 2).astype(np.float64))
    return np.repeat(np.float32(1) / power, 2)


def rotate(x: Array, positions: Array, angle: Array) -> Array:
    """Rotate pairs ``(x[2i], x[2i+1])`` by ``positions * angle``: x ``[B, H, T, K]``, positions ``[T]`` (shared
    by the rows) or ``[B, T]`` (one per row)."""
    theta = positions.astype(F32)[..., None] * angle  # [T, K] or [B, T, K]
    if theta.ndim == 3:
        theta = theta[:, None]  # [B, 1, T, K]: the same for every head
    sin, cos = jnp.sin(theta).astype(x.dtype), jnp.cos(theta).astype(x.dtype)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos + rotated * sin


def _powers(exponent: Array, log_decay: Array) -> Array:
    """``gamma_h ** exponent`` where ``exponent >= 0`` and 0 elsewhere; adds a leading H axis."""
    ld = log_decay.reshape((-1,) + (1,) * exponent.ndim)
    return jnp.where(exponent >= 0, jnp.exp(jnp.maximum(exponent, 0).astype(F32) * ld), 0.0)


def _matmul(spec: str, a: Array, b: Array) -> Array:
    return jnp.einsum(spec, a, b, preferred_element_type=F32)


# ------------------------------------------------------------------------------------------- the state
def empty_state(batch: int, num_heads: int, key_dim: int, value_dim: int) -> RetentionState:
    """The state before any token: zeros, position 0."""
    return RetentionState(
        kv=jnp.zeros((batch, num_heads, value_dim, key_dim), F32),
        scale=jnp.zeros((batch, num_heads, 1, 1), F32),
        seqlen=jnp.zeros((), jnp.int32),
    )


def final_state(k: Array, v: Array, log_decay: Array, mask: Optional[Array]) -> RetentionState:
    """The state a whole-sequence pass leaves behind, equal to running :func:`recurrent_step` over it.

    k ``[B, H, T, K]``, v ``[B, H, T, V]``. Token ``t`` is weighted by ``gamma**(L - t)`` with ``L`` the last
    real position of its row; padding weighs nothing.
    """
    batch, _, length, _ = k.shape
    pos = jnp.arange(length)
    if mask is None:
        real = jnp.ones((batch, length), bool)
    else:
        real = mask.astype(bool)
    last = jnp.max(jnp.where(real, pos[None, :], -1), axis=-1)  # [B]
    w = _powers(last[:, None] - pos[None, :], log_decay)  # [H, B, T]
    w = jnp.where(real[None], w, 0.0).transpose(1, 0, 2)  # [B, H, T]
    scale = jnp.sum(w, axis=-1)[..., None, None]  # [B, H, 1, 1]
    w = w / jnp.sqrt(jnp.maximum(scale[..., 0], 1e-30))
    kv = _matmul("bhtv,bhtk->bhvk", v * w[..., None].astype(v.dtype), k)
    return RetentionState(kv=kv, scale=scale, seqlen=jnp.asarray(length, jnp.int32))


# ------------------------------------------------------------------------------------------- parallel
def parallel_decay_mask(log_decay: Array, length: int, mask: Optional[Array]) -> Array:
    """Normalised decay matrix ``[B or 1, H, T, T]``: ``gamma**(i-j)`` for ``j <= i`` (times ``mask[j]``),
    each row divided by the square root of its sum; all-zero rows stay zero."""
    pos = jnp.arange(length)
    d = _powers(pos[:, None] - pos[None, :], log_decay)[None]  # [1, H, T, T]
    if mask is not None:
        d = d * mask.astype(F32)[:, None, None, :]
    row = jnp.sum(d, axis=-1, keepdims=True)
    return jnp.where(row > 0, d / jnp.sqrt(jnp.where(row > 0, row, 1.0)), 0.0)


def parallel_retention(
    q: Array, k: Array, v: Array, log_decay: Array, mask: Optional[Array] = None
) -> Array:
    """Parallel form: ``(q k^T * D) v`` with rows divided by ``max(|row sum|, 1)``. Returns ``[B, H, T, V]``.

    Materialises ``[B, H, T, T]``; use :func:`chunkwise_retention` for long sequences.
    """
    d = parallel_decay_mask(log_decay, q.shape[2], mask)
    r = _matmul("bhik,bhjk->bhij", q, k) * d
    denom = jnp.maximum(jnp.abs(jnp.sum(jax.lax.stop_gradient(r), axis=-1, keepdims=True)), 1.0)
    r = r / denom
    return _matmul("bhij,bhjv->bhiv", r.astype(v.dtype), v)


# ------------------------------------------------------------------------------------------ chunkwise
def chunk_tables(log_decay: Array, chunk_size: int) -> Tuple[Array, Array, Array, Array]:
    """Tables of the chunkwise form for chunk size C (the reference's normalisation).

    Returns ``inner`` ``[H, C, C]`` (the chunk's decay matrix, rows divided by sqrt of their sums),
    ``query_decay`` ``[H, C]`` (``gamma**(i+1) * S_C / sqrt(row_i)``), ``value_decay`` ``[H, C]``
    (``gamma**(C-1-t) / S_C``) and ``chunk_decay`` ``[H]`` (``gamma**C``), where ``S_C = sum_{i<C} gamma**i``.
    """
    pos = jnp.arange(chunk_size)
    d = _powers(pos[:, None] - pos[None, :], log_decay)  # [H, C, C]
    row = jnp.sum(d, axis=-1)  # [H, C]
    s_c = row[:, -1:]  # [H, 1]
    inner = d / jnp.sqrt(row)[..., None]
    query_decay = _powers(pos + 1, log_decay) * s_c / jnp.sqrt(row)
    value_decay = d[:, -1, :] / s_c
    chunk_decay = jnp.exp(log_decay * chunk_size)
    return inner, query_decay, value_decay, chunk_decay


def chunkwise_retention(
    q: Array, k: Array, v: Array, log_decay: Array, chunk_size: int, mask: Optional[Array] = None
) -> Array:
    """Chunkwise form: exact attention inside chunks of C tokens, a ``lax.scan`` carrying the state across.

    Any T (the last chunk is padded internally). Padding tokens (``mask == 0``) contribute nothing.
    Memory is linear in T: nothing of size ``T x T`` is built. Returns ``[B, H, T, V]``.
    """
    batch, heads, length, kdim = q.shape
    vdim = v.shape[-1]
    c = chunk_size
    n = -(-length // c)
    if mask is not None:
        keep = mask.astype(k.dtype)[:, None, :, None]
        k, v = k * keep, v * keep
    pad = n * c - length

    def chunks(x: Array) -> Array:  # [B, H, T, D] -> [B, H, N, C, D]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
        return x.reshape(batch, heads, n, c, x.shape[-1])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    inner_mask, query_decay, value_decay, chunk_decay = chunk_tables(log_decay, c)

    qk = _matmul("bhnik,bhnjk->bhnij", qc, kc) * inner_mask[:, None]
    inner_scale = jnp.maximum(jnp.sum(jnp.abs(jax.lax.stop_gradient(qk)), -1, keepdims=True), 1.0)
    inner_out = _matmul("bhnij,bhnjv->bhniv", qk.astype(vc.dtype), vc)
    chunk_kv = _matmul("bhnck,bhncv->nbhkv", kc * value_decay[:, None, :, None].astype(kc.dtype), vc)

    def step(state: Array, kv_n: Array) -> Tuple[Array, Tuple[Array, Array]]:
        scale = jnp.max(jnp.sum(jnp.abs(jax.lax.stop_gradient(state)), axis=-2), axis=-1)
        scale = jnp.maximum(scale, 1.0)[..., None, None]  # [B, H, 1, 1]
        return state * chunk_decay[None, :, None, None] + kv_n, (state, scale)

    init = jnp.zeros((batch, heads, kdim, vdim), F32)
    _, (before, cross_scale) = jax.lax.scan(step, init, chunk_kv)  # [N, B, H, K, V], [N, B, H, 1, 1]
    cross_out = _matmul("bhnik,nbhkv->bhniv", qc * query_decay[:, None, :, None].astype(qc.dtype), before)
    all_scale = jnp.maximum(inner_scale, cross_scale.transpose(1, 2, 0, 3, 4))
    out = (inner_out + cross_out) / all_scale
    return out.reshape(batch, heads, n * c, vdim)[:, :, :length].astype(v.dtype)


# ------------------------------------------------------------------------------------------ recurrent
def recurrent_step(
    q: Array, k: Array, v: Array, log_decay: Array, state: RetentionState, mask: Optional[Array] = None
) -> Tuple[Array, RetentionState]:
    """One token: q, k ``[B, H, K]``, v ``[B, H, V]``, mask ``[B]``. Returns ``([B, H, V], new state)``.

    ``scale <- scale * gamma + 1`` and ``kv <- kv * sqrt(old/new scale) * gamma + v k^T / sqrt(new scale)``;
    a padding token (mask 0) leaves the state unchanged except for its position.
    """
    gamma = jnp.exp(log_decay)[None, :, None, None]
    q, k, v = q.astype(F32), k.astype(F32), v.astype(F32)
    real_rows = jnp.ones(q.shape[:1], bool) if mask is None else mask.astype(bool)
    real = real_rows[:, None, None, None]

    def update(k: Array, v: Array) -> Tuple[Array, Array]:
        scale = jnp.where(real, state.scale * gamma + 1.0, state.scale)
        safe = jnp.where(scale > 0, scale, 1.0)
        carry = jnp.where(real, jnp.sqrt(state.scale) * gamma / jnp.sqrt(safe), 1.0)
        new = jnp.where(real & (scale > 0), v[..., :, None] * k[..., None, :] / jnp.sqrt(safe), 0.0)
        return state.kv * carry + new, scale

    # A step where every row is padding keeps kv and scale. Being a conditional's operands, k and v are also
    # materialised first: fused into the [B, H, V, K] outer product, the rotation of k (a sin and a cos per
    # element) would be recomputed V times, which makes a decoding step on CPU about 1.5x slower.
    kv, scale = jax.lax.cond(jnp.any(real_rows), update, lambda k, v: (state.kv, state.scale), k, v)
    out = jnp.einsum("bhk,bhvk->bhv", q, kv)
    return out, RetentionState(kv=kv, scale=scale, seqlen=state.seqlen + 1)


def recurrent_retention(
    q: Array, k: Array, v: Array, log_decay: Array, state: RetentionState, mask: Optional[Array] = None
) -> Tuple[Array, RetentionState]:
    """T recurrent steps in one ``lax.scan``, starting from ``state``. Returns ``([B, H, T, V], state)``."""
    xs = (q.transpose(2, 0, 1, 3), k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3))
    if mask is None:
        mask = jnp.ones((q.shape[0], q.shape[2]), jnp.int32)

    def step(s: RetentionState, x: Tuple[Array, Array, Array, Array]) -> Tuple[RetentionState, Array]:
        qt, kt, vt, mt = x
        out, s = recurrent_step(qt, kt, vt, log_decay, s, mt)
        return s, out

    state, out = jax.lax.scan(step, state, xs + (mask.T,))
    return out.transpose(1, 2, 0, 3).astype(v.dtype), state
