"""``train.py --compile-only --topology h100x8``: XLA's GPU compiler through the CUDA plugin (the [gpu] extra,
several GB: not in [test], so CI skips these) for an H100 target description, without a GPU (docs/gpu.md).
Small models, 1 and 8 GPUs."""

import importlib.util
import json
import os

import pytest

from nucleusx_jax.train import compile_only
from nucleusx_jax.train.config import load_config

PLUGIN = importlib.util.find_spec("jax_plugins") is not None and importlib.util.find_spec(
    "jax_plugins.xla_cuda12") is not None
needs_plugin = pytest.mark.skipif(not PLUGIN, reason="needs the CUDA plugin: pip install -e '.[gpu]' "
                                                     "(jax[cuda12]==0.10.2, several GB; CI does not install it)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "tiny.yaml")
SMALL = ["model.vocab_size=256", "model.decoder_embed_dim=256", "model.decoder_value_embed_dim=256",
         "model.decoder_ffn_embed_dim=256", "model.decoder_layers=2", "model.decoder_retention_heads=2",
         "model.forward_mode=chunkwise", "model.recurrent_chunk_size=64", "data.seq_len=128",
         "train.global_batch=8", "train.dtype=bfloat16"]


@needs_plugin
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_train_step_compiles_for_eight_h100s(impl):
    """data 4 x tensor 2 on 8 H100s: the step compiles and fits an H100's 80 GB; tensor parallelism
    all-reduces inside the step; with retention_impl: pallas the kernels are Triton calls (no Mosaic),
    with xla none."""
    cfg = load_config(TINY_YAML, SMALL + [f"model.retention_impl={impl}", "mesh.data=4", "mesh.tensor=2"])
    report = compile_only.check(cfg, "h100x8")
    assert report["devices"] == 8 and report["device_kind"] == "NVIDIA H100 80GB HBM3" and report["fits"]
    assert 79 * 2**30 < report["hbm_bytes_per_device"] <= 80 * 2**30
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2, "sequence": 1}
    assert report["collectives"].get("all-reduce", 0) > 0 and report["mosaic_kernels"] == 0
    assert (report["triton_kernels"] > 0) == (impl == "pallas"), report


@needs_plugin
def test_serve_compiles_for_one_h100(tmp_path, capsys):
    """--serve on h100x1: the server's decode step and prefill plan within one H100. Sampling sorts [64, 32000]
    logits, which XLA would hand to CUB, whose compile asks for a CUDA device (gpu_target.COMPILER_OPTIONS)."""
    import train

    path = tmp_path / "serve.json"
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(train.main(["--config", TINY_YAML, "--compile-only", "--topology", "h100x1", "--serve",
                                     "--max-batch", "64", "--report", str(path),
                                     *sum((["--set", s] for s in SMALL + ["model.vocab_size=32000"]), [])]))
    assert exit_info.value.code == 0, capsys.readouterr().err
    report = json.loads(path.read_text())
    assert report["fits"] and set(report["steps"]) == {"decode", "prefill"}
    assert report["weights_bytes_per_device"] == 4 * report["parameters"]


@pytest.mark.skipif(PLUGIN, reason="the CUDA plugin is installed")
def test_without_the_plugin_the_error_says_what_to_install():
    with pytest.raises(ValueError, match=r"h100x8 \(pip install 'jax\[cuda12\]==0.10.2'"):
        compile_only.topology_devices("h100x8")
