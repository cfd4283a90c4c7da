"""``scan_layers``: the decoder layers under ``nn.scan`` equal the per-layer loop (every forward form, the
gradients, remat inside the scan) on the reference fixtures, and checkpoints are interchangeable between the
two layouts (load, save, convert, the HF adapter, a trainer run)."""

import json
import os

import flax
import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file

from nucleusx_jax import convert, weights
from nucleusx_jax.model import NucleusX, from_pretrained
from nucleusx_jax.tensorio import CheckpointReader

from conftest import FIXTURE_NAMES, FIXTURES, LOGITS, Tol, assert_close, load_cases

# scanned vs per-layer (logits, caches, hidden states, gradients), float32, relative to the largest value;
# measured 2.4e-7
TIGHT = Tol("scan TIGHT", 1e-6, relative=True)
TINY = FIXTURES / "nucleus_x_tiny"


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def pair(request):
    """(per-layer model, scanned model, cases) of one fixture, both loaded from its PyTorch weights."""
    return from_pretrained(FIXTURES / request.param), from_pretrained(FIXTURES / request.param, scan_layers=True), \
        load_cases(request.param)


def assert_trees_close(a, b, tol):
    """Same structure (parameter trees compared in per-layer form) and every leaf equal (``tol`` 0) or within
    the Tol ``tol`` (relative to the largest value in ``b``)."""
    if isinstance(a, dict):
        a, b = weights.unstack_layers(a), weights.unstack_layers(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    flat = [np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)]) for t in (a, b)]
    if tol == 0:
        np.testing.assert_array_equal(*flat)
    else:
        assert_close(*flat, tol)


def test_scanned_params_are_the_layers_stacked(pair):
    plain, scanned, _ = pair
    layers = plain.config.decoder_layers
    assert not any(k.startswith("layers_") for k in scanned.params["model"])
    for path, leaf in flatten_dict(scanned.params["model"]["layers"]).items():
        assert leaf.shape[0] == layers
        for i in range(layers):
            np.testing.assert_array_equal(leaf[i], flatten_dict(plain.params["model"][f"layers_{i}"])[path])


def test_every_forward_form_matches(pair):
    plain, scanned, c = pair
    ids = c["input_ids"]
    segments = np.where(np.arange(ids.shape[1]) < 8, 1, 2)[None].repeat(ids.shape[0], 0)
    calls = {
        "parallel": dict(forward_mode="parallel", use_cache=True, output_hidden_states=True),
        "chunkwise": dict(forward_mode="chunkwise", recurrent_chunk_size=int(c["chunk_size_pad"]), use_cache=True),
        "recurrent": dict(forward_mode="recurrent", use_cache=True),
        "segments": dict(forward_mode="parallel", use_cache=True, segment_ids=segments),
    }
    for name, kwargs in calls.items():
        a, b = plain(ids, **kwargs), scanned(ids, **kwargs)
        assert_close(a.logits, b.logits, TIGHT, name)
        assert len(b.past_key_values) == plain.config.decoder_layers
        assert_trees_close(a.past_key_values, b.past_key_values, TIGHT)
        if name in ("parallel", "recurrent"):
            assert_close(b.logits, c[f"logits_{name}"], LOGITS)
        if name == "parallel":
            assert len(b.hidden_states) == plain.config.decoder_layers + 1
            assert_trees_close(a.hidden_states, b.hidden_states, TIGHT)
        if name in ("parallel", "segments"):  # one recurrent step continuing each layout's cache
            step_a = plain(ids[:, -1:], past_key_values=a.past_key_values, use_cache=True)
            step_b = scanned(ids[:, -1:], past_key_values=b.past_key_values, use_cache=True)
            assert_close(step_a.logits, step_b.logits, TIGHT)
    # left padding and greedy decoding (prompt, then the per-layer cache step by step) as the reference
    lp = dict(attention_mask=c["lp_attention_mask"], forward_mode="parallel")
    assert_close(scanned(c["lp_input_ids"], **lp).logits, c["lp_logits_parallel"], LOGITS)
    out = scanned.generate(c["gen_input_ids"], c["gen_attention_mask"], max_new_tokens=12)
    np.testing.assert_array_equal(np.asarray(out), c["gen_output_ids"])


def test_gradients_match_with_and_without_remat(pair):
    plain, scanned, c = pair
    ids = c["input_ids"]
    remat = NucleusX(scanned.config, scanned.params, gradient_checkpointing=True, remat_policy="dots_saveable")

    def grads(model):
        return jax.grad(lambda p: model(ids, labels=ids, params=p, forward_mode="chunkwise",
                                        recurrent_chunk_size=int(c["chunk_size_div"])).loss)(model.params)

    reference = grads(plain)
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(reference)) > 1e-3  # not vanishing
    assert_trees_close(reference, grads(scanned), TIGHT)
    assert_trees_close(reference, grads(remat), TIGHT)


def test_stack_and_unstack_are_inverse():
    params = {"model": {"embed_tokens": {"embedding": np.ones((4, 2))},
                        **{f"layers_{i}": {"ffn": {"fc1": {"kernel": np.full((2, 3), i)}}} for i in range(3)}}}
    stacked = weights.stack_layers(params)
    assert list(stacked["model"]) == ["embed_tokens", "layers"]
    np.testing.assert_array_equal(stacked["model"]["layers"]["ffn"]["fc1"]["kernel"][:, 0, 0], [0, 1, 2])
    for layout in (weights.to_layout(stacked, True), weights.stack_layers(stacked)):  # stacked stays stacked
        np.testing.assert_array_equal(layout["model"]["layers"]["ffn"]["fc1"]["kernel"],
                                      stacked["model"]["layers"]["ffn"]["fc1"]["kernel"])
    back = weights.to_layout(stacked, False)
    assert flatten_dict(back).keys() == flatten_dict(params).keys()
    for key, value in flatten_dict(params).items():
        np.testing.assert_array_equal(flatten_dict(back)[key], value)
    del params["model"]["layers_1"]
    with pytest.raises(weights.CheckpointError, match=r"model/layers/ffn/fc1/kernel: layers \[0, 2\] are not 0 .. 1"):
        weights.stack_layers(params)


def assert_converts_to_the_reference(src, dst):
    """``src`` converted to PyTorch is the tiny fixture's state dict, bit for bit."""
    convert.convert(str(src), str(dst), to="torch", progress=False)
    exported, original = load_file(str(dst / "model.safetensors")), load_file(str(TINY / "model.safetensors"))
    assert exported.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key], err_msg=key)


def test_files_hold_one_tensor_per_layer_and_load_in_either_layout(tmp_path):
    scanned = from_pretrained(TINY, scan_layers=True)
    scanned.save_pretrained(tmp_path / "flax")
    with open(tmp_path / "flax" / "config.json") as f:
        assert json.load(f)["scan_layers"] is True
    with CheckpointReader(str(tmp_path / "flax" / "flax_model.msgpack")) as reader:
        assert "model/layers_1/ffn/fc1/kernel" in reader.index and not any("/layers/" in n for n in reader.index)
    again = from_pretrained(tmp_path / "flax")
    assert again.config.scan_layers
    assert_trees_close(again.params, scanned.params, 0)
    assert "layers" in again.params["model"]
    plain = from_pretrained(tmp_path / "flax", scan_layers=False)
    assert "layers_1" in plain.params["model"]
    assert_trees_close(plain.params, scanned.params, 0)
    assert_converts_to_the_reference(tmp_path / "flax", tmp_path / "torch")
    # a stacked flax file (what transformers' save_pretrained writes for a scanned model) loads and converts too
    (tmp_path / "stacked").mkdir()
    (tmp_path / "stacked" / "flax_model.msgpack").write_bytes(
        flax.serialization.msgpack_serialize(jax.device_get(scanned.params)))
    scanned.config.replace(scan_layers=False).save_pretrained(tmp_path / "stacked")
    assert_trees_close(from_pretrained(tmp_path / "stacked").params, plain.params, 0)
    assert_converts_to_the_reference(tmp_path / "stacked", tmp_path / "torch2")


def test_hf_adapter_saves_and_loads_scanned(tmp_path):
    pytest.importorskip("transformers", exc_type=ImportError)
    from nucleusx_jax.hf import FlaxNucleusXForCausalLM

    model = FlaxNucleusXForCausalLM.from_pretrained(TINY, from_pt=True, scan_layers=True)
    assert "layers" in model.params["model"]
    model.save_pretrained(tmp_path)
    again = FlaxNucleusXForCausalLM.from_pretrained(tmp_path)
    assert again.config.scan_layers
    assert_trees_close(again.params, model.params, 0)
    ids = load_cases("nucleus_x_tiny")["input_ids"]
    assert_close(again(ids).logits, load_cases("nucleus_x_tiny")["logits_parallel"], LOGITS)


@pytest.mark.slow
def test_trainer_run_with_scan_layers_restores_and_exports(tmp_path):
    from nucleusx_jax.runs import restore_params
    from nucleusx_jax.tokenizer import train_tokenizer
    from nucleusx_jax.train.config import load_config
    from nucleusx_jax.train.loop import run

    tokenizer = train_tokenizer(["builtin:pydoc"], str(tmp_path / "sp"), 512)
    run_dir = str(tmp_path / "run")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def train(steps, scan="true"):
        return run(load_config(os.path.join(root, "configs", "tiny.yaml"), [
            f"train.run_dir={run_dir}", f"data.tokenizer={tokenizer}", "data.vocab_size=512", "model.vocab_size=512",
            "model.decoder_embed_dim=32", "model.decoder_value_embed_dim=64", "model.decoder_ffn_embed_dim=64",
            "model.decoder_layers=3", f"model.scan_layers={scan}", "data.seq_len=32", "train.global_batch=4",
            "mesh.data=1", "train.remat=full", f"train.steps={steps}", "train.eval_every=0", "checkpoint.every=2",
            "checkpoint.export_torch=true", "logging.sample_tokens=3", "logging.progress=false",
            "logging.tensorboard=false", "logging.plot=false"]))

    first = train(2)
    assert first["resumed_from"] is None
    second = train(3)
    assert second["resumed_from"] == 2 and second["steps"] == 3
    config, params = restore_params(run_dir)
    assert config.scan_layers and params["model"]["layers"]["ffn"]["fc1"]["kernel"].shape == (3, 32, 64)
    exported = from_pretrained(os.path.join(run_dir, "hf"))
    assert exported.config.scan_layers
    assert_trees_close(exported.params, params, 0)
    unstacked = weights.unstack_layers(jax.device_get(params))
    torch_weights = load_file(os.path.join(run_dir, "torch", "model.safetensors"))
    np.testing.assert_array_equal(torch_weights["model.layers.2.ffn.fc1.weight"],
                                  np.asarray(unstacked["model"]["layers_2"]["ffn"]["fc1"]["kernel"]).T)
    # resuming in the other layout is refused, naming the setting
    with pytest.raises(ValueError, match="trained with model.scan_layers=true, this run has false"):
        train(4, scan="false")
    assert restore_params(run_dir)[0].scan_layers  # and leaves the run's config.json as it was
