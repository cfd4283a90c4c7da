"""Run observability: ``metrics.jsonl``, TensorBoard event files, optional Weights & Biases, the loss plot
``loss.png`` and peak FLOP/s (the profiler trace is a hook, :class:`nucleusx_jax.train.hooks.Profile`).

Every record is one JSON line ``{"step": s, "split": "train"|"eval", ...}``. A resumed run appends; when a
step appears twice (steps redone after a crash), the later record wins in :func:`read_metrics`. TensorBoard
and W&B get the numeric values as ``<split>/<key>`` at that step.

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
from ..runs import RUN_FILES
from .config import ConfigError, WandbConfig

WANDB_INSTALL = "pip install 'nucleusx-jax[wandb]'"
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


def import_wandb() -> Any:
    """The ``wandb`` module, or a :class:`ConfigError` saying which extra to install."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"logging.wandb is set but the wandb package is not installed: {WANDB_INSTALL} "
                          "(or remove logging.wandb)") from None
    return wandb


class MetricsWriter:
    """Appends records to ``<run_dir>/metrics.jsonl`` and, optionally, TensorBoard scalars and a W&B run
    (``wandb``: project and name; ``config``: the resolved run config it records; its files go to
    ``<run_dir>/wandb``). Only process 0 should make one."""

    def __init__(self, run_dir: str, tensorboard: bool, wandb: Optional[WandbConfig] = None,
                 config: Optional[Mapping[str, Any]] = None):
        self.path = os.path.join(run_dir, RUN_FILES.metrics)
        self.remote = storage.is_url(run_dir)
        if self.remote:  # the whole text, uploaded at most every UPLOAD_EVERY_S
            self.text = storage.read_bytes(self.path).decode() if storage.isfile(self.path) else ""
            self.uploaded = -UPLOAD_EVERY_S
        else:
            self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, RUN_FILES.tensorboard))
        self.wandb_run = None
        if wandb is not None:
            # wandb keeps its files on a local disk: <run_dir>/wandb, or ./wandb for a run directory on a URL
            self.wandb_run = import_wandb().init(project=wandb.project, name=wandb.name,
                                                 dir=None if self.remote else run_dir, config=dict(config or {}))

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
        scalars = {f"{split}/{key}": value for key, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def _upload(self) -> None:
        storage.atomic_write(self.path, self.text)
        self.uploaded = time.monotonic()

    def close(self) -> None:
        """Flush and close the files; finish the W&B run."""
        if self.remote:
            self._upload()
        else:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def read_metrics(run_dir: str, split: str) -> List[Dict[str, Any]]:
    """Records of ``split`` ordered by step, the last record of each step kept."""
    by_step: Dict[int, Dict[str, Any]] = {}
    with storage.open_file(os.path.join(run_dir, RUN_FILES.metrics), "r") as f:
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
    path = os.path.join(run_dir, RUN_FILES.plot)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    storage.atomic_write(path, png.getvalue())
    return path
