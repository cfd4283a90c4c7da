"""NucleusXConfig: the reference's fields and defaults, config.json interchange, validation."""

import json

import pytest

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


OUR_EXTRA_FIELDS = {"retention_impl", "chunkwise_normalization", "scan_layers"}


def hf_config_class():
    """The transformers adapter's config class (the test is skipped without transformers)."""
    pytest.importorskip("transformers", exc_type=ImportError)
    from nucleusx_jax.hf import NucleusXConfig as HFNucleusXConfig

    return HFNucleusXConfig


@pytest.mark.parametrize("adapter", [False, True], ids=["core", "hf"])
def test_defaults_and_attribute_map(adapter):
    cfg = hf_config_class()() if adapter else NucleusXConfig()
    for field, value in REFERENCE_DEFAULTS.items():
        assert getattr(cfg, field) == value, field
    assert (cfg.hidden_size, cfg.intermediate_size) == (4096, 6912)
    assert (cfg.num_attention_heads, cfg.num_hidden_layers) == (16, 32)
    assert cfg.model_type == "nucleus_x"


@pytest.mark.parametrize("adapter", [False, True], ids=["core", "hf"])
def test_reference_config_json_loads_unchanged_and_round_trips(tmp_path, adapter):
    path = FIXTURES / "nucleus_x_tiny" / "config.json"
    reference = json.loads(path.read_text())
    if adapter:
        hf_class = hf_config_class()
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path.parent)
        from nucleusx_jax.hf import to_core

        assert isinstance(cfg, hf_class) and isinstance(to_core(cfg), NucleusXConfig)
    else:
        cfg = NucleusXConfig.from_pretrained(path.parent)
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
@pytest.mark.parametrize("adapter", [False, True], ids=["core", "transformers"])
def test_invalid_values_name_field_value_and_allowed(kwargs, field, adapter):
    """The core config and the transformers one (shared by the Flax adapter and the PyTorch remote code) refuse
    the same values the same way."""
    with pytest.raises(ValueError) as err:
        (hf_config_class() if adapter else NucleusXConfig)(**kwargs)
    message = str(err.value)
    assert field in message and "must" in message
    assert repr(kwargs[field]) in message


def test_unknown_constructor_field_is_an_error_and_file_extras_are_kept(tmp_path):
    with pytest.raises(TypeError, match=r"unknown field\(s\) \['decoder_layer'\]"):
        NucleusXConfig(decoder_layer=3)
    cfg = NucleusXConfig(num_labels=3, problem_type="single_label_classification")
    assert cfg.num_labels == 3 and cfg.replace(decoder_layers=3).num_labels == 3
    data = dict(cfg.to_dict(), custom_tool_key=[1, 2])  # another tool's key: kept and written back
    (tmp_path / "config.json").write_text(json.dumps(data))
    again = NucleusXConfig.from_pretrained(tmp_path)
    assert again.to_dict() == data and again.custom_tool_key == [1, 2] and again == NucleusXConfig.from_dict(data)
    # what the sequence-classification reference config writes, read back the same
    seqcls = json.loads((FIXTURES / "nucleus_x_tiny" / "seqcls_config.json").read_text())
    loaded = NucleusXConfig.from_dict(seqcls)
    assert loaded.num_labels == 3 and loaded.problem_type == "single_label_classification"
    assert {k: v for k, v in loaded.to_dict().items() if k not in OUR_EXTRA_FIELDS} == seqcls


def test_the_transformers_config_knows_the_core_activations_and_fields():
    pytest.importorskip("transformers")
    from transformers.activations import ACT2FN

    from nucleusx_jax.activations import ACTIVATIONS
    from nucleusx_jax.configuration import MODEL_FIELDS
    from nucleusx_jax.remote_code import configuration_nucleus_x

    assert set(configuration_nucleus_x.ACTIVATIONS) == set(ACTIVATIONS) and set(ACTIVATIONS) <= set(ACT2FN)
    ours, core = hf_config_class()(), NucleusXConfig()
    assert {f: getattr(ours, f) for f in MODEL_FIELDS} == {f: getattr(core, f) for f in MODEL_FIELDS}


def test_auto_map_is_read_quietly_and_not_written_to_our_directories(tmp_path, caplog):
    """A PyTorch export's config.json names its shipped code in auto_map: a transformers key the core keeps,
    but our own directories hold no such code, so save_pretrained leaves it out."""
    data = dict(json.loads((FIXTURES / "nucleus_x_tiny" / "config.json").read_text()),
                auto_map={"AutoConfig": "configuration_nucleus_x.NucleusXConfig"})
    (tmp_path / "config.json").write_text(json.dumps(data))
    with caplog.at_level("WARNING"):
        cfg = NucleusXConfig.from_pretrained(tmp_path)
    assert cfg.auto_map == data["auto_map"] and "not NucleusX fields" not in caplog.text
    cfg.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in written and written == {k: v for k, v in cfg.to_dict().items() if k != "auto_map"}
