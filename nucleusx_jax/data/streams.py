"""Stream rows: each row of the global batch reads its own contiguous stretch of a store, window after window.

With ``data.stream_rows`` every row ``r`` of a ``B``-row global batch owns a stretch ``[start_r, stop_r)`` of one
component's store, and window ``n`` of the row is ``tokens[start_r + m*T : start_r + (m+1)*T + 1]`` with
``m = n mod W_r`` (``T`` = seq_len, ``W_r = (stop_r - start_r - 1) // T`` windows), so window ``n + 1``
continues window ``n`` token for token until the stretch wraps around. A carried retention state can then run
across windows (truncated backpropagation through time); :meth:`Streams.continues` says which rows continue.

Rows are assigned to components by weight (:func:`~nucleusx_jax.data.mixture.row_counts`, fixed for the run)
through a permutation of the rows keyed by the seed (``shuffle``; else in order). A component's store of ``N``
tokens is split among its ``n`` rows at the nominal points ``p_i = i*N // n``: stretch ``i`` starts at the
first document start (position 0 or the token after an EOS) in ``[p_i, p_{i+1} - T - 1]``, or at ``p_i``
when a document covers that whole range, and ends where stretch ``i + 1`` starts (the last at ``N``). So every
stretch holds at least one window when ``N // n >= T + 1``. A row's boundaries are found by reading a few
tokens after ``p_i`` and ``p_{i+1}``, once: batches are a pure function of ``(seed, row, step)`` and the stores,
and each host reads only its own rows. The stream positions are the step number; what a resume must match is
:meth:`Streams.layout`, which :func:`check_layout` compares.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .. import checks
from .mixture import row_counts
from .reader import KeyedPermutation, derive_key
from .store import TokenStore

_STREAM_TAG = 0x57E4  # keys the row-to-stream permutation apart from every window order
_SCAN_TOKENS = 4096  # the first read when looking for a document start; each further read doubles


@dataclasses.dataclass(frozen=True)
class Component:
    """One store of the streams; ``len`` is the ``seq_len``-token windows it holds (for the run's summary)."""

    store: TokenStore
    weight: float
    seq_len: int

    def __len__(self) -> int:
        return (self.store.num_tokens - 1) // self.seq_len


def store_fingerprint(store: TokenStore) -> str:
    """sha256 of the store's index (canonical JSON): its shards' sha256, tokens and tokenizer."""
    return hashlib.sha256(json.dumps(store.index, sort_keys=True).encode()).hexdigest()


def document_start(store: TokenStore, eos_id: int, lo: int, hi: int) -> int:
    """The first position ``p`` in ``[lo, hi]`` where a document starts (``p == 0`` or token ``p - 1`` is
    ``eos_id``), or ``lo`` when none does; reads only tokens ``[lo - 1, hi)``."""
    if lo == 0:
        return 0
    pos, chunk = lo - 1, _SCAN_TOKENS
    while pos < hi:
        stop = min(pos + chunk, hi)
        hits = np.flatnonzero(store.read(pos, stop) == eos_id)
        if hits.size:
            return pos + int(hits[0]) + 1
        pos, chunk = stop, 2 * chunk
    return lo


class Streams:
    """Batches of stream rows from named stores and weights; ``rows(step, B, rows)`` is pure.

    ``stores``: name -> :class:`TokenStore` (component order); ``weights``: one per component (> 0);
    ``seed`` keys the row permutation when ``shuffle``. Methods take the global batch size ``B``; the split of
    the stores among the ``B`` rows is computed per row on first use and kept (a few integers per row).
    """

    def __init__(self, stores: Mapping[str, TokenStore], weights: Sequence[float], *, seq_len: int, seed: int,
                 shuffle: bool = True):
        if not stores:
            raise ValueError("stream rows need at least one store")
        if len(weights) != len(stores):
            raise ValueError(f"{len(weights)} weights for {len(stores)} stores {list(stores)}")
        self.seq_len = checks.integer("seq_len", seq_len)
        self.seed = checks.integer("seed", seed, minimum=0)
        self.shuffle = checks.flag("shuffle", shuffle)
        self.names = list(stores)
        self.components = [Component(stores[n], float(w), seq_len) for n, w in zip(self.names, weights)]
        self._eos = []
        for c in self.components:
            try:
                self._eos.append(int(c.store.index["tokenizer"]["eos_id"]))
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"token store {c.store.path!r} has no tokenizer.eos_id in its index: stream rows "
                                 "start at documents, found after EOS; prepare the store again") from None
        self._starts: Dict[Tuple[int, int, int], int] = {}  # (component, stretch, rows) -> its first token

    def counts(self, global_batch: int) -> np.ndarray:
        """Stream rows of each component in a ``global_batch``-row batch: int64 ``[num_components]``; raises
        when a component gets none or its store is too small to give each of its rows a window."""
        global_batch = checks.integer("global_batch", global_batch)
        counts = row_counts([c.weight for c in self.components], global_batch)
        for name, c, n in zip(self.names, self.components, counts):
            if n == 0:
                raise ValueError(
                    f"data.mixture component {name!r} (weight {c.weight:g}) gets 0 of the {global_batch} stream "
                    "rows: data.stream_rows gives whole rows to components by weight; raise its weight or "
                    "train.global_batch, or drop the component")
            tokens, window = c.store.num_tokens, self.seq_len + 1
            if tokens // n < window:
                which = f"component {name!r}, " if len(self.names) > 1 else ""
                raise ValueError(
                    f"token store {c.store.path!r} ({which}{tokens} tokens) is too small to give each of its {n} "
                    f"stream rows a window of seq_len + 1 = {window} tokens (data.stream_rows splits the store "
                    f"into {n} stretches of about {tokens // n} tokens); add data, lower data.seq_len or "
                    f"train.global_batch" + (", or lower its weight" if len(self.names) > 1 else ""))
        return counts

    def assign(self, global_batch: int, rows: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """``(component, stretch)`` of each row in ``rows`` (int64 ``[len(rows)]``): the same at every step."""
        counts = self.counts(global_batch)
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= global_batch):
            raise ValueError(f"rows must lie in [0, {global_batch}), got {rows.min()}..{rows.max()}")
        slots = KeyedPermutation(global_batch, derive_key(self.seed, _STREAM_TAG))(rows) if self.shuffle else rows
        starts = np.concatenate([[0], np.cumsum(counts)])
        component = np.searchsorted(starts, slots, side="right") - 1
        return component, slots - starts[component]

    def _start(self, c: int, i: int, n: int) -> int:
        """The first token of stretch ``i`` of component ``c`` split among ``n`` rows (``i == n``: the end)."""
        key = (c, i, n)
        if key not in self._starts:
            store = self.components[c].store
            tokens = store.num_tokens
            lo, hi = i * tokens // n, (i + 1) * tokens // n - self.seq_len - 1
            self._starts[key] = tokens if i == n else document_start(store, self._eos[c], lo, hi)
        return self._starts[key]

    def stretch(self, c: int, i: int, n: int) -> Tuple[int, int]:
        """``(start, windows)`` of stretch ``i`` of component ``c`` split among ``n`` rows (``windows >= 1`` once
        :meth:`counts` accepted ``n``)."""
        start = self._start(c, i, n)
        return start, (self._start(c, i + 1, n) - start - 1) // self.seq_len

    def _windows(self, step: int, global_batch: int, rows: Sequence[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(component, start, m)`` per row (int64 ``[len(rows)]``): window ``step`` of a row is window ``m`` of
        its stretch, which starts at token ``start``."""
        step = checks.integer("step", step, minimum=0)
        component, index = self.assign(global_batch, rows)
        counts = self.counts(global_batch)
        spans = np.array([self.stretch(int(c), int(i), int(counts[c])) for c, i in zip(component, index)],
                         np.int64).reshape(-1, 2)
        return component, spans[:, 0], step % spans[:, 1]

    def rows(self, step: int, global_batch: int, rows: Sequence[int]) -> np.ndarray:
        """Rows ``rows`` of global batch ``step``: int32 ``[len(rows), seq_len + 1]``; reads only them."""
        component, start, m = self._windows(step, global_batch, rows)
        out = np.empty((len(component), self.seq_len + 1), np.int32)
        for j, (c, s) in enumerate(zip(component, start + m * self.seq_len)):
            out[j] = self.components[int(c)].store.read(int(s), int(s) + self.seq_len + 1)
        return out

    def continues(self, step: int, global_batch: int, rows: Sequence[int]) -> np.ndarray:
        """bool ``[len(rows)]``: whether window ``step`` of each row continues its window ``step - 1`` token for
        token (false at step 0, and when the row's stream wraps around to its start)."""
        _, _, m = self._windows(step, global_batch, rows)
        return m > 0

    def layout(self, global_batch: int) -> Dict[str, Any]:
        """What a resumed run must match (JSON-able): the batch size, seq_len, seed and order, and per component
        its store (path, sha256 of its index, tokens) and rows. Raises as :meth:`counts` does."""
        counts = self.counts(global_batch)
        return {"global_batch": int(global_batch), "seq_len": self.seq_len, "seed": self.seed,
                "shuffle": self.shuffle,
                "components": [{"name": n, "store": c.store.path, "fingerprint": store_fingerprint(c.store),
                                "tokens": c.store.num_tokens, "rows": int(k)}
                               for n, c, k in zip(self.names, self.components, counts)]}


def layout_changes(saved: Optional[Mapping[str, Any]], current: Optional[Mapping[str, Any]]
                   ) -> List[Tuple[str, str]]:
    """``(what changed, how to resume)`` for each difference between the stream layout a checkpoint was written
    with and this config's (``None``: the run does not use ``data.stream_rows``); empty when they match. Store
    paths may differ (a moved store): the stores are compared by their index's sha256."""
    if saved is None or current is None:
        if saved is current:
            return []
        return [("the run's checkpoint was written " + ("without" if saved is None else "with")
                 + " data.stream_rows; this config has it " + ("on" if saved is None else "off"),
                 f"resume with data.stream_rows: {str(saved is not None).lower()}")]
    changes = []
    for key in ("global_batch", "seq_len", "seed", "shuffle"):
        if saved[key] != current[key]:
            section = "train" if key == "global_batch" else "data"
            changes.append((f"the run's checkpoint was written with data.stream_rows over {section}.{key}="
                            f"{saved[key]!r}; this config has {section}.{key}={current[key]!r}",
                            f"resume with {section}.{key}={saved[key]!r}"))
    names = [c["name"] for c in saved["components"]], [c["name"] for c in current["components"]]
    if names[0] != names[1]:
        return changes + [(f"the run's checkpoint streams the components {names[0]}; this config has {names[1]}",
                           f"resume with the components {names[0]}")]
    for old, new in zip(saved["components"], current["components"]):
        if old["fingerprint"] != new["fingerprint"]:
            changes.append((f"component {old['name']!r} was read from a store of {old['tokens']} tokens with index "
                            f"sha256 {old['fingerprint'][:12]}... ({old['store']}); this config's store "
                            f"{new['store']} has {new['tokens']} tokens, sha256 {new['fingerprint'][:12]}...",
                            f"resume with the store {old['store']}"))
        if old["rows"] != new["rows"] and saved["global_batch"] == current["global_batch"]:
            changes.append((f"component {old['name']!r} had {old['rows']} stream rows; this config's weights give "
                            f"it {new['rows']}",
                            f"resume with the weights that gave {old['name']!r} {old['rows']} rows"))
    return changes


def check_layout(saved: Optional[Mapping[str, Any]], current: Optional[Mapping[str, Any]]) -> None:
    """Refuse a resume whose stream layout differs from the checkpoint's: ValueError naming each change and
    the settings to resume with."""
    changes = layout_changes(saved, current)
    if changes:
        raise ValueError("; ".join(what for what, _ in changes) + ": the streams would be split differently, so "
                         "the carried states and stream positions would not match. "
                         + ", ".join(fix for _, fix in changes).capitalize() + ", or start a new run_dir")
