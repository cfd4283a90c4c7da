"""Chunkwise retention as Pallas kernels: a fused forward and a two-kernel backward (``jax.custom_vjp``).

The function computes exactly :func:`nucleusx_jax.retention.chunkwise_retention` (same tables, same
normalisation, same dtype at every matmul). Per chunk ``n`` of ``C`` tokens a kernel program fuses

* the intra-chunk part: ``P = (q k^T) * inner`` (decay mask with rows divided by ``sqrt`` of their sums),
  ``inner_scale = max(sum_j |P_ij|, 1)`` and ``P v``;
* the inter-chunk part: ``(q * query_decay) S_n`` with ``cross_scale = max(max_V sum_K |S_n|, 1)``;
* the state update ``S_{n+1} = gamma**C S_n + (k * value_decay)^T v``, carried in float32 (also for bf16
  inputs) and never written to memory (on the GPU layout: once per launch, see below).

The kernels return the un-normalised sum ``inner + cross`` (float32) and both scales; the division by
``all_scale = max(inner_scale, cross_scale)`` is one elementwise epilogue in XLA. Because the scales are
stop-gradient quantities (as in the reference), the gradient of the kernel output is linear: the backward
is a forward sweep for ``dq`` (recomputing ``S_n``) and a reverse sweep for ``dk, dv`` carrying
``dL/dS_{n+1}`` in float32. Nothing of size ``T x T`` or ``N x K x V`` is stored.

Layouts (``layout=``):

* ``"gpu"`` (Triton, asked for with ``triton.CompilerParams``: jax's default Pallas GPU backend is Mosaic GPU):
  grid ``(B, H, Vp / block_v)``; each program walks the chunks in a ``fori_loop``, reading
  ``[Cp, Kp]`` and ``[Cp, block_v]`` tiles, the state in registers. Splitting V (as fla does) keeps the state
  tile ``[Kp, block_v]`` small; ``cross_scale`` is a max over V, so each V-block returns its partial max and
  ``dq``/``dk`` their partial sums, reduced in XLA. A sequence block holds at most ``GPU_MAX_CHUNKS`` (8)
  chunks: the chunks are cut into power-of-two pieces (:func:`gpu_pieces`, e.g. 11 = 8 + 2 + 1), one launch
  per piece, the state (and ``z``) handed from launch to launch as a ``[B, H, Kp, Vp]`` operand.
* ``"tpu"`` (Mosaic): grid ``(B, H, Vp / block_v, N)`` with the chunk axis ``"arbitrary"`` (sequential) and
  the state in a VMEM scratch buffer; every sequence block is one chunk, so VMEM use does not grow with T.

Hardware rules and padding. Interpret mode checks none of these; the compilers do:

* Triton: every dimension of every block (and of every value a kernel loads) a power of two, and ``tl.dot``
  wants each matmul dimension >= 16. So ``Cp = next_pow2(max(C, 16))``, ``Kp = next_pow2(max(K, 16))``,
  ``block_v`` a power of two >= 16 (default 64, smaller for small V), ``Vp`` V rounded up to ``block_v``,
  sequence blocks ``Cp * 2**i`` rows (i <= 3). The width-1 row sums with segments are reductions, not dots.
* Mosaic: the last two dims of every block multiples of 8 and 128, or equal to the array's. So ``Cp`` is C
  rounded up to 8, ``Kp`` and ``Vp`` are K and V rounded up to 128 (lane-aligned matmuls), ``block_v`` a
  multiple of 128 dividing Vp (default: all of it); the tables' blocks are their whole arrays.

The 7B value head of 432 runs as 448 (GPU, 7 blocks of 64) or 512 (TPU); 2.7B's 428 likewise; K = 256 and
C = 512 of the shipped configs need no padding. :func:`geometry` picks the sizes and :func:`launches` lists
every ``pallas_call`` with its grid and block shapes (pure, tested without a GPU or TPU); the tests also
lower the kernels for ``cuda`` (Triton) and ``tpu`` (Mosaic) on CPU, which applies both rules. The padding is
exact: q, k and v get zero columns (q k^T, the state's real entries and the sums of ``|.|`` behind both
scales do not change; the extra state columns are zero, so the max over V behind ``cross_scale`` does not
either); each chunk gets ``Cp - C`` zero rows after its C real ones with zero table rows and columns, and the
tables keep C's decays; the result and the gradients are cut back, so padding rows and columns receive a
zero cotangent.

With ``segment_ids`` (documents packed in a row) every kernel also reads each token's segment start relative
to its chunk (``[Cp, 1]`` int32; padding rows repeat the last real row's) and masks its tables: ``inner``
within a segment, the cross term only for rows whose segment began before the chunk, the state update only
from the last row's segment (and the old state dropped when that segment begins in the chunk). The forward
then also carries ``z = (k * value_decay)^T 1`` (``[1, K]``, a column sum) and returns the row sums of
``q k^T * D`` instead of the two scales, from which XLA normalises every row as the parallel form does
(:func:`nucleusx_jax.retention.segment_scale`); the backward is unchanged apart from the masks.

On CPU the kernels run with ``interpret=True`` (the default there); both layouts are tested that way.
Gradients flow to ``q``, ``k`` and ``v``; ``log_decay`` is a constant (the model's decays are fixed
buffers), so it receives no gradient.
"""

import functools
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

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
    With segments (``start``) the carry also holds ``z`` ``[1, K]`` (the state of ``v = 1``) and the outputs are
    (raw, row sum ``[C, 1]`` of ``q k^T * D``)."""
    inner, qd, vd, cd = _segment_tables(start, inner, qd, vd, cd)
    state = carry[0]
    p = _dot(q, k, (1, 1)) * inner
    qq, kk = _decayed(q, qd), _decayed(k, vd)
    raw = _dot(p.astype(v.dtype), v) + _dot(qq, state)
    new_state = state * cd + _dot(kk.astype(v.dtype), v, (0, 0))
    if start is not None:  # z [1, K]: sums, not matmuls of width 1 (which Triton's dot does not take)
        z = carry[1]
        row_sum = jnp.sum(p, axis=1, keepdims=True) + jnp.sum(qq * z, axis=1, keepdims=True)
        return (raw, row_sum), (new_state, z * cd + jnp.sum(kk, axis=0, keepdims=True))
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


# ----------------------------------------------------------------------------- what the kernels see
# Hardware rules for the blocks (the module docstring explains them). GPU_MIN_DIM: tl.dot wants every matmul
# dimension >= 16; GPU_BLOCK_V: the default V-block; GPU_MAX_CHUNKS: chunks of a sequence in one GPU block.
GPU_MIN_DIM, GPU_BLOCK_V, GPU_MAX_CHUNKS = 16, 64, 8
TPU_SUBLANE, TPU_LANE = 8, 128


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Geometry(NamedTuple):
    """The padded problem the kernels run on (hashable: a static argument).

    A chunk of ``chunk`` tokens occupies ``block_rows`` rows (zero rows after the real ones); q and k are
    zero-padded to ``key_dim`` columns and v to ``value_dim``, split into blocks of ``block_v``."""

    layout: str
    chunk: int  # C, the model's chunk size (it sets the decay tables)
    block_rows: int  # Cp >= C
    key_dim: int  # Kp >= K
    value_dim: int  # Vp >= V, a multiple of block_v
    block_v: int
    n_chunks: int  # N = ceil(T / C)


def geometry(layout: str, *, length: int, key_dim: int, value_dim: int, chunk_size: int,
             block_v: Optional[int] = None) -> Geometry:
    """The legal padded :class:`Geometry` for q, k ``[., ., length, key_dim]``, v ``[., ., length, value_dim]``.

    ``"gpu"`` (Triton): Cp, Kp and block_v powers of two >= 16 (block_v default 64, at most the padded V);
    ``"tpu"`` (Mosaic): Cp a multiple of 8, Kp and block_v multiples of 128 (block_v default: all of Vp)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid: must be one of {', '.join(LAYOUTS)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: must be an integer >= 1")
    if layout == "gpu":
        rows, kdim = _next_pow2(max(chunk_size, GPU_MIN_DIM)), _next_pow2(max(key_dim, GPU_MIN_DIM))
        default_v = min(GPU_BLOCK_V, _next_pow2(max(value_dim, GPU_MIN_DIM)))
        legal, rule = (lambda b: b >= GPU_MIN_DIM and b == _next_pow2(b)), f"a power of two >= {GPU_MIN_DIM}"
    else:
        rows, kdim = _round_up(chunk_size, TPU_SUBLANE), _round_up(key_dim, TPU_LANE)
        default_v = _round_up(value_dim, TPU_LANE)
        legal, rule = (lambda b: b % TPU_LANE == 0), f"a multiple of {TPU_LANE}"
    if block_v is None:
        block_v = default_v
    if not isinstance(block_v, int) or block_v < 1 or not legal(block_v):
        raise ValueError(f"block_v={block_v!r} is invalid for layout {layout!r}: must be {rule}")
    return Geometry(layout, chunk_size, rows, kdim, _round_up(value_dim, block_v), block_v,
                    -(-length // chunk_size))


class Block(NamedTuple):
    """An operand of a kernel launch: ``kind``, the whole array's ``shape``, the ``block`` one program sees
    (``None``: a squeezed axis of size 1) and the block's ``index_map`` over the grid."""

    kind: str
    shape: Tuple[int, ...]
    block: Tuple[Optional[int], ...]
    index_map: Callable[..., Tuple]


class Launch(NamedTuple):
    """One ``pallas_call``: its grid, operands, the chunks one program walks through its blocks' rows, and
    the carries (``(rows, cols)``) kept in VMEM scratch (TPU; on GPU the carries are operands)."""

    grid: Tuple[int, ...]
    inputs: Tuple[Block, ...]
    outputs: Tuple[Block, ...]
    chunks: int
    scratch: Tuple[Tuple[int, int], ...]


# The operands of each kernel by kind (sequence inputs, outputs, carries); the tables follow the inputs and a
# "start" operand (segment starts) precedes them with segments. Kinds and their arrays (Tp = N * Cp):
#   "k": [B, H, Tp, Kp]   "v": [B, H, Tp, Vp] blocked along V   "row"/"key": [B, H, NV, Tp, 1 or Kp] per V-block
#   "start": [B, Tp, 1] int32   "inner": [H, Cp, Cp]   "col": [H, Cp, 1] ("qd", "vd")   "cd": [H, 1, 1]
#   carries "state": [B, H, Kp, Vp] ([Kp, block_v] per program)   "z": [B, H, NV, 1, Kp]
_KINDS = {
    "forward": (("k", "k", "v"), ("v", "row", "row"), ("state",)),
    "dq": (("v", "k", "v"), ("key",), ("state",)),
    "dkv": (("k", "k", "v", "v"), ("key", "v"), ("state",)),
}
_FORWARD_SEGMENTS = (("v", "row"), ("state", "z"))  # outputs and carries of the forward with segments
_TABLES = ("inner", "col", "col", "cd")
KERNELS = tuple(_KINDS)  # the forward, then the two backward sweeps
_REVERSED = "dkv"  # the kernel that walks from the last chunk to the first


def _block(kind: str, geo: Geometry, batch: int, heads: int, rows: int, length: int,
           row: Callable[[Tuple], int]) -> Block:
    """The :class:`Block` of ``kind`` with ``rows`` sequence rows per block, in an array of ``length`` rows;
    ``row(n)`` is the block index along the sequence from the grid's trailing indices ``n``."""
    n_v, kp, bv, cp = geo.value_dim // geo.block_v, geo.key_dim, geo.block_v, geo.block_rows
    specs = {
        "k": ((batch, heads, length, kp), (None, None, rows, kp), lambda b, h, j, *n: (b, h, row(n), 0)),
        "v": ((batch, heads, length, geo.value_dim), (None, None, rows, bv), lambda b, h, j, *n: (b, h, row(n), j)),
        "row": ((batch, heads, n_v, length, 1), (None, None, None, rows, 1),
                lambda b, h, j, *n: (b, h, j, row(n), 0)),
        "key": ((batch, heads, n_v, length, kp), (None, None, None, rows, kp),
                lambda b, h, j, *n: (b, h, j, row(n), 0)),
        "start": ((batch, length, 1), (None, rows, 1), lambda b, h, j, *n: (b, row(n), 0)),
        "inner": ((heads, cp, cp), (None, cp, cp), lambda b, h, j, *n: (h, 0, 0)),
        "col": ((heads, cp, 1), (None, cp, 1), lambda b, h, j, *n: (h, 0, 0)),
        "cd": ((heads, 1, 1), (None, 1, 1), lambda b, h, j, *n: (h, 0, 0)),
        "state": ((batch, heads, kp, geo.value_dim), (None, None, kp, bv), lambda b, h, j, *n: (b, h, 0, j)),
        "z": ((batch, heads, n_v, 1, kp), (None, None, None, 1, kp), lambda b, h, j, *n: (b, h, j, 0, 0)),
    }
    shape, block, index_map = specs[kind]
    return Block(kind, shape, block, index_map)


def gpu_pieces(n_chunks: int) -> List[Tuple[int, int]]:
    """(first chunk, chunks) of each GPU launch: powers of two, at most GPU_MAX_CHUNKS, largest first, so
    each piece starts at a multiple of its size (its block index is ``first // chunks``)."""
    pieces, first = [], 0
    while first < n_chunks:
        size = min(GPU_MAX_CHUNKS, 1 << ((n_chunks - first).bit_length() - 1))
        pieces.append((first, size))
        first += size
    return pieces


def launches(geo: Geometry, *, batch: int, heads: int, kernel: str, segments: bool) -> Tuple[Launch, ...]:
    """The launches of ``kernel`` (one of :data:`KERNELS`; ``segments``: with segment starts), in order. Pure
    (shapes only), so the block shapes can be checked without a GPU or TPU.

    ``"tpu"``: one launch, grid ``(B, H, NV, N)``, every sequence block one chunk (``Cp`` rows), the chunk
    axis sequential and the carries in VMEM. ``"gpu"``: a launch per :func:`gpu_pieces` piece, grid
    ``(B, H, NV)``, each program walking the piece's chunks inside one block of ``chunks * Cp`` rows, the
    carries passed from launch to launch as operands; the outputs of a launch cover its piece only."""
    seq, outs, carries = _KINDS[kernel]
    if segments:
        seq = ("start",) + seq
        outs, carries = _FORWARD_SEGMENTS if kernel == "forward" else (outs, carries)
    reverse, n_v, n_chunks = kernel == _REVERSED, geo.value_dim // geo.block_v, geo.n_chunks
    cp, length = geo.block_rows, n_chunks * geo.block_rows
    blocks = functools.partial(_block, geo=geo, batch=batch, heads=heads)
    tables = [blocks(kd, rows=cp, length=length, row=lambda n: 0) for kd in _TABLES]
    if geo.layout == "tpu":
        row = (lambda n: n_chunks - 1 - n[0]) if reverse else (lambda n: n[0])
        scratch = tuple({"state": (geo.key_dim, geo.block_v), "z": (1, geo.key_dim)}[kd] for kd in carries)
        return (Launch((batch, heads, n_v, n_chunks),
                       tuple(blocks(kd, rows=cp, length=length, row=row) for kd in seq) + tuple(tables),
                       tuple(blocks(kd, rows=cp, length=length, row=row) for kd in outs), 1, scratch),)
    result = []
    for first, size in (reversed if reverse else iter)(gpu_pieces(n_chunks)):
        at = functools.partial(lambda index, n: index, first // size)
        carry = tuple(blocks(kd, rows=cp, length=length, row=at) for kd in carries)
        result.append(Launch(
            (batch, heads, n_v),
            tuple(blocks(kd, rows=size * cp, length=length, row=at) for kd in seq) + tuple(tables) + carry,
            tuple(blocks(kd, rows=size * cp, length=size * cp, row=lambda n: 0) for kd in outs) + carry,
            size, ()))
    return tuple(result)


def _sweep(chunk_fn: Callable, geo: Geometry, kernel: str, arrays: Sequence[Array], interpret: bool,
           segments: bool) -> Tuple[Array, ...]:
    """Run ``chunk_fn(*chunk_inputs, carry, start=...) -> (chunk_outputs, carry)`` over all chunks of every
    (b, h, V-block), launching what :func:`launches` describes.

    ``arrays``: the operands of :func:`launches`' inputs in order, without the carries (segment starts first
    with ``segments``, the tables last). The carry starts at zero; the outputs are float32, ``[., Tp, .]``.
    """
    batch, heads = arrays[segments].shape[:2]
    plan = launches(geo, batch=batch, heads=heads, kernel=kernel, segments=segments)
    n_in, n_carry = len(arrays), len(plan[0].inputs) - len(arrays)
    n_out = len(plan[0].outputs) - n_carry
    n_seq = n_in - len(_TABLES)
    chunk = geo.block_rows

    def step(seq_refs: Sequence, table_vals: Sequence[Array], out_refs: Sequence, rows: slice,
             carry: Tuple[Array, ...]) -> Tuple[Array, ...]:
        seq = [r[rows, :] for r in seq_refs]
        seg = seq.pop(0) if segments else None
        outs, carry = chunk_fn(*seq, *table_vals, carry, start=seg)
        for r, o in zip(out_refs, outs):
            r[rows, :] = o.astype(r.dtype)
        return carry

    def call(launch: Launch, kernel_fn: Callable, params: pl.CompilerParams, *operands: Array):
        spec = lambda b: pl.BlockSpec(b.block, b.index_map)  # noqa: E731
        return pl.pallas_call(
            kernel_fn, grid=launch.grid, in_specs=[spec(b) for b in launch.inputs],
            out_specs=[spec(b) for b in launch.outputs],
            out_shape=[jax.ShapeDtypeStruct(b.shape, F32) for b in launch.outputs],
            scratch_shapes=[pltpu.VMEM(s, F32) for s in launch.scratch], compiler_params=params,
            interpret=interpret)(*operands)

    if geo.layout == "tpu":
        def tpu_kernel(*refs: Sequence) -> None:
            seq_refs, table_refs = refs[:n_seq], refs[n_seq:n_in]
            out_refs, carry_refs = refs[n_in:n_in + n_out], refs[n_in + n_out:]

            @pl.when(pl.program_id(3) == 0)
            def _() -> None:
                for r in carry_refs:
                    r[...] = jnp.zeros(r.shape, F32)

            carry = step(seq_refs, [r[...] for r in table_refs], out_refs, slice(None),
                         tuple(r[...] for r in carry_refs))
            for r, c in zip(carry_refs, carry):
                r[...] = c

        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
        return tuple(call(plan[0], tpu_kernel, params, *arrays))

    def gpu_kernel(n_chunks: int, *refs: Sequence) -> None:
        seq_refs, table_refs, carry_in = refs[:n_seq], refs[n_seq:n_in], refs[n_in:n_in + n_carry]
        out_refs, carry_out = refs[n_in + n_carry:n_in + n_carry + n_out], refs[n_in + n_carry + n_out:]
        tables = [r[...] for r in table_refs]

        def body(i: Array, carry: Tuple[Array, ...]) -> Tuple[Array, ...]:
            n = n_chunks - 1 - i if kernel == _REVERSED else i
            return step(seq_refs, tables, out_refs, pl.ds(pl.multiple_of(n * chunk, chunk), chunk), carry)

        carry = jax.lax.fori_loop(0, n_chunks, body, tuple(r[...] for r in carry_in))
        for r, c in zip(carry_out, carry):
            r[...] = c

    carry = tuple(jnp.zeros(b.shape, F32) for b in plan[0].inputs[n_in:])
    pieces = []
    for launch in plan:
        res = call(launch, functools.partial(gpu_kernel, launch.chunks), pltriton.CompilerParams(), *arrays, *carry)
        pieces.append(res[:n_out])
        carry = tuple(res[n_out:])
    if kernel == _REVERSED:
        pieces.reverse()
    return tuple(p[0] if len(p) == 1 else jnp.concatenate(p, axis=-2) for p in zip(*pieces))


# ----------------------------------------------------------------------------------- custom_vjp core
def _tables(log_decay: Array, geo: Geometry) -> Tuple[Array, Array, Array, Array]:
    """:func:`retention.chunk_tables` for C shaped for the kernels, zero in the Cp - C padding rows and
    columns: inner ``[H, Cp, Cp]``, qd, vd ``[H, Cp, 1]``, cd ``[H, 1, 1]``."""
    inner, qd, vd, cd = ret.chunk_tables(log_decay, geo.chunk)
    extra = geo.block_rows - geo.chunk
    col = lambda x: jnp.pad(x, ((0, 0), (0, extra)))[..., None]  # noqa: E731
    return jnp.pad(inner, ((0, 0), (0, extra), (0, extra))), col(qd), col(vd), cd[:, None, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _core(q: Array, k: Array, v: Array, log_decay: Array, start: Optional[Array], geo: Geometry,
          interpret: bool) -> Tuple[Array, Array]:
    """Padded q, k ``[B, H, Tp, Kp]``, v ``[B, H, Tp, Vp]``, segment starts ``[B, Tp, 1]`` int32 or None ->
    (raw ``[B, H, Tp, Vp]`` f32, all_scale ``[B, H, Tp, 1]``, or with segments the row sum ``[B, H, Tp, 1]``)."""
    return _core_fwd(q, k, v, log_decay, start, geo, interpret)[0]


def _core_fwd(q: Array, k: Array, v: Array, log_decay: Array, start: Optional[Array], geo: Geometry,
              interpret: bool) -> Tuple[Tuple[Array, Array], Tuple[Array, ...]]:
    segments = start is not None
    outs = _sweep(_forward_chunk, geo, "forward", [start] * segments + [q, k, v, *_tables(log_decay, geo)],
                  interpret, segments)
    if segments:  # every V-block computes the same row sums; take the first
        raw, second = outs[0], outs[1][:, :, 0]
    else:
        raw, inner_scale, cross_scale = outs
        second = jnp.maximum(inner_scale[:, :, 0], jnp.max(cross_scale, axis=2))
    return (raw, second), (q, k, v, log_decay, start)


def _core_bwd(geo: Geometry, interpret: bool, res: Tuple[Array, ...],
              cotangents: Tuple[Array, Array]) -> Tuple[Optional[Array], ...]:
    q, k, v, log_decay, start = res
    segments = start is not None
    tables = _tables(log_decay, geo)
    dout = cotangents[0].astype(F32)  # the scale is a stop-gradient quantity: its cotangent is dropped
    seg = [start] * segments
    (dq,) = _sweep(_dq_chunk, geo, "dq", seg + [dout, k, v, *tables], interpret, segments)
    dk, dv = _sweep(_dkv_chunk, geo, "dkv", seg + [q, k, v, dout, *tables], interpret, segments)
    return (jnp.sum(dq, axis=2).astype(q.dtype), jnp.sum(dk, axis=2).astype(k.dtype), dv.astype(v.dtype),
            jnp.zeros_like(log_decay), None)


_core.defvjp(_core_fwd, _core_bwd)


def _to_blocks(x: Array, geo: Geometry, width: int, mode: str = "constant") -> Array:
    """``[..., T, D]`` -> ``[..., N * Cp, width]``: T padded to N chunks of C rows, each chunk padded to Cp
    rows and D to ``width`` columns (zeros, or ``mode="edge"``: copies of the last row)."""
    *lead, length, dim = x.shape
    c, n = geo.chunk, geo.n_chunks
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, n * c - length), (0, 0)]).reshape(*lead, n, c, dim)
    x = jnp.pad(x, [(0, 0)] * (len(lead) + 1) + [(0, geo.block_rows - c), (0, width - dim)], mode=mode)
    return x.reshape(*lead, n * geo.block_rows, width)


def _from_blocks(x: Array, geo: Geometry, width: int) -> Array:
    """Inverse of :func:`_to_blocks` up to the T padding: ``[..., N * Cp, Wp]`` -> ``[..., N * C, width]``."""
    *lead, _, padded_width = x.shape
    x = x.reshape(*lead, geo.n_chunks, geo.block_rows, padded_width)[..., :geo.chunk, :width]
    return x.reshape(*lead, geo.n_chunks * geo.chunk, width)


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
    ``block_v``: see :func:`geometry`; ``interpret`` defaults to True on CPU. Any K, V, C and T: the inputs
    are padded to the legal :func:`geometry` and the result cut back.
    """
    if layout is None:
        layout = default_layout()
    length, vdim = q.shape[2], v.shape[-1]
    geo = geometry(layout, length=length, key_dim=q.shape[-1], value_dim=vdim, chunk_size=chunk_size,
                   block_v=block_v)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    real = ret.real_tokens(mask, segment_ids)
    if real is not None:
        keep = real.astype(k.dtype)[:, None, :, None]
        k, v = k * keep, v * keep
    log_decay = jax.lax.stop_gradient(log_decay.astype(F32))
    segs = None if segment_ids is None else ret.chunk_segments(segment_ids, log_decay, chunk_size)
    start = None if segs is None else _to_blocks(segs.local_start[..., None], geo, 1, mode="edge")
    raw, all_scale = _core(_to_blocks(q, geo, geo.key_dim), _to_blocks(k, geo, geo.key_dim),
                           _to_blocks(v, geo, geo.value_dim), log_decay, start, geo, interpret)
    raw, all_scale = _from_blocks(raw, geo, vdim), _from_blocks(all_scale, geo, 1)
    if segs is not None:  # all_scale holds the row sums
        all_scale = ret.segment_scale(all_scale, segs.factor[..., None])
    out = raw / jax.lax.stop_gradient(all_scale)
    return out[:, :, :length].astype(v.dtype)
