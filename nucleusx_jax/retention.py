"""Retention as pure JAX functions: tables, the parallel, chunkwise and recurrent forms, and the state.

Shapes use B batch, H heads, T length, K key head dim, V value head dim, C chunk size.
``q`` and ``k`` are ``[B, H, T, K]`` and already rotated (``k`` also scaled by ``K**-0.5``); ``v`` is
``[B, H, T, V]``; ``mask`` is ``[B, T]`` with 1 for real tokens and 0 for padding, or ``None``.

Every form returns the retention output ``[B, H, T, V]`` before the per-head RMSNorm. The parallel and the
chunkwise form (with ``normalization="exact"``, the default, or with segments) give equal rows; the recurrent
form differs by a positive scalar per row, and so does the reference's chunkwise form
(``normalization="reference"``, chunk-dependent rows), which that RMSNorm removes up to its epsilon.

The recurrent state is a :class:`RetentionState`, laid out like the reference's cache
``(prev_key_value, scale, seqlen)``:

* ``kv``: ``[B, H, V, K]`` float32, ``sum_t w_t v_t k_t^T / sqrt(scale)`` with ``w_t = gamma**(L - t)`` over
  the real tokens ``t`` and ``L`` the last real position;
* ``scale``: ``[B, H, 1, 1]`` float32, ``sum_t w_t`` (``sum_{i<n} gamma**i`` for ``n`` real tokens);
* ``seqlen``: ``[]`` int32, tokens processed including padding (the next token's position).

All three forms hand over the same state, so decoding can continue after any of them.
A chunkwise window can also continue the state an earlier window left, exactly (:class:`CarriedState`,
:func:`chunkwise_carry`), so a long sequence runs as consecutive windows with one pass's numbers.

Documents (``segment_ids`` ``[B, T]`` int, 0 for padding; a segment is one contiguous run of equal non-zero
ids and an id never reappears later in its row, see :func:`check_segment_ids`): token ``i`` sees token ``j``
only inside its own segment. Every form then gives a document the numbers it gets alone: the parallel decay
mask is zero across segments and its row sums count the own segment only; the recurrent state resets where a
segment starts; the chunkwise form masks inside chunks, resets the carried state where a segment starts, and
normalises each row as the parallel form does (``max(|row sum|, 1)`` with ``sqrt`` of the segment-local
decay sum), so its result does not depend on where chunk boundaries fall (``"exact"`` without segments runs
that path on one document per row, :func:`normalizing_segments`). Rotation positions restart at 0
(:func:`segment_positions`) and the state handed on is that of the row's last segment, with ``seqlen`` per row
``[B]`` (the next position in that segment). With a cache, a call's first segment continues the cached
document and every later segment starts a new one.
"""

from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from .configuration import ChunkwiseNormalization

F32 = jnp.float32


class RetentionState(NamedTuple):
    """Recurrent state of one retention layer (see the module docstring for the exact quantities)."""

    kv: jax.Array  # [B, H, V, K] float32
    scale: jax.Array  # [B, H, 1, 1] float32
    seqlen: jax.Array  # [] int32


class CarriedState(NamedTuple):
    """What a chunkwise window hands to the next one of the same rows (:func:`chunkwise_carry`), so windows run
    one after the other give the numbers of one pass over their concatenation.

    It holds the document of the window's last token ``L`` (the row's last segment), un-normalised:

    * ``kv``: ``[B, H, K, V]`` float32, ``sum_t gamma**(L - t) k_t v_t^T`` over that document's real tokens;
    * ``z``: ``[B, H, K, 1]`` float32, the same with ``v_t = 1``: the row sums of ``q k^T * D`` that the exact
      normalisation divides by read it (it only enters normalisers, so it carries no gradient); None after a
      window with ``normalization="reference"`` and no segments, whose normaliser reads ``kv`` alone;
    * ``count``: ``[B]`` int32, that document's positions so far (padding inside it included): the exact
      normalisation divides row ``i`` by ``sqrt(sum_{l <= p} gamma**l)``, ``p`` its position in the document.
      ``count == 0`` is the empty state: the next window starts a new document.

    A :class:`RetentionState` cannot stand in for it: its ``kv`` is divided by ``sqrt(scale)`` (a
    normalisation of the recurrent form; :func:`carried_to_recurrent` converts to it, for decoding after a
    window) and it has no ``z``, which the exact chunkwise row sums need, so the other way is impossible.
    It does not depend on the chunk size either: the chunk grids of the windows may differ.
    """

    kv: jax.Array  # [B, H, K, V] float32
    z: Optional[jax.Array]  # [B, H, K, 1] float32 or None
    count: jax.Array  # [B] int32


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


def rotate(x: jax.Array, positions: jax.Array, angle: jax.Array) -> jax.Array:
    """Rotate pairs ``(x[2i], x[2i+1])`` by ``positions * angle``: x ``[B, H, T, K]``, positions ``[T]`` or
    ``[B, T]``."""
    theta = positions.astype(F32)[..., None] * angle  # [T, K] or [B, T, K]
    if theta.ndim == 3:
        theta = theta[:, None]  # [B, 1, T, K]
    sin, cos = jnp.sin(theta).astype(x.dtype), jnp.cos(theta).astype(x.dtype)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos + rotated * sin


def _powers(exponent: jax.Array, log_decay: jax.Array) -> jax.Array:
    """``gamma_h ** exponent`` where ``exponent >= 0`` and 0 elsewhere; adds a leading H axis."""
    ld = log_decay.reshape((-1,) + (1,) * exponent.ndim)
    return jnp.where(exponent >= 0, jnp.exp(jnp.maximum(exponent, 0).astype(F32) * ld), 0.0)


def _matmul(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=F32)


# ------------------------------------------------------------------------------------------- segments
def check_segment_ids(segment_ids: np.ndarray, shape: Tuple[int, int]) -> None:
    """Host-side check of ``segment_ids`` for inputs of ``shape`` ``[B, T]``: integers, the same shape, no
    negative ids, and every non-zero id one contiguous run in its row. Raises ``ValueError`` naming the fault."""
    seg = np.asarray(segment_ids)
    if seg.shape != tuple(shape):
        raise ValueError(f"segment_ids has shape {seg.shape} but input_ids has shape {tuple(shape)}; "
                         "they must be equal")
    if not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(f"segment_ids must hold integers (0 = padding, 1, 2, ... documents), got dtype {seg.dtype}")
    if (seg < 0).any():
        raise ValueError(f"segment_ids must be >= 0 (0 = padding), got {sorted(set(seg[seg < 0].tolist()))[:10]}")
    for row, ids in enumerate(seg):
        starts = ids[np.flatnonzero(np.diff(ids, prepend=-1))]  # the id of every run, in order
        runs = starts[starts != 0]
        if len(np.unique(runs)) != len(runs):
            again = next(int(x) for i, x in enumerate(runs) if x in runs[:i])
            raise ValueError(f"segment_ids row {row}: id {again} reappears after another segment; a segment must "
                             "be one contiguous run of equal ids")


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """``[B, T]`` -> ``[B, T]`` int32: the index of the first token of each token's run of equal ids."""
    length = segment_ids.shape[1]
    new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return jax.lax.cummax(jnp.where(new, jnp.arange(length, dtype=jnp.int32)[None], 0), axis=1)


def _segment_layout(segment_ids: jax.Array, mask: Optional[jax.Array],
                    starts: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """(starts ``[B, T]``, real ``[B, T]`` bool, in the row's first segment ``[B, T]`` bool)."""
    starts = segment_starts(segment_ids) if starts is None else starts
    real = segment_ids != 0
    if mask is not None:
        real = real & mask.astype(bool)
    first = jnp.take_along_axis(starts, jnp.argmax(real, axis=1)[:, None], axis=1)  # [B, 1]
    return starts, real, real & (starts == first)


def segment_positions(segment_ids: jax.Array, offset: jax.Array, mask: Optional[jax.Array] = None,
                      starts: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """Rotation positions ``[B, T]`` int32 restarting at 0 where a segment starts, and the next position ``[B]``.

    The row's first segment continues from ``offset`` (``[]`` or ``[B]``, a cache's ``seqlen``); the next
    position is that of the row's last real token plus one (``offset`` for a row without real tokens).
    ``starts``: :func:`segment_starts` of ``segment_ids`` when already known.
    """
    starts, real, first = _segment_layout(segment_ids, mask, starts)
    offset = jnp.broadcast_to(jnp.asarray(offset, jnp.int32), segment_ids.shape[:1])
    pos = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None] - starts + jnp.where(first, offset[:, None], 0)
    last = jnp.max(jnp.where(real, jnp.arange(segment_ids.shape[1])[None], -1), axis=1)  # [B]
    after = jnp.take_along_axis(pos, jnp.maximum(last, 0)[:, None], axis=1)[:, 0] + 1
    return pos, jnp.where(last >= 0, after, offset)


def real_tokens(mask: Optional[jax.Array], segment_ids: Optional[jax.Array]) -> Optional[jax.Array]:
    """Real tokens ``[B, T]`` bool (non-zero segment and mask 1), or None when neither is given."""
    if segment_ids is None:
        return None if mask is None else mask.astype(bool)
    return (segment_ids != 0) if mask is None else (segment_ids != 0) & mask.astype(bool)


# ------------------------------------------------------------------------------------------- the state
def empty_state(batch: int, num_heads: int, key_dim: int, value_dim: int) -> RetentionState:
    """The state before any token: zeros, position 0."""
    return RetentionState(
        kv=jnp.zeros((batch, num_heads, value_dim, key_dim), F32),
        scale=jnp.zeros((batch, num_heads, 1, 1), F32),
        seqlen=jnp.zeros((), jnp.int32),
    )


def empty_carried(batch: int, num_heads: int, key_dim: int, value_dim: int) -> CarriedState:
    """The :class:`CarriedState` before any token: zeros, ``count`` 0 (the next window starts a document)."""
    return CarriedState(kv=jnp.zeros((batch, num_heads, key_dim, value_dim), F32),
                        z=jnp.zeros((batch, num_heads, key_dim, 1), F32), count=jnp.zeros((batch,), jnp.int32))


def carried_to_recurrent(state: CarriedState, log_decay: jax.Array) -> RetentionState:
    """The :class:`RetentionState` of a :class:`CarriedState` (``seqlen`` ``[B]`` = ``count``), to decode on
    with :func:`recurrent_step`. Exact when the document had no padding inside it (the recurrent form does not
    decay over padding; the chunkwise form does)."""
    scale = jnp.moveaxis(decay_sums(state.count, log_decay), 0, 1)[..., None, None]  # [B, H, 1, 1]
    kv = jnp.swapaxes(state.kv, -1, -2) / jnp.sqrt(jnp.maximum(scale, 1e-30))
    return RetentionState(kv=jnp.where(scale > 0, kv, 0.0), scale=scale, seqlen=state.count)


def final_state(k: jax.Array, v: jax.Array, log_decay: jax.Array, mask: Optional[jax.Array],
                segment_ids: Optional[jax.Array] = None) -> RetentionState:
    """The state a whole-sequence pass leaves behind, equal to running :func:`recurrent_step` over it.

    k ``[B, H, T, K]``, v ``[B, H, T, V]``. Token ``t`` is weighted by ``gamma**(L - t)`` with ``L`` the last
    real position of its row; padding weighs nothing. With ``segment_ids`` ``[B, T]`` only the segment of
    ``L`` counts, and ``seqlen`` ``[B]`` is the next position in it (:func:`segment_positions`).
    """
    batch, _, length, _ = k.shape
    pos = jnp.arange(length)
    real = real_tokens(mask, segment_ids)
    if real is None:
        real = jnp.ones((batch, length), bool)
    last = jnp.max(jnp.where(real, pos[None, :], -1), axis=-1)  # [B]
    seqlen = jnp.asarray(length, jnp.int32)
    if segment_ids is not None:
        starts = segment_starts(segment_ids)
        real = real & (starts == jnp.take_along_axis(starts, jnp.maximum(last, 0)[:, None], axis=1))
        seqlen = segment_positions(segment_ids, 0, mask)[1]
    w = _powers(last[:, None] - pos[None, :], log_decay)  # [H, B, T]
    w = jnp.where(real[None], w, 0.0).transpose(1, 0, 2)  # [B, H, T]
    scale = jnp.sum(w, axis=-1)[..., None, None]  # [B, H, 1, 1]
    w = w / jnp.sqrt(jnp.maximum(scale[..., 0], 1e-30))
    kv = _matmul("bhtv,bhtk->bhvk", v * w[..., None].astype(v.dtype), k)
    return RetentionState(kv=kv, scale=scale, seqlen=seqlen)


# ------------------------------------------------------------------------------------------- parallel
def parallel_decay_mask(log_decay: jax.Array, length: int, mask: Optional[jax.Array],
                        segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Normalised decay matrix ``[B or 1, H, T, T]``: ``gamma**(i-j)`` for ``j <= i`` (times ``mask[j]``; with
    ``segment_ids`` only for ``j`` in the segment of ``i``), each row divided by the square root of its sum;
    all-zero rows stay zero."""
    pos = jnp.arange(length)
    d = _powers(pos[:, None] - pos[None, :], log_decay)[None]  # [1, H, T, T]
    if segment_ids is not None:
        d = d * (pos[None, None, :] >= segment_starts(segment_ids)[:, :, None])[:, None].astype(F32)
    real = real_tokens(mask, segment_ids)
    if real is not None:
        d = d * real.astype(F32)[:, None, None, :]
    row = jnp.sum(d, axis=-1, keepdims=True)
    return jnp.where(row > 0, d / jnp.sqrt(jnp.where(row > 0, row, 1.0)), 0.0)


def parallel_retention(
    q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, mask: Optional[jax.Array] = None,
    segment_ids: Optional[jax.Array] = None,
) -> jax.Array:
    """Parallel form: ``(q k^T * D) v`` with rows divided by ``max(|row sum|, 1)``. Returns ``[B, H, T, V]``.

    Materialises ``[B, H, T, T]``; use :func:`chunkwise_retention` for long sequences.
    """
    d = parallel_decay_mask(log_decay, q.shape[2], mask, segment_ids)
    r = _matmul("bhik,bhjk->bhij", q, k) * d
    denom = jnp.maximum(jnp.abs(jnp.sum(jax.lax.stop_gradient(r), axis=-1, keepdims=True)), 1.0)
    r = r / denom
    return _matmul("bhij,bhjv->bhiv", r.astype(v.dtype), v)


# ------------------------------------------------------------------------------------------ chunkwise
def chunk_tables(log_decay: jax.Array, chunk_size: int) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
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


class ChunkSegments(NamedTuple):
    """Segments in the chunk grid of the chunkwise forms (T padded to N * C; see :func:`chunk_segments`)."""

    local_start: jax.Array  # [B, N * C] int32: start of the token's segment minus the start of its chunk
    factor: jax.Array  # [B, H, N * C] float32: sqrt(S_{i+1} / S_{p+1}), i the index in the chunk, p in the segment


def decay_sums(count: jax.Array, log_decay: jax.Array) -> jax.Array:
    """``S_m = sum_{l<m} gamma**l`` for ``count`` ``m >= 1`` (any shape), with a leading H axis: the closed
    form ``(1 - gamma**m) / (1 - gamma)`` (``m`` where ``gamma`` is 1)."""
    ld = log_decay.reshape((-1,) + (1,) * count.ndim)
    m = count.astype(F32)
    return jnp.where(ld == 0, m, jnp.expm1(m * ld) / jnp.where(ld == 0, 1.0, jnp.expm1(ld)))


def chunk_segments(segment_ids: jax.Array, log_decay: jax.Array, chunk_size: int) -> ChunkSegments:
    """:class:`ChunkSegments` of ``segment_ids`` ``[B, T]`` for chunks of C tokens (``S_m = sum_{l<m} gamma**l``).

    Within chunk ``n``, token ``i`` sees ``j`` when ``j >= local_start[i]``; it reads the carried state when
    ``local_start[i] < 0``. The state carried on holds only the segment of the chunk's last token. The
    internal padding at the end is a segment of its own.
    """
    return segments_from_starts(chunk_starts(segment_ids, chunk_size), log_decay, chunk_size)


def chunk_starts(segment_ids: jax.Array, chunk_size: int) -> jax.Array:
    """:func:`segment_starts` of ``segment_ids`` ``[B, T]`` padded to whole chunks with a segment of its own."""
    pad = -segment_ids.shape[1] % chunk_size
    return segment_starts(jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1))


def segments_from_starts(starts: jax.Array, log_decay: jax.Array, chunk_size: int) -> ChunkSegments:
    """:class:`ChunkSegments` from the start of every token's segment, ``starts`` ``[B, N * C]`` int32, counted
    from the first token given (negative: the segment began before it, in an earlier slice of the sequence)."""
    pos = jnp.arange(starts.shape[1], dtype=jnp.int32)
    factor = jnp.sqrt(decay_sums(pos % chunk_size + 1, log_decay)[:, None]
                      / decay_sums(pos[None] - starts + 1, log_decay))  # [H, B, N * C]
    return ChunkSegments(starts - pos // chunk_size * chunk_size, factor.transpose(1, 0, 2))


def segment_scale(row_sum: jax.Array, factor: jax.Array) -> jax.Array:
    """The chunkwise forms' divisor with segments: ``max(|row_sum| * factor, 1) / factor`` (same shapes).

    ``row_sum`` is the chunk-normalised row sum of ``q k^T * D``; dividing by the result normalises each row
    as :func:`parallel_retention` does (see :func:`chunk_segments`)."""
    return jnp.maximum(jnp.abs(row_sum) * factor, 1.0) / factor


class ChunkTerms(NamedTuple):
    """What the chunkwise form computes per chunk before the state is carried (N chunks of C tokens)."""

    qk: jax.Array  # [B, H, N, C, C] float32: masked, decayed q k^T inside each chunk
    inner_out: jax.Array  # [B, H, N, C, V] float32: the chunk's own contribution
    qd: jax.Array  # [B, H, N, C, K]: queries scaled to read the state entering their chunk
    chunk_kv: jax.Array  # [N, B, H, K, V] float32: what each chunk adds to the state
    chunk_z: Optional[jax.Array]  # [N, B, H, K, 1] float32 with segments: the same for v = 1 (for the row sums)
    carried: jax.Array  # [N, B, 1, 1, 1] float32: 1 where the state entering chunk n goes on past it
    factor: Optional[jax.Array]  # [B, H, N, C] float32 with segments (:class:`ChunkSegments`)


class ChunkStates(NamedTuple):
    """States entering each chunk (``kv`` ``[N, B, H, K, V]``, ``z`` ``[N, B, H, K, 1]`` or None) or, without
    the N axis, the state a run of chunks hands on."""

    kv: jax.Array
    z: Optional[jax.Array]


def chunk_terms(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, chunk_size: int,
                real: Optional[jax.Array], starts: Optional[jax.Array]) -> ChunkTerms:
    """:class:`ChunkTerms` of q, k ``[B, H, T, K]``, v ``[B, H, T, V]`` (T padded to N * C inside), ``real``
    ``[B, T]`` bool or None, and with segments ``starts`` ``[B, N * C]`` (see :func:`segments_from_starts`)."""
    batch, heads, length, _ = q.shape
    c = chunk_size
    n = -(-length // c)
    if real is not None:
        keep = real.astype(k.dtype)[:, None, :, None]
        k, v = k * keep, v * keep

    def chunks(x: jax.Array) -> jax.Array:  # [B, H, T, D] -> [B, H, N, C, D]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, n * c - length), (0, 0)))
        return x.reshape(batch, heads, n, c, x.shape[-1])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    inner_mask, query_decay, value_decay, _ = chunk_tables(log_decay, c)
    query_decay = jnp.broadcast_to(query_decay[:, None], (heads, n, c))  # [H, N, C]
    value_decay = jnp.broadcast_to(value_decay[:, None], (heads, n, c))
    carried = jnp.ones((n, batch, 1, 1, 1), F32)
    inner_mask = inner_mask[:, None]  # [H, 1, C, C]
    factor = None
    if starts is not None:
        segs = segments_from_starts(starts, log_decay, c)
        local = segs.local_start.reshape(batch, 1, n, c)
        idx = jnp.arange(c)
        inner_mask = inner_mask * (idx >= local[..., None]).astype(F32)  # [B, H, N, C, C]
        query_decay = query_decay * (local < 0).astype(F32)  # [B, H, N, C]
        last = local[..., -1:]  # [B, 1, N, 1]
        value_decay = value_decay * (idx >= last).astype(F32)
        carried = (last < 0).astype(F32).transpose(2, 0, 1, 3)[..., None]  # [N, B, 1, 1, 1]
        factor = segs.factor.reshape(batch, heads, n, c)

    qk = _matmul("bhnik,bhnjk->bhnij", qc, kc) * inner_mask
    inner_out = _matmul("bhnij,bhnjv->bhniv", qk.astype(vc.dtype), vc)
    kd = kc * value_decay[..., None].astype(kc.dtype)
    chunk_kv = _matmul("bhnck,bhncv->nbhkv", kd, vc)
    # with segments the row sums of q k^T * D need the state of v = 1: z [K, 1], carried alongside
    chunk_z = None if starts is None else jnp.sum(
        jax.lax.stop_gradient(kd).astype(F32), axis=3).transpose(2, 0, 1, 3)[..., None]
    qd = qc * query_decay[..., None].astype(qc.dtype)
    return ChunkTerms(qk, inner_out, qd, chunk_kv, chunk_z, carried, factor)


def chunk_states(terms: ChunkTerms, log_decay: jax.Array, chunk_size: int,
                 init: Optional[ChunkStates] = None) -> Tuple[ChunkStates, ChunkStates]:
    """A ``lax.scan`` over the chunks from ``init`` (the state entering the first chunk, chunk-normalised as
    :func:`chunk_init` makes it; None: empty): (the state entering each chunk, the state after the last)."""
    chunk_decay = jnp.exp(log_decay * chunk_size)[None, :, None, None]  # [1, H, 1, 1]

    def step(state: ChunkStates,
             x: Tuple[jax.Array, Optional[jax.Array], jax.Array]) -> Tuple[ChunkStates, ChunkStates]:
        decay = chunk_decay * x[2]
        return ChunkStates(state.kv * decay + x[0], None if x[1] is None else state.z * decay + x[1]), state

    if init is None:
        init = ChunkStates(jnp.zeros_like(terms.chunk_kv[0]),  # like the terms, also inside shard_map
                           None if terms.chunk_z is None else jnp.zeros_like(terms.chunk_z[0]))
    final, before = jax.lax.scan(step, init, (terms.chunk_kv, terms.chunk_z, terms.carried))
    return before, final


def chunk_init(state: CarriedState, log_decay: jax.Array, chunk_size: int, with_z: bool) -> ChunkStates:
    """The state entering a window's first chunk, as :func:`chunk_states` carries it: a :class:`CarriedState`
    divided by ``S_C = sum_{l<C} gamma**l`` (``kv`` ``[B, H, K, V]``; ``z`` ``[B, H, K, 1]`` when ``with_z``, the
    segments path, else None). ``z`` enters normalisers only: no gradient, as in the one-pass form.
    Raises ``ValueError`` when ``with_z`` and the state has none (it came from a ``"reference"`` window)."""
    if with_z and state.z is None:
        raise ValueError("state.z is None (a state left by normalization='reference' without segments): the exact "
                         "normalisation and segments need z; run every window with the same normalization")
    s_c = decay_sums(jnp.asarray(chunk_size), log_decay)[None, :, None, None]  # [1, H, 1, 1]
    z = jax.lax.stop_gradient(state.z.astype(F32)) / s_c if with_z else None
    return ChunkStates(state.kv.astype(F32) / s_c, z)


def continue_starts(starts: jax.Array, count: jax.Array) -> jax.Array:
    """Segment starts ``[B, N * C]`` (:func:`segments_from_starts`) of a window continuing a document of
    ``count`` ``[B]`` positions: the run at the window's first token (start 0) began ``count`` tokens before
    it; later runs are new documents. ``count`` 0 leaves ``starts`` as they are."""
    return jnp.where(starts == 0, -count.astype(starts.dtype)[:, None], starts)


def chunk_carried(after: ChunkStates, log_decay: jax.Array, chunk_size: int, starts: Optional[jax.Array],
                  count: jax.Array, length: int) -> CarriedState:
    """The :class:`CarriedState` of a window of whole chunks from the state after its last chunk (``after`` from
    :func:`chunk_states`: ``[B, H, K, V]`` and ``[B, H, K, 1]`` or None, chunk-normalised), un-normalised. Its
    last chunk's ``value_decay`` and ``carried`` already keep only the last segment's tokens. ``starts``
    ``[B, >= length]`` or None and ``count`` ``[B]`` as in :func:`state_after`."""
    s_c = decay_sums(jnp.asarray(chunk_size), log_decay)[None, :, None, None]
    count = count + length if starts is None else length - starts[:, length - 1]
    z = None if after.z is None else jax.lax.stop_gradient(after.z * s_c)
    return CarriedState(kv=after.kv * s_c, z=z, count=count.astype(jnp.int32))


def chunk_final(k: jax.Array, v: jax.Array, log_decay: jax.Array, chunk_size: int, real: Optional[jax.Array],
                starts: Optional[jax.Array], before: ChunkStates, count: jax.Array) -> CarriedState:
    """The :class:`CarriedState` after the last of T tokens from the state entering the last chunk (``before``
    from :func:`chunk_states`, ``[N, B, H, K, V]`` and ``[N, B, H, K, 1]`` or None): :func:`state_after` of
    that chunk's tokens. Arguments as there."""
    base = (-(-k.shape[2] // chunk_size) - 1) * chunk_size  # first token of the last chunk
    s_c = decay_sums(jnp.asarray(chunk_size), log_decay)[None, :, None, None]
    entering = jax.tree.map(lambda x: x[-1] * s_c, before)
    return state_after(k, v, log_decay, real, starts, entering, base, count)


def state_after(k: jax.Array, v: jax.Array, log_decay: jax.Array, real: Optional[jax.Array],
                starts: Optional[jax.Array], entering: ChunkStates, base: int, count: jax.Array) -> CarriedState:
    """The :class:`CarriedState` after the last of T tokens: ``entering`` (un-normalised, the state after token
    ``base - 1``: ``kv`` ``[B, H, K, V]``, ``z`` ``[B, H, K, 1]`` or None) decayed over tokens ``base`` to T - 1,
    plus theirs. k ``[B, H, T, K]``, v ``[B, H, T, V]``, real ``[B, T]`` bool or None, starts ``[B, >= T]``
    (segments; :func:`segments_from_starts`) or None, ``count`` ``[B]`` the document's positions before token 0
    (without segments the result's count is ``count + T``). The state holds the segment of token T - 1."""
    length = k.shape[2]
    pos = jnp.arange(base, length)
    keep = jnp.ones((k.shape[0], length - base), bool) if real is None else real[:, base:].astype(bool)
    if starts is None:
        through = jnp.ones(k.shape[:1], F32)
        count = count + length
    else:
        last = starts[:, length - 1]  # [B]: the start of the carried segment
        keep = keep & (pos[None] >= last[:, None])
        through = (last < base).astype(F32)
        count = length - last
    w = _powers(length - 1 - pos, log_decay)[:, None] * keep[None].astype(F32)  # [H, B, r]
    w = w.transpose(1, 0, 2)[..., None]  # [B, H, r, 1]
    carry = (through[:, None] * jnp.exp(log_decay * (length - base))[None])[..., None, None]  # [B, H, 1, 1]
    kt, vt = k[:, :, base:], v[:, :, base:]
    kv = entering.kv * carry + _matmul("bhtk,bhtv->bhkv", kt * w.astype(kt.dtype), vt)
    z = None
    if entering.z is not None:
        z = entering.z * carry + jnp.sum(jax.lax.stop_gradient(kt).astype(F32) * w, axis=2)[..., None]
        z = jax.lax.stop_gradient(z)
    return CarriedState(kv=kv, z=z, count=count.astype(jnp.int32))


def state_reach(carried: jax.Array, log_decay: jax.Array, chunk_size: int) -> Tuple[jax.Array, jax.Array]:
    """How much of a state entering a run of N chunks reaches each, from ``carried`` ``[N, B, 1, 1, 1]``
    (:class:`ChunkTerms`): ``gamma**(n C)``, and 0 past a segment start. Returns (reach ``[N, B, H, 1, 1]``, what
    leaves the run ``[B, H, 1, 1]``)."""
    n = carried.shape[0]
    kept = jnp.cumprod(carried, axis=0)  # [N, B, 1, 1, 1]
    decay = jnp.exp(log_decay[None, :, None, None] * chunk_size * jnp.arange(n + 1, dtype=F32)[:, None, None, None])
    reach = decay[:n, None] * jnp.concatenate([jnp.ones_like(kept[:1]), kept[:-1]])
    return reach, decay[n] * kept[-1]


def chunk_output(terms: ChunkTerms, before: ChunkStates, length: int, dtype: Any) -> jax.Array:
    """The chunkwise form's output ``[B, H, T, V]`` from its terms and the state entering each chunk, with the
    reference's normalisation (the larger of the inner and the state's row scale; with segments the parallel
    form's row sums, :func:`segment_scale`)."""
    batch, heads, n, c, vdim = terms.inner_out.shape
    qk = jax.lax.stop_gradient(terms.qk)
    if terms.factor is None:
        cross_scale = jnp.max(jnp.sum(jnp.abs(jax.lax.stop_gradient(before.kv)), axis=-2), axis=-1)  # [N, B, H]
        cross_scale = jnp.maximum(cross_scale, 1.0).transpose(1, 2, 0)[..., None, None]  # [B, H, N, 1, 1]
        inner_scale = jnp.maximum(jnp.sum(jnp.abs(qk), -1, keepdims=True), 1.0)
        all_scale = jnp.maximum(inner_scale, cross_scale)
    else:
        row_sum = jnp.sum(qk, -1) + _matmul("bhnik,nbhkv->bhniv", jax.lax.stop_gradient(terms.qd), before.z)[..., 0]
        all_scale = segment_scale(row_sum, terms.factor)[..., None]
    cross_out = _matmul("bhnik,nbhkv->bhniv", terms.qd, before.kv)
    out = (terms.inner_out + cross_out) / all_scale
    return out.reshape(batch, heads, n * c, vdim)[:, :, :length].astype(dtype)


def normalizing_segments(segment_ids: Optional[jax.Array], mask: Optional[jax.Array], shape: Tuple[int, int],
                         normalization: str) -> Optional[jax.Array]:
    """The segment ids ``[B, T]`` (``shape``) a chunkwise form runs with: ``segment_ids`` when given; without
    them, for ``"exact"`` normalisation, one document per row (0 before the row's first real token, 1 from it
    on), whose rows the segments path normalises as :func:`parallel_retention` does; for ``"reference"`` None
    (the reference's chunk-dependent rows). Raises ``ValueError`` for any other ``normalization``."""
    exact = ChunkwiseNormalization.parse(normalization, "chunkwise_normalization") is ChunkwiseNormalization.EXACT
    if segment_ids is not None or not exact:
        return segment_ids
    if mask is None:
        return jnp.ones(shape, jnp.int32)
    return jax.lax.cummax((mask != 0).astype(jnp.int32), axis=1)


def chunkwise_retention(
    q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, chunk_size: int, mask: Optional[jax.Array] = None,
    segment_ids: Optional[jax.Array] = None, normalization: str = "exact",
) -> jax.Array:
    """Chunkwise form: exact attention inside chunks of C tokens, a ``lax.scan`` carrying the state across.

    Any T (the last chunk is padded internally). Padding tokens (``mask == 0``) contribute nothing.
    Memory is linear in T: nothing of size ``T x T`` is built. Returns ``[B, H, T, V]``. With
    ``segment_ids`` ``[B, T]``, or ``normalization="exact"``, every real token's row equals
    :func:`parallel_retention`'s for any chunk size; ``"reference"`` without segments gives the reference's
    chunk-dependent rows (see the module docstring). :func:`chunkwise_carry` also takes and returns a state.
    """
    return _chunkwise(q, k, v, log_decay, chunk_size, mask, segment_ids, normalization, None, False)[0]


def chunkwise_carry(
    q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, chunk_size: int,
    state: Optional[CarriedState], mask: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None,
    normalization: str = "exact",
) -> Tuple[jax.Array, CarriedState]:
    """:func:`chunkwise_retention` of a window continuing ``state`` (a :class:`CarriedState`, or None: nothing
    before), returning ``([B, H, T, V], the state after its last token)``, with gradients to both.

    Windows run one after the other this way give one pass's numbers over their concatenation, for both
    normalisations (``"reference"`` when the windows' lengths are multiples of C, its rows depending on the
    chunk grid), with or without segments. The run at the window's first token continues ``state`` (with
    ``state.count`` 0 it starts a document); a segment starting later ignores it. The state read is decayed
    from the previous window's last token, so windows must be contiguous.
    """
    return _chunkwise(q, k, v, log_decay, chunk_size, mask, segment_ids, normalization, state, True)


def _chunkwise(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, chunk_size: int,
               mask: Optional[jax.Array], segment_ids: Optional[jax.Array], normalization: str,
               state: Optional[CarriedState], final: bool) -> Tuple[jax.Array, Optional[CarriedState]]:
    """The chunkwise form from ``state`` (None: empty, no work added), with the final state when ``final``."""
    segment_ids = normalizing_segments(segment_ids, mask, q.shape[::2], normalization)
    starts = None if segment_ids is None else chunk_starts(segment_ids, chunk_size)
    if state is not None and starts is not None:
        starts = continue_starts(starts, state.count)
    real = real_tokens(mask, segment_ids)
    terms = chunk_terms(q, k, v, log_decay, chunk_size, real, starts)
    init = None if state is None else chunk_init(state, log_decay, chunk_size, terms.chunk_z is not None)
    before, after = chunk_states(terms, log_decay, chunk_size, init)
    out = chunk_output(terms, before, q.shape[2], v.dtype)
    if not final:
        return out, None
    count = jnp.zeros(q.shape[:1], jnp.int32) if state is None else state.count
    if q.shape[2] % chunk_size == 0:  # the scan's last state is the window's: nothing to add
        return out, chunk_carried(after, log_decay, chunk_size, starts, count, q.shape[2])
    return out, chunk_final(k, v, log_decay, chunk_size, real, starts, before, count)


# ------------------------------------------------------------------------------------------ recurrent
def recurrent_step(
    q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, state: RetentionState,
    mask: Optional[jax.Array] = None, reset: Optional[jax.Array] = None,
) -> Tuple[jax.Array, RetentionState]:
    """One token: q, k ``[B, H, K]``, v ``[B, H, V]``, mask ``[B]``. Returns ``([B, H, V], new state)``.

    ``scale <- scale * gamma + 1`` and ``kv <- kv * sqrt(old/new scale) * gamma + v k^T / sqrt(new scale)``;
    a padding token (mask 0) leaves the state unchanged except for its position. Where ``reset`` ``[B]`` is
    True the token starts a new document: it sees an empty state.
    """
    gamma = jnp.exp(log_decay)[None, :, None, None]
    q, k, v = q.astype(F32), k.astype(F32), v.astype(F32)
    real_rows = jnp.ones(q.shape[:1], bool) if mask is None else mask.astype(bool)
    real = real_rows[:, None, None, None]
    if reset is not None:
        fresh = reset[:, None, None, None]
        state = state._replace(kv=jnp.where(fresh, 0.0, state.kv), scale=jnp.where(fresh, 0.0, state.scale))

    def update(k: jax.Array, v: jax.Array) -> Tuple[jax.Array, jax.Array]:
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
    q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, state: RetentionState,
    mask: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None,
) -> Tuple[jax.Array, RetentionState]:
    """T recurrent steps in one ``lax.scan``, starting from ``state``. Returns ``([B, H, T, V], state)``.

    With ``segment_ids`` ``[B, T]`` the state resets where a segment starts, except the row's first segment,
    which continues ``state``; the returned ``seqlen`` is per row ``[B]`` (:func:`segment_positions`).
    """
    xs = (q.transpose(2, 0, 1, 3), k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3))
    real = real_tokens(mask, segment_ids)
    mask = jnp.ones((q.shape[0], q.shape[2]), jnp.int32) if real is None else real.astype(jnp.int32)
    if segment_ids is None:
        resets = None
    else:
        starts, real, first = _segment_layout(segment_ids, mask)
        resets = (real & ~first & (starts == jnp.arange(q.shape[2])[None])).T

    def step(s: RetentionState, x: Tuple[jax.Array, ...]) -> Tuple[RetentionState, jax.Array]:
        qt, kt, vt, mt, rt = x
        out, s = recurrent_step(qt, kt, vt, log_decay, s, mt, rt)
        return s, out

    new_state, out = jax.lax.scan(step, state, xs + (mask.T, resets))
    if segment_ids is not None:
        new_state = new_state._replace(seqlen=segment_positions(segment_ids, state.seqlen, mask)[1])
    return out.transpose(1, 2, 0, 3).astype(v.dtype), new_state
