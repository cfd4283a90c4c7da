"""Fuzzing the checkpoint readers with mutated safetensors, msgpack and index files.

Every mutated file either loads exactly what the format's reference implementation loads from it (the
``safetensors`` library, flax's ``msgpack_restore``; for an index, the valid checkpoint's tensors) or raises
``CheckpointError``; nothing else escapes. Every read is recorded: a tensor is read only from its own byte
range, which lies in the file's data section; an index opens only files in its own directory. Allocations
stay within a bounded factor of the file size (``tracemalloc``, which sees numpy's buffers).
"""

import contextlib
import json
import os
import struct
import tracemalloc
from typing import List, Tuple
from unittest import mock

import flax.serialization
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
from flax.traverse_util import flatten_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nucleusx_jax import tensorio
from nucleusx_jax.tensorio import (CheckpointError, CheckpointReader, MsgpackWriter, SafetensorsWriter,
                                   TensorInfo, torch_to_numpy)

BF16 = np.dtype(ml_dtypes.bfloat16)
RNG = np.random.default_rng(0)
TENSORS = {  # several dtypes, an empty tensor, a scalar
    "a.weight": RNG.standard_normal((3, 4)).astype(np.float32),
    "b.bias": RNG.standard_normal(5).astype(BF16),
    "c": np.arange(6, dtype=np.int32).reshape(2, 3),
    "empty": np.zeros((0, 3), np.float16),
    "scalar": np.array(2.5, np.float64),
}
FAST = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)
ALLOC_FACTOR, ALLOC_SLACK = 64, 1 << 20  # json/msgpack structure costs a few dozen bytes per byte of header


def write(path: str, writer_cls, tensors, **options) -> bytes:
    writer = writer_cls(path, [(k, TensorInfo(v.shape, v.dtype)) for k, v in tensors.items()], **options)
    for name in writer.order:
        writer.write(name, tensors[name])
    writer.close()
    with open(path, "rb") as f:
        return f.read()


class Recorded:
    """A file whose reads are logged as ``(path, offset, nbytes)``."""

    def __init__(self, path: str, f, log: list):
        self._path, self._f, self._log = path, f, log

    def read(self, n: int = -1) -> bytes:
        pos, data = self._f.tell(), self._f.read(n)
        self._log.append((self._path, pos, len(data)))
        return data

    def readinto(self, buf) -> int:
        pos, n = self._f.tell(), self._f.readinto(buf)
        self._log.append((self._path, pos, n or 0))
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@contextlib.contextmanager
def recording():
    """Log every file tensorio opens (``opened``) and every read it makes (``reads``)."""
    opened: List[str] = []
    reads: List[Tuple[str, int, int]] = []

    def fake_open(path, mode="r", *args, **kwargs):
        opened.append(os.path.abspath(path))
        return Recorded(os.path.abspath(path), open(path, mode, *args, **kwargs), reads)

    def fake_safe_open(path, *args, **kwargs):
        opened.append(os.path.abspath(path))
        return safetensors.safe_open(path, *args, **kwargs)

    with mock.patch.object(tensorio, "open", fake_open, create=True), \
            mock.patch.object(tensorio, "safe_open", fake_safe_open):
        yield opened, reads


def load(path: str, data_start=None):
    """All tensors of ``path`` through :class:`CheckpointReader`, checking every read, and the allocation peak.

    ``data_start(reader)``: where the data section of a file begins (None: only the spans are checked)."""
    size = sum(os.path.getsize(os.path.join(os.path.dirname(path), f)) for f in os.listdir(os.path.dirname(path)))
    tracemalloc.start()
    try:
        with recording() as (opened, reads), CheckpointReader(path) as reader:
            out = {}
            for file_reader in reader.readers:
                spans = file_reader.spans
                start = data_start(file_reader) if data_start else 0
                file_size = os.path.getsize(file_reader.path)
                flat = sorted(s for pieces in spans.values() for s in pieces if s[1])
                for (o1, n1), (o2, _) in zip(flat, flat[1:]):
                    assert o1 + n1 <= o2, f"overlapping spans in {file_reader.path}: {flat}"
                for name in file_reader.index:
                    del reads[:]
                    out[name] = reader.read(name)
                    for _, offset, n in reads:
                        assert n == 0 or any(o <= offset and offset + n <= o + m for o, m in spans[name]), \
                            f"read {offset}+{n} outside {name}'s spans {spans[name]}"
                    for o, m in spans[name]:
                        assert start <= o and o + m <= file_size, (name, o, m, start, file_size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= ALLOC_FACTOR * size + ALLOC_SLACK, f"allocated {peak} bytes for {size} bytes of files"
    return out, opened


def assert_same(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name, arr in expected.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
        assert got[name].tobytes() == arr.tobytes(), name


# --------------------------------------------------------------------------------------------- safetensors
@pytest.fixture(scope="module")
def st_file(tmp_path_factory):
    directory = tmp_path_factory.mktemp("st")
    data = write(str(directory / "model.safetensors"), SafetensorsWriter, TENSORS, metadata={"format": "pt"})
    return str(directory / "model.safetensors"), data


def st_reference(data: bytes):
    """What the safetensors library itself loads from ``data`` (None if it refuses the file)."""
    try:
        return {k: np.asarray(torch_to_numpy(v)) for k, v in safetensors.torch.load(data).items()}
    except Exception:  # the reference may refuse what it likes: our reader must then raise CheckpointError
        return None


def st_check(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
    try:
        got, _ = load(path, data_start=lambda r: 8 + struct.unpack("<Q", data[:8])[0])
    except CheckpointError:
        return
    expected = st_reference(data)
    assert expected is not None, "loaded a file the safetensors library refuses"
    assert_same(got, expected)


def test_valid_safetensors_loads_and_matches(st_file):
    path, data = st_file
    got, _ = load(path, data_start=lambda r: 8 + struct.unpack("<Q", data[:8])[0])
    assert_same(got, TENSORS)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6) | st.sampled_from(["F32", "BF16", "I32", "F16", "F64", "U8", "F8_E4M3", "C64"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8)


@st.composite
def header_mutation(draw):
    """A header edit: one field of one tensor replaced by an arbitrary JSON value, a near-miss integer edit
    of the offsets or the shape, a tensor dropped, renamed or duplicated, or the metadata replaced."""
    kind = draw(st.sampled_from(["field", "offset", "shape", "drop", "rename", "copy", "metadata", "length",
                                 "truncate", "extend"]))
    name = draw(st.sampled_from(sorted(TENSORS)))
    return kind, name, draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"])), draw(JSON_VALUES), \
        draw(st.integers(0, 1)), draw(st.integers(-20, 20)), draw(st.integers(0, 10**6))


@settings(FAST, max_examples=1200)
@given(mutation=header_mutation())
def test_safetensors_header_mutations(st_file, mutation):
    path, data = st_file
    kind, name, field, value, which, delta, pos = mutation
    length = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + length]), data[8 + length:]
    if kind == "field":
        header[name][field] = value
    elif kind == "offset":
        header[name]["data_offsets"][which] += delta
    elif kind == "shape" and header[name]["shape"]:
        header[name]["shape"][which % len(header[name]["shape"])] += delta
    elif kind == "drop":
        del header[name]
    elif kind == "rename":
        header[f"{name}{delta}"] = header.pop(name)
    elif kind == "copy":
        header[f"{name}{delta}"] = dict(header[name])
    elif kind == "metadata":
        header["__metadata__"] = value
    raw = json.dumps(header).encode()
    declared = len(raw) + (delta if kind == "length" else 0)
    out = struct.pack("<Q", max(declared, 0)) + raw + body
    if kind == "truncate":
        out = out[: pos % (len(out) + 1)]
    elif kind == "extend":
        out += b"\0" * (pos % 64)
    st_check(path, out)


@settings(FAST, max_examples=1200)
@given(position=st.integers(0, 2**16), byte=st.integers(0, 255), length=st.integers(1, 4))
def test_safetensors_byte_mutations(st_file, position, byte, length):
    """Bytes overwritten anywhere in the length prefix or the header."""
    path, data = st_file
    end = 8 + struct.unpack("<Q", data[:8])[0]
    at = position % end
    st_check(path, data[:at] + bytes([byte]) * length + data[at + length:])


# --------------------------------------------------------------------------------------------- msgpack
@pytest.fixture(scope="module")
def mp_file(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mp")
    tree = {"layers/0/w": TENSORS["a.weight"], "layers/0/b": TENSORS["b.bias"], "layers/1/c": TENSORS["c"],
            "empty": TENSORS["empty"], "scalar": TENSORS["scalar"]}
    data = write(str(directory / "flax_model.msgpack"), MsgpackWriter, tree, chunk_bytes=20)  # a.weight chunked
    return str(directory / "flax_model.msgpack"), data, tree


def mp_reference(data: bytes):
    """What flax loads from ``data`` as ``/``-joined names (None if it refuses the file)."""
    try:
        tree = flax.serialization.msgpack_restore(data)
        flat = flatten_dict(tree, sep="/")
    except Exception:  # flax may refuse what it likes: our reader must then raise CheckpointError
        return None
    if not all(isinstance(v, np.ndarray) for v in flat.values()):
        return None
    return flat


def mp_check(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
    try:
        got, _ = load(path)
    except CheckpointError:
        return
    expected = mp_reference(data)
    assert expected is not None, "loaded a file flax refuses"
    assert_same(got, {k: np.asarray(v) for k, v in expected.items()})


def test_valid_msgpack_loads_and_matches_flax(mp_file):
    path, data, tree = mp_file
    got, _ = load(path)
    assert_same(got, tree)
    assert_same(got, mp_reference(data))


@settings(FAST, max_examples=1500)
@given(position=st.integers(0, 2**16), byte=st.integers(0, 255), length=st.integers(1, 3),
       cut=st.integers(0, 2**16), mode=st.sampled_from(["replace", "truncate", "both", "insert"]))
def test_msgpack_byte_mutations(mp_file, position, byte, length, cut, mode):
    """Bytes overwritten or inserted anywhere (type tags, lengths, shapes, dtype names, keys), truncation."""
    path, data, _ = mp_file
    at = position % len(data)
    out = data
    if mode in ("replace", "both"):
        out = out[:at] + bytes([byte]) * length + out[at + length:]
    if mode == "insert":
        out = out[:at] + bytes([byte]) * length + out[at:]
    if mode in ("truncate", "both"):
        out = out[: cut % (len(out) + 1)]
    mp_check(path, out)


@settings(FAST, max_examples=60)
@given(depth=st.integers(1, 3000), tag=st.sampled_from([b"\x81\xa1k", b"\x91", b"\xde\x00\x01\xa1k"]))
def test_msgpack_nesting(mp_file, depth, tag):
    """Deeply nested maps (or arrays) around one array: loads while the depth is sane, else CheckpointError
    (never a RecursionError)."""
    path, data, _ = mp_file
    mp_check(path, tag * depth + data)


# --------------------------------------------------------------------------------------------- index
@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded") / "model"
    directory.mkdir()
    write(str(directory.parent / "outside.safetensors"), SafetensorsWriter, {"a.weight": TENSORS["a.weight"]})
    first = {k: TENSORS[k] for k in ("a.weight", "b.bias")}
    second = {k: TENSORS[k] for k in ("c", "empty", "scalar")}
    write(str(directory / "model-00001-of-00002.safetensors"), SafetensorsWriter, first)
    write(str(directory / "model-00002-of-00002.safetensors"), SafetensorsWriter, second)
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in first},
                  **{k: "model-00002-of-00002.safetensors" for k in second}}
    return directory, {"metadata": {"total_size": 0}, "weight_map": weight_map}


SHARD_NAMES = st.sampled_from(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                               "../outside.safetensors", "/etc/passwd", "", ".", "..", "./model-00001-of-00002."
                               "safetensors", "sub/x.safetensors", "model.safetensors.index.json", "missing.bin"])


@settings(FAST, max_examples=800)
@given(kind=st.sampled_from(["value", "key", "drop", "weight_map", "top", "truncate", "absolute"]),
       name=st.sampled_from(sorted(TENSORS)), shard=SHARD_NAMES | JSON_VALUES, cut=st.integers(0, 10**5))
def test_index_mutations(sharded, kind, name, shard, cut):
    directory, valid = sharded
    index = json.loads(json.dumps(valid))
    weight_map = index["weight_map"]
    if kind == "value":
        weight_map[name] = shard
    elif kind == "key":
        weight_map[f"{name}.extra"] = shard
    elif kind == "drop":
        del weight_map[name]
    elif kind == "weight_map":
        index["weight_map"] = shard
    elif kind == "top":
        index = shard
    elif kind == "absolute":
        weight_map[name] = str(directory / weight_map[name])
    text = json.dumps(index)
    if kind == "truncate":
        text = text[: cut % (len(text) + 1)]
    path = directory / "model.safetensors.index.json"
    path.write_text(text)
    try:
        got, opened = load(str(path))
    except CheckpointError:
        return
    assert all(os.path.dirname(p) == str(directory) for p in opened), opened
    assert_same(got, TENSORS)


def test_index_never_opens_outside_its_directory(sharded):
    directory, valid = sharded
    index = json.loads(json.dumps(valid))
    index["weight_map"]["a.weight"] = "../outside.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with recording() as (opened, _), pytest.raises(CheckpointError, match="a.weight.*plain name"):
        CheckpointReader(str(directory / "model.safetensors.index.json"))
    assert opened == [str(directory / "model.safetensors.index.json")]
