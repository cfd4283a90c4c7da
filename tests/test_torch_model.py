"""The PyTorch NucleusX (nucleusx_jax/remote_code, shipped with every PyTorch export) against the reference
fixtures, on whichever transformers is installed (CI: 4.57 with JAX, and 5.x in a second environment without).

The models are loaded as a user without our package would: a directory with the fixture's weights, the code
files and ``auto_map``, through ``AutoModel*.from_pretrained(..., trust_remote_code=True)``. The tests that
compare with our JAX model or run the converter skip where JAX is not installed.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402

from nucleusx_jax.remote_code import AUTO_MAP, CODE_FILES, add_code  # noqa: E402

from conftest import FIXTURE_NAMES, FIXTURES, ROOT, load_cases, max_abs  # noqa: E402

TOL = 2e-5
CACHE_TOL = 1e-5


def export_fixture(name, directory, seqcls=False):
    """A PyTorch model directory holding the fixture's weights (the causal LM's, or the classifier's: the
    ``model.*`` weights plus ``seqcls_score_weight``), its config and the shipped code."""
    os.makedirs(directory, exist_ok=True)
    if seqcls:
        state = {k: v for k, v in load_file(str(FIXTURES / name / "model.safetensors")).items()
                 if k.startswith("model.")}
        state["score.weight"] = load_cases(name)["seqcls_score_weight"]
        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(FIXTURES / name / "seqcls_config.json", os.path.join(directory, "config.json"))
    else:
        for file in ("config.json", "model.safetensors"):
            shutil.copy(FIXTURES / name / file, os.path.join(directory, file))
    add_code(directory)
    return directory


def load(directory, cls=AutoModelForCausalLM, **kwargs):
    model = cls.from_pretrained(directory, trust_remote_code=True, **kwargs)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__  # the shipped code
    return model.eval()


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def fx(request, tmp_path_factory):
    """A fixture's export, loaded with the reference's chunkwise rows (the default, "exact", is tested below)."""
    name = request.param
    directory = export_fixture(name, str(tmp_path_factory.mktemp(name) / "torch"))
    return name, directory, load(directory, chunkwise_normalization="reference"), load_cases(name)


def test_exact_chunkwise_is_the_parallel_function(fx):
    """The default, ``chunkwise_normalization="exact"``: chunkwise equals the reference's parallel logits for every
    chunk size, with left padding (real tokens) too, and a chunkwise prefill of any chunk then decodes as the
    parallel prefill does."""
    _, directory, _, c = fx
    m = load(directory)
    assert m.config.chunkwise_normalization == "exact"
    ids = c["input_ids"]
    for chunk in range(1, ids.shape[1] + 1):
        out = run(m, ids, forward_mode="chunkwise", recurrent_chunk_size=chunk)
        assert max_abs(out.logits, c["logits_parallel"]) < TOL, chunk
    real = c["lp_attention_mask"].astype(bool)
    for chunk in (1, 3, 5):
        out = run(m, c["lp_input_ids"], attention_mask=t(c["lp_attention_mask"]), forward_mode="chunkwise",
                  recurrent_chunk_size=chunk).logits.numpy()
        assert max_abs(out[real], c["lp_logits_parallel"][real]) < TOL, chunk
    p = int(c["prefill_len"])
    pre = run(m, ids[:, :p], forward_mode="chunkwise", recurrent_chunk_size=3, use_cache=True)
    cont = run(m, ids[:, p:], forward_mode="recurrent", past_key_values=cache_of(pre), use_cache=True)
    assert max_abs(cont.logits, c["logits_parallel_prefill_then_recurrent"]) < TOL
    with pytest.raises(ValueError, match="chunkwise_normalization='fast' is invalid: must be one of exact, reference"):
        type(m.config)(chunkwise_normalization="fast")


def t(array):
    return torch.from_numpy(np.asarray(array))


def run(model, ids, **kwargs):
    with torch.no_grad():
        return model(t(ids), **kwargs)


def cache_of(out):
    """The returned cache: ``cache`` on transformers 5, ``past_key_values`` on 4."""
    return out.cache if "cache" in out.__dataclass_fields__ else out.past_key_values


def stack(cache, field):
    return np.stack([cache[i][field].numpy() for i in range(len(cache))])


def test_parallel_logits_cache_and_hidden_states(fx):
    _, _, m, c = fx
    out = run(m, c["input_ids"], forward_mode="parallel", use_cache=True, output_hidden_states=True)
    assert max_abs(out.logits, c["logits_parallel"]) < TOL
    cache = cache_of(out)
    assert max_abs(stack(cache, 0), c["cache_parallel_kv"]) < CACHE_TOL
    assert max_abs(stack(cache, 1), np.broadcast_to(c["cache_parallel_scale"], (2, 2, 4, 1, 1))) < CACHE_TOL
    assert stack(cache, 2).tolist() == c["cache_parallel_seqlen"].tolist()
    assert len(out.hidden_states) == m.config.decoder_layers + 1
    assert max_abs(out.hidden_states[-1], c["last_hidden_state_parallel"]) < TOL


@pytest.mark.parametrize("kind", ["div", "pad"])
def test_chunkwise_logits(fx, kind):
    _, _, m, c = fx
    out = run(m, c["input_ids"], forward_mode="chunkwise", recurrent_chunk_size=int(c[f"chunk_size_{kind}"]))
    assert max_abs(out.logits, c[f"logits_chunkwise_{kind}"]) < TOL


def test_recurrent_token_by_token_and_in_one_call(fx):
    _, _, m, c = fx
    ids, cache, rows = c["input_ids"], None, []
    for i in range(ids.shape[1]):
        out = run(m, ids[:, i:i + 1], forward_mode="recurrent", past_key_values=cache, use_cache=True)
        cache = cache_of(out)
        rows.append(out.logits[:, 0].numpy())
    assert max_abs(np.stack(rows, 1), c["logits_recurrent"]) < TOL
    assert max_abs(stack(cache, 0), c["cache_recurrent_kv"]) < CACHE_TOL
    assert max_abs(stack(cache, 1), c["cache_recurrent_scale"]) < CACHE_TOL
    assert stack(cache, 2).tolist() == c["cache_recurrent_seqlen"].tolist()
    whole = run(m, ids, forward_mode="recurrent", use_cache=True)
    assert max_abs(whole.logits, c["logits_recurrent"]) < TOL


def test_left_padding_in_every_form(fx):
    _, _, m, c = fx
    ids, mask = c["lp_input_ids"], t(c["lp_attention_mask"])
    par = run(m, ids, attention_mask=mask, forward_mode="parallel", use_cache=True)
    assert max_abs(par.logits, c["lp_logits_parallel"]) < TOL
    assert max_abs(stack(cache_of(par), 0), c["lp_cache_parallel_kv"]) < CACHE_TOL
    assert max_abs(stack(cache_of(par), 1), c["lp_cache_parallel_scale"]) < CACHE_TOL
    rec = run(m, ids, attention_mask=mask, forward_mode="recurrent", use_cache=True)
    assert max_abs(rec.logits, c["lp_logits_recurrent"]) < TOL
    assert max_abs(stack(cache_of(rec), 0), c["lp_cache_recurrent_kv"]) < CACHE_TOL
    assert max_abs(stack(cache_of(rec), 1), c["lp_cache_recurrent_scale"]) < CACHE_TOL
    chunk = run(m, ids, attention_mask=mask, forward_mode="chunkwise", recurrent_chunk_size=5).logits.numpy()
    if not m.model.embed_tokens.weight[m.config.pad_token_id].any():  # the reference's pads are then harmless
        assert max_abs(chunk, c["lp_logits_chunkwise"]) < TOL
    else:  # they leak in the reference's chunkwise form (it ignores the mask); ours stay out
        real = c["lp_attention_mask"].astype(bool)
        assert max_abs(c["lp_logits_chunkwise"][real], c["lp_logits_parallel"][real]) > 1e-3
        unpadded_gap = max_abs(c["logits_chunkwise_pad"], c["logits_parallel"])
        assert max_abs(chunk[real], c["lp_logits_parallel"][real]) < unpadded_gap + TOL
    # the chunkwise form honours the mask (our fix): with 6 pads and chunks of 3, row 1 equals it alone
    alone = run(m, ids[1:, 6:], forward_mode="chunkwise", recurrent_chunk_size=3)
    aligned = run(m, ids, attention_mask=mask, forward_mode="chunkwise", recurrent_chunk_size=3)
    assert max_abs(aligned.logits[1, 6:], alone.logits[0]) < TOL


@pytest.mark.parametrize("mode, chunk", [("parallel", None), ("chunkwise", 32), ("chunkwise", 3)])
def test_prefill_then_decode(fx, mode, chunk):
    """The reference's parallel prefill; chunkwise prefills hand over the exact state (our fix), so they
    continue within the gap between the reference's own chunkwise and parallel logits."""
    _, _, m, c = fx
    p, ids = int(c["prefill_len"]), c["input_ids"]
    pre = run(m, ids[:, :p], forward_mode=mode, recurrent_chunk_size=chunk, use_cache=True)
    assert cache_of(pre).get_seq_length() == p
    cont = run(m, ids[:, p:], forward_mode="recurrent", past_key_values=cache_of(pre), use_cache=True)
    gap = 0.0 if chunk in (None, 32) else max(max_abs(c["logits_parallel"], c[f"logits_chunkwise_{k}"])
                                              for k in ("div", "pad"))
    assert max_abs(cont.logits, c["logits_parallel_prefill_then_recurrent"]) < gap + TOL


def test_losses(fx):
    _, _, m, c = fx
    ids = t(c["input_ids"])
    assert abs(float(run(m, c["input_ids"], labels=ids).loss) - float(c["lm_loss"])) < TOL
    assert abs(float(run(m, c["input_ids"], labels=t(c["lm_labels_ignore"])).loss) - float(c["lm_loss_ignore"])) < TOL
    m.config.z_loss_coeff = float(c["z_loss_coeff"])
    try:
        assert abs(float(run(m, c["input_ids"], labels=ids).loss) - float(c["lm_loss_z"])) < TOL
    finally:
        m.config.z_loss_coeff = 0.0


def test_greedy_generate_equals_the_reference(fx):
    _, _, m, c = fx
    with torch.no_grad():
        out = m.generate(t(c["gen_input_ids"]), attention_mask=t(c["gen_attention_mask"]), max_new_tokens=12,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.tolist() == c["gen_output_ids"].tolist()
    assert max_abs(torch.stack(out.logits, 1), c["gen_logits"]) < TOL


def test_sampling_with_top_k_1_is_greedy_and_sampling_runs(fx):
    _, _, m, c = fx
    ids, mask = t(c["gen_input_ids"]), t(c["gen_attention_mask"])
    with torch.no_grad():
        top1 = m.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=1)
        sampled = m.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=5.0)
    assert top1.tolist() == c["gen_output_ids"].tolist()
    assert sampled.shape == (2, 21) and sampled[:, 9:].tolist() != c["gen_output_ids"][:, 9:].tolist()


def test_beam_search_scores_equal_a_fresh_forward(fx):
    """Beam search reorders the cache every step: each returned beam's score (the sum of its tokens' log
    probabilities, length_penalty 0) equals that of a fresh parallel pass over the finished sequence."""
    _, _, m, c = fx
    ids, mask = t(c["gen_input_ids"]), t(c["gen_attention_mask"])
    prompt, new = ids.shape[1], 8
    with torch.no_grad():
        out = m.generate(ids, attention_mask=mask, max_new_tokens=new, num_beams=3, num_return_sequences=3,
                         do_sample=False, length_penalty=0.0, suppress_tokens=[m.config.eos_token_id],
                         output_scores=True, return_dict_in_generate=True)
        seqs = out.sequences
        full_mask = torch.cat([mask.repeat_interleave(3, 0), torch.ones(6, new, dtype=mask.dtype)], 1)
        logp = torch.log_softmax(m(seqs, attention_mask=full_mask, forward_mode="parallel").logits.double(), -1)
    picked = logp[:, prompt - 1:-1].gather(-1, seqs[:, prompt:, None])[..., 0].sum(-1)
    assert seqs.shape == (6, prompt + new)
    assert max_abs(picked, out.sequences_scores) < 1e-4
    assert len({tuple(s) for s in seqs[:3].tolist()}) == 3  # distinct beams


def test_save_pretrained_round_trips_bit_for_bit(fx, tmp_path):
    name, _, m, c = fx
    m.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    reference = load_file(str(FIXTURES / name / "model.safetensors"))
    assert sorted(saved) == sorted(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    for (k1, v1), (k2, v2) in zip(m.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    assert torch.equal(run(again, c["input_ids"]).logits, run(m, c["input_ids"]).logits)
    assert set(CODE_FILES) <= set(os.listdir(tmp_path))  # save_pretrained ships the code again


def test_reference_bin_weights_load(fx, tmp_path):
    name, directory, m, c = fx
    shutil.copy(os.path.join(directory, "config.json"), tmp_path / "config.json")
    for file in CODE_FILES + ("pytorch_model.bin",):
        shutil.copy(os.path.join(directory, file) if file in CODE_FILES else FIXTURES / name / file, tmp_path / file)
    from_bin = load(str(tmp_path))
    assert max_abs(run(from_bin, c["input_ids"]).logits, c["logits_parallel"]) < TOL


def test_fresh_model_has_the_reference_state_dict_and_buffers(fx):
    name, _, m, _ = fx
    fresh = AutoModelForCausalLM.from_config(m.config, trust_remote_code=True)
    lines = [line.split("\t") for line in (FIXTURES / name / "state_dict_keys.txt").read_text().splitlines()
             if not line.startswith("#")]
    assert [(k, list(v.shape)) for k, v in fresh.state_dict().items()] == [(k, json.loads(s)) for k, s, _ in lines]
    for key in ("model.rel_pos.angle", "model.rel_pos.decay"):
        assert torch.equal(fresh.state_dict()[key], m.state_dict()[key]), key
    assert not torch.equal(fresh.state_dict()["lm_head.weight"], m.state_dict()["lm_head.weight"])


def test_bfloat16_loads_and_runs(fx):
    _, directory, m, c = fx
    bf16 = load(directory, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    logits = run(bf16, c["input_ids"]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    reference = t(c["logits_parallel"])
    assert max_abs(logits.float(), reference) < 0.05 * float(reference.abs().max())
    with torch.no_grad():
        out = bf16.generate(t(c["gen_input_ids"]), attention_mask=t(c["gen_attention_mask"]), max_new_tokens=4,
                            do_sample=False)
    assert out.shape == (2, 13)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_sequence_classification(name, tmp_path):
    c = load_cases(name)
    m = load(export_fixture(name, str(tmp_path), seqcls=True), AutoModelForSequenceClassification)
    assert m.config.num_labels == 3
    assert max_abs(run(m, c["input_ids"]).logits, c["seqcls_logits"]) < TOL
    rp = run(m, c["seqcls_rp_input_ids"], attention_mask=t(c["seqcls_rp_attention_mask"]))
    assert max_abs(rp.logits, c["seqcls_rp_logits"]) < TOL
    lp = run(m, c["lp_input_ids"], attention_mask=t(c["lp_attention_mask"]))
    assert max_abs(lp.logits, c["seqcls_lp_logits"]) < TOL
    assert abs(float(run(m, c["input_ids"], labels=t(c["seqcls_labels"])).loss) - float(c["seqcls_loss"])) < TOL


def test_bad_arguments_name_the_value(fx):
    _, _, m, c = fx
    with pytest.raises(ValueError, match=r"forward_mode='sideways' is invalid: must be one of parallel"):
        run(m, c["input_ids"], forward_mode="sideways")
    with pytest.raises(ValueError, match=r"recurrent_chunk_size=0 is invalid"):
        run(m, c["input_ids"], forward_mode="chunkwise", recurrent_chunk_size=0)
    cache = cache_of(run(m, c["input_ids"], use_cache=True))
    with pytest.raises(ValueError, match=r"forward_mode='recurrent' only, got forward_mode='parallel'"):
        run(m, c["input_ids"], past_key_values=cache, forward_mode="parallel")


def test_remote_code_needs_no_package_of_ours(tmp_path):
    """In a fresh interpreter where importing nucleusx_jax or jax fails, the export loads and matches."""
    name = FIXTURE_NAMES[0]
    directory, c = export_fixture(name, str(tmp_path / "torch")), load_cases(name)
    script = (
        "import sys, numpy as np, torch\n"
        "sys.modules.update(nucleusx_jax=None, jax=None, flax=None)\n"
        "from transformers import AutoConfig, AutoModel, AutoModelForCausalLM\n"
        "d, ids = sys.argv[1], torch.tensor(np.load(sys.argv[2])['input_ids'])\n"
        "m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()\n"
        "assert type(AutoConfig.from_pretrained(d, trust_remote_code=True)).__name__ == 'NucleusXConfig'\n"
        "assert type(AutoModel.from_pretrained(d, trust_remote_code=True)).__name__ == 'NucleusXModel'\n"
        "np.save(sys.argv[3], m(ids).logits.detach().numpy())\n"
    )
    out = str(tmp_path / "logits.npy")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script, directory, str(FIXTURES / name / "cases.npz"), out],
                          cwd=directory, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_abs(np.load(out), c["logits_parallel"]) < TOL
    with open(os.path.join(directory, "config.json")) as f:
        assert json.load(f)["auto_map"] == AUTO_MAP


def test_our_package_registers_the_auto_classes_without_jax(tmp_path):
    """``import nucleusx_jax.torch`` registers nucleus_x (no trust_remote_code needed) and imports none of our
    JAX modules (transformers 4 itself imports jax when installed; the transformers 5 run has no JAX at all)."""
    name = "nucleus_x_tiny_large_weights"  # its pad embedding row is not zero
    c = load_cases(name)
    script = (
        "import sys, numpy as np, torch, nucleusx_jax.torch\n"
        "from safetensors.torch import load_file\n"
        "ours = sorted(n for n in sys.modules if n.startswith('nucleusx_jax.'))\n"
        "assert ours == ['nucleusx_jax.remote_code', 'nucleusx_jax.remote_code.configuration_nucleus_x',\n"
        "                'nucleusx_jax.remote_code.modeling_nucleus_x', 'nucleusx_jax.torch'], ours\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "assert type(m).__module__ == 'nucleusx_jax.remote_code.modeling_nucleus_x', type(m).__module__\n"
        "saved = load_file(sys.argv[1] + '/model.safetensors')\n"
        "assert all(torch.equal(v, saved[k]) for k, v in m.state_dict().items()), 'weights changed on load'\n"
        "np.save(sys.argv[3], m(torch.tensor(np.load(sys.argv[2])['input_ids'])).logits.detach().numpy())\n"
    )
    out = str(tmp_path / "logits.npy")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script, str(FIXTURES / name), str(FIXTURES / name / "cases.npz"),
                           out], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_abs(np.load(out), c["logits_parallel"]) < TOL


# ------------------------------------------------------------------------------ with JAX: ours, both sides
def test_chunkwise_with_padding_equals_our_jax_model():
    """Where the reference has no numbers (the masked chunkwise form, whose pads leak in the reference when their
    embedding is not zero), PyTorch equals our JAX model."""
    pytest.importorskip("jax")
    import nucleusx_jax

    name = "nucleus_x_tiny_large_weights"
    c = load_cases(name)
    ids, mask = c["lp_input_ids"].copy(), c["lp_attention_mask"]
    ids[mask == 0] = 7  # pads with a non-zero embedding
    jax_model = nucleusx_jax.from_pretrained(FIXTURES / name)
    theirs = np.asarray(jax_model(ids, attention_mask=mask, forward_mode="chunkwise", recurrent_chunk_size=4).logits)
    import nucleusx_jax.torch  # noqa: F401  (registers the Auto classes)

    torch_model = AutoModelForCausalLM.from_pretrained(FIXTURES / name).eval()
    ours = run(torch_model, ids, attention_mask=t(mask), forward_mode="chunkwise", recurrent_chunk_size=4).logits
    real = mask.astype(bool)
    assert max_abs(ours.numpy()[real], theirs[real]) < TOL


def test_converter_ships_the_code_unless_told_and_the_fixer_adds_it(tmp_path, capsys):
    pytest.importorskip("flax")
    from nucleusx_jax.convert import convert, main

    name = FIXTURE_NAMES[0]
    c = load_cases(name)
    convert(FIXTURES / name, tmp_path / "flax", "flax", progress=False)
    assert "auto_map" not in json.loads((tmp_path / "flax" / "config.json").read_text())
    convert(tmp_path / "flax", tmp_path / "torch", "torch", progress=False)
    shipped = load(str(tmp_path / "torch"))
    assert max_abs(run(shipped, c["input_ids"]).logits, c["logits_parallel"]) < TOL

    bare = tmp_path / "bare"
    assert main([str(tmp_path / "flax"), str(bare), "--to", "torch", "--no-code", "--quiet"]) == 0
    assert not set(CODE_FILES) & set(os.listdir(bare))
    assert (bare / "config.json").read_bytes() == (FIXTURES / name / "config.json").read_bytes()
    weights = bare / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns, weights.read_bytes())
    assert main([str(bare), "--add-code"]) == 0
    assert "added the PyTorch code" in capsys.readouterr().out
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns, weights.read_bytes()) == before  # untouched
    assert json.loads((bare / "config.json").read_text()) == {**json.loads((FIXTURES / name / "config.json")
                                                                          .read_text()), "auto_map": AUTO_MAP}
    for file in CODE_FILES:
        assert (bare / file).read_bytes() == (tmp_path / "torch" / file).read_bytes()
    fixed = load(str(bare))
    assert torch.equal(run(fixed, c["input_ids"]).logits, run(shipped, c["input_ids"]).logits)
    assert not [f for f in os.listdir(bare) if f.startswith(".tmp-")]  # no temporary file left

    with pytest.raises(SystemExit, match="2"):  # a flax directory: nothing to fix
        main([str(tmp_path / "flax"), "--add-code"])
    assert "holds no PyTorch weights" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main([str(bare), str(tmp_path / "x"), "--add-code"])
    assert "--add-code changes SRC in place" in capsys.readouterr().err


def test_tied_embeddings_save_and_load(fx, tmp_path):
    _, _, m, c = fx
    config = type(m.config).from_dict({**m.config.to_dict(), "tie_word_embeddings": True})
    tied = AutoModelForCausalLM.from_config(config, trust_remote_code=True).eval()
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    tied.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))  # stored once, as we export
    again = load(str(tmp_path))
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert torch.equal(run(again, c["input_ids"]).logits, run(tied, c["input_ids"]).logits)
