"""Perplexity by position: does a model use what it read thousands of tokens earlier?

``python -m nucleusx_jax.eval.positions MODEL_DIR [MODEL_DIR ...] --data STORE_OR_FILES --max-length 65536
--bucket 2048 --output OUT`` scores long documents with each model and writes the mean next-token loss per
position bucket ``[0, bucket), [bucket, 2 * bucket), ...``:

* ``OUT/positions.json``: the settings, and per model its buckets ``{start, stop, mean_loss, perplexity,
  tokens, documents}`` (``documents``: how many documents reach the bucket, i.e. its mean averages over);
* ``OUT/positions.png``: one curve per model against the bucket's middle position, on a log-scaled x axis.

A document is scored window by window (``--window`` tokens), each window continuing the retention state the one
before left (the model call with ``forward_mode="chunkwise"`` and ``past_key_values``, see
:func:`nucleusx_jax.runtime.empty_carried_cache`): every token is predicted from the whole document before it,
exactly as one pass would, in memory that depends on the window only. The loss at position ``p`` is
``-log p(doc[p] | doc[:p])`` in nats (float32); position 0 (the document's first token) is not predicted.

``--data``: a token store directory (:class:`~nucleusx_jax.data.store.TokenStore`, documents are the runs of its
stream up to and including each EOS; its tokenizer must be the models', as training checks), or sources as in
:mod:`nucleusx_jax.sources` (text/jsonl/parquet files, directories, ``builtin:pydoc``), tokenized with the
models' tokenizer as ``[BOS] text [EOS]``, the way ``prepare`` stores them. Documents shorter than
``--min-length`` tokens are skipped, longer ones cut to ``--max-length``; the first ``--max-documents`` that
qualify are scored, the same documents for every model (so the models must share a tokenizer).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .. import checks, runtime, storage
from ..cli import reports_user_errors
from ..data.store import INDEX_FILE, TokenStore
from ..loading import load
from ..model import COMPUTE_DTYPES, NucleusX
from ..sources import iter_source_documents
from ..tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer
from ..types import Array
from .backend import target_scores

PROG = "python -m nucleusx_jax.eval.positions"
JSON_FILE, PLOT_FILE = "positions.json", "positions.png"
READ_BLOCK = 1 << 20  # tokens of a store read at a time while looking for documents


@dataclasses.dataclass(frozen=True)
class PositionOptions:
    """How documents are chosen and scored.

    ``max_length``: documents are cut to this many tokens; ``bucket``: positions per bucket; ``window``: tokens
    per model call (the state carried between calls); ``min_length``: shorter documents are skipped (None: one
    bucket); ``max_documents``: at most this many documents; ``batch_size``: documents per call (padded on the
    right to the longest of them).
    """

    max_length: int = 65536
    bucket: int = 2048
    window: int = 2048
    min_length: Optional[int] = None
    max_documents: int = 64
    batch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("max_length", "bucket", "window", "max_documents", "batch_size"):
            checks.integer(name, getattr(self, name))
        if self.max_length < self.bucket:
            raise ValueError(f"max_length={self.max_length} is invalid: must be >= bucket={self.bucket} (at least "
                             "one whole bucket)")
        if self.min_length is not None:
            checks.integer("min_length", self.min_length, minimum=2, maximum=self.max_length,
                           hint=" (at most max_length)")

    @property
    def shortest(self) -> int:
        """The fewest tokens a scored document has."""
        return self.bucket if self.min_length is None else self.min_length


# ---------------------------------------------------------------------------------------------- documents
def store_documents(store: TokenStore, options: PositionOptions) -> List[np.ndarray]:
    """The first ``options.max_documents`` documents of ``store`` with at least ``options.shortest`` tokens
    (``[BOS] ... [EOS]``), cut to ``options.max_length``, as int32 arrays; read a block at a time."""
    eos = int(store.index["tokenizer"]["eos_id"])
    found: List[np.ndarray] = []
    partial, longest = np.zeros(0, np.int32), 0
    for start in range(0, store.num_tokens, READ_BLOCK):
        block = np.concatenate([partial, store.read(start, min(start + READ_BLOCK, store.num_tokens))])
        ends = np.flatnonzero(block == eos) + 1
        for doc in np.split(block, ends)[:-1]:
            longest = max(longest, len(doc))
            if len(doc) >= options.shortest:
                found.append(doc[:options.max_length])
                if len(found) == options.max_documents:
                    return found
        partial = block[ends[-1]:] if len(ends) else block
    return _enough(found, max(longest, len(partial)), options, f"token store {store.path!r}")


def source_documents(sources: Sequence[str], tokenizer: Tokenizer, options: PositionOptions) -> List[np.ndarray]:
    """As :func:`store_documents` for the documents of ``sources``, tokenized as ``[BOS] text [EOS]``."""
    found: List[np.ndarray] = []
    longest = 0
    for source in sources:
        for text in iter_source_documents(source):
            doc = np.asarray([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id], np.int32)
            longest = max(longest, len(doc))
            if len(doc) >= options.shortest:
                found.append(doc[:options.max_length])
                if len(found) == options.max_documents:
                    return found
    return _enough(found, longest, options, f"the sources {list(sources)}")


def _enough(found: List[np.ndarray], longest: int, options: PositionOptions, where: str) -> List[np.ndarray]:
    if not found:
        raise ValueError(f"no document of {where} has --min-length={options.shortest} tokens or more (the longest "
                         f"has {longest}); give longer documents, or lower --min-length (it defaults to --bucket, "
                         "which must then shrink too)")
    return found


# ------------------------------------------------------------------------------------------------ scoring
@jax.jit
def _token_nll(logits: Array, targets: Array) -> Array:
    """logits ``[B, W, V]``, targets ``[B, W]`` -> ``-log p(target)`` ``[B, W]`` float32 (the evaluation
    backend's :func:`~nucleusx_jax.eval.backend.target_scores`)."""
    return -target_scores(logits, targets)[0]


def token_losses(model: NucleusX, docs: Sequence[np.ndarray], *, window: int, batch_size: int,
                 progress: Optional[tqdm] = None) -> List[np.ndarray]:
    """Per document ``d`` of ``L`` tokens, ``-log p(d[p] | d[:p])`` for ``p = 1 .. L - 1`` (float32 ``[L - 1]``):
    documents in batches of ``batch_size`` (longest first, padded on the right), each run in windows of
    ``window`` positions continuing the carried state. Every call has the shape ``[batch_size, window]``: one
    compilation. ``progress`` is advanced by one per document done."""
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
    out: List[Optional[np.ndarray]] = [None] * len(docs)
    for first in range(0, len(order), batch_size):
        batch = [docs[i] for i in order[first:first + batch_size]]
        cache = runtime.empty_carried_cache(model.config, batch_size)
        losses: List[List[np.ndarray]] = [[] for _ in batch]
        for start in range(0, len(batch[0]) - 1, window):
            ids, mask = runtime.pad_right([d[start:start + window] for d in batch], window, batch_size, 0)
            targets, _ = runtime.pad_right([d[start + 1:start + 1 + window] for d in batch], window, batch_size, 0)
            step = model(ids, attention_mask=mask, forward_mode="chunkwise", past_key_values=cache)
            cache = step.past_key_values
            nll = np.asarray(_token_nll(step.logits, jnp.asarray(targets)))
            for row, d in enumerate(batch):
                losses[row].append(nll[row, :max(0, min(window, len(d) - 1 - start))])
        for row, i in enumerate(order[first:first + batch_size]):
            out[i] = np.concatenate(losses[row])
        if progress is not None:
            progress.update(len(batch))
    return out  # type: ignore[return-value]


def bucket_means(losses: Sequence[np.ndarray], *, bucket: int, max_length: int) -> List[Dict[str, Any]]:
    """The buckets ``[k * bucket, min((k + 1) * bucket, max_length))`` that some document reaches, each with the
    mean loss over every position in it of every document (``losses[d][p - 1]`` is position ``p``'s), its
    perplexity, and how many tokens and documents it averages."""
    n = -(-max_length // bucket)
    sums, tokens, documents = np.zeros(n), np.zeros(n, np.int64), np.zeros(n, np.int64)
    for loss in losses:
        positions = np.arange(1, len(loss) + 1)
        which = positions // bucket
        sums += np.bincount(which, weights=loss.astype(np.float64), minlength=n)
        count = np.bincount(which, minlength=n)
        tokens += count
        documents += count > 0
    return [{"start": k * bucket, "stop": min((k + 1) * bucket, max_length), "mean_loss": float(sums[k] / tokens[k]),
             "perplexity": float(np.exp(sums[k] / tokens[k])), "tokens": int(tokens[k]),
             "documents": int(documents[k])} for k in range(n) if tokens[k]]


# ------------------------------------------------------------------------------------------------ outputs
def plot(models: Sequence[Dict[str, Any]], path: str, *, title: str) -> None:
    """``path``: mean loss per bucket against the bucket's middle position (log x), one curve per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4))
    for m in models:
        ax.plot([(b["start"] + b["stop"]) / 2 for b in m["buckets"]], [b["mean_loss"] for b in m["buckets"]],
                "o-", markersize=3, label=m["name"])
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("position in the document (tokens; bucket middle)")
    ax.set_ylabel("next-token loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    storage.atomic_write(path, png.getvalue())


def _tokenizer_of(path: str, override: Optional[str]) -> Optional[Tokenizer]:
    """``override`` (a tokenizer path) when given; else the model directory's ``tokenizer.model`` (the file
    a store was built with: its fingerprint), its HF tokenizer, or None."""
    if override is not None:
        return load_tokenizer(override)
    if storage.isfile(os.path.join(path, "tokenizer.model")):
        return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"))
    if any(storage.isfile(os.path.join(path, f)) for f in ("tokenizer_config.json", "tokenizer.json")):
        return load_tokenizer(path)
    return None


def _is_store(data: Sequence[str]) -> bool:
    return len(data) == 1 and storage.isdir(data[0]) and any(
        storage.isfile(os.path.join(data[0], f)) for f in (INDEX_FILE, "progress.json"))


def _documents(data: Sequence[str], models: Dict[str, NucleusX], tokenizers: Dict[str, Optional[Tokenizer]],
               options: PositionOptions) -> List[np.ndarray]:
    """The documents every model scores, after checking that the tokenizers agree with the data and models."""
    known = {name: tok for name, tok in tokenizers.items() if tok is not None}
    for name, tok in known.items():
        if tok.vocab_size > models[name].config.vocab_size:
            raise ValueError(f"model {name!r}: its tokenizer has {tok.vocab_size} pieces but the model only "
                             f"vocab_size={models[name].config.vocab_size}: they do not belong together")
    if _is_store(data):
        store = TokenStore(data[0])
        for name, tok in known.items():
            store.check_tokenizer(str(getattr(tok, "fingerprint", "")), f"{name} (tokenizer {tok!r})")
        for name, model in models.items():
            if int(store.index["vocab_size"]) > model.config.vocab_size:
                raise ValueError(f"token store {data[0]!r} has vocab_size={store.index['vocab_size']} but model "
                                 f"{name!r} only {model.config.vocab_size}; prepare it with the model's tokenizer")
        return store_documents(store, options)
    fingerprints = {str(getattr(tok, "fingerprint", repr(tok))) for tok in known.values()}
    if not known:
        raise ValueError(f"--data {list(data)} is text, and no model directory holds a tokenizer: pass "
                         "--tokenizer PATH (a SentencePiece *.model or an HF tokenizer directory)")
    if len(fingerprints) > 1:
        raise ValueError(f"the models' tokenizers differ ({', '.join(f'{n}: {t!r}' for n, t in known.items())}): "
                         "losses per token by position compare only under one tokenizer; pass --tokenizer PATH "
                         "to use one for all, or compare models of one tokenizer")
    return source_documents(data, next(iter(known.values())), options)


def evaluate(paths: Sequence[str], data: Sequence[str], output: str, *, options: PositionOptions,
             names: Optional[Sequence[str]] = None, tokenizer: Optional[str] = None, dtype: str = "float32",
             progress: bool = True) -> Dict[str, Any]:
    """Score the models at ``paths`` (named ``names``, default their paths) on the documents of ``data`` and
    write ``output/positions.json`` and ``output/positions.png``; returns what the JSON holds."""
    names = list(paths) if names is None else list(names)
    if len(names) != len(paths) or len(set(names)) != len(names):
        raise ValueError(f"--names {names} is invalid: must give one distinct name per model ({len(paths)})")
    models = {name: load(path, dtype=dtype) for name, path in zip(names, paths)}
    tokenizers = {name: _tokenizer_of(path, tokenizer) for name, path in zip(names, paths)}
    docs = _documents(data, models, tokenizers, options)
    results = []
    for (name, model), path in zip(models.items(), paths):
        with tqdm(total=len(docs), desc=f"{name}: documents", unit="doc", disable=not progress,
                  file=sys.stderr) as bar:
            losses = token_losses(model, docs, window=options.window, batch_size=options.batch_size, progress=bar)
        buckets = bucket_means(losses, bucket=options.bucket, max_length=options.max_length)
        total = np.concatenate(losses)
        results.append({"name": name, "path": path, "documents": len(docs), "tokens": int(total.size),
                        "mean_loss": float(total.astype(np.float64).mean()), "buckets": buckets})
        if progress:
            print(f"{name}: {len(docs)} documents, {len(buckets)} buckets done", file=sys.stderr)
    lengths = [len(d) for d in docs]
    report = {"settings": {**dataclasses.asdict(options), "min_length": options.shortest, "data": list(data),
                           "documents": len(docs), "document_tokens": {"min": min(lengths), "max": max(lengths),
                                                                        "mean": float(np.mean(lengths))},
                           "dtype": dtype, "loss": "next-token negative log-likelihood, nats, float32",
                           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
              "models": results}
    storage.makedirs(output)
    storage.atomic_write(os.path.join(output, JSON_FILE), json.dumps(report, indent=1) + "\n")
    plot(results, os.path.join(output, PLOT_FILE),
         title=f"loss by position: {len(docs)} documents of {min(lengths)}"
               + (f"-{max(lengths)} tokens" if max(lengths) > min(lengths) else " tokens"))
    return report


def table(report: Dict[str, Any]) -> str:
    """The buckets of every model side by side: ``start-stop  documents  loss(model 1)  loss(model 2) ...``."""
    models = report["models"]
    rows = {}
    for i, m in enumerate(models):
        for b in m["buckets"]:
            rows.setdefault((b["start"], b["stop"]), [b["documents"]] + [None] * len(models))[1 + i] = b["mean_loss"]
    width = max(10, *(len(m["name"]) for m in models))
    lines = [f"{'positions':>13} {'docs':>5} " + " ".join(f"{m['name']:>{width}}" for m in models)]
    for (start, stop), (docs, *losses) in sorted(rows.items()):
        cells = " ".join(f"{'-' if x is None else f'{x:.4f}':>{width}}" for x in losses)
        lines.append(f"{f'{start}-{stop}':>13} {docs:>5} {cells}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", metavar="MODEL_DIR", help="model directories (ours, PyTorch, run exports)")
    p.add_argument("--data", nargs="+", required=True, metavar="STORE_OR_FILES",
                   help="a token store directory, or text/jsonl/parquet files, directories, builtin:pydoc, ...")
    p.add_argument("--output", required=True, help="writes OUTPUT/positions.json and OUTPUT/positions.png")
    d = PositionOptions()
    p.add_argument("--max-length", type=int, default=d.max_length, help="documents are cut to this many tokens")
    p.add_argument("--bucket", type=int, default=d.bucket, help="positions per bucket")
    p.add_argument("--window", type=int, default=d.window, help="tokens per model call; the state is carried")
    p.add_argument("--min-length", type=int, default=None, help="skip shorter documents (default: --bucket)")
    p.add_argument("--max-documents", type=int, default=d.max_documents)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="documents per model call")
    p.add_argument("--names", nargs="+", default=None, help="a name per model for the legend (default: the paths)")
    p.add_argument("--tokenizer", default=None, help="tokenizer for all models (default: each model directory's)")
    p.add_argument("--dtype", default="float32", help=" | ".join(COMPUTE_DTYPES))
    p.add_argument("--no-progress", action="store_true")
    return p


@reports_user_errors
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)
    options = PositionOptions(max_length=args.max_length, bucket=args.bucket, window=args.window,
                              min_length=args.min_length, max_documents=args.max_documents,
                              batch_size=args.batch_size)
    for path in args.models:
        if not storage.is_url(path) and not os.path.isdir(path) and os.path.exists(path):
            raise ValueError(f"MODEL_DIR {path!r} is a file: give a model directory")
    report = evaluate(args.models, args.data, args.output, options=options, names=args.names,
                      tokenizer=args.tokenizer, dtype=args.dtype, progress=not args.no_progress)
    print(table(report))
    print(f"wrote {os.path.join(args.output, JSON_FILE)} and {os.path.join(args.output, PLOT_FILE)}")


if __name__ == "__main__":
    main()
