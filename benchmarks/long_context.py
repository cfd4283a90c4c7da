"""Does carrying the retention state across windows teach a model to use far context? (issue 26, on CPU)

``python benchmarks/long_context.py [--work-dir /tmp/nucleusx-long-context] [--steps 2400]``

1. **The corpus**: real text available offline, the source code of this Python's standard library: every
   ``*.py`` file of at least 24,000 bytes under ``sysconfig.get_paths()["stdlib"]`` (tests included,
   ``site-packages`` and the ``pydoc_data`` dump excluded), one document per file (Python Software Foundation
   License). A seeded permutation holds out ``--eval-docs`` (16) files; the others train. Code rewards far
   context: names defined at the top of a module recur thousands of tokens later. Written as jsonl to
   ``WORK/corpus/{train,eval}.jsonl``; the file set is that of the Python running the script (3.11.7 here:
   331 training files).
2. **Tokenizer and stores**: a SentencePiece BPE tokenizer of 1024 pieces (the model's vocabulary) trained on the
   training documents (:func:`nucleusx_jax.tokenizer.train_tokenizer`, as the trainer trains one), and token
   stores of both files (:func:`nucleusx_jax.data.prepare.prepare`); every eval document is over 4096 tokens.
3. **Two training runs** (``python -m nucleusx_jax.train --config WORK/<run>.yaml``, configs written by this
   script): configs/tiny.yaml's model with 8 retention heads instead of 4 (the slowest head's decay, 1 - 2^-12,
   then remembers ~4k tokens; with 4 heads it would forget after ~256), a 1024-token vocabulary, the chunkwise
   form with chunks of 64 (``train.carry_state`` needs the chunkwise form; both runs use it), window
   (``data.seq_len``) 128, the same steps, batch (16 rows) and tokens, both with ``data.stream_rows: true``
   (each row reads its own contiguous stream of documents): ``window`` (``train.carry_state: false``: each
   window starts from zero) and ``carried`` (``train.carry_state: true``: each row's state flows into its next
   window, the gradient stopped at the boundary).
4. **Perplexity by position** of both exported models (:mod:`nucleusx_jax.eval.positions`) on the first 4096
   tokens of every eval document, buckets of ``--bucket`` (128) tokens, scored with the state carried:
   ``OUT/positions.json`` and ``OUT/positions.png`` (OUT = ``WORK/out``), and a table of both curves on stdout;
   ``OUT/experiment.json`` adds the settings and each run's wall time, steps, first and last train loss.

``--baseline-only`` skips the ``carried`` run (to test this script on a checkout without
``train.carry_state``; the experiment needs both runs).
WORK must be empty or absent (everything is built afresh; the script refuses to mix old and new parts).
"""

import argparse
import dataclasses
import glob
import json
import os
import subprocess
import sys
import sysconfig
import time
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU experiment (the trainer runs inherit it)

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from nucleusx_jax.data.prepare import PrepareOptions, prepare  # noqa: E402
from nucleusx_jax.eval import positions  # noqa: E402
from nucleusx_jax.tokenizer import train_tokenizer  # noqa: E402
from nucleusx_jax.train.config import TrainConfig  # noqa: E402

MIN_BYTES = 24_000  # a file this long holds > 4096 tokens of the 1024-piece tokenizer
SEQ_LEN, BATCH = 128, 16
EVAL_LENGTH = 4096
RUNS = {"window": False, "carried": True}  # name -> train.carry_state
MODEL = {  # configs/tiny.yaml's model, 8 heads
    "vocab_size": 1024, "decoder_embed_dim": 128, "decoder_value_embed_dim": 256, "decoder_ffn_embed_dim": 256,
    "decoder_layers": 2, "decoder_retention_heads": 8, "lm_head_initializer_range": 0.088, "z_loss_coeff": 1.0e-4,
    "dropout": 0.0, "drop_path_rate": 0.0, "forward_mode": "chunkwise", "recurrent_chunk_size": 64}


# --------------------------------------------------------------------------------------------------- corpus
def write_corpus(directory: str, eval_docs: int, seed: int) -> Dict[str, str]:
    """``directory/train.jsonl`` and ``directory/eval.jsonl`` (one ``{"text": ...}`` per line): the standard
    library's files of at least ``MIN_BYTES``, ``eval_docs`` of them (a permutation keyed by ``seed``) held out."""
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if os.path.getsize(f) >= MIN_BYTES and "site-packages" not in f and "pydoc_data" not in f)
    order = np.random.default_rng(seed).permutation(len(paths))
    if not 0 < eval_docs < len(paths):
        raise SystemExit(f"error: --eval-docs {eval_docs} must lie in [1, {len(paths)}) ({root} has {len(paths)} "
                         f"files of at least {MIN_BYTES} bytes)")
    os.makedirs(directory, exist_ok=True)
    files = {}
    for split, chosen in (("train", order[eval_docs:]), ("eval", order[:eval_docs])):
        path = files[split] = os.path.join(directory, f"{split}.jsonl")
        with open(path, "w") as f:
            for i in chosen:
                with open(paths[i], encoding="utf-8", errors="replace") as source:
                    f.write(json.dumps({"text": source.read()}) + "\n")
    return files


# ---------------------------------------------------------------------------------------------------- runs
def run_config(work: str, name: str, *, carry: bool, tokenizer: str, store: str, steps: int, seed: int) -> str:
    """Write ``WORK/<name>.yaml`` for one run and return its path."""
    data = {"store": store, "tokenizer": tokenizer, "vocab_size": MODEL["vocab_size"], "seq_len": SEQ_LEN,
            "eval_fraction": 0.0, "seed": seed, "stream_rows": True}
    train: Dict[str, Any] = {"run_dir": os.path.join(work, "runs", name), "steps": steps, "global_batch": BATCH,
                             "dtype": "float32", "eval_every": 0, "seed": seed}
    if carry:
        train["carry_state"] = True
    config = {"model": MODEL, "data": data, "train": train,
              "optimizer": {"learning_rate": 3.0e-3, "weight_decay": 0.1, "clip_norm": 1.0},
              "schedule": {"warmup_steps": steps // 10, "decay": "cosine", "min_lr_ratio": 0.1},
              "mesh": {"data": -1}, "checkpoint": {"every": 0, "max_to_keep": 1, "async_save": False},
              "logging": {"every": max(1, steps // 20), "sample_tokens": 0, "tensorboard": False}}
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def train(config: str) -> float:
    """Run the trainer on ``config`` in a subprocess (output passed through); returns its wall time (s)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nucleusx_jax.train", "--config", config], check=True)
    return time.perf_counter() - start


def check_options(*, carry: bool) -> None:
    """Stop early when this checkout's trainer lacks ``train.carry_state`` (issue 26) and a run needs it."""
    if carry and "carry_state" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        raise SystemExit("error: this checkout's trainer has no train.carry_state (issue 26); skip the carried "
                         "run with --baseline-only")


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="/tmp/nucleusx-long-context")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--eval-docs", type=int, default=16)
    p.add_argument("--bucket", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-only", action="store_true", help="skip the carried-state run")
    args = p.parse_args(argv)
    runs = {name: carry for name, carry in RUNS.items() if not (carry and args.baseline_only)}
    check_options(carry=any(runs.values()))
    work = os.path.abspath(args.work_dir)
    if os.path.exists(work) and os.listdir(work):
        raise SystemExit(f"error: --work-dir {work} is not empty: delete it or choose another")
    start = time.perf_counter()
    files = write_corpus(os.path.join(work, "corpus"), args.eval_docs, args.seed)
    tokenizer = train_tokenizer([files["train"]], os.path.join(work, "tokenizer"), MODEL["vocab_size"])
    stores = {split: os.path.join(work, "stores", split) for split in files}
    for split, path in files.items():
        prepare([path], tokenizer, stores[split], options=PrepareOptions(progress=False))
    print(f"corpus, tokenizer and stores ready in {time.perf_counter() - start:.0f} s: {work}", flush=True)

    timings: Dict[str, Any] = {}
    for name, carry in runs.items():
        config = run_config(work, name, carry=carry, tokenizer=tokenizer, store=stores["train"], steps=args.steps,
                            seed=args.seed)
        seconds = train(config)
        with open(os.path.join(work, "runs", name, "summary.json")) as f:
            summary = json.load(f)
        timings[name] = {"wall_s": round(seconds, 1), "config": config,
                         **{k: summary.get(k) for k in ("steps", "first_train_loss", "last_train_loss",
                                                        "tokens_per_s")}}
        print(f"run {name}: {seconds:.0f} s", flush=True)

    out = os.path.join(work, "out")
    options = positions.PositionOptions(max_length=EVAL_LENGTH, bucket=args.bucket, window=2048,
                                        min_length=EVAL_LENGTH, max_documents=args.eval_docs, batch_size=8)
    report = positions.evaluate([os.path.join(work, "runs", name, "hf") for name in runs], [stores["eval"]], out,
                                options=options, names=list(runs))
    with open(os.path.join(out, "experiment.json"), "w") as f:
        json.dump({"argv": sys.argv[1:] if argv is None else list(argv), "runs": timings,
                   "model": MODEL, "seq_len": SEQ_LEN, "global_batch": BATCH}, f, indent=1)
    for name, t in timings.items():
        print(f"run {name}: {t['wall_s']} s, {t['tokens_per_s'] or 0:.0f} tokens/s, train loss "
              f"{t['first_train_loss']:.4f} -> {t['last_train_loss']:.4f}")
    print(positions.table(report))
    print(f"total {time.perf_counter() - start:.0f} s; wrote {out}/positions.json, positions.png, experiment.json")


if __name__ == "__main__":
    main()
