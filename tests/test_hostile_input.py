"""Careless and hostile use: config bounds and bad YAML, converter destinations that would destroy the source,
stale partial outputs, the one-trainer-per-run-directory lock, file modes, and one-line CLI errors."""

import importlib.util
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys

import pytest

from nucleusx_jax.cli import reports_user_errors
from nucleusx_jax.convert import convert, main as convert_main
from nucleusx_jax.generate import main as generate_main
from nucleusx_jax.tokenizer import main as tokenizer_main
from nucleusx_jax.storage import atomic_write
from nucleusx_jax.tensorio import umask
from nucleusx_jax.train.config import ConfigError, load_config
from nucleusx_jax.lock import RunLock, RunLockedError
from nucleusx_jax.runs import RUN_FILES

from conftest import FIXTURES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "tiny.yaml")
TINY = FIXTURES / "nucleus_x_tiny"


# ------------------------------------------------------------------------------------------ config bounds
@pytest.mark.parametrize("override, message", [
    ("train.steps=-5", "train.steps=-5 is out of range: allowed [1, infinity)"),
    ("train.steps=0", "train.steps=0 is out of range: allowed [1, infinity)"),
    ("train.global_batch=0", "train.global_batch=0 is out of range: allowed [1, infinity)"),
    ("train.eval_every=-1", "train.eval_every=-1 is out of range: allowed [0, infinity)"),
    ("train.seed=-3", "train.seed=-3 is out of range: allowed [0, 4294967295]"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate=0.0 is out of range: allowed (0, infinity)"),
    ("optimizer.learning_rate=.nan", "optimizer.learning_rate=nan is out of range: allowed (0, infinity)"),
    ("optimizer.b2=1", "optimizer.b2=1.0 is out of range: allowed [0, 1)"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1 is out of range: allowed [0, infinity)"),
    ("schedule.min_lr_ratio=2", "schedule.min_lr_ratio=2.0 is out of range: allowed [0, 1]"),
    ("mesh.fsdp=0", "mesh.fsdp=0 is out of range: allowed [1, infinity) or -1"),
    ("checkpoint.max_to_keep=0", "checkpoint.max_to_keep=0 is out of range: allowed [1, infinity)"),
    ("logging.every=0", "logging.every=0 is out of range: allowed [1, infinity)"),
    ("logging.peak_tflops_per_device=-1", "logging.peak_tflops_per_device=-1.0 is out of range: allowed (0, "),
    ("data.seq_len=0", "data.seq_len=0 is invalid: must be an integer >= 1"),
])
def test_config_bounds(override, message):
    with pytest.raises(ValueError) as err:
        load_config(TINY_YAML, [override])
    assert message in str(err.value)


def test_config_edges_are_allowed():
    cfg = load_config(TINY_YAML, ["train.steps=1", "train.eval_every=0", "mesh.data=-1", "checkpoint.every=0",
                                  "optimizer.clip_norm=0", "optimizer.b1=0", "schedule.min_lr_ratio=1",
                                  "logging.sample_tokens=0"])
    assert (cfg.train.steps, cfg.mesh.data, cfg.schedule.min_lr_ratio) == (1, -1, 1.0)


def test_malformed_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n bad: [\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert str(err.value).startswith(f"{bad} is not valid YAML: ") and "line 3, column 2" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"--set 'train.steps=\[1' is not valid YAML"):
        load_config(TINY_YAML, ["train.steps=[1"])
    (tmp_path / "config.json").write_text("{x")
    with pytest.raises(ConfigError, match=f"model.path: {tmp_path / 'config.json'} is not valid JSON"):
        load_config(TINY_YAML, [f"model.path={tmp_path}"])


# ------------------------------------------------------------------------------------------ converter
def snapshot(directory):
    """Every file under ``directory`` with its bytes."""
    return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(directory) for f in files}


def test_overwrite_never_touches_the_source(tmp_path):
    parent = tmp_path / "parent"
    shutil.copytree(TINY, parent / "model")
    (parent / "notes.txt").write_text("a sibling")
    (parent / "model" / "sub").mkdir()
    (parent / "model" / "sub" / "keep.txt").write_text("inside SRC")
    os.symlink(parent / "model", tmp_path / "link-to-src")
    os.symlink(parent / "model" / "sub", tmp_path / "link-into-src")
    before = snapshot(tmp_path)
    cases = [(parent, "contains SRC"), (tmp_path, "contains SRC"), (parent / "model", "is SRC"),
             (tmp_path / "link-to-src", r"is SRC .* \(through a symlink\)"),
             (tmp_path / "link-into-src", "is a symlink into SRC"), (parent / "model" / "sub", "is inside SRC")]
    for dst, message in cases:
        with pytest.raises(ValueError, match=message):
            convert(parent / "model", dst, "flax", overwrite=True, progress=False)
    assert snapshot(tmp_path) == before
    # the command of the bug report, through the CLI: one line, status 2, nothing deleted
    result = subprocess.run([sys.executable, os.path.join(ROOT, "convert_torch_checkpoint.py"), str(parent / "model"),
                             str(parent), "--to", "flax", "--overwrite"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.startswith("error: DST") and "contains SRC" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert snapshot(tmp_path) == before
    # a new directory inside SRC is fine (nothing of SRC is replaced)
    convert(parent / "model", parent / "model" / "flax", "flax", progress=False)
    assert (parent / "model" / "flax" / "flax_model.msgpack").is_file()


@pytest.mark.parametrize("safe", [True, False])
def test_shards_as_transformers_writes_them_still_load(tmp_path, safe):
    """Shards written by huggingface_hub's save_torch_state_dict, which transformers' save_pretrained uses
    (same file names, index and metadata), pass the strict readers and convert like the single file."""
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(TINY / "config.json", src / "config.json")
    state = {k: v.clone() for k, v in load_file(str(TINY / "model.safetensors")).items()}
    pattern = "model{suffix}.safetensors" if safe else "pytorch_model{suffix}.bin"
    save_torch_state_dict(state, src, filename_pattern=pattern, max_shard_size="100KB", safe_serialization=safe,
                          metadata={"format": "pt"})
    index = json.loads((src / (pattern.format(suffix="") + ".index.json")).read_text())
    assert len(set(index["weight_map"].values())) > 1
    convert(src, tmp_path / "sharded", "flax", progress=False)
    convert(TINY, tmp_path / "single", "flax", progress=False)
    assert ((tmp_path / "sharded" / "flax_model.msgpack").read_bytes()
            == (tmp_path / "single" / "flax_model.msgpack").read_bytes())


def test_stale_partial_outputs(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process
    host = socket.gethostname()
    stale = tmp_path / f".dst.partial-{host}-{dead.pid}-abc_1"
    elsewhere = tmp_path / ".dst.partial-otherhost-1-xyz"
    old = tmp_path / ".dst.old-q1"
    live = tmp_path / f".dst.partial-{host}-{os.getpid()}-live"
    for d in (stale, elsewhere, old, live):
        d.mkdir()
        (d / "part").write_text("x")
    with caplog.at_level(logging.WARNING, logger="nucleusx_jax.convert"):
        convert(TINY, tmp_path / "dst", "flax", progress=False)
    assert not stale.exists() and elsewhere.exists() and old.exists() and live.exists()
    log = caplog.text
    assert f"removed {stale}" in log and f"{elsewhere} is the partial output" in log and "otherhost" in log
    assert f"{old} holds the previous {tmp_path / 'dst'}" in log and f"{live} is the partial output" in log
    assert sorted(os.listdir(tmp_path)) == sorted([".dst.partial-otherhost-1-xyz", ".dst.old-q1", live.name, "dst"])


# ------------------------------------------------------------------------------------------ run lock
def test_lock_refuses_a_second_run_and_is_released(tmp_path):
    lock = RunLock(str(tmp_path)).acquire()
    with pytest.raises(RunLockedError) as err:
        RunLock(str(tmp_path)).acquire()
    message = str(err.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started {lock.holder.started}" in message
    assert "\n" not in message
    lock.release()
    assert (tmp_path / RUN_FILES.lock).read_text() == ""
    with RunLock(str(tmp_path)):  # free again
        assert json.loads((tmp_path / RUN_FILES.lock).read_text())["pid"] == os.getpid()


def test_stale_lock_after_kill_9_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from nucleusx_jax.lock import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunLockedError, match=f"pid {holder.pid} on host"):
        RunLock(str(tmp_path)).acquire()
    holder.kill()
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="nucleusx_jax.lock"):
        lock = RunLock(str(tmp_path)).acquire()
    assert f"taking over the stale lock {tmp_path / RUN_FILES.lock}" in caplog.text
    assert f"pid {holder.pid}" in caplog.text
    assert json.loads((tmp_path / RUN_FILES.lock).read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_of_another_host_or_unknown_content_is_reported(tmp_path):
    (tmp_path / RUN_FILES.lock).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00Z",
                                                  "process_start": 5}))
    with pytest.raises(RunLockedError, match=f"pid 1 on host elsewhere, started 2026-01-01T00:00:00Z.*cannot "
                                             f"tell.*delete {tmp_path / RUN_FILES.lock}"):
        RunLock(str(tmp_path)).acquire()
    (tmp_path / RUN_FILES.lock).write_text("garbage")
    with pytest.raises(RunLockedError, match="not a lock file this run wrote"):
        RunLock(str(tmp_path)).acquire()


# ------------------------------------------------------------------------------------------ file modes
def test_atomic_write_respects_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        assert umask() == 0o027
        atomic_write(str(tmp_path / "f.json"), "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "f.json").st_mode) == 0o640


# ------------------------------------------------------------------------------------------ CLIs
def run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def train_main(argv):
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.mark.parametrize("main, args, message", [
    (train_main, ["--config", "no/such.yaml"], "No such file or directory: 'no/such.yaml'"),
    (train_main, ["--config", TINY_YAML, "--set", "train.steps=-5"], "train.steps=-5 is out of range"),
    (train_main, ["--config", TINY_YAML, "--set", "optimizer.b1=[0.9"], "is not valid YAML"),
    (convert_main, ["no/such/dir", "out", "--to", "flax"], "is not a directory"),
    (generate_main, ["no/such/dir", "--prompt", "x"], "no/such/dir"),
    (tokenizer_main, ["--corpus", "builtin:pydoc", "--output", "x", "--vocab-size", "5"], "vocab_size"),
])
def test_cli_user_errors_are_one_line(main, args, message, capsys):
    """In process (the subprocess tests below show the same for whole programs): status 2, one line."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_cli_bugs_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        reports_user_errors(lambda: 1 / 0)()


def test_cli_bad_checkpoint_and_locked_run_dir(tmp_path):
    """Whole programs: a corrupt checkpoint, a run directory another run holds (status 4, the holder named)."""
    src = tmp_path / "src"
    shutil.copytree(TINY, src)
    (src / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    result = run_cli("convert_torch_checkpoint.py", str(src), str(tmp_path / "out"), "--to", "flax")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {src / 'model.safetensors'} is not a readable safetensors file")
    os.makedirs(tmp_path / "run")
    with RunLock(str(tmp_path / "run")) as lock:
        result = run_cli("train.py", "--config", TINY_YAML, "--set", f"train.run_dir={tmp_path / 'run'}")
    assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert os.listdir(tmp_path / "run") == [RUN_FILES.lock]  # refused before anything else was written
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'run'} is in use by another run (pid {os.getpid()} on host "
                           f"{socket.gethostname()}, started {lock.holder.started})")
