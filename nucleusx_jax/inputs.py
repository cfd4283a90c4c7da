"""Host-side checks of a model call's inputs (outside jit, so bad input gets a clear ``ValueError``), and how a
prompt is run once before decoding."""

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import retention
from .configuration import FORWARD_MODES, SIZE_LIMITS, NucleusXConfig, short

Cache = Tuple[retention.RetentionState, ...]
HEADS = ("base", "causal_lm", "sequence_classification")


def shape_of(x: Any) -> Tuple[int, ...]:
    return tuple(np.shape(x))


def check_inputs(
    config: NucleusXConfig,
    input_ids: Any,
    attention_mask: Any,
    forward_mode: str,
    chunk_size: Any,
    past_key_values: Any,
    labels: Any,
    head: str,
    *,
    segment_ids: Any = None,
) -> Optional[Cache]:
    """Validate a call's inputs on the host; returns ``past_key_values`` as :class:`RetentionState` tuples."""
    if forward_mode not in FORWARD_MODES:
        raise ValueError(f"forward_mode={forward_mode!r} is invalid: must be one of {', '.join(FORWARD_MODES)}")
    high = SIZE_LIMITS["recurrent_chunk_size"]
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or not 1 <= chunk_size <= high:
        raise ValueError(f"recurrent_chunk_size={short(chunk_size)} is invalid: must be an integer in [1, {high}]")
    if np.ndim(input_ids) != 2:
        raise ValueError(f"input_ids must have rank 2 [batch, length], got shape {shape_of(input_ids)}")
    # Traced ids (inside a jit or the generation loop) have shapes but no values: only their values go unchecked.
    concrete = not isinstance(input_ids, jax.core.Tracer)
    ids = np.asarray(input_ids) if concrete else input_ids
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: length 0; give at least one token")
    bad = ids[(ids < 0) | (ids >= config.vocab_size)] if concrete else np.zeros(0)
    if bad.size:
        raise ValueError(f"input_ids holds token ids outside [0, vocab_size={config.vocab_size}): "
                         f"{sorted(set(bad.tolist()))[:10]}")
    if attention_mask is not None and shape_of(attention_mask) != ids.shape:
        raise ValueError(f"attention_mask has shape {shape_of(attention_mask)} but input_ids has shape "
                         f"{ids.shape}; they must be equal")
    if segment_ids is not None:
        if isinstance(segment_ids, jax.core.Tracer):
            if shape_of(segment_ids) != ids.shape:
                raise ValueError(f"segment_ids has shape {shape_of(segment_ids)} but input_ids has shape {ids.shape}; "
                                 "they must be equal")
        else:
            retention.check_segment_ids(np.asarray(segment_ids), ids.shape)
            if attention_mask is not None and not isinstance(attention_mask, jax.core.Tracer) and (
                    (np.asarray(attention_mask) != 0) != (np.asarray(segment_ids) != 0)).any():
                raise ValueError("attention_mask and segment_ids disagree: padding must have attention_mask 0 and "
                                 "segment id 0, every other token a non-zero segment id (or leave attention_mask out)")
    if labels is not None and head == "causal_lm" and shape_of(labels) != ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {ids.shape}, got {shape_of(labels)}")
    if labels is not None and head == "sequence_classification" and shape_of(labels)[:1] != ids.shape[:1]:
        raise ValueError(f"labels must have shape [batch={ids.shape[0]}] or [batch, num_labels], got {shape_of(labels)}")
    if labels is not None and head == "base":
        raise ValueError("the bare decoder (head 'base') takes no labels; use the causal LM")
    if past_key_values is None:
        return None
    if forward_mode != "recurrent":
        raise ValueError(f"past_key_values is only used by forward_mode='recurrent', got {forward_mode!r}; "
                         "run the prompt without past_key_values or continue in recurrent mode")
    h, kd, vd = config.decoder_retention_heads, config.key_head_dim, config.value_head_dim
    batch = ids.shape[0]
    if len(past_key_values) != config.decoder_layers:
        raise ValueError(f"past_key_values has {len(past_key_values)} layers but this model has "
                         f"decoder_layers={config.decoder_layers}: it comes from a different config")
    states = []
    for i, layer in enumerate(past_key_values):
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


def prompt_forward_mode(
    config: NucleusXConfig, length: int, recurrent_chunk_size: Optional[int] = None, threshold: Optional[int] = None
) -> Tuple[str, int]:
    """How generation runs a prompt of ``length`` tokens once: ``(forward_mode, chunk_size)``.

    Parallel mode, or chunkwise when ``length > threshold`` (default ``4 * recurrent_chunk_size``).
    """
    chunk = recurrent_chunk_size if recurrent_chunk_size is not None else config.recurrent_chunk_size
    if threshold is None:
        threshold = 4 * chunk
    if not isinstance(threshold, (int, np.integer)) or isinstance(threshold, bool) or threshold < 1:
        raise ValueError(f"prompt_chunkwise_threshold={threshold!r} is invalid: must be an integer >= 1")
    return ("chunkwise" if length > threshold else "parallel"), chunk
