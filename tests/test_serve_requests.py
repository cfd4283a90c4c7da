"""Request handling of the HTTP API that needs no decoding, in-process (FastAPI's TestClient, no port): the
refused combinations of fields, and the prompt a chat request hands the engine when the tokenizer has a chat
template. The engine is never started; a spy on ``submit`` records the prompt and answers "queue full"."""

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("transformers", exc_type=ImportError)
from fastapi.testclient import TestClient  # noqa: E402

from nucleusx_jax import NucleusX, NucleusXConfig  # noqa: E402
from nucleusx_jax.serve import Engine, create_app, load_backend  # noqa: E402
from nucleusx_jax.serve.engine import QueueFull  # noqa: E402
from nucleusx_jax.tokenizer import load_tokenizer, save_hf_tokenizer, train_tokenizer  # noqa: E402

NAME = "tiny"
# renders each message as <|role|>content, then the assistant's turn
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(TestClient of the API over an unstarted engine, the HF tokenizer with TEMPLATE, the prompts submitted)."""
    d = tmp_path_factory.mktemp("requests")
    model_file = train_tokenizer(["builtin:pydoc"], str(d / "sp"), 512, max_sentences=3000)
    save_hf_tokenizer(model_file, str(d / "model"))
    config_file = d / "model" / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "chat_template": TEMPLATE}))
    NucleusX(NucleusXConfig(vocab_size=512, decoder_embed_dim=16, decoder_value_embed_dim=16,
                            decoder_ffn_embed_dim=24, decoder_layers=1, decoder_retention_heads=2), seed=0
             ).save_pretrained(d / "model")
    tokenizer = load_tokenizer(str(d / "model"))
    engine = Engine(load_backend(str(d / "model")), max_batch=1, max_queue=1, max_prompt_tokens=256,
                    max_new_tokens=16)
    submitted = []

    def spy(prompt, params, on_event):
        submitted.append(list(prompt))
        raise QueueFull("spy: full")

    engine.submit = spy
    with TestClient(create_app(engine, tokenizer, NAME)) as client:
        yield client, tokenizer, submitted


def error_of(response, status=400):
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_max_tokens_and_max_completion_tokens_together_are_refused(app):
    client, _, submitted = app
    body = {"model": NAME, "messages": MESSAGES, "max_tokens": 4, "max_completion_tokens": 5}
    err = error_of(client.post("/v1/chat/completions", json=body))
    assert err["param"] == "max_completion_tokens" and "not both" in err["message"]
    for field in ("max_tokens", "max_completion_tokens"):  # either alone is taken
        del submitted[:]
        one = {k: v for k, v in body.items() if k != field}
        assert error_of(client.post("/v1/chat/completions", json=one), 429)["type"] == "rate_limit_error"
        assert len(submitted) == 1


def test_echo_with_logprobs_is_refused(app):
    client, _, submitted = app
    del submitted[:]
    err = error_of(client.post("/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2,
                                                         "echo": True, "logprobs": 1}))
    assert err["param"] == "echo" and "logprobs" in err["message"]
    assert submitted == []
    for alone in ({"echo": True}, {"logprobs": 1}):
        error_of(client.post("/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2, **alone}), 429)


def test_chat_prompt_is_the_tokenizers_chat_template(app):
    """The ids the engine gets are the template rendered (here, by hand) and tokenized without added BOS."""
    client, tokenizer, submitted = app
    del submitted[:]
    error_of(client.post("/v1/chat/completions", json={"model": NAME, "messages": MESSAGES, "max_tokens": 2}), 429)
    rendered = "".join(f"<|{m['role']}|>{m['content']}\n" for m in MESSAGES) + "<|assistant|>"
    assert submitted == [tokenizer.tok.encode(rendered, add_special_tokens=False)]
