"""The runtime (``nucleusx_jax.runtime``): its passes and cache operations against the parallel pass of the
whole sequence, its prompt policy, its sampler's one meaning of each setting (shared or per row), and its
pure passes lowered from abstract arguments alone (no model object, no parameters on a device)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nucleusx_jax import NucleusX, NucleusXConfig, decode, runtime
from nucleusx_jax.modeling import NucleusXForCausalLMModule

EXACT = 2e-5  # the bound for "prefill in any form, then recurrent decoding, equals the parallel pass"


@pytest.fixture(scope="module")
def model():
    cfg = NucleusXConfig(vocab_size=64, decoder_embed_dim=16, decoder_value_embed_dim=24, decoder_ffn_embed_dim=24,
                         decoder_layers=2, decoder_retention_heads=2, recurrent_chunk_size=4, pad_token_id=0,
                         use_lm_decay=True)
    return NucleusX(cfg, seed=1)


def parallel_logits(model, row):
    """The parallel pass of one unpadded row ``[T]`` -> logits ``[T, V]`` (the independent reference)."""
    return np.asarray(model(np.asarray([row]), forward_mode="parallel").logits[0])


ROWS = [[5, 9, 3, 7, 2, 8, 6, 1, 4, 11], [12, 13, 14, 15, 16, 17, 18, 19]]
PROMPTS = [6, 3]  # row 1's prompt is left-padded


@pytest.mark.parametrize("mode, chunk_size", [("parallel", 4), ("chunkwise", 4), ("chunkwise", 3)])
def test_left_padded_prefill_then_recurrent_equals_the_parallel_pass(model, mode, chunk_size):
    """Prompts padded on the left, one prefill, rows taken (repeated, reordered), then a recurrent pass of 3
    tokens and one step: every logit equals the parallel pass of the unpadded row."""
    ids, mask = runtime.pad_left([r[:p] for r, p in zip(ROWS, PROMPTS)], 8, 2, 0)
    first, cache = runtime.prefill(model.module, model.params, jnp.asarray(ids), jnp.asarray(mask), mode=mode,
                                   chunk_size=chunk_size)
    rows = [1, 0, 1]
    cache = runtime.take_rows(cache, jnp.asarray(rows))
    cids, cmask = runtime.pad_right([ROWS[r][PROMPTS[r]:PROMPTS[r] + 3] for r in rows], 3, 3, 0)
    logits, cache = runtime.recurrent(model.module, model.params, jnp.asarray(cids), jnp.asarray(cmask), cache)
    nxt, _ = runtime.step(model.module, model.params, jnp.asarray([ROWS[r][PROMPTS[r] + 3] for r in rows]),
                          jnp.asarray([True] * 3), cache)
    for n, r in enumerate(rows):
        p, want = PROMPTS[r], parallel_logits(model, ROWS[r][:PROMPTS[r] + 4])
        np.testing.assert_allclose(np.asarray(first)[r], want[p - 1], rtol=0, atol=EXACT)
        np.testing.assert_allclose(np.asarray(logits)[n, :3], want[p:p + 3], rtol=0, atol=EXACT)
        np.testing.assert_allclose(np.asarray(nxt)[n], want[p + 3], rtol=0, atol=EXACT)


def test_right_padded_slot_prompt_put_into_a_slot_steps_like_the_parallel_pass(model):
    """The server's policy: a one-row prompt right-padded to its bucket, its state put into a slot at the real
    length beside other slots; a step of every slot gives that row the parallel pass's next logits, and an
    inactive slot keeps its state."""
    prefix = ROWS[0][:5]
    length = runtime.bucket(len(prefix), 8)
    assert length == 8 and runtime.bucket(9, 8) == 16 and runtime.bucket(1) == 1
    ids, mask = runtime.pad_right([prefix], length, 1, 0)
    mode, chunk_size = runtime.prompt_form(model.config, length)
    _, state = runtime.prefill(model.module, model.params, jnp.asarray(ids), jnp.asarray(mask), mode=mode,
                               chunk_size=chunk_size, logits=False)
    slots = runtime.empty_cache(model.config, 3, per_row=True)
    assert all(s.seqlen.shape == (3,) for s in slots)
    slots = runtime.put_row(slots, 1, state, jnp.int32(len(prefix)))
    logits, after = runtime.step(model.module, model.params, jnp.asarray([3, ROWS[0][5], 3]),
                                 jnp.asarray([False, True, False]), slots)
    want = parallel_logits(model, ROWS[0][:6])[-1]
    np.testing.assert_allclose(np.asarray(logits)[1], want, rtol=0, atol=EXACT)
    assert int(after[0].seqlen[1]) == len(prefix) + 1
    for s, before in zip(after, slots):
        np.testing.assert_array_equal(np.asarray(s.kv)[[0, 2]], np.asarray(before.kv)[[0, 2]])
        np.testing.assert_array_equal(np.asarray(s.scale)[[0, 2]], np.asarray(before.scale)[[0, 2]])


def test_prompt_form_and_padding():
    cfg = NucleusXConfig(recurrent_chunk_size=8)
    assert runtime.prompt_form(cfg, 32) == ("parallel", 8) and runtime.prompt_form(cfg, 33) == ("chunkwise", 8)
    assert runtime.prompt_form(cfg, 9, chunk_size=4, threshold=8) == ("chunkwise", 4)
    with pytest.raises(ValueError, match="prompt_chunkwise_threshold=0 is invalid"):
        runtime.prompt_form(cfg, 9, threshold=0)
    ids, mask = runtime.pad_left([[1, 2], [3]], 3, 3, 0)
    np.testing.assert_array_equal(ids, [[0, 1, 2], [0, 0, 3], [0, 1, 2]])
    np.testing.assert_array_equal(mask, [[0, 1, 1], [0, 0, 1], [0, 1, 1]])
    ids, mask = runtime.pad_right([[1, 2], [3]], 3, 2, 9)
    np.testing.assert_array_equal(ids, [[1, 2, 9], [3, 9, 9]])
    np.testing.assert_array_equal(mask, [[1, 1, 0], [1, 0, 0]])


def test_cache_check_names_what_is_wrong(model):
    cache = runtime.empty_cache(model.config, 2)
    checked = runtime.check_cache(model.config, [tuple(s) for s in cache], 2)
    assert [s.kv.shape for s in checked] == [(2, 2, 12, 8)] * 2
    with pytest.raises(ValueError, match="decoder_layers=2"):
        runtime.check_cache(model.config, cache[:1], 2)
    with pytest.raises(ValueError, match=r"kv has shape \(2, 2, 12, 8\).*\(3, 2, 12, 8\)"):
        runtime.check_cache(model.config, cache, 3)


# ------------------------------------------------------------------------------------------------- the sampler
LOGITS = jax.random.normal(jax.random.PRNGKey(0), (4, 40)) * 3


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.6), (0.9, 8, 0.8)])
def test_per_row_settings_mean_what_shared_settings_mean(temperature, top_k, top_p):
    """A row with its own settings (arrays, per-row keys) draws what the same settings shared by a batch of
    that row alone draw with that key; beside it, a greedy row takes the argmax and a row with other settings
    changes nothing."""
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    rows = runtime.Sampling(jnp.asarray([temperature, 0.0, temperature, 2.0]), jnp.asarray([top_k, 3, top_k, 0]),
                            jnp.asarray([top_p, 0.5, top_p, 1.0]))
    got = np.asarray(jax.jit(runtime.choose)(LOGITS, rows, keys))
    for i in (0, 2):
        alone = runtime.choose(LOGITS[i:i + 1], runtime.Sampling(temperature, top_k, top_p), keys[i])
        assert got[i] == int(alone[0])
    assert got[1] == int(np.argmax(np.asarray(LOGITS[1])))


def test_temperature_zero_is_greedy_everywhere():
    key = jax.random.PRNGKey(1)
    argmax = np.argmax(np.asarray(LOGITS), -1)
    np.testing.assert_array_equal(runtime.choose(LOGITS, runtime.Sampling(0.0, 5, 0.5), key), argmax)
    greedy = decode.DecodeOptions(do_sample=False, temperature=0.0)  # the same meaning in transformers' spelling
    assert greedy.sampling.temperature == 0.0
    np.testing.assert_array_equal(greedy.choose(LOGITS, key), argmax)
    with pytest.raises(ValueError, match="temperature=0 is invalid with do_sample=True"):
        decode.DecodeOptions(do_sample=True, temperature=0.0)


@pytest.mark.parametrize("kw, match", [(dict(temperature=-1), "temperature=-1 is invalid"),
                                       (dict(temperature="hot"), "temperature='hot' is invalid"),
                                       (dict(top_k=-2), "top_k=-2 is invalid"), (dict(top_k=1.5), "top_k=1.5"),
                                       (dict(top_p=0), "top_p=0 is invalid"), (dict(top_p=1.5), "top_p=1.5")])
def test_bad_sampling_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        runtime.Sampling.checked(**kw)


# ------------------------------------------------------------------------------- lowered from abstract arguments
def test_prefill_and_step_lower_from_abstract_arguments():
    """What a compile-only check does: the pure passes, the module bound, lowered and compiled from shapes
    alone; the compiled step runs on real values and matches the eager one."""
    cfg = NucleusXConfig(vocab_size=64, decoder_embed_dim=16, decoder_value_embed_dim=16, decoder_ffn_embed_dim=24,
                         decoder_layers=2, decoder_retention_heads=2, recurrent_chunk_size=4)
    module = NucleusXForCausalLMModule(cfg)
    params = jax.eval_shape(lambda: NucleusX(cfg, init=False).init_params(jax.random.PRNGKey(0)))
    spec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    cache = jax.eval_shape(lambda: runtime.empty_cache(cfg, 3, per_row=True))
    step = jax.jit(partial(runtime.step, module)).lower(params, spec((3,)), spec((3,), bool), cache).compile()
    prefill = jax.jit(partial(runtime.prefill, module, mode="chunkwise", chunk_size=4, logits=False))
    prefill.lower(params, spec((1, 16)), spec((1, 16))).compile()
    logits, state = jax.eval_shape(prefill, params, spec((1, 16)), spec((1, 16)))
    assert logits is None and [s.kv.shape for s in state] == [(1, 2, 8, 8)] * 2
    real = NucleusX(cfg, seed=2)
    tokens, active = jnp.asarray([1, 2, 3]), jnp.asarray([True, True, False])
    state = runtime.empty_cache(cfg, 3, per_row=True)
    got, _ = step(real.params, tokens, active, state)
    want, _ = runtime.step(module, real.params, tokens, active, state)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_inference_unrolls_scanned_layers_same_function_less_memory(tmp_path):
    """``loading.load`` runs a ``scan_layers`` model's layers one by one: the same logits as the scanned model,
    and the server's decode step without the scan's two extra copies of every slot's state (compiled on this
    host: its temporaries stay below the states' size; scanned they are about twice it)."""
    from nucleusx_jax.loading import load
    from nucleusx_jax.serve.backend import Backend
    from nucleusx_jax.serve.engine import Engine

    cfg = NucleusXConfig(vocab_size=64, decoder_embed_dim=16, decoder_value_embed_dim=64, decoder_ffn_embed_dim=24,
                         decoder_layers=4, decoder_retention_heads=2, recurrent_chunk_size=4, scan_layers=True)
    scanned = NucleusX(cfg, seed=2)
    scanned.save_pretrained(str(tmp_path / "m"))
    loaded = load(str(tmp_path / "m"))
    assert loaded.config.scan_layers is False and "layers_3" in loaded.params["model"]
    ids = np.asarray([ROWS[0]])
    np.testing.assert_allclose(np.asarray(loaded(ids).logits), np.asarray(scanned(ids).logits), rtol=0, atol=1e-6)

    def temporaries_over_states(model):
        engine = Engine(Backend(model.config, model.module, model.params), max_batch=512, max_prompt_tokens=16)
        slots, rows = engine.abstract_step_inputs()
        memory = engine.step.lower(model.params, slots, rows).compile().memory_analysis()
        states = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(slots.cache))
        return memory.temp_size_in_bytes / states

    # measured 2026-12-07: 0.26 unrolled, 2.04 scanned
    assert temporaries_over_states(loaded) < 0.75 < 1.5 < temporaries_over_states(scanned)
