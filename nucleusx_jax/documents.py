"""Documents in packed token windows: segment ids from BOS/EOS boundaries, and labels that stay in their document.

Pure functions on ``[B, L]`` int arrays (numpy or jax, traceable under ``jit``), shared by the trainer and the
data pipeline. A document starts at a BOS token and right after an EOS token (packing writes
``[bos] doc [eos] [bos] doc [eos] ...``, or without BOS ``doc [eos] doc [eos] ...``); a window's first token
continues whatever document it was cut from. See :mod:`nucleusx_jax.retention` for what the ids do.
"""

from typing import Optional

import jax.numpy as jnp

from .types import Array


def document_segment_ids(tokens: Array, bos_id: Optional[int], eos_id: Optional[int]) -> Array:
    """Segment ids ``[B, L]`` int32 (1, 2, ... per row, never 0) of the token windows ``tokens`` ``[B, L]``:
    a new segment starts at every BOS (after the first token) and after every EOS."""
    tokens = jnp.asarray(tokens)
    starts = jnp.zeros(tokens.shape, bool)
    if bos_id is not None:
        starts = starts | (tokens == bos_id)
    if eos_id is not None:
        starts = starts | jnp.pad(tokens[:, :-1] == eos_id, ((0, 0), (1, 0)))
    return 1 + jnp.cumsum(starts.at[:, 0].set(False), axis=1, dtype=jnp.int32)


def next_token_targets(window: Array, segment_ids: Array) -> Array:
    """Targets ``[B, L - 1]`` of the inputs ``window[:, :-1]``: ``window[:, 1:]``, with -100 (ignored) where
    the next token starts another segment, so no document is asked to predict the next one's first token.
    ``window`` and ``segment_ids`` ``[B, L]``."""
    return jnp.where(segment_ids[:, 1:] == segment_ids[:, :-1], window[:, 1:], -100)
