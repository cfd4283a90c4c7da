"""CLI: ``python -m nucleusx_jax.data prepare --sources SRC [SRC ...] --tokenizer PATH --output DIR --workers N``
builds a token store (see :mod:`nucleusx_jax.data.prepare`); ``verify DIR`` checks its shards' checksums."""

import argparse
from typing import Optional, Sequence

from ..cli import reports_user_errors
from .prepare import HoldOut, PrepareOptions, prepare, verify
from ..sources import FORMATS


@reports_user_errors
def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nucleusx_jax.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("prepare", help="tokenize sources into a sharded token store (resumable)")
    pre.add_argument("--sources", nargs="+", required=True, help="text/jsonl(.gz/.zst)/parquet files, dirs, globs, hf:..")
    pre.add_argument("--tokenizer", required=True, help="SentencePiece *.model or HF tokenizer directory")
    pre.add_argument("--output", required=True, help="the store directory (rerun the same command to resume)")
    pre.add_argument("--workers", type=int, default=1, help="tokenizer processes, one thread each (0: in process)")
    pre.add_argument("--shard-tokens", type=int, default=PrepareOptions.shard_tokens)
    pre.add_argument("--format", default="auto", help=" | ".join(FORMATS))
    pre.add_argument("--text-field", default="text", help="jsonl field / parquet or HF column holding the text")
    pre.add_argument("--no-bos", action="store_true", help="no BOS before documents (EOS always follows one)")
    pre.add_argument("--holdout-fraction", type=float, default=None,
                     help="split by document: keep only one part of a seeded split")
    pre.add_argument("--holdout-seed", type=int, default=0)
    pre.add_argument("--holdout-part", choices=("train", "eval"), default="train")
    pre.add_argument("--no-progress", action="store_true")
    pre.add_argument("--skip-bad-documents", action="store_true",
                     help="skip and count jsonl lines that are not JSON, lack the text field or hold invalid Unicode")
    ver = sub.add_parser("verify", help="compare every shard's sha256 with the index")
    ver.add_argument("store")
    args = p.parse_args(argv)
    if args.command == "verify":
        problems = verify(args.store)
        for file, problem in problems:
            print(f"{args.store}/{file}: {problem}")
        if problems:
            raise ValueError(f"token store {args.store!r}: {len(problems)} damaged shard(s)")
        print(f"{args.store}: every shard matches the index")
        return
    holdout = None if args.holdout_fraction is None else HoldOut(args.holdout_fraction, args.holdout_seed, args.holdout_part)
    options = PrepareOptions(workers=args.workers, shard_tokens=args.shard_tokens, format=args.format,
                             text_field=args.text_field, add_bos=not args.no_bos, holdout=holdout,
                             progress=not args.no_progress, skip_bad_documents=args.skip_bad_documents)
    store = prepare(args.sources, args.tokenizer, args.output, options=options)
    print(f"{args.output}: {store.num_documents} documents, {store.num_tokens} tokens ({store.dtype.name}), "
          f"{len(store.shards)} shard(s), {store.num_bytes} bytes of text, "
          f"{store.index.get('skipped_documents', 0)} bad document(s) skipped")


if __name__ == "__main__":
    main()
