"""Tensor files read and written one tensor at a time: safetensors, PyTorch ``.bin`` and flax msgpack.

Readers index a file from its headers without touching tensor data and then read any tensor on demand, so
memory stays near the size of one tensor whatever the size of the file:

* safetensors: the ``safetensors`` library validates the header per the format's specification (bounded size,
  integer offsets, byte counts matching dtype x shape, ranges contiguous from 0 to the end of the file, no
  overlap or gap); a tensor is then read with ``readinto`` from its validated range (not through the library's
  mmap: mapped pages would count towards the process's resident memory);
* ``.bin``: ``torch.load(mmap=True, weights_only=True)``; each tensor is copied out and its mapped pages are
  released (``madvise(MADV_DONTNEED)``) so they do not accumulate;
* flax msgpack (``flax.serialization.msgpack_serialize``, transformers' ``flax_model*.msgpack``): a small
  scanner walks the maps and array headers and records where each array's bytes lie (the ``msgpack`` library
  would load each array's bytes to find the next key); names are the ``/``-joined tree paths. It bounds the
  nesting depth, checks every length against the bytes left in the file and accepts only numeric dtypes.
  Arrays above ``MAX_CHUNK_SIZE`` use flax's chunked layout both ways;
* sharded checkpoints: an ``*.index.json`` whose ``weight_map`` maps every tensor to a plain file name in the
  index's own directory (no paths), and every shard holds exactly the tensors the map gives it.

Every violation raises :class:`CheckpointError` naming the file, the tensor (where there is one) and the rule.

Writers take the full list of ``(name, TensorInfo)`` first (headers are written before the data) and then
the arrays in :attr:`order`. A checkpoint larger than ``max_shard_size`` is split as transformers does, with
an ``*.index.json`` naming the file of every tensor.
"""

import ctypes
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import IO, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import ml_dtypes
import msgpack
import numpy as np
from flax.serialization import MAX_CHUNK_SIZE
from safetensors import SafetensorError, safe_open


def umask() -> int:
    """The process's file mode creation mask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def process_start(pid: int) -> Optional[int]:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``), or None if there is no such
    process. Without ``/proc``: 0 for any existing process. Tells a live holder from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (command)": state, ..., starttime (22nd)
        return None if fields[0] in ("Z", "X") else int(fields[19])  # a zombie has exited
    except FileNotFoundError:
        return None
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # exists, owned by someone else
        pass
    return 0


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not match the model or its config; the message says what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor."""

    shape: Tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return self.size * self.dtype.itemsize


SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
SAFETENSORS_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# dtypes a flax msgpack array may name (never parsed with np.dtype: "O" would read pointers from the file)
MSGPACK_DTYPES = {d.name: d for d in [*SAFETENSORS_DTYPES.values(), *map(np.dtype, (
    np.uint16, np.uint32, np.uint64, np.complex64, np.complex128))]}
CHUNKED_MARKER = "__msgpack_chunked_array__"  # flax's key for arrays split into chunks
MAX_DIM = 2**48  # larger dimensions only fit a file when another one is 0; numpy refuses some of them
MAX_MSGPACK_DEPTH = 64  # nesting of maps in a flax msgpack file (flax's trees are a few levels deep)
MAX_INDEX_BYTES = 64 * 2**20  # an *.index.json (a 65B model's is ~100 KB)


def _read_into(f, arr: np.ndarray, offset: int, path: str) -> np.ndarray:
    """Fill the contiguous ``arr`` from ``f`` at byte ``offset``; a short read means a truncated file."""
    f.seek(offset)
    view = memoryview(arr.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{path} is truncated: it ends at byte {offset + done}, but a tensor needs "
                                  f"{len(view)} bytes from byte {offset}")
        done += n
    return arr


def _write_array(f, arr: np.ndarray) -> None:
    f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))


def _unique_keys(pairs: List[Tuple[str, object]]) -> dict:
    """``json`` object hook refusing a key that appears twice (the last one would silently win)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError(f"a key appears twice: {sorted(k for k in out if sum(p[0] == k for p in pairs) > 1)}")
    return out


def _check_shape(path: str, name: str, shape: Sequence[int]) -> None:
    bad = [d for d in shape if not 0 <= d <= MAX_DIM]
    if bad:
        raise CheckpointError(f"{path}: tensor {name} has shape {list(shape)}: dimensions must lie in "
                              f"[0, {MAX_DIM}]")


# ---------------------------------------------------------------------------------------------- readers
class TensorReader:
    """One tensor file: ``index`` maps every name to its :class:`TensorInfo`; ``read(name)`` loads one tensor."""

    path: str
    index: Dict[str, TensorInfo]

    def read(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _SpanReader(TensorReader):
    """A file whose tensors lie in byte ranges: ``spans[name]`` lists ``(offset, nbytes)`` pieces in order."""

    _f: IO[bytes]
    spans: Dict[str, List[Tuple[int, int]]]

    def read(self, name: str) -> np.ndarray:
        info = self.index[name]
        arr = np.empty(info.shape, info.dtype)
        flat, done = arr.reshape(-1).view(np.uint8), 0
        for offset, nbytes in self.spans[name]:
            _read_into(self._f, flat[done:done + nbytes], offset, self.path)
            done += nbytes
        return arr

    def close(self) -> None:
        self._f.close()


class SafetensorsReader(_SpanReader):
    """A ``.safetensors`` file; ``metadata`` is its ``__metadata__`` dict. The ``safetensors`` library checks
    the header against the specification; tensors are read from the checked ranges."""

    def __init__(self, path: str):
        self.path = path
        try:
            with safe_open(path, framework="numpy"):  # validates the header; maps the file, touches no data
                pass
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt): {e}") from e
        self._f = open(path, "rb")
        try:
            length = struct.unpack("<Q", self._f.read(8))[0]
            try:
                header = json.loads(self._f.read(length), object_pairs_hook=_unique_keys)
            except ValueError as e:
                raise CheckpointError(f"{path} is not a readable safetensors file: bad header ({e})") from e
            self.metadata = header.pop("__metadata__", None) or {}
            self.index, self.spans = {}, {}
            for name, entry in header.items():
                if entry["dtype"] not in SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{path}: tensor {name} has dtype {entry['dtype']}, which this "
                                          f"reader does not know (known: {', '.join(SAFETENSORS_DTYPES)})")
                _check_shape(path, name, entry["shape"])
                begin, end = entry["data_offsets"]
                self.index[name] = TensorInfo(tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]])
                self.spans[name] = [(8 + length + begin, end - begin)]
        except BaseException:
            self._f.close()
            raise


def torch_to_numpy(t: "object") -> np.ndarray:
    """A CPU torch tensor as numpy without changing its dtype (bfloat16 via ``ml_dtypes``); shares memory."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_to_torch(arr: np.ndarray) -> "object":
    """A numpy array (bfloat16 via ``ml_dtypes``) as a torch tensor of the same dtype; shares memory."""
    import torch

    arr = np.ascontiguousarray(arr)
    if arr.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


_libc = ctypes.CDLL(None, use_errno=True)


def _release_pages(t: "object") -> None:
    """Drop the resident pages of a tensor on a private read-only file mapping (they re-read from disk)."""
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return
    start = t.data_ptr() - t.data_ptr() % mmap.PAGESIZE
    stop = -(-(t.data_ptr() + nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), mmap.MADV_DONTNEED)


class TorchBinReader(TensorReader):
    """A ``torch.save`` state dict (``pytorch_model*.bin``), memory-mapped."""

    def __init__(self, path: str):
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"reading {path} needs PyTorch: pip install 'nucleusx-jax[torch]'") from e
        self.path = path
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises RuntimeError, pickle errors, zip errors, ... for bad files
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} does not hold a state dict of tensors")
        self._state = state
        self.index = {k: TensorInfo(tuple(t.shape), torch_to_numpy(t[:0] if t.ndim else t).dtype)
                      for k, t in state.items()}

    def read(self, name: str) -> np.ndarray:
        t = self._state[name]
        arr = np.array(torch_to_numpy(t), copy=True, order="C")
        _release_pages(t)
        return arr

    def close(self) -> None:
        self._state = None


class MsgpackReader(_SpanReader):
    """A flax msgpack file; tensor names are the ``/``-joined paths of the tree."""

    _SIZED = {0xC4: ("bin", ">B"), 0xC5: ("bin", ">H"), 0xC6: ("bin", ">I"), 0xC7: ("ext", ">B"),
              0xC8: ("ext", ">H"), 0xC9: ("ext", ">I"), 0xCC: ("int", ">B"), 0xCD: ("int", ">H"),
              0xCE: ("int", ">I"), 0xCF: ("int", ">Q"), 0xD0: ("int", ">b"), 0xD1: ("int", ">h"),
              0xD2: ("int", ">i"), 0xD3: ("int", ">q"), 0xD9: ("str", ">B"), 0xDA: ("str", ">H"),
              0xDB: ("str", ">I"), 0xDC: ("array", ">H"), 0xDD: ("array", ">I"), 0xDE: ("map", ">H"),
              0xDF: ("map", ">I")}

    def __init__(self, path: str):
        self.path = path
        self._size = os.path.getsize(path)
        self._f = open(path, "rb")
        self.index: Dict[str, TensorInfo] = {}
        self.spans: Dict[str, List[Tuple[int, int]]] = {}
        try:
            self._scan_map((), 1)
            if self._f.tell() != self._size:
                raise CheckpointError(f"{path} is not a readable flax msgpack file: {self._size - self._f.tell()} "
                                      "bytes follow the parameter tree")
        except BaseException:
            self._f.close()
            raise

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a readable flax msgpack file: {what} at byte {self._f.tell()}")

    def _take(self, n: int) -> bytes:
        if n > self._size - self._f.tell():  # checked first: a corrupt length must not size an allocation
            raise CheckpointError(f"{self.path} is truncated: it ends at byte {self._size} inside the parameter "
                                  f"tree, where {n} more bytes are needed after byte {self._f.tell()}")
        return self._f.read(n)

    def _head(self) -> Tuple[str, int]:
        """The next value's kind and its length (maps, arrays, str, bin, ext) or value (int, bool). Lengths and
        element counts are checked against the bytes left in the file."""
        b = self._take(1)[0]
        if b <= 0x7F or b >= 0xE0:
            return "int", b if b <= 0x7F else b - 0x100
        if b <= 0x8F:
            kind, n = "map", b & 0x0F
        elif b <= 0x9F:
            kind, n = "array", b & 0x0F
        elif b <= 0xBF:
            kind, n = "str", b & 0x1F
        elif b in (0xC2, 0xC3):
            return "bool", b - 0xC2
        elif 0xD4 <= b <= 0xD8:
            kind, n = "ext", 1 << (b - 0xD4)
        elif b in self._SIZED:
            kind, fmt = self._SIZED[b]
            n = struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]
            if kind == "int":
                return kind, n
        else:
            raise self._fail(f"unsupported msgpack type 0x{b:02x}")
        if n > self._size - self._f.tell():  # every element or byte needs at least one byte of the file
            raise CheckpointError(f"{self.path} is truncated: a {kind} of length {n} at byte {self._f.tell()} "
                                  f"does not fit in the {self._size} bytes of the file")
        return kind, n

    def _expect(self, *kinds: str) -> int:
        kind, n = self._head()
        if kind not in kinds:
            raise self._fail(f"found a {kind} where a {' or '.join(kinds)} was expected")
        return n

    def _str(self) -> str:
        try:
            return self._take(self._expect("str")).decode()
        except UnicodeDecodeError as e:
            raise self._fail(f"a key that is not UTF-8 ({e.reason})") from e

    def _scan_map(self, prefix: Tuple[str, ...], depth: int) -> None:
        if depth > MAX_MSGPACK_DEPTH:
            raise self._fail(f"maps nested deeper than {MAX_MSGPACK_DEPTH} levels under {'/'.join(prefix)}")
        for _ in range(self._expect("map")):
            path = prefix + tuple(self._str().split("/"))  # transformers' shards use '/'-joined flat keys
            start = self._f.tell()
            kind, n = self._head()
            if kind == "ext":
                self._add("/".join(path), *self._scan_array(n, "/".join(path)))
                continue
            if kind != "map":
                raise self._fail(f"{'/'.join(path)} holds a {kind}, not an array or a map")
            first = self._str() if n else None
            self._f.seek(start)
            if first == CHUNKED_MARKER:
                self._scan_chunked("/".join(path))
            else:
                self._scan_map(path, depth + 1)

    def _add(self, name: str, info: TensorInfo, spans: List[Tuple[int, int]]) -> None:
        if name in self.index:
            raise self._fail(f"array {name} appears twice")
        self.index[name], self.spans[name] = info, spans

    def _scan_array(self, length: int, name: str) -> Tuple[TensorInfo, List[Tuple[int, int]]]:
        """An ndarray ext (flax: ``ExtType(1, packb((shape, dtype name, bytes)))``) whose length was read."""
        code = struct.unpack(">b", self._take(1))[0]
        start = self._f.tell()
        if code != 1 or self._expect("array") != 3:
            raise self._fail(f"{name}: an extension of type {code} that is not a flax ndarray")
        shape = tuple(self._expect("int") for _ in range(self._expect("array")))
        _check_shape(self.path, name, shape)
        dtype = self._str()
        if dtype not in MSGPACK_DTYPES:
            raise self._fail(f"{name}: dtype {dtype!r} is not one of {', '.join(MSGPACK_DTYPES)}")
        nbytes = self._expect("bin")
        offset = self._f.tell()
        info = TensorInfo(shape, MSGPACK_DTYPES[dtype])
        if nbytes != info.nbytes or offset + nbytes - start != length:
            raise self._fail(f"{name}: an array of shape {list(shape)} {dtype} needs {info.nbytes} bytes, but "
                             f"its data has {nbytes} and its extension {length - (offset - start)}")
        self._f.seek(offset + nbytes)  # _head checked that the data lies inside the file
        return info, [(offset, nbytes)]

    def _numbered(self, what: str, read_value: Callable[[], object]) -> List[object]:
        """A map ``{"0": v0, "1": v1, ...}`` (flax's encoding of a list) as ``[v0, v1, ...]``."""
        pairs = [(self._str(), read_value()) for _ in range(self._expect("map"))]
        keys = [k for k, _ in pairs]
        if sorted(keys) != sorted(map(str, range(len(pairs)))):
            raise self._fail(f"{what} keys are {keys}, not 0 to {len(pairs) - 1} once each")
        values = dict(pairs)
        return [values[str(i)] for i in range(len(pairs))]

    def _scan_chunked(self, name: str) -> None:
        parts: Dict[str, List[object]] = {}
        for _ in range(self._expect("map")):
            key = self._str()
            if key == CHUNKED_MARKER:
                self._expect("bool")
            elif key in ("shape", "chunks") and key not in parts:
                read = ((lambda: self._expect("int")) if key == "shape"
                        else (lambda: self._scan_array(self._expect("ext"), name)))
                parts[key] = self._numbered(f"the chunked array {name}'s {key}", read)
            else:
                raise self._fail(f"unexpected or repeated key {key!r} in the chunked array {name}")
        if set(parts) != {"shape", "chunks"} or not parts["chunks"]:
            raise self._fail(f"the chunked array {name} lacks its shape or chunks")
        shape = tuple(parts["shape"])
        _check_shape(self.path, name, shape)
        dtypes = {info.dtype for info, _ in parts["chunks"]}
        info = TensorInfo(shape, next(iter(dtypes)))
        spans = [span for _, spans in parts["chunks"] for span in spans]
        if len(dtypes) != 1 or sum(n for _, n in spans) != info.nbytes:
            raise self._fail(f"the chunks of the array {name} ({', '.join(map(str, dtypes))}, "
                             f"{sum(n for _, n in spans)} bytes) do not fill its shape {list(shape)}")
        self._add(name, info, spans)


READERS: Dict[str, Callable[[str], TensorReader]] = {
    ".safetensors": SafetensorsReader, ".bin": TorchBinReader, ".pt": TorchBinReader, ".msgpack": MsgpackReader,
}


def read_index(path: str) -> Dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's ``*.index.json``: tensor name -> shard file name. Each shard
    must be a plain file name (no directory part) of an existing file next to the index."""
    size = os.path.getsize(path)
    if size > MAX_INDEX_BYTES:
        raise CheckpointError(f"{path} is not a checkpoint index: {size} bytes, more than {MAX_INDEX_BYTES}")
    try:
        with open(path, "rb") as f:
            index = json.loads(f.read(), object_pairs_hook=_unique_keys)
    except ValueError as e:
        raise CheckpointError(f"{path} is not a readable checkpoint index (JSON): {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path} is not a checkpoint index: it needs a non-empty \"weight_map\" object "
                              "mapping tensor names to shard file names")
    base = os.path.dirname(path)
    for name, shard in weight_map.items():
        plain = (isinstance(shard, str) and shard not in ("", ".", "..") and "\0" not in shard
                 and os.path.basename(shard) == shard and (os.altsep is None or os.altsep not in shard))
        if not plain:
            raise CheckpointError(f"{path}: tensor {name} is mapped to {shard!r}; a shard must be the plain name "
                                  "of a file in the index's directory")
        if not os.path.isfile(os.path.join(base, shard)):
            raise CheckpointError(f"{path}: tensor {name} is mapped to the shard {shard}, which does not exist "
                                  f"in {base or '.'}")
    return weight_map


class CheckpointReader:
    """All tensors of a checkpoint: one file, or the shards listed by an ``*.index.json`` (see
    :func:`read_index`; every shard must hold exactly the tensors the index gives it).

    ``index`` maps every name to its :class:`TensorInfo`; ``read(name)`` loads one tensor. Use as a context
    manager (closes the files).
    """

    def __init__(self, path: str):
        self.path = path
        weight_map = read_index(path) if path.endswith(".index.json") else None
        files = [path] if weight_map is None else [os.path.join(os.path.dirname(path), name)
                                                   for name in dict.fromkeys(weight_map.values())]
        self.readers: List[TensorReader] = []
        self.index: Dict[str, TensorInfo] = {}
        self._where: Dict[str, TensorReader] = {}
        try:
            for file in files:
                suffix = os.path.splitext(file)[1]
                if suffix not in READERS:
                    raise CheckpointError(f"{file}: unknown tensor file type {suffix!r} (known: {', '.join(READERS)})")
                reader = READERS[suffix](file)
                self.readers.append(reader)
                for name, info in reader.index.items():
                    if name in self._where:
                        raise CheckpointError(f"{name} is stored twice: in {self._where[name].path} and {file}")
                    if weight_map is not None and weight_map.get(name) != os.path.basename(file):
                        raise CheckpointError(f"{path}: the shard {os.path.basename(file)} holds tensor {name}, "
                                              f"which the index maps to {weight_map.get(name)!r}")
                    self.index[name], self._where[name] = info, reader
            if weight_map is not None:
                absent = sorted(set(weight_map) - set(self.index))
                if absent:
                    raise CheckpointError(f"{path} lists tensors that its shards do not hold: {absent}")
        except BaseException:
            self.close()
            raise

    def read(self, name: str) -> np.ndarray:
        """Load one tensor (a fresh, writable array)."""
        return self._where[name].read(name)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- writers
Entries = Sequence[Tuple[str, TensorInfo]]


class TensorWriter:
    """One file being written: ``order`` lists the names in the order :meth:`write` must receive them."""

    order: List[str]

    def __init__(self, path: str, entries: Entries):
        self.path, self._info = path, dict(entries)
        self.order = self.write_order([name for name, _ in entries])
        self._next = 0

    @classmethod
    def write_order(cls, names: Sequence[str]) -> List[str]:
        """The order in which this format writes ``names``."""
        return list(names)

    def _check(self, name: str, arr: np.ndarray) -> None:
        if self._next >= len(self.order) or name != self.order[self._next]:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise RuntimeError(f"{self.path}: wrote {name} where {expected} comes next")
        info = self._info[name]
        if tuple(arr.shape) != info.shape or arr.dtype != info.dtype:
            raise RuntimeError(f"{self.path}: {name} is {arr.dtype}{list(arr.shape)}, planned "
                               f"{info.dtype}{list(info.shape)}")
        self._next += 1

    def write(self, name: str, arr: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._next != len(self.order):
            raise RuntimeError(f"{self.path}: closed after {self._next} of {len(self.order)} tensors")


class SafetensorsWriter(TensorWriter):
    """Writes the safetensors header first, then each tensor's bytes as it comes."""

    def __init__(self, path: str, entries: Entries, metadata: Optional[Mapping[str, str]] = None):
        super().__init__(path, entries)
        header: Dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, info in entries:
            if info.dtype not in SAFETENSORS_CODES:
                raise CheckpointError(f"{name}: safetensors cannot store dtype {info.dtype}")
            header[name] = {"dtype": SAFETENSORS_CODES[info.dtype], "shape": list(info.shape),
                            "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format allows trailing spaces; 8-byte alignment as safetensors does
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, arr: np.ndarray) -> None:
        self._check(name, arr)
        _write_array(self._f, arr)

    def close(self) -> None:
        self._f.close()
        super().close()


def _ext_header(length: int, code: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if length in fixed:
        return struct.pack(">Bb", fixed[length], code)
    for limit, head, fmt in ((0xFF, 0xC7, ">BBb"), (0xFFFF, 0xC8, ">BHb"), (0xFFFFFFFF, 0xC9, ">BIb")):
        if length <= limit:
            return struct.pack(fmt, head, length, code)
    raise ValueError(f"msgpack extension of {length} bytes is too long")


def _bin_header(length: int) -> bytes:
    for limit, head, fmt in ((0xFF, 0xC4, ">BB"), (0xFFFF, 0xC5, ">BH"), (0xFFFFFFFF, 0xC6, ">BI")):
        if length <= limit:
            return struct.pack(fmt, head, length)
    raise ValueError(f"msgpack bin of {length} bytes is too long")


class MsgpackWriter(TensorWriter):
    """Writes the nested flax tree (names are ``/``-joined paths) as ``flax.serialization.msgpack_serialize``
    does, streaming each array; arrays above ``chunk_bytes`` take flax's chunked layout."""

    def __init__(self, path: str, entries: Entries, chunk_bytes: int = MAX_CHUNK_SIZE):
        super().__init__(path, entries)
        self.chunk_bytes = chunk_bytes
        self._packer = msgpack.Packer()
        self._preludes: List[bytes] = []  # the map headers and keys that precede each array, in ``order``
        pending = bytearray()

        def walk(node: dict) -> None:
            pending.extend(self._packer.pack_map_header(len(node)))
            for key, child in node.items():
                pending.extend(self._packer.pack(key))
                if isinstance(child, dict):
                    walk(child)
                else:
                    self._preludes.append(bytes(pending))
                    pending.clear()

        walk(_tree(self.order))
        self._tail = bytes(pending)  # nothing unless the tree is empty
        self._f = open(path, "wb")

    @classmethod
    def write_order(cls, names: Sequence[str]) -> List[str]:
        return list(_leaves(_tree(names)))

    def _write_ndarray(self, arr: np.ndarray) -> None:
        pack = self._packer.pack
        head = self._packer.pack_array_header(3) + pack(list(arr.shape)) + pack(arr.dtype.name) + _bin_header(arr.nbytes)
        self._f.write(_ext_header(len(head) + arr.nbytes, 1) + head)
        _write_array(self._f, arr)

    def write(self, name: str, arr: np.ndarray) -> None:
        self._check(name, arr)
        self._f.write(self._preludes[self._next - 1])
        if arr.nbytes <= self.chunk_bytes:
            self._write_ndarray(arr)
            return
        pack, step = self._packer.pack, max(1, self.chunk_bytes // arr.dtype.itemsize)
        flat = np.ascontiguousarray(arr).reshape(-1)
        starts = range(0, flat.size, step)
        self._f.write(self._packer.pack_map_header(3) + pack(CHUNKED_MARKER) + pack(True) + pack("shape")
                      + pack({str(i): d for i, d in enumerate(arr.shape)}) + pack("chunks")
                      + self._packer.pack_map_header(len(starts)))
        for i, s in enumerate(starts):
            self._f.write(pack(str(i)))
            self._write_ndarray(flat[s:s + step])

    def close(self) -> None:
        self._f.write(self._tail)
        self._f.close()
        super().close()


class TorchBinWriter(TensorWriter):
    """``torch.save`` of one shard's state dict (held in memory until :meth:`close`, as ``torch.save`` needs).
    Writing the same array object twice stores one shared storage (tied weights, as the reference saves them)."""

    def __init__(self, path: str, entries: Entries):
        super().__init__(path, entries)
        self._state: Dict[str, object] = {}
        self._by_id: Dict[int, Tuple[np.ndarray, object]] = {}

    def write(self, name: str, arr: np.ndarray) -> None:
        self._check(name, arr)
        if id(arr) not in self._by_id:
            self._by_id[id(arr)] = (arr, numpy_to_torch(arr))
        self._state[name] = self._by_id[id(arr)][1]

    def close(self) -> None:
        import torch

        super().close()
        torch.save(self._state, self.path)
        self._state, self._by_id = {}, {}


@dataclass(frozen=True)
class FileFormat:
    """How a checkpoint kind names its files and which writer writes them."""

    weights_name: str  # e.g. ``model.safetensors``; shards are ``model-00001-of-00003.safetensors``
    writer: type  # a TensorWriter subclass
    options: Tuple[Tuple[str, object], ...] = ()  # keyword arguments of the writer

    @property
    def index_name(self) -> str:
        return self.weights_name + ".index.json"

    def shard_name(self, i: int, n: int) -> str:
        stem, ext = os.path.splitext(self.weights_name)
        return self.weights_name if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}{ext}"


FORMATS = {
    "safetensors": FileFormat("model.safetensors", SafetensorsWriter, (("metadata", {"format": "pt"}),)),
    "bin": FileFormat("pytorch_model.bin", TorchBinWriter),
    "msgpack": FileFormat("flax_model.msgpack", MsgpackWriter),
}


def plan_shards(entries: Entries, max_shard_bytes: int) -> List[List[Tuple[str, TensorInfo]]]:
    """Split ``entries`` in order into shards of at most ``max_shard_bytes`` (a larger tensor gets its own),
    the way transformers does."""
    shards: List[List[Tuple[str, TensorInfo]]] = [[]]
    size = 0
    for name, info in entries:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, info))
        size += info.nbytes
    return shards


class CheckpointWriter:
    """Writes ``entries`` into ``directory`` in the files of ``fmt`` (sharded above ``max_shard_bytes``).

    Call :meth:`write` with the names in :attr:`order`; :meth:`close` finishes the files and the index.
    """

    def __init__(self, directory: str, fmt: FileFormat, entries: Entries, max_shard_bytes: int):
        self.directory, self.fmt = directory, fmt
        self._shards = plan_shards(entries, max_shard_bytes)
        self.files = [fmt.shard_name(i, len(self._shards)) for i in range(len(self._shards))]
        self.order = [name for shard in self._shards for name in fmt.writer.write_order([n for n, _ in shard])]
        self._current: Optional[TensorWriter] = None
        self._shard = -1
        self.total_bytes = sum(info.nbytes for _, info in entries)

    def write(self, name: str, arr: np.ndarray) -> None:
        """Write the next tensor (``name`` must be the next one of :attr:`order`)."""
        if self._current is None or self._current._next == len(self._current.order):
            if self._current is not None:
                self._current.close()
            self._shard += 1
            path = os.path.join(self.directory, self.files[self._shard])
            self._current = self.fmt.writer(path, self._shards[self._shard], **dict(self.fmt.options))
        self._current.write(name, arr)

    def close(self) -> None:
        """Finish the last file and, for several shards, write the ``*.index.json``."""
        if self._current is not None:
            self._current.close()
        if self._shard != len(self._shards) - 1:
            raise RuntimeError(f"{self.directory}: closed after {self._shard + 1} of {len(self._shards)} shards")
        if len(self._shards) > 1:
            weight_map = {name: file for file, shard in zip(self.files, self._shards) for name, _ in shard}
            with open(os.path.join(self.directory, self.fmt.index_name), "w") as f:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)


def _tree(names: Sequence[str]) -> dict:
    """Nest ``/``-joined names into dicts whose leaves are the full names."""
    tree: dict = {}
    for name in names:
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = name
    return tree


def _leaves(tree: dict) -> Iterator[str]:
    for child in tree.values():
        if isinstance(child, dict):
            yield from _leaves(child)
        else:
            yield child
