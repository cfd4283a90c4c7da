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
  grid ``(B, H, Vp / block_v)``; each program walks the chunks in a ``fori_loop``, the state in registers.
  Splitting V (as fla does) keeps the state tile ``[Kp, block_v]`` small (default: at most 32 KiB in float32,
  so ``block_v`` 32 at K = 256); ``cross_scale`` is a max over V, so each V-block returns its partial max and
  ``dq``/``dk`` their partial sums, reduced in XLA. A sequence block holds at most ``GPU_MAX_CHUNKS`` (8)
  chunks: the chunks are cut into power-of-two pieces (:func:`gpu_pieces`, e.g. 11 = 8 + 2 + 1), one launch
  per piece, the state (and ``z``) handed from launch to launch as a ``[B, H, Kp, Vp]`` operand.
  Inside a chunk the work is tiled as in flash attention, in row tiles of ``tile`` rows (default 16): the
  forward's row tile i loops over the column tiles ``j <= i`` (the decay mask is lower triangular),
  accumulating ``P_ij v_j`` and the row sums of ``|P_ij|`` behind ``inner_scale`` (with segments: of
  ``P_ij``), then adds its cross term; dq likewise; the reverse sweep's column tile j loops over the row
  tiles ``i >= j`` for ``dk_j, dv_j``; the state update sums one ``[tile, Kp]^T [tile, block_v]`` product per
  tile. The decay mask's row normalisation needs no pass over the row: it is in the precomputed table, whose
  ``[tile, tile]`` blocks the kernels load. So a program holds a few ``[tile, Kp]``, ``[tile, block_v]`` and
  ``[tile, tile]`` tiles and the state, whatever C is: :func:`working_set` estimates it (at most
  ``GPU_WORKING_SET_BUDGET``, 160 KiB, for every shipped config; H100/H200 shared memory is 227 KiB per block).
* ``"tpu"`` (Mosaic): grid ``(B, H, Vp / block_v, N)`` with the chunk axis ``"arbitrary"`` (sequential) and
  the state in a VMEM scratch buffer; every sequence block is one chunk, so VMEM use does not grow with T.
  A chunk is one tile (the same code, straight-line): ``[Cp, Cp]`` float32 arrays (1 MiB at C = 512) fit VMEM.

Hardware rules and padding. Interpret mode checks none of these; the compilers do:

* Triton: every dimension of every block (and of every value a kernel loads) a power of two, and ``tl.dot``
  wants each matmul dimension >= 16. So ``Cp = next_pow2(max(C, 16))``, ``Kp = next_pow2(max(K, 16))``,
  ``block_v`` and ``tile`` powers of two >= 16 (block_v at most 64, smaller for small V or large K), ``Vp`` V
  rounded up to ``block_v``, sequence blocks ``Cp * 2**i`` rows (i <= 3), loaded in tiles of ``[tile, .]``,
  the tables in ``[tile, tile]`` and ``[tile, 1]`` blocks. The width-1 row sums with segments are reductions,
  not dots.
* Mosaic: the last two dims of every block multiples of 8 and 128, or equal to the array's. So ``Cp`` is C
  rounded up to 8, ``Kp`` and ``Vp`` are K and V rounded up to 128 (lane-aligned matmuls), ``block_v`` a
  multiple of 128 dividing Vp (default: all of it); the tables' blocks are their whole arrays.

The 7B value head of 432 runs as 448 (GPU, 14 blocks of 32) or 512 (TPU); 2.7B's 428 likewise; K = 256 and
C = 512 of the shipped configs need no padding. :func:`geometry` picks the sizes and :func:`launches` lists
every ``pallas_call`` with its grid and block shapes (pure, tested without a GPU or TPU); the tests also
lower the kernels for ``cuda`` (Triton) and ``tpu`` (Mosaic) on CPU, which applies both rules. The padding is
exact: q, k and v get zero columns (q k^T, the state's real entries and the sums of ``|.|`` behind both
scales do not change; the extra state columns are zero, so the max over V behind ``cross_scale`` does not
either); each chunk gets ``Cp - C`` zero rows after its C real ones with zero table rows and columns, and the
tables keep C's decays; the result and the gradients are cut back, so padding rows and columns receive a
zero cotangent.

With ``segment_ids`` (documents packed in a row) every kernel also reads each token's segment start relative
to its chunk (``[Cp, 1]`` int32; padding rows repeat the last real row's, so the chunk's last row holds the
start of the segment carried on) and masks its tables: ``inner`` within a segment, the cross term only for
rows whose segment began before the chunk, the state update only from the last row's segment (and the old
state dropped when that segment begins in the chunk). The forward
then also carries ``z = (k * value_decay)^T 1`` (``[1, K]``, a column sum) and returns the row sums of
``q k^T * D`` instead of the two scales, from which XLA normalises every row as the parallel form does
(:func:`nucleusx_jax.retention.segment_scale`); the backward is unchanged apart from the masks.

On CPU the kernels run with ``interpret=True`` (the default there); both layouts are tested that way. Layout and
interpret mode follow the devices the step is compiled for (:func:`target_platform`), not the host, so a step
compiled for a TPU topology from a CPU host gets Mosaic kernels. Under a mesh, :func:`sharded_chunkwise_retention`
runs the kernel per device inside ``shard_map`` (Mosaic kernels cannot be partitioned automatically).
Gradients flow to ``q``, ``k`` and ``v``; ``log_decay`` is a constant (the model's decays are fixed
buffers), so it receives no gradient.
"""

import functools
import math
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
from jax.sharding import PartitionSpec

from .. import checks
from .. import retention as ret
from ..sharding import BATCH_AXES, TENSOR_AXIS
from ..types import Array

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


def _span(first: Union[int, Array], size: int) -> pl.Slice:
    """``size`` rows from ``first`` (a multiple of ``size``)."""
    return pl.ds(first if isinstance(first, int) else pl.multiple_of(first, size), size)


def _tile_loop(lo: Union[int, Array], hi: Union[int, Array], body: Callable, carry: Any) -> Any:
    """``carry = body(t, carry)`` for ``t`` in ``[lo, hi)``: straight-line code when that is one static step (a
    chunk of one tile, as on TPU), else a ``fori_loop``."""
    if isinstance(lo, int) and isinstance(hi, int) and hi - lo == 1:
        return body(lo, carry)
    return jax.lax.fori_loop(lo, hi, body, carry)


class _Chunk(NamedTuple):
    """One chunk as a kernel program sees it: its sequence refs (``[rows, .]``, the chunk's rows from ``base``),
    its output refs, the table refs (inner ``[Cp, Cp]``, qd, vd ``[Cp, 1]``, cd ``[1, 1]``), the segment starts
    (``[rows, 1]`` int32, :class:`retention.ChunkSegments`' ``local_start``) or None, and its row tiles of
    ``tile`` rows. Its methods load tile ``i`` (rows ``i * tile`` to ``(i + 1) * tile`` of the chunk) and mask the
    tables with the segments: ``inner`` only inside a segment, ``qd`` only for rows whose segment began before
    the chunk, ``vd`` only for the segment of the last row, ``cd`` zero when that segment begins in the chunk."""

    seq: Tuple[Any, ...]
    outs: Tuple[Any, ...]
    tables: Tuple[Any, Any, Any, Any]
    start: Optional[Any]
    base: Union[int, Array]
    tile: int
    tiles: int

    def rows(self, ref: Any, i: Union[int, Array]) -> Array:
        return ref[_span(self.base + i * self.tile, self.tile), :]

    def store(self, ref: Any, i: Union[int, Array], value: Array) -> None:
        ref[_span(self.base + i * self.tile, self.tile), :] = value.astype(ref.dtype)

    def _last(self) -> Array:  # [1, 1]: the start of the chunk's last row's segment
        return self.start[pl.ds(self.base + self.tiles * self.tile - 1, 1), :]

    def inner(self, i: Union[int, Array], j: Union[int, Array]) -> Array:
        """The ``[tile, tile]`` block (row tile i, column tile j) of the decay table."""
        table = self.tables[0][_span(i * self.tile, self.tile), _span(j * self.tile, self.tile)]
        if self.start is None:
            return table
        column = j * self.tile + jax.lax.broadcasted_iota(jnp.int32, (1, self.tile), 1)
        return jnp.where(column >= self.rows(self.start, i), table, 0.0)

    def query_decay(self, i: Union[int, Array]) -> Array:
        qd = self.tables[1][_span(i * self.tile, self.tile), :]
        return qd if self.start is None else jnp.where(self.rows(self.start, i) < 0, qd, 0.0)

    def value_decay(self, j: Union[int, Array]) -> Array:
        vd = self.tables[2][_span(j * self.tile, self.tile), :]
        if self.start is None:
            return vd
        row = j * self.tile + jax.lax.broadcasted_iota(jnp.int32, (self.tile, 1), 0)
        return jnp.where(row >= self._last(), vd, 0.0)

    def chunk_decay(self) -> Array:
        cd = self.tables[3][...]
        return cd if self.start is None else jnp.where(self._last() < 0, cd, 0.0)


def _carry_on(ch: _Chunk, carry: Tuple[Array, ...], left: Any, decay: Callable, right: Any) -> Tuple[Array, ...]:
    """``carry * cd + sum_t decay(left_t)^T right_t`` over the row tiles (the state ``[K, Vb]`` from k and v, or
    the reverse sweep's dL/dS from q and dout); with a second carry ``z`` ``[1, K]`` also ``z * cd + sum_t
    decay(left_t)^T 1`` (column sums, not matmuls of width 1, which Triton's dot does not take)."""
    cd = ch.chunk_decay()

    def tile(t: Union[int, Array], carry: Tuple[Array, ...]) -> Tuple[Array, ...]:
        x, y = _decayed(ch.rows(left, t), decay(t)), ch.rows(right, t)
        return (carry[0] + _dot(x.astype(y.dtype), y, (0, 0)),) + tuple(
            z + jnp.sum(x, axis=0, keepdims=True) for z in carry[1:])

    return _tile_loop(0, ch.tiles, tile, tuple(c * cd for c in carry))


def _forward_chunk(ch: _Chunk, carry: Tuple[Array, ...]) -> Tuple[Array, ...]:
    """One chunk of the forward: q, k ``[C, K]`` and v ``[C, Vb]`` -> raw ``[C, Vb]`` and inner_scale,
    cross_scale ``[C, 1]`` (with segments: the row sum ``[C, 1]`` of ``q k^T * D``); carry (state ``[K, Vb]``
    f32,), with segments also ``z`` ``[1, K]`` (the state of ``v = 1``). Row tile i sums over column tiles
    ``j <= i``: ``P_ij = (q_i k_j^T) * inner_ij``, ``P_ij v_j`` and the row sums of ``|P_ij|`` (of ``P_ij``)."""
    q, k, v = ch.seq
    state, segments = carry[0], ch.start is not None
    if not segments:
        cross = jnp.max(jnp.sum(jnp.abs(state), axis=0, keepdims=True), axis=1, keepdims=True)  # [1, 1]

    def row_tile(i: Union[int, Array], unused: Tuple) -> Tuple:
        qi = ch.rows(q, i)

        def column_tile(j: Union[int, Array], acc: Tuple[Array, Array]) -> Tuple[Array, Array]:
            p, vj = _dot(qi, ch.rows(k, j), (1, 1)) * ch.inner(i, j), ch.rows(v, j)
            return acc[0] + _dot(p.astype(vj.dtype), vj), acc[1] + jnp.sum(
                p if segments else jnp.abs(p), axis=1, keepdims=True)

        raw, row = _tile_loop(0, i + 1, column_tile, (jnp.zeros((ch.tile, state.shape[1]), F32),
                                                      jnp.zeros((ch.tile, 1), F32)))
        qq = _decayed(qi, ch.query_decay(i))
        ch.store(ch.outs[0], i, raw + _dot(qq, state))
        if segments:
            ch.store(ch.outs[1], i, row + jnp.sum(qq * carry[1], axis=1, keepdims=True))
        else:
            ch.store(ch.outs[1], i, jnp.maximum(row, 1.0))
            ch.store(ch.outs[2], i, jnp.broadcast_to(jnp.maximum(cross, 1.0), row.shape))
        return unused

    _tile_loop(0, ch.tiles, row_tile, ())
    return _carry_on(ch, carry, k, ch.value_decay, v)


def _dq_chunk(ch: _Chunk, carry: Tuple[Array]) -> Tuple[Array]:
    """Forward sweep of the backward: dout ``[C, Vb]`` f32 (already divided by all_scale), k, v -> partial dq
    ``[C, K]``, row tile i summing ``((dout_i v_j^T) * inner_ij) k_j`` over ``j <= i``; carry as the forward's."""
    dout, k, v = ch.seq
    state = carry[0]

    def row_tile(i: Union[int, Array], unused: Tuple) -> Tuple:
        di = ch.rows(dout, i)

        def column_tile(j: Union[int, Array], acc: Array) -> Array:
            vj, kj = ch.rows(v, j), ch.rows(k, j)
            dp = _dot(di.astype(vj.dtype), vj, (1, 1)) * ch.inner(i, j)
            return acc + _dot(dp.astype(kj.dtype), kj)

        dq = _tile_loop(0, i + 1, column_tile, jnp.zeros((ch.tile, state.shape[0]), F32))
        ch.store(ch.outs[0], i, dq + _dot(di, state, (1, 1)) * ch.query_decay(i))
        return unused

    _tile_loop(0, ch.tiles, row_tile, ())
    return _carry_on(ch, carry, k, ch.value_decay, v)


def _dkv_chunk(ch: _Chunk, carry: Tuple[Array]) -> Tuple[Array]:
    """Reverse sweep of the backward: q, k, v, dout -> partial dk ``[C, K]``, dv ``[C, Vb]``, column tile j
    summing over row tiles ``i >= j``; the carry ``[K, Vb]`` is dL/dS_{n+1}, returned as dL/dS_n."""
    q, k, v, dout = ch.seq
    grad = carry[0]

    def column_tile(j: Union[int, Array], unused: Tuple) -> Tuple:
        kj, vj = ch.rows(k, j), ch.rows(v, j)

        def row_tile(i: Union[int, Array], acc: Tuple[Array, Array]) -> Tuple[Array, Array]:
            qi, di, inner = ch.rows(q, i), ch.rows(dout, i), ch.inner(i, j)
            p = _dot(qi, kj, (1, 1)) * inner
            dp = _dot(di.astype(vj.dtype), vj, (1, 1)) * inner
            return (acc[0] + _dot(dp.astype(qi.dtype), qi, (0, 0)),
                    acc[1] + _dot(p.astype(vj.dtype), di.astype(vj.dtype), (0, 0)))

        dk, dv = _tile_loop(j, ch.tiles, row_tile, (jnp.zeros((ch.tile, grad.shape[0]), F32),
                                                    jnp.zeros((ch.tile, grad.shape[1]), F32)))
        vd = ch.value_decay(j)
        ch.store(ch.outs[0], j, dk + _dot(vj.astype(F32), grad, (1, 1)) * vd)
        ch.store(ch.outs[1], j, dv + _dot(_decayed(kj, vd), grad))
        return unused

    _tile_loop(0, ch.tiles, column_tile, ())
    return _carry_on(ch, carry, q, ch.query_decay, dout)


# ----------------------------------------------------------------------------- what the kernels see
# Hardware rules for the blocks (the module docstring explains them). GPU_MIN_DIM: tl.dot wants every matmul
# dimension >= 16; GPU_MAX_CHUNKS: chunks of a sequence in one GPU block. GPU_TILE: the default row tile of the
# GPU kernels' intra-chunk work; GPU_STATE_BYTES: the default block_v is the largest power of two <= GPU_BLOCK_V
# whose float32 state tile [Kp, block_v] takes at most this many bytes (and at least GPU_MIN_DIM).
GPU_MIN_DIM, GPU_BLOCK_V, GPU_MAX_CHUNKS, GPU_TILE, GPU_STATE_BYTES = 16, 64, 8, 16, 32 * 1024
TPU_SUBLANE, TPU_LANE = 8, 128
# What :func:`working_set` is held to on GPU (tested for every config): H100 and H200 give a thread block at
# most 227 KiB of shared memory (and 256 KiB of registers per SM); this leaves room for Triton's own staging.
GPU_WORKING_SET_BUDGET = 160 * 1024


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Geometry(NamedTuple):
    """The padded problem the kernels run on (hashable: a static argument).

    A chunk of ``chunk`` tokens occupies ``block_rows`` rows (zero rows after the real ones), worked on in row
    tiles of ``tile`` rows; q and k are zero-padded to ``key_dim`` columns and v to ``value_dim``, split into
    blocks of ``block_v``."""

    layout: str
    chunk: int  # C, the model's chunk size (it sets the decay tables)
    block_rows: int  # Cp >= C
    key_dim: int  # Kp >= K
    value_dim: int  # Vp >= V, a multiple of block_v
    block_v: int
    n_chunks: int  # N = ceil(T / C)
    tile: int  # rows of a tile of the intra-chunk work, dividing Cp (TPU: Cp)


def geometry(layout: str, *, length: int, key_dim: int, value_dim: int, chunk_size: int,
             block_v: Optional[int] = None, tile: Optional[int] = None) -> Geometry:
    """The legal padded :class:`Geometry` for q, k ``[., ., length, key_dim]``, v ``[., ., length, value_dim]``.

    ``"gpu"`` (Triton): Cp, Kp, block_v and tile powers of two >= 16 (block_v default: at most 64, at most the
    padded V, its float32 state tile ``[Kp, block_v]`` at most 32 KiB; tile default 16, at most Cp);
    ``"tpu"`` (Mosaic): Cp a multiple of 8, Kp and block_v multiples of 128 (block_v default: all of Vp), one
    tile per chunk (``tile`` must be None)."""
    checks.choice("layout", layout, LAYOUTS)
    checks.integer("chunk_size", chunk_size)
    if layout == "gpu":
        rows, kdim = _next_pow2(max(chunk_size, GPU_MIN_DIM)), _next_pow2(max(key_dim, GPU_MIN_DIM))
        state_v = max(GPU_MIN_DIM, _next_pow2(GPU_STATE_BYTES // (4 * kdim) + 1) // 2)
        default_v = min(GPU_BLOCK_V, state_v, _next_pow2(max(value_dim, GPU_MIN_DIM)))
        legal, rule = (lambda b: b >= GPU_MIN_DIM and b == _next_pow2(b)), f"a power of two >= {GPU_MIN_DIM}"
        if tile is None:
            tile = min(GPU_TILE, rows)
        if not isinstance(tile, int) or tile < 1 or not legal(tile) or tile > rows:
            raise ValueError(f"tile={tile!r} is invalid for layout 'gpu' with chunk_size={chunk_size}: must be "
                             f"{rule} and at most {rows}")
    else:
        rows, kdim = _round_up(chunk_size, TPU_SUBLANE), _round_up(key_dim, TPU_LANE)
        default_v = _round_up(value_dim, TPU_LANE)
        legal, rule = (lambda b: b % TPU_LANE == 0), f"a multiple of {TPU_LANE}"
        if tile is not None:
            raise ValueError(f"tile={tile!r} is invalid for layout 'tpu': its kernels take whole chunks "
                             "(tile=None)")
        tile = rows
    if block_v is None:
        block_v = default_v
    if not isinstance(block_v, int) or block_v < 1 or not legal(block_v):
        raise ValueError(f"block_v={block_v!r} is invalid for layout {layout!r}: must be {rule}")
    return Geometry(layout, chunk_size, rows, kdim, _round_up(value_dim, block_v), block_v,
                    -(-length // chunk_size), tile)


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


def working_set(geo: Geometry, *, kernel: str, segments: bool, itemsize: int) -> int:
    """Estimated bytes one program of ``kernel`` (one of :data:`KERNELS`) holds on chip at its peak, for inputs
    of ``itemsize`` bytes (2: bf16, 4: float32): the most, over the steps of the chunk functions, of the sum of
    the carried state and every loaded tile and intermediate live in that step, each counted whole (Triton
    keeps them in registers, staging dot operands in shared memory). Pure; it depends on the tile, Kp and
    block_v, not on C or T (TPU: the tile is the chunk, so it grows with C; VMEM holds it)."""
    checks.choice("kernel", kernel, KERNELS)
    c, kd, vb, x, f = geo.tile, geo.key_dim, geo.block_v, itemsize, 4
    z = segments and kernel == "forward"
    carry = kd * vb * f + z * kd * f
    seg = segments * (c * 4 + c * c * f)  # the starts' tile and the masked table tile
    q_tile, v_tile, square = c * kd, c * vb, c * c
    steps = {  # the live tiles in bytes: carry first, then loaded tiles, then intermediates
        "forward": (
            # column tile j of row tile i: q_i, k_j, v_j, inner, P (f32 and cast), the P v and row-sum accumulators
            [carry, seg, 2 * q_tile * x, v_tile * x, 2 * square * f, square * x, 2 * v_tile * f, c * f],
            # cross term of row tile i: q_i, q_i * qd (and with segments its product with z), accumulator, product
            [carry, seg, q_tile * x, (1 + z) * q_tile * f, 2 * v_tile * f, c * f]),
        "dq": (
            # column tile j: dout_i (f32 and cast), v_j, k_j, inner, dP (f32 and cast), the dq accumulator, product
            [carry, seg, v_tile * (f + 2 * x), q_tile * x, 2 * square * f, square * x, 2 * q_tile * f],
            # cross term: dout_i, accumulator, product
            [carry, seg, v_tile * f, 2 * q_tile * f]),
        "dkv": (
            # row tile i of column tile j: k_j, v_j, q_i, dout_i (f32 and cast), inner, P and dP (f32 and cast),
            # the dk and dv accumulators, a product
            [carry, seg, 2 * q_tile * x, v_tile * (2 * x + f), 3 * square * f, 2 * square * x,
             2 * q_tile * f, v_tile * f],
            # cross terms of column tile j: k_j, v_j (and in f32), k_j * vd, accumulators, a product
            [carry, seg, q_tile * x, v_tile * (x + f), 3 * q_tile * f, v_tile * f]),
    }[kernel]
    # the state update (the carry and its new value): a row tile of the left operand (k, or q for dkv), times
    # the decay (f32) and cast, and of the right one (v, or dout in f32 for dkv)
    left, right = (q_tile * (x + 2 * f), v_tile * f) if kernel == _REVERSED else (q_tile * (2 * x + f), v_tile * x)
    update = [2 * carry, segments * c * 4, left, right]
    return max(sum(step) for step in steps + (update,))


def _sweep(chunk_fn: Callable, geo: Geometry, kernel: str, arrays: Sequence[Array], interpret: bool,
           segments: bool) -> Tuple[Array, ...]:
    """Run ``chunk_fn(chunk, carry) -> carry`` (``chunk`` a :class:`_Chunk`; it writes the chunk's outputs)
    over all chunks of every (b, h, V-block), launching what :func:`launches` describes.

    ``arrays``: the operands of :func:`launches`' inputs in order, without the carries (segment starts first
    with ``segments``, the tables last). The carry starts at zero; the outputs are float32, ``[., Tp, .]``.
    """
    batch, heads = arrays[segments].shape[:2]
    plan = launches(geo, batch=batch, heads=heads, kernel=kernel, segments=segments)
    n_in, n_carry = len(arrays), len(plan[0].inputs) - len(arrays)
    n_out = len(plan[0].outputs) - n_carry
    n_seq = n_in - len(_TABLES)

    def chunk(refs: Sequence, outs: Sequence, base: Union[int, Array]) -> _Chunk:
        return _Chunk(tuple(refs[segments:n_seq]), tuple(outs), tuple(refs[n_seq:n_in]),
                      refs[0] if segments else None, base, geo.tile, geo.block_rows // geo.tile)

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
            out_refs, carry_refs = refs[n_in:n_in + n_out], refs[n_in + n_out:]

            @pl.when(pl.program_id(3) == 0)
            def _() -> None:
                for r in carry_refs:
                    r[...] = jnp.zeros(r.shape, F32)

            carry = chunk_fn(chunk(refs, out_refs, 0), tuple(r[...] for r in carry_refs))
            for r, c in zip(carry_refs, carry):
                r[...] = c

        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
        return tuple(call(plan[0], tpu_kernel, params, *arrays))

    def gpu_kernel(n_chunks: int, *refs: Sequence) -> None:
        carry_in = refs[n_in:n_in + n_carry]
        out_refs, carry_out = refs[n_in + n_carry:n_in + n_carry + n_out], refs[n_in + n_carry + n_out:]

        def body(i: Array, carry: Tuple[Array, ...]) -> Tuple[Array, ...]:
            n = n_chunks - 1 - i if kernel == _REVERSED else i
            return chunk_fn(chunk(refs, out_refs, n * geo.block_rows), carry)

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
def target_platform() -> str:
    """The platform the kernels are compiled for: that of the devices of the mesh in context
    (``jax.set_mesh``; a TPU topology's when compiling for a pod from any host), else ``jax.default_backend()``.
    Call it while tracing."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None else device.platform


def default_layout() -> str:
    """``"gpu"`` for a GPU :func:`target_platform`, ``"tpu"`` otherwise (TPU, and CPU where the kernels are
    interpreted)."""
    return "gpu" if target_platform() in ("gpu", "cuda", "rocm") else "tpu"


def chunkwise_retention(
    q: Array, k: Array, v: Array, log_decay: Array, chunk_size: int, mask: Optional[Array] = None,
    segment_ids: Optional[Array] = None, normalization: str = "exact", *, layout: Optional[str] = None,
    block_v: Optional[int] = None, tile: Optional[int] = None, interpret: Optional[bool] = None,
) -> Array:
    """Pallas version of :func:`nucleusx_jax.retention.chunkwise_retention` (same arguments and result).

    q, k ``[B, H, T, K]``, v ``[B, H, T, V]``, log_decay ``[H]``, mask and segment_ids ``[B, T]`` or None ->
    ``[B, H, T, V]`` in v's dtype. ``normalization="exact"`` without segment ids runs the segments kernels on
    one document per row (:func:`nucleusx_jax.retention.normalizing_segments`). ``layout`` is ``"gpu"`` or
    ``"tpu"`` (default: :func:`default_layout`); ``block_v`` and ``tile``: see :func:`geometry`; ``interpret``
    defaults to True when the :func:`target_platform` is the CPU. Any K, V, C and T: the inputs
    are padded to the legal :func:`geometry` and the result cut back.
    """
    return _run(q, k, v, log_decay, chunk_size, mask, segment_ids, normalization, None, False,
                dict(layout=layout, block_v=block_v, tile=tile, interpret=interpret))[0]


def chunkwise_carry(
    q: Array, k: Array, v: Array, log_decay: Array, chunk_size: int, state: Optional[ret.CarriedState],
    mask: Optional[Array] = None, segment_ids: Optional[Array] = None, normalization: str = "exact", *,
    layout: Optional[str] = None, block_v: Optional[int] = None, tile: Optional[int] = None,
    interpret: Optional[bool] = None,
) -> Tuple[Array, ret.CarriedState]:
    """Pallas version of :func:`nucleusx_jax.retention.chunkwise_carry`: ``([B, H, T, V], the state after the
    last token)``, with gradients to both (other arguments as :func:`chunkwise_retention`).

    The kernels run as without a state; the state's part is added in XLA, being linear in it: the state
    entering chunk n is the kernel's plus the incoming one decayed by ``gamma**(n C)`` (zero past a segment
    start, :func:`nucleusx_jax.retention.state_reach`), which each row reads through its decayed query; with
    the exact normalisation (segments) the row sums also read its ``z``. The final state is one weighted sum
    over the window (:func:`nucleusx_jax.retention.state_after`). Both are ``O(T K V)``, no scan.
    ``normalization="reference"`` without segments takes no incoming state (ValueError): its ``cross_scale``, a
    max over the whole state entering each chunk, is computed inside the kernel.
    """
    return _run(q, k, v, log_decay, chunk_size, mask, segment_ids, normalization, state, True,
                dict(layout=layout, block_v=block_v, tile=tile, interpret=interpret))


def _run(q: Array, k: Array, v: Array, log_decay: Array, chunk_size: int, mask: Optional[Array],
         segment_ids: Optional[Array], normalization: str, state: Optional[ret.CarriedState], final: bool,
         kernel: dict) -> Tuple[Array, Optional[ret.CarriedState]]:
    """The kernels on padded blocks, the state's part (``state`` None: none, no work added), the epilogue and,
    when ``final``, the state after the last token."""
    layout = default_layout() if kernel["layout"] is None else kernel["layout"]
    length, vdim = q.shape[2], v.shape[-1]
    geo = geometry(layout, length=length, key_dim=q.shape[-1], value_dim=vdim, chunk_size=chunk_size,
                   block_v=kernel["block_v"], tile=kernel["tile"])
    interpret = target_platform() == "cpu" if kernel["interpret"] is None else kernel["interpret"]
    segment_ids = ret.normalizing_segments(segment_ids, mask, q.shape[::2], normalization)
    if state is not None and segment_ids is None:
        raise ValueError("normalization='reference' without segments takes no incoming state in the Pallas kernel "
                         "(its cross_scale is computed inside the kernel): use retention_impl='xla' or "
                         "normalization='exact'")
    real = ret.real_tokens(mask, segment_ids)
    if real is not None:
        keep = real.astype(k.dtype)[:, None, :, None]
        k, v = k * keep, v * keep
    log_decay = jax.lax.stop_gradient(log_decay.astype(F32))
    starts = None if segment_ids is None else ret.chunk_starts(segment_ids, chunk_size)
    if state is not None:
        starts = ret.continue_starts(starts, state.count)
    segs = None if starts is None else ret.segments_from_starts(starts, log_decay, chunk_size)
    start = None if segs is None else _to_blocks(segs.local_start[..., None], geo, 1, mode="edge")
    raw, all_scale = _core(_to_blocks(q, geo, geo.key_dim), _to_blocks(k, geo, geo.key_dim),
                           _to_blocks(v, geo, geo.value_dim), log_decay, start, geo, interpret)
    raw, all_scale = _from_blocks(raw, geo, vdim), _from_blocks(all_scale, geo, 1)
    if state is not None:
        raw, all_scale = _read_state(q, log_decay, chunk_size, segs, state, raw, all_scale)
    if segs is not None:  # all_scale holds the row sums
        all_scale = ret.segment_scale(all_scale, segs.factor[..., None])
    out = (raw / jax.lax.stop_gradient(all_scale))[:, :, :length].astype(v.dtype)
    if not final:
        return out, None
    if state is None:
        state = ret.empty_carried(k.shape[0], k.shape[1], k.shape[3], vdim)
    entering = ret.ChunkStates(state.kv.astype(F32), None if segs is None else jax.lax.stop_gradient(state.z))
    return out, ret.state_after(k, v, log_decay, real, starts, entering, 0, state.count)


def _read_state(q: Array, log_decay: Array, chunk_size: int, segs: ret.ChunkSegments, state: ret.CarriedState,
                raw: Array, row_sum: Array) -> Tuple[Array, Array]:
    """The kernel's ``raw`` ``[B, H, N * C, V]`` and ``row_sum`` ``[B, H, N * C, 1]`` plus what the rows read of
    an incoming ``state`` (see :func:`chunkwise_carry`)."""
    batch, heads, length, kdim = q.shape
    n = raw.shape[2] // chunk_size
    local = segs.local_start.reshape(batch, 1, n, chunk_size)
    carried = (local[:, 0, :, -1] < 0).T.astype(F32)[:, :, None, None, None]  # [N, B, 1, 1, 1]
    reach = ret.state_reach(carried, log_decay, chunk_size)[0]  # [N, B, H, 1, 1]
    init = ret.chunk_init(state, log_decay, chunk_size, True)
    query_decay = ret.chunk_tables(log_decay, chunk_size)[1][None, :, None]  # [1, H, 1, C]
    qc = jnp.pad(q, ((0, 0), (0, 0), (0, n * chunk_size - length), (0, 0))).reshape(batch, heads, n, chunk_size, kdim)
    qd = qc * (query_decay * (local < 0).astype(F32))[..., None].astype(q.dtype)  # [B, H, N, C, K]
    cross = jnp.einsum("bhnck,nbhkv->bhncv", qd, reach * init.kv, preferred_element_type=F32)
    rows = jnp.einsum("bhnck,nbhkv->bhncv", jax.lax.stop_gradient(qd), reach * init.z, preferred_element_type=F32)
    return raw + cross.reshape(raw.shape), row_sum + rows.reshape(row_sum.shape)


def sharded_chunkwise_retention(q: Array, k: Array, v: Array, log_decay: Array, chunk_size: int,
                                mask: Optional[Array] = None, segment_ids: Optional[Array] = None,
                                normalization: str = "exact") -> Array:
    """:func:`chunkwise_retention` under the mesh in context (``jax.set_mesh``): inside ``jax.shard_map``, rows
    split over the batch axes (``data``, ``fsdp``) and heads over ``tensor``, each device running the kernel on
    its own block (Mosaic and Triton kernels cannot be partitioned automatically). A dimension that an axis
    does not divide (the single row of ``init``) stays whole on every device. Without a mesh of more than one
    device it is :func:`chunkwise_retention`. Shapes as there; T is never split (``mesh.sequence`` runs
    :mod:`nucleusx_jax.sequence_parallel`)."""
    return _sharded(q, k, v, log_decay, chunk_size, mask, segment_ids, normalization, None, False)[0]


def sharded_chunkwise_carry(q: Array, k: Array, v: Array, log_decay: Array, chunk_size: int,
                            state: Optional[ret.CarriedState], mask: Optional[Array] = None,
                            segment_ids: Optional[Array] = None,
                            normalization: str = "exact") -> Tuple[Array, ret.CarriedState]:
    """:func:`chunkwise_carry` under the mesh in context, split as :func:`sharded_chunkwise_retention` (the
    state's rows and heads with the inputs')."""
    return _sharded(q, k, v, log_decay, chunk_size, mask, segment_ids, normalization, state, True)


def _sharded(q: Array, k: Array, v: Array, log_decay: Array, chunk_size: int, mask: Optional[Array],
             segment_ids: Optional[Array], normalization: str, state: Optional[ret.CarriedState],
             final: bool) -> Tuple[Array, Optional[ret.CarriedState]]:
    """:func:`_run` per block of rows and heads inside ``jax.shard_map`` (or whole without a mesh)."""
    run = functools.partial(_run, chunk_size=chunk_size, normalization=normalization, final=final,
                            kernel=dict(layout=None, block_v=None, tile=None, interpret=None))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(q, k, v, log_decay, mask=mask, segment_ids=segment_ids, state=state)
    sizes = dict(mesh.shape)
    rows = tuple(a for a in BATCH_AXES if a in sizes)
    rows = rows if q.shape[0] % math.prod(sizes[a] for a in rows) == 0 else None
    heads = TENSOR_AXIS if TENSOR_AXIS in sizes and q.shape[1] % sizes[TENSOR_AXIS] == 0 else None
    blocks, tokens = PartitionSpec(rows, heads), PartitionSpec(rows)
    states = ret.CarriedState(blocks, blocks, tokens)  # a None z (or state) has no leaves: any spec fits it

    def block(q: Array, k: Array, v: Array, log_decay: Array, mask: Optional[Array], segment_ids: Optional[Array],
              state: Optional[ret.CarriedState]) -> Tuple[Array, Optional[ret.CarriedState]]:
        return run(q, k, v, log_decay, mask=mask, segment_ids=segment_ids, state=state)

    local = jax.shard_map(block, in_specs=(blocks, blocks, blocks, PartitionSpec(heads), tokens, tokens,
                                           PartitionSpec() if state is None else states),
                          out_specs=(blocks, states if final else PartitionSpec()),
                          check_vma=False)  # pallas_call outputs carry no varying axes
    return local(q, k, v, log_decay, mask, segment_ids, state)
