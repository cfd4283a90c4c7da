"""The training run: distributed setup, run directory, tokenizer and data, mesh, resume, the step loop with
eval/logging/checkpoints/preemption, then export, plot, sample and summary.

Run directory layout: ``config.yaml`` (resolved), ``config.json`` (the model config), ``tokenizer.model`` (when
trained here), ``data/`` (token stores prepared from ``data.sources``),
``checkpoints/<step>/``, ``metrics.jsonl``, ``tensorboard/``, ``profile/`` (``logging.profile_steps``),
``wandb/`` (``logging.wandb``), ``loss.png``, ``hf/`` (final model and
tokenizer), ``torch/`` (optional PyTorch export), ``summary.json``, ``run.lock`` (the trainer running there,
see :mod:`nucleusx_jax.lock`). The run directory may be a URL (``gs://bucket/run``, see :mod:`nucleusx_jax.storage`).
"""

import dataclasses
import glob
import importlib.util
import json
import logging
import os
import signal
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from .. import sharding as shd
from .. import storage
from ..configuration import CONFIG_FILE as CONFIG_JSON, NucleusXConfig
from ..convert import convert
from ..model import NucleusX, save_flax_dir
from ..storage import atomic_write
from .checkpoint import CONFIG_FILE, Checkpointer
from .config import Config
from ..data.mixture import Mixture
from .data import EvalSet, open_run_data, prepare_run_stores
from ..lock import RunLock, RunLockedError
from .metrics import MetricsWriter, ProfileTrace, import_wandb, peak_tflops, plot_losses
from .step import Trainer, make_trainer, training_flops_per_token
from ..tokenizer import Tokenizer, load_tokenizer, save_hf_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)
TOKENIZER_FILE, HF_DIR, TORCH_DIR = "tokenizer.model", "hf", "torch"
SUMMARY_FILE = "summary.json"


class NonFiniteLossError(RuntimeError):
    """Raised when ``train.on_nonfinite == "stop"`` and a step's loss or gradient norm is not finite."""

    exit_status = 3  # train.py's exit status (see nucleusx_jax.cli)


def init_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None) -> None:
    """``jax.distributed.initialize``: explicit when ``coordinator`` is given (GPU clusters, CPU tests); with
    jax's own cluster detection on a Cloud TPU VM (libtpu installed and TPU chips present; also fine on a
    single host), on GKE TPU pods (``TPU_WORKER_HOSTNAMES``) and in multi-task SLURM jobs; otherwise nothing."""
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise ValueError(f"--coordinator {coordinator} needs --num-processes and --process-id too")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return
    chips = glob.glob("/dev/accel*") + glob.glob("/dev/vfio/[0-9]*")
    tpu_vm = importlib.util.find_spec("libtpu") is not None and bool(chips)
    if tpu_vm or "TPU_WORKER_HOSTNAMES" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def prepare_tokenizer(cfg: Config, run_dir: str) -> Tokenizer:
    """``data.tokenizer``, or (when empty) a SentencePiece model trained on ``data.sources`` into the run dir
    (once: process 0 trains, the others wait). Sets the model's vocab/special ids from it."""
    path = cfg.data.tokenizer
    if not path:
        path = os.path.join(run_dir, TOKENIZER_FILE)
        if jax.process_index() == 0 and not storage.exists(path):
            logger.info("training a %d-piece SentencePiece tokenizer on %s", cfg.data.vocab_size, cfg.data.sources)
            train_tokenizer(cfg.data.sources, path[: -len(".model")], cfg.data.vocab_size,
                            text_field=cfg.data.text_field, format=cfg.data.format, seed=cfg.data.seed)
        _sync("nucleusx-tokenizer")
    tok = load_tokenizer(path)
    vocab = cfg.model.get("vocab_size", NucleusXConfig().vocab_size)
    if tok.vocab_size > vocab:
        raise ValueError(f"the tokenizer {path} has {tok.vocab_size} pieces but model.vocab_size={vocab}; "
                         "set model.vocab_size >= the tokenizer's vocab size")
    cfg.model.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return tok


def greedy_sample(config: NucleusXConfig, host_params: Any, prompt: List[int], num_tokens: int) -> List[int]:
    """Greedy continuation of ``prompt`` with :meth:`nucleusx_jax.NucleusX.generate` (the prompt in parallel
    mode, then recurrent steps on the retention state); stops at EOS."""
    model = NucleusX(config, host_params)
    out = model.generate(np.asarray([prompt], np.int32), max_new_tokens=num_tokens,
                         eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    new = [int(t) for t in out[0, len(prompt):]]
    return new[: new.index(config.eos_token_id) + 1] if config.eos_token_id in new else new


def host_params(params: Any) -> Any:
    """The full parameter tree as numpy on every process (gathered across hosts when sharded over several)."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def export_hf(run_dir: str, config: NucleusXConfig, params: Any, tokenizer_file: Optional[str]) -> str:
    """Write the model (:func:`host_params` ``params`` as ``config.json`` + ``flax_model.msgpack``, the layout
    of our and transformers' Flax model directories) and, for SentencePiece, the tokenizer (an HF
    ``LlamaTokenizer`` directory) into ``<run_dir>/hf``: built in a temporary local directory, then published
    (:func:`~nucleusx_jax.storage.publish_dir`, ``config.json`` last). Needs no transformers. Process 0 writes."""
    final = os.path.join(run_dir, HF_DIR)
    if jax.process_index() == 0:
        with tempfile.TemporaryDirectory(prefix=".hf-", dir=None if storage.is_url(run_dir) else run_dir) as tmp:
            save_flax_dir(os.path.join(tmp, HF_DIR), config, params)
            if tokenizer_file is not None and tokenizer_file.endswith(".model"):
                save_hf_tokenizer(tokenizer_file, os.path.join(tmp, HF_DIR))
            storage.publish_dir(os.path.join(tmp, HF_DIR), final, marker=CONFIG_JSON)
    _sync("nucleusx-export")
    return final


class _Preemption:
    """SIGTERM sets a flag that the loop checks after each step (agreed over all processes)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def check(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def evaluate(trainer: Trainer, params: Any, eval_set: EvalSet, batches: int) -> Dict[str, float]:
    """Mean loss (nats per token) over the first ``batches`` global batches of ``eval_set``, and in bits per
    byte of its original text."""
    losses = [trainer.eval_step(params, _global_batch(trainer, eval_set.data, i)) for i in range(batches)]
    loss = float(np.mean(jax.device_get(losses)))
    return {"loss": loss, "bpb": eval_set.bits_per_byte(loss)}


def _evaluate_all(trainer: Trainer, params: Any, eval_sets: List[EvalSet], batches: int) -> Dict[str, float]:
    """:func:`evaluate` of every set, as ``{"loss": first set's loss, "<name>/loss": .., "<name>/bpb": ..}``."""
    record: Dict[str, float] = {}
    for e in eval_sets:
        record.update({f"{e.name}/{k}": v for k, v in evaluate(trainer, params, e, batches).items()})
    return {"loss": record[f"{eval_sets[0].name}/loss"], **record}


def host_rows(sharding: jax.sharding.Sharding, shape: Tuple[int, int]) -> List[int]:
    """The rows of a ``shape`` batch that this process's devices hold under ``sharding``, sorted."""
    index_map = sharding.addressable_devices_indices_map(shape)
    return sorted({r for index in index_map.values() for r in range(*index[0].indices(shape[0]))})


def _global_batch(trainer: Trainer, dataset: Mixture, step: int) -> jax.Array:
    """Global batch ``step`` ``[B, T + 1]``: each host reads only the rows its devices hold (row ``r`` is row
    ``r`` of ``dataset``'s batch ``step`` whatever the process layout) and puts them on those devices."""
    shape = (trainer.cfg.train.global_batch, trainer.cfg.data.seq_len + 1)
    index_map = trainer.batch_sharding.addressable_devices_indices_map(shape)
    rows = host_rows(trainer.batch_sharding, shape)
    local = dataset.rows(step, shape[0], rows)
    position = {r: i for i, r in enumerate(rows)}
    shards = [jax.device_put(local[[position[r] for r in range(*index[0].indices(shape[0]))]], device)
              for device, index in index_map.items()]
    return jax.make_array_from_single_device_arrays(shape, trainer.batch_sharding, shards)


def _lock_run_dir(run_dir: str) -> Optional[RunLock]:
    """Process 0 takes the run directory's lock (the other processes of this run share it); every process
    learns whether it could, so a refused multi-host run stops everywhere. Raises :class:`RunLockedError`."""
    lock, refused = None, None
    if jax.process_index() == 0:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLockedError as err:
            refused = err
    if jax.process_count() > 1 and not multihost_utils.broadcast_one_to_all(np.int32(refused is None)):
        refused = refused or RunLockedError(f"process 0 of this run could not lock {run_dir}; see its error")
    if refused is not None:
        raise refused
    return lock


def lm_eval_runner(cfg: Config, tokenizer: Tokenizer) -> Optional[Callable[[Any], Dict[str, float]]]:
    """``params -> {"task/metric": value}`` running ``cfg.lm_eval.tasks`` on the trainer's (sharded) parameters,
    or None when ``lm_eval.every`` is 0. Imports the optional ``eval`` extra (lm-eval) only when asked for."""
    le = cfg.lm_eval
    if le.every <= 0:
        return None
    if not le.tasks:
        raise ValueError(f"lm_eval.every={le.every} needs lm_eval.tasks, a list of lm-eval task names")
    from ..eval import EvalOptions, evaluate_tasks

    dtype = jnp.bfloat16 if cfg.train.dtype == "bfloat16" else jnp.float32
    model = NucleusX(cfg.model_config(), dtype=dtype, init=False)
    options = EvalOptions(batch_size=le.batch_size, max_length=le.max_length)
    return lambda params: evaluate_tasks(model, tokenizer, le.tasks, params=params, options=options,
                                         include_path=le.include_path, limit=le.limit, num_fewshot=le.num_fewshot)


def run(cfg: Config) -> Dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns the summary (also written to summary.json).

    Raises :class:`RunLockedError` when another run holds ``train.run_dir`` (see :mod:`nucleusx_jax.lock`), and
    :class:`NonFiniteLossError` on a non-finite step when ``train.on_nonfinite == "stop"``. On SIGTERM saves a
    checkpoint and returns with ``summary["preempted"] = True``.
    """
    run_dir = storage.absolute(cfg.train.run_dir)
    storage.makedirs(run_dir)
    lock = _lock_run_dir(run_dir)
    try:
        return _run(cfg)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: Config) -> Dict[str, Any]:
    """:func:`run` once the run directory is locked."""
    t, lg = cfg.train, cfg.logging
    lead = jax.process_index() == 0
    if lead and lg.wandb is not None:
        import_wandb()  # a missing extra fails now, not after the data and the compile
    run_dir = storage.absolute(t.run_dir)
    tokenizer = prepare_tokenizer(cfg, run_dir)
    tokenizer_file = cfg.data.tokenizer or os.path.join(run_dir, TOKENIZER_FILE)
    if lead:
        print(f"resolved config (saved to {os.path.join(run_dir, CONFIG_FILE)}):\n{cfg.to_yaml()}", flush=True)

    mesh = shd.make_mesh(dataclasses.asdict(cfg.mesh))
    trainer = make_trainer(cfg, mesh)
    if lead:
        prepare_run_stores(cfg.data, tokenizer_file, run_dir, progress=lg.progress)
    _sync("nucleusx-data")
    train_data, eval_sets = open_run_data(cfg.data, tokenizer, tokenizer_file, run_dir)
    eval_sets = eval_sets if t.eval_every > 0 else []

    run_lm_eval = lm_eval_runner(cfg, tokenizer)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint)
    state = checkpointer.restore_latest(trainer.abstract_state) if cfg.checkpoint.resume else None
    resumed_from = None if state is None else int(jax.device_get(state.step))
    if lead:  # after the restore: a refused resume (another model) leaves the run's configs as they were
        atomic_write(os.path.join(run_dir, CONFIG_FILE), cfg.to_yaml())
        cfg.model_config().save_pretrained(run_dir)  # config.json: what the checkpoints hold (nucleusx_jax.runs)
    if state is None:
        state = trainer.init_state()
    start = int(jax.device_get(state.step))
    model_config = cfg.model_config()
    flops_per_token = training_flops_per_token(model_config, trainer.num_params, cfg.data.seq_len)
    peak = peak_tflops(jax.devices()[0].device_kind, lg.peak_tflops_per_device)
    tokens_per_step = t.global_batch * cfg.data.seq_len
    if lead:
        print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices, "
              f"{jax.process_count()} process(es); {trainer.num_params:,} parameters; train windows of "
              f"{cfg.data.seq_len} tokens: {dict(zip(train_data.names, map(len, train_data.components)))}; "
              f"{flops_per_token:.3g} training FLOPs/token; "
              + (f"resuming from step {resumed_from}" if resumed_from is not None else "starting from scratch"),
              flush=True)

    writer = MetricsWriter(run_dir, lg.tensorboard, lg.wandb, cfg.to_dict()) if lead else None
    preemption = _Preemption()
    bar = tqdm(total=t.steps, initial=start, disable=not (lead and lg.progress), desc="train", dynamic_ncols=True)
    first_loss = last_loss = None
    eval_losses: List[float] = []
    last_eval: Dict[str, float] = {}
    window_start, window_tokens, preempted = time.perf_counter(), 0, False
    profile = ProfileTrace(run_dir, lg.profile_steps)
    start_time = time.perf_counter()
    if eval_sets and start == 0:
        last_eval = _evaluate_all(trainer, state.params, eval_sets, t.eval_batches)
        eval_losses.append(last_eval["loss"])
        if writer is not None:
            writer.write(0, "eval", last_eval)
    try:
        for step in range(start, t.steps):
            done = step + 1
            profile.before(step)
            with jax.profiler.StepTraceAnnotation("train", step_num=done):
                state, metrics = trainer.train_step(state, _global_batch(trainer, train_data, step))
                m = jax.device_get(metrics)
            profile.after(done)
            loss = float(m["loss"])
            if not bool(m["finite"]):
                message = (f"non-finite training loss or gradient at step {done} (loss {loss}, grad norm "
                           f"{float(m['grad_norm'])}); the parameters were not updated")
                if t.on_nonfinite == "stop":
                    raise NonFiniteLossError(message + "; stopping (set train.on_nonfinite=skip to skip such steps "
                                             "instead). The last checkpoint holds finite weights.")
                logger.warning("%s; skipping the step (train.on_nonfinite=skip)", message)
            else:
                first_loss = loss if first_loss is None else first_loss
                last_loss = loss
            window_tokens += tokens_per_step
            if done % lg.every == 0 or done == t.steps:
                elapsed = time.perf_counter() - window_start
                record = {"loss": loss, "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                          "tokens_per_s": window_tokens / elapsed,
                          "tflops_per_device": flops_per_token * window_tokens / elapsed / jax.device_count() / 1e12}
                if peak is not None:
                    record["mfu"] = record["tflops_per_device"] / peak
                if writer is not None:
                    writer.write(done, "train", record)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                window_start, window_tokens = time.perf_counter(), 0
            else:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)
            if eval_sets and (done % t.eval_every == 0 or done == t.steps):
                last_eval = _evaluate_all(trainer, state.params, eval_sets, t.eval_batches)
                eval_losses.append(last_eval["loss"])
                if writer is not None:
                    writer.write(done, "eval", last_eval)
                if lead:
                    bar.write(f"step {done}: train loss {loss:.4f}, " + ", ".join(
                        f"{e.name} loss {last_eval[e.name + '/loss']:.4f} ({last_eval[e.name + '/bpb']:.3f} bpb)"
                        for e in eval_sets))
                window_start = time.perf_counter()
            if run_lm_eval is not None and (done % cfg.lm_eval.every == 0 or done == t.steps):
                scores = run_lm_eval(state.params)
                if writer is not None:
                    writer.write(done, "lm_eval", scores)
                if lead:
                    bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                window_start = time.perf_counter()
            if checkpointer.due(done):
                checkpointer.save(state)
            if preemption.check():
                checkpointer.save(state)
                checkpointer.wait()
                preempted = True
                if lead:
                    bar.write(f"SIGTERM: saved step {done} to {run_dir}; exiting")
                break
        if not preempted:
            checkpointer.save(state)
    finally:
        profile.stop()
        bar.close()
        preemption.restore()
        checkpointer.close()
        if writer is not None:
            writer.close()
    wall = time.perf_counter() - start_time
    steps_done = int(jax.device_get(state.step))
    summary: Dict[str, Any] = {
        "run_dir": run_dir, "steps": steps_done, "resumed_from": resumed_from, "preempted": preempted,
        "first_train_loss": first_loss, "last_train_loss": last_loss,
        "eval_losses": eval_losses, "eval": last_eval, "wall_s": wall, "parameters": trainer.num_params,
        "tokens_per_s": (steps_done - start) * tokens_per_step / wall if wall > 0 else None,
    }
    if not preempted:
        final_params = host_params(state.params)
        if cfg.checkpoint.export_hf or cfg.checkpoint.export_torch:
            summary["hf_dir"] = export_hf(run_dir, model_config, final_params, tokenizer_file)
        if cfg.checkpoint.export_torch and lead:
            summary["torch_dir"] = os.path.join(run_dir, TORCH_DIR)
            convert(summary["hf_dir"], summary["torch_dir"], "torch", overwrite=True, progress=False)
        if lead and lg.plot:
            summary["plot"] = plot_losses(run_dir)
        if lg.sample_tokens > 0:
            prompt = ([tokenizer.bos_id] if cfg.data.add_bos else []) + tokenizer.encode(lg.sample_prompt)
            sample = tokenizer.decode(greedy_sample(model_config, final_params, prompt, lg.sample_tokens))
            summary["sample"] = lg.sample_prompt + sample
    if lead:
        atomic_write(os.path.join(run_dir, SUMMARY_FILE), json.dumps(summary, indent=2))
        print_summary(summary)
    return summary


def print_summary(summary: Dict[str, Any]) -> None:
    """The final summary, human-readable."""
    fmt = lambda v: "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"run dir        {summary['run_dir']}",
             f"steps          {summary['steps']}" + (f" (resumed from {summary['resumed_from']})"
                                                      if summary["resumed_from"] is not None else ""),
             f"train loss     first {fmt(summary['first_train_loss'])} -> last {fmt(summary['last_train_loss'])}",
             "eval loss      " + (" -> ".join(f"{x:.4f}" for x in summary["eval_losses"]) or "n/a"),
             f"wall time      {summary['wall_s']:.1f} s, {summary['tokens_per_s'] or 0:.0f} tokens/s"]
    if summary.get("hf_dir"):
        lines.append(f"HF model       {summary['hf_dir']}")
    if summary.get("torch_dir"):
        lines.append(f"PyTorch model  {summary['torch_dir']}")
    if summary.get("plot"):
        lines.append(f"loss plot      {summary['plot']}")
    if summary.get("sample") is not None:
        lines.append(f"sample         {summary['sample']!r}")
    print("\n".join(["== summary =="] + lines), flush=True)
