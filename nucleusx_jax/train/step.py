"""The sharded training state, AdamW, the jit-compiled train/eval steps, and the FLOP count for MFU.

Batches are ``[B, T + 1]`` int32 token rows (``Mixture.rows``): inputs ``[:, :-1]``, targets ``[:, 1:]``.

With ``train.carry_state`` each row's window continues the retention state the row's previous window left
(:class:`~nucleusx_jax.retention.CarriedState`, one per layer, held in :attr:`TrainState.carry`): the batches
come from stream rows (``data.stream_rows``), where window ``n + 1`` of a row starts at token ``T`` of window
``n``, and the step takes ``continues`` ``[B]`` bool besides the batch (False: the row starts afresh). The
gradient stops at the window's first token (truncated backpropagation through time).
"""

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .. import retention as ret
from .. import runtime, sequence_parallel
from .. import sharding as shd
from ..documents import document_segment_ids, next_token_targets
from ..configuration import ChunkwiseNormalization, ForwardMode, NucleusXConfig, RetentionImpl
from ..modeling import NucleusXForCausalLMModule, RunOptions
from ..types import Array, CarriedCache, Params
from .config import Config

REMAT_POLICIES = {"none": None, "full": None, "dots": "dots_saveable",
                  "dots_no_batch": "dots_with_no_batch_dims_saveable"}


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds: ``step`` (optimizer steps done = data position), fp32 ``params``,
    ``opt_state``, ``rng`` (the base key; step ``s`` uses ``fold_in(rng, s)``) and, with ``train.carry_state``,
    ``carry``: the state each row's last window left (one CarriedState per layer, ``[B, ...]`` float32 over the
    global batch; None without carrying)."""

    step: Array
    params: Params
    opt_state: Any
    rng: Array
    carry: Optional[CarriedCache] = None

    def as_dict(self) -> Dict[str, Any]:
        """Plain-dict view (what orbax stores); ``carry`` only when there is one, a list of ``{kv, [z], count}``."""
        out = {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}
        if self.carry is None:
            return out
        return {**out, "carry": [{k: v for k, v in s._asdict().items() if v is not None} for s in self.carry]}

    @classmethod
    def from_dict(cls, tree: Dict[str, Any]) -> "TrainState":
        """The state of an :meth:`as_dict` view."""
        carry = tree.get("carry")
        if carry is not None:
            carry = tuple(ret.CarriedState(kv=s["kv"], z=s.get("z"), count=s["count"]) for s in carry)
        return cls(**{**tree, "carry": carry})


def build_module(cfg: Config) -> NucleusXForCausalLMModule:
    """The linen model with the run's compute dtype and remat option (parameters always float32)."""
    t = cfg.train
    return NucleusXForCausalLMModule(
        cfg.model_config(), dtype=jnp.dtype(t.dtype), param_dtype=jnp.float32,
        gradient_checkpointing=t.remat != "none", remat_policy=REMAT_POLICIES[t.remat])


def learning_rate_schedule(cfg: Config) -> Callable[[Array], Array]:
    """lr(count): linear warmup ``(count + 1) / warmup_steps``, then cosine/linear/constant decay to
    ``min_lr_ratio * learning_rate`` at ``train.steps``."""
    peak, s, total = cfg.optimizer.learning_rate, cfg.schedule, cfg.train.steps

    def schedule(count: Array) -> Array:
        count = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(1.0, (count + 1.0) / max(1, s.warmup_steps))
        progress = jnp.clip((count - s.warmup_steps) / max(1, total - s.warmup_steps), 0.0, 1.0)
        if s.decay == "cosine":
            decay = s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + jnp.cos(math.pi * progress))
        elif s.decay == "linear":
            decay = 1.0 - (1 - s.min_lr_ratio) * progress
        else:
            decay = jnp.ones_like(progress)
        return peak * warm * decay

    return schedule


def weight_decay_mask(params: Params, decay_norms: bool, decay_embeddings: bool) -> Any:
    """True where AdamW decays: every Dense ``kernel``; norm ``weight`` and ``embedding`` only if asked."""
    decide = {"kernel": True, "weight": decay_norms, "embedding": decay_embeddings}

    def leaf(path: Tuple[Any, ...], _: Any) -> bool:
        name = path[-1].key
        if name not in decide:
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} has an unknown kind '{name}' "
                             f"for the weight-decay mask (known: {', '.join(decide)})")
        return decide[name]

    return jax.tree_util.tree_map_with_path(leaf, params)


def build_optimizer(cfg: Config) -> optax.GradientTransformation:
    """Global-norm clipping (``clip_norm > 0``) then AdamW with the schedule and the decay mask."""
    o = cfg.optimizer
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        mask=lambda p: weight_decay_mask(p, o.decay_norms, o.decay_embeddings))
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm > 0 else adamw


def training_flops_per_token(config: NucleusXConfig, num_params: int, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward), the numerator of MFU.

    ``6 * N + 3 * L * T * (E + E_v)``: ``N`` counts every parameter except the input embedding table (the LM
    head counts; a tied table counts once, as the head), 6 = 2 (multiply-add) x 3 (forward + 2 backward).
    Retention is counted like causal attention: per layer and token the forward pass does ``q.k`` over on
    average ``T / 2`` positions (``2 * E * T / 2`` FLOPs) and the weighted sum of values (``2 * E_v * T / 2``),
    times 3 for training. ``E`` = decoder_embed_dim, ``E_v`` = decoder_value_embed_dim, ``L`` layers,
    ``T`` the training sequence length. The chunkwise form does fewer; this is the parallel form's count.
    """
    embedding = config.vocab_size * config.decoder_embed_dim
    dense = num_params - (0 if config.tie_word_embeddings else embedding)
    retention = 3 * config.decoder_layers * seq_len * (config.decoder_embed_dim + config.decoder_value_embed_dim)
    return 6.0 * dense + retention


@dataclasses.dataclass
class Trainer:
    """Compiled steps and the shardings of one run on one mesh.

    ``state_shardings`` is a :class:`TrainState` of ``NamedSharding``; ``abstract_state`` the matching
    ``jax.ShapeDtypeStruct`` tree (with shardings: the orbax restore target).
    """

    cfg: Config
    mesh: Mesh
    module: NucleusXForCausalLMModule
    optimizer: optax.GradientTransformation
    abstract_state: TrainState
    state_shardings: TrainState
    batch_sharding: NamedSharding
    row_sharding: NamedSharding  # [B] per-row arrays (continues), placed as the batch's rows
    init_state: "OnMesh"  # () -> TrainState
    train_step: "OnMesh"  # (TrainState, batch [B, T + 1][, continues [B] with carry_state]) -> (TrainState, metrics)
    eval_step: "OnMesh"  # (params, batch [B, T + 1]) -> mean loss
    num_params: int

    def abstract_step_inputs(self) -> Tuple[jax.ShapeDtypeStruct, ...]:
        """What ``train_step`` takes after the state, as shapes with shardings: the batch ``[B, T + 1]`` int32
        and, with ``train.carry_state``, ``continues`` ``[B]`` bool."""
        rows = self.cfg.train.global_batch
        batch = jax.ShapeDtypeStruct((rows, self.cfg.data.seq_len + 1), jnp.int32, sharding=self.batch_sharding)
        if not self.cfg.train.carry_state:
            return (batch,)
        return batch, jax.ShapeDtypeStruct((rows,), jnp.bool_, sharding=self.row_sharding)


def carried_with_z(config: NucleusXConfig, segments: bool) -> bool:
    """Whether the carried states of windows run with(out) ``segments`` hold ``z``
    (:meth:`~nucleusx_jax.configuration.ChunkwiseNormalization.carries_z`)."""
    return ChunkwiseNormalization.parse(config.chunkwise_normalization).carries_z(segments)


def empty_carry(config: NucleusXConfig, rows: int, segments: bool) -> CarriedCache:
    """The carried cache of ``rows`` rows before any window (count 0: every row starts a document); ``segments``
    as :func:`carried_with_z`."""
    with_z = carried_with_z(config, segments)
    return tuple(s._replace(z=s.z if with_z else None) for s in runtime.empty_carried_cache(config, rows))


def carry_specs(config: NucleusXConfig, segments: bool) -> CarriedCache:
    """The PartitionSpec of every layer's carried state (:func:`empty_carry`): rows over the batch axes (as the
    batch's rows), heads over ``tensor`` (as the retention heads), replicated over ``sequence`` (a row's state
    is whole)."""
    states = PartitionSpec(shd.BATCH_AXES, shd.TENSOR_AXIS)
    z = states if carried_with_z(config, segments) else None
    return tuple(ret.CarriedState(kv=states, z=z, count=PartitionSpec(shd.BATCH_AXES))
                 for _ in range(config.decoder_layers))


def state_specs(module: NucleusXForCausalLMModule, optimizer: optax.GradientTransformation,
                seq_len: int, carry_rows: int = 0, segments: bool = True) -> Tuple[TrainState, TrainState]:
    """(abstract state, PartitionSpec state) without allocating anything; works for any mesh shape. With
    ``carry_rows`` the state carries that many rows' retention states (:func:`empty_carry`, ``segments`` as
    there)."""
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids)["params"])
    param_specs = shd.logical_specs(boxed)
    params = nn.meta.unbox(boxed)
    opt_state = jax.eval_shape(optimizer.init, params)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    opt_specs = optax.tree_map_params(optimizer, lambda _, spec: spec, opt_state, param_specs,
                                      transform_non_params=lambda _: PartitionSpec(), is_leaf=is_spec)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    carry = jax.eval_shape(lambda: empty_carry(module.config, carry_rows, segments)) if carry_rows else None
    carry_spec = carry_specs(module.config, segments) if carry_rows else None
    abstract = TrainState(step=scalar, params=params, opt_state=opt_state, rng=key, carry=carry)
    specs = TrainState(step=PartitionSpec(), params=param_specs, opt_state=opt_specs, rng=PartitionSpec(),
                       carry=carry_spec)
    return abstract, specs


def check_fits(cfg: Config, mesh_shape: Dict[str, int]) -> None:
    """Fail before compiling when the run does not fit the mesh; the messages name the numbers."""
    t, model = cfg.train, cfg.model_config()
    rows = mesh_shape["data"] * mesh_shape["fsdp"]
    if t.global_batch % (rows * t.grad_accum):
        raise ValueError(f"train.global_batch={t.global_batch} must be divisible by data x fsdp x grad_accum = "
                         f"{mesh_shape['data']} x {mesh_shape['fsdp']} x {t.grad_accum} = {rows * t.grad_accum}")
    tensor = mesh_shape["tensor"]
    if model.decoder_retention_heads % tensor:
        raise ValueError(f"model.decoder_retention_heads={model.decoder_retention_heads} must be divisible by "
                         f"mesh.tensor={tensor}")
    if model.forward_mode == ForwardMode.RECURRENT:
        raise ValueError("model.forward_mode='recurrent' is invalid for training: use parallel or chunkwise "
                         "(the trainer runs the model config's forward form)")
    if model.forward_mode == ForwardMode.CHUNKWISE and cfg.data.seq_len % model.recurrent_chunk_size:
        raise ValueError(f"model.recurrent_chunk_size={model.recurrent_chunk_size} must divide "
                         f"data.seq_len={cfg.data.seq_len} for model.forward_mode=chunkwise")
    sequence = mesh_shape.get(shd.SEQUENCE_AXIS, 1)
    if sequence > 1:
        if model.forward_mode != ForwardMode.CHUNKWISE or model.retention_impl != RetentionImpl.XLA:
            raise ValueError(f"mesh.sequence={sequence} needs model.forward_mode=chunkwise and model.retention_impl="
                             f"xla (got {ForwardMode.parse(model.forward_mode).value} and "
                             f"{RetentionImpl.parse(model.retention_impl).value})")
        sequence_parallel.check_split(cfg.data.seq_len, model.recurrent_chunk_size, sequence, name="data.seq_len")


class OnMesh:
    """A jitted ``fn`` called, traced and lowered with ``mesh`` set and the logical axis rules active, which turns
    the model's activation constraints (``modeling.ACTIVATION_AXES``) into sharding constraints."""

    def __init__(self, mesh: Mesh, fn: Any) -> None:
        self.mesh, self.fn = mesh, fn

    def __call__(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(shd.LOGICAL_AXIS_RULES):
            return self.fn(*args)

    def lower(self, *args: Any) -> Any:
        """``fn.lower(*args)`` (arguments may be ``jax.ShapeDtypeStruct``: nothing is allocated)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(shd.LOGICAL_AXIS_RULES):
            return self.fn.lower(*args)


def make_trainer(cfg: Config, mesh: Mesh) -> Trainer:
    """Shardings, the sharded initialiser and the jit-compiled steps for ``cfg`` on ``mesh``."""
    mesh_shape = dict(mesh.shape)
    check_fits(cfg, mesh_shape)
    t = cfg.train
    module = build_module(cfg)
    optimizer = build_optimizer(cfg)
    abstract, specs = state_specs(module, optimizer, cfg.data.seq_len, t.global_batch if t.carry_state else 0,
                                  cfg.data.reset_at_document_boundaries)
    shd.check_divisible(abstract.as_dict(), specs.as_dict(), mesh_shape)
    state_shardings = shd.named_shardings(mesh, specs)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, state_shardings)
    batch_sharding = NamedSharding(mesh, shd.batch_spec(2))
    token_sharding = NamedSharding(mesh, shd.token_spec())
    replicated = NamedSharding(mesh, PartitionSpec())
    num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(abstract.params))

    def split(tokens: Array) -> Tuple[Array, Array, Array]:
        """Windows ``[B, T + 1]`` (rows over ``data`` x ``fsdp``) -> (inputs, targets, segment ids), each
        ``[B, T]`` and also split along T over ``sequence``: with ``data.reset_at_document_boundaries`` each
        document sees only itself and predicts only its own tokens (no segments: all ones)."""
        if not cfg.data.reset_at_document_boundaries:
            parts = tokens[:, :-1], tokens[:, 1:], jnp.ones_like(tokens[:, :-1])
        else:
            segments = document_segment_ids(tokens, module.config.bos_token_id, module.config.eos_token_id)
            # on the whole windows every device holds: XLA would split the cumulative sum over `sequence` and
            # gather [B, T] ids back
            segments = jax.lax.with_sharding_constraint(segments, batch_sharding)
            parts = tokens[:, :-1], next_token_targets(tokens, segments), segments[:, :-1]
        return tuple(jax.lax.with_sharding_constraint(x, token_sharding) for x in parts)

    def loss_fn(params: Params, parts: Tuple[Array, Array, Array], rng: Array, deterministic: bool,
                n_valid: Optional[Array] = None) -> Array:
        """Next-token loss of ``split`` windows (the cross-entropy divided by ``n_valid``, default its count)."""
        inputs, targets, segments = parts
        options = RunOptions.from_config(module.config, deterministic=deterministic)
        segments = segments if cfg.data.reset_at_document_boundaries else None
        return module.apply({"params": params}, inputs, targets, None, segments, options=options, n_valid=n_valid,
                            rngs={"dropout": rng}, method=NucleusXForCausalLMModule.next_token_loss)

    def carried_loss_fn(params: Params, parts: Tuple[Array, Array, Array], carry: CarriedCache, rng: Array,
                        n_valid: Array) -> Tuple[Array, CarriedCache]:
        """(``loss_fn`` of windows continuing ``carry``, the carry they leave)."""
        inputs, targets, segments = parts
        options = RunOptions.from_config(module.config, deterministic=False, return_state=True)
        segments = segments if cfg.data.reset_at_document_boundaries else None
        return module.apply({"params": params}, inputs, targets, carry, segments, options=options, n_valid=n_valid,
                            rngs={"dropout": rng}, method=NucleusXForCausalLMModule.carried_next_token_loss)

    def micro_loss(params: Params, parts: Tuple[Array, Array, Array], carry: Optional[CarriedCache], rng: Array,
                   n_valid: Array) -> Tuple[Array, Optional[CarriedCache]]:
        """(training loss of one microbatch, the carry it leaves): ``carried_loss_fn`` from ``carry``, or
        ``loss_fn`` and None without one."""
        if carry is None:
            return loss_fn(params, parts, rng, False, n_valid), None
        return carried_loss_fn(params, parts, carry, rng, n_valid)

    carrying = t.carry_state
    segmented = cfg.data.reset_at_document_boundaries
    carry_shardings = state_shardings.carry
    row_sharding = NamedSharding(mesh, shd.batch_spec(1))

    def init() -> TrainState:
        key = jax.random.PRNGKey(t.seed)
        params = nn.meta.unbox(module.init(key, jnp.zeros((1, cfg.data.seq_len), jnp.int32))["params"])
        carry = empty_carry(module.config, t.global_batch, segmented) if carrying else None
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          rng=jax.random.fold_in(key, 1), carry=carry)

    def to_micro(tree: Any, shardings: Any) -> Any:
        """Rows ``[B, ...]`` -> ``[grad_accum, B / grad_accum, ...]``: microbatch ``i`` holds rows ``i::grad_accum``."""
        def one(x: Array, s: NamedSharding) -> Array:
            x = x.reshape(-1, t.grad_accum, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(None, *s.spec)))
        return jax.tree.map(one, tree, shardings)

    def from_micro(tree: Any) -> Any:
        """The inverse of :func:`to_micro`."""
        return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), tree)

    def train_step(state: TrainState, batch: Array,
                   continues: Optional[Array] = None) -> Tuple[TrainState, Dict[str, Array]]:
        """batch ``[B, T + 1]`` (and, carrying, ``continues`` ``[B]`` bool) -> (new state, metrics). Microbatch
        ``i`` takes rows ``i::grad_accum`` (and their carried states) so each device keeps its own rows; a
        non-finite loss or gradient leaves params and optimizer untouched (and restarts every row's state)."""
        step_rng = jax.random.fold_in(state.rng, state.step)
        parts = split(batch)
        # each microbatch divides its cross-entropy sum by its share of the whole batch's count of targets
        share = jnp.maximum(jnp.sum(parts[1] != -100), 1) / t.grad_accum
        micro = to_micro(parts, (token_sharding,) * 3)
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        carry = None
        if carrying:  # rows that start afresh read an empty state; no gradient crosses the window's start
            carry = to_micro(jax.lax.stop_gradient(reset_rows(state.carry, continues)), carry_shardings)
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def accumulate(acc: Tuple[Array, Any], xs: Tuple[Any, Any, Array]) -> Tuple[Tuple[Array, Any], Any]:
            (loss, new_carry), grads = grad_fn(state.params, xs[0], xs[1], jax.random.fold_in(step_rng, xs[2]), share)
            return (acc[0] + loss, jax.tree.map(jnp.add, acc[1], grads)), new_carry

        (loss, grads), new_carry = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                                (micro, carry, jnp.arange(t.grad_accum)))
        new_carry = from_micro(new_carry)
        loss, grads = loss / t.grad_accum, jax.tree.map(lambda g: g / t.grad_accum, grads)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        if carrying:  # the next window of a row whose next token starts a document starts afresh
            runs_on = runs_into_next(batch) & finite if segmented else jnp.broadcast_to(finite, batch.shape[:1])
            new_carry = reset_rows(new_carry, runs_on)
        new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state), rng=state.rng,
                               carry=new_carry if carrying else None)
        lr = learning_rate_schedule(cfg)(state.step)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": lr, "finite": finite}

    def runs_into_next(batch: Array) -> Array:
        """``[B]`` bool: True where the row's window ``[B, T + 1]`` runs on into the next window's document,
        i.e. token ``T`` (the next window's first) starts no document (it is no BOS and follows no EOS)."""
        last = document_segment_ids(batch[:, -2:], module.config.bos_token_id, module.config.eos_token_id)
        return last[:, 1] == last[:, 0]

    def eval_step(params: Params, batch: Array) -> Array:
        """Mean next-token loss of ``batch`` ``[B, T + 1]`` (no dropout)."""
        return loss_fn(params, split(batch), jax.random.PRNGKey(0), True)

    metric_shardings = {"loss": replicated, "grad_norm": replicated, "lr": replicated, "finite": replicated}
    step_inputs = (state_shardings, batch_sharding) + ((row_sharding,) if carrying else ())
    return Trainer(
        cfg=cfg, mesh=mesh, module=module, optimizer=optimizer, abstract_state=abstract,
        state_shardings=state_shardings, batch_sharding=batch_sharding, row_sharding=row_sharding,
        init_state=OnMesh(mesh, jax.jit(init, out_shardings=state_shardings)),
        train_step=OnMesh(mesh, jax.jit(train_step, in_shardings=step_inputs,
                                          out_shardings=(state_shardings, metric_shardings), donate_argnums=0)),
        eval_step=OnMesh(mesh, jax.jit(eval_step, in_shardings=(state_shardings.params, batch_sharding),
                                         out_shardings=replicated)),
        num_params=num_params,
    )


def reset_rows(carry: CarriedCache, keep: Array) -> CarriedCache:
    """``carry`` with the rows where ``keep`` ``[B]`` is False emptied (zeros, count 0: they start a document)."""
    return jax.tree.map(lambda x: jnp.where(keep.reshape(-1, *[1] * (x.ndim - 1)), x, jnp.zeros_like(x)), carry)
