"""Generation: ``model.generate`` (FlaxGenerationMixin) and the compiled loop, streaming and the CLI.

Greedy tokens and step logits are checked against the PyTorch reference's ``generate`` (fixtures); the rest
against independent computations (teacher-forced log-probabilities, unpadded rows, the mixin itself).
"""

import io
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import sentencepiece as spm
from pydoc_data.topics import topics
from transformers import FlaxAutoModelForCausalLM

from nucleusx_jax import generate as gen
import nucleusx_jax.hf  # noqa: F401  (registers nucleus_x with the Auto classes)
from nucleusx_jax import decode, runtime

from conftest import count_traces

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NAMES = ["nucleus_x_tiny", "nucleus_x_tiny_large_weights"]
NEW = 12  # the fixtures' max_new_tokens
CHUNKWISE = dict(prompt_chunkwise_threshold=2, recurrent_chunk_size=4)  # a 9-token prompt runs chunkwise


@pytest.fixture(scope="module", params=NAMES)
def fx(request):
    """(model, cases) of one fixture."""
    path = os.path.join(FIXTURES, request.param)
    return FlaxAutoModelForCausalLM.from_pretrained(path, from_pt=True), np.load(os.path.join(path, "cases.npz"))


@pytest.fixture(scope="module")
def tiny():
    path = os.path.join(FIXTURES, NAMES[0])
    return FlaxAutoModelForCausalLM.from_pretrained(path, from_pt=True), np.load(os.path.join(path, "cases.npz"))


# ------------------------------------------------------------------------------------------ exactness
def test_mixin_greedy_equals_reference(fx):
    model, c = fx
    out = model.generate(c["gen_input_ids"], attention_mask=c["gen_attention_mask"], max_new_tokens=NEW,
                         do_sample=False)
    np.testing.assert_array_equal(np.asarray(out.sequences), c["gen_output_ids"])


def test_compiled_loop_greedy_and_logits_equal_reference(fx):
    model, c = fx
    seq, logits = gen.generate(model, c["gen_input_ids"], c["gen_attention_mask"], max_new_tokens=NEW,
                               output_logits=True)
    np.testing.assert_array_equal(seq, c["gen_output_ids"])
    assert logits.shape == c["gen_logits"].shape
    np.testing.assert_allclose(logits, c["gen_logits"], rtol=0, atol=2e-5)


def test_chunkwise_prompt_equals_parallel_prompt(tiny):
    model, c = tiny
    assert runtime.prompt_form(model.config, 9, chunk_size=4, threshold=2) == ("chunkwise", 4)
    assert runtime.prompt_form(model.config, 32) == ("parallel", 8)  # default threshold 4 x chunk 8
    assert runtime.prompt_form(model.config, 33) == ("chunkwise", 8)
    ids, mask = c["gen_input_ids"], c["gen_attention_mask"]
    parallel = gen.generate(model, ids, mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(gen.generate(model, ids, mask, max_new_tokens=NEW, **CHUNKWISE), parallel)
    mixin = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **CHUNKWISE)
    np.testing.assert_array_equal(np.asarray(mixin.sequences), parallel)


def test_left_padded_row_equals_the_row_alone(tiny):
    model, c = tiny
    ids, mask = c["gen_input_ids"], c["gen_attention_mask"]
    alone = ids[1:, mask[1] == 1]
    batched = gen.generate(model, ids, mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(gen.generate(model, alone, max_new_tokens=NEW)[0, -NEW:], batched[1, -NEW:])


def test_sampling_is_reproducible_and_matches_the_mixin(tiny):
    model, c = tiny
    ids, mask = c["gen_input_ids"], c["gen_attention_mask"]
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=0.8, top_k=40, top_p=0.95)
    a = gen.generate(model, ids, mask, prng_key=jax.random.PRNGKey(7), **kw)
    np.testing.assert_array_equal(gen.generate(model, ids, mask, prng_key=jax.random.PRNGKey(7), **kw), a)
    assert not np.array_equal(gen.generate(model, ids, mask, prng_key=jax.random.PRNGKey(8), **kw), a)
    mixin = model.generate(ids, attention_mask=mask, prng_key=jax.random.PRNGKey(7), **kw)
    np.testing.assert_array_equal(np.asarray(mixin.sequences), a)


def test_beam_search_shape_and_scores_match_teacher_forcing(tiny):
    """Beam scores (length_penalty 0: summed log-probs) come from the reordered states; re-scoring each
    returned sequence in one parallel pass must give the same numbers."""
    model, c = tiny
    ids, mask = c["gen_input_ids"], c["gen_attention_mask"]
    beams, new = 3, 6
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, num_beams=beams, num_return_sequences=beams,
                         length_penalty=0.0)
    seq, scores = np.asarray(out.sequences), np.asarray(out.scores).reshape(-1)
    assert seq.shape == (ids.shape[0] * beams, ids.shape[1] + new)
    full_mask = np.concatenate([np.repeat(mask, beams, 0), np.ones((len(seq), new), mask.dtype)], 1)
    logp = jax.nn.log_softmax(np.asarray(model(seq, attention_mask=full_mask).logits[:, ids.shape[1] - 1:-1]), -1)
    forced = np.take_along_axis(np.asarray(logp), seq[:, ids.shape[1]:, None], -1)[..., 0].sum(1)
    running = ~np.isin(seq[:, ids.shape[1]:], [model.config.eos_token_id, model.config.pad_token_id]).any(1)
    assert running.sum() >= beams  # rows that ended with EOS carry another normalisation
    np.testing.assert_allclose(forced[running], scores[running], rtol=1e-5, atol=1e-4)


def test_one_token_prompt(tiny):
    model, c = tiny
    ids = c["gen_input_ids"][:, -1:]
    mixin = np.asarray(model.generate(ids, max_new_tokens=4).sequences)
    np.testing.assert_array_equal(gen.generate(model, ids, max_new_tokens=4), mixin)


# --------------------------------------------------------------------------- constant state, compile once
def test_state_is_fixed_size_and_step_compiles_once(tiny):
    model, c = tiny
    options = gen.decode_options(model)
    shapes = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s.cache)  # noqa: E731
    short = gen.prefill(model, c["gen_input_ids"][:, :3], options=options)
    long = gen.prefill(model, np.tile(c["gen_input_ids"], (1, 8)), options=options)  # 72 tokens, chunkwise
    assert shapes(short) == shapes(long)
    fns = decode.compiled(model)
    tokens = list(gen.stream(model, c["gen_input_ids"], c["gen_attention_mask"], max_new_tokens=NEW))
    with count_traces() as traces:
        again = list(gen.stream(model, c["gen_input_ids"][::-1].copy(), c["gen_attention_mask"][::-1].copy(),
                                max_new_tokens=NEW))
    assert traces == []  # same shapes: nothing (prefill, step) is traced again
    assert len(tokens) == len(again) == NEW and all(t.shape == (2,) for t in tokens)
    np.testing.assert_array_equal(np.stack(tokens, 1), c["gen_output_ids"][:, -NEW:])
    step = fns.step(model.params, long, options=options)
    assert shapes(step) == shapes(short)


@pytest.mark.slow
def test_stream_yields_before_the_rest_is_computed_and_stops_at_eos(tiny):
    model, c = tiny
    ids = c["gen_input_ids"][:1]
    it = gen.stream(model, ids, max_new_tokens=NEW)
    first = next(it)
    assert first.shape == (1,) and first[0] == c["gen_output_ids"][0, ids.shape[1]]
    # EOS = the 3rd greedy token: the stream ends there, the compiled loop pads after it like the mixin.
    eos = int(c["gen_output_ids"][0, ids.shape[1] + 2])
    assert len(list(gen.stream(model, ids, max_new_tokens=NEW, eos_token_id=eos))) == 3
    seq = gen.generate(model, ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    mixin = model.generate(ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0).sequences
    np.testing.assert_array_equal(seq, np.asarray(mixin))
    assert (seq[0, ids.shape[1] + 3:] == 0).all()


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", ["empty", "max_new_tokens", "mask_shape", "vocab"])
def test_bad_input_raises(tiny, case):
    model, c = tiny
    ids, mask, new = c["gen_input_ids"], c["gen_attention_mask"], 4
    match = {"empty": "empty", "max_new_tokens": "max_new_tokens", "mask_shape": "attention_mask",
             "vocab": "outside"}[case]
    if case == "empty":
        ids, mask = ids[:, :0], mask[:, :0]
    elif case == "max_new_tokens":
        new = 0
    elif case == "mask_shape":
        mask = mask[:, 1:]
    else:
        ids = ids.copy()
        ids[0, 3] = model.config.vocab_size
    with pytest.raises(ValueError, match=match):
        gen.generate(model, ids, mask, max_new_tokens=new)
    with pytest.raises(ValueError, match=match):
        gen.stream(model, ids, mask, max_new_tokens=new)
    with pytest.raises(ValueError, match=match):
        model.generate(ids, attention_mask=mask, max_new_tokens=new)


def test_bad_sampling_options_raise():
    with pytest.raises(ValueError, match="top_p"):
        gen.DecodeOptions(do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        gen.DecodeOptions(do_sample=True, temperature=0.0)


# ------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A 200-piece SentencePiece model trained here on Python's own help texts."""
    lines = [line for name in sorted(topics)[:40] for line in topics[name].splitlines() if line.strip()][:600]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=200, model_type="bpe",
                                   character_coverage=0.995, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(out.getvalue())
    return str(path)


def _expected_completion(model, sp_path, prompt, new):
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    seq = gen.generate(model, np.asarray([[sp.bos_id()] + sp.encode(prompt)]), max_new_tokens=new,
                       eos_token_id=sp.eos_id(), pad_token_id=sp.eos_id())[0]
    new_ids = seq[-new:]
    if sp.eos_id() in new_ids:
        new_ids = new_ids[: list(new_ids).index(sp.eos_id())]
    return sp.decode([int(i) for i in new_ids])


@pytest.mark.slow
def test_cli_streams_from_a_flax_directory(tiny, sp_model, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path)
    shutil.copy(sp_model, tmp_path / "tokenizer.model")
    assert (tmp_path / "flax_model.msgpack").exists()
    out = io.StringIO()
    text = gen.main([str(tmp_path), "--prompt", "The return statement", "--max-new-tokens", "10"], out=out)
    assert text == _expected_completion(model, sp_model, "The return statement", 10)
    assert out.getvalue() == text + "\n" and len(text) > 0


@pytest.mark.slow
def test_cli_streams_from_a_torch_directory_as_a_module(tiny, sp_model):
    model, _ = tiny
    prompt = "Assignment statements"
    proc = subprocess.run(
        [sys.executable, "-m", "nucleusx_jax.generate", os.path.join(FIXTURES, NAMES[0]), "--tokenizer", sp_model,
         "--prompt", prompt, "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=300, cwd=os.path.dirname(FIXTURES) + "/..",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == _expected_completion(model, sp_model, prompt, 8) + "\n"


def test_text_streamer_holds_back_incomplete_utf8():
    pieces = {1: b"a", 2: b"\xc3", 3: b"\xa9", 4: b"b"}  # "a", then the two bytes of "é", then "b"
    stream = gen.TextStreamer(lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace"))
    assert [stream.push(i) for i in (1, 2, 3, 4)] == ["a", "", "é", "b"]


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8),
                                                       (1.3, 40, 0.95), (1.0, 300, 0.5)])
def test_sampling_filters_equal_transformers_warpers(temperature, top_k, top_p):
    """The runtime's temperature / top-k / top-p give transformers 4.x's Flax warpers' scores exactly (ties
    included: integer-valued logits), hence the same sampled tokens for a key."""
    from transformers.generation import FlaxTemperatureLogitsWarper, FlaxTopKLogitsWarper, FlaxTopPLogitsWarper

    from nucleusx_jax import decode

    rng = np.random.default_rng(0)
    logits = jax.numpy.asarray(np.concatenate([rng.normal(size=(3, 256)), rng.integers(-3, 3, (2, 256))]),
                               jax.numpy.float32)
    want = logits
    if temperature != 1.0:
        want = FlaxTemperatureLogitsWarper(temperature)(None, want, 0)
    if top_k:
        want = FlaxTopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1)(None, want, 0)
    if top_p < 1.0:
        want = FlaxTopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1)(None, want, 0)
    options = decode.DecodeOptions(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    got = logits / temperature if temperature != 1.0 else logits
    got = runtime.filter_logits(got, top_k, top_p)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(options.choose(logits, key), jax.random.categorical(key, want, axis=-1))
