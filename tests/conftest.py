"""Shared test helpers: the reference fixtures and small random models."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Tuple

# Before jax starts: the tests run on the CPU (subprocesses too). With libtpu installed (the [tpu] extra, in
# [test]) jax would otherwise probe for TPU chips; tests/test_tpu_compile.py uses libtpu only to compile.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_NAMES = ("nucleus_x_tiny", "nucleus_x_tiny_large_weights")
SLOW_TIMEOUT_S = 900  # the time limit of a test marked slow (pyproject.toml's `timeout` is the default)


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    """Tests marked slow get SLOW_TIMEOUT_S unless they name their own limit."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


def load_cases(name: str) -> Dict[str, np.ndarray]:
    """All arrays of a fixture's cases.npz (see that folder's README.md)."""
    with np.load(FIXTURES / name / "cases.npz") as f:
        return {k: f[k] for k in f.files}


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


class Tol(NamedTuple):
    """A numerical tolerance: its name in docs/testing.md's table, its value, and whether errors are relative
    (``max |got - want| / max |want|``) or absolute (``max |got - want|``)."""

    name: str
    value: float
    relative: bool = False


# Against the PyTorch reference's arrays (test_parity.py, test_core.py, test_scan_layers.py), relative to the
# largest reference value; each 4-5x the largest error measured over both fixtures and every test (the table
# in docs/testing.md; tests/measure_tolerances.py regenerates it). A 4x rms_norm_eps moves the logits by 1.8e-6.
LOGITS = Tol("LOGITS", 1.5e-6, relative=True)  # logits and hidden states; measured 3.7e-7
CACHE = Tol("CACHE", 5e-6, relative=True)  # cache kv and scale; measured 1.2e-6 (a chunkwise prefill's state)
LOSS = Tol("LOSS", 5e-7, relative=True)  # losses; measured 1.1e-7


# NUCLEUSX_MEASURE_ERRORS=FILE: assert_close appends each error it sees to FILE (JSON lines) instead of
# asserting; tests/measure_tolerances.py runs the numerical tests so and prints the table of docs/testing.md.
MEASURE_ENV = "NUCLEUSX_MEASURE_ERRORS"


def assert_close(got, want, tol: Tol, what: str = "") -> float:
    """Assert that ``got`` is within ``tol`` of ``want`` (arrays or numbers); returns the error."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = max_abs(got, want)
    if tol.relative:
        err /= float(np.max(np.abs(want)))
    if os.environ.get(MEASURE_ENV):
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
        with open(os.environ[MEASURE_ENV], "a") as f:
            f.write(json.dumps({"test": test, "tol": tol.name, "value": tol.value, "relative": tol.relative,
                                "error": err}) + "\n")
        return err
    assert err < tol.value, f"{what} error {err:.3g} is over {tol.name} = {tol.value:.3g}".strip()
    return err


def write_seqcls_dir(name: str, directory: Path) -> Path:
    """A sequence-classification checkpoint of fixture ``name`` in ``directory``: its ``model.*`` weights plus
    ``seqcls_score_weight`` as ``score.weight`` (PyTorch safetensors) and its seqcls_config.json."""
    state = {k: v for k, v in load_file(str(FIXTURES / name / "model.safetensors")).items() if k.startswith("model.")}
    state["score.weight"] = load_cases(name)["seqcls_score_weight"]
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(FIXTURES / name / "seqcls_config.json", directory / "config.json")
    return directory


@pytest.fixture(scope="session")
def fixture_dirs() -> Dict[str, Path]:
    return {n: FIXTURES / n for n in FIXTURE_NAMES}


@contextlib.contextmanager
def count_traces() -> Iterator[List[str]]:
    """Collects one entry per function jax traces for compilation inside the block (jax.monitoring events)."""
    import jax  # here, so that the PyTorch tests run in an environment without JAX

    traces: List[str] = []

    def listen(event: str, _seconds: float, **_: object) -> None:
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traces.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield traces
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def run_on_8_devices(worker: str, *args: str) -> Any:
    """Run the Python source ``worker`` with ``args`` in a subprocess on 8 simulated CPU devices (backend
    optimisation level 0 halves its compile time) and return the JSON it printed after ``RESULT``."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, "-c", worker, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=SLOW_TIMEOUT_S - 100)  # fails with its stderr before the test's own limit
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][0]
    return json.loads(line[len("RESULT"):])


# ---------------------------------------------------------------------------------------------- serving
SERVED_VOCAB = 512  # the served test models' vocabulary: a SentencePiece model trained on pydoc text
SERVER_START_S = 120  # the deadline for a test server to start


@pytest.fixture(scope="session")
def served_tokenizer(tmp_path_factory) -> str:
    """A SentencePiece ``.model`` of SERVED_VOCAB pieces trained on pydoc text, once per session."""
    from nucleusx_jax.tokenizer import train_tokenizer

    return train_tokenizer(["builtin:pydoc"], str(tmp_path_factory.mktemp("served-tokenizer") / "sp"),
                           SERVED_VOCAB, max_sentences=3000)


def write_served_model(directory: Path, tokenizer_file: str, seed: int) -> Any:
    """A model directory to serve: a random model (``seed``) with the tiny fixture's shapes and SERVED_VOCAB
    tokens (flax weights, config.json) plus ``tokenizer_file`` as tokenizer.model. Returns the model."""
    from nucleusx_jax import NucleusX, NucleusXConfig

    cfg = json.loads((FIXTURES / "nucleus_x_tiny" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "model_type")}
    model = NucleusX(NucleusXConfig(**{**cfg, "vocab_size": SERVED_VOCAB}), seed=seed)
    model.save_pretrained(directory)
    shutil.copy(tokenizer_file, Path(directory) / "tokenizer.model")
    return model


@contextlib.contextmanager
def running_server(config: Any) -> Iterator[Tuple[Any, int]]:
    """A ``uvicorn.Server(config)`` (``config.port`` 0: the system picks the port) running in a thread; yields
    ``(server, the port it is bound to)`` once it accepts connections (within SERVER_START_S), then stops it."""
    import uvicorn

    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_S
    try:
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield server, server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A port on 127.0.0.1 held for the block by a bound socket that does not listen (connections to it are
    refused) with SO_REUSEPORT: a server that sets SO_REUSEPORT too, as gRPC does (jax.distributed's coordinator),
    can listen on it; no other process can take it in between. For servers that cannot report the port they bound
    (``jax.distributed.initialize`` cannot), instead of a free port picked, released, then used."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def listening_port(pid: int, deadline_s: float = SERVER_START_S) -> int:
    """The TCP port process ``pid`` listens on (a server started with port 0 that does not report it, such as
    fake-gcs-server, which logs ``:0``), once it listens (within ``deadline_s``)."""
    import psutil

    deadline = time.monotonic() + deadline_s
    process = psutil.Process(pid)
    connections = getattr(process, "net_connections", None) or process.connections  # psutil < 6: connections
    while True:
        ports = {c.laddr.port for c in connections("tcp") if c.status == psutil.CONN_LISTEN}
        if ports:
            assert len(ports) == 1, ports
            return ports.pop()
        assert process.is_running() and time.monotonic() < deadline, f"process {pid} is not listening"
        time.sleep(0.05)


def crash_prepare_after(monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """Make ``prepare`` stop (``KeyboardInterrupt``, as a crash) when it is about to commit shard ``shards``
    (``monkeypatch.undo()`` ends it)."""
    from nucleusx_jax.data import prepare

    commit = prepare._ShardWriter.commit

    def crashing(self: Any, unit: int, offset: int) -> None:
        if len(self.done) == shards:
            raise KeyboardInterrupt("simulated crash")
        commit(self, unit, offset)

    monkeypatch.setattr(prepare._ShardWriter, "commit", crashing)
