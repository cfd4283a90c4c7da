"""The training config schema, the mesh/sharding rules, the pre-compile fit checks, and the real-run YAMLs
checked on abstract meshes of their slice shapes (no devices needed)."""

import glob
import math
import os

import jax
import pytest
from jax.sharding import PartitionSpec

from nucleusx_jax import sharding as shd
from nucleusx_jax.train.config import load_config, parse_config
from nucleusx_jax.train.step import (build_module, build_optimizer, check_fits, learning_rate_schedule, state_specs,
                                     training_flops_per_token, weight_decay_mask)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "nucleus_x_tiny")
# chips per slice: v4-32 has 16 chips, v5p-128 has 64, one node of 8 x H100
REAL_RUNS = {"nucleusx-1.3b-tpu-v4-32.yaml": 16, "nucleusx-7b-tpu-v5p-128.yaml": 64, "nucleusx-7b-8xh100.yaml": 8}


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\] in section 'train'; valid keys: .*steps"):
        parse_config({"train": {"stepz": 3}})
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['trainer'\]; valid sections: model, data"):
        parse_config({"trainer": {}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['hidden'\] in section 'model'; valid keys: path, "):
        parse_config({"model": {"hidden": 3}})
    # the forward form and chunk size live in the model config only; the old trainer keys say where they went
    with pytest.raises(ValueError, match=r"train.chunk_size is now model.recurrent_chunk_size"):
        parse_config({"train": {"chunk_size": 8}})


@pytest.mark.parametrize("raw, message", [
    ({"train": {"steps": "ten"}}, r"train.steps: expected int, got str 'ten'"),
    ({"train": {"steps": 2.5}}, r"train.steps: expected int, got float 2.5"),
    ({"optimizer": {"learning_rate": True}}, r"optimizer.learning_rate: expected float, got bool True"),
    ({"train": {"dtype": "float16"}}, r"train.dtype: expected one of 'float32', 'bfloat16', got str 'float16'"),
    ({"data": {"sources": "a.txt"}}, r"data.sources: expected list of str, got str 'a.txt'"),
    ({"logging": {"peak_tflops_per_device": "x"}}, r"expected float or null, got str 'x'"),
    ({"model": {"decoder_layers": "2"}}, r"model.decoder_layers: expected int, got str '2'"),
])
def test_wrong_type_names_expected_type(raw, message):
    with pytest.raises(TypeError, match=message):
        parse_config(raw)


def test_overrides_and_model_path(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  path: {FIXTURE}\n  z_loss_coeff: 0.5\ntrain:\n  steps: 7\n")
    cfg = load_config(str(path), ["train.steps=9", "optimizer.learning_rate=1e-3", "data.sources=[a.txt, b.jsonl]",
                                  "model.decoder_layers=3"])
    assert cfg.train.steps == 9 and cfg.optimizer.learning_rate == 1e-3
    assert cfg.data.sources == ["a.txt", "b.jsonl"]
    fixture = load_config(None, [f"model.path={FIXTURE}"]).model_config()
    model = cfg.model_config()
    assert model.decoder_embed_dim == fixture.decoder_embed_dim and model.vocab_size == fixture.vocab_size
    assert model.decoder_layers == 3 and model.z_loss_coeff == 0.5
    # the resolved config round-trips through its YAML
    again = tmp_path / "resolved.yaml"
    again.write_text(cfg.to_yaml())
    assert load_config(str(again)).to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match=r"--set 'steps=3' is invalid: expected section.key=value"):
        load_config(None, ["steps=3"])
    with pytest.raises(ValueError, match=r"NucleusXConfig.decoder_embed_dim=30 is invalid"):
        load_config(None, ["model.decoder_embed_dim=30", "model.decoder_retention_heads=4"])


def test_profile_steps_and_wandb_settings(tmp_path):
    cfg = _tiny("train.steps=20", "logging.profile_steps=[5, 8]", "logging.wandb.project=nx", "logging.wandb.name=tiny")
    assert cfg.logging.profile_steps == [5, 8]
    assert (cfg.logging.wandb.project, cfg.logging.wandb.name) == ("nx", "tiny")
    again = tmp_path / "resolved.yaml"
    again.write_text(cfg.to_yaml())
    assert load_config(str(again)).to_dict() == cfg.to_dict()
    assert _tiny().logging.wandb is None and _tiny().logging.profile_steps is None
    for raw, message in [
        ({"logging": {"profile_steps": [8, 5]}}, r"logging.profile_steps=\[8, 5\] is invalid: .*0 <= start < stop"),
        ({"logging": {"profile_steps": [3]}}, r"logging.profile_steps=\[3\] is invalid"),
        ({"logging": {"profile_steps": [-1, 2]}}, r"logging.profile_steps=\[-1, 2\] is invalid"),
        ({"logging": {"profile_steps": "5:8"}}, r"logging.profile_steps: expected list of int or null, got str"),
        ({"train": {"steps": 10}, "logging": {"profile_steps": [5, 11]}},
         r"logging.profile_steps=\[5, 11\] is out of range: stop must be <= train.steps=10"),
        ({"logging": {"wandb": {"name": "x"}}}, r"logging.wandb.project is required"),
        ({"logging": {"wandb": {"project": "p", "team": "x"}}},
         r"unknown key\(s\) \['team'\] in section 'logging.wandb'; valid keys: project, name"),
        ({"logging": {"wandb": "p"}}, r"logging.wandb: expected WandbConfig or null, got str 'p'"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_config(raw)


def test_mesh_shape_resolution():
    assert shd.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2,
                                                                                "sequence": 1}
    assert shd.resolve_mesh_shape({"data": 1, "fsdp": -1}, 8) == {"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1}
    assert shd.resolve_mesh_shape({"data": 2, "sequence": -1}, 8) == {"data": 2, "fsdp": 1, "tensor": 1,
                                                                       "sequence": 4}
    with pytest.raises(ValueError, match=r"fixed axes multiply to 3, which does not divide the 8 devices"):
        shd.resolve_mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match=r"has 4 devices but 8 are available"):
        shd.resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ValueError, match=r"at most one axis may be -1"):
        shd.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)


def _tiny(*overrides):
    return load_config(None, ["model.vocab_size=64", "model.decoder_embed_dim=32", "model.decoder_value_embed_dim=64",
                              "model.decoder_ffn_embed_dim=48", "model.decoder_layers=2",
                              "model.decoder_retention_heads=4", "data.seq_len=16", *overrides])


def test_sharding_rules_are_megatron_and_fsdp():
    cfg = _tiny()
    _, specs = state_specs(build_module(cfg), build_optimizer(cfg), 16)
    layer = specs.params["model"]["layers_0"]
    for name in ("q_proj", "k_proj", "v_proj", "g_proj"):  # column parallel
        assert layer["retention"][name]["kernel"] == PartitionSpec("fsdp", "tensor")
    assert layer["retention"]["out_proj"]["kernel"] == PartitionSpec("tensor", "fsdp")  # row parallel
    assert layer["ffn"]["fc1"]["kernel"] == layer["ffn"]["gate"]["kernel"] == PartitionSpec("fsdp", "tensor")
    assert layer["ffn"]["fc2"]["kernel"] == PartitionSpec("tensor", "fsdp")
    assert layer["final_rms_norm"]["weight"] == PartitionSpec(None)
    assert specs.params["model"]["embed_tokens"]["embedding"] == PartitionSpec("tensor", "fsdp")
    assert specs.params["lm_head"]["kernel"] == PartitionSpec("fsdp", "tensor")
    # AdamW moments are sharded like their parameters
    adam = [s for s in jax.tree.leaves(specs.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")][0]
    assert adam.mu["lm_head"]["kernel"] == adam.nu["lm_head"]["kernel"] == PartitionSpec("fsdp", "tensor")
    assert shd.batch_spec(2) == PartitionSpec(("data", "fsdp"), None)
    # scan_layers: the same specs behind a replicated leading "layers" axis
    scanned = state_specs(build_module(_tiny("model.scan_layers=true")), build_optimizer(cfg), 16)[1]
    stack = scanned.params["model"]["layers"]
    assert stack["retention"]["out_proj"]["kernel"] == PartitionSpec(None, "tensor", "fsdp")
    assert stack["ffn"]["fc1"]["kernel"] == PartitionSpec(None, "fsdp", "tensor")
    assert stack["final_rms_norm"]["weight"] == PartitionSpec(None, None)


def test_fit_errors_name_the_numbers():
    cfg = _tiny("train.global_batch=6")
    with pytest.raises(ValueError, match=r"global_batch=6 must be divisible by data x fsdp x grad_accum = "
                                         r"2 x 2 x 1 = 4"):
        check_fits(cfg, {"data": 2, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match=r"decoder_retention_heads=4 must be divisible by mesh.tensor=8"):
        check_fits(_tiny("train.global_batch=8"), {"data": 1, "fsdp": 1, "tensor": 8})
    with pytest.raises(ValueError, match=r"recurrent_chunk_size=5 must divide data.seq_len=16"):
        check_fits(_tiny("model.forward_mode=chunkwise", "model.recurrent_chunk_size=5"), {"data": 1, "fsdp": 1, "tensor": 1})
    with pytest.raises(ValueError, match=r"model.forward_mode='recurrent' is invalid for training"):
        check_fits(_tiny("model.forward_mode=recurrent"), {"data": 1, "fsdp": 1, "tensor": 1})
    check_fits(_tiny("model.forward_mode=chunkwise", "model.recurrent_chunk_size=8", "train.global_batch=8",
                     "train.grad_accum=2"), {"data": 2, "fsdp": 2, "tensor": 2})
    _, specs = state_specs(build_module(cfg), build_optimizer(cfg), 16)
    abstract, _ = state_specs(build_module(cfg), build_optimizer(cfg), 16)
    with pytest.raises(ValueError, match=r"\['lm_head'\]\['kernel'\] dim 1 of shape \(32, 64\) has size 64, not "
                                         r"divisible by tensor = 128"):
        shd.check_divisible(abstract.params, specs.params, {"data": 1, "fsdp": 1, "tensor": 128})


def test_schedule_and_decay_mask():
    cfg = _tiny("train.steps=110", "schedule.warmup_steps=10", "schedule.min_lr_ratio=0.1",
                "optimizer.learning_rate=1.0")
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == pytest.approx(0.1) and float(lr(9)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))) and \
        float(lr(110)) == pytest.approx(0.1)
    linear = learning_rate_schedule(_tiny("train.steps=110", "schedule.warmup_steps=10", "schedule.decay=linear",
                                          "optimizer.learning_rate=1.0", "schedule.min_lr_ratio=0.0"))
    assert float(linear(60)) == pytest.approx(0.5)
    abstract, _ = state_specs(build_module(cfg), build_optimizer(cfg), 16)
    mask = weight_decay_mask(abstract.params, decay_norms=False, decay_embeddings=False)
    assert mask["lm_head"]["kernel"] and mask["model"]["layers_1"]["ffn"]["fc2"]["kernel"]
    assert not mask["model"]["embed_tokens"]["embedding"] and not mask["model"]["rms_norm"]["weight"]
    everything = weight_decay_mask(abstract.params, decay_norms=True, decay_embeddings=True)
    assert all(jax.tree.leaves(everything))


def test_flop_count_formula():
    cfg = _tiny()
    model = cfg.model_config()
    abstract, _ = state_specs(build_module(cfg), build_optimizer(cfg), 16)
    n = sum(math.prod(p.shape) for p in jax.tree.leaves(abstract.params))
    # independent count: per layer q,k (E x E), v,g (E x Ev), out (Ev x E), fc1/gate/fc2, two norms; the LM head
    e, ev, f, v, layers = 32, 64, 48, 64, 2
    per_layer = 2 * e * e + 3 * e * ev + 3 * e * f + 2 * e
    assert n == layers * per_layer + v * e + e * v + e + e  # + embedding, lm_head, embedding norm, final norm
    expected = 6 * (n - v * e) + 3 * layers * 16 * (e + ev)
    assert training_flops_per_token(model, n, 16) == expected


@pytest.mark.parametrize("name", sorted(REAL_RUNS))
def test_real_run_configs_shard_on_their_slices(name):
    """Each real-run YAML parses; on an AbstractMesh of its slice every sharding divides its array."""
    cfg = load_config(os.path.join(ROOT, "configs", name))
    assert cfg.model_config().scan_layers
    devices = REAL_RUNS[name]
    mesh = shd.make_abstract_mesh(cfg.mesh.__dict__, devices)
    assert math.prod(mesh.axis_sizes) == devices
    check_fits(cfg, dict(mesh.shape))
    abstract, specs = state_specs(build_module(cfg), build_optimizer(cfg), cfg.data.seq_len)
    shd.check_divisible(abstract.as_dict(), specs.as_dict(), dict(mesh.shape))
    shardings = shd.named_shardings(mesh, specs)
    for leaf, sharding in zip(jax.tree.leaves(abstract.params), jax.tree.leaves(shardings.params)):
        shard = sharding.shard_shape(leaf.shape)  # raises if the mesh does not divide the array
        assert math.prod(shard) * math.prod(mesh.axis_sizes) >= math.prod(leaf.shape)
    layers = cfg.model_config().decoder_layers
    assert all(leaf.shape[0] == layers for leaf in jax.tree.leaves(abstract.params["model"]["layers"]))
    n = sum(math.prod(p.shape) for p in jax.tree.leaves(abstract.params))
    expected = {"1.3b": 1.35e9, "7b": 6.9e9}[name.split("-")[1]]
    assert abs(n - expected) / expected < 0.05


def test_every_shipped_config_parses():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert {os.path.basename(f) for f in files} >= set(REAL_RUNS) | {"tiny.yaml"}
    for f in files:
        cfg = load_config(f)
        assert cfg.model_config().vocab_size >= cfg.data.vocab_size or cfg.data.tokenizer
