"""Sequence parallelism, compile only: XLA's memory plan per device and the bytes its collectives move.

``python benchmarks/sequence_parallel.py`` builds the bench-small model's next-token loss forward+backward
(chunkwise, chunk 256, batch 1, the parameters replicated; ``--segments``: with document ids) on meshes that
split T over ``sequence`` = 1, 2, 4, 8 simulated CPU devices, compiles it (nothing runs) and reports:

* the memory XLA plans per device (arguments + outputs + temporaries, ``memory_analysis()``) at
  T = 8192 and 65536, and the longest T (a multiple of 1024) whose plan fits ``--budget-gib``: fitted
  linearly from those two, then compiled to confirm;
* the bytes moved by every collective of the compiled HLO (:func:`collective_bytes`), at both lengths.
"""

import argparse
import json
import os
import re
import sys
from typing import Any, Dict, Sequence, Tuple

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from nucleusx_jax import sharding as shd  # noqa: E402
from nucleusx_jax.configuration import NucleusXConfig  # noqa: E402
from nucleusx_jax.modeling import NucleusXForCausalLMModule, RunOptions  # noqa: E402

BENCH_SMALL = dict(vocab_size=32000, decoder_embed_dim=512, decoder_value_embed_dim=1024, decoder_retention_heads=4,
                   decoder_ffn_embed_dim=1024, decoder_layers=4)  # as benchmarks/run.py
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all",
               "collective-broadcast", "ragged-all-to-all")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_INSTRUCTION = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
GIB = 2**30


def collective_bytes(hlo_text: str) -> Dict[str, int]:
    """Bytes of the results of the collectives in optimized HLO text, summed per kind (``all-gather``: the
    gathered array, ``all-reduce``: the reduced one, ...; an async ``-start`` counted once, its ``-done`` not).
    Each instruction counts once, also inside a loop body."""
    totals: Dict[str, int] = {}
    for match in _INSTRUCTION.finditer(hlo_text):
        result, kind = match.group(1), match.group(2)
        shapes = _SHAPE.findall(result)
        if result.startswith("(") and match.group(0).rstrip("(").endswith("-start"):
            shapes = shapes[len(shapes) // 2:]  # async start: (operands, results)
        size = sum(DTYPE_BYTES[dt] * _prod(dims) for dt, dims in shapes)
        totals[kind] = totals.get(kind, 0) + size
    return totals


def _prod(dims: str) -> int:
    out = 1
    for d in filter(None, dims.split(",")):
        out *= int(d)
    return out


def compile_loss(config: NucleusXConfig, sequence: int, length: int, segments: bool = False) -> Any:
    """The compiled forward+backward of ``config``'s next-token loss at batch 1 x ``length`` on ``sequence``
    devices (the parameters replicated); with ``segments`` it also takes document segment ids."""
    module = NucleusXForCausalLMModule(config)
    mesh = shd.make_mesh({"sequence": sequence}, jax.devices()[:sequence])
    params = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))))
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=replicated), params["params"])
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=NamedSharding(mesh, shd.token_spec()))
    options = RunOptions.from_config(config)

    def loss(p: Any, ids: jax.Array, labels: jax.Array, segment_ids: Any = None) -> jax.Array:
        return module.apply({"params": p}, ids, labels, None, segment_ids, options=options,
                            method=NucleusXForCausalLMModule.next_token_loss)

    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.LOGICAL_AXIS_RULES):
        return jax.jit(jax.grad(loss)).lower(params, tokens, tokens, *([tokens] if segments else [])).compile()


def plan_bytes(compiled: Any) -> int:
    """Arguments + outputs + temporaries of XLA's memory plan (per device)."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


def measure(sequence: int, lengths: Tuple[int, int], chunk: int, budget: float, segments: bool) -> Dict[str, Any]:
    """Plans and collective bytes at ``lengths``, and the longest length fitting ``budget`` bytes."""
    row: Dict[str, Any] = {"sequence": sequence}
    config = NucleusXConfig(**BENCH_SMALL, forward_mode="chunkwise", recurrent_chunk_size=chunk)
    plans = {}
    for length in lengths:
        compiled = compile_loss(config, sequence, length, segments)
        plans[length] = plan_bytes(compiled)
        row[f"plan_gib_T{length}"] = plans[length] / GIB
        row[f"collective_bytes_T{length}"] = collective_bytes(compiled.as_text())
    (t0, m0), (t1, m1) = sorted(plans.items())
    per_token = (m1 - m0) / (t1 - t0)
    step = 1024 * sequence
    longest = int((budget - (m0 - per_token * t0)) / per_token) // step * step
    while longest > 0:
        need = plan_bytes(compile_loss(config, sequence, longest, segments))
        if need <= budget:
            break
        longest -= step  # the fit was optimistic
    row.update(longest_T=longest, plan_gib_longest=need / GIB)
    return row


def main(argv: Sequence[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequence", default="1,2,4,8", help="sizes of the sequence axis")
    p.add_argument("--lengths", default="8192,65536", help="the two lengths compiled on every mesh")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--budget-gib", type=float, default=12.0)
    p.add_argument("--segments", action="store_true", help="with document segment ids")
    args = p.parse_args(argv)
    lengths = tuple(int(x) for x in args.lengths.split(","))
    rows = []
    for sequence in (int(x) for x in args.sequence.split(",")):
        rows.append(measure(sequence, lengths, args.chunk, args.budget_gib * GIB, args.segments))
        print(json.dumps(rows[-1]), flush=True)
    base = {r["sequence"]: r for r in rows}.get(1)
    print(f"\n| sequence | plan T={lengths[0]} (GiB) | plan T={lengths[1]} (GiB) | vs 1 device | "
          f"longest T in {args.budget_gib:g} GiB | collective bytes T={lengths[0]} | T={lengths[1]} |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r[f'plan_gib_T{lengths[1]}'] / base[f'plan_gib_T{lengths[1]}']:.3f}" if base else "-"
        print(f"| {r['sequence']} | {r[f'plan_gib_T{lengths[0]}']:.2f} | {r[f'plan_gib_T{lengths[1]}']:.2f} | {ratio} "
              f"| {r['longest_T']} | {sum(r[f'collective_bytes_T{lengths[0]}'].values())} "
              f"| {sum(r[f'collective_bytes_T{lengths[1]}'].values())} |")


if __name__ == "__main__":
    main()
