"""Chunkwise retention never builds a T x T array: XLA's compiled memory stays linear in T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nucleusx_jax import NucleusX, NucleusXConfig
from nucleusx_jax.modeling import RunOptions

T = 32768


@pytest.fixture(scope="module")
def model():
    cfg = NucleusXConfig(vocab_size=64, decoder_embed_dim=16, decoder_value_embed_dim=16, decoder_ffn_embed_dim=32,
                         decoder_layers=1, decoder_retention_heads=2, recurrent_chunk_size=64)
    return NucleusX(cfg, seed=0)


def compiled_bytes(model, mode: str, length: int) -> int:
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    options = RunOptions.from_config(model.config, mode=mode, chunk_size=64)
    fn = lambda p, x: model.module.apply({"params": p}, x, options=options)[0]  # noqa: E731
    stats = jax.jit(fn).lower(model.params, ids).compile().memory_analysis()
    return stats.temp_size_in_bytes + stats.output_size_in_bytes


@pytest.mark.slow
def test_chunkwise_memory_is_linear_in_length(model):
    # A linear bound: 4 KiB per token covers every [T, width] activation of this model (widths <= 64
    # floats, plus the [T, C=64] intra-chunk scores per head) with room to spare; T x T floats per head
    # would be 128 KiB per token.
    bound = 4096 * T
    chunk = compiled_bytes(model, "chunkwise", T)
    assert chunk < bound, chunk
    assert compiled_bytes(model, "chunkwise", T // 4) * 3 < chunk  # grows with T, and not quadratically
    parallel = compiled_bytes(model, "parallel", T)
    assert parallel > bound, parallel
