"""Peak memory and speed of checkpoint conversion at full model size.

Writes a synthetic sharded bf16 PyTorch checkpoint with the real shapes of a ``configs/`` model, converts it
to flax and back in child processes (each reports its own peak RSS, ``ru_maxrss``), checks that the round
trip is bit exact, and deletes everything it wrote:

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

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nucleusx_jax import NucleusXConfig, weights  # noqa: E402
from nucleusx_jax.convert import parse_size  # noqa: E402
from nucleusx_jax.tensorio import FORMATS, CheckpointReader, CheckpointWriter, TensorInfo  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
CHILD = """
import json, resource, sys, time
from nucleusx_jax.convert import convert
args = json.loads(sys.argv[1])
start = time.perf_counter()
summary = convert(**args, progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "bytes": summary.bytes, "tensors": summary.tensors,
                  "parameters": summary.parameters,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}))
"""


def write_synthetic(config: NucleusXConfig, directory: str, max_shard_bytes: int, fmt: str) -> TensorInfo:
    """A bf16 PyTorch checkpoint of ``config``'s shapes (random finite values, real rel_pos buffers), written
    one tensor at a time; returns the largest tensor's info."""
    os.makedirs(directory)
    config.save_pretrained(directory)
    buffers = {k: v.astype(BF16) for k, v in weights.rel_pos_buffers(config).items()}
    shapes = weights.expected_torch_shapes(config, "causal_lm")
    entries = [(k, TensorInfo(s, BF16)) for k, s in shapes.items()]
    entries[-1:-1] = [(k, TensorInfo(v.shape, BF16)) for k, v in buffers.items()]  # state_dict order
    writer = CheckpointWriter(directory, FORMATS[fmt], entries, max_shard_bytes)
    rng = np.random.default_rng(0)
    for name in writer.order:
        if name in buffers:
            writer.write(name, buffers[name])
            continue
        bits = rng.integers(0, 2**16, size=shapes[name], dtype=np.uint16) & 0xBFFF  # |x| < 2: no inf or NaN
        writer.write(name, bits.view(BF16))
        del bits
    writer.close()
    return max((info for _, info in entries), key=lambda i: i.nbytes)


def run_child(**kwargs: object) -> dict:
    """Convert in a fresh process; returns its timing and peak RSS."""
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kwargs)], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode:
        raise RuntimeError(f"conversion failed:\n{out.stderr[-5000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["gb_per_s"] = result["bytes"] / 1e9 / result["seconds"]
    return result


def same_bits(a_path: str, b_path: str) -> bool:
    """Every tensor of two PyTorch checkpoints equal bit for bit (streamed)."""
    with CheckpointReader(a_path) as a, CheckpointReader(b_path) as b:
        if a.index != b.index:
            return False
        return all(np.array_equal(a.read(k).view(np.uint8), b.read(k).view(np.uint8)) for k in a.index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/nucleusx-7b.json", help="a configs/*.json model")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the temporary checkpoints go")
    parser.add_argument("--max-shard-size", default="5GB", help="shard size of every checkpoint written")
    parser.add_argument("--source-format", default="safetensors", choices=("safetensors", "bin"))
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    args = parser.parse_args()
    config = NucleusXConfig.from_pretrained(args.config)
    shard = parse_size(args.max_shard_size)
    root = tempfile.mkdtemp(prefix="convert_memory-", dir=args.workdir)
    try:
        start = time.perf_counter()
        src = os.path.join(root, "torch")
        largest = write_synthetic(config, src, shard, args.source_format)
        written = time.perf_counter() - start
        to_flax = run_child(src=src, dst=os.path.join(root, "flax"), to="flax", max_shard_size=shard)
        to_torch = run_child(src=os.path.join(root, "flax"), dst=os.path.join(root, "back"), to="torch",
                             max_shard_size=shard, torch_format=args.source_format)
        name = FORMATS[args.source_format]
        pick = lambda d: os.path.join(d, name.index_name if os.path.exists(os.path.join(d, name.index_name))
                                      else name.weights_name)
        exact = same_bits(pick(src), pick(os.path.join(root, "back")))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "config": args.config, "parameters": to_flax["parameters"], "checkpoint_gb": to_flax["bytes"] / 1e9,
        "largest_tensor_gb": largest.nbytes / 1e9, "bound_gb": 2 * largest.nbytes / 1e9 + 1.5,
        "source_format": args.source_format, "max_shard_size": args.max_shard_size,
        "synthetic_write_s": written, "to_flax": to_flax, "to_torch": to_torch, "round_trip_bit_exact": exact,
        "parent_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.config}: {report['parameters'] / 1e9:.2f}B parameters, {report['checkpoint_gb']:.2f} GB bf16 "
          f"in {args.max_shard_size} {args.source_format} shards; largest tensor {report['largest_tensor_gb']:.3f} GB, "
          f"bound 2x largest + 1.5 GB = {report['bound_gb']:.2f} GB")
    for key in ("to_flax", "to_torch"):
        r = report[key]
        print(f"  {key:8s}: peak RSS {r['peak_rss_gb']:.2f} GB, {r['seconds']:.1f} s, {r['gb_per_s']:.2f} GB/s")
    print(f"  round trip bit exact: {exact}")


if __name__ == "__main__":
    main()
