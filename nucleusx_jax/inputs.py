"""Host-side checks of a model call's inputs (outside jit, so bad input gets a clear ``ValueError``), and of a
prompt run once before decoding (in the form of :func:`nucleusx_jax.runtime.prompt_form`)."""

from typing import Any, Optional, Tuple

import jax
import numpy as np

from . import retention, runtime
from .checks import shape_of
from .configuration import FORWARD_MODES, SIZE_LIMITS, NucleusXConfig, short
from .types import Cache

HEADS = ("base", "causal_lm", "sequence_classification")


def check_inputs(
    config: NucleusXConfig,
    input_ids: Any,
    attention_mask: Any,
    mode: str,
    chunk_size: Any,
    past_key_values: Any,
    labels: Any,
    head: str,
    *,
    segment_ids: Any = None,
) -> Optional[Cache]:
    """Validate a call's inputs on the host (``mode``: the call's ``forward_mode``, ``chunk_size``: its
    ``recurrent_chunk_size``); returns ``past_key_values`` checked by :func:`nucleusx_jax.runtime.check_cache`."""
    if mode not in FORWARD_MODES:
        raise ValueError(f"forward_mode={mode!r} is invalid: must be one of {', '.join(FORWARD_MODES)}")
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
    carried = all(isinstance(s, retention.CarriedState) for s in past_key_values)
    if mode == "chunkwise":
        if not carried:
            raise ValueError("forward_mode='chunkwise' continues a cache of CarriedState (one per layer; start "
                             "from nucleusx_jax.runtime.empty_carried_cache(config, batch), then pass each call's "
                             "past_key_values on); a recurrent (kv, scale, seqlen) cache lacks the z the chunkwise "
                             "normalisation needs: continue it in recurrent mode")
        return runtime.check_carried(config, past_key_values, ids.shape[0])
    if mode != "recurrent":
        raise ValueError(f"past_key_values is only used by forward_mode='recurrent' (or 'chunkwise', continuing a "
                         f"CarriedState cache), got {mode!r}; run the prompt without past_key_values or continue in "
                         "recurrent mode")
    if carried:  # decode on after chunkwise windows
        log_decay = retention.log_decay_table(config.decoder_retention_heads, config.use_lm_decay)
        past_key_values = tuple(retention.carried_to_recurrent(s, log_decay) for s in past_key_values)
    return runtime.check_cache(config, past_key_values, ids.shape[0])


def check_prompt(config: NucleusXConfig, input_ids: Any, attention_mask: Any, *, chunk_size: Optional[int] = None,
                 threshold: Optional[int] = None, segment_ids: Any = None) -> Tuple[str, int]:
    """How a causal LM's prompt ``[B, T]`` runs once (:func:`nucleusx_jax.runtime.prompt_form`):
    ``(mode, chunk_size)``, after :func:`check_inputs` of the prompt in that form."""
    length = np.shape(input_ids)[-1] if np.ndim(input_ids) else 0
    mode, chunk_size = runtime.prompt_form(config, length, chunk_size=chunk_size, threshold=threshold)
    check_inputs(config, input_ids, attention_mask, mode, chunk_size, None, None, "causal_lm",
                 segment_ids=segment_ids)
    return mode, chunk_size
