"""Two real processes (jax.distributed on 127.0.0.1, 2 CPU devices each) start a run whose tokenizer and token
store do not exist yet: process 0 trains the tokenizer and prepares the store while process 1 waits at the
barriers, then both train on them. The tokenizer and the store are byte for byte what one process makes of
the same sources (the shared ``data.seed``), and only process 0 did the work."""

import os

import pytest

from nucleusx_jax.data.store import TokenStore
from nucleusx_jax.tokenizer import train_tokenizer
from nucleusx_jax.train.config import load_config
from nucleusx_jax.runs import RUN_FILES
from nucleusx_jax.train.data import prepare_run_stores
from nucleusx_jax.train.metrics import read_metrics

from test_train_run import TINY, _two_processes, overrides

SOURCE = "builtin:pydoc"


def files(directory):
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))
            if n != "prepare.lock"}


@pytest.mark.slow
def test_process_0_trains_the_tokenizer_and_prepares_the_store_while_process_1_waits(tmp_path):
    run_dir = str(tmp_path / "run")
    settings = overrides("", run_dir, f"data.sources=[{SOURCE!r}]", "mesh.data=2", "mesh.fsdp=2", "train.steps=2",
                         "checkpoint.every=0", "checkpoint.export_hf=false", "train.eval_every=0",
                         "logging.sample_tokens=0", "logging.plot=false")
    outs = _two_processes([a for o in settings for a in ("--set", o)])
    assert "training a 512-piece SentencePiece tokenizer" in outs[0]
    assert "training a" not in outs[1] and "SentencePiece" not in outs[1], outs[1][-3000:]
    assert sorted(r["step"] for r in read_metrics(run_dir, "train")) == [1, 2]

    cfg = load_config(TINY, settings).data  # the same tokenizer and store made by one process
    alone = str(tmp_path / "alone")
    sp = train_tokenizer([SOURCE], os.path.join(alone, "tokenizer"), cfg.vocab_size, text_field=cfg.text_field,
                         format=cfg.format, seed=cfg.seed)
    assert open(os.path.join(run_dir, "tokenizer.model"), "rb").read() == open(sp, "rb").read()
    prepare_run_stores(cfg, os.path.join(run_dir, "tokenizer.model"), alone, progress=False)
    for split in sorted(os.listdir(os.path.join(alone, RUN_FILES.data))):
        assert files(os.path.join(run_dir, RUN_FILES.data, split)) == files(os.path.join(alone, RUN_FILES.data, split)), split
        assert TokenStore(os.path.join(run_dir, RUN_FILES.data, split)).verify() == []
