"""Rolling-perplexity benchmark: memory of a 64k-token document against a 4k-token one, and the value against
one chunkwise pass over the whole document.

    python benchmarks/eval_rolling.py                         # documents of 4096 and 65536 tokens, window 2048
    python benchmarks/eval_rolling.py --lengths 4096 65536 --window 2048

The random model of ``benchmarks/eval_prefix.py`` (vocab 1024, embed 256, value 512, heads 4, ffn 512, 4 layers,
chunk 64, initializer_factor 1), float32, documents of seeded random token ids. Each measurement runs in its own
process:

* ``rolling``: ``NucleusXLM.rolling_tokens`` (windows of ``--window`` tokens, the recurrent state carried across);
  reports the peak RSS of the process, XLA's memory plan of the one compiled window (arguments + outputs +
  temporaries), and the mean loss per token;
* ``full`` (the longest document only): one chunkwise pass over the whole document (``model(ids,
  forward_mode="chunkwise")``), its mean loss per token.

Prints a table and writes ``benchmarks/results/eval_rolling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VOCAB = 1024


class _Ids:
    """The tokenizer attributes ``NucleusXLM.rolling_tokens`` reads (the documents are token ids already)."""

    vocab_size, bos_id, eos_id, pad_id = VOCAB, 1, 2, 0


def _model():
    from nucleusx_jax import NucleusX, NucleusXConfig

    cfg = NucleusXConfig(vocab_size=VOCAB, decoder_embed_dim=256, decoder_value_embed_dim=512,
                         decoder_retention_heads=4, decoder_ffn_embed_dim=512, decoder_layers=4,
                         recurrent_chunk_size=64, initializer_factor=1.0)
    return NucleusX(cfg, seed=0)


def _doc(length: int) -> np.ndarray:
    return np.random.default_rng(length).integers(3, VOCAB, length).astype(np.int32)


def _child(kind: str, length: int, window: int) -> dict:
    import jax

    model = _model()
    doc = _doc(length)
    start = time.perf_counter()
    if kind == "rolling":
        from nucleusx_jax.eval import EvalOptions, NucleusXLM

        lm = NucleusXLM.from_model(model, _Ids(), options=EvalOptions(batch_size=1, max_length=window))
        [total] = lm.rolling_tokens([doc.tolist()])
        extra = {"xla_window_bytes": lm.backend.window_memory(1, window)}
    else:
        logits = model(doc[None, :-1], forward_mode="chunkwise").logits[0]
        logp = jax.nn.log_softmax(logits.astype(jax.numpy.float32), axis=-1)
        total = float(np.asarray(logp[np.arange(length - 1), doc[1:]], np.float64).sum())
        extra = {}
    return {"kind": kind, "tokens": length, "loss": -total / (length - 1), "wall_s": time.perf_counter() - start,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 65536])
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), args.window)))
        return
    jobs = [("rolling", n) for n in args.lengths] + [("full", max(args.lengths))]
    rows = []
    for kind, n in jobs:
        res = subprocess.run([sys.executable, __file__, "--window", str(args.window), "--child", kind, str(n)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{kind:8s} {n:6d} tokens: loss {r['loss']:.6f}, peak RSS {r['peak_rss_mib']:.0f} MiB, "
              f"{r['wall_s']:.1f} s" + (f", XLA window plan {r['xla_window_bytes'] / 2**20:.1f} MiB"
                                        if "xla_window_bytes" in r else ""))
    full = rows[-1]
    longest = [r for r in rows if r["kind"] == "rolling" and r["tokens"] == full["tokens"]][0]
    out = {"window": args.window, "rows": rows, "loss_diff_rolling_vs_full": abs(longest["loss"] - full["loss"]),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(RESULTS)).stdout.strip(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"|rolling - full| loss at {full['tokens']} tokens: {out['loss_diff_rolling_vs_full']:.2e}")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "eval_rolling.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
