"""Does carrying the retention state across windows teach a model to use far context? (issue 26, on CPU)

``python benchmarks/long_context.py [--work-dir /tmp/nucleusx-long-context] [--steps 1200]``

1. **The corpus** (generated, offline, deterministic from ``--seed``): a pool of 600 made-up words of two
   syllables (a fixed list of 75), which the tokenizer learns as one token each (~1.05 tokens per word). Each
   document draws its own *topic*, 150 words of the pool, and is 4400 words separated by spaces: each word
   drawn uniformly from the topic, or with probability 0.05 from the whole pool. What a document has said so
   far therefore tells which words it uses: a model that remembers the words seen predicts the next one from
   ~150 instead of 600 (up to ~1.2 nats per token better), and 128 tokens show only ~57 % of a topic's words
   (1 - e^-(128/150)), a few windows nearly all. 540 training and 32 eval documents of ~4600 tokens
   (``--train-docs``, ``--eval-docs``), written as jsonl (one document per line) to
   ``WORK/corpus/{train,eval}.jsonl``.
2. **Tokenizer and stores**: a SentencePiece BPE tokenizer of 1024 pieces (the model's vocabulary) trained on the
   training documents (:func:`nucleusx_jax.tokenizer.train_tokenizer`, as the trainer trains one), and token
   stores of both files (:func:`nucleusx_jax.data.prepare.prepare`); every document is over 4096 tokens.
3. **Two training runs** (``python -m nucleusx_jax.train --config WORK/<run>.yaml``, configs written by this
   script): configs/tiny.yaml's model with 8 retention heads instead of 4 (the slowest head's decay, 1 - 2^-12,
   then remembers ~4k tokens; with 4 heads it would forget after ~256), a 1024-token vocabulary, the chunkwise
   form with chunks of 64 (``train.carry_state`` needs the chunkwise form; both runs use it), window
   (``data.seq_len``) 128, the same steps, batch (16 rows) and tokens, both with ``data.stream_rows: true``
   (each row reads its own contiguous stream of documents): ``window`` (``train.carry_state: false``: each
   window starts from zero) and ``carried`` (``train.carry_state: true``: each row's state flows into its next
   window, the gradient stopped at the boundary).
4. **Perplexity by position** of both exported models (:mod:`nucleusx_jax.eval.positions`) on the first 4096
   tokens of every eval document, buckets of ``--bucket`` (256) tokens, scored with the state carried:
   ``OUT/positions.json`` and ``OUT/positions.png`` (OUT = ``WORK/out``), and a table of both curves on stdout;
   ``OUT/experiment.json`` adds the settings and each run's wall time, steps, first and last train loss.

``--baseline-only`` skips the ``carried`` run (to test this script on a checkout without
``train.carry_state``; the experiment needs both runs).
WORK must be empty or absent (everything is built afresh; the script refuses to mix old and new parts).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
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

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["sh" + v for v in "aeiou"]
POOL_WORDS, TOPIC_WORDS, POOL_P = 600, 150, 0.05
WORDS_PER_DOC = 4400
SEQ_LEN, BATCH = 128, 16
EVAL_LENGTH = 4096
RUNS = {"window": False, "carried": True}  # name -> train.carry_state
MODEL = {  # configs/tiny.yaml's model, 8 heads
    "vocab_size": 1024, "decoder_embed_dim": 128, "decoder_value_embed_dim": 256, "decoder_ffn_embed_dim": 256,
    "decoder_layers": 2, "decoder_retention_heads": 8, "lm_head_initializer_range": 0.088, "z_loss_coeff": 1.0e-4,
    "dropout": 0.0, "drop_path_rate": 0.0, "forward_mode": "chunkwise", "recurrent_chunk_size": 64}


# --------------------------------------------------------------------------------------------------- corpus
def word_pool(rng: np.random.Generator) -> List[str]:
    """``POOL_WORDS`` distinct made-up words of 2 syllables."""
    words: Dict[str, None] = {}
    while len(words) < POOL_WORDS:
        words["".join(rng.choice(SYLLABLES, size=2))] = None
    return list(words)


def document(pool: List[str], rng: np.random.Generator) -> str:
    """One document: its own topic (``TOPIC_WORDS`` words of the pool), ``WORDS_PER_DOC`` words."""
    topic = rng.choice(len(pool), size=TOPIC_WORDS, replace=False)
    from_pool = rng.random(WORDS_PER_DOC) < POOL_P
    picks = np.where(from_pool, rng.integers(len(pool), size=WORDS_PER_DOC),
                     topic[rng.integers(TOPIC_WORDS, size=WORDS_PER_DOC)])
    return " ".join(pool[int(i)] for i in picks)


def write_corpus(directory: str, train_docs: int, eval_docs: int, seed: int) -> Dict[str, str]:
    """``directory/train.jsonl`` and ``directory/eval.jsonl`` (one ``{"text": ...}`` per line)."""
    rng = np.random.default_rng(seed)
    pool = word_pool(rng)
    os.makedirs(directory, exist_ok=True)
    files = {}
    for split, count in (("train", train_docs), ("eval", eval_docs)):
        path = files[split] = os.path.join(directory, f"{split}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"text": document(pool, rng)}) + "\n" for _ in range(count))
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
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--train-docs", type=int, default=540)
    p.add_argument("--eval-docs", type=int, default=32)
    p.add_argument("--bucket", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-only", action="store_true", help="skip the carried-state run")
    args = p.parse_args(argv)
    runs = {name: carry for name, carry in RUNS.items() if not (carry and args.baseline_only)}
    check_options(carry=any(runs.values()))
    work = os.path.abspath(args.work_dir)
    if os.path.exists(work) and os.listdir(work):
        raise SystemExit(f"error: --work-dir {work} is not empty: delete it or choose another")
    start = time.perf_counter()
    files = write_corpus(os.path.join(work, "corpus"), args.train_docs, args.eval_docs, args.seed)
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
