"""``python -m nucleusx_jax.serve``'s options, in-process: ``main`` runs with ``uvicorn.Server`` replaced by one
that drives the app of the config it was given with FastAPI's TestClient (no port). A PyTorch directory served in
bfloat16 under another name answers with the greedy tokens of offline ``generate`` on the same weights and
dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from nucleusx_jax import NucleusX, NucleusXConfig, from_pretrained  # noqa: E402
from nucleusx_jax import generate as gen  # noqa: E402
from nucleusx_jax.convert import convert  # noqa: E402
from nucleusx_jax.serve import cli  # noqa: E402
from nucleusx_jax.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402


def test_pytorch_dir_dtype_and_served_model_name(tmp_path, monkeypatch):
    sp = train_tokenizer(["builtin:pydoc"], str(tmp_path / "sp"), 512, max_sentences=2000)
    NucleusX(NucleusXConfig(vocab_size=512, decoder_embed_dim=32, decoder_value_embed_dim=32,
                            decoder_ffn_embed_dim=48, decoder_layers=2, decoder_retention_heads=2), seed=1
             ).save_pretrained(tmp_path / "flax")
    convert(str(tmp_path / "flax"), str(tmp_path / "torch"), "torch", progress=False)
    tok = load_tokenizer(sp)
    ids = [tok.bos_id] + tok.encode("def parse(text):")
    model = from_pretrained(tmp_path / "torch", dtype="bfloat16")
    want = gen.generate(model, np.asarray([ids]), max_new_tokens=8, eos_token_id=[])[0, len(ids):].tolist()
    seen = {}

    class Driver:  # stands in for uvicorn.Server: runs requests against the configured app, binds nothing
        def __init__(self, config):
            self.config = config

        def run(self):
            seen["address"] = (self.config.host, self.config.port)
            drive(self.config.app)

    def drive(app):
        with TestClient(app) as client:
            seen["models"] = [m["id"] for m in client.get("/v1/models").json()["data"]]
            r = client.post("/v1/completions", json={"model": "mine", "prompt": ids, "max_tokens": 8,
                                                     "temperature": 0, "ignore_eos": True, "return_token_ids": True})
            seen["tokens"] = r.json()["choices"][0]["token_ids"]
            seen["wrong_name"] = client.post("/v1/completions", json={"model": "torch", "prompt": ids}).status_code

    def load_backend(model_dir, dtype=None):  # the real one, observed
        seen["backend"] = real_load_backend(model_dir, dtype=dtype)
        return seen["backend"]

    real_load_backend = cli.load_backend
    monkeypatch.setattr(cli, "load_backend", load_backend)
    monkeypatch.setattr(cli.uvicorn, "Server", Driver)
    cli.main([str(tmp_path / "torch"), "--tokenizer", sp, "--dtype", "bfloat16", "--served-model-name", "mine",
              "--port", "8123", "--max-batch", "2"])
    assert seen["address"] == ("127.0.0.1", 8123)
    assert seen["backend"].module.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(seen["backend"].params))  # weights stay float32
    assert seen["models"] == ["mine"] and seen["wrong_name"] == 400
    assert seen["tokens"] == want
