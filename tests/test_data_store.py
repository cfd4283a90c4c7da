"""Token stores: prepare (content, shards, index, holdout, determinism, resume after a crash or kill -9),
the keyed window order, mixtures (exact proportions, weight changes on resume), per-host reads, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nucleusx_jax.data import prepare as prepare_module
from nucleusx_jax.data.mixture import Mixture, Phase, row_counts
from nucleusx_jax.data.prepare import HoldOut, PrepareOptions, prepare
from nucleusx_jax.data.reader import KeyedPermutation, Windows
from nucleusx_jax.data.store import TokenStore
from nucleusx_jax.tokenizer import load_tokenizer, train_tokenizer
from nucleusx_jax.train.data import DataConfig, open_run_data, prepare_run_stores

from conftest import crash_prepare_after, reserved_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD, UNIT = 1000, 700  # small shards and units: many of each, and documents that cross shards


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return train_tokenizer(["builtin:pydoc"], str(tmp_path_factory.mktemp("tok") / "sp"), 512)


@pytest.fixture(scope="module")
def tok(sp_path):
    return load_tokenizer(sp_path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """400 jsonl documents of varied length (some non-ASCII); the path and the texts."""
    rng = np.random.default_rng(0)
    words = ["retention", "gamma", "decay", "chunk", "state", "token", "naïve", "über", "λ", "x"]
    docs = [f"doc {i}: " + " ".join(rng.choice(words, rng.integers(1, 120))) for i in range(400)]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return str(path), docs


def _stream(tok, docs, add_bos=True):
    """The token stream prepare must write, tokenized here document by document."""
    return np.concatenate([([tok.bos_id] if add_bos else []) + tok.encode(d) + [tok.eos_id] for d in docs])


def _options(**kw):
    return PrepareOptions(**{"workers": 0, "shard_tokens": SHARD, "unit_chars": UNIT, "progress": False, **kw})


def _files(directory):
    """{name: bytes} of every file in a directory (hidden ones too)."""
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


@pytest.fixture(scope="module")
def reference(sp_path, corpus, tmp_path_factory):
    """An uninterrupted in-process build of the corpus."""
    out = str(tmp_path_factory.mktemp("ref") / "store")
    prepare([corpus[0]], sp_path, out, options=_options())
    return out


def test_store_holds_the_documents_tokenized(reference, corpus, tok, sp_path, tmp_path):
    path, docs = corpus
    store = TokenStore(reference)
    want = _stream(tok, docs)
    np.testing.assert_array_equal(store.read(0, store.num_tokens), want)
    assert store.dtype == np.uint16 and store.num_tokens == len(want)
    assert [s.tokens for s in store.shards] == [SHARD] * (len(want) // SHARD) + [len(want) % SHARD]
    for s in store.shards:  # plain uint16 files of exactly their tokens
        assert os.path.getsize(os.path.join(reference, s.file)) == 2 * s.tokens
    # documents and bytes count where each document's EOS lies
    ends = np.cumsum([len(tok.encode(d)) + 2 for d in docs])
    shard_of_doc = (ends - 1) // SHARD
    nbytes = np.array([len(d.encode()) for d in docs])
    assert [s.documents for s in store.shards] == np.bincount(shard_of_doc, minlength=len(store.shards)).tolist()
    assert [s.bytes for s in store.shards] == np.bincount(shard_of_doc, nbytes, len(store.shards)).astype(int).tolist()
    assert store.num_documents == len(docs) and store.num_bytes == int(nbytes.sum())
    assert store.tokenizer_fingerprint == tok.fingerprint and store.index["sources"] == [path]
    assert store.verify() == []
    # no BOS; a read across a shard boundary
    no_bos = prepare([path], sp_path, str(tmp_path / "nobos"), options=_options(add_bos=False))
    np.testing.assert_array_equal(no_bos.read(SHARD - 5, SHARD + 7), _stream(tok, docs, add_bos=False)[SHARD - 5 : SHARD + 7])
    # a complete store is returned as is; other settings on the same directory are refused
    before = _files(reference)
    prepare([path], sp_path, reference, options=_options(workers=3))
    copy = tmp_path / "copy.model"  # the same tokenizer elsewhere: matched by fingerprint, not by path
    copy.write_bytes(open(sp_path, "rb").read())
    prepare([path], str(copy), reference, options=_options())
    assert _files(reference) == before
    with pytest.raises(ValueError, match=r"other settings \(they differ in \['shard_tokens'\]: \[1000\] there, \[2000\] now\)"):
        prepare([path], sp_path, reference, options=_options(shard_tokens=2000))


def test_holdout_splits_by_document(corpus, tok, sp_path, tmp_path):
    path, docs = corpus
    parts = {p: prepare([path], sp_path, str(tmp_path / p), options=_options(holdout=HoldOut(0.2, 3, p)))
             for p in ("train", "eval")}
    held = HoldOut(0.2, 3, "eval").keep(0, len(docs))
    assert 50 < held.sum() < 110 and np.array_equal(HoldOut(0.2, 3, "train").keep(0, len(docs)), ~held)
    for part, mask in (("train", ~held), ("eval", held)):
        kept = [d for d, m in zip(docs, mask) if m]
        np.testing.assert_array_equal(parts[part].read(0, parts[part].num_tokens), _stream(tok, kept))
        assert parts[part].num_documents == len(kept)
    assert not np.array_equal(HoldOut(0.2, 4, "eval").keep(0, len(docs)), held)


def test_prepare_resumes_after_a_crash_byte_identical(reference, corpus, sp_path, tmp_path, monkeypatch):
    out = str(tmp_path / "store")
    crash_prepare_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        prepare([corpus[0]], sp_path, out, options=_options())
    monkeypatch.undo()
    names = sorted(os.listdir(out))
    assert names[:4] == ["prepare.lock", "progress.json", "shard-00000.bin", "shard-00001.bin"] and "index.json" not in names
    with pytest.raises(FileNotFoundError, match="no index.json .*unfinished prepare: rerun it"):
        TokenStore(out)
    open(os.path.join(out, "shard-00007.bin.tmp"), "wb").write(b"junk")  # a shard in flight at the crash
    tokenized = []
    real = prepare_module.tokenize_unit
    monkeypatch.setattr(prepare_module, "tokenize_unit", lambda *a: tokenized.append(1) or real(*a))
    prepare([corpus[0]], sp_path, out, options=_options())
    assert _files(out) == _files(reference)
    all_units = sum(1 for _ in prepare_module._units([corpus[0]], _options()))
    assert 0 < len(tokenized) < all_units - 3  # the finished shards' units were not tokenized again


@pytest.mark.slow
def test_workers_and_kill_9_then_rerun_byte_identical(reference, corpus, sp_path, tmp_path):
    """The CLI with 2 worker processes, killed (-9, with its workers) after a few shards, rerun with 1 worker:
    the same bytes as the in-process build."""
    out = str(tmp_path / "store")
    big = tmp_path / "big.jsonl"  # the corpus 8 times: long enough to be killed mid-way
    big.write_text(open(corpus[0], encoding="utf-8").read() * 8, encoding="utf-8")
    ref = str(tmp_path / "ref")
    prepare([str(big)], sp_path, ref, options=_options())

    def cli(workers):
        return subprocess.Popen([sys.executable, "-m", "nucleusx_jax.data", "prepare", "--sources", str(big),
                                 "--tokenizer", sp_path, "--output", out, "--workers", str(workers), "--shard-tokens",
                                 str(SHARD), "--no-progress"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                                start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    proc = cli(2)
    progress = os.path.join(out, "progress.json")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(progress) and len(json.load(open(progress))["shards"]) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "index.json")), "finished before the kill; make the corpus longer"
    assert len(json.load(open(progress))["shards"]) >= 2
    proc = cli(1)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    # PrepareOptions.unit_chars differs between CLI and reference: it does not change the store
    assert _files(out) == _files(ref)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), key=st.integers(0, 2**63))
def test_keyed_permutation_is_a_bijection(n, key):
    perm = KeyedPermutation(n, key)(np.arange(n))
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    if n >= 16:
        assert not np.array_equal(perm, KeyedPermutation(n, key + 1)(np.arange(n)))
        assert not np.array_equal(perm, np.arange(n))


def test_windows_epochs_and_purity(reference, tok, corpus):
    store = TokenStore(reference)
    stream = store.read(0, store.num_tokens)
    L = 16
    plain = Windows(store, L, seed=0, shuffle=False)
    n = len(plain)
    assert n == (len(stream) - 1) // L
    windows = np.stack([stream[i * L : i * L + L + 1] for i in range(n)])
    np.testing.assert_array_equal(plain.read(np.arange(n)), windows)
    shuffled = Windows(store, L, seed=5)
    ids = shuffled.window_ids(np.arange(3 * n))
    for e in range(3):  # each epoch visits every window once, in a fresh order
        np.testing.assert_array_equal(np.sort(ids[e * n : (e + 1) * n]), np.arange(n))
    assert not np.array_equal(ids[:n], ids[n : 2 * n]) and not np.array_equal(ids[:n], np.arange(n))
    samples = np.array([7, 3 * n - 1, n, 0, 2 * n + 5])
    np.testing.assert_array_equal(Windows(TokenStore(reference), L, seed=5).read(samples), windows[ids[samples]])
    assert not np.array_equal(Windows(store, L, seed=6).window_ids(np.arange(n)), ids[:n])


def test_row_counts_largest_remainder():
    assert row_counts([0.75, 0.25], 8).tolist() == [6, 2]
    assert row_counts([1, 1, 1], 8).tolist() == [3, 3, 2]
    assert row_counts([0.1, 0.2, 0.7], 10).tolist() == [1, 2, 7]
    assert row_counts([5, 1], 4).tolist() == [3, 1]
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, b = rng.uniform(0.01, 1, rng.integers(1, 6)), int(rng.integers(1, 100))
        c = row_counts(w, b)
        assert c.sum() == b and np.all(np.abs(c - b * w / w.sum()) < 1)


@pytest.fixture(scope="module")
def two_stores(corpus, sp_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    return [prepare([corpus[0]], sp_path, str(d / p), options=_options(holdout=HoldOut(0.3, 0, p)))
            for p in ("train", "eval")]


def _mixture(stores, schedule, seed=0):
    return Mixture({"web": Windows(stores[0], 8, seed=11), "code": Windows(stores[1], 8, seed=12)}, schedule, seed=seed)


def test_mixture_exact_proportions_and_weight_change_on_resume(two_stores):
    B, steps, change = 8, 30, 12
    base = _mixture(two_stores, [Phase(0, (0.75, 0.25))])
    samples = {0: [], 1: []}
    for step in range(steps):
        comp, sample = base.assign(step, B, range(B))
        assert (comp == 0).sum() == 6 and (comp == 1).sum() == 2  # exactly 3:1 in every batch
        for c in (0, 1):
            samples[c] += sample[comp == c].tolist()
        rows = base.rows(step, B, range(B))
        for c, name in enumerate(base.names):  # each row is its component's window of that sample
            np.testing.assert_array_equal(rows[comp == c], base.components[c].read(sample[comp == c]))
    assert sorted(samples[0]) == list(range(6 * steps)) and sorted(samples[1]) == list(range(2 * steps))
    assert len({tuple(base.assign(s, B, range(B))[0]) for s in range(steps)}) > 1  # components spread over rows
    # resume at step `change` with new weights: every earlier batch unchanged, later ones 1:1, no sample reused
    resumed = _mixture(two_stores, [Phase(0, (0.75, 0.25)), Phase(change, (0.5, 0.5))])
    for step in range(change):
        np.testing.assert_array_equal(resumed.rows(step, B, range(B)), base.rows(step, B, range(B)))
    later = {0: [], 1: []}
    for step in range(change, steps):
        comp, sample = resumed.assign(step, B, range(B))
        assert (comp == 0).sum() == 4 and (comp == 1).sum() == 4
        for c in (0, 1):
            later[c] += sample[comp == c].tolist()
    assert sorted(later[0]) == list(range(6 * change, 6 * change + 4 * (steps - change)))
    assert sorted(later[1]) == list(range(2 * change, 2 * change + 4 * (steps - change)))
    # batches are a pure function of (seed, step): a fresh object, any order of steps
    again = _mixture([TokenStore(s.path) for s in two_stores], [Phase(0, (0.75, 0.25))])
    for step in (29, 3, 17, 3):
        np.testing.assert_array_equal(again.rows(step, B, range(B)), base.rows(step, B, range(B)))
    assert not np.array_equal(_mixture(two_stores, [Phase(0, (0.75, 0.25))], seed=1).rows(0, B, range(B)),
                              base.rows(0, B, range(B)))


def test_hosts_read_disjoint_rows_and_only_their_share(two_stores):
    """Each simulated host (its own reader objects) reads only its rows: the bytes of one window per row."""
    B, L = 8, 8
    full = _mixture(two_stores, [Phase(0, (0.75, 0.25))]).rows(5, B, range(B))
    for hosts in (2, 4):
        parts = []
        for h in range(hosts):
            stores = [TokenStore(s.path) for s in two_stores]
            rows = list(range(h * B // hosts, (h + 1) * B // hosts))
            parts.append(_mixture(stores, [Phase(0, (0.75, 0.25))]).rows(5, B, rows))
            assert sum(s.bytes_read for s in stores) == len(rows) * (L + 1) * 2
        np.testing.assert_array_equal(np.concatenate(parts), full)


HOST = """
import json, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from nucleusx_jax.data.mixture import Mixture, Phase
from nucleusx_jax.data.reader import Windows
from nucleusx_jax.data.store import TokenStore
from nucleusx_jax.train.data import host_rows
stores = [TokenStore(p) for p in sys.argv[3:5]]
mix = Mixture({"web": Windows(stores[0], 8, seed=11), "code": Windows(stores[1], 8, seed=12)}, [Phase(0, (0.75, 0.25))], seed=0)
sharding = NamedSharding(Mesh(jax.devices(), ("data",)), P("data"))
rows = host_rows(sharding, (8, 9))
data = mix.rows(5, 8, rows)
print(json.dumps({"rows": rows, "data": data.tolist(), "bytes_read": sum(s.bytes_read for s in stores)}))
"""


@pytest.mark.slow
def test_two_processes_read_disjoint_rows(two_stores):
    """jax.distributed on 127.0.0.1, 2 processes x 2 CPU devices: the rows each host reads are disjoint, their
    union is the global batch, and each host reads only its rows' windows."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    with reserved_port() as port:  # the coordinator's (jax cannot report a port it bound)
        procs = [subprocess.Popen([sys.executable, "-c", HOST, f"127.0.0.1:{port}", str(i), two_stores[0].path,
                                   two_stores[1].path], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for i in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    rows = [r["rows"] for r in results]
    assert not set(rows[0]) & set(rows[1]) and sorted(rows[0] + rows[1]) == list(range(8))
    full = _mixture(two_stores, [Phase(0, (0.75, 0.25))]).rows(5, 8, range(8))
    for r in results:
        np.testing.assert_array_equal(np.array(r["data"]), full[r["rows"]])
        assert r["bytes_read"] == len(r["rows"]) * 9 * 2  # its share: one window of 9 uint16 tokens per row


def test_run_data_from_config(corpus, sp_path, tok, two_stores, tmp_path):
    """The trainer's data section: on-the-fly stores with a held-out split; a mixture of a store and sources
    with an eval set; bits per byte from the store's bytes."""
    cfg = DataConfig(sources=[corpus[0]], tokenizer=sp_path, seq_len=8, eval_fraction=0.2)
    prepare_run_stores(cfg, sp_path, str(tmp_path / "a"), progress=False)
    train, evals = open_run_data(cfg, tok, sp_path, str(tmp_path / "a"))
    assert train.names == ["train"] and [e.name for e in evals] == ["eval"]
    ev = TokenStore(str(tmp_path / "a" / "data" / "eval"))
    assert ev.num_documents + TokenStore(str(tmp_path / "a" / "data" / "train")).num_documents == len(corpus[1])
    assert evals[0].bits_per_byte(2.0) == pytest.approx(2.0 * ev.num_tokens / ev.num_bytes / np.log(2))
    cfg = DataConfig(tokenizer=sp_path, seq_len=8, mixture=[
        {"name": "web", "weight": 3, "store": two_stores[0].path}, {"name": "more", "weight": 1, "sources": [corpus[0]]}],
        mixture_schedule=[{"from_step": 10, "weights": {"web": 1, "more": 1}}],
        eval_sets=[{"name": "held", "store": two_stores[1].path}])
    prepare_run_stores(cfg, sp_path, str(tmp_path / "b"), progress=False)
    train, evals = open_run_data(cfg, tok, sp_path, str(tmp_path / "b"))
    assert train.names == ["web", "more"] and [e.name for e in evals] == ["held"]
    assert train.counts(9, 8).tolist() == [6, 2] and train.counts(10, 8).tolist() == [4, 4]
    assert os.path.isfile(tmp_path / "b" / "data" / "mixture-more" / "index.json")


def test_errors(reference, corpus, sp_path, tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(ValueError, match=r"unknown source format: cannot tell the format of '.*data.csv'"):
        prepare([str(tmp_path / "data.csv")], sp_path, str(tmp_path / "o1"), options=_options())
    with pytest.raises(ValueError, match=r"unknown source format 'xml'"):
        _options(format="xml")
    with pytest.raises(ValueError, match=r"empty corpus: the sources \['.*blank.txt'\] hold no documents"):
        prepare([str(tmp_path / "blank.txt")], sp_path, str(tmp_path / "o2"), options=_options())
    other = train_tokenizer(["builtin:pydoc"], str(tmp_path / "other"), 400)
    with pytest.raises(ValueError, match=r"was built with another tokenizer .* than the run's '.*other.model'"):
        TokenStore(reference).check_tokenizer(load_tokenizer(other).fingerprint, other)
    cfg = DataConfig(store=reference, tokenizer=other, seq_len=8)
    with pytest.raises(ValueError, match="built with another tokenizer"):
        open_run_data(cfg, load_tokenizer(other), other, str(tmp_path))
    damaged = tmp_path / "damaged"
    os.system(f"cp -r {reference} {damaged}")
    os.truncate(damaged / "shard-00002.bin", 2 * SHARD - 2)
    with pytest.raises(ValueError, match=r"shard shard-00002.bin holds 1998 bytes, the index says 2000 .* truncated"):
        TokenStore(str(damaged))
    os.remove(damaged / "shard-00002.bin")
    with pytest.raises(FileNotFoundError, match="shard shard-00002.bin is missing"):
        TokenStore(str(damaged))
    os.system(f"cp {reference}/shard-00002.bin {damaged}/")
    with open(damaged / "shard-00003.bin", "r+b") as f:
        f.write(b"\xff\xff")  # same size, other content: only a checksum sees it
    with pytest.raises(ValueError, match=r"shard shard-00003.bin is damaged: the checksum of its first and last"):
        TokenStore(str(damaged))  # opening hashes each shard's edges (these small shards whole)
    with pytest.raises(ValueError, match=r"shard-00003.bin is damaged"):  # so the trainer refuses the store
        open_run_data(DataConfig(store=str(damaged), tokenizer=sp_path, seq_len=8), load_tokenizer(sp_path), sp_path,
                      str(tmp_path))
    assert TokenStore(str(damaged), check_edges=False).verify() == [("shard-00003.bin", "sha256 differs from the index")]
    with pytest.raises(ValueError, match="shorter than one window of seq_len \\+ 1 = 100001 tokens"):
        Windows(TokenStore(reference), 100_000, seed=0)
    for bad in (0, -1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"mixture weight of component 'code' \(from step 0\) must be a positive number"):
            _mixture([TokenStore(reference)] * 2, [Phase(0, (1.0, bad))])
        with pytest.raises(ValueError, match=r"data.mixture\[1\] \('b'\): weight must be a positive number, got"):
            DataConfig(tokenizer=sp_path, mixture=[{"name": "a", "weight": 1, "store": reference},
                                                   {"name": "b", "weight": bad, "store": reference}])
    with pytest.raises(ValueError, match=r"data.mixture_schedule\[0\].weights must give a weight to each of \['a'\]"):
        DataConfig(tokenizer=sp_path, mixture=[{"name": "a", "weight": 1, "store": reference}],
                   mixture_schedule=[{"from_step": 5, "weights": {"b": 1}}])
    with pytest.raises(ValueError, match="exactly one of 'store'"):
        DataConfig(tokenizer=sp_path, mixture=[{"name": "a", "weight": 1}])
    with pytest.raises(ValueError, match="data.store and data.mixture need data.tokenizer"):
        DataConfig(store=reference)
