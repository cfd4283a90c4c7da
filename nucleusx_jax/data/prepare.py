"""Prepare a token store from text sources: streaming, parallel, deterministic and resumable.

The main process reads the sources in order (:func:`~nucleusx_jax.sources.iter_source_documents`) and
groups the documents into *units* of about ``unit_chars`` characters. ``workers`` processes tokenize the
units (one thread each); the main process receives them back in unit order and appends them to the current
shard's temporary file, which is renamed to ``shard-NNNNN.bin`` once it holds ``shard_tokens`` tokens. At
most ``2 * workers + 1`` units are in flight, so memory does not depend on the corpus.

The token stream, hence every shard and the index, depends only on the sources, the tokenizer and the
settings, never on ``workers``. After each shard is renamed, ``progress.json`` records it and where in the
unit stream it ended; a rerun after a crash (even ``kill -9``) keeps those shards, skips the units they hold
without tokenizing them, and produces a store byte-identical to an uninterrupted build. ``index.json`` is
written last: a store without it is unfinished.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import IO, Any, Callable, Deque, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from .. import checks, storage
from ..storage import atomic_write
from ..tokenizer import Tokenizer, load_tokenizer
from .reader import derive_key, mix64
from ..sources import FORMATS, iter_source_documents, source_size
from .store import DTYPES, INDEX_FILE, Shard, TokenStore, edges_sha256, index_json, shard_name, token_dtype
from ..lock import RunLock

PROGRESS_FILE = "progress.json"
_SHOW_SKIPPED = 10  # bad documents logged one by one; the rest are only counted
PIECE_CHARS = 1 << 16  # characters encoded at once (a longer document is cut into pieces this long)
logger = logging.getLogger(__name__)
_HOLDOUT_TAG = 0x401D


@dataclasses.dataclass(frozen=True)
class HoldOut:
    """A split by document: document ``i`` (in source order) is held out when a hash of ``(seed, i)`` falls
    below ``fraction``. ``part`` selects the documents kept: ``train`` (the rest) or ``eval`` (the held-out)."""

    fraction: float
    seed: int = 0
    part: Literal["train", "eval"] = "train"

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 < self.fraction < 1:
            raise ValueError(f"holdout fraction must be a number in (0, 1), got {self.fraction!r}")
        checks.integer("holdout seed", self.seed, minimum=0)
        checks.choice("holdout part", self.part, ("train", "eval"))

    def keep(self, first: int, count: int) -> np.ndarray:
        """Which of documents ``first .. first + count - 1`` this part keeps: bool ``[count]``."""
        ids = np.arange(first, first + count, dtype=np.uint64)
        u = (mix64(ids ^ np.uint64(derive_key(self.seed, _HOLDOUT_TAG))) >> np.uint64(11)) / float(1 << 53)
        return (u < self.fraction) == (self.part == "eval")


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """How :func:`prepare` reads, tokenizes and shards. Only ``workers`` and ``progress`` leave the store's
    bytes unchanged; ``unit_chars`` changes only how a resumed build finds its place."""

    workers: int = 1  # tokenizer processes, one thread each; 0 tokenizes in the calling process
    shard_tokens: int = 1 << 26  # tokens per shard (128 MB of uint16)
    unit_chars: int = 1 << 20  # characters of documents per unit of work
    format: str = "auto"
    text_field: str = "text"
    add_bos: bool = True  # BOS before every document (EOS always follows one)
    holdout: Optional[HoldOut] = None
    progress: bool = True
    skip_bad_documents: bool = False  # skip (and count) jsonl lines that are not JSON / text, instead of raising

    def __post_init__(self) -> None:
        for name, low in (("workers", 0), ("shard_tokens", 1), ("unit_chars", 1)):
            checks.integer(name, getattr(self, name), minimum=low)
        if self.format not in FORMATS:
            raise ValueError(f"unknown source format {self.format!r}; known formats: {FORMATS}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"text_field must be a non-empty string, got {self.text_field!r}")
        for name in ("add_bos", "progress", "skip_bad_documents"):
            checks.flag(name, getattr(self, name))
        if self.holdout is not None and not isinstance(self.holdout, HoldOut):
            raise ValueError(f"holdout must be a HoldOut or None, got {self.holdout!r}")


# ------------------------------------------------------------------------------------------- workers


def _die_with_parent(parent: int) -> None:
    """A worker's initializer: end this process when ``parent`` ends, even by ``kill -9`` (Linux: the
    kernel's parent-death signal; elsewhere a thread that watches the parent id)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    else:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


@functools.lru_cache(maxsize=1)
def _worker_tokenizer(path: str) -> Tuple[Tokenizer, bool]:
    """The tokenizer at ``path`` and whether it encodes ``a b`` as ``a`` then ``b`` (words never merge across
    a space, and a piece's start reads as a space: SentencePiece's dummy prefix): then a document cut before a
    space, the space dropped, encodes to exactly the whole document's tokens."""
    tok = load_tokenizer(path, num_threads=1)
    return tok, tok.encode("retention of the state") == tok.encode("retention of") + tok.encode("the state")


def pieces(texts: Sequence[str], limit: int, drop_space: bool) -> Iterator[Tuple[int, str]]:
    """``(document index, piece)`` of ``texts``: a document of more than ``limit`` characters is cut into
    pieces of at most ``limit``, each cut before a space where the piece's second half has one (that space is
    dropped with ``drop_space``), else at ``limit``."""
    for i, text in enumerate(texts):
        start = 0
        while len(text) - start > limit:
            cut = text.rfind(" ", start + limit // 2, start + limit)
            while cut > start + limit // 2 and text[cut - 1] == " ":  # the first space of a run
                cut -= 1
            if cut < 0:
                cut, skip = start + limit, 0
            else:
                skip = int(drop_space)
            yield i, text[start:cut]
            start = cut + skip
        yield i, text[start:] if start else text


def tokenize_unit(tokenizer_path: str, add_bos: bool, dtype: str, texts: Sequence[str]
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One unit: ``(tokens [T] of dtype, doc_ends [D] int64 (exclusive ends in tokens), doc_bytes [D] int64)``
    with ``[BOS] doc [EOS]`` per document (BOS only with ``add_bos``). Encoded in batches of about
    ``PIECE_CHARS`` characters (long documents in pieces, see :func:`pieces`), each batch's ids turned into
    ``dtype`` at once: memory is a few times the text, however long one document."""
    tok, drop_space = _worker_tokenizer(tokenizer_path)
    lengths = np.zeros(len(texts), np.int64)
    parts: List[np.ndarray] = []
    batch: List[str] = []
    owners: List[int] = []

    def encode() -> None:
        ids = tok.encode_batch(batch)
        counts = np.fromiter(map(len, ids), np.int64, len(ids))
        np.add.at(lengths, owners, counts)
        flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(counts.sum()))
        if flat.size and (flat.min() < 0 or flat.max() >= tok.vocab_size):
            raise ValueError(f"the tokenizer {tokenizer_path!r} produced id {int(flat.max())} outside "
                             f"[0, {tok.vocab_size})")
        parts.append(flat.astype(DTYPES[dtype]))
        batch.clear()
        owners.clear()

    chars = 0
    for owner, piece in pieces(texts, PIECE_CHARS, drop_space):
        batch.append(piece)
        owners.append(owner)
        chars += len(piece)
        if chars >= PIECE_CHARS:
            encode()
            chars = 0
    if batch:
        encode()
    extra = 2 if add_bos else 1
    ends = np.cumsum(lengths + extra)
    total = int(ends[-1]) if len(ends) else 0
    out = np.empty(total, DTYPES[dtype])
    body = np.ones(total, bool)
    body[ends - 1] = False
    if add_bos:
        body[ends - lengths - extra] = False
        out[ends - lengths - extra] = tok.bos_id
    out[ends - 1] = tok.eos_id
    out[body] = np.concatenate(parts) if parts else np.zeros(0, DTYPES[dtype])
    nbytes = np.fromiter((len(t.encode("utf-8", "surrogatepass")) for t in texts), np.int64, len(texts))
    return out, ends, nbytes


# ------------------------------------------------------------------------------------------- main side


def _units(sources: Sequence[str], options: PrepareOptions, on_bad: Optional[Callable[[str], None]] = None
           ) -> Iterator[Tuple[int, List[str], int]]:
    """``(unit index, kept documents, characters read)``: documents in source order, grouped by size; bad
    documents raise, or with ``on_bad`` are skipped (see :func:`~nucleusx_jax.sources.iter_source_documents`)."""
    batch: List[str] = []
    chars, first, unit = 0, 0, 0

    def flush() -> Tuple[int, List[str], int]:
        docs = batch if options.holdout is None else list(itertools.compress(batch, options.holdout.keep(first, len(batch))))
        return unit, docs, chars

    for source in sources:
        for doc in iter_source_documents(source, options.format, options.text_field, on_bad):
            batch.append(doc)
            chars += len(doc)
            if chars >= options.unit_chars:
                yield flush()
                first, unit, chars, batch = first + len(batch), unit + 1, 0, []
    if batch:
        yield flush()


class _ShardWriter:
    """Appends unit outputs to fixed-size shards: a temporary file in ``staging`` (``output`` itself when local)
    committed when full (renamed, or uploaded as one object), then progress.json."""

    def __init__(self, output: str, staging: str, dtype: str, shard_tokens: int, settings: Dict[str, Any],
                 done: List[Dict[str, Any]]):
        self.output, self.staging, self.settings = output, staging, settings
        self.dtype, self.shard_tokens = np.dtype(DTYPES[dtype]), shard_tokens
        self.done = done
        self.file: Optional[IO[bytes]] = None
        self.fill = self.documents = self.bytes = 0
        self.hash = hashlib.sha256()

    def add(self, unit: int, tokens: np.ndarray, ends: np.ndarray, nbytes: np.ndarray, start: int) -> None:
        """Append ``tokens[start:]`` of ``unit``; documents count in the shard holding their EOS."""
        while start < len(tokens):
            take = min(len(tokens) - start, self.shard_tokens - self.fill)
            if self.file is None:
                self.file = open(os.path.join(self.staging, shard_name(len(self.done)) + ".tmp"), "wb")
            block = tokens[start : start + take].tobytes()
            self.file.write(block)
            self.hash.update(block)
            ended = (ends > start) & (ends <= start + take)
            self.documents += int(ended.sum())
            self.bytes += int(nbytes[ended].sum())
            self.fill += take
            start += take
            if self.fill == self.shard_tokens:
                self.commit(unit, start)

    def commit(self, unit: int, offset: int) -> None:
        """Commit the current shard and record it (and where it ended) in progress.json."""
        if self.file is None:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        name = shard_name(len(self.done))
        staged = os.path.join(self.staging, name + ".tmp")
        edges = edges_sha256(staged, self.fill * self.dtype.itemsize)
        storage.upload_file(staged, os.path.join(self.output, name))
        shard = Shard(file=name, tokens=self.fill, documents=self.documents, bytes=self.bytes,
                      sha256=self.hash.hexdigest(), edges=edges)
        self.done.append({**dataclasses.asdict(shard), "end": [unit, offset]})
        atomic_write(os.path.join(self.output, PROGRESS_FILE),
                     json.dumps({"settings": self.settings, "shards": self.done}, indent=1, sort_keys=True))
        self.file, self.fill, self.documents, self.bytes, self.hash = None, 0, 0, 0, hashlib.sha256()


def _finished_shards(output: str, settings: Dict[str, Any], itemsize: int) -> List[Dict[str, Any]]:
    """The shards a previous, interrupted build finished (their files present and whole), for a rerun with
    the same settings; raises when ``output`` holds a build with other settings."""
    path = os.path.join(output, PROGRESS_FILE)
    if not storage.isfile(path):
        return []
    with storage.open_file(path, "r") as f:
        progress = json.load(f)
    _same_settings(output, progress["settings"], settings)
    done = []
    for s in progress["shards"]:
        file = os.path.join(output, s["file"])
        if not storage.isfile(file) or storage.size(file) != s["tokens"] * itemsize or (
                s.get("edges") is not None and edges_sha256(file, s["tokens"] * itemsize) != s["edges"]):
            break
        done.append(s)
    return done


def _same_settings(output: str, have: Dict[str, Any], want: Dict[str, Any]) -> None:
    """Raise unless two builds' settings agree (the tokenizer by fingerprint and ids, not by its path)."""
    have, want = ({**d, "tokenizer": {k: v for k, v in (d.get("tokenizer") or {}).items() if k != "path"}}
                  for d in (have, want))
    differ = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if differ:
        raise ValueError(f"{output!r} already holds a (possibly unfinished) token store built with other settings "
                         f"(they differ in {differ}: {[have.get(k) for k in differ]} there, {[want.get(k) for k in differ]} "
                         f"now); choose another output directory or delete it")


def _in_order(units: Iterator[Tuple[int, List[str], int]], tokenize: Any, workers: int
              ) -> Iterator[Tuple[int, int, Tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """``(unit, chars, tokenize(texts))`` in unit order, with ``workers`` processes and a bounded queue."""
    if workers == 0:
        for unit, texts, chars in units:
            yield unit, chars, tokenize(texts)
        return
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: safe even when the caller runs JAX threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_die_with_parent,
                                                initargs=(os.getpid(),)) as pool:
        pending: Deque[Tuple[int, int, concurrent.futures.Future]] = collections.deque()
        for unit, texts, chars in units:
            pending.append((unit, chars, pool.submit(tokenize, texts)))
            if len(pending) > 2 * workers:
                u, c, future = pending.popleft()
                yield u, c, future.result()
        while pending:
            u, c, future = pending.popleft()
            yield u, c, future.result()


class PrepareLock(RunLock):
    """``<output>/prepare.lock``: one ``prepare`` per output directory, with the run lock's semantics (a live
    holder refuses a second writer at once, naming it; a dead one's lock is taken over)."""

    FILE, WHAT, ADVICE = "prepare.lock", "prepare", "wait for it to finish or choose another output directory"


def prepare(sources: Sequence[str], tokenizer: str, output: str, *,
            options: PrepareOptions = PrepareOptions()) -> TokenStore:
    """Tokenize ``sources`` with the tokenizer at ``tokenizer`` into the token store ``output``; returns it
    opened. A complete store with the same settings is returned as is; an interrupted build is resumed.
    ``output`` may be a URL (see :mod:`nucleusx_jax.storage`): shards are then written in a local temporary
    directory and uploaded whole, and ``index.json``, uploaded last, marks the store complete. The whole
    call holds :class:`PrepareLock` on ``output``: a second writer raises
    :class:`~nucleusx_jax.lock.RunLockedError` naming the holder."""
    if isinstance(sources, str) or not sources or not all(isinstance(s, str) and s for s in sources):
        raise ValueError(f"sources must be a non-empty list of source strings, got {sources!r}")
    tok = load_tokenizer(tokenizer, num_threads=1)
    fingerprint = getattr(tok, "fingerprint", None)
    if not fingerprint:
        raise ValueError(f"the tokenizer {tokenizer!r} has no fingerprint; a store must record which tokenizer made it")
    dtype = token_dtype(tok.vocab_size)
    meta = {"dtype": dtype, "vocab_size": tok.vocab_size, "add_bos": options.add_bos, "sources": list(sources),
            "source_format": options.format, "text_field": options.text_field, "shard_tokens": options.shard_tokens,
            "holdout": None if options.holdout is None else dataclasses.asdict(options.holdout),
            "tokenizer": {"fingerprint": fingerprint, "path": tokenizer, "bos_id": tok.bos_id, "eos_id": tok.eos_id}}
    storage.makedirs(output)
    with PrepareLock(output):
        return _build(sources, tokenizer, output, options, meta)


def _build(sources: Sequence[str], tokenizer: str, output: str, options: PrepareOptions, meta: Dict[str, Any]
           ) -> TokenStore:
    """The body of :func:`prepare`, under its lock."""
    dtype = meta["dtype"]
    if storage.isfile(os.path.join(output, INDEX_FILE)):
        store = TokenStore(output)
        _same_settings(output, {k: store.index.get(k) for k in meta}, meta)
        if storage.isfile(os.path.join(output, PROGRESS_FILE)):  # killed between the index and this removal
            storage.remove_tree(os.path.join(output, PROGRESS_FILE))
        return store
    settings = {**meta, "unit_chars": options.unit_chars}
    done = _finished_shards(output, settings, np.dtype(DTYPES[dtype]).itemsize)
    staging = tempfile.mkdtemp(prefix="nucleusx-prepare-") if storage.is_url(output) else output
    for stale in glob.glob(os.path.join(staging, "*.tmp")) + glob.glob(os.path.join(staging, ".tmp-*")):
        os.remove(stale)
    resume_unit, resume_offset = done[-1]["end"] if done else (0, 0)
    writer = _ShardWriter(output, staging, dtype, options.shard_tokens, settings, done)

    sizes = [source_size(s, options.format) for s in sources]
    bar = tqdm(total=None if None in sizes else sum(sizes), unit="B", unit_scale=True, desc=f"prepare {output}",
               disable=not options.progress, dynamic_ncols=True)
    tokens_done, t0 = 0, time.perf_counter()

    skipped = [0]

    def skip(message: str) -> None:
        if skipped[0] < _SHOW_SKIPPED:
            logger.warning("skipped a bad document: %s", message)
        skipped[0] += 1

    def todo() -> Iterator[Tuple[int, List[str], int]]:
        for unit in _units(sources, options, skip if options.skip_bad_documents else None):
            if unit[0] >= resume_unit:
                yield unit
            else:  # finished by the interrupted build: read past, not tokenized
                bar.update(unit[2])

    tokenize = functools.partial(tokenize_unit, tokenizer, options.add_bos, dtype)
    end = (resume_unit, resume_offset)
    try:
        for unit, chars, (tokens, ends, nbytes) in _in_order(todo(), tokenize, options.workers):
            writer.add(unit, tokens, ends, nbytes, resume_offset if unit == resume_unit else 0)
            end = (unit, len(tokens))
            tokens_done += len(tokens)
            bar.update(chars)
            bar.set_postfix_str(f"{tokens_done / (time.perf_counter() - t0) / 1e6:.2f}M tok/s", refresh=False)
        writer.commit(*end)  # the last, shorter shard
    finally:
        bar.close()
        if writer.file is not None:
            writer.file.close()
        if staging != output:
            shutil.rmtree(staging, ignore_errors=True)
    shards = [Shard(**{k: v for k, v in s.items() if k != "end"}) for s in writer.done]
    if not shards or sum(s.documents for s in shards) == 0:
        what = "" if options.holdout is None else f" for the {options.holdout.part} part of holdout {options.holdout}"
        raise ValueError(f"empty corpus: the sources {list(sources)} hold no documents{what}")
    atomic_write(os.path.join(output, INDEX_FILE), index_json(meta, shards, skipped=skipped[0]))
    storage.remove_tree(os.path.join(output, PROGRESS_FILE))
    return TokenStore(output)


def verify(output: str) -> List[Tuple[str, str]]:
    """Problems of the store ``output`` (missing/truncated shards raise; every shard's sha256 is compared)."""
    return TokenStore(output, check_edges=False).verify()
