"""Token stores of vocabularies over 65,536 ids: ``prepare`` writes ``uint32`` shards and reads back every id
unchanged (a tokenizer whose ids are moved past 65,535 stands in for a large vocabulary)."""

import json
import os

import numpy as np

from nucleusx_jax.data import prepare as prepare_module
from nucleusx_jax.data.prepare import PrepareOptions, prepare
from nucleusx_jax.data.store import TokenStore, token_dtype
from nucleusx_jax.tokenizer import load_tokenizer, train_tokenizer

SHIFT = 70_000


class Shifted:
    """A tokenizer with every id moved up by SHIFT: a vocabulary of SHIFT + V ids."""

    def __init__(self, tok):
        self.tok, self.vocab_size = tok, SHIFT + tok.vocab_size
        self.bos_id, self.eos_id = tok.bos_id + SHIFT, tok.eos_id + SHIFT
        self.fingerprint = tok.fingerprint + f"+{SHIFT}"

    def encode(self, text):
        return [i + SHIFT for i in self.tok.encode(text)]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


def test_token_dtype_fits_every_id():
    assert token_dtype(1 << 16) == "uint16"  # ids 0 .. 65535
    assert token_dtype((1 << 16) + 1) == "uint32"


def test_wide_vocabulary_store_is_uint32_and_exact(tmp_path, monkeypatch):
    sp_path = train_tokenizer(["builtin:pydoc"], str(tmp_path / "sp"), 512, max_sentences=2000)
    docs = [f"document {i}: " + "retention decay über λ " * (i % 7 + 1) for i in range(60)]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    monkeypatch.setattr(prepare_module, "load_tokenizer", lambda path, **kw: Shifted(load_tokenizer(path, **kw)))
    prepare_module._worker_tokenizer.cache_clear()
    try:
        store = prepare([str(source)], sp_path, str(tmp_path / "store"),
                        options=PrepareOptions(workers=0, shard_tokens=500, progress=False))
    finally:
        prepare_module._worker_tokenizer.cache_clear()
    tok = Shifted(load_tokenizer(sp_path))
    want = np.concatenate([[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in docs])
    assert store.index["dtype"] == "uint32" and store.index["vocab_size"] == SHIFT + 512
    again = TokenStore(str(tmp_path / "store"))
    assert again.dtype == np.uint32 and again.num_tokens == len(want) and len(again.shards) > 1
    np.testing.assert_array_equal(again.read(0, again.num_tokens), want)
    assert want.max() > 65535
    for s in again.shards:  # plain uint32 files of exactly their tokens
        assert os.path.getsize(tmp_path / "store" / s.file) == 4 * s.tokens
    assert again.verify() == []
