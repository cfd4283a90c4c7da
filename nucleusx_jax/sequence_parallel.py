"""Sequence parallelism for retention: one sequence split along T over the mesh axis ``sequence``, exact.

The model stays a program on global arrays; under a mesh whose ``sequence`` axis has D > 1 devices, the residual
stream is sharded along T (:mod:`nucleusx_jax.sharding`), so every token-wise part runs on the device holding
the token. Retention is the one part that reads earlier tokens: :func:`chunkwise_retention` runs the chunkwise
form under ``jax.shard_map`` over ``sequence``, each device on its contiguous slice of ``T / D`` tokens:

1. the slice's chunk terms and its states from an empty start (:func:`nucleusx_jax.retention.chunk_states`):
   the state it hands on, and how much of an incoming state gets through it (``gamma**(T / D)``, or 0 where a
   document starts inside it);
2. one ``all_gather`` of these fixed-size states ``[B, H, K, V]`` (with segments also ``[B, H, K, 1]``) and
   factors ``[B, H]``: the bytes moved do not depend on T;
3. each device combines the states of the slices before it into its incoming state, adds it (decayed by the
   positions between) to the state entering each of its chunks, and finishes its output with the chunkwise
   normalisation (either ``normalization``; both depend on that state), which so sees the same state as on one
   device.

The result equals :func:`nucleusx_jax.retention.chunkwise_retention` (the same chunk grid: T must be a multiple
of D x chunk size), for both normalisations. Document segments use the global start of every token's segment (:func:`segment_starts`,
which also gives the model its rotation positions); padding (``mask``) is per token. Gradients flow back
through the ``all_gather`` (its transpose is a reduce-scatter). :func:`chunkwise_carry` also takes the state a
previous window left (:class:`nucleusx_jax.retention.CarriedState`), which starts the scan of step 3 in place
of zeros, and returns the state after the last token (the last device's, replicated by one ``psum``).
"""

from functools import partial
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from . import retention as ret
from .configuration import RetentionImpl
from .sharding import SEQUENCE_AXIS
from .types import Array



def sequence_size() -> int:
    """Devices along ``sequence`` in the mesh in context (``jax.set_mesh``); 1 without such a mesh."""
    return dict(jax.sharding.get_abstract_mesh().shape).get(SEQUENCE_AXIS, 1)


def check_split(length: int, chunk_size: int, parts: int, *, name: str = "T") -> None:
    """Raise ``ValueError`` naming the numbers unless ``length`` (called ``name``) splits into ``parts`` slices
    of whole chunks of ``chunk_size``."""
    if length % (parts * chunk_size):
        raise ValueError(f"{name}={length} does not split over mesh.sequence={parts} in whole chunks of "
                         f"{chunk_size}: it must be a multiple of {parts} x {chunk_size} = {parts * chunk_size}")


def chunkwise_retention(q: Array, k: Array, v: Array, log_decay: Array, chunk_size: int,
                        mask: Optional[Array] = None, segment_ids: Optional[Array] = None,
                        normalization: str = "exact", *, impl: RetentionImpl = RetentionImpl.XLA) -> Array:
    """:func:`nucleusx_jax.retention.chunkwise_retention` with T split over ``sequence`` (module docstring).

    Global arrays, under the mesh in context: q, k ``[B, H, T, K]``, v ``[B, H, T, V]``, mask and
    segment_ids ``[B, T]`` -> ``[B, H, T, V]``. Raises ``ValueError`` (at trace time) when T is not a multiple
    of ``sequence`` x ``chunk_size``, or for ``impl`` other than XLA (the Pallas kernel has no state input).
    """
    return _split(q, k, v, log_decay, chunk_size, mask, segment_ids, normalization, impl, None, False)[0]


def chunkwise_carry(q: Array, k: Array, v: Array, log_decay: Array, chunk_size: int,
                    state: Optional[ret.CarriedState], mask: Optional[Array] = None,
                    segment_ids: Optional[Array] = None, normalization: str = "exact", *,
                    impl: RetentionImpl = RetentionImpl.XLA) -> Tuple[Array, ret.CarriedState]:
    """:func:`nucleusx_jax.retention.chunkwise_carry` with T split over ``sequence``: the window continues
    ``state`` (replicated over ``sequence``; None: nothing before) and returns ``([B, H, T, V], the state after
    its last token)``, that of the last device, replicated. The incoming state enters the first device's scan and
    reaches the others through the same ``all_gather`` of slice states; gradients reach it from every device."""
    return _split(q, k, v, log_decay, chunk_size, mask, segment_ids, normalization, impl, state, True)


def _split(q: Array, k: Array, v: Array, log_decay: Array, chunk_size: int, mask: Optional[Array],
           segment_ids: Optional[Array], normalization: str, impl: RetentionImpl, state: Optional[ret.CarriedState],
           final: bool) -> Tuple[Array, Optional[ret.CarriedState]]:
    """The checks, then the ``shard_map`` over ``sequence`` of :func:`_slice_retention`."""
    if RetentionImpl.parse(impl) is not RetentionImpl.XLA:
        raise ValueError(f"retention_impl={RetentionImpl.parse(impl).value!r} has no sequence-parallel form: "
                         f"use retention_impl='xla' with mesh.sequence={sequence_size()}")
    check_split(q.shape[2], chunk_size, sequence_size())
    segment_ids = ret.normalizing_segments(segment_ids, mask, q.shape[::2], normalization)
    real = ret.real_tokens(mask, segment_ids)
    heads = PartitionSpec(None, None, SEQUENCE_AXIS, None)
    tokens = PartitionSpec(None, SEQUENCE_AXIS)
    local = jax.shard_map(partial(_slice_retention, chunk_size=chunk_size, final=final), axis_names={SEQUENCE_AXIS},
                          in_specs=(heads, heads, heads, PartitionSpec(), tokens, tokens, PartitionSpec()),
                          out_specs=(heads, PartitionSpec()))
    return local(q, k, v, log_decay, real, segment_ids, state)


def segment_starts(segment_ids: Array) -> Array:
    """:func:`nucleusx_jax.retention.segment_starts` of ``segment_ids`` ``[B, T]``; with T split over
    ``sequence`` each device finds its own, from one ``all_gather`` of ``[B]`` ints per device, instead of XLA
    gathering the whole ``[B, T]`` (the same numbers; when T is no multiple of the axis, XLA's way)."""
    parts = sequence_size()
    if parts == 1 or segment_ids.shape[1] % parts:
        return ret.segment_starts(segment_ids)
    tokens = PartitionSpec(None, SEQUENCE_AXIS)
    return jax.shard_map(_slice_starts, axis_names={SEQUENCE_AXIS}, in_specs=tokens, out_specs=tokens)(segment_ids)


def _slice_starts(segment_ids: Array) -> Array:
    """One device's slice ``[B, L]`` of :func:`segment_starts` (global positions) inside ``shard_map``."""
    index = jax.lax.axis_index(SEQUENCE_AXIS)
    length = segment_ids.shape[1]
    starts = ret.segment_starts(segment_ids) + index * length  # the slice's first run as if it began here
    first, last = segment_ids[:, 0], segment_ids[:, -1]
    firsts, lasts, last_starts = jax.lax.all_gather((first, last, starts[:, -1]), SEQUENCE_AXIS)  # [D, B]
    slices = jnp.arange(firsts.shape[0])

    def step(carry: tuple, x: tuple) -> tuple:
        """carry: (id, start) of the run at the end of the slices so far; slice e joins it when its first id
        equals that id, and passes it on when it is one run."""
        prev_id, prev_start = carry
        f, l, s, e = x
        joined = (f == prev_id) & (e > 0)
        return (l, jnp.where(joined & (s == e * length), prev_start, s)), carry

    _, (prev_ids, prev_starts) = jax.lax.scan(step, (lasts[0], last_starts[0]), (firsts, lasts, last_starts, slices))
    joined = (first == prev_ids[index]) & (index > 0)
    return jnp.where(joined[:, None] & (starts == index * length), prev_starts[index][:, None], starts)


def _slice_retention(q: Array, k: Array, v: Array, log_decay: Array, real: Optional[Array],
                     segment_ids: Optional[Array], state: Optional[ret.CarriedState], *, chunk_size: int,
                     final: bool) -> Tuple[Array, Optional[ret.CarriedState]]:
    """One device's slice (``T / D`` tokens, N chunks) inside ``shard_map``: its output and, when ``final``, the
    state after the whole sequence (the last device's, replicated)."""
    index = jax.lax.axis_index(SEQUENCE_AXIS)
    parts = jax.lax.axis_size(SEQUENCE_AXIS)
    length = q.shape[2]
    starts = None
    if segment_ids is not None:  # negative: the segment began on an earlier device (or window)
        starts = _slice_starts(segment_ids)
        if state is not None:
            starts = ret.continue_starts(starts, state.count)
        starts = starts - index * length
    terms = ret.chunk_terms(q, k, v, log_decay, chunk_size, real, starts)
    before, final_state = ret.chunk_states(terms, log_decay, chunk_size)
    # an incoming state reaches chunk n decayed by gamma**(n C), and not at all past a segment start
    reach, through = ret.state_reach(terms.carried, log_decay, chunk_size)
    init = None if state is None else ret.chunk_init(state, log_decay, chunk_size, terms.chunk_z is not None)
    incoming = _incoming(final_state, through, index, init)
    before = jax.tree.map(lambda b, s: b + reach * s, before, incoming)
    out = ret.chunk_output(terms, before, length, v.dtype)
    if not final:
        return out, None
    count = index * length + (0 if state is None else state.count)  # positions before the slice (no segments)
    after = ret.chunk_final(k, v, log_decay, chunk_size, real, starts, before, jnp.broadcast_to(count, q.shape[:1]))
    last = index == parts - 1  # every device gets the last one's
    return out, jax.tree.map(lambda x: jax.lax.psum(jnp.where(last, x, jnp.zeros_like(x)), SEQUENCE_AXIS), after)


def _incoming(final: ret.ChunkStates, through: Array, index: Array,
              init: Optional[ret.ChunkStates] = None) -> ret.ChunkStates:
    """The state entering slice ``index``: ``init`` (the window's incoming state; None: empty) and the slices
    before it, each state decayed through the slices after it, from one ``all_gather`` of every slice's
    ``final`` state and ``through`` factor."""
    states, factors = jax.lax.all_gather((final, through), SEQUENCE_AXIS)  # leading axis D

    def step(state: ret.ChunkStates, x: tuple) -> tuple:
        nxt = jax.tree.map(lambda s, f: s * x[1] + f, state, x[0])
        return nxt, state

    start = jax.tree.map(jnp.zeros_like, final)  # varying over `sequence`, as the scan's carry must be
    if init is not None:
        start = jax.tree.map(jnp.add, start, init)
    _, entering = jax.lax.scan(step, start, (states, factors))
    return jax.tree.map(lambda s: s[index], entering)
