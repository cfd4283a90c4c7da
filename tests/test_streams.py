"""Stream rows (data.stream_rows): each row reads its own stretch of a store, window n + 1 continuing window n;
stretches at document starts; continue flags; purity and per-host reads; mixtures by row; the stream layout a
resume must match; the errors."""

import json
import shutil

import numpy as np
import pytest

from nucleusx_jax.data.mixture import Mixture, row_counts
from nucleusx_jax.data.prepare import HoldOut, PrepareOptions, prepare
from nucleusx_jax.data.store import Shard, TokenStore, edges_sha256, file_sha256, index_json, shard_name
from nucleusx_jax.data.streams import Streams, check_layout
from nucleusx_jax.tokenizer import load_tokenizer, train_tokenizer
from nucleusx_jax.train.data import DataConfig, global_continues, host_rows, open_run_data, prepare_run_stores

from conftest import run_on_8_devices

T = 32  # seq_len of most tests: a few dozen windows per stretch, so streams wrap within the tested steps


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return train_tokenizer(["builtin:pydoc"], str(tmp_path_factory.mktemp("tok") / "sp"), 512)


def _jsonl(directory, docs):
    path = directory / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """150 jsonl documents of varied length."""
    rng = np.random.default_rng(1)
    words = ["retention", "gamma", "decay", "chunk", "state", "token", "stream", "window", "x"]
    return _jsonl(tmp_path_factory.mktemp("corpus"),
                  [f"doc {i}: " + " ".join(rng.choice(words, rng.integers(1, 150))) for i in range(150)])


def _options(**kw):
    return PrepareOptions(**{"workers": 0, "shard_tokens": 1000, "unit_chars": 700, "progress": False, **kw})


@pytest.fixture(scope="module")
def stores(corpus, sp_path, tmp_path_factory):
    """Two stores (a 70/30 split of the corpus by document), in shards of 1000 tokens."""
    d = tmp_path_factory.mktemp("stores")
    return [prepare([corpus], sp_path, str(d / p), options=_options(holdout=HoldOut(0.3, 0, p)))
            for p in ("train", "eval")]


def _expected_stretches(flat, eos, n, seq_len):
    """Stretch i of a store split among n rows, derived here from the flat tokens: [start_i, start_{i+1})."""
    N = len(flat)
    doc_starts = set([0] + (np.flatnonzero(flat == eos) + 1).tolist())
    starts = []
    for i in range(n):
        lo, hi = i * N // n, (i + 1) * N // n - seq_len - 1
        inside = sorted(d for d in doc_starts if lo <= d <= hi)
        starts.append(inside[0] if inside else lo)
    return list(zip(starts, starts[1:] + [N])), doc_starts


def test_windows_continue_exactly_and_flags(stores, sp_path):
    """Every row's window at step s is the slice of its stretch the spec gives (from the flat tokens), window
    s + 1 starts where window s ends, and continues() is false exactly at step 0 and at wraps."""
    store, B, L = stores[0], 16, 64
    eos = load_tokenizer(sp_path).eos_id
    flat = store.read(0, store.num_tokens)
    spans, doc_starts = _expected_stretches(flat, eos, B, L)
    streams = Streams({"web": store}, [1.0], seq_len=L, seed=5)
    comp, index = streams.assign(B, range(B))
    assert comp.tolist() == [0] * B and sorted(index.tolist()) == list(range(B))  # each stretch read by one row
    assert index.tolist() != list(range(B))  # the rows are permuted by the seed
    windows = np.array([(stop - start - 1) // L for start, stop in np.array(spans)[index]])
    assert windows.min() >= 1 and windows.max() < 40  # the 60 steps below wrap every row at least once
    assert all(start in doc_starts for start, _ in spans)  # the documents are short: every stretch starts at one
    previous = None
    for step in range(60):
        got = streams.rows(step, B, range(B))
        flags = streams.continues(step, B, range(B))
        m = step % windows
        for r in range(B):
            start = spans[index[r]][0] + m[r] * L
            np.testing.assert_array_equal(got[r], flat[start:start + L + 1])
        np.testing.assert_array_equal(flags, (m > 0) & (step > 0))
        if previous is not None:
            np.testing.assert_array_equal(got[flags, 0], previous[flags, -1])  # the overlap token
        previous = got
    assert not streams.continues(0, B, range(B)).any()


def test_long_documents_start_mid_document(sp_path, tmp_path):
    """Documents longer than a stretch: a stretch with no document start in its range starts at its nominal
    point, and every stretch still holds a window (the spec, derived from the flat tokens)."""
    rng = np.random.default_rng(2)
    docs = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta"], n)) for n in (900, 40, 1500, 30)]
    store = prepare([_jsonl(tmp_path, docs)], sp_path, str(tmp_path / "s"), options=_options())
    eos = load_tokenizer(sp_path).eos_id
    flat = store.read(0, store.num_tokens)
    B = 6
    spans, doc_starts = _expected_stretches(flat, eos, B, T)
    assert any(start not in doc_starts for start, _ in spans)  # the case under test happens
    streams = Streams({"long": store}, [1.0], seq_len=T, seed=0, shuffle=False)
    assert streams.assign(B, range(B))[1].tolist() == list(range(B))  # shuffle false: row i reads stretch i
    for r, (start, stop) in enumerate(spans):
        assert streams.stretch(0, r, B) == (start, (stop - start - 1) // T) and stop - start >= T + 1
        for step in (0, 1, 2):
            s = start + step % ((stop - start - 1) // T) * T
            np.testing.assert_array_equal(streams.rows(step, B, [r])[0], flat[s:s + T + 1])


def _token_store(directory, tokens, eos, shard_tokens=97):
    """A store of exactly ``tokens`` (uint16, shards of ``shard_tokens``) whose tokenizer's EOS is ``eos``."""
    directory.mkdir()
    shards = []
    for i, first in enumerate(range(0, len(tokens), shard_tokens)):
        part = np.asarray(tokens[first:first + shard_tokens], np.uint16)
        path = directory / shard_name(i)
        path.write_bytes(part.tobytes())
        shards.append(Shard(shard_name(i), len(part), int((part == eos).sum()), len(part), file_sha256(str(path)),
                            edges_sha256(str(path), part.nbytes)))
    meta = {"dtype": "uint16", "tokenizer": {"fingerprint": "synthetic", "eos_id": eos}}
    (directory / "index.json").write_text(index_json(meta, shards))
    return TokenStore(str(directory))


def test_stretches_of_random_layouts(tmp_path):
    """Synthetic stores (documents of random lengths, some longer than a stretch), any rows and seq_len the
    store allows: every stretch is the spec's (derived from the flat tokens), holds a window, and the row's
    windows are the slices of it."""
    rng = np.random.default_rng(3)
    eos = 2
    for case in range(40):
        lengths = rng.integers(1, rng.choice([20, 300, 3000]), 400)
        tokens = np.concatenate([np.r_[rng.integers(3, 60000, n - 1), eos] for n in lengths])[:rng.integers(50, 6000)]
        store = _token_store(tmp_path / f"s{case}", tokens, eos)
        seq_len = int(rng.integers(1, 64))
        rows = int(rng.integers(1, len(tokens) // (seq_len + 1) + 1))
        spans, _ = _expected_stretches(tokens, eos, rows, seq_len)
        streams = Streams({"s": store}, [1.0], seq_len=seq_len, seed=case)
        _, index = streams.assign(rows, range(rows))
        for i, (start, stop) in enumerate(spans):
            windows = (stop - start - 1) // seq_len
            assert windows >= 1 and streams.stretch(0, i, rows) == (start, windows)
        step = int(rng.integers(0, 1000))
        got = streams.rows(step, rows, range(rows))
        for r in range(rows):
            start, stop = spans[index[r]]
            s = start + step % ((stop - start - 1) // seq_len) * seq_len
            np.testing.assert_array_equal(got[r], tokens[s:s + seq_len + 1])


def test_rows_are_pure_and_hosts_read_only_their_rows(stores):
    """Any grouping of rows, on fresh objects (simulated hosts), gives the same arrays; after the first batch a
    host reads exactly its rows' windows."""
    B, step = 8, 37
    full = Streams({"a": stores[0], "b": stores[1]}, [3, 1], seq_len=T, seed=4).rows(step, B, range(B))
    for groups in ([[3, 1], [0, 7, 5], [2, 4, 6]], [list(range(4)), list(range(4, 8))], [[6]]):
        for rows in groups:
            hosts = [TokenStore(s.path) for s in stores]
            streams = Streams({"a": hosts[0], "b": hosts[1]}, [3, 1], seq_len=T, seed=4)
            np.testing.assert_array_equal(streams.rows(step, B, rows), full[rows])
            before = sum(s.bytes_read for s in hosts)
            np.testing.assert_array_equal(streams.rows(step + 1, B, rows),
                                          Streams({"a": stores[0], "b": stores[1]}, [3, 1], seq_len=T,
                                                  seed=4).rows(step + 1, B, range(B))[rows])
            assert sum(s.bytes_read for s in hosts) - before == len(rows) * (T + 1) * 2
    again = Streams({"a": stores[0], "b": stores[1]}, [3, 1], seq_len=T, seed=4)
    for s in (50, 2, 37, 2):  # steps in any order on one object: each as from a fresh one
        fresh = Streams({"a": TokenStore(stores[0].path), "b": stores[1]}, [3, 1], seq_len=T, seed=4)
        np.testing.assert_array_equal(again.rows(s, B, range(B)), fresh.rows(s, B, range(B)))
    np.testing.assert_array_equal(again.rows(step, B, range(B)), full)
    other = Streams({"a": stores[0], "b": stores[1]}, [3, 1], seq_len=T, seed=9)
    assert not np.array_equal(np.stack(other.assign(B, range(B))), np.stack(again.assign(B, range(B))))


@pytest.mark.parametrize("weights,batch", [((3, 1), 8), ((1, 1), 6), ((0.2, 0.8), 10)])
def test_mixture_rows_follow_the_weights(stores, sp_path, weights, batch):
    """Components get the largest-remainder rows of their weights, the same at every step; each component's
    store is split among its rows, every row reading its stretch of its component's store."""
    streams = Streams({"a": stores[0], "b": stores[1]}, list(weights), seq_len=T, seed=1)
    comp, index = streams.assign(batch, range(batch))
    want = row_counts(weights, batch)
    share = batch * np.array(weights) / sum(weights)
    assert want.sum() == batch and np.all(np.abs(want - share) < 1)
    assert np.bincount(comp, minlength=2).tolist() == want.tolist() == streams.counts(batch).tolist()
    for c in (0, 1):
        assert sorted(index[comp == c].tolist()) == list(range(want[c]))
    eos = load_tokenizer(sp_path).eos_id
    flats = [s.read(0, s.num_tokens) for s in stores]
    spans = [_expected_stretches(flats[c], eos, want[c], T)[0] for c in (0, 1)]
    for step in (0, 13, 400):
        got = streams.rows(step, batch, range(batch))
        for r in range(batch):
            start, stop = spans[comp[r]][index[r]]
            s = start + step % ((stop - start - 1) // T) * T
            np.testing.assert_array_equal(got[r], flats[comp[r]][s:s + T + 1])


def test_layout_refuses_another_batch_and_store(stores, tmp_path):
    streams = Streams({"a": stores[0], "b": stores[1]}, [3, 1], seq_len=T, seed=1)
    saved = json.loads(json.dumps(streams.layout(16)))  # what a checkpoint holds
    assert saved["global_batch"] == 16 and [c["rows"] for c in saved["components"]] == [12, 4]
    check_layout(saved, streams.layout(16))
    with pytest.raises(ValueError, match=r"train.global_batch=16; this config has train.global_batch=32.*"
                                         r"split differently.*"
                                         r"Resume with train.global_batch=16, or start a new run_dir"):
        check_layout(saved, streams.layout(32))
    moved = tmp_path / "moved"
    shutil.copytree(stores[0].path, moved)  # the same store elsewhere: accepted
    check_layout(saved, Streams({"a": TokenStore(str(moved)), "b": stores[1]}, [3, 1], seq_len=T, seed=1).layout(16))
    swapped = Streams({"a": stores[1], "b": stores[1]}, [3, 1], seq_len=T, seed=1).layout(16)
    with pytest.raises(ValueError, match=f"component 'a' was read from a store of {stores[0].num_tokens} tokens"):
        check_layout(saved, swapped)
    with pytest.raises(ValueError, match="component 'a' had 12 stream rows; this config's weights give it 8"):
        check_layout(saved, Streams({"a": stores[0], "b": stores[1]}, [1, 1], seq_len=T, seed=1).layout(16))
    with pytest.raises(ValueError, match="data.seed=1; this config has data.seed=2"):
        check_layout(saved, Streams({"a": stores[0], "b": stores[1]}, [3, 1], seq_len=T, seed=2).layout(16))
    with pytest.raises(ValueError, match="written with data.stream_rows; this config has it off"):
        check_layout(saved, None)
    check_layout(None, None)


def test_errors(stores, sp_path, tmp_path):
    store = stores[1]
    N = store.num_tokens
    rows = N // (T + 1) + 1  # one more row than the store can give a window each
    with pytest.raises(ValueError, match=rf"token store .* \({N} tokens\) is too small to give each of its {rows} "
                                         rf"stream rows a window of seq_len \+ 1 = {T + 1} tokens.*lower data.seq_len"):
        Streams({"s": store}, [1.0], seq_len=T, seed=0).rows(0, rows, [0])
    Streams({"s": store}, [1.0], seq_len=T, seed=0).rows(0, rows - 1, [0])  # one row fewer fits
    with pytest.raises(ValueError, match=r"component 'b' \(weight 0.01\) gets 0 of the 8 stream rows"):
        Streams({"a": stores[0], "b": store}, [1, 0.01], seq_len=T, seed=0).layout(8)
    with pytest.raises(ValueError, match="data.stream_rows='yes' is invalid: must be true or false"):
        DataConfig(stream_rows="yes")
    mixture = [{"name": "a", "weight": 1, "store": stores[0].path}, {"name": "b", "weight": 1, "store": store.path}]
    with pytest.raises(ValueError, match="data.mixture_schedule cannot be used with data.stream_rows"):
        DataConfig(tokenizer=sp_path, stream_rows=True, mixture=mixture,
                   mixture_schedule=[{"from_step": 5, "weights": {"a": 1, "b": 2}}])


def test_run_data_streams_from_config(stores, corpus, sp_path, tmp_path):
    """data.stream_rows: the train set is Streams over the planned stores (sources prepared on the fly, or a
    mixture with its weights), the eval sets stay random windows; global_continues places the flags by row."""
    tok = load_tokenizer(sp_path)
    cfg = DataConfig(sources=[corpus], tokenizer=sp_path, seq_len=T, eval_fraction=0.2, stream_rows=True)
    prepare_run_stores(cfg, sp_path, str(tmp_path), progress=False)
    train, evals = open_run_data(cfg, tok, sp_path, str(tmp_path))
    assert isinstance(train, Streams) and train.names == ["train"] and isinstance(evals[0].data, Mixture)
    assert len(train.components[0]) == (train.components[0].store.num_tokens - 1) // T
    cfg = DataConfig(tokenizer=sp_path, seq_len=T, stream_rows=True, mixture=[
        {"name": "a", "weight": 3, "store": stores[0].path}, {"name": "b", "weight": 1, "store": stores[1].path}])
    train, _ = open_run_data(cfg, tok, sp_path, str(tmp_path))
    assert train.counts(8).tolist() == [6, 2]
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sharding = NamedSharding(Mesh(jax.devices(), ("data",)), P("data", None))
    flags = global_continues(train, 3, sharding, (8, T + 1))
    assert flags.dtype == bool and flags.shape == (8,) and flags.sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(flags), train.continues(3, 8, host_rows(sharding, (8, T + 1))))


WORKER = """
import json, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from nucleusx_jax.data.store import Shard, TokenStore, edges_sha256, file_sha256, index_json, shard_name
from nucleusx_jax.data.streams import Streams
from nucleusx_jax.train.data import global_batch, global_continues
streams = Streams({"a": TokenStore(sys.argv[1]), "b": TokenStore(sys.argv[2])}, [3, 1], seq_len=32, seed=4)
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
out = {}
for step in range(0, 40, 3):
    batch = global_batch(streams, step, sharding, (16, 33))
    flags = global_continues(streams, step, sharding, (16, 33))
    rows_of = {d: i[0] for d, i in batch.sharding.addressable_devices_indices_map((16, 33)).items()}
    same = all(flags.sharding.addressable_devices_indices_map((16,))[d][0] == rows_of[d] for d in rows_of)
    out[step] = {"batch": np.asarray(batch).tolist(), "flags": np.asarray(flags).tolist(), "same_rows": same}
print("RESULT" + json.dumps(out))
"""


def test_global_continues_on_a_mesh(stores):
    """8 simulated devices, rows over (data, fsdp): the flags of each device are those of its batch rows."""
    result = run_on_8_devices(WORKER, stores[0].path, stores[1].path)
    streams = Streams({"a": stores[0], "b": stores[1]}, [3, 1], seq_len=T, seed=4)
    for step, got in result.items():
        assert got["same_rows"]
        np.testing.assert_array_equal(got["batch"], streams.rows(int(step), 16, range(16)))
        np.testing.assert_array_equal(got["flags"], streams.continues(int(step), 16, range(16)))
