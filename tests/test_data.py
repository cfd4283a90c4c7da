"""Tokenizer training/loading, text sources and the ``data`` config section (token stores, batches and
mixtures: tests/test_data_store.py)."""

import gzip
import os
import sys

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from nucleusx_jax import tokenizer as tokenizer_module
from nucleusx_jax.sources import iter_source_documents
from nucleusx_jax.train.data import DataConfig
from nucleusx_jax.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    save_hf_tokenizer,
    train_tokenizer,
)

VOCAB = 512


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return train_tokenizer(["builtin:pydoc"], str(tmp_path_factory.mktemp("tok") / "pydoc"), VOCAB)


@pytest.fixture(scope="module")
def tok(sp_path):
    return load_tokenizer(sp_path)


def _cfg(sources, **kw):
    kw.setdefault("seq_len", 16)
    return DataConfig(sources=list(sources), **kw)


def iter_documents(cfg):
    """Every document of every source of ``cfg``, in order."""
    for source in cfg.sources:
        yield from iter_source_documents(source, cfg.format, cfg.text_field)


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_llama_style_settings(sp_path, tok):
    proto = sentencepiece_model_pb2.ModelProto()
    with open(sp_path, "rb") as f:
        proto.ParseFromString(f.read())
    spec = proto.trainer_spec
    assert spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert spec.byte_fallback and spec.split_digits
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
    assert tok.vocab_size == VOCAB
    assert [tok.sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    # split_digits: each digit is its own piece
    digits = [tok.sp.id_to_piece(i) for i in tok.encode("x 2024")][-4:]
    assert digits == ["2", "0", "2", "4"]
    assert not [p for p in os.listdir(os.path.dirname(sp_path)) if p.startswith(".tmp")]


def test_tokenizer_round_trip_and_byte_fallback(tok):
    from pydoc_data.topics import topics

    for key in ("if", "for", "lambda"):
        assert tok.decode(tok.encode(topics[key])) == topics[key]
    unseen = "emoji \U0001F642 and 日本"
    ids = tok.encode(unseen)
    assert 0 not in ids  # never <unk>
    assert tok.decode(ids) == unseen
    pieces = [tok.sp.id_to_piece(i) for i in ids]
    smile = [f"<0x{b:02X}>" for b in "\U0001F642".encode("utf-8")]
    assert any(pieces[i : i + 4] == smile for i in range(len(pieces)))
    assert tok.encode_batch(["if", unseen]) == [tok.encode("if"), ids]


def test_tokenizer_training_is_deterministic_and_cli(tmp_path, tok):
    path = tokenizer_module.main(["--corpus", "builtin:pydoc", "--output", str(tmp_path / "cli"), "--vocab-size", str(VOCAB)])
    again = spm.SentencePieceProcessor(model_file=path)
    assert [again.id_to_piece(i) for i in range(VOCAB)] == [tok.sp.id_to_piece(i) for i in range(VOCAB)]


def test_tokenizer_from_directory_and_errors(tmp_path, sp_path, tok):
    d = tmp_path / "spdir"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(open(sp_path, "rb").read())
    assert load_tokenizer(str(d)).encode("print(x)") == tok.encode("print(x)")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "not.model").write_bytes(b"plain text, not a model proto")
    with pytest.raises(ValueError, match=r"^tokenizer .*not\.model is not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "not.model"))
    with pytest.raises(ValueError, match=r"^vocab_size=100 is invalid: must be an integer >= 261 \(256 byte pieces"):
        train_tokenizer(["builtin:pydoc"], str(tmp_path / "x"), 100)
    with pytest.raises(ValueError, match="SentencePiece training failed"):
        train_tokenizer(["builtin:pydoc"], str(tmp_path / "x"), 100_000)
    with pytest.raises(TypeError, match="list of sources"):
        train_tokenizer("builtin:pydoc", str(tmp_path / "x"), VOCAB)


def test_hf_tokenizer_from_sentencepiece(tmp_path, sp_path, tok):
    out = save_hf_tokenizer(sp_path, str(tmp_path / "hf"))
    hf = load_tokenizer(out)
    assert isinstance(hf, HFTokenizer) and isinstance(hf, Tokenizer)
    assert (hf.vocab_size, hf.bos_id, hf.eos_id, hf.pad_id) == (VOCAB, 1, 2, 3)
    from pydoc_data.topics import topics

    for key in ("if", "with", "class"):
        assert hf.encode(topics[key]) == tok.encode(topics[key])
        assert hf.decode(hf.encode(topics[key])) == topics[key]
    assert hf.decode([1] + tok.encode("x = 1") + [2]) == "x = 1"  # special tokens dropped


def test_decode_refuses_an_id_beyond_the_tokenizer(tmp_path, sp_path, tok):
    """A model padded beyond its tokenizer's vocabulary can produce an id no piece stands for: decoding it is a
    ValueError naming the id (sentencepiece alone raises a bare IndexError), in both tokenizer kinds."""
    hf = load_tokenizer(save_hf_tokenizer(sp_path, str(tmp_path / "hf")))
    for t in (tok, hf):
        assert t.decode(tok.encode("x = 1") + [VOCAB - 1]) == tok.decode(tok.encode("x = 1") + [VOCAB - 1])
        for bad in (VOCAB, VOCAB + 5, -1):
            with pytest.raises(ValueError, match=rf"^token id {bad} has no piece in the tokenizer, whose ids are "
                                                 rf"\[0, {VOCAB}\)"):
                t.decode(tok.encode("x = 1") + [bad])


def test_hf_tokenizer_built_with_tokenizers_library(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, "hello": 2, "world": 3}
    raw = RawTokenizer(WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="<eos>").save_pretrained(tmp_path / "wl")
    hf = load_tokenizer(str(tmp_path / "wl"))
    assert hf.encode("hello world hello") == [2, 3, 2]
    assert hf.encode("hello mars") == [2, 0]
    assert (hf.vocab_size, hf.eos_id, hf.bos_id, hf.pad_id) == (4, 1, 1, 1)  # bos and pad fall back to eos
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path / "noeos")
    with pytest.raises(ValueError, match="has no eos token"):
        load_tokenizer(str(tmp_path / "noeos"))


# -------------------------------------------------------------------------------------------------- sources


def test_builtin_pydoc_corpus():
    from pydoc_data.topics import topics

    docs = list(iter_source_documents("builtin:pydoc"))
    assert docs == [topics[k] for k in sorted(topics)]
    assert sum(map(len, docs)) > 300_000


def test_builtin_stdlib_corpus():
    import inspect
    import json as json_module

    docs = list(iter_source_documents("builtin:stdlib"))
    assert len(docs) > 300 and sum(map(len, docs)) > 1_000_000
    by_module = {d.split("\n", 1)[0]: d for d in docs if d.startswith("module ")}
    doc = by_module["module json"]
    assert doc.startswith("module json\n" + inspect.getdoc(json_module))
    assert "\n\ndef dumps\n" + inspect.getdoc(json_module.dumps) in doc
    assert not [m for m in by_module if m.startswith(("module test.", "module idlelib", "module site-packages"))]
    assert list(iter_source_documents("builtin:stdlib")) == docs


def test_text_jsonl_gz_dir_and_glob_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\n  \n\nsecond one\n\n\n  third, indented\n")
    (tmp_path / "b.jsonl").write_text('{"body": "from jsonl"}\n\n{"body": "   "}\n{"body": "again"}\n')
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write('{"body": "zipped"}\n')
    (tmp_path / "notes.md").write_text("ignored by directory auto-detection")
    text_docs = ["first paragraph\nstill first", "second one", "  third, indented"]
    assert list(iter_source_documents(str(tmp_path / "a.txt"))) == text_docs
    assert list(iter_source_documents(str(tmp_path / "b.jsonl"), text_field="body")) == ["from jsonl", "again"]
    cfg = _cfg([str(tmp_path)], text_field="body")
    assert list(iter_documents(cfg)) == text_docs + ["from jsonl", "again", "zipped"]
    cfg = _cfg([str(tmp_path / "*.jsonl*"), str(tmp_path / "a.txt")], text_field="body")
    assert list(iter_documents(cfg)) == ["from jsonl", "again", "zipped"] + text_docs
    # an explicit format overrides the file name
    assert list(iter_source_documents(str(tmp_path / "notes.md"), format="text")) == ["ignored by directory auto-detection"]


def test_zst_and_parquet_sources_stream(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    with zstandard.open(tmp_path / "a.jsonl.zst", "wt", encoding="utf-8") as f:
        f.write('{"text": "zst one"}\n{"text": "zst two"}\n')
    with zstandard.open(tmp_path / "b.txt.zst", "wt", encoding="utf-8") as f:
        f.write("para one\nline two\n\npara two\n")
    texts = [f"row {i}" for i in range(10)] + ["  "]
    pq.write_table(pa.table({"text": texts, "n": list(range(11))}), tmp_path / "c.parquet", row_group_size=3)
    assert list(iter_source_documents(str(tmp_path / "a.jsonl.zst"))) == ["zst one", "zst two"]
    assert list(iter_source_documents(str(tmp_path / "b.txt.zst"))) == ["para one\nline two", "para two"]
    assert list(iter_source_documents(str(tmp_path / "c.parquet"))) == texts[:10]
    assert list(iter_documents(_cfg([str(tmp_path)]))) == ["zst one", "zst two", "para one\nline two", "para two"] + texts[:10]
    with pytest.raises(ValueError, match=r"no column 'body' \(columns: \['text', 'n'\]\)"):
        list(iter_source_documents(str(tmp_path / "c.parquet"), text_field="body"))


def test_hf_datasets_directory(tmp_path, tok):
    import datasets  # the `test` and `data` extras install it
    texts = ["alpha beta", "", "gamma delta", "epsilon"]
    datasets.Dataset.from_dict({"content": texts, "n": [1, 2, 3, 4]}).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"content": texts[:2]}), "test": datasets.Dataset.from_dict({"content": ["x"]})}
    ).save_to_disk(str(tmp_path / "dd"))
    want = ["alpha beta", "gamma delta", "epsilon"]
    assert list(iter_source_documents("hf:" + str(tmp_path / "ds"), text_field="content")) == want
    assert list(iter_source_documents(str(tmp_path / "ds"), text_field="content")) == want  # auto-detected
    assert list(iter_source_documents(str(tmp_path / "dd"), format="hf", text_field="content")) == ["alpha beta"]
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['content', 'n'\]\)"):
        list(iter_source_documents("hf:" + str(tmp_path / "ds")))
    with pytest.raises(FileNotFoundError, match="not an HF datasets directory"):
        list(iter_source_documents("hf:" + str(tmp_path / "missing")))


def test_missing_datasets_package_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'nucleusx-jax\[data\]'"):
        list(iter_source_documents("hf:" + str(tmp_path)))


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(sources="builtin:pydoc"), "non-empty list"),
        (dict(sources=[]), "non-empty list"),
        (dict(format="xml"), "data.format='xml' is invalid: must be one of auto, text, jsonl, parquet, hf"),
        (dict(seq_len=0), "data.seq_len=0 is invalid: must be an integer >= 1"),
        (dict(vocab_size=100), "data.vocab_size=100 is invalid: must be an integer >= 261"),
        (dict(eval_fraction=1.0), r"data.eval_fraction must be a number in \[0, 1\), got 1.0"),
        (dict(shuffle="yes"), "data.shuffle='yes' is invalid: must be true or false"),
        (dict(seed=True), "data.seed=True is invalid: must be an integer >= 0"),
    ],
)
def test_config_errors(kw, match):
    kw.setdefault("sources", ["builtin:pydoc"])
    with pytest.raises(ValueError, match=match):
        DataConfig(**kw)


def test_source_errors(tmp_path, tok):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    cases = [
        (str(tmp_path / "missing.txt"), FileNotFoundError, "missing.txt' does not exist"),
        (str(tmp_path / "*.parquet"), FileNotFoundError, "matches no files"),
        ("builtin:wikipedia", ValueError, r"unknown builtin source 'builtin:wikipedia'; available: \['builtin:pydoc', 'builtin:stdlib'\]"),
        ("nosuch://bucket/x", OSError, r"nosuch://bucket/x: no filesystem for this URL \(Protocol not known"),  # fsspec
        (str(tmp_path / "bad.jsonl"), ValueError, r"bad.jsonl:2: no field 'text' \(record has \['body'\]\)"),
        (str(tmp_path / "broken.jsonl"), ValueError, "broken.jsonl:2: invalid JSON"),
        (str(tmp_path / "data.csv"), ValueError, "unknown source format: cannot tell the format of .*data.csv"),
    ]
    for source, exc, match in cases:
        with pytest.raises(exc, match=match):
            list(iter_documents(_cfg([source])))
    assert list(iter_documents(_cfg([str(tmp_path / "blank.txt")]))) == []
