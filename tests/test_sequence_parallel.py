"""Sequence parallelism on 8 simulated CPU devices: meshes splitting T over ``sequence`` give the 1-device logits,
loss, gradients (with left padding and document segments) and training losses; a length that does not split is
refused before compiling, with the numbers."""

import json

import numpy as np
import pytest
from conftest import run_on_8_devices

from nucleusx_jax import sequence_parallel
from nucleusx_jax.train.config import load_config
from nucleusx_jax.train.step import check_fits

MESHES = ["1,1,1,8", "2,1,1,4", "1,2,2,2", "2,2,1,2"]  # data, fsdp, tensor, sequence
BASE = ["model.vocab_size=64", "model.decoder_embed_dim=32", "model.decoder_value_embed_dim=64",
        "model.decoder_ffn_embed_dim=48", "model.decoder_layers=2", "model.decoder_retention_heads=4",
        "model.forward_mode=chunkwise", "model.recurrent_chunk_size=4", "model.dropout=0.1",
        "model.drop_path_rate=0.1", "model.z_loss_coeff=0.001", "data.seq_len=64", "train.global_batch=4",
        "optimizer.learning_rate=0.01", "schedule.warmup_steps=2", "train.steps=5"]

WORKER = r"""
import json, sys
import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding
from nucleusx_jax import retention as ret, sequence_parallel, sharding as shd
from nucleusx_jax.weights import stack_layers, unstack_layers
from nucleusx_jax.modeling import NucleusXForCausalLMModule, RunOptions
from nucleusx_jax.train.config import load_config
from nucleusx_jax.train.step import make_trainer

base = json.loads(sys.argv[2])
B, T = 4, 64
rng = np.random.default_rng(0)
# training windows counting up from a random start mod 64: BOS (1) and EOS (2) cut documents across slices
tokens = ((rng.integers(0, 64, (5, B, 1)) + np.arange(T + 1)) % 64).astype(np.int32)
ids = rng.integers(3, 64, (B, T)).astype(np.int32)
mask = np.ones((B, T), np.int32)
mask[1, :13] = 0  # left padding over the first slices
segments = np.ones((B, T), np.int32)
segments[0, 5:30] = 2; segments[0, 30:] = 3  # documents crossing slice boundaries
segments[1, :13] = 0; segments[1, 40:] = 4  # padding, then a document starting at a slice boundary
segments[2, 17:] = 5
labels = np.where(segments > 0, np.roll(ids, -1, 1), -100).astype(np.int32)
devices = jax.devices()
assert len(devices) == 8, devices

def run(shape, extra=(), n_devices=8, steps=5, params=None):
    cfg = load_config(None, base + list(extra))
    mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, shape)), devices[:n_devices])
    trainer = make_trainer(cfg, mesh)
    state = trainer.init_state()
    tok = NamedSharding(mesh, shd.token_spec())
    module, options = trainer.module, RunOptions.from_config(trainer.module.config)

    def model(params, ids, mask, segments, labels):
        logits = module.apply({"params": params}, ids, mask, None, segments, options=options)[0]
        loss_fn = lambda p: module.apply({"params": p}, ids, labels, mask, segments, options=options,
                                         method=NucleusXForCausalLMModule.next_token_loss)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        return logits, loss, grads

    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.LOGICAL_AXIS_RULES):
        put = lambda x: jax.device_put(x, tok)
        params = state.params if params is None else params
        logits, loss, grads = jax.jit(model)(params, put(ids), put(mask), put(segments), put(labels))
        params = jax.device_get(params)  # before the training steps donate it
        try:  # a length that does not split over the devices: refused while tracing, before compiling
            jax.jit(model).trace(state.params, *(x[:, :60] for x in (ids, mask, segments, labels)))
            refusal = None
        except ValueError as err:
            refusal = str(err)
    losses = []
    for step in range(steps):
        state, metrics = trainer.train_step(state, jax.device_put(tokens[step], trainer.batch_sharding))
        losses.append(float(metrics["loss"]))
    return dict(logits=np.asarray(logits), loss=float(loss), grads=jax.device_get(grads), losses=losses,
                refusal=refusal, params=params)

one = run((1, 1, 1, 1), n_devices=1)
out = {"one_losses": one["losses"]}
# segment starts from the slices: runs within, across and over whole slices, padding runs, alternating ids
ids_ = np.array([[1] * 20 + [2] * 3 + [0] * 30 + [3] * 11, [5] * 64, [1, 2] * 32, [0] * 8 + [4] * 56], np.int32)
with jax.set_mesh(shd.make_mesh({"data": 2, "sequence": 4})):
    got = jax.jit(sequence_parallel.segment_starts)(jnp.asarray(ids_))
out["starts_equal"] = bool((np.asarray(got) == np.asarray(ret.segment_starts(jnp.asarray(ids_)))).all())
# both chunkwise normalisations without segments (left padding over the first slices): the one-device numbers
q, k, v = (jnp.asarray(np.random.default_rng(i).normal(size=(2, 2, 64, 8)) * 2, jnp.float32) for i in range(3))
pad_mask = jnp.asarray(np.arange(64)[None] >= np.array([[0], [13]]), jnp.int32)
log_decay = jnp.asarray(ret.log_decay_table(2, True))
with jax.set_mesh(shd.make_mesh({"data": 2, "sequence": 4})):
    for norm in ("exact", "reference"):
        split = jax.jit(lambda q, k, v, m: sequence_parallel.chunkwise_retention(q, k, v, log_decay, 4, m, None, norm))
        want = np.asarray(ret.chunkwise_retention(q, k, v, log_decay, 4, pad_mask, None, norm))
        relative = lambda x: float(np.max(np.abs(np.asarray(x) - want)) / np.max(np.abs(want)))
        out[norm] = relative(split(q, k, v, pad_mask))
        out[norm + "_vs_parallel"] = relative(ret.parallel_retention(q, k, v, log_decay, pad_mask))
for name in sys.argv[1].split(";"):
    extra = ["train.remat=dots"] if name == "1,2,2,2" else []  # with per-layer remat too
    got = run(tuple(int(x) for x in name.split(",")), extra)
    out[name] = dict(
        logits=float(np.max(np.abs(got["logits"] - one["logits"]))), loss=abs(got["loss"] - one["loss"]),
        grads=max(float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
                  for a, b in zip(jax.tree.leaves(got["grads"]), jax.tree.leaves(one["grads"]))),
        losses=got["losses"], refusal=got["refusal"])
# scanned layers compose: the same logits and (unstacked) gradients with T split over sequence
got = run((2, 2, 1, 2), ["model.scan_layers=true"], steps=0, params=stack_layers(one["params"]))
out["scanned"] = dict(
    logits=float(np.max(np.abs(got["logits"] - one["logits"]))),
    grads=max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b))),
                                           unstack_layers(got["grads"]), dict(one["grads"])))))
# the bytes the collectives of the loss's forward+backward move do not grow with T (segments and padding on)
from benchmarks.sequence_parallel import collective_bytes, compile_loss
model = load_config(None, base).model_config()
out["collective_bytes"] = [collective_bytes(compile_loss(model, 8, length, segments=True).as_text())
                           for length in (64, 256)]
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    return run_on_8_devices(WORKER, ";".join(MESHES), json.dumps(BASE))


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_sequence_mesh_matches_one_device(results, mesh):
    """Logits and loss within 1e-5, gradients within 1e-4 relative (left padding, segments across slices),
    five training steps within 1e-5 (documents, dropout and drop path on)."""
    got = results[mesh]
    assert got["logits"] < 1e-5 and got["loss"] < 1e-5
    assert got["grads"] < 1e-4
    one = np.array(results["one_losses"])
    assert one[-1] < one[0]  # it trains
    np.testing.assert_allclose(got["losses"], one, atol=1e-5, rtol=0)
    sequence = int(mesh.split(",")[-1])
    assert got["refusal"] == (f"T=60 does not split over mesh.sequence={sequence} in whole chunks of 4: it must be "
                              f"a multiple of {sequence} x 4 = {4 * sequence}")


@pytest.mark.slow
def test_scanned_layers_split_over_sequence(results):
    """``model.scan_layers`` on mesh (2, 2, 1, 2): the 1-device logits, gradients equal once unstacked."""
    assert results["scanned"]["logits"] < 1e-5 and results["scanned"]["grads"] < 1e-4


@pytest.mark.slow
def test_both_normalizations_split_over_sequence(results):
    """``chunkwise_normalization`` "exact" and "reference" without segments: the one-device values (errors relative
    to the largest value); only "exact" equals the parallel form."""
    assert results["exact"] < 1e-5 and results["reference"] < 1e-5
    assert results["exact_vs_parallel"] < 2e-5 < 1e-3 < results["reference_vs_parallel"]


@pytest.mark.slow
def test_segment_starts_from_slices(results):
    assert results["starts_equal"]


@pytest.mark.slow
def test_communication_does_not_grow_with_length(results):
    short, long = results["collective_bytes"]
    assert short == long and short["all-gather"] > 0  # the states' all_gather is there, at the same size


def test_collective_bytes_counts_results():
    from benchmarks.sequence_parallel import collective_bytes
    hlo = ("%ag = f32[8,1,4,128,256]{4,3,2,1,0} all-gather(f32[1,1,4,128,256]{4,3,2,1,0} %x), dimensions={0}\n"
           "%ar = (f32[512,32000]{1,0}, s32[]) all-reduce(%a, %b), to_apply=%add\n"
           "%ags = (bf16[4]{0}, bf16[32]{0}) all-gather-start(bf16[4]{0} %y), dimensions={0}\n"
           "%agd = bf16[32]{0} all-gather-done(%ags)\n%m = f32[9]{0} multiply(%p, %q)\n")
    assert collective_bytes(hlo) == {"all-gather": 8 * 4 * 128 * 256 * 4 + 32 * 2, "all-reduce": 512 * 32000 * 4 + 4}


def test_trainer_refuses_unsplittable_configs():
    cfg = load_config(None, BASE + ["data.seq_len=48"])
    with pytest.raises(ValueError, match=r"data.seq_len=48 does not split over mesh.sequence=8 in whole chunks of 4: "
                                         r"it must be a multiple of 8 x 4 = 32"):
        check_fits(cfg, {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 8})
    check_fits(cfg, {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 4})  # 48 = 3 x 4 x 4
    parallel = load_config(None, BASE + ["model.forward_mode=parallel"])
    with pytest.raises(ValueError, match=r"mesh.sequence=2 needs model.forward_mode=chunkwise and "
                                         r"model.retention_impl=xla \(got parallel and xla\)"):
        check_fits(parallel, {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 2})
    with pytest.raises(ValueError, match=r"retention_impl='pallas' has no sequence-parallel form"):
        sequence_parallel.chunkwise_retention(None, None, None, None, 4, impl="pallas")
