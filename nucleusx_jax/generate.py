"""The generation command line: ``python -m nucleusx_jax.generate MODEL_DIR --prompt "..."`` streams a
completion to the terminal. The decoding itself (:func:`generate`, :func:`stream`) is :mod:`nucleusx_jax.decode`,
re-exported here."""

import argparse
import sys
from typing import Any, Callable, List, Optional, Sequence

import jax
import numpy as np

from .cli import reports_user_errors
from .decode import DecodeOptions, decode_options, generate, prefill, stream
from .loading import load
from .tokenizer import load_tokenizer

__all__ = ["DecodeOptions", "TextStreamer", "decode_options", "generate", "main", "prefill", "stream"]


class TextStreamer:
    """Turns the growing list of generated ids into text pieces: the newly decoded suffix each time, holding
    back an incomplete UTF-8 sequence (decoded as U+FFFD) until its last byte arrives."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self.decode = decode
        self.ids: List[int] = []
        self.printed = 0

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.printed = text[self.printed:], len(text)
        return piece


@reports_user_errors
def main(argv: Optional[Sequence[str]] = None, out: Any = None) -> str:
    """CLI: stream the completion of ``--prompt`` to ``out`` (stdout); returns the completion."""
    p = argparse.ArgumentParser(prog="python -m nucleusx_jax.generate",
                                description="Stream a NucleusX completion of a prompt to the terminal.")
    p.add_argument("model_dir", help="a flax or PyTorch NucleusX model directory: local, gs://..., or a Hub id")
    p.add_argument("--dtype", default="float32", help="computation dtype: float32, bfloat16 or float16")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokenizer", help="SentencePiece .model file or HF tokenizer dir (default: MODEL_DIR)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    p.add_argument("--no-bos", action="store_true", help="do not put the tokenizer's BOS before the prompt")
    args = p.parse_args(argv)
    out = out if out is not None else sys.stdout

    tokenizer = load_tokenizer(args.tokenizer or args.model_dir)
    model = load(args.model_dir, dtype=args.dtype)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                         f"vocab_size={model.config.vocab_size}: they do not belong together")
    ids = ([] if args.no_bos else [tokenizer.bos_id]) + tokenizer.encode(args.prompt)
    text = TextStreamer(tokenizer.decode)
    pieces = []
    for token in stream(model, np.asarray([ids]), max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                        prng_key=jax.random.PRNGKey(args.seed)):
        if int(token[0]) == tokenizer.eos_id:
            break
        pieces.append(text.push(int(token[0])))
        out.write(pieces[-1])
        out.flush()
    out.write("\n")
    return "".join(pieces)


if __name__ == "__main__":
    main()
