"""The token store: a directory of fixed-size shards of token ids plus ``index.json``.

Layout of ``DIR``::

    index.json          format, version, dtype, vocabulary size, tokenizer fingerprint and special ids,
                        add_bos, the sources and prepare settings, every shard (file, tokens, documents,
                        UTF-8 bytes, sha256, and ``edges``: the sha256 of its first and last 64 KiB) and the
                        totals
    shard-00000.bin     raw little-endian token ids (``uint16`` when the vocabulary fits, else ``uint32``),
    shard-00001.bin     ``shard_tokens`` of them in every shard but the last

The shards hold one flat stream ``[BOS] doc [EOS] [BOS] doc [EOS] ...`` (BOS only with ``add_bos``); a
document may continue from one shard into the next. A shard's ``documents`` and ``bytes`` count the
documents whose EOS lies in it and the UTF-8 bytes of their text, so ``bytes / tokens`` of a store converts
a loss in nats per token into bits per byte. Shards are plain numpy files (read at an offset; on object
storage one ranged request, see :mod:`nucleusx_jax.storage`): any reader reads exactly the tokens it needs,
nothing else. ``index.json`` is written last: a directory without it is no (complete) store. Opening a
store checks every shard's size and ``edges`` (two small reads per shard); ``verify`` hashes every byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import storage

FORMAT, VERSION = "nucleusx-token-store", 1
INDEX_FILE = "index.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
EDGE_BYTES = 1 << 16  # the head and the tail of a shard that opening a store hashes


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.bin"


def token_dtype(vocab_size: int) -> str:
    """``uint16`` when every id of a ``vocab_size`` vocabulary fits, else ``uint32``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@dataclasses.dataclass(frozen=True)
class Shard:
    """One shard file's entry in the index."""

    file: str
    tokens: int
    documents: int
    bytes: int
    sha256: str
    edges: Optional[str] = None  # :func:`edges_sha256` of the file (None in stores of older versions)


def index_json(meta: Dict[str, Any], shards: List[Shard], skipped: int = 0) -> str:
    """The text of ``index.json`` for ``meta`` (settings, tokenizer, dtype) and ``shards``, with the number of
    bad documents ``skipped`` (``skip_bad_documents``); deterministic."""
    body = {"format": FORMAT, "version": VERSION, **meta, "shards": [dataclasses.asdict(s) for s in shards],
            "skipped_documents": skipped,
            "tokens": sum(s.tokens for s in shards), "documents": sum(s.documents for s in shards),
            "bytes": sum(s.bytes for s in shards)}
    return json.dumps(body, indent=1, sort_keys=True) + "\n"


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with storage.open_file(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def edges_sha256(path: str, size: int) -> str:
    """sha256 of the first and the last ``EDGE_BYTES`` of the ``size``-byte file ``path`` (the whole file
    when it is shorter than both): the checksum that opening a store can afford."""
    if size <= 2 * EDGE_BYTES:
        return hashlib.sha256(storage.read_bytes(path)).hexdigest()
    h = hashlib.sha256(storage.read_bytes(path, 0, EDGE_BYTES))
    h.update(storage.read_bytes(path, size - EDGE_BYTES, size))
    return h.hexdigest()


class TokenStore:
    """A prepared store opened for reading: ``read(start, stop)`` returns tokens of the flat stream.

    Opening checks the format and version, and that every shard exists with the size and the
    :func:`edges_sha256` the index gives (a missing, truncated or overwritten shard raises, naming it;
    ``check_edges=False`` skips the checksums, for :meth:`verify`, which hashes every byte). Memory is the
    index (a few numbers per shard), whatever
    the corpus size; ``bytes_read`` counts the token bytes read so far.
    """

    def __init__(self, path: str, *, check_edges: bool = True):
        self.path = path
        index_path = os.path.join(path, INDEX_FILE)
        if not storage.isfile(index_path):
            hint = " (an unfinished prepare: rerun it to complete the store)" if storage.isfile(
                os.path.join(path, "progress.json")) else ""
            raise FileNotFoundError(f"{path!r} is not a token store: it has no {INDEX_FILE}{hint}")
        with storage.open_file(index_path, "r") as f:
            try:
                index = json.load(f)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{index_path} is not readable JSON ({str(e)[:200]}); prepare the store "
                                 "again") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
            found = ((index.get("format"), index.get("version")) if isinstance(index, dict)
                     else (type(index).__name__, None))
            raise ValueError(f"{index_path} is not a {FORMAT} version {VERSION} index (format {found[0]!r:.80}, "
                             f"version {found[1]!r:.40})")
        self.index = index
        try:
            self.dtype = np.dtype(DTYPES[index["dtype"]])
            self.shards = [Shard(**s) for s in index["shards"]]
            if not all(isinstance(s.tokens, int) and s.tokens >= 0 and isinstance(s.file, str) for s in self.shards):
                raise TypeError("a shard's tokens or file")
        except (KeyError, TypeError) as e:
            raise ValueError(f"{index_path} is damaged: {str(e)[:200]}; prepare the store again") from None
        for s in self.shards:
            file = os.path.join(path, s.file)
            if not storage.isfile(file):
                raise FileNotFoundError(f"token store {path!r}: shard {s.file} is missing")
            size, want = storage.size(file), s.tokens * self.dtype.itemsize
            if size != want:
                raise ValueError(f"token store {path!r}: shard {s.file} holds {size} bytes, the index says "
                                 f"{want} ({s.tokens} tokens); the shard is truncated or damaged - prepare it again")
            if check_edges and s.edges is not None and edges_sha256(file, size) != s.edges:
                raise ValueError(f"token store {path!r}: shard {s.file} is damaged: the checksum of its first and "
                                 f"last {EDGE_BYTES} bytes differs from the index - prepare it again")
        self.starts = np.cumsum([0] + [s.tokens for s in self.shards], dtype=np.int64)
        self.bytes_read = 0

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    @property
    def num_documents(self) -> int:
        return int(self.index["documents"])

    @property
    def num_bytes(self) -> int:
        """UTF-8 bytes of the documents' original text."""
        return int(self.index["bytes"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return str(self.index["tokenizer"]["fingerprint"])

    def check_tokenizer(self, fingerprint: str, name: str) -> None:
        """Raise unless the store was built with the tokenizer of this ``fingerprint`` (``name`` for the error)."""
        if fingerprint != self.tokenizer_fingerprint:
            raise ValueError(
                f"token store {self.path!r} was built with another tokenizer (fingerprint "
                f"{self.tokenizer_fingerprint[:16]}..., from {self.index['tokenizer'].get('path')!r}) than the "
                f"run's {name!r} (fingerprint {fingerprint[:16]}...); prepare the store with the run's tokenizer")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream as int32 ``[stop - start]``, across shard boundaries."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise ValueError(f"token range [{start}, {stop}) outside the store's [0, {self.num_tokens})")
        parts: List[np.ndarray] = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            first, end = int(self.starts[shard]), int(self.starts[shard + 1])
            take = min(stop, end) - start
            offset = (start - first) * self.dtype.itemsize
            raw = storage.read_bytes(os.path.join(self.path, self.shards[shard].file), offset,
                                     offset + take * self.dtype.itemsize)
            parts.append(np.frombuffer(raw[: len(raw) // self.dtype.itemsize * self.dtype.itemsize], self.dtype))
            if len(parts[-1]) != take:
                raise ValueError(f"token store {self.path!r}: shard {self.shards[shard].file} ended early")
            self.bytes_read += take * self.dtype.itemsize
            start += take
            shard += 1
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)

    def verify(self) -> List[Tuple[str, str]]:
        """``(file, problem)`` for each shard whose sha256 differs from the index (reads every shard)."""
        return [(s.file, "sha256 differs from the index") for s in self.shards
                if file_sha256(os.path.join(self.path, s.file)) != s.sha256]
