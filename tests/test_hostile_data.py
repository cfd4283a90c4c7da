"""Careless and hostile data: two writers into one store, damaged shards, truncated compressed files, text
that does not encode, symlink loops under a glob, and a prepare killed with -9 while its workers run."""

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pytest

from nucleusx_jax.data.prepare import PrepareOptions, prepare
from nucleusx_jax.data.store import TokenStore
from nucleusx_jax.sources import BadDocument, iter_source_documents
from nucleusx_jax.storage import glob_files
from nucleusx_jax.tokenizer import load_tokenizer, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return train_tokenizer(["builtin:pydoc"], str(tmp_path_factory.mktemp("tok") / "sp"), 512)


def _jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def _docs(n, tag):
    rng = np.random.default_rng(len(tag))
    return [f"{tag} {i}: " + " ".join(rng.choice(["retention", "decay", "chunk", "λ"], rng.integers(1, 60)))
            for i in range(n)]


def _cli(*args):
    return [sys.executable, "-m", "nucleusx_jax.data", *args]


def test_two_concurrent_prepares_one_refused_and_the_store_verifies(sp_path, tmp_path):
    """Writer A holds the output (its tokenizing waits for a signal file); writer B, with other sources, is
    refused at once with one line naming A; A then finishes a store that verifies and holds A's documents."""
    first, second = _jsonl(tmp_path / "a.jsonl", _docs(300, "a")), _jsonl(tmp_path / "b.jsonl", _docs(300, "b"))
    out, go = str(tmp_path / "store"), tmp_path / "go"
    writer_a = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, time
        from nucleusx_jax.data import prepare as p
        real = p.tokenize_unit
        def waiting(*args):
            while not os.path.exists({str(go)!r}):
                time.sleep(0.02)
            return real(*args)
        p.tokenize_unit = waiting
        p.prepare([{first!r}], {sp_path!r}, {out!r},
                  options=p.PrepareOptions(workers=0, shard_tokens=1000, unit_chars=700, progress=False))
        """)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lock = os.path.join(out, "prepare.lock")
        deadline = time.time() + 120
        while not (os.path.exists(lock) and os.path.getsize(lock)) and time.time() < deadline:
            assert writer_a.poll() is None, writer_a.communicate()[0]
            time.sleep(0.05)
        writer_b = subprocess.run(_cli("prepare", "--sources", second, "--tokenizer", sp_path, "--output", out,
                                       "--workers", "0", "--shard-tokens", "1000", "--no-progress"),
                                  cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert writer_a.poll() is None  # B was refused while A held the store
        assert writer_b.returncode == 4 and writer_b.stdout == ""
        assert writer_b.stderr.count("\n") == 1 and writer_b.stderr.startswith(
            f"error: {out} is in use by another prepare (pid {writer_a.pid} on host "), writer_b.stderr
    finally:
        go.touch()
        log = writer_a.communicate(timeout=120)[0]
    assert writer_a.returncode == 0, log
    store = TokenStore(out)
    assert store.verify() == [] and store.index["sources"] == [first] and store.num_documents == 300
    ok = subprocess.run(_cli("verify", out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "every shard matches the index" in ok.stdout


def test_truncated_zst_exits_non_zero_and_names_the_file(sp_path, tmp_path):
    zstandard = pytest.importorskip("zstandard")
    data = "".join(json.dumps({"text": d}) + "\n" for d in _docs(2000, "z")).encode()
    whole = zstandard.ZstdCompressor().compress(data)
    good, cut = tmp_path / "good.jsonl.zst", tmp_path / "cut.jsonl.zst"
    good.write_bytes(whole + zstandard.ZstdCompressor().compress(data))  # two frames: read across both
    assert len(list(iter_source_documents(str(good)))) == 4000
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    result = subprocess.run(_cli("prepare", "--sources", str(cut), "--tokenizer", sp_path, "--output",
                                 str(tmp_path / "store"), "--workers", "0", "--no-progress"),
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {cut} is truncated or corrupt"), result.stderr
    assert result.stderr.count("\n") == 1 and not os.path.exists(tmp_path / "store" / "index.json")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_gzip_names_the_file(tmp_path, damage):
    blob = bytearray(gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in _docs(500, "g")).encode()))
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob[-6] ^= 0xFF  # the CRC32 of the trailer: every line decodes, the checksum fails at the end
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=rf"^{path} is truncated or corrupt"):
        list(iter_source_documents(str(path)))


def test_text_that_does_not_encode_names_file_and_line_or_is_skipped(sp_path, tmp_path):
    lines = [json.dumps({"text": d}) for d in _docs(40, "s")]
    lines[6] = '{"text": "lone \\ud800 surrogate"}'
    lines[20] = "{not json"
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(BadDocument, match=rf"^{path}:7: field 'text' is not valid Unicode: a lone surrogate '\\ud800' "
                                          r"at character 5$"):
        prepare([str(path)], sp_path, str(tmp_path / "o1"), options=PrepareOptions(workers=0, progress=False))
    result = subprocess.run(_cli("prepare", "--sources", str(path), "--tokenizer", sp_path, "--output",
                                 str(tmp_path / "o2"), "--workers", "0", "--no-progress", "--skip-bad-documents"),
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "38 documents" in result.stdout and "2 bad document(s) skipped" in result.stdout
    assert f"{path}:7: field 'text' is not valid Unicode" in result.stderr
    assert f"{path}:21: invalid JSON" in result.stderr
    store = TokenStore(str(tmp_path / "o2"))
    tok = load_tokenizer(sp_path)
    kept = [json.loads(line)["text"] for i, line in enumerate(lines) if i not in (6, 20)]
    want = np.concatenate([[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in kept])
    assert store.index["skipped_documents"] == 2 and np.array_equal(store.read(0, store.num_tokens), want)


def test_glob_reads_each_file_once_through_a_symlink_loop(tmp_path):
    data = tmp_path / "data"
    (data / "a" / "b").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    _jsonl(data / "a" / "one.jsonl", ["one"])
    _jsonl(data / "a" / "b" / "two.jsonl", ["two"])
    _jsonl(data / "three.jsonl", ["three"])
    _jsonl(outside / "four.jsonl", ["four"])
    os.symlink("..", data / "a" / "b" / "loop")  # a directory loop
    os.symlink(outside, data / "elsewhere")  # a symlinked directory: not entered by **
    pattern = str(data / "**" / "*.jsonl")
    assert glob_files(pattern) == [str(data / "a" / "b" / "two.jsonl"), str(data / "a" / "one.jsonl"),
                                   str(data / "three.jsonl")]
    assert sorted(iter_source_documents(pattern)) == ["one", "three", "two"]
    assert sorted(iter_source_documents(str(data))) == ["one", "three", "two"]  # a directory source too


def _children(pid):
    """Pids of the processes whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_their_parent_on_kill_9(sp_path, tmp_path):
    source = _jsonl(tmp_path / "docs.jsonl", _docs(300, "k"))  # the main process waits for its worker's imports
    main = subprocess.Popen(_cli("prepare", "--sources", source, "--tokenizer", sp_path, "--output",
                                 str(tmp_path / "store"), "--workers", "1", "--no-progress"),
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 120
        while not workers and time.time() < deadline and main.poll() is None:
            workers = [p for p in _children(main.pid) if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]
            time.sleep(0.05)
        assert workers, "the worker did not start"
        main.send_signal(signal.SIGKILL)
        main.wait()
        deadline = time.time() + 60
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "a worker outlived its parent"
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_huge_document_is_tokenized_in_pieces_with_the_same_tokens(sp_path, monkeypatch):
    """Pieces cut before a space give exactly the whole document's tokens (SentencePiece); the memory a
    document costs is a few times its text, not the ~30x of a Python list of its ids."""
    from nucleusx_jax.data import prepare as prepare_module

    tok = load_tokenizer(sp_path)
    rng = np.random.default_rng(0)
    words = ["retention", "of", "the", "state", "λ", "naïve", "chunk", "  ", "\n", "über", "x" * 50]
    docs = [" ".join(rng.choice(words, 3000)), "short", " ".join(rng.choice(words, 200))]
    monkeypatch.setattr(prepare_module, "PIECE_CHARS", 500)
    assert sum(1 for _ in prepare_module.pieces(docs, 500, True)) > 40
    tokens, ends, _ = prepare_module.tokenize_unit(sp_path, True, "uint16", docs)
    want = [np.array([tok.bos_id] + tok.encode(d) + [tok.eos_id]) for d in docs]
    assert np.array_equal(tokens, np.concatenate(want)) and list(ends) == list(np.cumsum([len(w) for w in want]))
    monkeypatch.undo()
    huge = " ".join(rng.choice(words[:-1], 100_000))  # ~700 K characters
    prepare_module._worker_tokenizer(sp_path)
    tracemalloc.start()
    try:
        tokens, _, _ = prepare_module.tokenize_unit(sp_path, True, "uint16", [huge])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(tokens) > len(huge) // 4 and peak < 8 * len(huge), (peak, len(huge))
