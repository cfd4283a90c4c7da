"""NucleusXConfig: the reference's fields and defaults, config.json interchange, validation."""

import json

import pytest
from transformers import AutoConfig

import nucleusx_jax  # noqa: F401
from nucleusx_jax import NucleusXConfig

from conftest import FIXTURES

# The reference NucleusXConfig.__init__ defaults (HF PR #27259, syncdoth/transformers@b624d05).
REFERENCE_DEFAULTS = dict(
    vocab_size=32000, initializer_factor=2**-2.5, initializer_range=0.02, lm_head_initializer_range=4096**-0.5,
    pad_token_id=None, bos_token_id=1, eos_token_id=2, use_cache=True, forward_mode="parallel",
    activation_fn="swish", dropout=0.0, activation_dropout=0.0, drop_path_rate=0.0, decoder_embed_dim=4096,
    decoder_value_embed_dim=6912, decoder_ffn_embed_dim=6912, decoder_layers=32, decoder_retention_heads=16,
    decoder_normalize_before=True, rms_norm_embedding=True, no_scale_embedding=False, recurrent_chunk_size=512,
    use_lm_decay=False, z_loss_coeff=0.0, deepnorm=False, rms_norm_eps=1e-6, groupnorm_eps=1e-6,
    tie_word_embeddings=False,
)


OUR_EXTRA_FIELDS = {"retention_impl"}


def test_defaults_and_attribute_map():
    cfg = NucleusXConfig()
    for field, value in REFERENCE_DEFAULTS.items():
        assert getattr(cfg, field) == value, field
    assert (cfg.hidden_size, cfg.intermediate_size) == (4096, 6912)
    assert (cfg.num_attention_heads, cfg.num_hidden_layers) == (16, 32)
    assert cfg.model_type == "nucleus_x"


def test_reference_config_json_loads_unchanged_and_round_trips(tmp_path):
    path = FIXTURES / "nucleus_x_tiny" / "config.json"
    reference = json.loads(path.read_text())
    cfg = AutoConfig.from_pretrained(path.parent)
    assert isinstance(cfg, NucleusXConfig)
    for key, value in reference.items():
        if key != "transformers_version":
            assert getattr(cfg, key) == value, key
    cfg.save_pretrained(tmp_path)
    ours = json.loads((tmp_path / "config.json").read_text())
    # the reference's keys and values, plus only our documented extras (the PyTorch NucleusXConfig keeps
    # unknown keys as plain attributes, so it loads this file)
    assert set(ours) - set(reference) <= OUR_EXTRA_FIELDS
    assert {k: v for k, v in ours.items() if k in reference and k != "transformers_version"} == \
        {k: v for k, v in reference.items() if k != "transformers_version"}


def test_deepnorm_switches_to_post_norm_like_the_reference():
    assert NucleusXConfig(deepnorm=True).decoder_normalize_before is False


@pytest.mark.parametrize("kwargs, field", [
    (dict(decoder_embed_dim=30, decoder_retention_heads=4), "decoder_embed_dim"),
    (dict(decoder_value_embed_dim=30, decoder_retention_heads=4), "decoder_value_embed_dim"),
    (dict(decoder_embed_dim=12, decoder_retention_heads=4), "decoder_embed_dim"),  # key head dim 3 is odd
    (dict(forward_mode="sideways"), "forward_mode"),
    (dict(activation_fn="not_an_activation"), "activation_fn"),
    (dict(recurrent_chunk_size=0), "recurrent_chunk_size"),
    (dict(dropout=1.0), "dropout"),
    (dict(activation_dropout=-0.1), "activation_dropout"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
])
def test_invalid_values_name_field_value_and_allowed(kwargs, field):
    with pytest.raises(ValueError) as err:
        NucleusXConfig(**kwargs)
    message = str(err.value)
    assert field in message and "must" in message
    assert repr(kwargs[field]) in message
