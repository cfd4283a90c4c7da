"""Perplexity by position (``python -m nucleusx_jax.eval.positions``): the bucketed losses of the windowed pass
with the state carried equal an independent computation (one parallel pass over each whole document, the
log-softmax in numpy float64, bucketed by hand), for a token store and for text files; two models give two
curves; the JSON, the plot and the errors.

``pytest -s tests/test_positions.py -k token_losses`` prints the largest differences from the one-pass
reference; asserted below TOL = 1e-5 (see docs/eval.md for the figures measured).
"""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import count_traces, write_served_model
from pydoc_data.topics import topics

from nucleusx_jax import NucleusX
from nucleusx_jax.data.prepare import PrepareOptions, prepare
from nucleusx_jax.eval import positions
from nucleusx_jax.tokenizer import load_tokenizer

TOL = 1e-5  # nats; float32 windows against a one-pass reference
MAX_LENGTH, BUCKET, WINDOW, BATCH = 256, 32, 48, 3  # a window is no multiple of the bucket or the chunk (8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A jsonl file of 7 documents cut from pydoc's topics: one too short to score (< BUCKET tokens), two ending
    inside buckets (~80 and ~190 tokens), four longer than MAX_LENGTH."""
    whole = " ".join(topics[n] for n in sorted(topics)[:40])
    texts = [whole[i * 5000:i * 5000 + chars] for i, chars in enumerate((30, 150, 400, 2000, 5000, 600, 3000))]
    path = tmp_path_factory.mktemp("positions-corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, served_tokenizer):
    """Two random models (seeds 0 and 1) with the served tokenizer, saved by the library."""
    root = tmp_path_factory.mktemp("positions-models")
    return {name: (root / name, write_served_model(root / name, served_tokenizer, seed))
            for seed, name in enumerate(("m0", "m1"))}


@pytest.fixture(scope="module")
def store(tmp_path_factory, corpus, served_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("positions-store") / "store"
    prepare([str(corpus)], served_tokenizer, str(out), options=PrepareOptions(progress=False))
    return out


def reference_documents(corpus: Path, tokenizer_file: str):
    tok = load_tokenizer(tokenizer_file)
    docs = [[tok.bos_id, *tok.encode(json.loads(line)["text"]), tok.eos_id] for line in corpus.read_text().splitlines()]
    return [np.asarray(d[:MAX_LENGTH], np.int32) for d in docs if len(d) >= BUCKET]


def one_pass_losses(model, doc: np.ndarray) -> np.ndarray:
    """``-log p(doc[p] | doc[:p])``, p = 1 .. L - 1, from one parallel pass, the log-softmax in float64."""
    logits = np.asarray(model(doc[None], forward_mode="parallel").logits[0], np.float64)[:-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -logp[np.arange(len(doc) - 1), doc[1:]]


def by_hand(losses):
    """{(start, stop): (mean, tokens, documents)} over the positions of every document in each bucket."""
    out = {}
    for start in range(0, MAX_LENGTH, BUCKET):
        stop = min(start + BUCKET, MAX_LENGTH)
        parts = [loss[max(start, 1) - 1:stop - 1] for loss in losses]
        parts = [p for p in parts if len(p)]
        if parts:
            out[(start, stop)] = (np.concatenate(parts).mean(), sum(map(len, parts)), len(parts))
    return out


def run_cli(argv):
    positions.main([*argv, "--no-progress"])


@pytest.mark.parametrize("data", ["store", "files"])
def test_buckets_equal_one_pass_per_document(data, tmp_path, corpus, store, models, served_tokenizer, capsys):
    """Two models, both data kinds: per-bucket means, token and document counts equal a parallel pass over
    each whole document bucketed by hand; the JSON holds two curves; the plot is a PNG."""
    out = tmp_path / "out"
    source = str(store) if data == "store" else str(corpus)
    run_cli([str(models["m0"][0]), str(models["m1"][0]), "--data", source, "--max-length", str(MAX_LENGTH),
             "--bucket", str(BUCKET), "--window", str(WINDOW), "--batch-size", str(BATCH), "--names", "m0", "m1",
             "--output", str(out)])
    report = json.loads((out / "positions.json").read_text())
    docs = reference_documents(corpus, served_tokenizer)
    assert len(docs) == 6 and max(map(len, docs)) == MAX_LENGTH and min(map(len, docs)) < MAX_LENGTH
    settings = report["settings"]
    assert (settings["max_length"], settings["bucket"], settings["window"], settings["documents"]) == (
        MAX_LENGTH, BUCKET, WINDOW, len(docs))
    assert settings["data"] == [source] and settings["min_length"] == BUCKET and settings["date"]
    assert [m["name"] for m in report["models"]] == ["m0", "m1"]
    means = []
    for entry in report["models"]:
        model = models[entry["name"]][1]
        want = by_hand([one_pass_losses(model, d) for d in docs])
        got = {(b["start"], b["stop"]): b for b in entry["buckets"]}
        assert set(got) == set(want)
        for key, (mean, tokens, documents) in want.items():
            assert (got[key]["tokens"], got[key]["documents"]) == (tokens, documents), key
            assert abs(got[key]["mean_loss"] - mean) < TOL, (key, got[key]["mean_loss"], mean)
            assert got[key]["perplexity"] == pytest.approx(np.exp(got[key]["mean_loss"]), rel=1e-12)
        means.append([b["mean_loss"] for b in entry["buckets"]])
    assert means[0] != means[1]  # two models, two curves
    assert (out / "positions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"{MAX_LENGTH - BUCKET}-{MAX_LENGTH}" in printed and "positions.json" in printed


def test_token_losses_equal_one_pass(models, corpus, served_tokenizer):
    """Per token, the windowed losses with the state carried equal the one-pass ones; a batch with a spare
    row and documents ending inside a window."""
    model = models["m0"][1]
    docs = reference_documents(corpus, served_tokenizer)[:4]
    got = positions.token_losses(model, docs, window=WINDOW, batch_size=BATCH)
    want = [one_pass_losses(model, d) for d in docs]
    errors = [np.max(np.abs(g - w)) for g, w in zip(got, want)]
    assert [len(g) for g in got] == [len(d) - 1 for d in docs]
    assert max(errors) < TOL, errors
    by_bucket = max(abs(b["mean_loss"] - by_hand(want)[(b["start"], b["stop"])][0])
                    for b in positions.bucket_means(got, bucket=BUCKET, max_length=MAX_LENGTH))
    print(f"largest difference from one pass: per token {max(errors):.2g}, per bucket {by_bucket:.2g} nats")


def test_one_compilation_for_every_window_and_document(models, corpus, served_tokenizer):
    """After one window of short documents, documents of many windows (the carried cache as input, other
    lengths, a spare row) compile nothing more."""
    model = NucleusX(models["m0"][1].config, models["m0"][1].params)  # its own, uncompiled, jit
    docs = reference_documents(corpus, served_tokenizer)
    positions.token_losses(model, [d[:WINDOW // 2] for d in docs[:2]], window=WINDOW, batch_size=BATCH)
    with count_traces() as traces:
        positions.token_losses(model, docs, window=WINDOW, batch_size=BATCH)
    assert traces == []


def test_min_length_and_max_documents_choose_documents(models, store, tmp_path):
    out = tmp_path / "out"
    run_cli([str(models["m0"][0]), "--data", str(store), "--max-length", str(MAX_LENGTH), "--bucket",
             str(BUCKET), "--min-length", str(MAX_LENGTH), "--max-documents", "2", "--output", str(out)])
    report = json.loads((out / "positions.json").read_text())
    assert report["settings"]["documents"] == 2 and report["settings"]["document_tokens"]["min"] == MAX_LENGTH
    assert all(b["documents"] == 2 for b in report["models"][0]["buckets"])


def errors_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_input_is_one_line(models, store, corpus, tmp_path, capsys, served_tokenizer):
    m0 = str(models["m0"][0])
    common = ["--data", str(store), "--output", str(tmp_path / "out")]
    assert "bucket=0 is invalid: must be an integer >= 1" in errors_of([m0, *common, "--bucket", "0"], capsys)
    assert "max_length=64 is invalid: must be >= bucket=128" in errors_of(
        [m0, *common, "--bucket", "128", "--max-length", "64"], capsys)
    longest = max(len(tok) + 2 for tok in map(load_tokenizer(served_tokenizer).encode,
                                              (json.loads(line)["text"] for line in corpus.read_text().splitlines())))
    for data in (str(store), str(corpus)):
        err = errors_of([m0, "--data", data, "--output", str(tmp_path / "out"), "--bucket", "4096",
                         "--max-length", "8192"], capsys)
        assert f"has --min-length=4096 tokens or more (the longest has {longest})" in err, err
        assert "lower --min-length" in err
    assert f"{tmp_path / 'nowhere'}' does not exist" in errors_of([str(tmp_path / "nowhere"), *common], capsys)
    assert "is a file: give a model directory" in errors_of([str(models["m0"][0] / "config.json"), *common], capsys)
    assert "data source" in errors_of([m0, "--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path)], capsys)
    assert "one distinct name per model" in errors_of([m0, *common, "--names", "a", "b"], capsys)
    assert not (tmp_path / "out").exists()


def test_store_of_another_tokenizer_is_refused(store, tmp_path, capsys):
    from nucleusx_jax.tokenizer import train_tokenizer

    other = train_tokenizer(["builtin:pydoc"], str(tmp_path / "other"), 400, max_sentences=500)
    model_dir = tmp_path / "other-model"
    write_served_model(model_dir, other, 2)
    err = errors_of([str(model_dir), "--data", str(store), "--output", str(tmp_path / "o")], capsys)
    assert "was built with another tokenizer" in err


def test_text_without_a_tokenizer_is_refused(models, corpus, tmp_path, capsys):
    bare = tmp_path / "bare"
    models["m0"][1].save_pretrained(bare)
    err = errors_of([str(bare), "--data", str(corpus), "--output", str(tmp_path / "o")], capsys)
    assert "pass --tokenizer PATH" in err
