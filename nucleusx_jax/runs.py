"""A training run directory: the names of its entries (:data:`RUN_FILES`, the one place they are spelled), and
the run as model consumers read it: ``config.json`` (the model config, written by the trainer when the run
starts) and the trainer's orbax steps in ``checkpoints/<step>``, of which only the parameters are read; local
or a URL (see :mod:`.storage`). The trainer (:mod:`nucleusx_jax.train`) writes the run; the converter reads it."""

import dataclasses
import os
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from . import storage
from .configuration import CONFIG_FILE, NucleusXConfig
from .modeling import NucleusXForCausalLMModule



@dataclasses.dataclass(frozen=True)
class RunFiles:
    """The entries of a run directory, by name relative to it (W&B adds its own ``wandb/``)."""

    train_config: str = "config.yaml"  # the resolved trainer config
    model_config: str = CONFIG_FILE  # config.json: the model the checkpoints hold
    tokenizer: str = "tokenizer.model"  # a SentencePiece model trained for the run
    data: str = "data"  # token stores prepared from data.sources
    checkpoints: str = "checkpoints"  # orbax, one directory per step
    corrupt_checkpoints: str = "checkpoints_corrupt"  # unreadable steps, moved aside
    metrics: str = "metrics.jsonl"
    tensorboard: str = "tensorboard"
    profile: str = "profile"  # logging.profile_steps
    plot: str = "loss.png"
    hf: str = "hf"  # the final model (and tokenizer), a flax model directory
    torch: str = "torch"  # the optional PyTorch export
    summary: str = "summary.json"
    lock: str = "run.lock"  # the trainer running there (nucleusx_jax.lock)


RUN_FILES = RunFiles()


def is_run_dir(path: str) -> bool:
    """Whether ``path`` holds trainer checkpoints (``checkpoints/<step>``)."""
    steps = os.path.join(path, RUN_FILES.checkpoints)
    return storage.isdir(steps) and any(n.isdigit() for n in storage.listdir(steps))


def restore_params(run_dir: str, step: Optional[int] = None) -> Tuple[NucleusXConfig, Any]:
    """The model config and float32 parameters of a run's checkpoint (default: the latest complete step),
    read without the optimizer state, onto the first local device. The parameters are in the layout the run
    trained in (``config.scan_layers``); :func:`nucleusx_jax.weights.to_layout` gives the other."""
    config_file = os.path.join(run_dir, RUN_FILES.model_config)
    if not storage.isfile(config_file):
        raise FileNotFoundError(f"{run_dir} has no {RUN_FILES.model_config} (the model config the trainer writes "
                                "when a run starts): not a training run directory")
    config = NucleusXConfig.from_pretrained(config_file)
    module = NucleusXForCausalLMModule(config)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    abstract = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids)["params"]))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)}
    manager = ocp.CheckpointManager(os.path.join(storage.absolute(run_dir), RUN_FILES.checkpoints),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise FileNotFoundError(f"no checkpoint step {step!r} in {run_dir}/{RUN_FILES.checkpoints}: "
                                f"available steps {list(manager.all_steps())}")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    manager.close()
    return config, restored["state"]["params"]
