"""Prefix-sharing benchmark: a 5-shot multiple-choice task (4 choices per item) through lm-eval, with and
without sharing the context's state.

    python benchmarks/eval_prefix.py                  # 32 items, batch 8
    python benchmarks/eval_prefix.py --items 64 --batch-size 16

A SentencePiece tokenizer (vocab 1024) trained on ``builtin:pydoc``, a random model (embed 256, value 512,
heads 4, ffn 512, 4 layers, chunk 64, initializer_factor 1), float32 on the default JAX backend. The task is
written to a temporary directory: items are pydoc snippets with four one-to-three-word choices, 5 shots from a
train split. ``lm_eval.simple_evaluate`` builds its requests (captured), then ``NucleusXLM.loglikelihood`` runs
them with ``share_prefix=true`` (each item's context once, its 4 continuations from copies of its state) and
``share_prefix=false`` (the same passes, the context run once per request): one run to compile, then the best
wall time of ``--repeats`` runs. Prints the wall times, their ratio and the largest
difference between the two settings' loglikelihoods; writes ``benchmarks/results/eval_prefix.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _write_task(root: str, items: int) -> str:
    from pydoc_data.topics import topics

    names = sorted(topics)
    rng = np.random.default_rng(0)
    words = [w for w in " ".join(topics[n] for n in names[:20]).split() if w.isalpha()]
    rows = [dict(question=" ".join(topics[names[(7 * i) % len(names)]].split())[:120],
                 choices=[" ".join(rng.choice(words, 1 + j % 3)) for j in range(4)], label=int(rng.integers(4)))
            for i in range(items + 10)]
    for split, part in (("train", rows[:10]), ("test", rows[10:])):
        with open(os.path.join(root, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    tasks = os.path.join(root, "tasks")
    os.makedirs(tasks)
    with open(os.path.join(tasks, "bench_mc.yaml"), "w") as f:
        f.write(f"""task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root}/train.jsonl
    test: {root}/test.jsonl
training_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
num_fewshot: 5
metric_list:
  - metric: acc
""")
    return tasks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import jax
    import lm_eval
    from lm_eval.tasks import TaskManager

    from nucleusx_jax import NucleusX, NucleusXConfig
    from nucleusx_jax.eval import EvalOptions, NucleusXLM
    from nucleusx_jax.tokenizer import load_tokenizer, train_tokenizer

    root = tempfile.mkdtemp(prefix="eval_prefix_")
    include = _write_task(root, args.items)
    tok = load_tokenizer(train_tokenizer(["builtin:pydoc"], os.path.join(root, "sp"), 1024, max_sentences=4000,
                                         character_coverage=0.995))
    cfg = NucleusXConfig(vocab_size=1024, decoder_embed_dim=256, decoder_value_embed_dim=512,
                         decoder_retention_heads=4, decoder_ffn_embed_dim=512, decoder_layers=4,
                         recurrent_chunk_size=64, initializer_factor=1.0)
    model = NucleusX(cfg, seed=0)
    out = {"items": args.items, "batch_size": args.batch_size, "backend": jax.default_backend(),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(RESULTS)).stdout.strip(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    requests = []
    capture = NucleusXLM.from_model(model, tok, options=EvalOptions(batch_size=args.batch_size))
    capture.loglikelihood = lambda reqs, **kw: requests.extend(reqs) or [(0.0, False)] * len(reqs)
    lm_eval.simple_evaluate(model=capture, tasks=["bench_mc"], task_manager=TaskManager(include_path=include),
                            bootstrap_iters=0)
    out["requests"] = len(requests)
    out["mean_context_tokens"] = float(np.mean([len(tok.encode(r.args[0])) + 1 for r in requests]))
    values = {}
    for share in (True, False):
        lm = NucleusXLM.from_model(model, tok, options=EvalOptions(batch_size=args.batch_size, max_length=2048,
                                                                   share_prefix=share))
        walls = []
        for _ in range(1 + args.repeats):  # the first run compiles
            start = time.perf_counter()
            values[share] = np.asarray([v for v, _ in lm.loglikelihood(requests, disable_tqdm=True)])
            walls.append(time.perf_counter() - start)
        out[f"wall_s_share_{str(share).lower()}"] = min(walls[1:])
        print(f"share_prefix={share}: {min(walls[1:]):.2f} s for {len(requests)} requests (best of {args.repeats})")
    out["ratio"] = out["wall_s_share_true"] / out["wall_s_share_false"]
    out["max_abs_loglikelihood_diff"] = float(np.max(np.abs(values[True] - values[False])))
    print(f"ratio {out['ratio']:.3f}, max |diff| {out['max_abs_loglikelihood_diff']:.2e}, "
          f"mean context {out['mean_context_tokens']:.0f} tokens")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "eval_prefix.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
