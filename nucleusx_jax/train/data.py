"""The pretraining data pipeline: documents -> tokens -> packed fixed-length windows -> per-host batches.

Sources (``DataConfig.sources``, see :mod:`nucleusx_jax.data.sources`) are read in order into documents.
Documents are split into train/eval by document (a seeded permutation), each
split is tokenized once into a flat token array ``[BOS] doc [EOS] [BOS] doc [EOS] ...`` (cached as ``.npy``
when a cache directory is given) and cut into windows of ``seq_len + 1`` tokens with stride ``seq_len``
(window ``i`` is ``tokens[i*seq_len : (i+1)*seq_len + 1]``; inputs are ``w[:-1]``, labels ``w[1:]``).

Batches are a pure function of ``(seed, step)``: sample ``k = step * global_batch + row`` of the global
stream is window ``permutation(seed, epoch)[k % n]`` with ``epoch = k // n``. No iterator state exists, so
the data position saved in a checkpoint is just the step number.
"""

from __future__ import annotations

import dataclasses
import json
import hashlib
import os
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..data.sources import FORMATS, iter_source_documents
from ..tensorio import atomic_write
from ..tokenizer import MIN_VOCAB_SIZE, Tokenizer

SPLITS = ("train", "eval")
_SPLIT_TAG, _EPOCH_TAG = 0x5EED5, 0xE90C  # separate random streams for the split and the epoch orders


@dataclasses.dataclass
class DataConfig:
    """The ``data`` section of the training YAML.

    ``tokenizer`` is a SentencePiece ``*.model`` path or an HF tokenizer directory; ``""`` means: train a
    ``vocab_size`` tokenizer on ``sources`` into the run directory. ``eval_fraction`` of the documents
    (at least one when > 0) form the held-out split. ``add_bos`` puts BOS before every document (EOS always
    follows it), so a generation prompt is ``[bos_id] + encode(text)``. ``reset_at_document_boundaries``: the
    documents packed in a window do not see each other (segment ids from the BOS/EOS boundaries, see
    :mod:`nucleusx_jax.documents`), and no document predicts the next one's first token; false runs straight
    across them.
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
    reset_at_document_boundaries: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.sources, (list, tuple)) or not self.sources:
            raise ValueError(f"data.sources must be a non-empty list of sources, got {self.sources!r}")
        for s in self.sources:
            if not isinstance(s, str) or not s:
                raise ValueError(f"data.sources entries must be non-empty strings, got {s!r}")
        self.sources = list(self.sources)
        if self.format not in FORMATS:
            raise ValueError(f"data.format must be one of {FORMATS}, got {self.format!r}")
        for name in ("text_field", "tokenizer"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"data.{name} must be a string, got {getattr(self, name)!r}")
        if not self.text_field:
            raise ValueError("data.text_field must be a non-empty string")
        for name, low in (("vocab_size", MIN_VOCAB_SIZE), ("seq_len", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"data.{name} must be an int >= {low}, got {v!r}")
        frac = self.eval_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac < 1.0:
            raise ValueError(f"data.eval_fraction must be a number in [0, 1), got {frac!r}")
        self.eval_fraction = float(frac)
        for name in ("shuffle", "add_bos", "reset_at_document_boundaries"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"data.{name} must be true or false, got {getattr(self, name)!r}")


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Every document of every source of ``cfg``, sources in order (train and eval splits together)."""
    for source in cfg.sources:
        yield from iter_source_documents(source, cfg.format, cfg.text_field)


# ---------------------------------------------------------------------------------------- split and pack


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


def split_document_ids(num_documents: int, cfg: DataConfig) -> Dict[str, np.ndarray]:
    """Document indices (into :func:`iter_documents` order) of each split, in packing order.

    ``round(eval_fraction * n)`` documents (at least one when ``eval_fraction > 0``) drawn by ``cfg.seed``
    are held out. With ``shuffle`` the train documents are packed in a seeded order, else in source order.
    """
    n_eval = 0 if cfg.eval_fraction == 0 else max(1, round(cfg.eval_fraction * num_documents))
    if n_eval >= num_documents:
        raise ValueError(
            f"cannot hold out {n_eval} eval document(s) from a corpus of {num_documents} document(s) "
            f"(eval_fraction={cfg.eval_fraction}); add documents or set data.eval_fraction: 0"
        )
    perm = _rng(cfg.seed, _SPLIT_TAG).permutation(num_documents)
    eval_ids, train_ids = perm[:n_eval], perm[n_eval:]
    if not cfg.shuffle:
        eval_ids, train_ids = np.sort(eval_ids), np.sort(train_ids)
    return {"train": train_ids, "eval": eval_ids}


def pack_documents(token_lists: Sequence[Sequence[int]], eos_id: int, bos_id: Optional[int] = None) -> np.ndarray:
    """``[bos] t0 [eos] [bos] t1 [eos] ...`` as one int32 array (no BOS when ``bos_id`` is None)."""
    pre = [] if bos_id is None else [bos_id]
    parts = [np.asarray(pre + list(t) + [eos_id], dtype=np.int32) for t in token_lists]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A digest identifying the tokenizer: its own ``fingerprint`` or a digest of its decoded vocabulary."""
    own = getattr(tokenizer, "fingerprint", None)
    if own:
        return str(own)
    h = hashlib.sha256(repr((tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)).encode())
    for i in range(tokenizer.vocab_size):
        h.update(tokenizer.decode([i]).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def _tokenize(docs: Sequence[str], tokenizer: Tokenizer, desc: str, chunk: int = 512) -> List[List[int]]:
    encode_batch = getattr(tokenizer, "encode_batch", None) or (lambda ts: [tokenizer.encode(t) for t in ts])
    out: List[List[int]] = []
    with tqdm(total=len(docs), desc=desc, unit="doc", disable=len(docs) < 4 * chunk) as bar:
        for i in range(0, len(docs), chunk):
            out.extend(encode_batch(docs[i : i + chunk]))
            bar.update(min(chunk, len(docs) - i))
    return out


class PackedDataset:
    """One split of the corpus, tokenized once and packed; batches are a pure function of ``(seed, step)``.

    ``tokens`` is the flat int32 token array of the split (memory-mapped when cached); ``doc_ids`` the
    indices of its documents in :func:`iter_documents` order; ``len(ds)`` the number of windows.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, split: str, cache_dir: Optional[str] = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "eval" and cfg.eval_fraction == 0:
            raise ValueError("the eval split is empty: data.eval_fraction is 0")
        self.cfg, self.split, self.seq_len = cfg, split, cfg.seq_len
        docs = list(iter_documents(cfg))
        if not docs:
            raise ValueError(f"the data sources {cfg.sources} hold no documents (all missing text or empty)")
        self.num_documents_total = len(docs)
        self.doc_ids = split_document_ids(len(docs), cfg)[split]
        split_docs = [docs[i] for i in self.doc_ids]
        bos = tokenizer.bos_id if cfg.add_bos else None
        cache_path = None
        if cache_dir is not None:
            os.makedirs(cache_dir, exist_ok=True)
            h = hashlib.sha256(
                json.dumps([cfg.eval_fraction, cfg.seed, cfg.shuffle, bos, tokenizer.eos_id, split]).encode()
            )
            h.update(tokenizer_fingerprint(tokenizer).encode())
            for d in split_docs:
                h.update(hashlib.sha256(d.encode("utf-8", "surrogatepass")).digest())
            cache_path = os.path.join(cache_dir, f"tokens-{split}-{h.hexdigest()[:20]}.npy")
        if cache_path is not None and os.path.exists(cache_path):
            self.tokens = np.load(cache_path, mmap_mode="r")
        else:
            self.tokens = pack_documents(_tokenize(split_docs, tokenizer, f"tokenizing {split}"), tokenizer.eos_id, bos)
            top = int(self.tokens.max(initial=0))
            if top >= tokenizer.vocab_size:
                raise ValueError(f"the tokenizer produced id {top} >= its vocab_size {tokenizer.vocab_size}")
            if cache_path is not None:
                atomic_write(cache_path, lambda f: np.save(f, self.tokens))
        self.num_sequences = max(0, (len(self.tokens) - 1) // self.seq_len)
        if self.num_sequences == 0:
            raise ValueError(
                f"the {split} split ({len(self.doc_ids)} documents, {len(self.tokens)} tokens) is shorter than one "
                f"sequence of seq_len + 1 = {self.seq_len + 1} tokens; add data or lower data.seq_len"
            )
        self._orders: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_sequences

    @property
    def num_tokens(self) -> int:
        return int(len(self.tokens))

    def epoch(self, step: int, global_batch: int) -> float:
        """How many passes over the split the first ``step`` global batches make."""
        return step * global_batch / self.num_sequences

    def validate_batch(self, global_batch: int, process_index: int = 0, process_count: int = 1) -> None:
        """Raise a clear error when a global batch cannot be drawn from this split or split over hosts."""
        for name, v in (("global_batch", global_batch), ("process_count", process_count)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
        if global_batch % process_count:
            raise ValueError(f"global_batch {global_batch} is not divisible by process_count {process_count}")
        if global_batch > self.num_sequences:
            raise ValueError(
                f"the {self.split} split is too small for one global batch: it holds {self.num_sequences} sequences "
                f"of seq_len + 1 = {self.seq_len + 1} tokens ({self.num_tokens} tokens, {len(self.doc_ids)} documents) "
                f"but global_batch is {global_batch}; add data, lower data.seq_len or the global batch"
            )

    def _order(self, epoch: int) -> np.ndarray:
        """The window order of ``epoch``: a seeded permutation (identity without shuffle)."""
        order = self._orders.get(epoch)
        if order is None:
            n = self.num_sequences
            order = _rng(self.cfg.seed, _EPOCH_TAG, epoch).permutation(n) if self.cfg.shuffle else np.arange(n)
            if len(self._orders) >= 4:  # a batch spans at most two epochs; keep the cache small
                self._orders.clear()
            self._orders[epoch] = order
        return order

    def rows(self, step: int, global_batch: int, rows: Sequence[int]) -> np.ndarray:
        """Rows ``rows`` of global batch ``step``: int32 ``[len(rows), seq_len + 1]``."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self.validate_batch(global_batch)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= global_batch):
            raise ValueError(f"rows must lie in [0, {global_batch}), got {rows.min()}..{rows.max()}")
        sample = int(step) * global_batch + rows
        epochs, pos = np.divmod(sample, self.num_sequences)
        seq = np.empty_like(sample)
        for e in np.unique(epochs):
            m = epochs == e
            seq[m] = self._order(int(e))[pos[m]]
        idx = seq[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        return np.asarray(self.tokens[idx], dtype=np.int32)

    def batch(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """Host ``process_index``'s rows of global batch ``step``: int32 ``[global_batch // process_count,
        seq_len + 1]``, the contiguous block of rows ``[p * b, (p + 1) * b)`` with ``b = global_batch //
        process_count``. Use :meth:`rows` when the devices of a host own other rows."""
        self.validate_batch(global_batch, process_index, process_count)
        b = global_batch // process_count
        return self.rows(step, global_batch, np.arange(process_index * b, (process_index + 1) * b))
