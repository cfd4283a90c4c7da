"""Bad input raises a clear ValueError before anything is compiled."""

import numpy as np
import pytest

from nucleusx_jax import NucleusX, NucleusXConfig


@pytest.fixture(scope="module")
def model():
    cfg = NucleusXConfig(vocab_size=50, decoder_embed_dim=16, decoder_value_embed_dim=16, decoder_ffn_embed_dim=24,
                         decoder_layers=2, decoder_retention_heads=2, recurrent_chunk_size=4, pad_token_id=0)
    return NucleusX(cfg, seed=0)


IDS = np.array([[1, 2, 3, 4]])


@pytest.mark.parametrize("ids, match", [
    (np.array([[1, 50, 3]]), r"outside \[0, vocab_size=50\).*50"),
    (np.array([[1, -1, 3]]), r"outside \[0, vocab_size=50\).*-1"),
    (np.array([1, 2, 3]), r"rank 2"),
    (np.ones((1, 2, 3), int), r"rank 2"),
    (np.zeros((1, 0), int), r"empty"),
    (np.array([[1.0, 2.0]]), r"integer"),
])
def test_bad_input_ids(model, ids, match):
    with pytest.raises(ValueError, match=match):
        model(ids)


def test_attention_mask_shape(model):
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\).*\(1, 4\)"):
        model(IDS, attention_mask=np.ones((1, 3), int))


def test_unknown_forward_mode(model):
    with pytest.raises(ValueError, match="forward_mode='sideways'.*parallel, chunkwise, recurrent"):
        model(IDS, forward_mode="sideways")


def test_bad_chunk_size(model):
    with pytest.raises(ValueError, match="recurrent_chunk_size=0"):
        model(IDS, forward_mode="chunkwise", recurrent_chunk_size=0)


def test_labels_shape(model):
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model(IDS, labels=IDS[:, :2])


def test_past_from_a_different_config(model):
    other_cfg = NucleusXConfig(vocab_size=50, decoder_embed_dim=32, decoder_value_embed_dim=16,
                               decoder_ffn_embed_dim=24, decoder_layers=2, decoder_retention_heads=2)
    other = NucleusX(other_cfg, seed=0)
    past = other(IDS, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="different config"):
        model(IDS[:, :1], forward_mode="recurrent", past_key_values=past)
    deeper = NucleusXConfig(vocab_size=50, decoder_embed_dim=16, decoder_value_embed_dim=16,
                            decoder_ffn_embed_dim=24, decoder_layers=3, decoder_retention_heads=2)
    past3 = NucleusX(deeper, seed=0)(IDS, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="3 layers but this model has decoder_layers=2"):
        model(IDS[:, :1], forward_mode="recurrent", past_key_values=past3)


def test_past_with_a_non_recurrent_mode(model):
    past = model(IDS, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="only used by forward_mode='recurrent'"):
        model(IDS, forward_mode="parallel", past_key_values=past)


def test_train_with_dropout_needs_a_key():
    cfg = NucleusXConfig(vocab_size=50, decoder_embed_dim=16, decoder_value_embed_dim=16, decoder_ffn_embed_dim=24,
                         decoder_layers=1, decoder_retention_heads=2, dropout=0.1)
    with pytest.raises(ValueError, match="dropout_rng"):
        NucleusX(cfg)(IDS, train=True)
