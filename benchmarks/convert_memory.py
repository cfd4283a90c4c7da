"""Peak memory and speed of checkpoint conversion at full model size.

Writes a synthetic sharded bf16 PyTorch checkpoint with the real shapes of a ``configs/`` model, converts it
to flax and back in child processes (each reports its own peak RSS, ``ru_maxrss`` and ``VmHWM``), checks
that the round trip is bit exact, and deletes everything it wrote:

    python benchmarks/convert_memory.py --config configs/nucleusx-7b.json --workdir /tmp

The bound checked is the converter's promise: peak RSS < 2 x the largest tensor + 1.5 GB.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def peak_rss_gb() -> dict:
    """This process's peak RSS: ``ru_maxrss`` and ``VmHWM`` (they agree because the parent stays small)."""
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "vm_hwm_gb": hwm * 1024 / 1e9}


def write_synthetic(config_path: str, directory: str, max_shard_size: str, fmt: str) -> dict:
    """A bf16 PyTorch checkpoint of the config's shapes (random finite values, the real rel_pos buffers),
    written one tensor at a time; returns the largest tensor's size."""
    import ml_dtypes
    import numpy as np

    from nucleusx_jax import NucleusXConfig, weights
    from nucleusx_jax.pretrained import parse_size
    from nucleusx_jax.tensorio import FORMATS, CheckpointWriter, TensorInfo

    bf16 = np.dtype(ml_dtypes.bfloat16)
    config = NucleusXConfig.from_pretrained(config_path)
    os.makedirs(directory)
    config.save_pretrained(directory)
    buffers = {k: v.astype(bf16) for k, v in weights.rel_pos_buffers(config).items()}
    shapes = weights.expected_torch_shapes(config, "causal_lm")
    entries = [(k, TensorInfo(s, bf16)) for k, s in shapes.items()]
    entries[-1:-1] = [(k, TensorInfo(v.shape, bf16)) for k, v in buffers.items()]  # state_dict order
    writer = CheckpointWriter(directory, FORMATS[fmt], entries, parse_size(max_shard_size))
    rng = np.random.default_rng(0)
    for name in writer.order:
        if name in buffers:
            writer.write(name, buffers[name])
            continue
        bits = rng.integers(0, 2**16, size=shapes[name], dtype=np.uint16) & 0xBFFF  # |x| < 2: no inf or NaN
        writer.write(name, bits.view(bf16))
        del bits
    writer.close()
    return {"largest_tensor_gb": max(info.nbytes for _, info in entries) / 1e9}


def convert(**kwargs: object) -> dict:
    from nucleusx_jax.convert import convert as run

    start = time.perf_counter()
    summary = run(**kwargs, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": summary.bytes, "tensors": summary.tensors, "parameters": summary.parameters,
            "gb_per_s": summary.bytes / 1e9 / seconds}


def same_bits(a_dir: str, b_dir: str) -> dict:
    """Every tensor of two PyTorch checkpoint directories equal bit for bit (streamed)."""
    import numpy as np

    from nucleusx_jax import weights
    from nucleusx_jax.tensorio import CheckpointReader

    with CheckpointReader(weights.find_torch_weights(a_dir)) as a, CheckpointReader(weights.find_torch_weights(b_dir)) as b:
        exact = a.index == b.index and all(np.array_equal(a.read(k).view(np.uint8), b.read(k).view(np.uint8))
                                           for k in a.index)
    return {"round_trip_bit_exact": exact}


TASKS = {"write": write_synthetic, "convert": convert, "verify": same_bits}


def child(task: str, **kwargs: object) -> dict:
    """Run one task in a fresh interpreter (this parent imports nothing heavy, so the child's ``ru_maxrss``,
    which Linux carries over from the parent through exec, is the child's own)."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", task, json.dumps(kwargs)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{task} failed:\n{out.stderr[-5000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/nucleusx-7b.json", help="a configs/*.json model")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the temporary checkpoints go")
    parser.add_argument("--max-shard-size", default="5GB", help="shard size of every checkpoint written")
    parser.add_argument("--source-format", default="safetensors", choices=("safetensors", "bin"))
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    parser.add_argument("--child", nargs=2, metavar=("TASK", "ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = TASKS[args.child[0]](**json.loads(args.child[1]))
        print(json.dumps({**result, **peak_rss_gb()}))
        return
    root = tempfile.mkdtemp(prefix="convert_memory-", dir=args.workdir)
    src, flax, back = (os.path.join(root, n) for n in ("torch", "flax", "back"))
    try:
        start = time.perf_counter()
        written = child("write", config_path=args.config, directory=src, max_shard_size=args.max_shard_size,
                        fmt=args.source_format)
        written["seconds"] = time.perf_counter() - start
        to_flax = child("convert", src=src, dst=flax, to="flax", max_shard_size=args.max_shard_size)
        to_torch = child("convert", src=flax, dst=back, to="torch", max_shard_size=args.max_shard_size,
                         torch_format=args.source_format)
        exact = child("verify", a_dir=src, b_dir=back)["round_trip_bit_exact"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    largest = written["largest_tensor_gb"]
    report = {
        "config": args.config, "parameters": to_flax["parameters"], "checkpoint_gb": to_flax["bytes"] / 1e9,
        "largest_tensor_gb": largest, "bound_gb": 2 * largest + 1.5, "source_format": args.source_format,
        "max_shard_size": args.max_shard_size, "synthetic_write": written, "to_flax": to_flax, "to_torch": to_torch,
        "round_trip_bit_exact": exact,
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.config}: {report['parameters'] / 1e9:.2f}B parameters, {report['checkpoint_gb']:.2f} GB bf16 "
          f"in {args.max_shard_size} {args.source_format} shards; largest tensor {largest:.3f} GB, "
          f"bound 2x largest + 1.5 GB = {report['bound_gb']:.2f} GB")
    for key in ("synthetic_write", "to_flax", "to_torch"):
        r = report[key]
        rate = f", {r['gb_per_s']:.2f} GB/s" if "gb_per_s" in r else ""
        print(f"  {key:15s}: peak RSS {r['peak_rss_gb']:.2f} GB (VmHWM {r['vm_hwm_gb']:.2f}), "
              f"{r['seconds']:.1f} s{rate}")
    print(f"  round trip bit exact: {exact}")


if __name__ == "__main__":
    main()
