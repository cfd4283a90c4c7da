"""Sharded training on 8 simulated CPU devices: every mesh gives the 1-device losses (also chunkwise with
remat); bfloat16 compute keeps float32 state; gradient accumulation matches one big batch; a checkpoint
written on one mesh restores onto another."""

import numpy as np
import pytest
from conftest import Tol, assert_close, run_on_8_devices

MESHES = ["8,1,1", "2,4,1", "2,2,2", "1,2,4"]
# the 5 training losses (~4.1) against the 1-device run's, relative to the largest loss
# (~9x the measured errors: sums in another order on another mesh; docs/testing.md)
MESH_LOSSES = Tol("MESH_LOSSES", 1e-6, relative=True)  # any mesh, chunkwise with remat; measured 1.1e-7
ACCUM_LOSSES = Tol("ACCUM_LOSSES", 1e-6, relative=True)  # gradient accumulation; measured 1.1e-7
BF16_LOSSES = Tol("BF16_LOSSES", 3e-4, relative=True)  # bfloat16 compute; measured 3.6e-5

WORKER = r"""
import json, os, sys
import jax, numpy as np
from nucleusx_jax import sharding as shd
from nucleusx_jax.train.checkpoint import Checkpointer
from nucleusx_jax.train.config import load_config
from nucleusx_jax.train.step import make_trainer

base = ["model.vocab_size=64", "model.decoder_embed_dim=32", "model.decoder_value_embed_dim=64",
        "model.decoder_ffn_embed_dim=48", "model.decoder_layers=2", "model.decoder_retention_heads=4",
        "model.dropout=0.1", "model.drop_path_rate=0.1", "model.z_loss_coeff=0.001", "data.seq_len=16",
        "train.global_batch=8", "optimizer.learning_rate=0.01", "schedule.warmup_steps=2", "train.steps=5"]
# learnable rows: counting up from a random start, mod 64
tokens = ((np.random.default_rng(0).integers(0, 64, (5, 8, 1)) + np.arange(17)) % 64).astype(np.int32)
devices = jax.devices()
assert len(devices) == 8, devices

def train(shape, extra=(), n_devices=8):
    cfg = load_config(None, base + list(extra))
    mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, shape)), devices[:n_devices])
    trainer = make_trainer(cfg, mesh)
    state = trainer.init_state()
    losses = []
    for step in range(5):
        state, metrics = trainer.train_step(state, jax.device_put(tokens[step], trainer.batch_sharding))
        losses.append(float(metrics["loss"]))
    return trainer, state, losses

out = {"1": train((1, 1, 1), n_devices=1)[2]}
for name in sys.argv[1].split(";"):
    trainer, state, out[name] = train(tuple(int(x) for x in name.split(",")))
    if name == "2,4,1":
        ckpt = Checkpointer(sys.argv[2], load_config(None, base).checkpoint)
        ckpt.save(state)
        ckpt.close()
        saved = jax.device_get(state.params)
# the same model computed chunkwise with per-layer remat: the same losses
out["chunkwise_remat"] = train((2, 2, 2), ["model.forward_mode=chunkwise", "model.recurrent_chunk_size=8", "train.remat=dots"])[2]
# bfloat16 compute keeps float32 master weights and optimizer state
_, bf16_state, out["bf16"] = train((2, 2, 2), ["train.dtype=bfloat16"])
out["bf16_state_dtypes"] = sorted({str(x.dtype) for x in jax.tree.leaves((bf16_state.params, bf16_state.opt_state))})
out["accum"] = train((2, 2, 2), ["train.grad_accum=2", "model.dropout=0", "model.drop_path_rate=0"])[2]
out["no_accum"] = train((2, 2, 2), ["model.dropout=0", "model.drop_path_rate=0"])[2]
# restore the (2,4,1) checkpoint onto a (1,2,4) mesh
target = make_trainer(load_config(None, base), shd.make_mesh({"data": 1, "fsdp": 2, "tensor": 4}))
restored = Checkpointer(sys.argv[2], load_config(None, base).checkpoint).restore_latest(target.abstract_state)
out["restored_step"] = int(restored.step)
out["restore_max_diff"] = max(float(np.max(np.abs(a - b))) for a, b in
                              zip(jax.tree.leaves(jax.device_get(restored.params)), jax.tree.leaves(saved)))
out["restored_shardings_match"] = all(
    a.sharding.is_equivalent_to(s, a.ndim) for a, s in
    zip(jax.tree.leaves(restored.params), jax.tree.leaves(target.state_shardings.params)))
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_on_8_devices(WORKER, ";".join(MESHES), str(tmp_path_factory.mktemp("ckpt")))


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_matches_one_device(results, mesh):
    """(data, fsdp, tensor) meshes on 8 devices: the 5 losses of 1 device (dropout and drop_path on)."""
    one = np.array(results["1"])
    assert one[-1] < one[0]  # it trains
    assert_close(results[mesh], one, MESH_LOSSES)


@pytest.mark.slow
def test_chunkwise_remat_and_bf16(results):
    assert_close(results["chunkwise_remat"], results["1"], MESH_LOSSES)
    assert_close(results["bf16"], results["1"], BF16_LOSSES)
    assert results["bf16"] != results["1"]  # it did compute in bfloat16
    assert results["bf16_state_dtypes"] == ["float32", "int32"]  # adam count is int32


@pytest.mark.slow
def test_grad_accumulation_matches_full_batch(results):
    assert_close(results["accum"], results["no_accum"], ACCUM_LOSSES)


@pytest.mark.slow
def test_restore_onto_different_mesh(results):
    assert results["restored_step"] == 5
    assert results["restore_max_diff"] == 0.0
    assert results["restored_shardings_match"]
