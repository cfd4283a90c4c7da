"""Loading refuses early and briefly: hostile config.json sizes, types and nesting; local paths that do not
exist never reach the Hugging Face Hub; a trainer config must size its model."""

import json
import shutil
import sys
import time
import types

import pytest

import nucleusx_jax
from nucleusx_jax import NucleusXConfig
from nucleusx_jax.train.config import ConfigError, load_config

from conftest import FIXTURES

TINY = FIXTURES / "nucleus_x_tiny"


@pytest.fixture
def model_dir(tmp_path):
    """A copy of the tiny reference checkpoint (config.json + model.safetensors)."""
    out = tmp_path / "model"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(TINY / name, out / name)
    return out


def _edit(model_dir, **changes):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("changes, message", [
    (dict(decoder_layers=1_000_000), r"decoder_layers=1000000 is invalid: must be an integer in \[1, 4096\]"),
    (dict(vocab_size=10**12), r"vocab_size=1000000000000 is invalid: must be an integer in \[1, 16777216\]"),
    (dict(recurrent_chunk_size=10**12), r"recurrent_chunk_size=1000000000000 is invalid: must be an integer in"),
    (dict(rms_norm_eps="x"), r"rms_norm_eps='x' is invalid: must be a finite number > 0"),
    (dict(initializer_range="0.02"), r"initializer_range='0.02' is invalid: must be a finite number >= 0"),
    (dict(use_lm_decay="no"), r"use_lm_decay='no' is invalid: must be true or false"),
    (dict(bos_token_id={"a": 1}), r"bos_token_id=\{'a': 1\} is invalid: must be a token id"),
    (dict(forward_mode="p" * 10**6), r"forward_mode=str of length 1000000 is invalid: must be one of"),
    (dict(num_labels=10**9), r"num_labels=1000000000 is invalid: must be an integer in \[1, 65536\]"),
    (dict(problem_type=[1]), r"problem_type=\[1\] is invalid: must be one of regression, single_label_class"),
    ({"task_specific_params": "[" * 100_000}, r"config.json is nested too deeply to be a model config"),
])
def test_bad_config_json_is_refused_at_once_and_briefly(model_dir, changes, message):
    _edit(model_dir, **changes)
    if "task_specific_params" in changes:  # deep nesting, as JSON text (no such Python value can be dumped)
        text = (model_dir / "config.json").read_text()
        (model_dir / "config.json").write_text(text.replace(json.dumps(changes["task_specific_params"]),
                                                            "[" * 100_000 + "]" * 100_000))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message) as err:
        nucleusx_jax.from_pretrained(model_dir)
    assert time.perf_counter() - start < 1.0 and len(str(err.value)) < 1024


def test_a_checkpoint_that_does_not_match_gives_a_short_message(model_dir):
    for name in ("nucleusx-7b.json", "retnet-65b.json"):  # the limits leave real models alone
        assert NucleusXConfig.from_pretrained(str(FIXTURES.parent.parent / "configs" / name)).decoder_layers >= 32
    _edit(model_dir, decoder_layers=4000)  # allowed by the limits; the file holds 2: 3998 x 10 keys missing
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"missing keys: \['model.layers.2.retention.q_proj.weight', .* and 39970 "
                                         r"more") as err:
        nucleusx_jax.from_pretrained(model_dir)
    assert time.perf_counter() - start < 5.0 and len(str(err.value)) < 1024


@pytest.fixture
def hub(monkeypatch, model_dir):
    """A stand-in huggingface_hub whose snapshot_download records the repo ids asked for."""
    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(model_dir)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    return asked


def test_a_missing_local_path_never_asks_the_hub(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path in ("runs/tiny", "./org/name", "runs/tiny/hf", "/no/such/model", "missing", "org/name/", "~/org/name"):
        with pytest.raises(FileNotFoundError, match="does not exist .*hf://org/name"):
            nucleusx_jax.from_pretrained(path)
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file, not a model directory"):
        nucleusx_jax.from_pretrained("weights.bin")
    assert hub == []
    assert nucleusx_jax.from_pretrained("hf://runs/tiny").config.decoder_layers == 2  # explicit: the Hub
    assert nucleusx_jax.from_pretrained("org/name").config.decoder_layers == 2  # no local org/: the Hub
    assert hub == ["runs/tiny", "org/name"]
    with pytest.raises(ValueError, match=r"is not a Hugging Face Hub repo id: expected hf://org/name"):
        nucleusx_jax.from_pretrained("hf://a/b/c")


def test_trainer_config_without_model_dimensions_names_them(tmp_path):
    with pytest.raises(ConfigError, match=r"section 'model' does not give the model's dimensions \['vocab_size', "
                                          r"'decoder_embed_dim', 'decoder_value_embed_dim', 'decoder_ffn_embed_dim', "
                                          r"'decoder_layers', 'decoder_retention_heads'\]"):
        load_config(None)
    with pytest.raises(ConfigError, match=r"dimensions \['decoder_layers'\]"):
        load_config(None, ["model.vocab_size=64", "model.decoder_embed_dim=32", "model.decoder_value_embed_dim=64",
                           "model.decoder_ffn_embed_dim=48", "model.decoder_retention_heads=4"])
    assert load_config(None, [f"model.path={TINY}"]).model_config().decoder_layers == 2  # a config.json sizes it
    deep = tmp_path / "config.json"
    deep.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match=r"model.path: .*config.json is nested too deeply"):
        load_config(None, [f"model.path={deep}"])
