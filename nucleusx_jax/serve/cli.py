"""``python -m nucleusx_jax.serve MODEL_DIR``: serve a NucleusX model over the OpenAI HTTP API."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import uvicorn

from ..tokenizer import load_tokenizer
from .api import create_app
from ..model import COMPUTE_DTYPES
from .backend import load_backend
from .engine import Engine


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nucleusx_jax.serve", description=__doc__.split("\n")[0])
    p.add_argument("model_dir", help="a flax or PyTorch NucleusX causal-LM directory")
    p.add_argument("--tokenizer", help="SentencePiece .model file or HF tokenizer dir (default: MODEL_DIR)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="slots: requests decoded together")
    p.add_argument("--max-queue", type=int, default=128, help="requests that may wait for a slot (then 429)")
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="the largest max_tokens accepted")
    p.add_argument("--steps-per-call", type=int, default=4,
                   help="decode steps per compiled call (requests join and leave between calls)")
    p.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), default="float32", help="computation dtype")
    p.add_argument("--served-model-name", help="the model id clients use (default: MODEL_DIR's base name)")
    p.add_argument("--switch-interval", type=float, default=5e-4,
                   help="Python's thread switch interval in s (default 0.5 ms, Python's own is 5 ms): the engine "
                        "thread waits at most this long for the GIL while the HTTP thread works")
    args = p.parse_args(argv)
    sys.setswitchinterval(args.switch_interval)

    tokenizer = load_tokenizer(args.tokenizer or args.model_dir)
    engine = Engine(load_backend(args.model_dir, dtype=args.dtype), max_batch=args.max_batch,
                    max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                    max_new_tokens=args.max_tokens_limit, steps_per_call=args.steps_per_call)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model_dir))
    app = create_app(engine, tokenizer, name)
    engine.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.shutdown()
