"""orbax checkpoints of the :class:`~nucleusx_jax.train.step.TrainState` in ``<run_dir>/checkpoints/<step>``.

Saves are asynchronous (the step loop continues while arrays are written); orbax writes each step into a
temporary directory and renames it when complete, so a crash mid-save leaves no step that
``latest_step()`` would pick. On object storage (``gs://``), where there is no rename, orbax writes the step
in place and ``commit_success.txt`` last; a step without it is not listed, so resume never picks it. A step that fails to restore (truncated or corrupted files) is moved to
``<run_dir>/checkpoints_corrupt/<step>`` with a warning, and the previous step is tried; a readable step of a
different model or optimizer (array shapes differ) is an error instead.

Each step's ``meta`` (JSON) holds the step and, for stream rows (``data.stream_rows``), the streams' layout
(:meth:`~nucleusx_jax.data.streams.Streams.layout`): a resume whose layout differs (another batch size, seq_len,
seed or store) is refused (:func:`~nucleusx_jax.data.streams.check_layout`), since the stream positions and the
carried states (``train.carry_state``) would not match the rows.
"""

import logging
import os
from typing import Any, Dict, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from .. import storage
from ..data.streams import check_layout
from ..modeling import LAYERS
from ..runs import RUN_FILES
from .config import CheckpointConfig
from .step import TrainState

logger = logging.getLogger(__name__)


def _restore_args(abstract: Any) -> Any:
    return ocp.checkpoint_utils.construct_restore_args(abstract)


class Checkpointer:
    """Save/restore of one run directory; ``every`` and ``max_to_keep`` from the ``checkpoint`` section;
    ``data_layout``: the run's stream layout (None without ``data.stream_rows``), saved with every step and
    compared on restore."""

    def __init__(self, run_dir: str, cfg: CheckpointConfig, data_layout: Optional[Dict[str, Any]] = None):
        self.cfg = cfg
        self.data_layout = data_layout
        self.run_dir = storage.absolute(run_dir)
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.max_to_keep, create=True,
                                               enable_async_checkpointing=cfg.async_save)
        storage.forget_cached_listings(self.run_dir)  # orbax lists through its own cached filesystem
        self.manager = ocp.CheckpointManager(
            os.path.join(self.run_dir, RUN_FILES.checkpoints), options=options,
            item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def due(self, step: int) -> bool:
        """Whether step ``step`` (optimizer steps done) is a periodic save point."""
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def save(self, state: TrainState) -> int:
        """Start an asynchronous save of ``state`` under its step (a no-op if that step is saved); returns it."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return step
        meta = {"step": step, "data_position": step, "data_layout": self.data_layout}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state.as_dict()),
                                                          meta=ocp.args.JsonSave(meta)), force=True)
        return step

    def wait(self) -> None:
        """Block until pending asynchronous saves are complete on disk."""
        self.manager.wait_until_finished()

    def restore_latest(self, abstract: TrainState) -> Optional[TrainState]:
        """The newest step that restores onto ``abstract`` (a TrainState of ``ShapeDtypeStruct`` with
        shardings; any mesh), or None when there is none. Broken steps are moved aside with a warning; a step
        of another stream layout, model or optimizer is a ValueError."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                saved = jax.tree_util.tree_leaves_with_path(self.manager.item_metadata(step)["state"].tree)
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as err:  # orbax/tensorstore raise many types for a damaged step
                self._skip(step, err)
                continue
            try:
                check_layout(meta.get("data_layout"), self.data_layout)
            except ValueError as err:
                raise ValueError(f"checkpoint step {step} in {self.manager.directory}: {err}") from None
            self._check_matches(step, saved, abstract)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    abstract.as_dict(), restore_args=_restore_args(abstract.as_dict()))))["state"]
                return TrainState.from_dict(restored)
            except Exception as err:
                self._skip(step, err)
        return None

    def _check_matches(self, step: int, saved: Any, abstract: TrainState) -> None:
        """A readable step of another model or optimizer is an error (not damage): name the first difference."""
        wanted = jax.tree_util.tree_leaves_with_path(abstract.as_dict())
        problem = None
        if len(saved) != len(wanted):
            problem = f"it holds {len(saved)} arrays, this run's state has {len(wanted)}"
        else:
            for (path, meta), (_, want) in zip(saved, wanted):
                if tuple(meta.shape) != tuple(want.shape):
                    problem = (f"{jax.tree_util.keystr(path)} has shape {tuple(meta.shape)} there but "
                               f"{tuple(want.shape)} in this run")
                    break
        scanned = [any(getattr(k, "key", None) == LAYERS for path, _ in leaves for k in path)
                   for leaves in (saved, wanted)]
        carried = [any(getattr(path[0], "key", None) == "carry" for path, _ in leaves) for leaves in (saved, wanted)]
        if carried[0] != carried[1]:
            problem = (f"it was written with train.carry_state={str(carried[0]).lower()} (its state "
                       f"{'holds' if carried[0] else 'has no'} carried retention states), this run has "
                       f"train.carry_state={str(carried[1]).lower()}; resume with "
                       f"train.carry_state={str(carried[0]).lower()}")
        elif problem and scanned[0] != scanned[1]:
            problem += (f" (it was trained with model.scan_layers={str(scanned[0]).lower()}, this run has "
                        f"{str(scanned[1]).lower()}: the two layouts stack the layer parameters differently)")
        if problem:
            raise ValueError(f"checkpoint step {step} in {self.manager.directory} does not match this run's model "
                             f"and optimizer: {problem}. Use another train.run_dir, or set checkpoint.resume=false "
                             "to start over")

    def _skip(self, step: int, err: Exception) -> None:
        logger.warning("checkpoint step %d in %s cannot be restored (%s: %s); skipping it in favour of the "
                       "previous one and moving it to %s", step, self.manager.directory, type(err).__name__,
                       str(err).splitlines()[0][:300] if str(err) else "", RUN_FILES.corrupt_checkpoints)
        self._move_aside(step)

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            storage.move(os.path.join(str(self.manager.directory), str(step)),
                         os.path.join(self.run_dir, RUN_FILES.corrupt_checkpoints, str(step)))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"nucleusx-move-aside-{step}")
        storage.forget_cached_listings(self.run_dir)  # else orbax's listing keeps the step: it would not save it
        self.manager.reload()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
