"""HF Flax integration: Auto registration, save/load, tied embeddings, dtypes, dropout, remat."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig, FlaxAutoModel, FlaxAutoModelForCausalLM, FlaxAutoModelForSequenceClassification

import nucleusx_jax
from nucleusx_jax.hf import (FlaxNucleusXForCausalLM, FlaxNucleusXForSequenceClassification, FlaxNucleusXModel,
                             NucleusXConfig)
from nucleusx_jax.weights import CheckpointError

from conftest import (FIXTURE_NAMES, FIXTURES, LOGITS, LOSS, Tol, assert_close, load_cases, max_abs,
                      write_seqcls_dir)

TINY = FIXTURES / "nucleus_x_tiny"
# bfloat16 compute against float32, relative to the largest float32 logit; measured 5.8e-3
BF16_LOGITS = Tol("BF16_LOGITS", 0.02, relative=True)


def small_config(**kw) -> NucleusXConfig:
    base = dict(vocab_size=64, decoder_embed_dim=16, decoder_value_embed_dim=24, decoder_ffn_embed_dim=32,
                decoder_layers=2, decoder_retention_heads=2, recurrent_chunk_size=4, pad_token_id=0)
    base.update(kw)
    return NucleusXConfig(**base)


def test_auto_classes_are_registered():
    cfg = AutoConfig.for_model("nucleus_x")
    assert isinstance(cfg, NucleusXConfig)
    small = small_config()
    assert isinstance(FlaxAutoModel.from_config(small), FlaxNucleusXModel)
    assert isinstance(FlaxAutoModelForCausalLM.from_config(small), FlaxNucleusXForCausalLM)
    assert isinstance(FlaxAutoModelForSequenceClassification.from_config(small), FlaxNucleusXForSequenceClassification)


def test_save_pretrained_round_trip(tmp_path):
    model = FlaxAutoModelForCausalLM.from_pretrained(TINY, from_pt=True)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "flax_model.msgpack").exists()
    again = FlaxAutoModelForCausalLM.from_pretrained(tmp_path)
    ids = load_cases("nucleus_x_tiny")["input_ids"]
    np.testing.assert_array_equal(model(ids).logits, again(ids).logits)
    # the base model loads the decoder out of the causal-LM directory
    base = FlaxNucleusXModel.from_pretrained(tmp_path)
    expected = model.module.apply({"params": model.params}, jnp.asarray(ids), method=lambda m, x: m.model(x)[0])
    assert max_abs(base(ids).last_hidden_state, expected) < 1e-5


def test_tied_embeddings_without_lm_head(tmp_path):
    state = load_file(str(TINY / "model.safetensors"))
    state.pop("lm_head.weight")
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = AutoConfig.from_pretrained(TINY)
    cfg.tie_word_embeddings = True
    cfg.save_pretrained(tmp_path)
    model = FlaxNucleusXForCausalLM.from_pretrained(tmp_path, from_pt=True)
    assert "lm_head" not in model.params
    ids = load_cases("nucleus_x_tiny")["input_ids"]
    hidden = FlaxNucleusXModel.from_pretrained(tmp_path, from_pt=True)(ids).last_hidden_state
    expected = np.asarray(hidden) @ state["model.embed_tokens.weight"].T
    assert max_abs(model(ids).logits, expected) < 1e-5


def test_missing_and_wrong_keys_are_errors(tmp_path):
    state = load_file(str(TINY / "model.safetensors"))
    state.pop("model.layers.1.ffn.fc2.weight")
    state["model.layers.0.ffn.fc1.weight"] = state["model.layers.0.ffn.fc1.weight"][:10]
    state["model.extra.weight"] = np.zeros(3, np.float32)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    AutoConfig.from_pretrained(TINY).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as err:
        FlaxNucleusXForCausalLM.from_pretrained(tmp_path, from_pt=True)
    msg = str(err.value)
    assert "model.layers.1.ffn.fc2.weight" in msg and "model.extra.weight" in msg
    assert "model.layers.0.ffn.fc1.weight: checkpoint [10, 64], config expects [96, 64]" in msg


def test_bf16_compute_with_fp32_params():
    ref = FlaxAutoModelForCausalLM.from_pretrained(TINY, from_pt=True)
    bf16 = FlaxAutoModelForCausalLM.from_pretrained(TINY, from_pt=True, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16.params))
    c = load_cases("nucleus_x_tiny")
    for mode in ("parallel", "chunkwise", "recurrent"):
        out = bf16(c["input_ids"], forward_mode=mode, use_cache=True)
        assert out.logits.dtype == jnp.bfloat16
        assert all(s.kv.dtype == jnp.float32 for s in out.past_key_values)
        assert_close(out.logits, ref(c["input_ids"], forward_mode=mode).logits, BF16_LOGITS, mode)


def test_dropout_and_drop_path_only_in_training():
    cfg = small_config(dropout=0.2, activation_dropout=0.2, drop_path_rate=0.5)
    model = FlaxNucleusXForCausalLM(cfg, seed=1)
    clean = FlaxNucleusXForCausalLM(small_config(), seed=1)
    ids = np.arange(1, 9)[None]
    eval_logits = model(ids).logits
    np.testing.assert_allclose(eval_logits, clean(ids, params=model.params).logits, atol=1e-6)
    a = model(ids, train=True, dropout_rng=jax.random.key(0)).logits
    b = model(ids, train=True, dropout_rng=jax.random.key(0)).logits
    c = model(ids, train=True, dropout_rng=jax.random.key(1)).logits
    np.testing.assert_array_equal(a, b)
    assert max_abs(a, eval_logits) > 1e-3 and max_abs(a, c) > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = small_config()
    plain = FlaxNucleusXForCausalLM(cfg, seed=3)
    remat = FlaxNucleusXForCausalLM(cfg, seed=3, gradient_checkpointing=True)
    ids = np.arange(1, 11)[None] % 60

    def grads(model):
        return jax.grad(lambda p: model(ids, labels=ids, params=p).loss)(model.params)

    for x, y in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(remat))):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_sequence_classification_head_initialised_from_a_causal_lm_checkpoint():
    model = FlaxNucleusXForSequenceClassification.from_pretrained(TINY, from_pt=True, num_labels=4)
    assert model.params["score"]["kernel"].shape == (64, 4)
    lm = FlaxNucleusXForCausalLM.from_pretrained(TINY, from_pt=True)
    for x, y in zip(jax.tree.leaves(model.params["model"]), jax.tree.leaves(lm.params["model"])):
        np.testing.assert_array_equal(x, y)


def test_config_defaults_for_hidden_states_and_return_dict_and_module_names():
    """transformers' common Flax conventions: config.output_hidden_states / config.return_dict apply when the
    call does not pass them; FlaxNucleusXModule sits beside FlaxNucleusXModel; unknown options are errors."""
    import nucleusx_jax.hf as hf

    cfg = small_config(output_hidden_states=True, return_dict=False)
    model = FlaxNucleusXModel(cfg, seed=0)
    out = model(np.arange(1, 6)[None])
    assert isinstance(out, tuple) and len(out) == 2  # (last_hidden_state, hidden_states): no cache asked for
    assert len(out[1]) == cfg.decoder_layers + 1
    assert model(np.arange(1, 6)[None], output_hidden_states=False, return_dict=True).hidden_states is None
    assert FlaxNucleusXModel.module_class is hf.FlaxNucleusXModule
    assert FlaxNucleusXForCausalLM.module_class is hf.FlaxNucleusXForCausalLMModule
    with pytest.raises(TypeError, match="gradient_checkpoint"):
        FlaxNucleusXForCausalLM(small_config(), gradient_checkpoint=True)


# --------------------------------------------------------------------------- the adapter over the core
# tests/test_parity.py checks the core (nucleusx_jax.from_pretrained) against the reference; these check that the
# adapter's loading (Auto classes, from_pt, .bin, config overrides, each head) and its outputs are the core's.
def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_causal_lm_adapter_is_the_core(name, tmp_path):
    c = load_cases(name)
    ids = c["input_ids"]
    core = nucleusx_jax.from_pretrained(FIXTURES / name)
    model = FlaxAutoModelForCausalLM.from_pretrained(FIXTURES / name, from_pt=True)
    assert isinstance(model, FlaxNucleusXForCausalLM)
    assert_same_tree(model.params, core.params)
    for kw in (dict(forward_mode="parallel"), dict(forward_mode="chunkwise", recurrent_chunk_size=5),
               dict(forward_mode="recurrent"), dict(attention_mask=c["lp_attention_mask"], forward_mode="parallel")):
        x = c["lp_input_ids"] if "attention_mask" in kw else ids
        got, want = model(x, use_cache=True, **kw), core(x, use_cache=True, **kw)
        np.testing.assert_array_equal(got.logits, want.logits)
        assert_same_tree(got.past_key_values, want.past_key_values)
    assert_close(model(ids, forward_mode="parallel").logits, c["logits_parallel"], LOGITS)
    p = int(c["prefill_len"])  # the adapter's cache continues in recurrent mode
    pre = model(ids[:, :p], forward_mode="parallel", use_cache=True)
    cont = model(ids[:, p:], forward_mode="recurrent", past_key_values=pre.past_key_values, use_cache=True)
    assert_close(cont.logits, c["logits_parallel_prefill_then_recurrent"], LOGITS)
    assert_close(float(model(ids, labels=ids).loss), float(c["lm_loss"]), LOSS)
    with pytest.raises(ValueError, match="only used by forward_mode='recurrent'"):  # the core's checks apply
        model(ids, forward_mode="parallel", past_key_values=pre.past_key_values)

    reference = FlaxAutoModelForCausalLM.from_pretrained(FIXTURES / name, from_pt=True,
                                                         chunkwise_normalization="reference")
    assert (reference.config.chunkwise_normalization, model.config.chunkwise_normalization) == ("reference", "exact")
    out = reference(ids, forward_mode="chunkwise", recurrent_chunk_size=int(c["chunk_size_div"]))
    assert_close(out.logits, c["logits_chunkwise_div"], LOGITS)
    mz = FlaxAutoModelForCausalLM.from_pretrained(FIXTURES / name, from_pt=True, z_loss_coeff=float(c["z_loss_coeff"]))
    assert mz.config.z_loss_coeff == pytest.approx(float(c["z_loss_coeff"]))
    assert_close(float(mz(ids, labels=ids).loss), float(c["lm_loss_z"]), LOSS)

    shutil.copy(FIXTURES / name / "config.json", tmp_path / "config.json")  # a directory with only the .bin
    shutil.copy(FIXTURES / name / "pytorch_model.bin", tmp_path / "pytorch_model.bin")
    assert_same_tree(FlaxNucleusXForCausalLM.from_pretrained(tmp_path, from_pt=True).params, core.params)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_base_and_classification_adapters_are_the_core(name, tmp_path):
    c = load_cases(name)
    ids = c["input_ids"]
    base = FlaxNucleusXModel.from_pretrained(FIXTURES / name, from_pt=True)
    core = nucleusx_jax.from_pretrained(FIXTURES / name, head="base")
    assert_same_tree(base.params, core.params)
    out = base(ids, forward_mode="parallel", output_hidden_states=True)
    want = core(ids, forward_mode="parallel", output_hidden_states=True)
    np.testing.assert_array_equal(out.last_hidden_state, want.last_hidden_state)
    assert len(out.hidden_states) == base.config.decoder_layers + 1
    assert_same_tree(out.hidden_states, want.hidden_states)
    assert_close(out.last_hidden_state, c["last_hidden_state_parallel"], LOGITS)

    directory = write_seqcls_dir(name, tmp_path)
    m = FlaxNucleusXForSequenceClassification.from_pretrained(directory, from_pt=True)
    core = nucleusx_jax.from_pretrained(directory, head="sequence_classification")
    assert m.config.num_labels == 3
    assert_same_tree(m.params, core.params)
    lp = m(c["lp_input_ids"], attention_mask=c["lp_attention_mask"])
    np.testing.assert_array_equal(lp.logits, core(c["lp_input_ids"], attention_mask=c["lp_attention_mask"]).logits)
    assert_close(lp.logits, c["seqcls_lp_logits"], LOGITS)
    assert_close(float(m(ids, labels=c["seqcls_labels"]).loss), float(c["seqcls_loss"]), LOSS)
