"""Training with the retention state carried across windows (train.carry_state, issue 26): the losses equal a
hand-written loop over the same streams; document starts reset the state; kill -9 and resume stay bit-equal;
gradient accumulation, scanned layers and 2-device meshes (rows, sequence) give the same losses; the errors."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT, Tol, assert_close

from nucleusx_jax import sharding as shd
from nucleusx_jax.data.prepare import PrepareOptions, prepare
from nucleusx_jax.data.store import TokenStore
from nucleusx_jax.modeling import NucleusXForCausalLMModule, RunOptions
from nucleusx_jax.retention import CarriedState
from nucleusx_jax.runs import RUN_FILES
from nucleusx_jax.tokenizer import load_tokenizer, train_tokenizer
from nucleusx_jax.train.checkpoint import Checkpointer
from nucleusx_jax.train.config import ConfigError, load_config
from nucleusx_jax.train.data import global_batch, global_continues, open_run_data
from nucleusx_jax.train.loop import prepare_tokenizer, run
from nucleusx_jax.train.metrics import read_metrics
from nucleusx_jax.train.step import TrainState, make_trainer
from nucleusx_jax.weights import to_layout

TINY = os.path.join(str(ROOT), "configs", "tiny.yaml")
T, B, CHUNK, STEPS = 32, 4, 16, 4
# losses of 4 steps against an independent loop (float32; the LM head's loss is computed another way)
REFERENCE_LOSSES = Tol("REFERENCE_LOSSES", 1e-6, relative=True)  # measured 1.5e-7
# the same run in another order of sums: microbatches, scanned layers, another mesh (as test_train_mesh.py)
SAME_LOSSES = Tol("SAME_LOSSES", 1e-6, relative=True)  # measured 2.2e-7
SAME_STATES = Tol("SAME_STATES", 1e-6, relative=True)  # the carried states after the first step; measured 1.9e-7


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(tokenizer path, store path): 80 documents of 20 to 400 words (most span several 32-token windows)."""
    root = tmp_path_factory.mktemp("carry")
    sp = train_tokenizer(["builtin:pydoc"], str(root / "sp"), 512)
    rng = np.random.default_rng(0)
    words = ["the", "state", "retention", "decay", "window", "carries", "gamma", "of", "a", "document", "x"]
    docs = [f"doc {i}: " + " ".join(rng.choice(words, rng.integers(20, 400))) for i in range(80)]
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    prepare([str(corpus)], sp, str(root / "store"), options=PrepareOptions(workers=0, progress=False))
    return sp, str(root / "store")


def settings(data, run_dir, *extra):
    """configs/tiny.yaml shrunk: 2 layers of width 32, chunkwise (chunks of 16), 4 stream rows (in order) of
    32-token windows, a constant learning rate, no weight decay, no z-loss, no eval, export or sample."""
    sp, store = data
    return [f"train.run_dir={run_dir}", f"data.tokenizer={sp}", f"data.store={store}", "data.stream_rows=true",
            "data.shuffle=false", "data.vocab_size=512", "model.vocab_size=512", "model.decoder_embed_dim=32",
            "model.decoder_value_embed_dim=64", "model.decoder_ffn_embed_dim=64", "model.z_loss_coeff=0",
            "model.forward_mode=chunkwise", f"model.recurrent_chunk_size={CHUNK}", f"data.seq_len={T}",
            f"train.global_batch={B}", "mesh.data=1", "schedule.warmup_steps=0", "schedule.decay=constant",
            "optimizer.learning_rate=0.01", "optimizer.weight_decay=0", f"train.steps={STEPS}", "train.eval_every=0",
            "checkpoint.every=0", "checkpoint.export_hf=false", "logging.every=1", "logging.sample_tokens=0",
            "logging.progress=false", "logging.plot=false", "logging.tensorboard=false", "train.carry_state=true",
            *extra]


def losses_of(run_dir):
    return [r["loss"] for r in read_metrics(run_dir, "train")]


# ------------------------------------------------------------------------------------- the reference loop
def stretch_starts(flat, eos, rows):
    """The first token of each row's stretch, from the flat tokens (docs/data.md): row i of ``rows`` (in order)
    starts at the first document start (0, or after an EOS) in ``[i N / rows, (i + 1) N / rows - T - 1]``."""
    n = len(flat)
    starts = []
    for i in range(rows):
        lo, hi = i * n // rows, (i + 1) * n // rows - T - 1
        after_eos = [p for p in range(max(lo, 1), hi + 1) if flat[p - 1] == eos]
        starts.append(0 if lo == 0 else (after_eos[0] if after_eos else lo))
    return starts


def reference_losses(cfg, store_path, steps):
    """``{True: losses, False: losses}`` of ``steps`` steps computed here, with and without carrying: the
    windows sliced from the store's flat tokens, the model run on each with the state the row's previous window
    left (emptied where the window's first token starts a document: a BOS, or after an EOS; always without
    carrying), cross-entropy over targets in the same document, clipped AdamW."""
    config = cfg.model_config()
    bos, eos = config.bos_token_id, config.eos_token_id
    flat = TokenStore(store_path).read(0, TokenStore(store_path).num_tokens)
    starts = stretch_starts(flat, eos, B)
    module = NucleusXForCausalLMModule(config)
    o = cfg.optimizer
    optimizer = optax.chain(optax.clip_by_global_norm(o.clip_norm),
                            optax.adamw(o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=0.0))
    options = RunOptions(mode="chunkwise", chunk_size=CHUNK, return_state=True)

    def loss(params, window, segments, state):
        logits, cache, _ = module.apply({"params": params}, window[:, :-1], None, state, segments[:, :-1],
                                        options=options)
        same = segments[:, 1:] == segments[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, window[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(same, picked, 0.0)) / jnp.sum(same), cache

    @jax.jit
    def step_fn(params, opt_state, window, segments, state):
        (value, cache), grads = jax.value_and_grad(loss, has_aux=True)(params, window, segments, state)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value, cache

    out = {}
    for carry in (True, False):
        params = nn.meta.unbox(module.init(jax.random.PRNGKey(cfg.train.seed), jnp.zeros((1, T), jnp.int32))["params"])
        opt_state = optimizer.init(params)
        h, k, v = config.decoder_retention_heads, config.key_head_dim, config.value_head_dim
        kv = np.zeros((config.decoder_layers, B, h, k, v), np.float32)
        z = np.zeros((config.decoder_layers, B, h, k, 1), np.float32)
        count = np.zeros((config.decoder_layers, B), np.int32)
        out[carry] = []
        for step in range(steps):
            first = [s + step * T for s in starts]
            window = np.stack([flat[p:p + T + 1] for p in first]).astype(np.int32)
            assert all(p + T + 1 <= q for p, q in zip(first, starts[1:] + [len(flat)]))  # no stream wraps here
            fresh = np.array([step == 0 or not carry or flat[p] == bos or flat[p - 1] == eos for p in first])
            kv[:, fresh], z[:, fresh], count[:, fresh] = 0, 0, 0
            new_doc = (window == bos) | np.pad(window[:, :-1] == eos, ((0, 0), (1, 0)))
            new_doc[:, 0] = False
            segments = 1 + np.cumsum(new_doc, axis=1).astype(np.int32)
            state = tuple(CarriedState(kv[i], z[i], count[i]) for i in range(config.decoder_layers))
            params, opt_state, value, cache = step_fn(params, opt_state, window, segments, state)
            for i, s in enumerate(cache):
                kv[i], z[i], count[i] = np.asarray(s.kv), np.asarray(s.z), np.asarray(s.count)
            out[carry].append(float(value))
    return out


def test_losses_equal_a_reference_loop(data, tmp_path):
    """4 steps with carried state against :func:`reference_losses`, and without carrying (same streams) against
    the loop without its state; the later steps of the two differ by far more than the tolerance: the carried
    state is used."""
    run_dir = str(tmp_path / "carry")
    cfg = load_config(TINY, settings(data, run_dir))
    run(cfg)
    got = losses_of(run_dir)
    reference = reference_losses(cfg, data[1], STEPS)
    want, want_plain = reference[True], reference[False]
    assert len(got) == STEPS
    assert_close(got, want, REFERENCE_LOSSES)
    plain_dir = str(tmp_path / "plain")
    run(load_config(TINY, settings(data, plain_dir, "train.carry_state=false")))
    plain = losses_of(plain_dir)
    assert_close(plain, want_plain, REFERENCE_LOSSES)
    assert plain[0] == got[0]  # the first windows start empty either way
    gaps = np.abs(np.subtract(want_plain, want)[1:]) / np.max(np.abs(want))
    assert gaps.min() > 20 * REFERENCE_LOSSES.value, gaps


# --------------------------------------------------------------------------------- the trainer, directly
def prepared(data, tmp_path, *extra):
    """(config with the tokenizer's ids, the stream rows)."""
    cfg = load_config(TINY, settings(data, str(tmp_path / "run"), *extra))
    prepare_tokenizer(cfg, str(tmp_path / "run"))
    return cfg, open_run_data(cfg.data, load_tokenizer(data[0]), data[0], str(tmp_path / "run"))[0]


def train(cfg, streams, mesh, steps=STEPS, state=None):
    """(losses, final state, the carry after the first step on the host) of ``steps`` carried steps on
    ``mesh``, from ``state`` (default: init)."""
    trainer = make_trainer(cfg, mesh)
    state = trainer.init_state() if state is None else jax.device_put(state, trainer.state_shardings)
    shape, losses = (cfg.train.global_batch, cfg.data.seq_len + 1), []
    for step in range(steps):
        batch = global_batch(streams, step, trainer.batch_sharding, shape)
        state, metrics = trainer.train_step(state, batch, global_continues(streams, step, trainer.batch_sharding,
                                                                           shape))
        losses.append(float(metrics["loss"]))
        first = jax.device_get(state.carry) if step == 0 else first
    return losses, state, first


ONE = lambda: shd.make_mesh({"data": 1}, jax.devices()[:1])  # noqa: E731


def test_grad_accumulation_and_scanned_layers(data, tmp_path):
    """grad_accum 2 (each microbatch continues its own rows' states) and scanned layers (the same parameters
    stacked) give the losses and carried states of the plain run."""
    cfg, streams = prepared(data, tmp_path)
    want, state, first = train(cfg, streams, ONE())
    accum, accum_state, accum_first = train(prepared(data, tmp_path, "train.grad_accum=2")[0], streams, ONE())
    assert_close(accum, want, SAME_LOSSES)
    # after step 1 the states come from the same parameters (later ones from parameters that AdamW moved by a
    # step wherever the gradient is ~0, whose sign the order of sums decides)
    for a, b in zip(jax.tree.leaves(accum_first), jax.tree.leaves(first)):
        assert_close(a, b, SAME_STATES)
    np.testing.assert_array_equal(np.asarray(accum_state.carry[0].count), np.asarray(state.carry[0].count))
    scan_cfg = prepared(data, tmp_path, "model.scan_layers=true")[0]
    init = make_trainer(cfg, ONE()).init_state()
    stacked = jax.device_get(to_layout(jax.device_get(init.params), True))
    opt = make_trainer(scan_cfg, ONE()).optimizer
    start = TrainState(step=init.step, params=stacked, opt_state=opt.init(stacked), rng=init.rng, carry=init.carry)
    scanned, scanned_state, scanned_first = train(scan_cfg, streams, ONE(), state=start)
    assert_close(scanned, want, SAME_LOSSES)
    for a, b in zip(jax.tree.leaves(scanned_first), jax.tree.leaves(first)):
        assert_close(a, b, SAME_STATES)
    np.testing.assert_array_equal(np.asarray(scanned_state.carry[1].count), np.asarray(state.carry[1].count))


def boundary_tokens(kind, bos, eos, rows=2):
    """Two 33-token windows per row, the second continuing the first; ``kind``: where window 2's first token
    starts a document (``"bos"``: it is a BOS; ``"eos"``: window 1 ends with an EOS), or ``"none"``."""
    rng = np.random.default_rng(7)
    flat = rng.integers(5, 500, (rows, 2 * T + 1)).astype(np.int32)
    flat[:, 0] = bos
    if kind == "bos":
        flat[:, T] = bos
    elif kind == "eos":
        flat[:, T - 1] = eos
    return np.stack([flat[:, :T + 1], flat[:, T:]])  # [2, rows, T + 1]


@pytest.mark.parametrize("reset", [True, False])
def test_document_start_at_a_window_start_resets_the_state(data, tmp_path, reset):
    """With data.reset_at_document_boundaries, a window whose first token starts a document (a BOS, or the
    token after an EOS) gives the loss of a row that starts afresh; without it the state runs on across; a
    window inside a document does use the state."""
    cfg, _ = prepared(data, tmp_path, "train.global_batch=2", f"data.reset_at_document_boundaries={str(reset).lower()}")
    config = cfg.model_config()
    trainer = make_trainer(cfg, ONE())
    init = jax.device_get(trainer.init_state())

    def second_loss(windows, continues):
        state = init
        for step in range(2):
            flags = np.array([step > 0 and continues] * 2)
            state, metrics = trainer.train_step(state, jax.device_put(windows[step], trainer.batch_sharding),
                                                jax.device_put(flags, trainer.row_sharding))
        return float(metrics["loss"])

    for kind in ("bos", "eos", "none"):
        windows = boundary_tokens(kind, config.bos_token_id, config.eos_token_id)
        carried, fresh = second_loss(windows, True), second_loss(windows, False)
        if reset and kind != "none":
            assert carried == fresh, kind
        else:
            assert abs(carried - fresh) > 1e-4, kind


# --------------------------------------------------------------------------------------- kill -9, resume
@pytest.mark.slow
def test_kill_9_then_resume_is_bit_equal(data, tmp_path):
    """train.py killed (SIGKILL) at its second checkpoint, then run again: it resumes from the last complete
    step (its carried state restored), and every later loss, and the final state with its carry, equal an
    uninterrupted run's bit for bit (both in subprocesses: the same compiled code)."""
    from test_train_run import cli

    steps = ["train.steps=12", "checkpoint.every=4", "checkpoint.max_to_keep=3"]

    def args(run_dir):
        return [a for o in settings(data, run_dir, *steps) for a in ("--set", o)]

    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = cli(args(ref_dir))
    out, _ = ref.communicate(timeout=400)
    assert ref.returncode == 0, out[-3000:]
    killed = cli(args(run_dir), kill_at_second_save=True)
    out, _ = killed.communicate(timeout=400)
    assert killed.returncode == -signal.SIGKILL, out[-3000:]
    again = cli(args(run_dir))
    out, _ = again.communicate(timeout=400)
    assert again.returncode == 0, out[-3000:]
    with open(os.path.join(run_dir, RUN_FILES.summary)) as f:
        resumed = json.load(f)["resumed_from"]
    assert resumed in (4, 8), out[-3000:]
    want = {r["step"]: r["loss"] for r in read_metrics(ref_dir, "train")}
    got = {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}
    assert [got[s] for s in range(resumed + 1, 13)] == [want[s] for s in range(resumed + 1, 13)]
    # the carried state the resumed run restored is the uninterrupted run's at that step, and not empty
    abstract = make_trainer(load_config(os.path.join(run_dir, RUN_FILES.train_config)), ONE()).abstract_state
    there, here = (carry_at(d, resumed, abstract) for d in (run_dir, ref_dir))
    assert max(int(np.max(s["count"])) for s in there) > 0
    for a, b in zip(jax.tree.leaves(there), jax.tree.leaves(here)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    got_final, want_final = final_state(run_dir, data), final_state(ref_dir, data)
    assert "carry" in got_final and int(got_final["step"]) == 12
    for a, b in zip(jax.tree.leaves(got_final), jax.tree.leaves(want_final)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def final_state(run_dir, data):
    """The state of ``run_dir``'s newest checkpoint as the trainer restores it on resume (as a dict)."""
    cfg = load_config(os.path.join(run_dir, RUN_FILES.train_config))
    layout = open_run_data(cfg.data, load_tokenizer(data[0]), data[0], run_dir)[0].layout(cfg.train.global_batch)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint, data_layout=layout)
    try:
        return checkpointer.restore_latest(make_trainer(cfg, ONE()).abstract_state).as_dict()
    finally:
        checkpointer.close()


def carry_at(run_dir, step, abstract):
    """The carried states of checkpoint ``step`` of ``run_dir`` (a list of ``{kv, z, count}``), read alone."""
    target = {"carry": abstract.as_dict()["carry"]}
    manager = ocp.CheckpointManager(os.path.join(run_dir, RUN_FILES.checkpoints),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))[
            "state"]["carry"]
    finally:
        manager.close()


# --------------------------------------------------------------------------------------------- meshes
MESH_WORKER = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from test_carry_train import ONE, prepared, train
from nucleusx_jax import sharding as shd
import pathlib
data, tmp = (sys.argv[1], sys.argv[2]), pathlib.Path(sys.argv[3])
cfg, streams = prepared(data, tmp)
out = {}
for name, shape in (("1", None), ("data2", {"data": 2}), ("sequence2", {"data": 1, "sequence": 2})):
    mesh = ONE() if shape is None else shd.make_mesh(shape)
    losses, state, first = train(cfg, streams, mesh)
    out[name] = {"losses": losses, "count": np.asarray(jax.device_get(state.carry[0].count)).tolist(),
                 "first": [np.asarray(x).tolist() for x in jax.tree.leaves(first)],
                 "shard": list(state.carry[0].kv.sharding.shard_shape(state.carry[0].kv.shape))}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_two_device_meshes_match_one_device(data, tmp_path):
    """Rows split over data = 2, and every row split over sequence = 2 (the state replicated over it): the
    losses and carried states of one device."""
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, "-c", MESH_WORKER, data[0], data[1], str(tmp_path)], cwd=str(ROOT),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT")][0][len("RESULT"):])
    one = out["1"]
    for name in ("data2", "sequence2"):
        assert_close(out[name]["losses"], one["losses"], SAME_LOSSES, name)
        assert out[name]["count"] == one["count"]
        for a, b in zip(out[name]["first"], one["first"]):
            assert_close(a, b, SAME_STATES, name)
    assert out["data2"]["shard"] == [B // 2, 4, 8, 16] and out["sequence2"]["shard"] == [B, 4, 8, 16]


# ---------------------------------------------------------------------------------------------- errors
def test_errors(data, tmp_path):
    """carry_state without stream rows (also with reset_at_document_boundaries false), with the parallel form,
    and with the Pallas kernel's reference normalisation without segments are refused when the config is read;
    a resume onto another global batch, or without carry_state, is refused naming what to resume with."""
    with pytest.raises(ConfigError, match=r"train.carry_state needs data.stream_rows: true"):
        load_config(TINY, settings(data, str(tmp_path / "a"), "data.stream_rows=false",
                                   "data.reset_at_document_boundaries=false"))
    with pytest.raises(ConfigError, match=r"train.carry_state needs model.forward_mode=chunkwise, got parallel"):
        load_config(TINY, settings(data, str(tmp_path / "a"), "model.forward_mode=parallel"))
    with pytest.raises(ConfigError, match=r"retention_impl=pallas .*reference needs data.reset_at_document_boundaries"):
        load_config(TINY, settings(data, str(tmp_path / "a"), "model.retention_impl=pallas",
                                   "model.chunkwise_normalization=reference",
                                   "data.reset_at_document_boundaries=false"))
    run_dir = str(tmp_path / "run")
    run(load_config(TINY, settings(data, run_dir, "train.steps=1")))
    with pytest.raises(ValueError, match=r"checkpoint step 1 .*train.global_batch=4; this config has "
                                         r"train.global_batch=8.* Resume with train.global_batch=4"):
        run(load_config(TINY, settings(data, run_dir, "train.steps=2", "train.global_batch=8")))
    with pytest.raises(ValueError, match=r"written with train.carry_state=true .* resume with train.carry_state=true"):
        run(load_config(TINY, settings(data, run_dir, "train.steps=2", "train.carry_state=false")))
    assert len(losses_of(run_dir)) == 1  # nothing ran after the refusals
