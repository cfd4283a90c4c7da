"""End-to-end runs of the trainer on ``configs/tiny.yaml`` shrunk by ``--set`` overrides: outputs, export,
crash (kill -9) and resume, SIGTERM, a corrupted checkpoint, non-finite losses, two processes."""

import glob
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import pytest

from nucleusx_jax.hf import FlaxNucleusXForCausalLM
from nucleusx_jax import sharding as shd
from nucleusx_jax.runs import RUN_FILES, restore_params
from nucleusx_jax.train.checkpoint import Checkpointer
from nucleusx_jax.train.config import load_config
from nucleusx_jax.train.hooks import NonFiniteLossError
from nucleusx_jax.train.loop import run
from nucleusx_jax.train.metrics import read_metrics
from nucleusx_jax.train.step import make_trainer
from nucleusx_jax.tokenizer import train_tokenizer

from conftest import reserved_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
STEPS = 40  # long enough that a kill -9 after the first checkpoint lands mid-run
COMPILE_CACHE = tempfile.mkdtemp(prefix="nucleusx-jax-cache-")


def overrides(tokenizer: str, run_dir: str, *extra: str):
    """tiny.yaml, smaller: a 2-layer width-32 model, 32-token rows, batches of 4, logging every step; a constant
    learning rate after warmup, so runs of different lengths share their first steps."""
    return [f"train.run_dir={run_dir}", f"data.tokenizer={tokenizer}", "data.vocab_size=512", "model.vocab_size=512",
            "model.decoder_embed_dim=32", "model.decoder_value_embed_dim=64", "model.decoder_ffn_embed_dim=64",
            "data.seq_len=32", "train.global_batch=4", "mesh.data=1", "schedule.warmup_steps=2", "schedule.decay=constant",
            "optimizer.learning_rate=0.01", f"train.steps={STEPS}", "train.eval_every=10", "train.eval_batches=1",
            "checkpoint.every=4", "checkpoint.max_to_keep=3", "logging.every=1", "logging.sample_tokens=5",
            "logging.progress=false", *extra]


# Runs train.py in this process after making Checkpointer.save kill it (SIGKILL) as soon as the second periodic
# save has started: by then the first is complete on disk (waited for) and the second is in flight. The kill -9
# lands mid-run at the same point however fast the machine is.
KILL_AT_SECOND_SAVE = """
import os, runpy, signal, sys
from nucleusx_jax.train.checkpoint import Checkpointer
save, saves = Checkpointer.save, []
def save_then_die(self, state):
    if saves:
        self.wait()
    saves.append(save(self, state))
    if len(saves) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return saves[-1]
Checkpointer.save = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def cli(args, **kwargs):
    """``python train.py --config configs/tiny.yaml ARGS`` in a subprocess; compilations are cached on disk
    between the subprocesses of this module (a rerun after a crash reuses them). ``fast_compile`` uses XLA's
    backend optimisation level 0: half the compile time, float differences from in-process runs of ~1e-7 that
    grow over many steps, so only for short comparisons."""
    flags = f"--xla_force_host_platform_device_count={kwargs.pop('devices', 1)}"
    if kwargs.pop("fast_compile", False):
        flags += " --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", XLA_FLAGS=flags)
    wrapper = ["-c", KILL_AT_SECOND_SAVE] if kwargs.pop("kill_at_second_save", False) else []
    return subprocess.Popen([sys.executable, *wrapper, os.path.join(ROOT, "train.py"), "--config", TINY, *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def fresh_run_dir(reference, tmp_path) -> str:
    """An empty run dir holding only the reference run's token stores (same data, same tokenizer)."""
    run_dir = tmp_path / "run"
    shutil.copytree(os.path.join(reference[0], RUN_FILES.data), run_dir / RUN_FILES.data)
    return str(run_dir)


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(["builtin:pydoc"], str(tmp_path_factory.mktemp("tok") / "sp"), 512)


@pytest.fixture(scope="module")
def reference(tokenizer, tmp_path_factory):
    """An uninterrupted in-process run: (run_dir, summary)."""
    run_dir = str(tmp_path_factory.mktemp("reference"))
    summary = run(load_config(TINY, overrides(tokenizer, run_dir, "checkpoint.export_torch=true")))
    return run_dir, summary


def test_run_outputs(reference):
    run_dir, summary = reference
    assert summary["steps"] == STEPS and summary["resumed_from"] is None and not summary["preempted"]
    with open(os.path.join(run_dir, RUN_FILES.lock)) as f:
        assert f.read() == ""  # released
    train = read_metrics(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(r["tokens_per_s"] > 0 and r["tflops_per_device"] > 0 and np.isfinite(r["loss"]) for r in train)
    evals = read_metrics(run_dir, "eval")
    assert [r["step"] for r in evals] == [0, 10, 20, 30, 40]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.5 and train[-1]["loss"] < train[0]["loss"] - 0.5
    with open(os.path.join(run_dir, RUN_FILES.data, "eval", "index.json")) as f:  # the held-out store's text bytes
        index = json.load(f)
    for r in evals:  # bits per byte of the original text: nats per token x tokens / (bytes x ln 2)
        assert r["eval/loss"] == r["loss"]
        assert r["eval/bpb"] == pytest.approx(r["loss"] * index["tokens"] / (index["bytes"] * np.log(2)), rel=1e-9)
    assert summary["first_train_loss"] == train[0]["loss"] and summary["last_train_loss"] == train[-1]["loss"]
    assert glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))
    with open(os.path.join(run_dir, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = load_config(os.path.join(run_dir, "config.yaml"))
    assert saved.train.steps == STEPS and saved.model["eos_token_id"] == 2
    with open(os.path.join(run_dir, "summary.json")) as f:
        assert json.load(f)["last_train_loss"] == summary["last_train_loss"]
    assert isinstance(summary["sample"], str) and len(summary["sample"]) > len("The ")
    assert sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(run_dir, "checkpoints", "*"))) == [32, 36, 40]


def test_export_and_restore_params(reference):
    """The HF export equals the last checkpoint's params; restore_params reads any step without the optimizer."""
    run_dir, _ = reference
    config, params = restore_params(run_dir)
    model = FlaxNucleusXForCausalLM.from_pretrained(os.path.join(run_dir, "hf"))
    assert model.config.decoder_embed_dim == config.decoder_embed_dim == 32
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, early = restore_params(run_dir, step=32)
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(early), jax.tree.leaves(params))) > 1e-3
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step 5 .* available steps \[32, 36, 40\]"):
        restore_params(run_dir, step=5)
    assert os.path.isfile(os.path.join(run_dir, "hf", "tokenizer.model"))
    # the PyTorch export holds the same weights in torch layout (Linear weight = flax kernel transposed)
    from safetensors.numpy import load_file

    torch_weights = load_file(os.path.join(run_dir, "torch", "model.safetensors"))
    np.testing.assert_array_equal(torch_weights["lm_head.weight"], np.asarray(params["lm_head"]["kernel"]).T)


# The PyTorch export runs in this process (transformers 4) and, where this names a Python with torch and
# transformers 5 and no package of ours (.ci/run's second environment), in that one too.
TRANSFORMERS5_PYTHON = os.environ.get("NUCLEUSX_TRANSFORMERS5_PYTHON")
TORCH_SIDE = """
import sys, numpy as np, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids = AutoTokenizer.from_pretrained(directory)("The module and the class", return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = {mode: model(ids, forward_mode=mode, recurrent_chunk_size=3).logits.numpy()
              for mode in ("parallel", "chunkwise", "recurrent")}
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False).numpy()
np.savez(out, ids=ids.numpy(), greedy=greedy, eos=model.config.eos_token_id, major=int(transformers.__version__[0]),
         **logits)
"""


@pytest.mark.parametrize("python", ["this", "transformers5"])
def test_torch_export_runs_on_stock_transformers(reference, tmp_path, python):
    """The trainer's PyTorch export ships its code: stock transformers loads it (trust_remote_code, in a process
    that cannot import our package) with its tokenizer, and it gives our JAX model's logits in every form
    within 2e-5 and the same greedy continuation."""
    pytest.importorskip("torch")
    if python == "transformers5" and not TRANSFORMERS5_PYTHON:
        pytest.skip("set NUCLEUSX_TRANSFORMERS5_PYTHON to a Python with torch and transformers 5 (.ci/run does)")
    run_dir, _ = reference
    out = str(tmp_path / "torch_side.npz")
    block = "import sys; sys.modules.update(nucleusx_jax=None, jax=None)\n"  # transformers 4 imports flax itself
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([TRANSFORMERS5_PYTHON if python == "transformers5" else sys.executable, "-c",
                           block + TORCH_SIDE, os.path.join(run_dir, "torch"), out], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    side = np.load(out)
    assert (int(side["major"]) >= 5) == (python == "transformers5")
    ids = side["ids"]
    assert ids.shape[1] > 4
    flax_model = FlaxNucleusXForCausalLM.from_pretrained(os.path.join(run_dir, "hf"))
    for mode in ("parallel", "chunkwise", "recurrent"):
        theirs = np.asarray(flax_model(ids, forward_mode=mode, recurrent_chunk_size=3).logits)
        assert np.max(np.abs(side[mode] - theirs)) <= 2e-5, mode
    expected = np.asarray(flax_model.generate(ids, max_new_tokens=12, do_sample=False).sequences)
    greedy = side["greedy"]
    # equal up to the end, or up to an end-of-sequence token, after which flax pads and torch stops
    assert greedy.tolist() == expected[:, :greedy.shape[1]].tolist()
    assert greedy.shape == expected.shape or greedy[0, -1] == int(side["eos"])


def test_profile_and_wandb_offline(reference, tokenizer, tmp_path, monkeypatch):
    """``logging.profile_steps: [2, 4]`` writes one jax.profiler trace (an ``.xplane.pb`` for TensorBoard's
    profile plugin and xprof) holding exactly steps 3 and 4; ``logging.wandb`` (offline) logs the losses of
    metrics.jsonl, read back from the run's ``.wandb`` file with wandb's own reader; the losses equal the
    reference run's."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = fresh_run_dir(reference, tmp_path)
    steps = 6
    run(load_config(TINY, overrides(tokenizer, run_dir, f"train.steps={steps}", "train.eval_every=0",
                                    "checkpoint.every=0", "checkpoint.export_hf=false", "logging.sample_tokens=0",
                                    "logging.plot=false", "logging.profile_steps=[2, 4]",
                                    "logging.wandb.project=nucleusx-test", "logging.wandb.name=tiny")))
    traces = glob.glob(os.path.join(run_dir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1
    profile = jax.profiler.ProfileData.from_file(traces[0])
    traced = sorted(dict(event.stats)["step_num"] for plane in profile.planes for line in plane.lines
                    for event in line.events if event.name == "train")
    assert traced == [3, 4]

    losses = train_losses(run_dir)
    assert list(losses) == list(range(1, steps + 1))
    assert losses == pytest.approx({s: loss for s, loss in train_losses(reference[0]).items() if s <= steps}, rel=1e-6)
    (log,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    dump = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", log], capture_output=True,
                          text=True, check=True, timeout=120).stdout
    records = [json.loads(line) for line in dump.splitlines() if line.startswith("{")]
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    assert {step: item["train/loss"] for step, item in history.items()} == losses
    assert all(item["train/lr"] > 0 and item["train/tokens_per_s"] > 0 for item in history.values())
    (header,) = [r["run"] for r in records if r["type"] == "run"]
    assert (header["project"], header["display_name"]) == ("nucleusx-test", "tiny")
    assert header["config"]["update"]["train"]["steps"] == steps


def test_missing_wandb_names_the_extra(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    cfg = load_config(TINY, overrides(tokenizer, str(tmp_path / "run"), "logging.wandb.project=p"))
    with pytest.raises(ValueError, match=r"logging.wandb is set but the wandb package is not installed: "
                                         r"pip install 'nucleusx-jax\[wandb\]'"):
        run(cfg)
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_corrupted_latest_checkpoint_is_skipped(reference, tmp_path, caplog):
    run_dir, _ = reference
    copy = tmp_path / "run"
    copy.mkdir()
    subprocess.run(["cp", "-r", os.path.join(run_dir, "checkpoints"), str(copy)], check=True)
    for path in glob.glob(str(copy / "checkpoints" / "40" / "state" / "**" / "d" / "*"), recursive=True):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    trainer = make_trainer(cfg, shd.make_mesh({"data": 1}, jax.devices()[:1]))
    checkpointer = Checkpointer(str(copy), cfg.checkpoint)
    with caplog.at_level(logging.WARNING):
        state = checkpointer.restore_latest(trainer.abstract_state)
    checkpointer.close()
    assert int(state.step) == 36
    assert "checkpoint step 40" in caplog.text and "skipping it in favour of the previous one" in caplog.text
    assert os.path.isdir(copy / RUN_FILES.corrupt_checkpoints / "40")
    assert not os.path.exists(copy / RUN_FILES.checkpoints / "40")
    _, params36 = restore_params(run_dir, step=36)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params36)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a readable checkpoint of another model is an error, not damage: nothing is moved aside
    wider = load_config(os.path.join(run_dir, "config.yaml"), ["model.decoder_ffn_embed_dim=96"])
    other = make_trainer(wider, shd.make_mesh({"data": 1}, jax.devices()[:1]))
    checkpointer = Checkpointer(str(copy), cfg.checkpoint)
    with pytest.raises(ValueError, match=r"checkpoint step 36 .* does not match this run's model and optimizer: "
                                         r"\['opt_state'\].* has shape \(32, 64\) there but \(32, 96\) in this run"):
        checkpointer.restore_latest(other.abstract_state)
    checkpointer.close()
    assert os.path.isdir(copy / "checkpoints" / "36")


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted(reference, tokenizer, tmp_path):
    """kill -9 mid-run, rerun the same command: it resumes from the last complete checkpoint and every later
    loss equals the uninterrupted run's (same data order and dropout keys)."""
    ref_dir, _ = reference
    run_dir = fresh_run_dir(reference, tmp_path)
    args = []
    for o in overrides(tokenizer, run_dir):
        args += ["--set", o]
    proc = cli(args, kill_at_second_save=True)
    out, _ = proc.communicate(timeout=300)
    killed_at = max(train_losses(run_dir), default=0)
    assert proc.returncode == -signal.SIGKILL and killed_at < STEPS, (proc.returncode, killed_at, out[-3000:])
    with open(os.path.join(run_dir, RUN_FILES.lock)) as f:
        assert json.load(f)["pid"] == proc.pid  # the killed run's lock is left behind ...
    again = cli(args)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert f"taking over the stale lock {os.path.join(run_dir, RUN_FILES.lock)}" in out and f"pid {proc.pid}" in out
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    resumed = summary["resumed_from"]
    assert resumed is not None and resumed % 4 == 0 and resumed >= 4, summary
    assert f"resuming from step {resumed}" in out and "resolved config" in out
    ref, got = train_losses(ref_dir), train_losses(run_dir)
    later = [s for s in range(resumed + 1, STEPS + 1)]
    assert later
    np.testing.assert_allclose([got[s] for s in later], [ref[s] for s in later], atol=1e-5, rtol=0)
    assert_same_final_state(run_dir, ref_dir)


def final_state(run_dir):
    """The full training state (params, optimizer state, step) of ``run_dir``'s newest checkpoint."""
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    trainer = make_trainer(cfg, shd.make_mesh({"data": 1}, jax.devices()[:1]))
    checkpointer = Checkpointer(run_dir, cfg.checkpoint)
    try:
        return checkpointer.restore_latest(trainer.abstract_state).as_dict()
    finally:
        checkpointer.close()


def assert_same_final_state(run_dir, ref_dir):
    """The last checkpoint of ``run_dir`` equals ``ref_dir``'s bit for bit: parameters and optimizer state."""
    got, want = final_state(run_dir), final_state(ref_dir)
    assert int(got["step"]) == int(want["step"]) == STEPS
    leaves_got, leaves_want = jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in leaves_got] == [p for p, _ in leaves_want]
    for (path, a), (_, b) in zip(leaves_got, leaves_want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_sigterm_saves_and_exits(reference, tokenizer, tmp_path):
    run_dir = fresh_run_dir(reference, tmp_path)
    cfg = load_config(TINY, overrides(tokenizer, run_dir, "train.steps=100000", "checkpoint.every=0",
                                      "train.eval_every=0", "checkpoint.export_hf=false"))

    done, late = threading.Event(), []

    def send_sigterm_after_3_steps():  # or after 240 s (then the test fails), so that run() always ends
        path, deadline = os.path.join(run_dir, "metrics.jsonl"), time.monotonic() + 240
        while not (os.path.exists(path) and sum(1 for _ in open(path)) >= 3):
            if done.wait(0.01):  # run() ended by itself: no signal
                return
            if time.monotonic() > deadline:
                late.append(True)
                break
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    sender = threading.Thread(target=send_sigterm_after_3_steps, daemon=True)
    sender.start()
    try:
        summary = run(cfg)
    finally:
        done.set()
        sender.join(timeout=30)
    assert not late, "3 steps did not finish in 240 s"
    assert summary["preempted"] and 3 <= summary["steps"] < 100000
    steps = [int(os.path.basename(p)) for p in glob.glob(os.path.join(run_dir, "checkpoints", "*"))]
    assert steps == [summary["steps"]] and max(train_losses(run_dir)) == summary["steps"]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is removed afterwards


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss(reference, tokenizer, tmp_path, policy, caplog, capsys):
    """lr=1e30 makes step 2 non-finite: 'stop' ends train.py with exit status 3 and a clear error line, 'skip'
    keeps the weights; no checkpoint ever holds a non-finite value."""
    run_dir = fresh_run_dir(reference, tmp_path)
    settings = overrides(tokenizer, run_dir, "optimizer.learning_rate=1e30", "optimizer.clip_norm=0",
                         "checkpoint.every=1", "checkpoint.max_to_keep=9", "train.steps=4",
                         f"train.on_nonfinite={policy}", "train.eval_every=0", "logging.sample_tokens=0")
    cfg = load_config(TINY, settings)
    if policy == "stop":
        assert NonFiniteLossError.exit_status == 3
        with pytest.raises(SystemExit) as stopped:
            train_cli().main(["--config", TINY] + [a for o in settings for a in ("--set", o)])
        assert stopped.value.code == 3
        assert re.fullmatch(r"error: non-finite training loss or gradient at step 2 \(loss .*, grad norm nan\).*"
                            r"stopping \(set train.on_nonfinite=skip.*\n", capsys.readouterr().err)
    else:
        with caplog.at_level(logging.WARNING):
            summary = run(cfg)
        assert summary["steps"] == 4 and "skipping the step (train.on_nonfinite=skip)" in caplog.text
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(run_dir, "checkpoints", "*")))
    assert steps == ([1] if policy == "stop" else [1, 2, 3, 4])
    for step in steps:
        _, params = restore_params(run_dir, step)
        assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def train_cli():
    """train.py as a module (its ``main`` runs in this process)."""
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_config_errors(capsys):
    module = train_cli()
    with pytest.raises(SystemExit, match="2"):
        module.main(["--config", TINY, "--set", "train.stepz=3"])
    assert "unknown key(s) ['stepz'] in section 'train'; valid keys: run_dir, steps" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        module.main(["--config", TINY, "--set", "train.steps=many"])
    assert "train.steps: expected int, got str 'many'" in capsys.readouterr().err


def _two_processes(args):
    with reserved_port() as port:  # the coordinator's (jax cannot report a port it bound)
        procs = [cli([*args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                     devices=2, fast_compile=True) for i in range(2)]
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=300)[0])
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume(reference, tokenizer, tmp_path):
    """2 processes x 2 CPU devices on 127.0.0.1, mesh data=2 x fsdp=2, each host feeding its half of the batch:
    train 4 steps (checkpoints 2, 4), then the same command with 6 steps resumes from 4. The losses are the
    1-process, 1-device reference run's."""
    run_dir = fresh_run_dir(reference, tmp_path)
    args = []
    for o in overrides(tokenizer, run_dir, "mesh.data=2", "mesh.fsdp=2", "train.steps=4", "checkpoint.every=2",
                       "train.eval_every=0", "logging.sample_tokens=0", "logging.plot=false"):
        args += ["--set", o]
    outs = _two_processes(args + ["--set", "checkpoint.export_hf=false"])
    assert "4 cpu devices, 2 process(es)" in outs[0] and "starting from scratch" in outs[0]
    assert sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(run_dir, "checkpoints", "*"))) == [2, 4]
    outs = _two_processes(args + ["--set", "train.steps=6"])
    assert "resuming from step 4" in outs[0]
    losses, ref = train_losses(run_dir), train_losses(reference[0])
    assert sorted(losses) == list(range(1, 7))
    np.testing.assert_allclose([losses[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)], atol=1e-5, rtol=0)
    assert os.path.isfile(os.path.join(run_dir, "hf", "config.json"))
