"""Compile the server's prefill and batched decode step for one chip on any host, with the real TPU (or GPU)
compiler.

``python train.py --config FILE --compile-only --topology v5p-2 --serve --max-batch 64`` (docs/tpu.md). The
model of the config, its parameters abstract (``jax.ShapeDtypeStruct`` in ``--dtype``: nothing is allocated,
no checkpoint is read), the functions the server compiles (:func:`serving_program`) lowered for the chip and
compiled: weights, the slots' recurrent states, the temporaries of each program against the chip's HBM.
"""

import dataclasses
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..configuration import NucleusXConfig
from ..loading import inference_config
from ..model import NucleusX, compute_dtype
try:  # the server's own code: its package needs the [serve] extra
    from ..serve.backend import Backend
    from ..serve.engine import Engine
except ImportError as err:
    raise ImportError(f"--serve compiles the server's code, which needs the [serve] extra (pip install "
                      f"'nucleusx-jax[serve]'): {err}") from err
from .compile_only import GiB, StepPlan, compile_step, device_hbm, format_steps, publish, topology_devices

SERVER_DTYPE = "float32"  # the server's computation dtype when --dtype is not given (python -m nucleusx_jax.serve)


class ServingProgram(NamedTuple):
    """What the server compiles, with abstract arguments (no shardings).

    ``prefill(*prefill_args, **prefill_static)``: one prompt ``[1, prompt_tokens]`` -> its state;
    ``step(*step_args)``: ``steps_per_call`` recurrent steps of all ``max_batch`` slots (the slots donated).
    ``params`` and ``slots`` are the first two of ``step_args``: the weights and the slots' states, which stay
    on the chip while the server runs."""

    prefill: Any
    prefill_args: Tuple[Any, ...]
    prefill_static: Dict[str, Any]
    step: Any
    step_args: Tuple[Any, ...]
    prompt_tokens: int
    max_batch: int
    steps_per_call: int


def serving_program(config: NucleusXConfig, dtype: str, **engine_options: int) -> ServingProgram:
    """The one place that knows the serving code: the jitted prefill and step of a
    :class:`~nucleusx_jax.serve.engine.Engine` (``engine_options``: ``max_batch``, ``max_prompt_tokens``,
    ``steps_per_call``; the engine's defaults otherwise) over a :class:`~nucleusx_jax.serve.backend.Backend`
    whose parameters are abstract, in ``dtype`` (weights stored in the computation dtype), and their abstract
    arguments. The engine is built under ``jax.eval_shape``, so its slots are shapes, not memory; its
    :meth:`~nucleusx_jax.serve.engine.Engine.abstract_step_inputs` gives the step's arguments. The prefill is
    the engine's for its longest prompt (``max_prompt_tokens - 1`` tokens, padded to the engine's bucket)."""
    dt, config = compute_dtype(dtype), inference_config(config)
    model = NucleusX(config, dtype=dt, param_dtype=dt, init=False)
    params = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    built = []
    jax.eval_shape(lambda: built.append(Engine(Backend(config, model.module, params), **engine_options)))
    engine = built[0]
    slots, rows = engine.abstract_step_inputs()
    length, mode, chunk_size = engine.prefill_form(engine.max_prompt_tokens - 1)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return ServingProgram(engine.prefill, (params, ids, ids), dict(mode=mode, chunk_size=chunk_size), engine.step,
                          (params, slots, rows), length, engine.max_batch, engine.steps_per_call)


def decode_flops_per_token(config: NucleusXConfig, num_params: int) -> float:
    """Model FLOPs of one recurrent decode token: ``2 * N + 4 * L * E * E_v / H`` (``N`` the parameters but the
    input embedding table, a multiply-add each; per layer and head the state update ``k^T v`` and the read
    ``q S``, ``2 * K * V`` each, ``H * K * V = E * E_v / H``)."""
    embedding = config.vocab_size * config.decoder_embed_dim
    dense = num_params - (0 if config.tie_word_embeddings else embedding)
    state = config.decoder_embed_dim * config.decoder_value_embed_dim / config.decoder_retention_heads
    return 2.0 * dense + 4.0 * config.decoder_layers * state


def _on(device: Any, tree: Any) -> Any:
    """``tree`` of ``jax.ShapeDtypeStruct`` placed on ``device`` (whole, one device)."""
    whole = NamedSharding(Mesh([device], ("chip",)), PartitionSpec())
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole), tree)


def _nbytes(tree: Any) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def check(config: NucleusXConfig, topology: str, dtype: Optional[str] = None, **engine_options: int) -> Dict[str, Any]:
    """Compile the server's decode step and its longest prefill for the one chip of ``topology``; the report as
    a dict (the train report's keys, the decode step's collectives, kernels, FLOPs and tokens, and ``serve``).
    The prefill's plan counts the slots' states as resident (the server holds them while it prefills)."""
    devices = topology_devices(topology)
    if len(devices) != 1:
        raise ValueError(f"--serve compiles the server, which runs on one chip: --topology {topology} has "
                         f"{len(devices)}; use a one-chip topology such as v5p-2, v5e-1, v6e-1 or h100x1")
    device, dtype = devices[0], dtype or SERVER_DTYPE
    program = serving_program(config, dtype, **engine_options)
    params, slots = program.step_args[:2]
    hbm = device_hbm(topology, device)
    steps = [compile_step("decode", program.step.lower(*_on(device, program.step_args)), device)]
    if steps[0].error is None and steps[0].planned_bytes <= hbm:
        steps.append(compile_step("prefill", program.prefill.lower(*_on(device, program.prefill_args),
                                                                    **program.prefill_static),
                                  device, resident_bytes=_nbytes(slots)))
    num_params = sum(a.size for a in jax.tree.leaves(params))
    tokens = program.max_batch * program.steps_per_call
    return _report(topology, device, hbm, steps, num_params, tokens,
                   decode_flops_per_token(config, num_params) * tokens, weights=_nbytes(params),
                   cache=_nbytes(slots), serve=dict(dtype=dtype, max_batch=program.max_batch,
                                                    steps_per_call=program.steps_per_call,
                                                    prefill_tokens=program.prompt_tokens,
                                                    prefill_mode=program.prefill_static["mode"]))


def _report(topology: str, device: Any, hbm: int, steps: List[StepPlan], num_params: int, tokens: int,
            flops: float, *, weights: int, cache: int, serve: Dict[str, Any]) -> Dict[str, Any]:
    planned = max(s.planned_bytes for s in steps)
    decode: StepPlan = steps[0]
    return {
        "topology": topology, "slices": 1, "devices": 1, "device_kind": device.device_kind, "mesh": {"chip": 1},
        "hbm_bytes_per_device": hbm, "planned_bytes_per_device": planned, "hbm_fraction": planned / hbm,
        "fits": all(s.error is None for s in steps) and planned <= hbm,
        "compile_s": sum(s.compile_s for s in steps), "mosaic_kernels": decode.mosaic_kernels,
        "triton_kernels": decode.triton_kernels,
        "collectives": decode.collectives, "flops_per_step": flops, "tokens_per_step": tokens,
        "parameters": num_params, "weights_bytes_per_device": weights, "cache_bytes_per_device": cache,
        "serve": serve,
        "steps": {s.name: dict(dataclasses.asdict(s), planned_bytes=s.planned_bytes) for s in steps},
    }


def format_report(report: Dict[str, Any]) -> str:
    """The report as a few lines of text."""
    s = report["serve"]
    lines = [f"topology   {report['topology']}: 1 {report['device_kind']} chip; the server in {s['dtype']}",
             f"model      {report['parameters']:,} parameters: weights {report['weights_bytes_per_device'] / GiB:.2f} "
             f"GiB; {s['max_batch']} slots' states {report['cache_bytes_per_device'] / GiB:.2f} GiB",
             f"decode     {report['tokens_per_step']:,} tokens per call ({s['max_batch']} slots x {s['steps_per_call']}"
             f" steps), {report['flops_per_step']:.3g} FLOPs (analytic); prefill {s['prefill_tokens']} tokens "
             f"({s['prefill_mode']})"]
    return "\n".join(lines + format_steps(report, "decode"))


def run(config: NucleusXConfig, topology: str, dtype: Optional[str] = None, report_path: Optional[str] = None,
        **engine_options: int) -> Dict[str, Any]:
    """:func:`check`, print the report (and write it as JSON to ``report_path``); raises
    :class:`~.compile_only.DoesNotFitError` with the shortfall when it does not fit."""
    report = check(config, topology, dtype, **engine_options)
    return publish(report, format_report(report), report_path)
