"""Pretraining data at scale: prepare memory and throughput, and the trainer's reader memory.

    python benchmarks/data.py --workdir /tmp

1. Trains the tokenizer ``configs/tiny.yaml`` trains (2048-piece SentencePiece BPE on ``builtin:pydoc``,
   seed 0: the same file), unless ``--tokenizer`` names one.
2. Writes a synthetic jsonl corpus (``--corpus-gb``, 2 by default) in files of ``--file-mb`` (256) MB: documents of 20 to
   600 words drawn (seeded) from the words of ``pydoc_data``; the first ``--small-gb`` (0.5) of files is the
   small corpus.
3. Runs ``python -m nucleusx_jax.data prepare`` in a subprocess for each (corpus, workers) pair, polling the
   RSS of its whole process tree (main + workers) every 0.1 s: peak tree RSS, wall time, tokens/s, and the
   CPU seconds of the main process and of each worker (last seen; on a shared machine CPU seconds say more
   than wall time). Checks
   peak <= 1.5 GB + 0.5 GB x workers, small vs large peak within 10 %, 2-worker/1-worker throughput >= 1.6.
4. Writes synthetic token stores of ``--small-tokens`` (10 M) and ``--large-tokens`` (1 B) random ids
   directly, and in a subprocess each opens it as the trainer does (``open_run_data``) and reads
   ``--read-batches`` global batches of 64 x 2049 tokens: peak RSS (VmHWM) within 10 % of each other.

5. ``huge``: one jsonl file holding a single document of ``--huge-mb`` (20) MB (words as in 2.), prepared
   with 0 and 1 workers: the peak tree RSS over that of a one-line file (the import), against the text size.

Everything written is deleted at the end; results go to ``benchmarks/results/data.json`` (``--results``).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_corpus(directory: str, total_bytes: int, file_bytes: int, seed: int = 0) -> list:
    """jsonl files of synthetic documents (words of pydoc_data, seeded); returns their paths in order."""
    from pydoc_data.topics import topics

    words = np.array(" ".join(topics[k] for k in sorted(topics)).split())
    rng = np.random.default_rng(seed)
    pool = []  # 32 MB of distinct documents, then drawn at random
    size = 0
    while size < 32 << 20:
        doc = " ".join(words[rng.integers(0, len(words), rng.integers(20, 600))])
        line = json.dumps({"text": doc}) + "\n"
        pool.append(line.encode())
        size += len(pool[-1])
    os.makedirs(directory, exist_ok=True)
    paths, written = [], 0
    while written < total_bytes:
        path = os.path.join(directory, f"part-{len(paths):04d}.jsonl")
        with open(path, "wb") as f:
            n = 0
            for i in rng.integers(0, len(pool), file_bytes // 1000):
                f.write(pool[i])
                n += len(pool[i])
                if n >= file_bytes:
                    break
        written += os.path.getsize(path)
        paths.append(path)
    return paths


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_prepare(files: list, tokenizer: str, output: str, workers: int) -> dict:
    """``python -m nucleusx_jax.data prepare`` in a subprocess: peak tree RSS, wall, tokens/s."""
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, "-m", "nucleusx_jax.data", "prepare", "--sources", *files, "--tokenizer", tokenizer,
           "--output", output, "--workers", str(workers), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps, peak, cpu = psutil.Process(proc.pid), 0, {}
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(ps))
            for p in [ps] + ps.children(recursive=True):  # last seen CPU seconds of each process
                cpu[p.pid] = sum(p.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    out = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"prepare failed:\n{out}")
    with open(os.path.join(output, "index.json")) as f:
        index = json.load(f)
    shutil.rmtree(output)
    return {"workers": workers, "corpus_bytes": sum(os.path.getsize(f) for f in files), "tokens": index["tokens"],
            "documents": index["documents"], "wall_s": wall, "tokens_per_s": index["tokens"] / wall,
            "peak_tree_rss_gb": peak / 1e9, "load_avg_1m": os.getloadavg()[0],
            "cpu_s_main": cpu.get(proc.pid, 0.0), "cpu_s_workers": sorted(v for k, v in cpu.items() if k != proc.pid)}


def write_synthetic_store(path: str, tokens: int, tokenizer: str, shard_tokens: int = 1 << 26) -> None:
    """A store of uniform random ids in [4, 2048) written directly (index as prepare writes it)."""
    from nucleusx_jax.data.store import Shard, file_sha256, index_json, shard_name
    from nucleusx_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = []
    for i, start in enumerate(range(0, tokens, shard_tokens)):
        n = min(shard_tokens, tokens - start)
        file = os.path.join(path, shard_name(i))
        rng.integers(4, 2048, n, dtype=np.uint16).tofile(file)
        shards.append(Shard(shard_name(i), n, n // 500, n * 4, file_sha256(file)))
    meta = {"dtype": "uint16", "vocab_size": tok.vocab_size, "add_bos": True, "sources": ["synthetic"],
            "source_format": "auto", "text_field": "text", "shard_tokens": shard_tokens, "holdout": None,
            "tokenizer": {"fingerprint": tok.fingerprint, "path": tokenizer, "bos_id": tok.bos_id, "eos_id": tok.eos_id}}
    with open(os.path.join(path, "index.json"), "w") as f:
        f.write(index_json(meta, shards))


READER = """
import json, sys, resource
from nucleusx_jax.train.data import DataConfig, open_run_data
from nucleusx_jax.tokenizer import load_tokenizer
store, tokenizer, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = DataConfig(store=store, tokenizer=tokenizer, seq_len=2048, eval_fraction=0.0)
tok = load_tokenizer(tokenizer)
train, _ = open_run_data(cfg, tok, tokenizer, "/nonexistent")
for step in range(batches):
    rows = train.rows(step, 64, range(64))
store_obj = train.components[0].store
with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
print(json.dumps({"tokens": store_obj.num_tokens, "windows": len(train.components[0]), "vm_hwm_gb": hwm * 1024 / 1e9,
                  "bytes_read": store_obj.bytes_read}))
"""


def run_reader(store: str, tokenizer: str, batches: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", READER, store, tokenizer, str(batches)], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def run_huge(work: str, tokenizer: str, text_bytes: int) -> list:
    """Peak tree RSS of preparing one document of ``text_bytes`` bytes, less that of a one-word document."""
    from pydoc_data.topics import topics

    words = np.array(" ".join(topics[k] for k in sorted(topics)).split())
    rng = np.random.default_rng(0)
    doc = " ".join(words[rng.integers(0, len(words), text_bytes // 5)])[:text_bytes]
    huge, tiny = os.path.join(work, "huge.jsonl"), os.path.join(work, "tiny.jsonl")
    with open(huge, "w") as f:
        f.write(json.dumps({"text": doc}) + "\n")
    with open(tiny, "w") as f:
        f.write(json.dumps({"text": "word"}) + "\n")
    rows = []
    for w in (0, 1):
        base = run_prepare([tiny], tokenizer, os.path.join(work, "store"), w)["peak_tree_rss_gb"]
        row = run_prepare([huge], tokenizer, os.path.join(work, "store"), w)
        row.update(text_mb=len(doc) / 2**20, import_rss_gb=base,
                   rss_over_text=(row["peak_tree_rss_gb"] - base) * 1e9 / len(doc))
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument("--tokenizer", default=None, help="default: train the tokenizer of configs/tiny.yaml")
    p.add_argument("--corpus-gb", type=float, default=2.0)
    p.add_argument("--small-gb", type=float, default=0.5)
    p.add_argument("--file-mb", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--small-tokens", type=int, default=10_000_000)
    p.add_argument("--large-tokens", type=int, default=1_000_000_000)
    p.add_argument("--read-batches", type=int, default=50)
    p.add_argument("--corpora", nargs="+", default=["small", "large"], choices=["small", "large"])
    p.add_argument("--huge-mb", type=int, default=20)
    p.add_argument("--results", default="data.json", help="file name under benchmarks/results/")
    p.add_argument("--skip", nargs="*", default=[], choices=["prepare", "reader", "huge"])
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="nucleusx-data-bench-", dir=args.workdir)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
               "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip(), "cpus": os.cpu_count()}
    try:
        tokenizer = args.tokenizer
        if tokenizer is None:
            from nucleusx_jax.tokenizer import train_tokenizer

            tokenizer = train_tokenizer(["builtin:pydoc"], os.path.join(work, "tiny"), 2048, seed=0)
        results["tokenizer"] = tokenizer if args.tokenizer else "configs/tiny.yaml's: 2048-piece SentencePiece on builtin:pydoc"
        if "prepare" not in args.skip:
            t0 = time.perf_counter()
            file_bytes = args.file_mb << 20
            files = make_corpus(os.path.join(work, "corpus"), int(args.corpus_gb * 1e9), file_bytes)
            small = files[: max(1, round(args.small_gb * 1e9 / file_bytes))]
            print(f"corpus: {len(files)} files, {sum(map(os.path.getsize, files)) / 1e9:.2f} GB in "
                  f"{time.perf_counter() - t0:.0f} s; small: {len(small)} files", flush=True)
            rows = []
            for corpus in [{"small": small, "large": files}[c] for c in args.corpora]:
                for w in args.workers:
                    rows.append(run_prepare(corpus, tokenizer, os.path.join(work, "store"), w))
                    print(json.dumps(rows[-1]), flush=True)
            results["prepare"] = rows
            checks = {}
            big = [r for r in rows if r["corpus_bytes"] == max(x["corpus_bytes"] for x in rows)]
            for r in rows:
                checks[f"rss_{r['corpus_bytes'] / 1e9:.1f}GB_{r['workers']}w_within_budget"] = \
                    r["peak_tree_rss_gb"] <= 1.5 + 0.5 * r["workers"]
            for w in args.workers:
                pair = [r for r in rows if r["workers"] == w]
                if len(pair) == 2:
                    checks[f"rss_growth_{w}w"] = pair[1]["peak_tree_rss_gb"] / pair[0]["peak_tree_rss_gb"]
            by_w = {r["workers"]: r for r in big}
            if 1 in by_w and 2 in by_w:
                checks["speedup_2w_over_1w"] = by_w[2]["tokens_per_s"] / by_w[1]["tokens_per_s"]
                checks["tokens_per_s_2w"] = by_w[2]["tokens_per_s"]
            results["prepare_checks"] = checks
            shutil.rmtree(os.path.join(work, "corpus"))
        if "reader" not in args.skip:
            rows = []
            for n in (args.small_tokens, args.large_tokens):
                path = os.path.join(work, f"store-{n}")
                write_synthetic_store(path, n, tokenizer)
                rows.append(run_reader(path, tokenizer, args.read_batches))
                print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(path)
            results["reader"] = rows
            results["reader_rss_ratio"] = rows[1]["vm_hwm_gb"] / rows[0]["vm_hwm_gb"]
        if "huge" not in args.skip:
            results["huge"] = run_huge(work, tokenizer, args.huge_mb << 20)
            print(json.dumps(results["huge"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    out = os.path.join(ROOT, "benchmarks", "results", args.results)
    with open(out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(out + ".tmp", out)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
