"""Chunkwise retention as Pallas kernels: a fused forward and a two-kernel backward (``jax.custom_vjp``).

The function computes exactly :func:`nucleusx_jax.retention.chunkwise_retention` (same tables, same
normalisation, same dtype at every matmul). Per chunk ``n`` of ``C`` tokens a kernel program fuses

* the intra-chunk part: ``P = (q k^T) * inner`` (decay mask with rows divided by ``sqrt`` of their sums),
  ``inner_scale = max(sum_j |P_ij|, 1)`` and ``P v``;
* the inter-chunk part: ``(q * query_decay) S_n`` with ``cross_scale = max(max_V sum_K |S_n|, 1)``;
* the state update ``S_{n+1} = gamma**C S_n + (k * value_decay)^T v``, carried in float32 (also for bf16
  inputs) and never written to memory.

The kernels return the un-normalised sum ``inner + cross`` (float32) and both scales; the division by
``all_scale = max(inner_scale, cross_scale)`` is one elementwise epilogue in XLA. Because the scales are
stop-gradient quantities (as in the reference), the gradient of the kernel output is linear: the backward
is a forward sweep for ``dq`` (recomputing ``S_n``) and a reverse sweep for ``dk, dv`` carrying
``dL/dS_{n+1}`` in float32. Nothing of size ``T x T`` or ``N x K x V`` is stored.

Layouts (``layout=``):

* ``"gpu"`` (Triton): grid ``(B, H, V / block_v)``; each program walks the chunks in a ``fori_loop``, reading
  ``[C, K]`` and ``[C, block_v]`` tiles of its whole-sequence block, the state in registers. Splitting V
  (as fla does) keeps the state tile ``[K, block_v]`` small; ``cross_scale`` is a max over V, so each
  V-block returns its partial max and ``dq``/``dk`` their partial sums, reduced in XLA.
* ``"tpu"`` (Mosaic): grid ``(B, H, V / block_v, N)`` with the chunk axis ``"arbitrary"`` (sequential) and
  the state in a VMEM scratch buffer; every block is one chunk, so VMEM use does not grow with T.

With ``segment_ids`` (documents packed in a row) every kernel also reads each token's segment start relative
to its chunk (``[C, 1]`` int32) and masks its tables: ``inner`` within a segment, the cross term only for rows
whose segment began before the chunk, the state update only from the last row's segment (and the old state
dropped when that segment begins in the chunk). The forward then also carries ``z = (k * value_decay)^T 1``
(``[K, 1]``) and returns the row sums of ``q k^T * D`` instead of the two scales, from which XLA normalises
every row as the parallel form does (:func:`nucleusx_jax.retention.segment_scale`); the backward is unchanged
apart from the masks.

On CPU the kernels run with ``interpret=True`` (the default there); both layouts are tested that way.
Gradients flow to ``q``, ``k`` and ``v``; ``log_decay`` is a constant (the model's decays are fixed
buffers), so it receives no gradient.
"""

import functools
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .. import retention as ret

Array = jax.Array
F32 = jnp.float32
LAYOUTS = ("gpu", "tpu")


# ----------------------------------------------------------------------------------- per-chunk math
def _dot(a: Array, b: Array, contract: Tuple[int, int] = (1, 0)) -> Array:
    """2-D matmul with float32 accumulation, contracting ``a``'s axis ``contract[0]`` with ``b``'s."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=F32)


def _decayed(x: Array, decay: Array) -> Array:
    """``x * decay`` rounded to ``x``'s dtype (as the reference does), returned in float32."""
    return (x * decay.astype(x.dtype)).astype(F32)


def _segment_tables(start: Optional[Array], inner: Array, qd: Array, vd: Array,
                    cd: Array) -> Tuple[Array, Array, Array, Array]:
    """The chunk's tables with segments (``start`` ``[C, 1]`` int32, :class:`retention.ChunkSegments`'
    ``local_start``): ``inner`` only inside a segment, ``qd`` only for rows whose segment began before the chunk,
    ``vd`` only for the segment of the last row, ``cd`` zero when that segment begins in the chunk."""
    if start is None:
        return inner, qd, vd, cd
    chunk = inner.shape[0]
    inner = jnp.where(jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1) >= start, inner, 0.0)
    qd = jnp.where(start < 0, qd, 0.0)
    last = jnp.max(start, axis=0, keepdims=True)  # [1, 1]: starts never decrease, so this is the last row's
    vd = jnp.where(jax.lax.broadcasted_iota(jnp.int32, (chunk, 1), 0) >= last, vd, 0.0)
    return inner, qd, vd, jnp.where(last < 0, cd, 0.0)


def _forward_chunk(q: Array, k: Array, v: Array, inner: Array, qd: Array, vd: Array, cd: Array,
                   carry: Tuple[Array, ...], start: Optional[Array] = None
                   ) -> Tuple[Tuple[Array, ...], Tuple[Array, ...]]:
    """One chunk: q, k ``[C, K]``, v ``[C, Vb]``, inner ``[C, C]``, qd, vd ``[C, 1]``, cd ``[1, 1]``, carry
    (state ``[K, Vb]`` f32,) -> ((raw ``[C, Vb]``, inner_scale ``[C, 1]``, cross_scale ``[C, 1]``), next carry).
    With segments (``start``) the carry also holds ``z`` ``[K, 1]`` (the state of ``v = 1``) and the outputs are
    (raw, row sum ``[C, 1]`` of ``q k^T * D``)."""
    inner, qd, vd, cd = _segment_tables(start, inner, qd, vd, cd)
    state = carry[0]
    p = _dot(q, k, (1, 1)) * inner
    qq, kk = _decayed(q, qd), _decayed(k, vd)
    raw = _dot(p.astype(v.dtype), v) + _dot(qq, state)
    new_state = state * cd + _dot(kk.astype(v.dtype), v, (0, 0))
    if start is not None:
        z = carry[1]
        row_sum = jnp.sum(p, axis=1, keepdims=True) + _dot(qq, z)
        return (raw, row_sum), (new_state, z * cd + _dot(kk, jnp.ones((k.shape[0], 1), F32), (0, 0)))
    inner_scale = jnp.maximum(jnp.sum(jnp.abs(p), axis=1, keepdims=True), 1.0)
    cross = jnp.max(jnp.sum(jnp.abs(state), axis=0, keepdims=True), axis=1, keepdims=True)  # [1, 1]
    cross_scale = jnp.broadcast_to(jnp.maximum(cross, 1.0), inner_scale.shape)
    return (raw, inner_scale, cross_scale), (new_state,)


def _dq_chunk(dout: Array, k: Array, v: Array, inner: Array, qd: Array, vd: Array, cd: Array,
              carry: Tuple[Array], start: Optional[Array] = None) -> Tuple[Tuple[Array], Tuple[Array]]:
    """Forward sweep of the backward: dout ``[C, Vb]`` f32 (already divided by all_scale) -> partial dq."""
    inner, qd, vd, cd = _segment_tables(start, inner, qd, vd, cd)
    state = carry[0]
    dp = _dot(dout.astype(v.dtype), v, (1, 1)) * inner
    dq = _dot(dp.astype(k.dtype), k) + _dot(dout, state, (1, 1)) * qd
    new_state = state * cd + _dot(_decayed(k, vd).astype(v.dtype), v, (0, 0))
    return (dq,), (new_state,)


def _dkv_chunk(q: Array, k: Array, v: Array, dout: Array, inner: Array, qd: Array, vd: Array, cd: Array,
               carry: Tuple[Array], start: Optional[Array] = None) -> Tuple[Tuple[Array, Array], Tuple[Array]]:
    """Reverse sweep of the backward; the carry ``[K, Vb]`` is dL/dS_{n+1} -> (partial dk, dv), dL/dS_n."""
    inner, qd, vd, cd = _segment_tables(start, inner, qd, vd, cd)
    grad = carry[0]
    p = _dot(q, k, (1, 1)) * inner
    dv = _dot(p.astype(v.dtype), dout.astype(v.dtype), (0, 0)) + _dot(_decayed(k, vd), grad)
    dp = _dot(dout.astype(v.dtype), v, (1, 1)) * inner
    dk = _dot(dp.astype(q.dtype), q, (0, 0)) + _dot(v.astype(F32), grad, (1, 1)) * vd
    new_grad = grad * cd + _dot(_decayed(q, qd), dout, (0, 0))
    return (dk, dv), (new_grad,)


# --------------------------------------------------------------------------------------- the sweeps
# Every operand is one of these kinds; the spec builders below turn a kind into a BlockSpec per layout.
#   "k": [B, H, T, K]   "v": [B, H, T, V] blocked along V   "part": [B, H, NV, T, D] per V-block
#   "start": [B, T, 1] (segment starts, int32)
#   "inner": [H, C, C]  "col": [H, C, 1] ("qd", "vd")       "cd": [H, 1, 1]
_TABLE_KINDS = ("inner", "col", "cd")


def _block_spec(kind: str, shape: Sequence[int], layout: str, chunk: int, block_v: int, reverse: bool,
                n_chunks: int) -> pl.BlockSpec:
    """BlockSpec of an operand of ``kind`` and full ``shape`` for ``layout``."""
    if kind == "inner":
        return pl.BlockSpec((None, chunk, chunk), lambda b, h, j, *n: (h, 0, 0))
    if kind == "col":
        return pl.BlockSpec((None, chunk, 1), lambda b, h, j, *n: (h, 0, 0))
    if kind == "cd":
        return pl.BlockSpec((None, 1, 1), lambda b, h, j, *n: (h, 0, 0))
    rows = shape[-2] if layout == "gpu" else chunk

    def row(n: Tuple[Array, ...]) -> Array:  # block index along T
        if layout == "gpu":
            return 0
        return n_chunks - 1 - n[0] if reverse else n[0]

    if kind == "k":
        return pl.BlockSpec((None, None, rows, shape[-1]), lambda b, h, j, *n: (b, h, row(n), 0))
    if kind == "v":
        return pl.BlockSpec((None, None, rows, block_v), lambda b, h, j, *n: (b, h, row(n), j))
    if kind == "part":
        return pl.BlockSpec((None, None, None, rows, shape[-1]), lambda b, h, j, *n: (b, h, j, row(n), 0))
    if kind == "start":
        return pl.BlockSpec((None, rows, 1), lambda b, h, j, *n: (b, row(n), 0))
    raise ValueError(f"unknown operand kind {kind!r}")


def _sweep(chunk_fn: Callable, inputs: Sequence[Tuple[str, Array]], outputs: Sequence[Tuple[str, Tuple[int, ...]]],
           carry_shapes: Sequence[Tuple[int, int]], chunk: int, block_v: int, reverse: bool, layout: str,
           interpret: bool, start: Optional[Array] = None) -> Tuple[Array, ...]:
    """Run ``chunk_fn(*chunk_inputs, carry, start=...) -> (chunk_outputs, carry)`` over all chunks of every
    (b, h, V-block).

    ``inputs``: (kind, array) with the sequence operands first and the tables (kinds ``inner``, ``col``,
    ``cd``) last; ``outputs``: (kind, shape), all float32; ``start``: segment starts ``[B, T, 1]`` or None.
    The carry (a tuple of arrays of ``carry_shapes``) starts at zero; ``reverse`` walks the chunks last to first.
    """
    if start is not None:
        inputs = [("start", start)] + list(inputs)
    kinds = [kd for kd, _ in inputs]
    arrays = [a for _, a in inputs]
    batch, heads, length = arrays[kinds.index("k")].shape[:3]
    n_chunks = length // chunk
    n_v = arrays[kinds.index("v")].shape[-1] // block_v
    n_seq = sum(kd not in _TABLE_KINDS for kd in kinds)
    n_out = len(outputs)
    n_in = len(inputs)
    spec = functools.partial(_block_spec, layout=layout, chunk=chunk, block_v=block_v, reverse=reverse,
                             n_chunks=n_chunks)
    in_specs = [spec(kd, a.shape) for kd, a in inputs]
    out_specs = [spec(kd, shape) for kd, shape in outputs]
    out_shape = [jax.ShapeDtypeStruct(shape, F32) for _, shape in outputs]
    zeros = lambda: tuple(jnp.zeros(s, F32) for s in carry_shapes)  # noqa: E731

    def step(seq_refs: Sequence, table_vals: Sequence[Array], out_refs: Sequence, rows: slice,
             carry: Tuple[Array, ...]) -> Tuple[Array, ...]:
        seq = [r[rows, :] for r in seq_refs]
        seg = seq.pop(0) if start is not None else None
        outs, carry = chunk_fn(*seq, *table_vals, carry, start=seg)
        for r, o in zip(out_refs, outs):
            r[rows, :] = o.astype(r.dtype)
        return carry

    if layout == "gpu":
        def kernel(*refs: Sequence) -> None:
            seq_refs, table_refs, out_refs = refs[:n_seq], refs[n_seq:n_in], refs[n_in:]
            tables = [r[...] for r in table_refs]

            def body(i: Array, carry: Tuple[Array, ...]) -> Tuple[Array, ...]:
                n = n_chunks - 1 - i if reverse else i
                return step(seq_refs, tables, out_refs, pl.ds(pl.multiple_of(n * chunk, chunk), chunk), carry)

            jax.lax.fori_loop(0, n_chunks, body, zeros())

        grid, scratch, params = (batch, heads, n_v), (), None
    else:
        def kernel(*refs: Sequence) -> None:
            seq_refs, table_refs = refs[:n_seq], refs[n_seq:n_in]
            out_refs, carry_refs = refs[n_in:n_in + n_out], refs[n_in + n_out:]

            @pl.when(pl.program_id(3) == 0)
            def _() -> None:
                for r, z in zip(carry_refs, zeros()):
                    r[...] = z

            tables = [r[...] for r in table_refs]
            carry = step(seq_refs, tables, out_refs, slice(None), tuple(r[...] for r in carry_refs))
            for r, c in zip(carry_refs, carry):
                r[...] = c

        grid, scratch = (batch, heads, n_v, n_chunks), [pltpu.VMEM(s, F32) for s in carry_shapes]
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          scratch_shapes=scratch, compiler_params=params, interpret=interpret)(*arrays)


# ----------------------------------------------------------------------------------- custom_vjp core
def _tables(log_decay: Array, chunk: int) -> Tuple[Array, Array, Array, Array]:
    """:func:`retention.chunk_tables` shaped for the kernels: inner ``[H, C, C]``, qd, vd ``[H, C, 1]``, cd ``[H, 1, 1]``."""
    inner, qd, vd, cd = ret.chunk_tables(log_decay, chunk)
    return inner, qd[..., None], vd[..., None], cd[:, None, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _core(q: Array, k: Array, v: Array, log_decay: Array, start: Optional[Array], chunk: int, block_v: int,
          layout: str, interpret: bool) -> Tuple[Array, Array]:
    """Padded q, k ``[B, H, T, K]``, v ``[B, H, T, V]``, segment starts ``[B, T, 1]`` int32 or None ->
    (raw ``[B, H, T, V]`` f32, all_scale ``[B, H, T, 1]``, or with segments the row sum ``[B, H, T, 1]``)."""
    return _core_fwd(q, k, v, log_decay, start, chunk, block_v, layout, interpret)[0]


def _core_fwd(q: Array, k: Array, v: Array, log_decay: Array, start: Optional[Array], chunk: int, block_v: int,
              layout: str, interpret: bool) -> Tuple[Tuple[Array, Array], Tuple[Array, ...]]:
    batch, heads, length, kdim = q.shape
    vdim = v.shape[-1]
    n_v = vdim // block_v
    tables = _tables(log_decay, chunk)
    part = (batch, heads, n_v, length, 1)
    raw_out = ("v", (batch, heads, length, vdim))
    inputs = [("k", q), ("k", k), ("v", v), ("inner", tables[0]), ("col", tables[1]), ("col", tables[2]),
              ("cd", tables[3])]
    if start is None:
        raw, inner_scale, cross_scale = _sweep(_forward_chunk, inputs, [raw_out, ("part", part), ("part", part)],
                                               [(kdim, block_v)], chunk, block_v, False, layout, interpret)
        second = jnp.maximum(inner_scale[:, :, 0], jnp.max(cross_scale, axis=2))
    else:  # every V-block computes the same row sums; take the first
        raw, row_sum = _sweep(_forward_chunk, inputs, [raw_out, ("part", part)], [(kdim, block_v), (kdim, 1)],
                              chunk, block_v, False, layout, interpret, start)
        second = row_sum[:, :, 0]
    return (raw, second), (q, k, v, log_decay, start)


def _core_bwd(chunk: int, block_v: int, layout: str, interpret: bool, res: Tuple[Array, ...],
              cotangents: Tuple[Array, Array]) -> Tuple[Optional[Array], ...]:
    q, k, v, log_decay, start = res
    batch, heads, length, kdim = q.shape
    n_v = v.shape[-1] // block_v
    inner, qd, vd, cd = _tables(log_decay, chunk)
    dout = cotangents[0].astype(F32)  # the scale is a stop-gradient quantity: its cotangent is dropped
    part = (batch, heads, n_v, length, kdim)
    (dq,) = _sweep(_dq_chunk, [("v", dout), ("k", k), ("v", v), ("inner", inner), ("col", qd), ("col", vd),
                               ("cd", cd)],
                   [("part", part)], [(kdim, block_v)], chunk, block_v, False, layout, interpret, start)
    dk, dv = _sweep(_dkv_chunk, [("k", q), ("k", k), ("v", v), ("v", dout), ("inner", inner), ("col", qd),
                                 ("col", vd), ("cd", cd)],
                    [("part", part), ("v", v.shape)], [(kdim, block_v)], chunk, block_v, True, layout, interpret,
                    start)
    return (jnp.sum(dq, axis=2).astype(q.dtype), jnp.sum(dk, axis=2).astype(k.dtype), dv.astype(v.dtype),
            jnp.zeros_like(log_decay), None)


_core.defvjp(_core_fwd, _core_bwd)


# ------------------------------------------------------------------------------------------ public
def default_layout() -> str:
    """``"gpu"`` on a GPU backend, ``"tpu"`` otherwise (TPU, and CPU where the kernels are interpreted)."""
    return "gpu" if jax.default_backend() == "gpu" else "tpu"


def chunkwise_retention(
    q: Array, k: Array, v: Array, log_decay: Array, chunk_size: int, mask: Optional[Array] = None,
    segment_ids: Optional[Array] = None, *, layout: Optional[str] = None, block_v: Optional[int] = None,
    interpret: Optional[bool] = None,
) -> Array:
    """Pallas version of :func:`nucleusx_jax.retention.chunkwise_retention` (same arguments and result).

    q, k ``[B, H, T, K]``, v ``[B, H, T, V]``, log_decay ``[H]``, mask and segment_ids ``[B, T]`` or None ->
    ``[B, H, T, V]`` in v's dtype. ``layout`` is ``"gpu"`` or ``"tpu"`` (default: :func:`default_layout`);
    ``block_v`` divides V (default: V, or 64 on the GPU layout when it divides V); ``interpret`` defaults to
    True on CPU.
    """
    if layout is None:
        layout = default_layout()
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid: must be one of {', '.join(LAYOUTS)}")
    vdim = v.shape[-1]
    if block_v is None:
        block_v = 64 if layout == "gpu" and vdim % 64 == 0 else vdim
    if not isinstance(block_v, int) or block_v < 1 or vdim % block_v:
        raise ValueError(f"block_v={block_v!r} is invalid: must be a positive divisor of the value head dim {vdim}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: must be an integer >= 1")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    length = q.shape[2]
    real = ret.real_tokens(mask, segment_ids)
    if real is not None:
        keep = real.astype(k.dtype)[:, None, :, None]
        k, v = k * keep, v * keep
    pad = -length % chunk_size
    padded = [jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v)]
    log_decay = jax.lax.stop_gradient(log_decay.astype(F32))
    segs = None if segment_ids is None else ret.chunk_segments(segment_ids, log_decay, chunk_size)
    raw, all_scale = _core(*padded, log_decay, None if segs is None else segs.local_start[..., None], chunk_size,
                           block_v, layout, interpret)
    if segs is not None:  # all_scale holds the row sums
        all_scale = ret.segment_scale(all_scale, segs.factor[..., None])
    out = raw / jax.lax.stop_gradient(all_scale)
    return out[:, :, :length].astype(v.dtype)
