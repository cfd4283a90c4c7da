"""The benchmark suite: one table of timings and achieved fractions of this machine's matmul throughput.

``python -m benchmarks`` (or ``python benchmarks/run.py``) runs, on the default JAX backend:

* ``peak``: a 2048^3 float32 ``jnp.dot``, timed just before every timed run of every row (the fastest of
  ``PEAK_TRIES`` back-to-back calls: a single call right after a long run measures low); a row's fraction
  of the peak is the median over its runs of (its FLOP/s) / (the FLOP/s of the matmul just before it), so
  other processes sharing the CPU affect both sides alike. The peak row gives the median of all of them;
* ``op``: retention alone (bench-small heads: H=4, K=128, V=256), forward and forward+backward, parallel,
  chunkwise (XLA) and, off CPU, chunkwise (Pallas), batch 1, T = 512 ... 32768;
* ``model``: the bench-small model (vocab 32000, embed 512, value 1024, heads 4, ffn 1024, layers 4), logits
  forward and loss forward+backward, parallel and chunkwise, batch 1, same lengths;
* ``train``: the trainer's jit train step (AdamW; ``nucleusx_jax.train.step.make_trainer``), chunkwise, at
  batch 4 x 512 and 1 x 8192, without and with document resets (``segments``: packed documents kept apart);
* ``decode``: batch-1 decode tokens/s measured by ``benchmarks/decode.py`` (a subprocess), when it exists;
* ``compile``: compile time of the trainer's train step against depth (``COMPILE_SMALL`` widths, 4 and 32
  layers), per-layer and with ``scan_layers``: the first call of a freshly built step minus a later call.

FLOPs follow :func:`nucleusx_jax.train.step.training_flops_per_token` (6 x params x tokens for training, every
weight but the input embedding table, plus retention counted like causal attention); a forward pass is a third
of it. Every row is the median of ``--repeats`` timed runs (3 when the compile-and-warm-up run took over 20 s)
after one compile-and-warm-up run, with min and max.
Set ``XLA_FLAGS`` before the run to try XLA CPU flags (see ``benchmarks/NOTES.md``).
Every row is compiled first; rows whose memory, as XLA plans it (``memory_analysis()``: arguments, outputs and
temporaries), exceeds ``--memory-gb`` are listed as skipped without running. Results go to
``benchmarks/results/<name>.json`` (written to a temporary file, then renamed).
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# XLA:CPU flags for the run, unless XLA_FLAGS is set (``XLA_FLAGS= python -m benchmarks`` runs without them):
# XNNPACK matmul kernels measured faster than the default ones here (benchmarks/NOTES.md, section 3).
DEFAULT_XLA_FLAGS = "--xla_cpu_use_xnnpack=true"
os.environ.setdefault("XLA_FLAGS", DEFAULT_XLA_FLAGS)

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402

from nucleusx_jax import kernels  # noqa: E402
from nucleusx_jax import retention as ret  # noqa: E402
from nucleusx_jax.configuration import NucleusXConfig  # noqa: E402
from nucleusx_jax.modeling import NucleusXForCausalLMModule, RunOptions  # noqa: E402
from nucleusx_jax.train.step import training_flops_per_token  # noqa: E402

MATMUL_N = 2048
MATMUL_FLOPS = 2.0 * MATMUL_N**3
PEAK_TRIES = 3
LONG_RUN_S, LONG_RUN_REPEATS = 20.0, 3
HERE = os.path.dirname(os.path.abspath(__file__))
BENCH_SMALL = dict(vocab_size=32000, decoder_embed_dim=512, decoder_value_embed_dim=1024, decoder_retention_heads=4,
                   decoder_ffn_embed_dim=1024, decoder_layers=4)
LENGTHS = (512, 2048, 8192, 32768)
GROUPS = ("op", "model", "train", "decode", "compile")
# small widths, so that compiling (not running) dominates the first call of the train step
COMPILE_SMALL = dict(vocab_size=512, decoder_embed_dim=64, decoder_value_embed_dim=128, decoder_retention_heads=2,
                     decoder_ffn_embed_dim=128)
COMPILE_DEPTHS = (4, 32)


@dataclasses.dataclass
class Row:
    """One measured (or skipped) configuration; times in seconds, ``flops`` per call."""

    group: str
    name: str
    tokens: int
    flops: float
    times: List[float] = dataclasses.field(default_factory=list)
    peak_times: List[float] = dataclasses.field(default_factory=list)  # the matmul timed just before each run
    skipped: str = ""
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def fraction(self) -> Optional[float]:
        """Median over the runs of (FLOP/s of the run) / (FLOP/s of the matmul timed just before it)."""
        if not self.flops or not self.times:
            return None
        return statistics.median(self.flops / t * p / MATMUL_FLOPS for t, p in zip(self.times, self.peak_times))

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.times:
            d.update(median_s=self.median, min_s=min(self.times), max_s=max(self.times),
                     tokens_per_s=self.tokens / self.median, gflops_per_s=self.flops / self.median / 1e9,
                     fraction_of_peak=self.fraction)
        return d


class Timer:
    """Times functions, each timed call preceded by a timed 2048^3 float32 ``jnp.dot`` (the peak: the fastest
    of ``PEAK_TRIES`` calls).

    Pairing every run with a peak measurement taken just before it keeps the fraction meaningful when other
    processes share the CPU: both see the same contention.
    """

    def __init__(self, repeats: int):
        self.repeats = repeats
        a = jax.random.normal(jax.random.PRNGKey(0), (MATMUL_N, MATMUL_N), jnp.float32)
        b = jax.random.normal(jax.random.PRNGKey(1), (MATMUL_N, MATMUL_N), jnp.float32)
        dot = jax.jit(jnp.dot)
        self.matmul = lambda: dot(a, b)

    @staticmethod
    def seconds(fn: Callable[[], Any]) -> float:
        """Wall time of one call, blocked until its result is ready."""
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start

    def __call__(self, row: Row, fn: Callable[[], Any]) -> Row:
        """Compile and warm up ``fn`` with one call, then add ``repeats`` (matmul, fn) timing pairs to ``row``
        (at most ``LONG_RUN_REPEATS`` when the warm-up call took over ``LONG_RUN_S`` seconds)."""
        return self.alternating([(row, fn)])[0]

    def alternating(self, rows: Sequence[Tuple[Row, Callable[[], Any]]]) -> List[Row]:
        """Like :meth:`__call__` for several rows whose timed calls alternate (a, b, a, b, ...): rows to be
        compared with each other then see the same state of the machine."""
        jax.block_until_ready(self.matmul())
        live, slowest = [], 0.0
        for row, fn in rows:
            try:
                slowest = max(slowest, self.seconds(fn))
                live.append((row, fn))
            except jax.errors.JaxRuntimeError as e:  # only running out of memory turns into a skipped row
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                row.skipped = f"out of memory ({str(e).splitlines()[0][:120]})"
        for _ in range(self.repeats if slowest < LONG_RUN_S else min(self.repeats, LONG_RUN_REPEATS)):
            for row, fn in live:
                row.peak_times.append(min(self.seconds(self.matmul) for _ in range(PEAK_TRIES)))
                row.times.append(self.seconds(fn))
        return [row for row, _ in rows]


def retention_flops(config: NucleusXConfig, batch: int, length: int, backward: bool) -> float:
    """One layer's retention (all heads) counted like causal attention: the retention term of
    :func:`training_flops_per_token` (its dense term is zero when only the embedding table is counted)."""
    embedding_only = config.vocab_size * config.decoder_embed_dim
    per_token = training_flops_per_token(config, embedding_only, length) / config.decoder_layers
    return batch * length * per_token / (1 if backward else 3)


def model_flops(config: NucleusXConfig, num_params: int, tokens: int, length: int, backward: bool) -> float:
    """Model FLOPs of ``tokens`` tokens at sequence length ``length``; a forward pass is a third of training."""
    return tokens * training_flops_per_token(config, num_params, length) / (1 if backward else 3)


def compile_within(fn: Callable[..., Any], args: Sequence[Any], budget_gb: float) -> Tuple[Optional[Callable[[], Any]], str]:
    """Compile ``fn(*args)``; returns (a no-argument call of it, "") or (None, why it was skipped) when the
    memory XLA plans for it (arguments, outputs and temporaries) exceeds ``budget_gb``."""
    compiled = jax.jit(fn).lower(*args).compile()
    plan = compiled.memory_analysis()
    need = plan.argument_size_in_bytes + plan.output_size_in_bytes + plan.temp_size_in_bytes
    if need > budget_gb * 2**30:
        return None, f"needs {need / 2**30:.1f} GiB (XLA's plan) > {budget_gb} GiB"
    return (lambda: compiled(*args)), ""


def op_rows(timer: Timer, report: Callable[[Row], Row], config: NucleusXConfig, lengths: Sequence[int], chunk: int, budget_gb: float,
            impls: Sequence[str]) -> List[Row]:
    """Retention alone, batch 1: parallel and chunkwise (each implementation), forward and forward+backward."""
    heads, kdim, vdim = config.decoder_retention_heads, config.key_head_dim, config.value_head_dim
    log_decay = jnp.asarray(ret.log_decay_table(heads, False))
    forms = {"parallel": lambda q, k, v: ret.parallel_retention(q, k, v, log_decay)}
    if "xla" in impls:
        forms["chunkwise"] = lambda q, k, v: ret.chunkwise_retention(q, k, v, log_decay, chunk)
    if "pallas" in impls:
        forms["chunkwise-pallas"] = lambda q, k, v: kernels.chunkwise_retention(q, k, v, log_decay, chunk)
    rows = []
    for length in lengths:
        keys = jax.random.split(jax.random.PRNGKey(length), 3)
        q = jax.random.normal(keys[0], (1, heads, length, kdim))
        k = jax.random.normal(keys[1], (1, heads, length, kdim)) * kdim**-0.5
        v = jax.random.normal(keys[2], (1, heads, length, vdim))
        for form, fn in forms.items():
            for backward in (False, True):
                name = f"retention {form} {'fwd+bwd' if backward else 'fwd'} T={length}"
                row = Row("op", name, length, retention_flops(config, 1, length, backward))
                f = jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)) if backward else fn
                call, row.skipped = compile_within(f, (q, k, v), budget_gb)
                if call is not None:
                    timer(row, call)
                rows.append(report(row))
    return rows


def model_rows(timer: Timer, report: Callable[[Row], Row], config: NucleusXConfig, lengths: Sequence[int], modes: Sequence[str],
               chunk: int, budget_gb: float) -> List[Row]:
    """The full model at batch 1: logits forward, and the next-token loss (the trainer's, through
    :func:`nucleusx_jax.losses.lm_head_loss`) forward+backward with respect to the parameters."""
    module = NucleusXForCausalLMModule(config)
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    num_params = sum(x.size for x in jax.tree.leaves(params))
    rows = []
    for length in lengths:
        ids = jax.random.randint(jax.random.PRNGKey(length), (1, length), 0, config.vocab_size)
        labels = jnp.concatenate([ids[:, 1:], jnp.full((1, 1), -100, ids.dtype)], axis=1)
        for mode in modes:
            kw = dict(options=RunOptions.from_config(config, mode=mode, chunk_size=min(chunk, length)))

            def forward(p: Any, ids: jax.Array, kw: Dict[str, Any] = kw) -> jax.Array:
                return module.apply({"params": p}, ids, **kw)[0]

            def loss(p: Any, ids: jax.Array, labels: jax.Array, kw: Dict[str, Any] = kw) -> jax.Array:
                return module.apply({"params": p}, ids, labels, **kw, method=NucleusXForCausalLMModule.next_token_loss)

            for backward in (False, True):
                name = f"model {mode} {'fwd+bwd' if backward else 'fwd'} T={length}"
                row = Row("model", name, length, model_flops(config, num_params, length, length, backward))
                f, args = (jax.grad(loss), (params, ids, labels)) if backward else (forward, (params, ids))
                call, row.skipped = compile_within(f, args, budget_gb)
                if call is not None:
                    timer(row, call)
                rows.append(report(row))
    return rows


def train_step_call(config: NucleusXConfig, batch: int, length: int, chunk: int,
                    reset: bool) -> Tuple[Callable[[], Any], float]:
    """(one call of the trainer's train step on a fixed batch, its FLOPs): chunkwise, one device, the model
    ``config``'s fields; compiled at the first call. With ``reset`` (``data.reset_at_document_boundaries``)
    its windows hold documents of 1 to 400 tokens (EOS-ended)."""
    from nucleusx_jax import sharding as shd
    from nucleusx_jax.train.config import parse_config
    from nucleusx_jax.train.step import make_trainer

    kept = ("scan_layers", "chunkwise_normalization", *BENCH_SMALL)
    model = {k: v for k, v in config.to_dict().items() if k in kept}
    cfg = parse_config({
        "model": dict(model, forward_mode="chunkwise", recurrent_chunk_size=min(chunk, length)),
        "data": {"seq_len": length, "reset_at_document_boundaries": reset},
        "train": {"global_batch": batch},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
    })
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    trainer = make_trainer(cfg, mesh)
    state = [trainer.init_state()]
    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, length + 1), 3, config.vocab_size)
    ends = jnp.cumsum(jax.random.randint(jax.random.PRNGKey(1), (batch, length), 1, 401), axis=1)
    is_end = jnp.zeros((batch, length + 1), bool).at[jnp.arange(batch)[:, None], ends].set(True, mode="drop")
    tokens = jax.device_put(jnp.where(is_end, cfg.model_config().eos_token_id, tokens), trainer.batch_sharding)

    def step() -> Any:
        state[0], metrics = trainer.train_step(state[0], tokens)
        return state[0], metrics

    return step, batch * length * training_flops_per_token(cfg.model_config(), trainer.num_params, length)


def train_rows(timer: Timer, report: Callable[[Row], Row], config: NucleusXConfig, shapes: Sequence[Sequence[int]], chunk: int) -> List[Row]:
    """Tokens/s of the trainer's compiled train step (AdamW, chunkwise), one device; each shape without and with
    document resets (:func:`train_step_call`), their timed calls alternating so the two compare fairly."""
    rows = []
    for batch, length in shapes:
        pair = []
        for reset in (False, True):
            step, flops = train_step_call(config, batch, length, chunk, reset)
            name = f"train step chunkwise {batch}x{length}" + (" segments" if reset else "")
            pair.append((Row("train", name, batch * length, flops), step))
        rows.extend(report(row) for row in timer.alternating(pair))
    return rows


def compile_rows(report: Callable[[Row], Row], depths: Sequence[int], repeats: int) -> List[Row]:
    """Seconds to compile the trainer's train step (:func:`train_step_call`, 2 x 128 tokens, ``COMPILE_SMALL``)
    at each depth, per-layer and scanned: a fresh step's first call minus its second call, ``repeats`` times
    (each time rebuilt, so nothing is cached), after one untimed warm-up (the first compile of a process pays
    one-off costs). The scanned rows' note gives the ratio to the shallowest."""
    warm_up, _ = train_step_call(NucleusXConfig(**COMPILE_SMALL, decoder_layers=depths[0]), 2, 128, 64, False)
    jax.block_until_ready(warm_up())
    rows: List[Row] = []
    for scan in (False, True):
        shallowest = None
        for depth in depths:
            row = Row("compile", f"compile train step {depth} layers " + ("scanned" if scan else "per-layer"), 1, 0.0)
            config = NucleusXConfig(**COMPILE_SMALL, decoder_layers=depth, scan_layers=scan)
            for _ in range(repeats):
                step, _ = train_step_call(config, 2, 128, 64, False)
                first = Timer.seconds(step)
                row.times.append(first - Timer.seconds(step))
            if shallowest is None:
                shallowest = row
            else:
                row.note = f"x{row.median / shallowest.median:.2f} the {depths[0]}-layer time"
            rows.append(report(row))
    return rows


def decode_rows(report: Callable[[Row], Row], new_tokens: int = 128) -> List[Row]:
    """Batch-1 decode tokens/s from ``benchmarks/decode.py`` (run as a subprocess, prompt 16), when it exists;
    the note gives its ratio to the weight-reading ceiling that script measures."""
    script = os.path.join(HERE, "decode.py")
    row = Row("decode", "decode batch 1 (benchmarks/decode.py)", new_tokens - 1, 0.0)
    if not os.path.exists(script):
        row.skipped = "benchmarks/decode.py not found"
        return [report(row)]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "decode.json")
        cmd = [sys.executable, script, "--batches", "1", "--prompts", "16", "--new-tokens", str(new_tokens),
               "--output", out]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
        with open(out) as f:
            result = json.load(f)["results"][0]
    row.times = [result["decode_s"]]
    row.note = f"{result['decode_over_ceiling']:.0%} of the matrix-vector ceiling ({result['ceiling_tok_s']:.0f} tok/s)"
    return [report(row)]


class Reporter:
    """Prints each row as soon as it is measured and rewrites the JSON with every row so far (a later crash
    or interruption keeps what was measured)."""

    def __init__(self, path: str, header: Dict[str, Any]):
        self.path, self.header, self.rows = path, header, []

    def __call__(self, row: Row) -> Row:
        if row.skipped:
            print(f"  {row.name}: skipped ({row.skipped})", flush=True)
        else:
            print(f"  {row.name}: {row.median * 1e3:.1f} ms" + (f", {row.fraction:.1%} of peak" if row.flops else ""),
                  flush=True)
        self.rows.append(row)
        self.save()
        return row

    def save(self, extra: Optional[Dict[str, Any]] = None) -> None:
        write_json(self.path, {**self.header, **(extra or {}), "rows": [r.as_dict() for r in self.rows]})


def format_table(rows: Sequence[Row]) -> str:
    """The table: median (min-max) time, time per token, tokens/s, GFLOP/s and the fraction of the peak."""
    header = (f"{'benchmark':<40} {'median ms':>11} {'(min-max)':>17} {'us/token':>9} {'tokens/s':>10} "
              f"{'GFLOP/s':>8} {'of peak':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.skipped:
            lines.append(f"{r.name:<40} skipped: {r.skipped}")
            continue
        m = r.median
        frac = f"{r.fraction:7.1%}" if r.flops else f"{'':>7}"
        gf = f"{r.flops / m / 1e9:8.1f}" if r.flops else f"{'':>8}"
        span = f"({min(r.times) * 1e3:.1f}-{max(r.times) * 1e3:.1f})"
        per = f"{'':>9} {'':>10}" if r.group in ("peak", "compile") else f"{m / r.tokens * 1e6:9.2f} {r.tokens / m:10.0f}"
        lines.append(f"{r.name:<40} {m * 1e3:11.1f} {span:>17} {per} {gf} {frac} {r.note}".rstrip())
    return "\n".join(lines)


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file in the same directory, then rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> List[Row]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated subset of {', '.join(GROUPS)}")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="sequence lengths for op and model")
    p.add_argument("--modes", default="parallel,chunkwise", help="model forward modes")
    p.add_argument("--impls", default=None, help="chunkwise implementations for the op rows (xla,pallas); "
                   "default xla on CPU (Pallas only interprets there), both elsewhere")
    p.add_argument("--chunk", type=int, default=256, help="chunk size of the chunkwise form")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row (after a warm-up run)")
    p.add_argument("--memory-gb", type=float, default=12.0, help="skip rows estimated to need more memory")
    p.add_argument("--depths", default=",".join(map(str, COMPILE_DEPTHS)), help="layer counts of the compile rows")
    p.add_argument("--name", default=None, help="results file name (default: backend and UTC time)")
    args = p.parse_args(argv)
    groups = [g for g in args.groups.split(",") if g]
    bad = sorted(set(groups) - set(GROUPS))
    if bad:
        raise SystemExit(f"--groups: unknown group(s) {bad}; allowed: {', '.join(GROUPS)}")
    lengths = [int(x) for x in args.lengths.split(",") if x]
    backend = jax.default_backend()
    impls = (args.impls or ("xla" if backend == "cpu" else "xla,pallas")).split(",")
    config = NucleusXConfig(**BENCH_SMALL, recurrent_chunk_size=args.chunk)

    print(f"backend {backend} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, load average {os.getloadavg()[0]:.1f}", flush=True)
    name = args.name or f"{backend}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}"
    path = os.path.join(HERE, "results", f"{name}.json")
    report = Reporter(path, {
        "backend": backend, "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "argv": list(sys.argv[1:] if argv is None else argv), "load_average_start": os.getloadavg()[0]})
    timer = Timer(args.repeats)
    if "op" in groups:
        op_rows(timer, report, config, lengths, args.chunk, args.memory_gb, impls)
    if "model" in groups:
        model_rows(timer, report, config, lengths, args.modes.split(","), args.chunk, args.memory_gb)
    if "train" in groups:
        train_rows(timer, report, config, [(4, 512), (1, 8192)], args.chunk)
    if "decode" in groups:
        decode_rows(report)
    if "compile" in groups:
        compile_rows(report, [int(x) for x in args.depths.split(",") if x], min(args.repeats, LONG_RUN_REPEATS))
    rows = list(report.rows)
    peak_row = timer(Row("peak", f"matmul {MATMUL_N}^3 fp32 (the peak)", 1, MATMUL_FLOPS), timer.matmul)
    peak_row.peak_times = peak_row.times = [t for r in rows + [peak_row] for t in r.peak_times]
    peak = MATMUL_FLOPS / statistics.median(peak_row.times)
    report.rows = [peak_row] + rows
    report.save({"peak_flops_per_s": peak, "load_average_end": os.getloadavg()[0]})
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} (other processes on the machine skew every row)")
    print(format_table(report.rows))
    print(f"\nwrote {os.path.relpath(path)}")
    return report.rows


if __name__ == "__main__":
    main()
