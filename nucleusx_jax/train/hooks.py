"""What the training loop does around its steps, one hook each: the profiler trace, the non-finite check,
progress and train metrics, evaluation on the held-out sets, lm-eval tasks, checkpoints, SIGTERM.

The loop (:func:`nucleusx_jax.train.loop.run`) calls every hook's :meth:`Hook.start` once, then for each step
:meth:`Hook.before` and, with the step's :class:`StepInfo`, :meth:`Hook.after` (in the order given; each hook
decides whether it is due), and :meth:`Hook.close` in reverse order however the loop ends.
"""

import dataclasses
import logging
import os
import shutil
import signal
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from .. import storage
from ..runs import RUN_FILES
from .checkpoint import Checkpointer
from .data import EvalSet, global_batch
from .metrics import MetricsWriter
from .step import Trainer, TrainState

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """A finished step: ``done`` steps are done (``last``: the run's final step), ``state`` after it,
    ``metrics`` on the host (``loss``, ``grad_norm``, ``lr``, ``finite``)."""

    done: int
    last: bool
    state: TrainState
    metrics: Dict[str, Any]

    @property
    def loss(self) -> float:
        return float(self.metrics["loss"])


class Hook:
    """A hook of the loop; each method does nothing unless a subclass overrides it."""

    def start(self, step: int, state: TrainState) -> None:
        """Before the first step, which is 0-based ``step`` (0 for a fresh run)."""

    def before(self, step: int) -> None:
        """Ahead of 0-based ``step``."""

    def after(self, info: StepInfo) -> None:
        """When a step is done."""

    def close(self) -> None:
        """At the end of the loop, also on an error."""


def due(info: StepInfo, every: int) -> bool:
    """Whether a hook running every ``every`` steps (and at the last) runs after ``info``'s step."""
    return info.done % every == 0 or info.last


class NonFiniteLossError(RuntimeError):
    """Raised when ``train.on_nonfinite == "stop"`` and a step's loss or gradient norm is not finite."""

    exit_status = 3  # the train CLI's exit status (see nucleusx_jax.cli)


class FiniteLoss(Hook):
    """Stops (``on_nonfinite="stop"``, :class:`NonFiniteLossError`) or warns (``"skip"``) on a step whose loss
    or gradient is not finite (the step left the parameters as they were); keeps the first and the last
    finite loss."""

    def __init__(self, on_nonfinite: str):
        self.on_nonfinite = on_nonfinite
        self.first: Optional[float] = None
        self.last: Optional[float] = None

    def after(self, info: StepInfo) -> None:
        if bool(info.metrics["finite"]):
            self.first = info.loss if self.first is None else self.first
            self.last = info.loss
            return
        message = (f"non-finite training loss or gradient at step {info.done} (loss {info.loss}, grad norm "
                   f"{float(info.metrics['grad_norm'])}); the parameters were not updated")
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(message + "; stopping (set train.on_nonfinite=skip to skip such steps "
                                     "instead). The last checkpoint holds finite weights.")
        logger.warning("%s; skipping the step (train.on_nonfinite=skip)", message)


class Progress(Hook):
    """The progress bar and, every ``every`` steps and at the last, a train record: loss, gradient norm,
    learning rate, tokens/s and TFLOP/s per device (and MFU against ``peak``) over the window since the last
    record; evaluations restart the window's clock (:meth:`restart_clock`). Owns ``writer`` (None on
    processes other than 0, which write nothing); :meth:`write` and :meth:`say` serve the other hooks."""

    def __init__(self, *, writer: Optional[MetricsWriter], lead: bool, show: bool, total: int, start: int,
                 every: int, tokens_per_step: int, flops_per_token: float, peak: Optional[float]):
        self.writer, self.lead, self.every = writer, lead, every
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak
        self.bar = tqdm(total=total, initial=start, disable=not show, desc="train", dynamic_ncols=True)
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def write(self, step: int, split: str, record: Dict[str, float]) -> None:
        if self.writer is not None:
            self.writer.write(step, split, record)

    def say(self, text: str) -> None:
        """A line above the bar, from process 0."""
        if self.lead:
            self.bar.write(text)

    def restart_clock(self) -> None:
        self.window_start = time.perf_counter()

    def after(self, info: StepInfo) -> None:
        self.window_tokens += self.tokens_per_step
        if due(info, self.every):
            elapsed = time.perf_counter() - self.window_start
            m = info.metrics
            record = {"loss": info.loss, "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                      "tokens_per_s": self.window_tokens / elapsed,
                      "tflops_per_device": self.flops_per_token * self.window_tokens / elapsed
                      / jax.device_count() / 1e12}
            if self.peak is not None:
                record["mfu"] = record["tflops_per_device"] / self.peak
            self.write(info.done, "train", record)
            self.bar.set_postfix(loss=f"{info.loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            self.window_start, self.window_tokens = time.perf_counter(), 0
        else:
            self.bar.set_postfix(loss=f"{info.loss:.3f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def evaluate(trainer: Trainer, params: Any, eval_set: EvalSet, batches: int) -> Dict[str, float]:
    """Mean loss (nats per token) over the first ``batches`` global batches of ``eval_set``, and in bits per
    byte of its original text."""
    shape = (trainer.cfg.train.global_batch, trainer.cfg.data.seq_len + 1)
    losses = [trainer.eval_step(params, global_batch(eval_set.data, i, trainer.batch_sharding, shape))
              for i in range(batches)]
    loss = float(np.mean(jax.device_get(losses)))
    return {"loss": loss, "bpb": eval_set.bits_per_byte(loss)}


class Evaluation(Hook):
    """Every ``every`` steps, at the last and before the first step of a fresh run (when there are
    ``eval_sets``): :func:`evaluate` on each held-out set, recorded as
    ``{"loss": the first set's loss, "<name>/loss": .., "<name>/bpb": ..}``.
    Keeps ``losses`` (the first set's, in order) and ``last`` (the latest record) for the summary."""

    def __init__(self, trainer: Trainer, eval_sets: List[EvalSet], *, every: int, batches: int,
                 progress: Progress):
        self.trainer, self.eval_sets, self.every, self.batches = trainer, eval_sets, every, batches
        self.progress = progress
        self.losses: List[float] = []
        self.last: Dict[str, float] = {}

    def _evaluate(self, step: int, params: Any) -> None:
        record: Dict[str, float] = {}
        for e in self.eval_sets:
            record.update({f"{e.name}/{k}": v for k, v in evaluate(self.trainer, params, e, self.batches).items()})
        self.last = {"loss": record[f"{self.eval_sets[0].name}/loss"], **record}
        self.losses.append(self.last["loss"])
        self.progress.write(step, "eval", self.last)

    def start(self, step: int, state: TrainState) -> None:
        if self.eval_sets and step == 0:
            self._evaluate(0, state.params)

    def after(self, info: StepInfo) -> None:
        if not self.eval_sets or not due(info, self.every):
            return
        self._evaluate(info.done, info.state.params)
        self.progress.say(f"step {info.done}: train loss {info.loss:.4f}, " + ", ".join(
            f"{e.name} loss {self.last[e.name + '/loss']:.4f} ({self.last[e.name + '/bpb']:.3f} bpb)"
            for e in self.eval_sets))
        self.progress.restart_clock()


class LmEvaluation(Hook):
    """Every ``every`` steps and at the last: ``run(params) -> {"task/metric": value}`` (lm-eval tasks)."""

    def __init__(self, run: Callable[[Any], Dict[str, float]], *, every: int, progress: Progress):
        self.run, self.every, self.progress = run, every, progress

    def after(self, info: StepInfo) -> None:
        if not due(info, self.every):
            return
        scores = self.run(info.state.params)
        self.progress.write(info.done, "lm_eval", scores)
        self.progress.say(f"step {info.done}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        self.progress.restart_clock()


class Checkpoints(Hook):
    """Saves the state at the steps ``checkpointer`` says are due; :meth:`final` saves and waits."""

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer = checkpointer

    def after(self, info: StepInfo) -> None:
        if self.checkpointer.due(info.done):
            self.checkpointer.save(info.state)

    def final(self, state: TrainState, wait: bool) -> None:
        """Save ``state`` (the loop's end); ``wait`` for the write to finish before returning."""
        self.checkpointer.save(state)
        if wait:
            self.checkpointer.wait()

    def close(self) -> None:
        self.checkpointer.close()


class Preemption(Hook):
    """SIGTERM sets a flag that the loop reads after each step (:meth:`requested`, agreed over all processes);
    closing restores the previous handler."""

    def __init__(self) -> None:
        self.flag = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        return bool(np.any(multihost_utils.process_allgather(np.array(self.flag))))

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


class Profile(Hook):
    """A ``jax.profiler`` trace of the steps after ``window[0]`` up to ``window[1]`` (``logging.profile_steps``,
    the metrics' numbering; None: no trace) into ``<run_dir>/profile``. The profiler writes local files, so for
    a URL run directory it traces into a local temporary directory whose files are uploaded and removed when
    the trace stops. A run resumed inside the window traces from its first step."""

    def __init__(self, run_dir: str, window: Optional[Sequence[int]]):
        self.dest, self.window = os.path.join(run_dir, RUN_FILES.profile), window
        self.local: Optional[str] = None  # the directory being traced into; None when not tracing

    def before(self, step: int) -> None:
        if self.window is not None and self.window[0] <= step < self.window[1] and self.local is None:
            self.local = tempfile.mkdtemp(prefix="nucleusx-profile-") if storage.is_url(self.dest) else self.dest
            jax.profiler.start_trace(self.local)

    def after(self, info: StepInfo) -> None:
        if self.local is not None and info.done == self.window[1]:
            self.close()

    def close(self) -> None:
        if self.local is None:
            return
        jax.profiler.stop_trace()
        if self.local != self.dest:
            storage.upload_tree(self.local, self.dest)
            shutil.rmtree(self.local, ignore_errors=True)
        self.local = None

