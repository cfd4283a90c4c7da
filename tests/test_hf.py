"""HF Flax integration: Auto registration, save/load, tied embeddings, dtypes, dropout, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig, FlaxAutoModel, FlaxAutoModelForCausalLM, FlaxAutoModelForSequenceClassification

from nucleusx_jax.hf import (FlaxNucleusXForCausalLM, FlaxNucleusXForSequenceClassification, FlaxNucleusXModel,
                             NucleusXConfig)
from nucleusx_jax.weights import CheckpointError

from conftest import FIXTURES, Tol, assert_close, load_cases, max_abs

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
