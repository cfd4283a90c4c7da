"""The real TPU compiler on this CPU host (libtpu, the [tpu] extra; docs/tpu.md): meshes on the physical torus,
the Pallas kernel compiled by Mosaic on every TPU generation and under shard_map on several chips, and
``train.py --compile-only`` with its report and exit statuses. Small models, 4 to 64 chips."""

import json
import math
import os
import select
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding

pytest.importorskip("libtpu", reason="needs libtpu (pip install -e '.[tpu]'; the [test] extra has it)")

from nucleusx_jax import kernels  # noqa: E402
from nucleusx_jax import retention as ret  # noqa: E402
from nucleusx_jax import sharding as shd  # noqa: E402
from nucleusx_jax.kernels import chunkwise as cw  # noqa: E402
from nucleusx_jax.train import compile_only  # noqa: E402
from nucleusx_jax.train.config import load_config  # noqa: E402
from test_kernels import _config_dims  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "tiny.yaml")
MOSAIC = 'custom_call_target="tpu_custom_call"'
# a small model that the kernels accept at the TPU's 8 x 128 tiling without much padding
SMALL = ["model.vocab_size=256", "model.decoder_embed_dim=256", "model.decoder_value_embed_dim=256",
         "model.decoder_ffn_embed_dim=256", "model.decoder_layers=2", "model.decoder_retention_heads=2",
         "model.forward_mode=chunkwise", "model.recurrent_chunk_size=64", "data.seq_len=128",
         "train.global_batch=8", "train.dtype=bfloat16"]


@pytest.fixture(scope="module", autouse=True)
def compile_only_environment():
    """The environment compile_only sets for libtpu (TPU_WORKER_HOSTNAMES ...) is undone after this module: in
    a later test's trainer it would ask for jax.distributed (a TPU pod's variable)."""
    saved = {key: os.environ.get(key) for key in compile_only.COMPILE_ONLY_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_mesh_on_the_v5p_128_torus():
    """data 2 x fsdp 32 on the 4x4x4 torus of a v5p-128 (jax.make_mesh refuses it): every chip once, each fsdp
    group a 32-chip half of the torus (a box, so its all-gathers stay on short links)."""
    devices = compile_only.topology_devices("v5p-128")
    with pytest.raises(NotImplementedError, match="allow_split_physical_axes"):
        jax.make_mesh((2, 32, 1, 1), shd.MESH_AXES, devices=devices)
    mesh = shd.make_mesh({"data": 2, "fsdp": 32}, devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 32, "tensor": 1, "sequence": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    for group in mesh.devices[:, :, 0, 0]:
        coords = np.array([d.coords for d in group])
        assert math.prod(int(n) for n in coords.max(0) - coords.min(0) + 1) == 32, coords


def test_hybrid_mesh_over_slices_and_impossible_layouts():
    """Two v5p-8 slices: the data axis runs across slices (outer) and inside each; fsdp stays in one slice. A
    data axis that the slices do not divide, or sizes that do not multiply to the chips, are one clear error."""
    devices = compile_only.topology_devices("v5p-8", slices=2)
    mesh = shd.make_mesh({"data": 4, "fsdp": 2}, devices)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices[:, :, 0, 0])
    np.testing.assert_array_equal(slices, [[0, 0], [0, 0], [1, 1], [1, 1]])
    with pytest.raises(ValueError, match="mesh.data=1 must be a multiple of the 2 TPU slices"):
        shd.make_mesh({"data": 1, "fsdp": 8}, devices)
    with pytest.raises(ValueError, match="has 6 devices but 8 are available"):
        shd.make_mesh({"data": 2, "fsdp": 3}, devices)


def test_kernel_compiles_for_the_mesh_devices_not_the_host():
    """Compiled for 4 TPU chips from this CPU host, a data-parallel kernel step runs the three Mosaic kernels
    (forward, dq, dk/dv) on each chip's own rows: no interpreted kernel, no rows gathered onto every chip."""
    devices = compile_only.topology_devices("v5p-8")
    mesh = shd.make_mesh({"data": 2, "fsdp": 2}, devices)
    log_decay = jnp.asarray(ret.log_decay_table(2, use_lm_decay=False))

    def loss(q, k, v, segments):
        out = kernels.sharded_chunkwise_retention(q, k, v, log_decay, 64, None, segments)
        return jnp.sum(out.astype(jnp.float32))

    rows = NamedSharding(mesh, shd.batch_spec(4))
    qkv = jax.ShapeDtypeStruct((8, 2, 256, 128), jnp.bfloat16, sharding=rows)
    segments = jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=NamedSharding(mesh, shd.batch_spec(2)))
    seen = []
    with jax.set_mesh(mesh):
        jax.jit(lambda x: seen.append(kernels.target_platform()) or x).trace(jax.ShapeDtypeStruct((), jnp.float32))
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv, segments).compile().as_text()
    assert seen == ["tpu"] and kernels.target_platform() == jax.default_backend() == "cpu"
    assert text.count(MOSAIC) == len(cw.KERNELS)
    assert "all-gather" not in text


@pytest.mark.parametrize("topology", ["v4-8", "v5e-8", "v5p-8", "v6e-8"])
def test_kernels_compile_with_mosaic_on_every_generation(topology):
    """The forward and both backward kernels (bf16, as trained), with and without segments, at every config's
    head shapes (K, V, C), compiled, not only lowered, by Mosaic for one chip of each TPU generation; the
    compiler checks the blocks and the VMEM they take. Mosaic sees the padded shapes, so each padded geometry
    is compiled once (today two: K, V padded to 128, 128 and to 256, 512; C = 512)."""
    device = compile_only.topology_devices(topology)[0]
    one = SingleDeviceSharding(device)
    log_decay = jnp.asarray(ret.log_decay_table(2, use_lm_decay=False))
    padded = {}
    for kdim, vdim, chunk in sorted({d[1:] for d in _config_dims()}):
        geo = cw.geometry("tpu", length=2 * chunk + 3, key_dim=kdim, value_dim=vdim, chunk_size=chunk)
        padded.setdefault(geo._replace(chunk=0), (kdim, vdim, chunk))
    for kdim, vdim, chunk in padded.values():
        def grads(q, k, v, seg):
            def loss(q, k, v, s):
                out = kernels.chunkwise_retention(q, k, v, log_decay, chunk, None, s, layout="tpu", interpret=False)
                return jnp.sum(out.astype(jnp.float32))
            return [jax.grad(loss, argnums=(0, 1, 2))(q, k, v, s) for s in (None, seg)]

        length = 2 * chunk + 3
        qk = jax.ShapeDtypeStruct((1, 2, length, kdim), jnp.bfloat16, sharding=one)
        v = jax.ShapeDtypeStruct((1, 2, length, vdim), jnp.bfloat16, sharding=one)
        seg = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=one)
        text = jax.jit(grads).lower(qk, qk, v, seg).compile().as_text()
        assert text.count(MOSAIC) == 2 * len(cw.KERNELS), (topology, kdim, vdim, chunk)


def test_pallas_train_step_on_four_chips_with_data_and_fsdp():
    """retention_impl: pallas trains on a mesh: the whole train step for 4 v4 chips (data 2 x fsdp 2)
    compiles with the Mosaic kernels in it, and fits."""
    cfg = load_config(TINY_YAML, SMALL + ["model.retention_impl=pallas", "mesh.data=2", "mesh.fsdp=2"])
    report = compile_only.check(cfg, "v4-8")
    assert report["fits"] and report["devices"] == 4
    assert report["mosaic_kernels"] >= len(cw.KERNELS), report
    assert report["collectives"].get("all-gather", 0) > 0  # fsdp gathers the weights


def _train_main(argv, capsys):
    import train

    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(train.main(argv))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_compile_only_cli_fits_and_writes_the_report(tmp_path, capsys):
    """Exit 0, the report's keys and figures consistent with themselves and the config, run dir untouched."""
    run_dir, path = tmp_path / "run", tmp_path / "report.json"
    code, out, err = _train_main(["--config", TINY_YAML, "--compile-only", "--topology", "v6e-8", "--report", str(path),
                                  "--set", f"train.run_dir={run_dir}", *sum((["--set", s] for s in SMALL), [])], capsys)
    assert code == 0, err
    report = json.loads(path.read_text())
    assert report["topology"] == "v6e-8" and report["devices"] == 8 and report["fits"] is True
    assert report["tokens_per_step"] == 8 * 128
    train_plan = report["steps"]["train"]
    assert train_plan["planned_bytes"] == (train_plan["argument_bytes"] + train_plan["output_bytes"]
                                           + train_plan["temp_bytes"] - train_plan["alias_bytes"])
    assert 0 < report["planned_bytes_per_device"] < report["hbm_bytes_per_device"] < 40 * 2**30
    assert report["collectives"]["all-reduce"] > 0 and report["mosaic_kernels"] == 0 and report["compile_s"] > 0
    assert "fits" in out and "v6e-8" in out
    assert not run_dir.exists()


# 1.6e9 parameters replicated on each of the 8 chips (data 8): weights, AdamW moments and gradients take 24 GiB
BIG = sum((["--set", s] for s in SMALL + ["model.decoder_embed_dim=8192", "model.decoder_value_embed_dim=8192",
                                          "model.decoder_ffn_embed_dim=8192", "model.decoder_layers=3"]), [])


def test_compile_only_cli_does_not_fit_and_user_errors(tmp_path, capsys):
    """Exit 3 with one line of numbers when the plan exceeds the chip's HBM; exit 2 for an unknown topology and
    for a mesh that the chips do not make."""
    code, out, err = _train_main(["--config", TINY_YAML, "--compile-only", "--topology", "v5e-8", *BIG], capsys)
    assert code == 3, err
    assert len(err.strip().splitlines()) == 1 and "GiB" in err and "TPU v5 lite" in err, err
    code, _, err = _train_main(["--config", TINY_YAML, "--compile-only", "--topology", "v5x-8"], capsys)
    assert code == 2 and "v5x-8" in err and "v5p-128" in err
    code, _, err = _train_main(["--config", TINY_YAML, "--compile-only", "--topology", "v4-8", "--set", "mesh.data=3"],
                               capsys)
    assert code == 2 and "has 3 devices but 4 are available" in err
    code, _, err = _train_main(["--config", TINY_YAML, "--topology", "v4-8"], capsys)
    assert code == 2 and "--compile-only" in err


# a process that loads libtpu (without ALLOW_MULTIPLE_LIBTPU_LOAD, so it takes /tmp/libtpu_lockfile) and waits
HOLD_LIBTPU = ("import sys; from nucleusx_jax.train import compile_only; compile_only.topology_devices('v5p-8'); "
               "print('holding', flush=True); sys.stdin.read()")


def test_a_second_libtpu_process_is_a_clear_error_unless_allowed():
    """libtpu takes one process per host: while another holds it, ``train.py --compile-only`` exits 2 naming
    the cause and the way out (not libtpu's advice to delete the lockfile); ``ALLOW_MULTIPLE_LIBTPU_LOAD=1``
    describes the slice beside it. The holder may fail to load when this very process holds the lock already
    (it loaded libtpu above without the variable): either way the lock is held."""
    env = {k: v for k, v in os.environ.items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
    env["JAX_PLATFORMS"] = "cpu"
    with subprocess.Popen([sys.executable, "-c", HOLD_LIBTPU], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as holder:
        try:
            # "holding", or the start of its traceback once it has failed; a deadline, as for every wait
            assert select.select([holder.stdout], [], [], 240)[0], "the holder printed nothing in 240 s"
            assert holder.stdout.readline(), "the holder printed nothing"
            second = subprocess.run([sys.executable, "train.py", "--config", TINY_YAML, "--compile-only", "--topology",
                                     "v5p-8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
            assert second.returncode == 2, second.stderr[-2000:]
            assert "another process on this host has loaded libtpu" in second.stderr, second.stderr[-2000:]
            assert "ALLOW_MULTIPLE_LIBTPU_LOAD=1" in second.stderr and "do not delete" in second.stderr
            allowed = subprocess.run([sys.executable, "-c", "from nucleusx_jax.train import compile_only; "
                                      "print(len(compile_only.topology_devices('v5p-8')))"], cwd=ROOT,
                                     env={**env, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}, capture_output=True, text=True,
                                     timeout=240)
            assert allowed.returncode == 0 and allowed.stdout.split()[-1] == "4", allowed.stderr[-2000:]
        finally:
            holder.kill()


def test_fit_says_when_no_microbatch_count_fits(capsys):
    """--fit cannot split weights: with one row per chip already, it ends with status 3 and says so."""
    code, _, err = _train_main(["--config", TINY_YAML, "--compile-only", "--topology", "v5e-8", "--fit", *BIG], capsys)
    assert code == 3 and "--fit: not even train.grad_accum=1" in err and "15.75 GiB" in err, err


def test_serve_compiles_the_decode_step_and_prefill_for_one_chip(tmp_path, capsys):
    """--serve: the server's decode step (max_batch slots, steps_per_call steps) and its longest prefill for one
    v5p chip, in the server's default dtype (float32); weights and states are the model's own sizes, the
    states donated to the step and resident during the prefill."""
    path = tmp_path / "serve.json"
    code, out, err = _train_main(["--config", TINY_YAML, "--compile-only", "--topology", "v5p-2", "--serve",
                                  "--max-batch", "8", "--max-prompt-tokens", "100", "--report", str(path),
                                  *sum((["--set", s] for s in SMALL), [])], capsys)
    assert code == 0, err
    report = json.loads(path.read_text())
    cfg = load_config(TINY_YAML, SMALL).model_config()
    layers, heads, kdim, vdim = (cfg.decoder_layers, cfg.decoder_retention_heads, cfg.key_head_dim,
                                 cfg.value_head_dim)
    states = layers * 8 * 4 * (heads * kdim * vdim + heads)  # per layer kv [S, H, V, K] and scale [S, H] float32
    assert report["devices"] == 1 and report["device_kind"] == "TPU v5" and report["fits"] is True
    assert report["weights_bytes_per_device"] == 4 * report["parameters"]
    # + per layer seqlen [S], and each slot's next token and count [S] (int32)
    assert report["cache_bytes_per_device"] == states + (layers + 2) * 8 * 4
    assert report["serve"] == {"dtype": "float32", "max_batch": 8, "steps_per_call": 4, "prefill_tokens": 128,
                               "prefill_mode": "parallel"}
    assert report["tokens_per_step"] == 8 * 4
    decode, prefill = report["steps"]["decode"], report["steps"]["prefill"]
    assert decode["argument_bytes"] >= report["weights_bytes_per_device"] + report["cache_bytes_per_device"]
    assert decode["alias_bytes"] >= report["cache_bytes_per_device"]  # the slots are donated
    assert prefill["resident_bytes"] == report["cache_bytes_per_device"]
    assert report["planned_bytes_per_device"] == max(decode["planned_bytes"], prefill["planned_bytes"])
    assert "decode" in out and "prefill" in out and "fits" in out


def test_serving_program_is_the_engines_in_the_asked_dtype():
    """The functions compiled are the engine's own: bfloat16 weights, its slot layout, its prompt bucket."""
    from nucleusx_jax.serve.engine import Engine
    from nucleusx_jax.train.compile_serve import serving_program

    program = serving_program(load_config(TINY_YAML, SMALL).model_config(), "bfloat16", max_batch=3,
                              max_prompt_tokens=17)
    params, slots, rows = program.step_args
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert slots.token.shape == rows.active.shape == (3,) and program.prompt_tokens == 16
    assert program.step.__wrapped__.__func__ is Engine._step and program.steps_per_call == 4
    assert program.prefill_args[1].shape == (1, 16)


def test_serve_does_not_fit_and_user_errors(capsys):
    """Exit 3 when the weights and the slots' states outgrow the chip; exit 2 for a topology of several chips and
    for serving options without --serve or out of range."""
    code, _, err = _train_main(["--config", TINY_YAML, "--compile-only", "--topology", "v5e-1", "--serve",
                                "--max-batch", "64", *BIG], capsys)
    assert code == 3 and "GiB" in err and "TPU v5 lite" in err, err
    code, _, err = _train_main(["--config", TINY_YAML, "--compile-only", "--topology", "v5p-8", "--serve"], capsys)
    assert code == 2 and "one chip" in err and "v5p-8 has 4" in err, err
    code, _, err = _train_main(["--config", TINY_YAML, "--compile-only", "--topology", "v5p-2", "--max-batch", "8"],
                               capsys)
    assert code == 2 and "go with --serve" in err
    code, _, err = _train_main(["--config", TINY_YAML, "--compile-only", "--topology", "v5p-2", "--serve",
                                "--max-batch", "0"], capsys)
    assert code == 2 and "max_batch=0 is invalid" in err
