"""The type aliases shared across the package (one definition each)."""

from __future__ import annotations

from typing import Any, Tuple

import jax

from .retention import CarriedState, RetentionState

Array = jax.Array
Params = Any  # a flax parameter tree: nested dicts of arrays
Cache = Tuple[RetentionState, ...]  # the recurrent state of a whole model: one RetentionState per layer
CarriedCache = Tuple[CarriedState, ...]  # what a chunkwise window hands to the next: one CarriedState per layer
