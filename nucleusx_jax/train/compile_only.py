"""Compile a run's train and eval steps for a Cloud TPU slice on any host, with the real TPU compiler.

``python train.py --config FILE --compile-only --topology v5p-128`` (docs/tpu.md). libtpu (the ``[tpu]`` extra)
describes a whole slice without hardware (``jax.experimental.topologies``); the CUDA plugin an H100 node
(``--topology h100x8``, :mod:`.gpu_target`, docs/gpu.md). The steps are lowered with abstract
state and batches (``jax.ShapeDtypeStruct``: nothing is allocated, no data is read, the run directory is not
touched) and compiled: the compiler plans every chip's memory, checks HBM and on-chip VMEM, compiles the Mosaic
kernels and lays out the collectives. What it cannot tell is speed.
"""

import dataclasses
import json
import math
import os
import re
import time
from collections import Counter
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from .. import sharding as shd
from .config import Config
from .gpu_target import COMPILER_OPTIONS, GPU_TOPOLOGIES, device_memory, gpu_devices
from .step import Trainer, make_trainer, training_flops_per_token

GiB = 1024**3
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_MOSAIC = 'custom_call_target="tpu_custom_call"'
_TRITON = 'custom_call_target="__gpu$xla.gpu.triton"'
_AVAILABLE_HBM = re.compile(r"exceeds available HBM \(([0-9.]+)([KMGT])\)")
_TEMPORARIES = re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT])\)")
# What the compiler needs to describe a slice without hardware (no metadata server, a single host of its own).
COMPILE_ONLY_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost"}


class Topology(NamedTuple):
    """A Cloud TPU slice as libtpu names it: ``topology`` (generation:chips per axis), ``chip_config``
    (``megacore``: one device per v4/v5p chip) and the chips of one host."""

    topology: str
    chip_config: str
    host_bounds: tuple


# Slice names as Cloud TPU sells them: v4 and v5p count TensorCores (2 per chip), v5e and v6e chips.
TOPOLOGIES: Dict[str, Topology] = {
    "v4-8": Topology("v4:2x2x1", "megacore", (2, 2, 1)),
    "v4-16": Topology("v4:2x2x2", "megacore", (2, 2, 1)),
    "v4-32": Topology("v4:2x2x4", "megacore", (2, 2, 1)),
    "v5p-2": Topology("v5:1x1x1", "megacore", (1, 1, 1)),  # one chip (the server: --serve)
    "v5p-8": Topology("v5:2x2x1", "megacore", (2, 2, 1)),
    "v5p-32": Topology("v5:2x2x4", "megacore", (2, 2, 1)),
    "v5p-128": Topology("v5:4x4x4", "megacore", (2, 2, 1)),
    "v5e-1": Topology("v5e:1x1", "default", (1, 1, 1)),
    "v5e-8": Topology("v5e:2x4", "default", (2, 4, 1)),
    "v5e-256": Topology("v5e:16x16", "default", (2, 2, 1)),
    "v6e-1": Topology("v6e:1x1", "default", (1, 1, 1)),
    "v6e-8": Topology("v6e:2x4", "default", (2, 4, 1)),
    "v6e-256": Topology("v6e:16x16", "default", (2, 2, 1)),
}


def topology_devices(name: str, slices: int = 1) -> List[Any]:
    """The compile-only devices of ``slices`` TPU slices called ``name`` (a key of :data:`TOPOLOGIES`), or of
    the GPU machine ``name`` (a key of :data:`~.gpu_target.GPU_TOPOLOGIES`, one slice).

    Loads libtpu (or the CUDA plugin); set ``JAX_PLATFORMS=cpu`` before jax starts on a host without TPUs
    (train.py does)."""
    if name not in TOPOLOGIES and name not in GPU_TOPOLOGIES:
        raise ValueError(f"--topology {name!r} is unknown: known slices are {', '.join(TOPOLOGIES)}; GPU machines "
                         f"{', '.join(GPU_TOPOLOGIES)}")
    if slices < 1:
        raise ValueError(f"--slices {slices} is invalid: must be >= 1")
    if name in GPU_TOPOLOGIES:
        if slices != 1:
            raise ValueError(f"--slices {slices} is invalid with the GPU machine {name}: must be 1")
        return gpu_devices(name)
    for key, value in COMPILE_ONLY_ENV.items():
        os.environ.setdefault(key, value)
    from jax.experimental import topologies

    t = TOPOLOGIES[name]
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=t.topology, chip_config_name=t.chip_config,
                                            chips_per_host_bounds=t.host_bounds, num_slices=slices)
    except RuntimeError as err:  # no libtpu, or another process holds it (/tmp/libtpu_lockfile)
        raise ValueError(f"libtpu cannot describe --topology {name}{_libtpu_hint(str(err))}: {err}") from None
    return list(desc.devices)


def _libtpu_hint(error: str) -> str:
    """What to do about libtpu's ``error`` when it names a known cause: not installed, or loaded by another
    process on this host (libtpu's own advice, deleting the lockfile, would break that process)."""
    if "not installed" in error:
        return " (pip install 'nucleusx-jax[tpu]')"
    if "libtpu_lockfile" in error:
        return (" (another process on this host has loaded libtpu, which takes one per host: wait for it to end, "
                "or, on a host without TPU chips, set ALLOW_MULTIPLE_LIBTPU_LOAD=1 to run checks side by side; "
                "do not delete /tmp/libtpu_lockfile)")
    return ""


def device_hbm(topology: str, device: Any) -> int:
    """Bytes of memory one program of ``device`` (of ``topology``) may use: :func:`available_hbm` on TPU, the
    target description's memory on GPU."""
    return device_memory(topology) if topology in GPU_TOPOLOGIES else available_hbm(device)


def compiler_options(device: Any) -> Dict[str, Any]:
    """The compile options for ``device``'s platform: none for TPU, no autotuning for a GPU that is not there."""
    return COMPILER_OPTIONS if device.platform == "gpu" else {}


def available_hbm(device: Any) -> int:
    """Bytes of HBM the TPU compiler lets one program of ``device`` use, from the compiler itself: the limit it
    names when refusing a program far larger than any chip (a ~0.1 s compile)."""
    mesh = jax.sharding.Mesh([device], ("x",))
    replicated = NamedSharding(mesh, PartitionSpec())
    huge = jax.jit(lambda x: jnp.sin(x) + jnp.cos(x)[::-1], in_shardings=replicated, out_shardings=replicated)
    try:
        huge.lower(jax.ShapeDtypeStruct((2**38,), jnp.float32)).compile()
    except Exception as err:  # noqa: BLE001 - the compiler's RESOURCE_EXHAUSTED is the answer
        found = _size(_AVAILABLE_HBM, str(err))
        if found is None:
            raise
        return found
    raise RuntimeError(f"the compiler accepted 1 TiB on one {device.device_kind} chip; cannot find its HBM")


def _size(pattern: re.Pattern, message: str) -> Optional[int]:
    """The size in bytes that ``pattern`` finds in a compiler message (``30.75G``: GiB), or None."""
    found = pattern.search(message)
    return None if found is None else int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2)))


@dataclasses.dataclass
class StepPlan:
    """What the compiler planned for one step on one chip (bytes), or its out-of-memory verdict (``error``)."""

    name: str
    compile_s: float
    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    alias_bytes: int = 0
    resident_bytes: int = 0  # state held on the chip besides the arguments (eval: the optimizer state)
    collectives: Dict[str, int] = dataclasses.field(default_factory=dict)
    mosaic_kernels: int = 0
    triton_kernels: int = 0
    error: Optional[str] = None

    @property
    def planned_bytes(self) -> int:
        """Arguments + outputs + temporaries - what outputs reuse of the arguments (+ resident state)."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes + self.resident_bytes


def compile_step(name: str, lowered: Any, device: Any, resident_bytes: int = 0) -> StepPlan:
    """Compile ``lowered`` (a ``jax.stages.Lowered`` for TPU or GPU devices like ``device``): its memory plan
    per chip, the collectives by kind and the Mosaic (TPU) or Triton (GPU) kernel calls of the compiled program
    (a call inside a loop counts once); a RESOURCE_EXHAUSTED compile (HBM or VMEM) becomes ``error``, with the
    temporaries it names (HBM) as the plan."""
    start = time.perf_counter()
    try:
        compiled = lowered.compile(compiler_options(device))
    except Exception as err:  # noqa: BLE001 - only the compiler's out-of-memory verdict is an answer
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        message = " ".join(str(err).split())
        return StepPlan(name, time.perf_counter() - start, temp_bytes=_size(_TEMPORARIES, message) or 0,
                        error=message)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    return StepPlan(name, seconds, memory.argument_size_in_bytes, memory.output_size_in_bytes,
                    memory.temp_size_in_bytes, memory.alias_size_in_bytes, resident_bytes,
                    dict(sorted(Counter(m.group(1) for m in _COLLECTIVE.finditer(text)).items())), text.count(_MOSAIC),
                    text.count(_TRITON))


class DoesNotFitError(RuntimeError):
    """The run does not fit the slice's chips (train.py exits with status 3)."""

    exit_status = 3


def check(cfg: Config, topology: str, slices: int = 1, fit: bool = False) -> Dict[str, Any]:
    """Compile ``cfg``'s train and eval steps (the eval step only when the train step fits) for ``slices`` slices
    of ``topology``; the report as a dict (the keys of ``--report``). ``fit``: first find the fewest microbatches that fit (:func:`fewest_microbatches`).
    Raises ``ValueError`` for sizes that do not fit the mesh or the devices."""
    devices = topology_devices(topology, slices)
    mesh = shd.make_mesh(dataclasses.asdict(cfg.mesh), devices)
    hbm = device_hbm(topology, devices[0])
    if fit:
        cfg = fewest_microbatches(cfg, mesh, hbm)
    trainer = make_trainer(cfg, mesh)
    train = _train_plan(trainer)
    if train.error is not None or train.planned_bytes > hbm:  # the verdict is in; the eval step would not help
        return _report(cfg, trainer, topology, slices, devices, hbm, [train])
    params = trainer.abstract_state.params
    state_bytes = _bytes_per_device(trainer.abstract_state) - _bytes_per_device(params)
    batch = trainer.abstract_step_inputs()[0]
    evaluate = compile_step("eval", trainer.eval_step.lower(params, batch), devices[0], resident_bytes=state_bytes)
    return _report(cfg, trainer, topology, slices, devices, hbm, [train, evaluate])


def _train_plan(trainer: Trainer) -> StepPlan:
    return compile_step("train", trainer.train_step.lower(trainer.abstract_state, *trainer.abstract_step_inputs()),
                        trainer.mesh.devices.flat[0])


def fewest_microbatches(cfg: Config, mesh: jax.sharding.Mesh, hbm: int) -> Config:
    """``cfg`` with the smallest ``train.grad_accum`` (at least its own; the global batch, so the tokens per
    step, unchanged) whose train step fits ``hbm``: a bisection over the counts that divide the rows of each
    chip, compiling the train step once per probe. Raises :class:`DoesNotFitError` when even one row per
    chip per microbatch does not fit."""
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    per_chip = cfg.train.global_batch // rows
    counts = [n for n in range(cfg.train.grad_accum, per_chip + 1) if per_chip % n == 0]
    with_count = lambda n: dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=n))  # noqa: E731
    fits = lambda n: (lambda p: p.error is None and p.planned_bytes <= hbm)(  # noqa: E731
        _train_plan(make_trainer(with_count(n), mesh)))
    if not counts or not fits(counts[-1]):
        raise DoesNotFitError(f"--fit: not even train.grad_accum={per_chip} (one row per chip per microbatch) fits "
                              f"the {hbm / GiB:.2f} GiB of HBM of a {mesh.devices.flat[0].device_kind} chip")
    low, high = 0, len(counts) - 1  # counts[high] fits
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(counts[middle]) else (middle + 1, high)
    return with_count(counts[high])


def _bytes_per_device(tree: Any) -> int:
    """Bytes device 0 holds of a tree of ``jax.ShapeDtypeStruct`` with shardings."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def _report(cfg: Config, trainer: Trainer, topology: str, slices: int, devices: Sequence[Any], hbm: int,
            steps: List[StepPlan]) -> Dict[str, Any]:
    tokens = cfg.train.global_batch * cfg.data.seq_len
    flops = training_flops_per_token(cfg.model_config(), trainer.num_params, cfg.data.seq_len) * tokens
    planned = max(s.planned_bytes for s in steps)
    fits = all(s.error is None for s in steps) and planned <= hbm
    train = steps[0]
    return {
        "topology": topology, "slices": slices, "devices": len(devices), "device_kind": devices[0].device_kind,
        "mesh": dict(trainer.mesh.shape), "hbm_bytes_per_device": hbm, "planned_bytes_per_device": planned,
        "hbm_fraction": planned / hbm, "fits": fits,
        "compile_s": sum(s.compile_s for s in steps), "mosaic_kernels": train.mosaic_kernels,
        "triton_kernels": train.triton_kernels, "collectives": train.collectives, "flops_per_step": flops, "tokens_per_step": tokens,
        "grad_accum": cfg.train.grad_accum, "parameters": trainer.num_params, "steps": {s.name: dict(dataclasses.asdict(s), planned_bytes=s.planned_bytes)
                                                    for s in steps},
    }


def shortfall(report: Dict[str, Any]) -> Optional[str]:
    """One line naming why ``report`` does not fit, or None when it fits."""
    if report["fits"]:
        return None
    kind, hbm = report["device_kind"], report["hbm_bytes_per_device"] / GiB
    for name, s in report["steps"].items():
        if s["error"] is not None:
            return f"the {name} step does not fit a {kind} chip ({hbm:.2f} GiB of HBM): {s['error']}"
    name, s = max(report["steps"].items(), key=lambda item: item[1]["planned_bytes"])
    over = (s["planned_bytes"] - report["hbm_bytes_per_device"]) / GiB
    return (f"the {name} step plans {s['planned_bytes'] / GiB:.2f} GiB per chip, {over:.2f} GiB more than the "
            f"{hbm:.2f} GiB of HBM of a {kind} chip")


def format_report(report: Dict[str, Any]) -> str:
    """The report as a few lines of text."""
    lines = [f"topology   {report['topology']} x {report['slices']} slice(s): {report['devices']} "
             f"{report['device_kind']} devices, mesh {report['mesh']}",
             f"model      {report['parameters']:,} parameters; {report['tokens_per_step']:,} tokens in "
             f"{report['grad_accum']} microbatch(es) and {report['flops_per_step']:.3g} FLOPs (analytic) per step"]
    return "\n".join(lines + format_steps(report, "train"))


def format_steps(report: Dict[str, Any], main: str) -> List[str]:
    """The lines of each step's plan, the verdict, and the collectives and kernels of the ``main`` step."""
    gib = lambda n: f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"  # noqa: E731
    lines = []
    for name, s in report["steps"].items():
        if s["error"] is not None:
            lines.append(f"{name:<10} does not compile: {s['error']}")
            continue
        resident = f" + resident state {gib(s['resident_bytes'])}" if s["resident_bytes"] else ""
        lines.append(f"{name:<10} arguments {gib(s['argument_bytes'])} + outputs {gib(s['output_bytes'])} + "
                     f"temporaries {gib(s['temp_bytes'])} - aliased {gib(s['alias_bytes'])}{resident} = "
                     f"{gib(s['planned_bytes'])} per chip; compiled in {s['compile_s']:.1f} s")
    lines.append(f"memory     plans {gib(report['planned_bytes_per_device'])} of {gib(report['hbm_bytes_per_device'])}"
                 f" HBM per chip ({100 * report['hbm_fraction']:.1f} %): "
                 + ("fits" if report["fits"] else "DOES NOT FIT"))
    collectives = ", ".join(f"{k} {v}" for k, v in report["collectives"].items()) or "none"
    kernels = (f"Triton kernel calls {report['triton_kernels']}" if report.get("triton_kernels")
               else f"Mosaic kernel calls {report['mosaic_kernels']}")
    lines.append(f"{main} step collectives {collectives}; {kernels}")
    return lines


def publish(report: Dict[str, Any], text: str, report_path: Optional[str]) -> Dict[str, Any]:
    """Print ``text`` (the report's lines), write ``report`` as JSON to ``report_path`` when given; raises
    :class:`DoesNotFitError` with the shortfall when it does not fit, else returns ``report``."""
    print(text, flush=True)
    if report_path:
        with open(report_path, "w") as f:
            json.dump(report, f, indent=2)
    reason = shortfall(report)
    if reason is not None:
        raise DoesNotFitError(reason)
    return report


def run(cfg: Config, topology: str, slices: int = 1, report_path: Optional[str] = None,
        fit: bool = False) -> Dict[str, Any]:
    """:func:`check`, print the report (and write it as JSON to ``report_path``); raises
    :class:`DoesNotFitError` with the shortfall when it does not fit."""
    report = check(cfg, topology, slices, fit)
    return publish(report, format_report(report), report_path)
