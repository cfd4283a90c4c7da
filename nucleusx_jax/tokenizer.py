"""Tokenizers for training and generation: SentencePiece models and local HF tokenizer directories.

:func:`load_tokenizer` opens a SentencePiece ``*.model`` file (or a directory holding ``tokenizer.model``)
or a transformers tokenizer directory (``AutoTokenizer``, local files only). :func:`train_tokenizer` trains a
llama-2-style SentencePiece model: BPE, ``byte_fallback`` (no text is ever out of vocabulary), digits split
one by one, whitespace kept as is (identity normalisation). Its special ids are ``<unk>=0, <s>=1, </s>=2,
<pad>=3``: llama's unk/bos/eos ids (the defaults of :class:`~nucleusx_jax.NucleusXConfig`) plus a real pad piece.

CLI: ``python -m nucleusx_jax.tokenizer --corpus FILE... --output PREFIX --vocab-size N``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
from typing import List, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import sentencepiece as spm

from .cli import reports_user_errors
from .sources import iter_source_documents
from . import checks, storage
from .storage import atomic_write

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MIN_VOCAB_SIZE = 261  # 256 byte-fallback pieces + unk/bos/eos/pad + at least one merge
# SentencePiece skips longer input "sentences"; longer lines are cut into pieces of this many characters.
MAX_SENTENCE_CHARS = 4096


@runtime_checkable
class Tokenizer(Protocol):
    """What the trainer and generation use. ``encode`` adds no special tokens; ``decode`` drops them."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> List[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def decodable(ids: Sequence[int], vocab_size: int) -> List[int]:
    """``ids`` as ints, or a ValueError naming the first id outside ``[0, vocab_size)``: a model whose vocabulary
    is larger than its tokenizer's (padded for speed) can produce ids no piece stands for."""
    out = [int(i) for i in ids]
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} has no piece in the tokenizer, whose ids are [0, {vocab_size}): the "
                         f"model's vocabulary is larger than its tokenizer's, and it produced an id beyond it")
    return out


class SentencePieceTokenizer:
    """A SentencePiece model file. ``pad_id`` is the model's pad piece, or ``eos_id`` when it has none.
    ``num_threads`` threads encode a batch (``-1``: SentencePiece's default, every core)."""

    def __init__(self, model_file: str, *, num_threads: int = -1):
        proto = storage.read_bytes(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as err:  # sentencepiece's own parse error, e.g. "ParseFromArray failed"
            raise ValueError(f"tokenizer {model_file} is not a SentencePiece model ({err})") from None
        self.path = model_file
        self.num_threads = num_threads
        self.fingerprint = hashlib.sha256(proto).hexdigest()
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"SentencePiece model {model_file} has no eos piece; documents need an EOS separator")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(texts), num_threads=self.num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(decodable(ids, self.vocab_size))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class HFTokenizer:
    """A transformers tokenizer directory, loaded with ``AutoTokenizer`` from local files only.

    ``vocab_size`` is ``len(tokenizer)`` (added tokens included); ``pad_id`` falls back to ``eos_id``.
    """

    def __init__(self, directory: str):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load an HF tokenizer from {directory!r}: {e}") from e
        if self.tok.eos_token_id is None:
            raise ValueError(f"HF tokenizer {directory!r} has no eos token; documents need an EOS separator")
        self.path = directory
        self.vocab_size = len(self.tok)
        self.eos_id = int(self.tok.eos_token_id)
        self.bos_id = int(self.tok.bos_token_id) if self.tok.bos_token_id is not None else self.eos_id
        self.pad_id = int(self.tok.pad_token_id) if self.tok.pad_token_id is not None else self.eos_id
        h = hashlib.sha256()
        for name in sorted(os.listdir(directory)):
            full = os.path.join(directory, name)
            if os.path.isfile(full):
                h.update(name.encode())
                with open(full, "rb") as f:
                    h.update(f.read())
        self.fingerprint = h.hexdigest()

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(decodable(ids, self.vocab_size), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str, *, num_threads: int = -1) -> Tokenizer:
    """Open a SentencePiece ``*.model`` file, a directory holding ``tokenizer.model`` (without an HF
    ``tokenizer_config.json``), both local or URLs (see :mod:`.storage`), or a local HF tokenizer directory. ``num_threads`` is SentencePiece's
    batch-encoding thread count (HF tokenizers follow ``TOKENIZERS_PARALLELISM``)."""
    if storage.isfile(path):
        return SentencePieceTokenizer(path, num_threads=num_threads)
    if storage.isdir(path):
        if storage.isfile(os.path.join(path, "tokenizer_config.json")) or storage.isfile(
            os.path.join(path, "tokenizer.json")
        ):
            if storage.is_url(path):
                raise ValueError(f"HF tokenizer directory {path!r}: HF tokenizers load from local directories only; "
                                 "copy it to local disk, or use a SentencePiece *.model, which may be a URL")
            return HFTokenizer(path)
        if storage.isfile(os.path.join(path, "tokenizer.model")):
            return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"), num_threads=num_threads)
        raise ValueError(
            f"tokenizer directory {path!r} holds neither tokenizer_config.json / tokenizer.json (HF) "
            f"nor tokenizer.model (SentencePiece)"
        )
    raise FileNotFoundError(f"tokenizer {path!r} does not exist (expected a SentencePiece *.model file or a directory)")


def _training_lines(
    corpus_files: Sequence[str], text_field: str, format: str, max_sentences: int, seed: int
) -> List[str]:
    """The non-empty lines of every document (long ones cut), deterministically subsampled to ``max_sentences``."""
    lines: List[str] = []
    for source in corpus_files:
        for doc in iter_source_documents(source, format=format, text_field=text_field):
            for line in doc.splitlines():
                if line.strip():
                    lines.extend(line[i : i + MAX_SENTENCE_CHARS] for i in range(0, len(line), MAX_SENTENCE_CHARS))
    if not lines:
        raise ValueError(f"the tokenizer corpus {list(corpus_files)} holds no text")
    if len(lines) > max_sentences:
        keep = np.sort(np.random.default_rng(seed).choice(len(lines), size=max_sentences, replace=False))
        lines = [lines[i] for i in keep]
    return lines


def train_tokenizer(
    corpus_files: Sequence[str],
    output_prefix: str,
    vocab_size: int,
    *,
    text_field: str = "text",
    max_sentences: int = 2_000_000,
    format: str = "auto",
    character_coverage: float = 0.99995,
    seed: int = 0,
    num_threads: int = 1,
) -> str:
    """Train a llama-2-style SentencePiece BPE tokenizer and return the path ``<output_prefix>.model``.

    ``corpus_files`` are data sources as in :class:`~nucleusx_jax.train.data.DataConfig` (text/jsonl files,
    HF datasets, ``builtin:pydoc``). Each line of each document is one SentencePiece sentence; at most
    ``max_sentences`` lines are used (a seeded, deterministic subsample). The same inputs give the same file,
    which is written atomically.
    """
    if isinstance(corpus_files, str):
        raise TypeError(f"corpus_files must be a list of sources, got the string {corpus_files!r}")
    checks.integer("vocab_size", vocab_size, minimum=MIN_VOCAB_SIZE,
                   hint=" (256 byte pieces + 4 special pieces + merges)")
    checks.integer("max_sentences", max_sentences)
    lines = _training_lines(corpus_files, text_field, format, max_sentences, seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            max_sentence_length=4 * MAX_SENTENCE_CHARS,  # bytes; a UTF-8 character takes at most 4
            input_sentence_size=0,
            num_threads=num_threads,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            hard_vocab_limit=True,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed for vocab_size={vocab_size} on {list(corpus_files)}: {e}") from e
    path = output_prefix + ".model"
    atomic_write(path, model.getvalue())
    return path


def save_hf_tokenizer(model_file: str, output_dir: str) -> str:
    """Write a SentencePiece model as an HF ``LlamaTokenizer`` directory (``tokenizer.model``,
    ``tokenizer_config.json``, ``special_tokens_map.json``: what ``LlamaTokenizer.save_pretrained`` writes,
    with ``legacy=False``, BOS added, no EOS), without needing transformers; returns ``output_dir``."""
    sp = SentencePieceTokenizer(model_file)
    names = {"unk_token": sp.sp.id_to_piece(sp.sp.unk_id()), "bos_token": sp.sp.id_to_piece(sp.bos_id),
             "eos_token": sp.sp.id_to_piece(sp.eos_id), "pad_token": sp.sp.id_to_piece(sp.pad_id)}
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special = sorted({sp.sp.unk_id(), sp.bos_id, sp.eos_id, sp.pad_id})
    config = {
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": True,
        "added_tokens_decoder": {str(i): {"content": sp.sp.id_to_piece(i), **flags, "special": True} for i in special},
        **names, "clean_up_tokenization_spaces": False, "extra_special_tokens": {}, "legacy": False,
        "model_max_length": 1000000000000000019884624838656, "sp_model_kwargs": {},
        "spaces_between_special_tokens": False, "tokenizer_class": "LlamaTokenizer",
        "use_default_system_prompt": False,
    }
    storage.makedirs(output_dir)
    atomic_write(os.path.join(output_dir, "tokenizer.model"), storage.read_bytes(model_file))
    atomic_write(os.path.join(output_dir, "tokenizer_config.json"), json.dumps(config, indent=2, sort_keys=True) + "\n")
    special_map = {key: {"content": value, **flags} for key, value in sorted(names.items())}
    atomic_write(os.path.join(output_dir, "special_tokens_map.json"), json.dumps(special_map, indent=2) + "\n")
    return output_dir


@reports_user_errors
def main(argv: Optional[Sequence[str]] = None) -> str:
    """CLI entry point; prints and returns the written ``.model`` path."""
    p = argparse.ArgumentParser(
        prog="python -m nucleusx_jax.tokenizer",
        description="Train a llama-2-style SentencePiece tokenizer (BPE, byte fallback) on a corpus.",
    )
    p.add_argument("--corpus", nargs="+", required=True, help="text/jsonl files, hf:PATH, builtin:pydoc, ...")
    p.add_argument("--output", required=True, help="output prefix; writes PREFIX.model")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--text-field", default="text", help="jsonl / HF datasets field holding the text")
    p.add_argument("--format", default="auto", help="auto | text | jsonl | hf")
    p.add_argument("--max-sentences", type=int, default=2_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    path = train_tokenizer(
        args.corpus,
        args.output,
        args.vocab_size,
        text_field=args.text_field,
        max_sentences=args.max_sentences,
        format=args.format,
        seed=args.seed,
        num_threads=args.num_threads,
    )
    tok = load_tokenizer(path)
    print(f"wrote {path} (vocab_size={tok.vocab_size}, bos={tok.bos_id}, eos={tok.eos_id}, pad={tok.pad_id})")
    return path


if __name__ == "__main__":
    main()
