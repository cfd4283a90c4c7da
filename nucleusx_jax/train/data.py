"""The ``data`` section of the training YAML and how a run gets its batches from token stores.

Training reads one or more token stores (:mod:`nucleusx_jax.data`): ``data.store`` (prepared beforehand
with ``python -m nucleusx_jax.data prepare``), or ``data.mixture`` (named components, each a store or
sources, with weights), or else ``data.sources`` prepared on the fly into ``<run_dir>/data/`` (split by
document into ``train`` and ``eval`` by ``eval_fraction``), which suits small corpora such as the embedded
default. Batches are a pure function of ``(seed, step)`` (:class:`~nucleusx_jax.data.mixture.Mixture`, or
with ``stream_rows`` :class:`~nucleusx_jax.data.streams.Streams`); each host reads only the rows it asks for.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, List, Tuple, Union

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .. import checks
from ..data.mixture import Mixture, Phase, name_key, validate_schedule
from ..data.prepare import HoldOut, PrepareOptions, prepare
from ..data.reader import Windows, derive_key
from ..runs import RUN_FILES
from ..sources import FORMATS
from ..data.store import TokenStore
from ..data.streams import Streams
from ..tokenizer import MIN_VOCAB_SIZE, Tokenizer

TRAIN, EVAL = "train", "eval"
_EVAL_TAG = 0xE7A1


@dataclasses.dataclass
class DataConfig:
    """The ``data`` section of the training YAML.

    ``tokenizer`` is a SentencePiece ``*.model`` path or an HF tokenizer directory; ``""`` means: train a
    ``vocab_size`` tokenizer on ``sources`` into the run directory (only without ``store`` / ``mixture``).
    ``sources`` (with ``format``, ``text_field``, ``add_bos``) are prepared into the run directory when
    neither ``store`` nor ``mixture`` is set; ``eval_fraction`` of their documents (a seeded split by
    document) form the held-out set ``eval``. ``mixture`` is a list of ``{name, weight, store | sources}``;
    ``mixture_schedule`` a list of ``{from_step, weights: {name: weight}}`` that change the weights from a
    step on. ``eval_sets`` is a list of ``{name, store | sources}``, each logged as loss and bits per byte.
    ``workers`` tokenizer processes prepare sources on the fly (0: in the training process).
    ``reset_at_document_boundaries``: the documents packed in a window do not see each other (segment ids from
    the BOS/EOS boundaries, see :mod:`nucleusx_jax.documents`), and no document predicts the next one's first
    token; false runs straight across them.
    ``stream_rows``: each row of the global batch reads its own contiguous stretch of the store (of its mixture
    component, rows given to components by weight), so window ``n + 1`` of a row continues window ``n``
    (:mod:`nucleusx_jax.data.streams`); for carrying the retention state across windows. Not with
    ``mixture_schedule``; a resume must keep the stream layout (batch size, seq_len, seed, stores, rows).
    """

    sources: List[str] = dataclasses.field(default_factory=lambda: ["builtin:pydoc"])
    format: str = "auto"
    text_field: str = "text"
    tokenizer: str = ""
    vocab_size: int = 2048
    seq_len: int = 128
    eval_fraction: float = 0.05
    seed: int = 0
    shuffle: bool = True
    add_bos: bool = True
    store: str = ""
    mixture: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    mixture_schedule: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    eval_sets: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    workers: int = 0
    reset_at_document_boundaries: bool = True
    stream_rows: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.sources, (list, tuple)) or not self.sources:
            raise ValueError(f"data.sources must be a non-empty list of sources, got {self.sources!r}")
        for s in self.sources:
            if not isinstance(s, str) or not s:
                raise ValueError(f"data.sources entries must be non-empty strings, got {s!r}")
        self.sources = list(self.sources)
        checks.choice("data.format", self.format, FORMATS)
        for name in ("text_field", "tokenizer", "store"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"data.{name} must be a string, got {getattr(self, name)!r}")
        if not self.text_field:
            raise ValueError("data.text_field must be a non-empty string")
        for name, low in (("vocab_size", MIN_VOCAB_SIZE), ("seq_len", 1), ("seed", 0), ("workers", 0)):
            checks.integer(f"data.{name}", getattr(self, name), minimum=low)
        frac = self.eval_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac < 1.0:
            raise ValueError(f"data.eval_fraction must be a number in [0, 1), got {frac!r}")
        self.eval_fraction = float(frac)
        for name in ("shuffle", "add_bos", "reset_at_document_boundaries", "stream_rows"):
            checks.flag(f"data.{name}", getattr(self, name))
        if self.store and self.mixture:
            raise ValueError("set data.store or data.mixture, not both")
        if (self.store or self.mixture) and not self.tokenizer:
            raise ValueError("data.store and data.mixture need data.tokenizer: the tokenizer the stores were prepared with")
        self.mixture = [_entry(e, f"data.mixture[{i}]", weighted=True) for i, e in enumerate(self.mixture)]
        self.eval_sets = [_entry(e, f"data.eval_sets[{i}]", weighted=False) for i, e in enumerate(self.eval_sets)]
        for key, entries in (("mixture", self.mixture), ("eval_sets", self.eval_sets)):
            names = [e["name"] for e in entries]
            if len(set(names)) != len(names):
                raise ValueError(f"data.{key} names must be unique, got {names}")
        if self.mixture_schedule and not self.mixture:
            raise ValueError("data.mixture_schedule needs data.mixture")
        if self.stream_rows and self.mixture_schedule:
            raise ValueError("data.mixture_schedule cannot be used with data.stream_rows: stream rows are given to "
                             "the components once for the whole run, so the weights cannot change; drop "
                             "data.mixture_schedule (or data.stream_rows)")
        self.schedule()  # validates the phases and weights

    def schedule(self) -> List[Phase]:
        """The mixture's phases: the components' weights from step 0, then ``mixture_schedule``."""
        names = [e["name"] for e in self.mixture] or [TRAIN]
        phases = [Phase(0, tuple(e["weight"] for e in self.mixture) or (1.0,))]
        for i, p in enumerate(self.mixture_schedule):
            if not isinstance(p, dict) or set(p) != {"from_step", "weights"}:
                raise ValueError(f"data.mixture_schedule[{i}] must be {{from_step: STEP, weights: {{NAME: WEIGHT}}}}, got {p!r}")
            step, weights = p["from_step"], p["weights"]
            checks.integer(f"data.mixture_schedule[{i}].from_step", step)
            if not isinstance(weights, dict) or set(weights) != set(names):
                raise ValueError(f"data.mixture_schedule[{i}].weights must give a weight to each of {names}, got {weights!r}")
            phases.append(Phase(step, tuple(weights[n] for n in names)))
        validate_schedule(names, phases)
        return phases


def _entry(entry: Any, where: str, *, weighted: bool) -> Dict[str, Any]:
    """A checked ``{name, [weight], store | sources}`` entry."""
    keys = {"name", "store", "sources"} | ({"weight"} if weighted else set())
    if not isinstance(entry, dict) or not set(entry) <= keys or "name" not in entry:
        raise ValueError(f"{where} must be a mapping with keys {sorted(keys)} (name required), got {entry!r}")
    if not isinstance(entry["name"], str) or not entry["name"] or "/" in entry["name"]:
        raise ValueError(f"{where}.name must be a non-empty string without '/', got {entry['name']!r}")
    if ("store" in entry) == ("sources" in entry):
        raise ValueError(f"{where} ({entry['name']!r}) needs exactly one of 'store' (a prepared directory) or "
                         f"'sources' (a list prepared into the run directory)")
    if "store" in entry and (not isinstance(entry["store"], str) or not entry["store"]):
        raise ValueError(f"{where}.store must be a directory path, got {entry['store']!r}")
    if "sources" in entry and (not isinstance(entry["sources"], list) or not entry["sources"]
                               or not all(isinstance(s, str) and s for s in entry["sources"])):
        raise ValueError(f"{where}.sources must be a non-empty list of source strings, got {entry['sources']!r}")
    if weighted:
        w = entry.get("weight")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"{where} ({entry['name']!r}): weight must be a positive number, got {w!r}")
        entry = {**entry, "weight": float(w)}
    return dict(entry)


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """A held-out set: batches from ``data``; ``bytes_per_token`` of its store converts loss to bits/byte."""

    name: str
    data: Mixture
    bytes_per_token: float

    def bits_per_byte(self, loss_nats: float) -> float:
        return loss_nats / (self.bytes_per_token * math.log(2))


def _planned(cfg: DataConfig, run_dir: str) -> Tuple[Dict[str, Tuple[str, Any]], Dict[str, Tuple[str, Any]]]:
    """``(train, eval)``: name -> (store directory, what to prepare there: (sources, holdout) or None)."""
    root = os.path.join(run_dir, RUN_FILES.data)

    def place(kind: str, e: Dict[str, Any]) -> Tuple[str, Any]:
        if "store" in e:
            return e["store"], None
        return os.path.join(root, f"{kind}-{e['name']}"), (e["sources"], None)

    if cfg.mixture:
        train = {e["name"]: place("mixture", e) for e in cfg.mixture}
    elif cfg.store:
        train = {TRAIN: (cfg.store, None)}
    else:
        holdout = HoldOut(cfg.eval_fraction, cfg.seed, TRAIN) if cfg.eval_fraction > 0 else None
        train = {TRAIN: (os.path.join(root, TRAIN), (cfg.sources, holdout))}
    evals = {e["name"]: place("eval", e) for e in cfg.eval_sets}
    if not cfg.store and not cfg.mixture and cfg.eval_fraction > 0:
        if EVAL in evals:
            raise ValueError(f"data.eval_sets may not use the name {EVAL!r}: it is the held-out split of data.sources")
        evals[EVAL] = (os.path.join(root, EVAL), (cfg.sources, HoldOut(cfg.eval_fraction, cfg.seed, EVAL)))
    return train, evals


def prepare_run_stores(cfg: DataConfig, tokenizer_path: str, run_dir: str, *, progress: bool = True) -> None:
    """Prepare every store the run builds from sources (a no-op for those already complete). One process."""
    train, evals = _planned(cfg, run_dir)
    for path, plan in list(train.values()) + list(evals.values()):
        if plan is not None:
            sources, holdout = plan
            prepare(sources, tokenizer_path, path, options=PrepareOptions(
                workers=cfg.workers, format=cfg.format, text_field=cfg.text_field, add_bos=cfg.add_bos,
                holdout=holdout, progress=progress))


def _open(path: str, tokenizer: Tokenizer, tokenizer_name: str) -> TokenStore:
    store = TokenStore(path)
    store.check_tokenizer(str(getattr(tokenizer, "fingerprint", "")), tokenizer_name)
    return store


def open_run_data(cfg: DataConfig, tokenizer: Tokenizer, tokenizer_name: str, run_dir: str
                  ) -> Tuple[Union[Mixture, Streams], List[EvalSet]]:
    """The run's training data (a :class:`Mixture` of random windows, or :class:`Streams` with
    ``stream_rows``) and its eval sets (random windows), from stores checked against ``tokenizer``."""
    train, evals = _planned(cfg, run_dir)
    stores = {name: _open(path, tokenizer, tokenizer_name) for name, (path, _) in train.items()}
    sets = []
    for name, (path, _) in evals.items():
        store = _open(path, tokenizer, tokenizer_name)
        seed = derive_key(cfg.seed, _EVAL_TAG, name_key(name))
        data = Mixture({name: Windows(store, cfg.seq_len, seed=seed, shuffle=cfg.shuffle)}, [Phase(0, (1.0,))], seed=seed)
        sets.append(EvalSet(name, data, store.num_bytes / store.num_tokens))
    if cfg.stream_rows:
        return Streams(stores, cfg.schedule()[0].weights, seq_len=cfg.seq_len, seed=cfg.seed, shuffle=cfg.shuffle), sets
    components = {name: Windows(store, cfg.seq_len, seed=derive_key(cfg.seed, name_key(name)), shuffle=cfg.shuffle)
                  for name, store in stores.items()}
    return Mixture(components, cfg.schedule(), seed=cfg.seed), sets


def host_rows(sharding: jax.sharding.Sharding, shape: Tuple[int, int]) -> List[int]:
    """The rows of a ``shape`` batch that this process's devices hold under ``sharding``, sorted."""
    index_map = sharding.addressable_devices_indices_map(shape)
    return sorted({r for index in index_map.values() for r in range(*index[0].indices(shape[0]))})


def _place(local: np.ndarray, rows: List[int], sharding: jax.sharding.Sharding, shape: Tuple[int, int],
           out: jax.sharding.Sharding) -> jax.Array:
    """The global array of ``local`` (this host's ``rows``, in order, first dimension) placed by ``out``, whose
    devices hold the rows that ``sharding`` gives them in a ``shape`` batch."""
    position = {r: i for i, r in enumerate(rows)}
    shards = [jax.device_put(local[[position[r] for r in range(*index[0].indices(shape[0]))]], device)
              for device, index in sharding.addressable_devices_indices_map(shape).items()]
    return jax.make_array_from_single_device_arrays((shape[0],) + local.shape[1:], out, shards)


def global_batch(dataset: Union[Mixture, Streams], step: int, sharding: jax.sharding.Sharding,
                 shape: Tuple[int, int]) -> jax.Array:
    """Global batch ``step`` of ``dataset``, ``shape`` ``[B, T + 1]`` placed by ``sharding``: each host reads
    only the rows its devices hold (row ``r`` is row ``r`` of ``dataset``'s batch ``step`` whatever the process
    layout) and puts them on those devices."""
    rows = host_rows(sharding, shape)
    return _place(dataset.rows(step, shape[0], rows), rows, sharding, shape, sharding)


def global_continues(dataset: Streams, step: int, sharding: NamedSharding, shape: Tuple[int, int]) -> jax.Array:
    """bool ``[B]``: whether row ``r`` of global batch ``step`` continues that row's batch ``step - 1``
    (:meth:`Streams.continues`), placed like the rows of the ``shape`` batch under ``sharding`` (its first
    dimension's partitioning); each host computes only its own rows."""
    rows = host_rows(sharding, shape)
    out = NamedSharding(sharding.mesh, PartitionSpec(sharding.spec[0] if len(sharding.spec) else None))
    return _place(dataset.continues(step, shape[0], rows), rows, sharding, shape, out)
