"""Weighted mixtures of stores: every global batch holds each component in proportion to its weight.

With weights ``w`` (a schedule of phases ``(from_step, w)``, so weights may change from a step onward) a
batch of ``B`` rows gives component ``c`` exactly ``n_c`` rows, the largest-remainder rounding of
``B * w_c / sum(w)`` (ties to the earlier component): the same counts in every batch of a phase. Which rows
belong to which component is a keyed permutation of the rows of ``(seed, step)``, so every host gets a share
of each component. Component ``c``'s rows of step ``s`` are its stream samples ``C_c(s) + 0 .. n_c - 1``,
where ``C_c(s) = sum over phases of n_c * steps`` is a closed form of the schedule: batches are a pure
function of ``(seed, step)``, and changing the weights from step ``s`` on leaves every earlier batch as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

from .. import checks
from .reader import KeyedPermutation, Windows, derive_key

_ROW_TAG = 0x520E  # keys the row-to-component assignment apart from the window orders


@dataclasses.dataclass(frozen=True)
class Phase:
    """Component weights (in component order, each > 0) from ``from_step`` on."""

    from_step: int
    weights: Tuple[float, ...]


def row_counts(weights: Sequence[float], batch: int) -> np.ndarray:
    """Rows per component in a batch of ``batch``: largest-remainder rounding of ``batch * w / sum(w)``."""
    w = np.asarray(weights, np.float64)
    share = w * batch / w.sum()
    counts = np.floor(share + 1e-9).astype(np.int64)
    left = batch - int(counts.sum())
    order = sorted(range(len(w)), key=lambda c: (-(share[c] - counts[c]), c))
    counts[order[:left]] += 1
    return counts


def validate_schedule(names: Sequence[str], schedule: Sequence[Phase]) -> None:
    """Raise naming the bad value unless ``schedule`` starts at step 0, increases, and weights are positive."""
    if not schedule or schedule[0].from_step != 0:
        raise ValueError(f"a mixture schedule must start at step 0, got {[p.from_step for p in schedule]}")
    for prev, phase in zip(schedule, schedule[1:]):
        if phase.from_step <= prev.from_step:
            raise ValueError(f"mixture phases must start at increasing steps, got {prev.from_step} then {phase.from_step}")
    for phase in schedule:
        if len(phase.weights) != len(names):
            raise ValueError(f"the phase from step {phase.from_step} has {len(phase.weights)} weights for "
                             f"{len(names)} components {list(names)}")
        for name, w in zip(names, phase.weights):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ValueError(f"mixture weight of component {name!r} (from step {phase.from_step}) must be a "
                                 f"positive number, got {w!r}")


def name_key(name: str) -> int:
    """A stable 63-bit integer for a component name (keys its window order)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1


class Mixture:
    """Batches drawn from named :class:`Windows` by a weight schedule; ``rows(step, B, rows)`` is pure."""

    def __init__(self, components: Mapping[str, Windows], schedule: Sequence[Phase], *, seed: int):
        if not components:
            raise ValueError("a mixture needs at least one component")
        self.names = list(components)
        self.components = [components[n] for n in self.names]
        lengths = {w.seq_len for w in self.components}
        if len(lengths) != 1:
            raise ValueError(f"mixture components have different seq_len {sorted(lengths)}")
        self.seq_len = lengths.pop()
        validate_schedule(self.names, schedule)
        self.schedule = list(schedule)
        self.seed = seed

    def counts(self, step: int, global_batch: int) -> np.ndarray:
        """Rows of each component in global batch ``step``: int64 ``[num_components]``."""
        phase = [p for p in self.schedule if p.from_step <= step][-1]
        return row_counts(phase.weights, global_batch)

    def consumed(self, step: int, global_batch: int) -> np.ndarray:
        """Stream samples of each component used by batches ``0 .. step - 1``: int64 ``[num_components]``."""
        total = np.zeros(len(self.names), np.int64)
        ends = [p.from_step for p in self.schedule[1:]] + [None]
        for phase, end in zip(self.schedule, ends):
            steps = max(0, (step if end is None else min(step, end)) - phase.from_step)
            total += row_counts(phase.weights, global_batch) * steps
        return total

    def assign(self, step: int, global_batch: int, rows: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """``(component, sample)`` of each row in ``rows`` of global batch ``step`` (int64 ``[len(rows)]``)."""
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= global_batch):
            raise ValueError(f"rows must lie in [0, {global_batch}), got {rows.min()}..{rows.max()}")
        counts = self.counts(step, global_batch)
        starts = np.concatenate([[0], np.cumsum(counts)])
        slots = KeyedPermutation(global_batch, derive_key(self.seed, _ROW_TAG, step))(rows)
        component = np.searchsorted(starts, slots, side="right") - 1
        sample = self.consumed(step, global_batch)[component] + slots - starts[component]
        return component, sample

    def rows(self, step: int, global_batch: int, rows: Sequence[int]) -> np.ndarray:
        """Rows ``rows`` of global batch ``step``: int32 ``[len(rows), seq_len + 1]``; reads only them."""
        step, global_batch = checks.integer("step", step, minimum=0), checks.integer("global_batch", global_batch)
        component, sample = self.assign(step, global_batch, rows)
        out = np.empty((len(component), self.seq_len + 1), np.int32)
        for c in np.unique(component):
            m = component == c
            out[m] = self.components[int(c)].read(sample[m])
        return out

    def epochs(self, step: int, global_batch: int) -> Dict[str, float]:
        """Passes over each component made by the first ``step`` batches."""
        used = self.consumed(step, global_batch)
        return {n: float(u) / len(w) for n, u, w in zip(self.names, used, self.components)}
