"""The training run: distributed setup, run directory, tokenizer and data, mesh, resume, the step loop with its
hooks (:mod:`.hooks`: profile, non-finite check, progress and metrics, eval, lm-eval, checkpoints, SIGTERM),
then export, plot, sample and summary.

Run directory layout (names: :data:`nucleusx_jax.runs.RUN_FILES`): ``config.yaml`` (resolved), ``config.json``
(the model config), ``tokenizer.model`` (when trained here), ``data/`` (token stores prepared from
``data.sources``), ``checkpoints/<step>/``, ``metrics.jsonl``, ``tensorboard/``, ``profile/``
(``logging.profile_steps``), ``wandb/`` (``logging.wandb``), ``loss.png``, ``hf/`` (final model and
tokenizer), ``torch/`` (optional PyTorch export), ``summary.json``, ``run.lock`` (the trainer running there,
see :mod:`nucleusx_jax.lock`). The run directory may be a URL (``gs://bucket/run``, see :mod:`nucleusx_jax.storage`).
"""

import dataclasses
import glob
import importlib.util
import json
import logging
import os
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from .. import pretrained, storage
from .. import sharding as shd
from ..configuration import NucleusXConfig
from ..convert import convert
from ..data.mixture import Mixture
from ..data.streams import Streams
from ..lock import RunLock, RunLockedError
from ..model import NucleusX
from ..runs import RUN_FILES
from ..storage import atomic_write
from ..tokenizer import Tokenizer, load_tokenizer, save_hf_tokenizer, train_tokenizer
from ..types import Params
from .checkpoint import Checkpointer
from .config import Config
from .data import EvalSet, global_batch, global_continues, open_run_data, prepare_run_stores
from .hooks import (Checkpoints, Evaluation, FiniteLoss, Hook, LmEvaluation, Preemption, Profile, Progress,
                    StepInfo)
from .metrics import MetricsWriter, import_wandb, peak_tflops, plot_losses
from .step import Trainer, TrainState, make_trainer, training_flops_per_token

logger = logging.getLogger(__name__)


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
        path = os.path.join(run_dir, RUN_FILES.tokenizer)
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
    final = os.path.join(run_dir, RUN_FILES.hf)
    if jax.process_index() == 0:
        with tempfile.TemporaryDirectory(prefix=".hf-", dir=None if storage.is_url(run_dir) else run_dir) as tmp:
            local = os.path.join(tmp, RUN_FILES.hf)
            pretrained.save(local, config, params)
            if tokenizer_file is not None and tokenizer_file.endswith(".model"):
                save_hf_tokenizer(tokenizer_file, local)
            storage.publish_dir(local, final, marker=RUN_FILES.model_config)
    _sync("nucleusx-export")
    return final


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
    :class:`~nucleusx_jax.train.hooks.NonFiniteLossError` on a non-finite step when
    ``train.on_nonfinite == "stop"``. On SIGTERM saves a checkpoint and returns with ``summary["preempted"] = True``.
    """
    run_dir = storage.absolute(cfg.train.run_dir)
    storage.makedirs(run_dir)
    lock = _lock_run_dir(run_dir)
    try:
        return _run(cfg)
    finally:
        if lock is not None:
            lock.release()


@dataclasses.dataclass
class _Prepared:
    """A run ready for its first step: what the loop, its hooks and the exports need."""

    run_dir: str
    tokenizer: Tokenizer
    tokenizer_file: str
    trainer: Trainer
    train_data: Union[Mixture, Streams]
    eval_sets: List[EvalSet]  # empty when train.eval_every is 0
    lm_eval: Optional[Callable[[Any], Dict[str, float]]]
    checkpointer: Checkpointer
    state: TrainState  # restored, or fresh
    resumed_from: Optional[int]
    model_config: NucleusXConfig


def _prepare(cfg: Config) -> _Prepared:
    """Tokenizer, mesh and trainer, data, the restored (or initial) state; writes the run's ``config.yaml`` and
    ``config.json`` (after the restore: a refused resume leaves them as they were) and prints what runs."""
    t, lg = cfg.train, cfg.logging
    lead = jax.process_index() == 0
    if lead and lg.wandb is not None:
        import_wandb()  # a missing extra fails now, not after the data and the compile
    run_dir = storage.absolute(t.run_dir)
    tokenizer = prepare_tokenizer(cfg, run_dir)
    tokenizer_file = cfg.data.tokenizer or os.path.join(run_dir, RUN_FILES.tokenizer)
    if lead:
        print(f"resolved config (saved to {os.path.join(run_dir, RUN_FILES.train_config)}):\n{cfg.to_yaml()}",
              flush=True)
    mesh = shd.make_mesh(dataclasses.asdict(cfg.mesh))
    trainer = make_trainer(cfg, mesh)
    if lead:
        prepare_run_stores(cfg.data, tokenizer_file, run_dir, progress=lg.progress)
    _sync("nucleusx-data")
    train_data, eval_sets = open_run_data(cfg.data, tokenizer, tokenizer_file, run_dir)
    lm_eval = lm_eval_runner(cfg, tokenizer)
    layout = train_data.layout(t.global_batch) if cfg.data.stream_rows else None
    checkpointer = Checkpointer(run_dir, cfg.checkpoint, data_layout=layout)
    state = checkpointer.restore_latest(trainer.abstract_state) if cfg.checkpoint.resume else None
    resumed_from = None if state is None else int(jax.device_get(state.step))
    if lead:
        atomic_write(os.path.join(run_dir, RUN_FILES.train_config), cfg.to_yaml())
        cfg.model_config().save_pretrained(run_dir)  # config.json: what the checkpoints hold (nucleusx_jax.runs)
    prepared = _Prepared(run_dir, tokenizer, tokenizer_file, trainer, train_data, eval_sets if t.eval_every > 0 else [],
                         lm_eval, checkpointer, trainer.init_state() if state is None else state, resumed_from,
                         cfg.model_config())
    if lead:
        print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices, "
              f"{jax.process_count()} process(es); {trainer.num_params:,} parameters; train windows of "
              f"{cfg.data.seq_len} tokens: {dict(zip(train_data.names, map(len, train_data.components)))}; "
              f"{_flops_per_token(cfg, prepared):.3g} training FLOPs/token; "
              + (f"resuming from step {resumed_from}" if resumed_from is not None else "starting from scratch"),
              flush=True)
    return prepared


def _flops_per_token(cfg: Config, run: _Prepared) -> float:
    return training_flops_per_token(run.model_config, run.trainer.num_params, cfg.data.seq_len)


def _loop(cfg: Config, run: _Prepared, hooks: List[Hook], preemption: Preemption, checkpoints: Checkpoints,
          progress: Progress) -> Tuple[TrainState, bool]:
    """The steps from the state's to ``train.steps``, each followed by the hooks (in order; closed in order
    however the loop ends), then a checkpoint. Returns ``(state, preempted)``: on SIGTERM, after the step
    that runs, a checkpoint is written and waited for, and the loop stops."""
    state, steps = run.state, cfg.train.steps
    start, shape = int(jax.device_get(state.step)), (cfg.train.global_batch, cfg.data.seq_len + 1)
    try:
        for hook in hooks:
            hook.start(start, state)
        for step in range(start, steps):
            for hook in hooks:
                hook.before(step)
            with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                inputs = [global_batch(run.train_data, step, run.trainer.batch_sharding, shape)]
                if cfg.train.carry_state:  # which rows continue their previous window (and carried state)
                    inputs.append(global_continues(run.train_data, step, run.trainer.batch_sharding, shape))
                state, metrics = run.trainer.train_step(state, *inputs)
                info = StepInfo(step + 1, step + 1 == steps, state, jax.device_get(metrics))
            for hook in hooks:
                hook.after(info)
            if preemption.requested():
                checkpoints.final(state, wait=True)
                progress.say(f"SIGTERM: saved step {info.done} to {run.run_dir}; exiting")
                return state, True
        checkpoints.final(state, wait=False)
        return state, False
    finally:
        for hook in hooks:
            hook.close()


def _run(cfg: Config) -> Dict[str, Any]:
    """:func:`run` once the run directory is locked: prepare, loop with the hooks, export, summarise."""
    t, lg, lead = cfg.train, cfg.logging, jax.process_index() == 0
    run = _prepare(cfg)
    start, tokens_per_step = int(jax.device_get(run.state.step)), t.global_batch * cfg.data.seq_len
    writer = MetricsWriter(run.run_dir, lg.tensorboard, lg.wandb, cfg.to_dict()) if lead else None
    progress = Progress(writer=writer, lead=lead, show=lead and lg.progress, total=t.steps, start=start,
                        every=lg.every, tokens_per_step=tokens_per_step, flops_per_token=_flops_per_token(cfg, run),
                        peak=peak_tflops(jax.devices()[0].device_kind, lg.peak_tflops_per_device))
    finite, preemption, checkpoints = FiniteLoss(t.on_nonfinite), Preemption(), Checkpoints(run.checkpointer)
    evaluation = Evaluation(run.trainer, run.eval_sets, every=t.eval_every, batches=t.eval_batches, progress=progress)
    lm_eval = [] if run.lm_eval is None else [LmEvaluation(run.lm_eval, every=cfg.lm_eval.every, progress=progress)]
    hooks = [Profile(run.run_dir, lg.profile_steps), finite, progress, evaluation, *lm_eval, checkpoints, preemption]
    start_time = time.perf_counter()
    state, preempted = _loop(cfg, run, hooks, preemption, checkpoints, progress)
    wall = time.perf_counter() - start_time
    steps_done = int(jax.device_get(state.step))
    summary: Dict[str, Any] = {
        "run_dir": run.run_dir, "steps": steps_done, "resumed_from": run.resumed_from, "preempted": preempted,
        "first_train_loss": finite.first, "last_train_loss": finite.last,
        "eval_losses": evaluation.losses, "eval": evaluation.last, "wall_s": wall, "parameters": run.trainer.num_params,
        "tokens_per_s": (steps_done - start) * tokens_per_step / wall if wall > 0 else None,
    }
    if not preempted:
        summary.update(_export(cfg, run, state.params))
    if lead:
        atomic_write(os.path.join(run.run_dir, RUN_FILES.summary), json.dumps(summary, indent=2))
        print_summary(summary)
    return summary


def _export(cfg: Config, run: _Prepared, params: Params) -> Dict[str, Any]:
    """The end of a finished run: the HF and PyTorch exports, the loss plot and the greedy sample, as far as
    the config asks for them; returns their summary entries."""
    lead, out = jax.process_index() == 0, {}
    final_params = host_params(params)
    if cfg.checkpoint.export_hf or cfg.checkpoint.export_torch:
        out["hf_dir"] = export_hf(run.run_dir, run.model_config, final_params, run.tokenizer_file)
    if cfg.checkpoint.export_torch and lead:
        out["torch_dir"] = os.path.join(run.run_dir, RUN_FILES.torch)
        convert(out["hf_dir"], out["torch_dir"], "torch", overwrite=True, progress=False)
    if lead and cfg.logging.plot:
        out["plot"] = plot_losses(run.run_dir)
    if cfg.logging.sample_tokens > 0:
        lg, tok = cfg.logging, run.tokenizer
        prompt = ([tok.bos_id] if cfg.data.add_bos else []) + tok.encode(lg.sample_prompt)
        out["sample"] = lg.sample_prompt + tok.decode(greedy_sample(run.model_config, final_params, prompt,
                                                                     lg.sample_tokens))
    return out


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
