"""Run observability: ``metrics.jsonl``, TensorBoard event files, the loss plot ``loss.png``, peak FLOP/s.

Every record is one JSON line ``{"step": s, "split": "train"|"eval", ...}``. A resumed run appends; when a
step appears twice (steps redone after a crash), the later record wins in :func:`read_metrics`.

On object storage, which cannot append, ``metrics.jsonl`` is rewritten whole (one object upload) at most every
:data:`UPLOAD_EVERY_S` seconds and on close, so a killed run loses at most that much of its records; TensorBoard
event files go through tensorboardX's own ``gs://`` (or ``s3://``) writer.
"""

import io
import json
import os
import time
from typing import Any, Dict, List, Mapping, Optional

from .. import storage

METRICS_FILE, PLOT_FILE, TB_DIR = "metrics.jsonl", "loss.png", "tensorboard"
UPLOAD_EVERY_S = 30.0

# Dense bf16 peak FLOP/s per chip, by substrings of jax's device_kind (lower case).
PEAK_TFLOPS = (("v5p", 459.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v6", 918.0), ("v4", 275.0), ("v3", 123.0),
               ("h200", 989.0), ("h100", 989.0), ("a100", 312.0))


def peak_tflops(device_kind: str, override: Optional[float] = None) -> Optional[float]:
    """Peak TFLOP/s of one device: ``override`` if given, else the table above, else None (unknown, e.g. CPU)."""
    if override is not None:
        return override
    kind = device_kind.lower()
    return next((value for key, value in PEAK_TFLOPS if key in kind), None)


class MetricsWriter:
    """Appends records to ``<run_dir>/metrics.jsonl`` and, optionally, TensorBoard scalars."""

    def __init__(self, run_dir: str, tensorboard: bool):
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.remote = storage.is_url(run_dir)
        if self.remote:  # the whole text, uploaded at most every UPLOAD_EVERY_S
            self.text = storage.read_bytes(self.path).decode() if storage.isfile(self.path) else ""
            self.uploaded = -UPLOAD_EVERY_S
        else:
            self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, TB_DIR))

    def write(self, step: int, split: str, values: Mapping[str, Any]) -> None:
        """One record; non-numeric values go to the JSON line only."""
        line = json.dumps({"step": step, "split": split, **values}) + "\n"
        if self.remote:
            self.text += line
            if time.monotonic() - self.uploaded >= UPLOAD_EVERY_S:
                self._upload()
        else:
            self.file.write(line)
            self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{split}/{key}", value, step)

    def _upload(self) -> None:
        storage.atomic_write(self.path, self.text)
        self.uploaded = time.monotonic()

    def close(self) -> None:
        """Flush and close the files."""
        if self.remote:
            self._upload()
        else:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str, split: str) -> List[Dict[str, Any]]:
    """Records of ``split`` ordered by step, the last record of each step kept."""
    by_step: Dict[int, Dict[str, Any]] = {}
    with storage.open_file(os.path.join(run_dir, METRICS_FILE), "r") as f:
        for line in f:
            record = json.loads(line)
            if record.get("split") == split:
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_losses(run_dir: str) -> str:
    """Write ``<run_dir>/loss.png`` (train and eval loss against step) atomically; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        records = [r for r in read_metrics(run_dir, split) if "loss" in r]
        if records:
            ax.plot([r["step"] for r in records], [r["loss"] for r in records], style, label=f"{split} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(run_dir, PLOT_FILE)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    storage.atomic_write(path, png.getvalue())
    return path
