"""The Pallas kernels' estimated on-chip working set per program on the GPU layout, for every model config.

``python benchmarks/kernel_memory.py``: for each distinct (K, V, C) of ``configs/`` (JSON files and the YAMLs'
model sections), the GPU geometry and the most :func:`nucleusx_jax.kernels.chunkwise.working_set` over the
three kernels with and without segments, for bf16 and float32 inputs, with the default row tile and with one
tile per chunk (the layout before the intra-chunk tiling), against ``GPU_WORKING_SET_BUDGET``. Pure
arithmetic on shapes: no GPU needed, nothing compiled.
"""

import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nucleusx_jax.configuration import NucleusXConfig  # noqa: E402
from nucleusx_jax.kernels import chunkwise as cw  # noqa: E402
from nucleusx_jax.train.config import load_config  # noqa: E402


def config_dims() -> dict:
    """{(K, V, C): [config file names]} over configs/*.json and configs/*.yaml."""
    out: dict = {}
    configs = os.path.join(ROOT, "configs")
    for path in sorted(glob.glob(os.path.join(configs, "*.json")) + glob.glob(os.path.join(configs, "*.yaml"))):
        config = NucleusXConfig.from_pretrained(path) if path.endswith(".json") else load_config(path).model_config()
        key = (config.key_head_dim, config.value_head_dim, config.recurrent_chunk_size)
        out.setdefault(key, []).append(os.path.basename(path))
    return out


def peak_kib(geo: cw.Geometry, itemsize: int) -> float:
    return max(cw.working_set(geo, kernel=k, segments=s, itemsize=itemsize)
               for k in cw.KERNELS for s in (False, True)) / 1024


def main() -> None:
    print(f"budget {cw.GPU_WORKING_SET_BUDGET / 1024:.0f} KiB per program")
    print("| K, V, C | Kp, block_v, Vp, tile | tiled bf16 / f32 KiB | one tile per chunk bf16 / f32 KiB | configs |")
    print("|---|---|---|---|---|")
    for (kdim, vdim, chunk), names in sorted(config_dims().items()):
        geo = cw.geometry("gpu", length=4096, key_dim=kdim, value_dim=vdim, chunk_size=chunk)
        whole = geo._replace(tile=geo.block_rows)
        print(f"| {kdim}, {vdim}, {chunk} | {geo.key_dim}, {geo.block_v}, {geo.value_dim}, {geo.tile} "
              f"| {peak_kib(geo, 2):.1f} / {peak_kib(geo, 4):.1f} "
              f"| {peak_kib(whole, 2):.0f} / {peak_kib(whole, 4):.0f} "
              f"| {', '.join(names)} |")


if __name__ == "__main__":
    main()
