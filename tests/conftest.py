"""Shared test helpers: the reference fixtures and small random models."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_NAMES = ("nucleus_x_tiny", "nucleus_x_tiny_large_weights")


def load_cases(name: str) -> Dict[str, np.ndarray]:
    """All arrays of a fixture's cases.npz (see that folder's README.md)."""
    with np.load(FIXTURES / name / "cases.npz") as f:
        return {k: f[k] for k in f.files}


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


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
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][0]
    return json.loads(line[len("RESULT"):])
