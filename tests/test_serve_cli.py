"""``python -m nucleusx_jax.serve``: its options, in-process (``main`` with ``cli.Server`` replaced by one that
drives the configured app with FastAPI's TestClient); its one-line ``error:`` messages for bad model directories
and bad option values; and the real command in a subprocess, on port 0, answering where it says it listens.

A PyTorch directory served in bfloat16 under another name answers with the greedy tokens of offline ``generate``
on the same weights and dtype."""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from nucleusx_jax import from_pretrained  # noqa: E402
from nucleusx_jax import generate as gen  # noqa: E402
from nucleusx_jax.convert import convert  # noqa: E402
from nucleusx_jax.serve import cli  # noqa: E402
from nucleusx_jax.tokenizer import load_tokenizer  # noqa: E402

from conftest import ROOT, SERVER_START_S, write_served_model  # noqa: E402

PROMPT = "def parse(text):"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, served_tokenizer):
    d = tmp_path_factory.mktemp("cli-model")
    write_served_model(d, served_tokenizer, seed=1)
    return d


def greedy(model_dir, ids, dtype=None, n=8):
    model = from_pretrained(model_dir, dtype=dtype)
    return gen.generate(model, np.asarray([ids]), max_new_tokens=n, eos_token_id=[])[0, len(ids):].tolist()


def test_pytorch_dir_dtype_and_served_model_name(model_dir, tmp_path, monkeypatch):
    convert(str(model_dir), str(tmp_path / "torch"), "torch", progress=False)
    sp = str(model_dir / "tokenizer.model")
    tok = load_tokenizer(sp)
    ids = [tok.bos_id] + tok.encode(PROMPT)
    want = greedy(tmp_path / "torch", ids, dtype="bfloat16")
    seen = {}

    class Driver:  # stands in for cli.Server: runs requests against the configured app, serves nothing
        interrupted = False  # no SIGINT stopped it

        def __init__(self, config, url):
            self.config, self.url = config, url

        def run(self, sockets):
            seen["url"], seen["bound"] = self.url, sockets[0].getsockname()
            drive(self.config.app)

    def drive(app):
        with TestClient(app) as client:
            seen["models"] = [m["id"] for m in client.get("/v1/models").json()["data"]]
            r = client.post("/v1/completions", json={"model": "mine", "prompt": ids, "max_tokens": 8,
                                                     "temperature": 0, "ignore_eos": True, "return_token_ids": True})
            seen["tokens"] = r.json()["choices"][0]["token_ids"]
            seen["wrong_name"] = client.post("/v1/completions", json={"model": "torch", "prompt": ids}).status_code

    def load_backend(model_dir, dtype=None):  # the real one, observed
        seen["backend"] = real_load_backend(model_dir, dtype=dtype)
        return seen["backend"]

    real_load_backend = cli.load_backend
    monkeypatch.setattr(cli, "load_backend", load_backend)
    monkeypatch.setattr(cli, "Server", Driver)
    cli.main([str(tmp_path / "torch"), "--tokenizer", sp, "--dtype", "bfloat16", "--served-model-name", "mine",
              "--port", "0", "--max-batch", "2"])
    host, port = seen["bound"]
    assert host == "127.0.0.1" and port != 0 and seen["url"] == f"http://127.0.0.1:{port}"  # the bound port
    assert seen["backend"].module.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(seen["backend"].params))  # weights stay float32
    assert seen["models"] == ["mine"] and seen["wrong_name"] == 400
    assert seen["tokens"] == want


def one_line_error(argv, capsys):
    """``main(argv)``'s exit status and its stderr, which must be one ``error:`` line."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return e.value.code, err


def broken_dirs(model_dir, root):
    """(name, directory, what the error must say): model directories that cannot be served."""
    missing = root / "missing"
    empty = root / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((model_dir / "config.json").read_text())
    garbled = root / "garbled-config"
    garbled.mkdir()
    (garbled / "config.json").write_text("{not json")
    bad_value = root / "bad-value"
    bad_value.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    (bad_value / "config.json").write_text(json.dumps({**config, "decoder_layers": 0}))
    return [(missing, [str(missing), "does not exist"]), (empty, [str(empty), "holds no weights"]),
            (garbled, ["config.json"]), (bad_value, ["decoder_layers=0"])]


def test_bad_model_directories_are_one_line_errors(model_dir, tmp_path, capsys):
    for directory, words in broken_dirs(model_dir, tmp_path):
        status, err = one_line_error([str(directory), "--tokenizer", str(model_dir / "tokenizer.model")], capsys)
        assert status == 2 and all(w in err for w in words), (directory.name, err)


@pytest.mark.parametrize("option, words", [
    (["--port", "70000"], ["port=70000", "[0, 65535]"]),
    (["--port", "-1"], ["port=-1"]),
    (["--switch-interval", "0"], ["switch_interval=0.0", "> 0"]),
    (["--max-batch", "0"], ["max_batch=0", ">= 1"]),
    (["--max-queue", "0"], ["max_queue=0"]),
    (["--steps-per-call", "0"], ["steps_per_call=0"]),
    (["--max-tokens-limit", "-3"], ["max_tokens_limit=-3"]),
    (["--max-prompt-tokens", "0"], ["max_prompt_tokens=0"]),
])
def test_bad_option_values_are_one_line_errors(model_dir, option, words, capsys):
    status, err = one_line_error([str(model_dir), *option], capsys)
    assert status == 2 and all(w in err for w in words), err


def test_a_busy_port_is_an_error_before_the_model_loads(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, err = one_line_error([str(tmp_path / "not-loaded"), "--port", str(port)], capsys)
    assert status == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "not-loaded" not in err, err


@pytest.mark.parametrize("option", [["--dtype", "float64"], ["--max-batch", "two"]])
def test_malformed_options_are_argparse_errors(option, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["model", *option])
    assert e.value.code == 2 and f"argument {option[0]}: invalid" in capsys.readouterr().err


# `python -m nucleusx_jax.serve ARGS` with SIGINT first set to {0}: a terminal's Ctrl-C (Python's default
# handler), or ignored, as for any job a non-interactive shell starts in the background (`nohup cmd &`, CI)
SERVE_WITH_SIGINT = ("import runpy, signal, sys; signal.signal(signal.SIGINT, {0}); sys.argv[0] = 'serve'; "
                     "runpy.run_module('nucleusx_jax.serve', run_name='__main__')")


@pytest.mark.slow
@pytest.mark.parametrize("sigint", ["signal.default_int_handler", "signal.SIG_IGN"])
def test_the_command_serves_where_it_says_and_stops_on_ctrl_c(model_dir, sigint):
    """``python -m nucleusx_jax.serve DIR --port 0`` prints ``serving on URL`` with the port it bound; requests
    there get offline generate's greedy tokens; SIGINT stops it (status 130, as for every CLI), also when the
    process started with SIGINT ignored (uvicorn stops on it anyway; it exited 0 there, seen under load)."""
    tok = load_tokenizer(str(model_dir / "tokenizer.model"))
    ids = [tok.bos_id] + tok.encode(PROMPT)
    proc = subprocess.Popen([sys.executable, "-c", SERVE_WITH_SIGINT.format(sigint), str(model_dir), "--port", "0",
                             "--max-batch", "2", "--served-model-name", "tiny"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline, url = time.monotonic() + SERVER_START_S, None
        while url is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.poll()
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            url = line.split("serving on ", 1)[1].strip() if line.startswith("serving on ") else None
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0"), url
        assert httpx.get(url + "/health", timeout=60).json()["status"] == "ok"
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True})
        assert r.json()["choices"][0]["token_ids"] == greedy(model_dir, ids)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert "interrupted" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
