"""The core API without transformers: ``nucleusx_jax.from_pretrained`` on the reference fixtures (PyTorch
safetensors and .bin, and our own format), logits of the three forms against the reference's arrays, greedy
generation, the converter round trip and a short run of ``configs/tiny.yaml``.

CI also runs this file with ``tests/without_transformers`` first on PYTHONPATH, where importing transformers
fails."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import nucleusx_jax
import nucleusx_jax.runs
from nucleusx_jax.convert import convert
from nucleusx_jax.train.config import load_config
from nucleusx_jax.train.loop import run

from conftest import FIXTURE_NAMES, FIXTURES, LOGITS, LOSS, assert_close, load_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def fixture_dirs(request, tmp_path_factory):
    """(name, {format: model directory}): the fixture's safetensors, its .bin alone, and our flax save."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    shutil.copytree(FIXTURES / name, tmp / "bin", ignore=shutil.ignore_patterns("model.safetensors"))
    nucleusx_jax.from_pretrained(FIXTURES / name).save_pretrained(tmp / "ours")
    return name, {"safetensors": FIXTURES / name, "bin": tmp / "bin", "ours": tmp / "ours"}


def test_three_formats_three_forms_match_the_reference(fixture_dirs):
    name, dirs = fixture_dirs
    c = load_cases(name)
    assert os.path.isfile(dirs["ours"] / "flax_model.msgpack")
    for fmt, path in dirs.items():  # the reference's chunkwise rows (the default is "exact": test_normalization.py)
        model = nucleusx_jax.from_pretrained(path, chunkwise_normalization="reference")
        assert_close(model(c["input_ids"], forward_mode="parallel").logits, c["logits_parallel"], LOGITS, str(fmt))
        for kind in ("div", "pad"):
            out = model(c["input_ids"], forward_mode="chunkwise", recurrent_chunk_size=int(c[f"chunk_size_{kind}"]))
            assert_close(out.logits, c[f"logits_chunkwise_{kind}"], LOGITS, str((fmt, kind)))
        rec = model(c["input_ids"], forward_mode="recurrent", use_cache=True)
        assert_close(rec.logits, c["logits_recurrent"], LOGITS, str(fmt))
        assert_close(float(model(c["input_ids"], labels=c["input_ids"]).loss), c["lm_loss"], LOSS, fmt)
    base = nucleusx_jax.from_pretrained(dirs["ours"], head="base")
    assert_close(base(c["input_ids"]).last_hidden_state, c["last_hidden_state_parallel"], LOGITS)


def test_greedy_generation_equals_the_reference(fixture_dirs):
    name, dirs = fixture_dirs
    c = load_cases(name)
    model = nucleusx_jax.from_pretrained(dirs["ours"])
    out = model.generate(c["gen_input_ids"], c["gen_attention_mask"], max_new_tokens=12)
    np.testing.assert_array_equal(out, c["gen_output_ids"])
    streamed = np.stack(list(model.stream(c["gen_input_ids"], c["gen_attention_mask"], max_new_tokens=12)), 1)
    np.testing.assert_array_equal(streamed, c["gen_output_ids"][:, -12:])


def test_converter_round_trip(tmp_path):
    convert(FIXTURES / "nucleus_x_tiny", tmp_path / "flax", "flax", progress=False)
    convert(tmp_path / "flax", tmp_path / "torch", "torch", progress=False)
    want, got = load_file(str(FIXTURES / "nucleus_x_tiny" / "model.safetensors")), load_file(
        str(tmp_path / "torch" / "model.safetensors"))
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_tiny_yaml_trains_exports_and_loads(tmp_path):
    """A few steps of configs/tiny.yaml (smaller rows and batches), the export, and the exported model."""
    summary = run(load_config(os.path.join(ROOT, "configs", "tiny.yaml"), [
        f"train.run_dir={tmp_path / 'run'}", "train.steps=3", "train.global_batch=2", "data.seq_len=32",
        "train.eval_every=0", "checkpoint.every=0", "logging.sample_tokens=4", "logging.progress=false",
        "logging.plot=false", "logging.tensorboard=false", "mesh.data=1"]))
    assert summary["steps"] == 3 and np.isfinite(summary["last_train_loss"])
    exported = nucleusx_jax.from_pretrained(summary["hf_dir"])
    config, params = nucleusx_jax.runs.restore_params(summary["run_dir"])
    assert exported.config == config
    for a, b in zip(jax_leaves(exported.params), jax_leaves(params)):
        np.testing.assert_array_equal(a, b)
    tokenizer_config = json.loads((tmp_path / "run" / "hf" / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "LlamaTokenizer"
    assert os.path.isfile(tmp_path / "run" / "hf" / "tokenizer.model")


def jax_leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_importing_the_core_imports_no_transformers():
    code = ("import sys, nucleusx_jax, nucleusx_jax.generate, nucleusx_jax.convert, nucleusx_jax.train.loop; "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_exported_tokenizer_files_equal_llama_tokenizer_save(tmp_path):
    """The run export's tokenizer directory, written without transformers, equals what transformers 4.x's
    LlamaTokenizer.save_pretrained writes, and AutoTokenizer encodes like SentencePiece."""
    transformers = pytest.importorskip("transformers", exc_type=ImportError)
    from nucleusx_jax.tokenizer import SentencePieceTokenizer, save_hf_tokenizer, train_tokenizer

    model_file = train_tokenizer(["builtin:pydoc"], str(tmp_path / "sp"), 512)
    save_hf_tokenizer(model_file, str(tmp_path / "ours"))
    sp = SentencePieceTokenizer(model_file)
    piece = sp.sp.id_to_piece
    transformers.LlamaTokenizer(vocab_file=model_file, unk_token=piece(sp.sp.unk_id()), bos_token=piece(sp.bos_id),
                                eos_token=piece(sp.eos_id), pad_token=piece(sp.pad_id), add_bos_token=True,
                                add_eos_token=False, legacy=False, sp_model_kwargs={}).save_pretrained(tmp_path / "hf")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes() or \
            json.loads((tmp_path / "ours" / name).read_text()) == json.loads((tmp_path / "hf" / name).read_text()), name
    text = "def f(x):\n    return x + 1  # déjà"
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert loaded.encode(text, add_special_tokens=False) == sp.encode(text)


def test_activations_equal_transformers_get_activation():
    """Every name in our activation table computes what transformers 4.x's ``get_activation`` does (the
    reference resolves ``config.activation_fn`` through it)."""
    torch = pytest.importorskip("torch")
    activations = pytest.importorskip("transformers.activations", exc_type=ImportError)
    from nucleusx_jax.activations import ACTIVATIONS

    x = np.linspace(-12, 12, 2001, dtype=np.float32)
    for name, fn in ACTIVATIONS.items():
        want = activations.get_activation(name)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.asarray(fn(jax.numpy.asarray(x))), want, atol=2e-6, rtol=1e-5, err_msg=name)
