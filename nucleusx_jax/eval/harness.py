"""NucleusX models in EleutherAI's lm-evaluation-harness (``lm-eval``): :class:`NucleusXLM`.

``lm_eval.simple_evaluate(model=NucleusXLM(pretrained=DIR), tasks=[...])`` evaluates a model directory (ours or
PyTorch; local, ``gs://...`` or a Hub id: :func:`nucleusx_jax.loading.load`; with a SentencePiece or HF
tokenizer). Importing this module also registers the name ``nucleusx``, so
``python -m nucleusx_jax.eval --model_args pretrained=DIR --tasks ...`` (the harness's own CLI) works.

Retention makes two things cheap here:

* **shared prompts**: requests with the same context run it once; every continuation (every choice of a
  multiple-choice item; every generation from that prompt) starts from a copy of the fixed-size state it leaves;
* **rolling perplexity in constant memory**: a document of any length is scored window by window, the state
  carried from one window to the next. Every token is predicted from the whole document before it, exactly,
  with nothing re-encoded; memory depends on the window, not on the document.

Requests are batched by length (longest first), contexts padded on the left and continuations on the right,
context lengths rounded up to a multiple of ``pad_multiple`` and continuation lengths (run token by token in the
recurrent form) to a power of two, so that few shapes are compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import lm_eval
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from tqdm.auto import tqdm

from .. import checks, decode
from ..loading import load
from ..runtime import bucket, pad_left, pad_right
from ..tokenizer import Tokenizer, load_tokenizer
from .backend import Backend

MODEL_NAME = "nucleusx"  # the name lm-eval knows the model by
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """How requests are run.

    ``max_length``: the most tokens (context plus continuation, or prompt plus new tokens) one request may use;
    also the window of rolling perplexity. ``truncation``: cut contexts that are too long from the left
    (otherwise a too-long request is an error). ``share_prefix``: run each distinct context once and continue
    every request from its state (otherwise each request runs context and continuation whole).
    ``continuation_batch_size``: rows of one continuation pass (continuations are short, so more rows fit).
    ``add_bos``: put the tokenizer's BOS before every context. ``max_gen_toks``: new tokens of a generation
    when the task does not say. ``pad_multiple``: padded lengths are multiples of it.
    """

    batch_size: int = 8
    continuation_batch_size: int = 32
    max_length: int = 2048
    truncation: bool = False
    share_prefix: bool = True
    add_bos: bool = True
    max_gen_toks: int = 256
    pad_multiple: int = 32
    prompt_chunkwise_threshold: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "continuation_batch_size", "max_length", "max_gen_toks", "pad_multiple"):
            checks.integer(name, getattr(self, name))
        for name in ("truncation", "share_prefix", "add_bos"):
            checks.flag(name, getattr(self, name))
        if self.prompt_chunkwise_threshold is not None:
            checks.integer("prompt_chunkwise_threshold", self.prompt_chunkwise_threshold)
        checks.integer("seed", self.seed, minimum=0)


def _pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


JAX_DEVICE = "jax"  # the ``device`` our CLI passes: JAX's default backend (lm-eval >= 0.4.10 would pass cuda:0)


@register_model(MODEL_NAME)
class NucleusXLM(LM):
    """An lm-eval model: ``NucleusXLM(pretrained=DIR, batch_size=8, max_length=2048, dtype="float32", ...)``.

    ``tokenizer``: a SentencePiece ``.model`` file or HF tokenizer directory (default: ``pretrained``). Other
    keyword options are the fields of :class:`EvalOptions`. ``device`` (passed by the harness's CLI) must be unset
    or ``"jax"``: JAX places the model on its default backend. ``max_batch_size`` must be unset.
    """

    def __init__(self, pretrained: str, *, tokenizer: Optional[str] = None, dtype: str = "float32",
                 batch_size: Any = EvalOptions.batch_size, device: Optional[str] = None,
                 max_batch_size: Optional[int] = None, **options: Any):
        super().__init__()
        if device not in (None, JAX_DEVICE):
            raise ValueError(f"device={device!r} is not supported: leave it unset (or {JAX_DEVICE!r}); JAX runs on "
                             "its default backend (choose it with JAX_PLATFORMS=cpu|gpu|tpu)")
        if max_batch_size is not None:
            raise ValueError(f"max_batch_size={max_batch_size!r} is not supported: give batch_size=N")
        self._setup(load(pretrained, dtype=dtype), None, self._load_tokenizer(pretrained, tokenizer),
                    self._options(batch_size, options))

    @classmethod
    def from_model(cls, model: Any, tokenizer: Tokenizer, *, params: Any = None,
                   options: EvalOptions = EvalOptions()) -> "NucleusXLM":
        """An lm-eval model for a model object already in memory (e.g. the trainer's, with its ``params``)."""
        lm = cls.__new__(cls)
        LM.__init__(lm)
        lm._setup(model, params, tokenizer, options)
        return lm

    def _setup(self, model: Any, params: Any, tokenizer: Tokenizer, options: EvalOptions) -> None:
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                             f"vocab_size={model.config.vocab_size}: they do not belong together")
        self.backend = Backend(model, params, prompt_chunkwise_threshold=options.prompt_chunkwise_threshold)
        self.tokenizer = tokenizer
        self.options = options

    @staticmethod
    def _load_tokenizer(pretrained: str, tokenizer: Optional[str]) -> Tokenizer:
        path = tokenizer if tokenizer is not None else pretrained
        try:
            return load_tokenizer(path)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"no tokenizer for {pretrained!r}: {e}. Put tokenizer.model (SentencePiece) or an HF "
                             "tokenizer in the model directory, or pass tokenizer=PATH") from e

    @staticmethod
    def _options(batch_size: Any, options: Dict[str, Any]) -> EvalOptions:
        fields = {f.name for f in dataclasses.fields(EvalOptions)}
        unknown = sorted(set(options) - fields)
        if unknown:
            allowed = ["pretrained", "tokenizer", "dtype", *sorted(fields)]
            raise ValueError(f"unknown model argument(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        if isinstance(batch_size, str):
            if not batch_size.isdigit():
                raise ValueError(f"batch_size={batch_size!r} is invalid: must be an integer >= 1 ('auto' is not "
                                 "supported)")
            batch_size = int(batch_size)
        return EvalOptions(batch_size=batch_size, **options)

    # ------------------------------------------------------------------------------------------ text
    @property
    def max_length(self) -> int:
        return self.options.max_length

    @property
    def tokenizer_name(self) -> str:
        return repr(self.tokenizer)

    def _context_ids(self, text: str) -> List[int]:
        return ([self.tokenizer.bos_id] if self.options.add_bos else []) + self.tokenizer.encode(text)

    def _encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """(context ids, continuation ids) as the harness's models split them: the pair is encoded whole and
        the context's encoding cut off, trailing spaces of the context moved to the continuation. An empty
        context is the BOS token alone."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not continuation:
            raise ValueError(f"empty continuation for context {context[-60:]!r}: nothing to score")
        whole = self._context_ids(context + continuation)
        ctx = self._context_ids(context)
        if not ctx:
            raise ValueError("an empty context needs add_bos=true (a BOS token to condition on)")
        return ctx, whole[len(ctx):]

    def _fit(self, ctx: List[int], room: int, what: str) -> List[int]:
        """``ctx`` cut from the left to at most ``room`` tokens when truncation is on; else an error if longer."""
        if len(ctx) <= room:
            return ctx
        if not self.options.truncation or room < 1:
            raise ValueError(f"{what} needs {len(ctx)} context tokens but max_length={self.max_length} leaves room "
                             f"for {room}; raise max_length or pass truncation=true to cut contexts from the left")
        return ctx[-room:]

    # ------------------------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        pairs = []
        for req in requests:
            ctx, cont = self._encode_pair(*req.args)
            pairs.append((self._fit(ctx, self.max_length - len(cont), "a loglikelihood request"), cont))
        out = self.loglikelihood_tokens(pairs, disable_tqdm=disable_tqdm)
        for req, value in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, value)
        return out

    def loglikelihood_tokens(self, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]], *,
                             disable_tqdm: bool = True) -> List[Tuple[float, bool]]:
        """``(log p(continuation | context), greedy)`` for (context ids, continuation ids) pairs."""
        out: List[Optional[Tuple[float, bool]]] = [None] * len(pairs)
        for i, lp, greedy in self._scores(pairs, disable_tqdm):
            out[i] = (lp, greedy)
        return out  # type: ignore[return-value]

    def _users(self, contexts: Sequence[Sequence[int]]) -> List[Tuple[Tuple[int, ...], List[int]]]:
        """(context, indices of the requests it serves), longest first: each distinct context once with
        ``share_prefix``, else one entry per request."""
        users: Dict[Any, Tuple[Tuple[int, ...], List[int]]] = {}
        for i, ctx in enumerate(contexts):
            users.setdefault(tuple(ctx) if self.options.share_prefix else i, (tuple(ctx), []))[1].append(i)
        return sorted(users.values(), key=lambda u: -len(u[0]))

    def _scores(self, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]],
                disable_tqdm: bool) -> Iterator[Tuple[int, float, bool]]:
        """A batch of contexts at a time, then the continuations of their requests from rows of their state."""
        o, pad = self.options, self.tokenizer.pad_id
        users = self._users([ctx for ctx, _ in pairs])
        for batch in tqdm(list(_batches(users, o.batch_size)), disable=disable_tqdm, desc="loglikelihood"):
            ids, mask = pad_left([c for c, _ in batch], _pad_to(len(batch[0][0]), o.pad_multiple), o.batch_size, pad)
            first_logp, cache = self.backend.prefix(ids, mask)
            todo = [(row, i) for row, (_, served) in enumerate(batch) for i in served]
            todo.sort(key=lambda t: -len(pairs[t[1]][1]))
            for part in _batches(todo, o.continuation_batch_size):
                conts = [pairs[i][1] for _, i in part]
                n_rows = o.continuation_batch_size
                cids, cmask = pad_right(conts, bucket(len(conts[0])), n_rows, pad)
                rows = np.asarray([row for row, _ in part] + [part[0][0]] * (n_rows - len(part)))
                lp, greedy = self.backend.continuation(first_logp, cache, rows, cids, cmask)
                for n, (_, i) in enumerate(part):
                    k = len(conts[n])
                    yield i, float(lp[n, :k].sum()), bool(greedy[n, :k].all())

    # -------------------------------------------------------------------------------- rolling perplexity
    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> List[float]:
        docs = [[self.tokenizer.bos_id] + self.tokenizer.encode(req.args[0]) for req in requests]
        out = self.rolling_tokens(docs, disable_tqdm=disable_tqdm)
        for req, value in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), value)
        return out

    def rolling_tokens(self, docs: Sequence[Sequence[int]], *, disable_tqdm: bool = True) -> List[float]:
        """Sum of ``log p(doc[t] | doc[:t])`` over ``t >= 1`` for each token list, in windows of ``max_length``
        positions carrying the recurrent state (documents of any length, in constant memory)."""
        o, pad, width = self.options, self.tokenizer.pad_id, self.options.max_length
        order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
        out = [0.0] * len(docs)
        for batch in tqdm(list(_batches(order, o.batch_size)), disable=disable_tqdm, desc="rolling"):
            if min(len(docs[i]) for i in batch) < 2:
                raise ValueError("a rolling-loglikelihood document has no tokens to score")
            cache = self.backend.empty_cache(o.batch_size)
            totals = np.zeros(o.batch_size, np.float64)
            for start in range(0, len(docs[batch[0]]) - 1, width):
                ids, mask = pad_right([docs[i][start:start + width] for i in batch], width, o.batch_size, pad)
                targets, tmask = pad_right([docs[i][start + 1:start + 1 + width] for i in batch], width,
                                            o.batch_size, pad)
                mask = mask * tmask  # the last token of a document predicts nothing
                mask[len(batch):] = 0
                total, cache = self.backend.window(cache, ids, mask, targets)
                totals += total
            for row, i in enumerate(batch):
                out[i] = float(totals[row])
        return out

    # ---------------------------------------------------------------------------------------- generation
    def _decode_options(self, kwargs: Dict[str, Any]) -> Tuple[decode.DecodeOptions, int, Tuple[str, ...]]:
        unknown = sorted(set(kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"unsupported generation argument(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(GEN_KWARGS)}")
        until = kwargs.get("until", ())
        until = (until,) if isinstance(until, str) else tuple(until)
        steps = kwargs.get("max_gen_toks", self.options.max_gen_toks)
        temperature = float(kwargs.get("temperature", 0.0))
        do_sample = bool(kwargs.get("do_sample", False)) and temperature > 0
        options = decode.decode_options(
            self.backend.model, do_sample=do_sample, temperature=temperature,
            top_k=int(kwargs.get("top_k", 0) or 0), top_p=float(kwargs.get("top_p", 1.0) or 1.0),
            eos_token_id=self.tokenizer.eos_id, pad_token_id=self.tokenizer.pad_id)
        return options, int(steps), until

    def _cut(self, tokens: Sequence[int], until: Tuple[str, ...]) -> str:
        """The text of ``tokens`` up to the first EOS, cut before the first stop string."""
        tokens = list(tokens)
        if self.tokenizer.eos_id in tokens:
            tokens = tokens[:tokens.index(self.tokenizer.eos_id)]
        text = self.tokenizer.decode(tokens)
        for stop in until:
            if stop and stop in text:
                text = text[:text.index(stop)]
        return text

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> List[str]:
        groups: Dict[str, List[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: List[str] = [""] * len(requests)
        key = jax.random.PRNGKey(self.options.seed)
        for members in groups.values():
            options, steps, until = self._decode_options(requests[members[0]].args[1])
            users = self._users([self._fit(self._context_ids(requests[i].args[0]), self.max_length - steps,
                                           "a generation request") for i in members])
            o, pad = self.options, self.tokenizer.pad_id
            for batch in tqdm(list(_batches(users, o.batch_size)), disable=disable_tqdm, desc="generate_until"):
                ids, mask = pad_left([c for c, _ in batch], _pad_to(len(batch[0][0]), o.pad_multiple), len(batch), pad)
                todo = [(row, members[j]) for row, (_, served) in enumerate(batch) for j in served]
                key, use = jax.random.split(key)
                tokens = self.backend.generate(ids, mask, np.asarray([row for row, _ in todo]), steps=steps,
                                               options=options, prng_key=use)
                for n, (_, i) in enumerate(todo):
                    out[i] = self._cut(tokens[n], until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def evaluate_tasks(model: Any, tokenizer: Tokenizer, tasks: Sequence[str], *, params: Any = None,
                   options: EvalOptions = EvalOptions(), include_path: Optional[str] = None,
                   limit: Optional[int] = None, num_fewshot: Optional[int] = None) -> Dict[str, float]:
    """Run lm-eval ``tasks`` on a model in memory (e.g. the trainer's, with its sharded ``params``); returns the
    numeric metrics as ``{"task/metric": value}`` (the harness's ``metric,filter`` keys, ``,none`` dropped)."""
    lm = NucleusXLM.from_model(model, tokenizer, params=params, options=options)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=include_path),
                                      limit=limit, num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0,
                                      verbosity="WARNING")
    return {f"{task}/{key.removesuffix(',none')}": float(value)
            for task, metrics in results["results"].items() for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in key}


__all__ = ["EvalOptions", "NucleusXLM", "evaluate_tasks"]
