"""GPU machines for compile-only mode, described without a GPU: XLA's GPU compiler (the CUDA plugin,
``jax[cuda12]``) compiles for a *target description* (``gpu_specs/*.txtpb``, XLA's own, vendored) instead of a
device. docs/gpu.md."""

import os
import re
from typing import Any, Dict, List, NamedTuple

SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
# No GPU to time candidate kernels on: XLA picks its default GEMM and fusion configurations. No CUB radix sort
# either: XLA turns large sorts (the server's top-k / top-p over [64, 32000] logits) into CUB calls whose scratch
# size it asks a CUDA device for ("cudaErrorInvalidDevice: invalid device ordinal" without one); they compile as
# XLA's own sort instead (docs/gpu.md).
COMPILER_OPTIONS = {"xla_gpu_autotune_level": 0, "xla_gpu_enable_cub_radix_sort": False}
INSTALL = "pip install 'jax[cuda12]==0.10.2' (the CUDA plugin; no GPU needed to compile)"


class GpuTopology(NamedTuple):
    """``spec``: a target description in ``gpu_specs``; ``topology``: jax's ``SLICESxHOSTSxGPUS``."""

    spec: str
    topology: str


GPU_TOPOLOGIES: Dict[str, GpuTopology] = {
    "h100x1": GpuTopology("h100_sxm.txtpb", "1x1x1"),
    "h100x8": GpuTopology("h100_sxm.txtpb", "1x1x8"),  # one HGX H100 node (configs/nucleusx-7b-8xh100.yaml)
}


def spec_text(name: str) -> str:
    """The target description of the GPUs of ``name`` (a key of :data:`GPU_TOPOLOGIES`)."""
    with open(os.path.join(SPECS, GPU_TOPOLOGIES[name].spec)) as f:
        return f.read()


def device_memory(name: str) -> int:
    """Bytes of memory of one GPU of ``name``: the target description's ``device_memory_size``."""
    return int(re.search(r"^\s*device_memory_size:\s*(\d+)", spec_text(name), re.M).group(1))


def gpu_devices(name: str) -> List[Any]:
    """The compile-only devices of the machine ``name``. Needs the CUDA plugin (:data:`INSTALL`), not a GPU."""
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="cuda", target_config=spec_text(name),
                                            topology=GPU_TOPOLOGIES[name].topology)
    except (RuntimeError, ValueError) as err:  # no CUDA plugin, or a description it cannot read
        raise ValueError(f"jax cannot describe --topology {name} ({INSTALL}): {err}") from None
    return list(desc.devices)
