"""lm-evaluation-harness on our models: the real ``lm_eval`` on tasks written here (data files in tmp_path, no
network), each value checked against a direct computation with the model.

* multiple choice: every loglikelihood equals the log-probability of the continuation from one parallel pass over
  context + continuation (1e-4, float32); the chosen answers are the argmax; prefix sharing changes nothing (1e-5);
* contexts run chunkwise give the parallel pass's values too (the default ``chunkwise_normalization``);
* rolling perplexity: the windowed, state-carrying value equals the loss of one parallel pass over the document;
* generation with a stop string: the text is that of ``nucleusx_jax.generate``'s greedy tokens, cut at the stop.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from pydoc_data.topics import topics

pytest.importorskip("lm_eval")
import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from nucleusx_jax import NucleusX, NucleusXConfig  # noqa: E402
from nucleusx_jax import generate as gen  # noqa: E402
from nucleusx_jax.convert import convert  # noqa: E402
from nucleusx_jax.eval import NucleusXLM  # noqa: E402
from nucleusx_jax.eval.__main__ import main as eval_main  # noqa: E402
from nucleusx_jax.eval.harness import EvalOptions  # noqa: E402
from nucleusx_jax.tokenizer import load_tokenizer, save_hf_tokenizer, train_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow  # ~1.5 min on 2 cores: tokenizer training and a few compiles per model
VOCAB = 512
TOPICS = sorted(topics)


def _text(i: int, chars: int) -> str:
    """The first ``chars`` characters of pydoc topics ``i, i+1, ...`` (whitespace collapsed)."""
    return " ".join(" ".join(topics[t].split()) for t in TOPICS[i:i + 8])[:chars]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A SentencePiece tokenizer, a random model saved in our format and in PyTorch's (HF tokenizer).

    ``initializer_factor=1`` gives retention outputs well above the per-head RMSNorm's epsilon, as in a trained
    model: the retention forms then agree to float32 rounding (with the default factor they differ by ~1e-3)."""
    root = tmp_path_factory.mktemp("eval")
    sp = train_tokenizer(["builtin:pydoc"], str(root / "sp"), VOCAB, max_sentences=1000, character_coverage=0.995)
    cfg = NucleusXConfig(vocab_size=VOCAB, decoder_embed_dim=64, decoder_ffn_embed_dim=96, decoder_layers=2,
                         decoder_retention_heads=4, decoder_value_embed_dim=128, recurrent_chunk_size=16,
                         initializer_factor=1.0, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = NucleusX(cfg, seed=3)
    flax_dir, torch_dir, bare_dir = root / "flax", root / "torch", root / "bare"
    model.save_pretrained(flax_dir)
    shutil.copytree(flax_dir, bare_dir)
    shutil.copy(sp, flax_dir / "tokenizer.model")
    convert(str(bare_dir), str(torch_dir), "torch", progress=False)
    save_hf_tokenizer(sp, str(torch_dir))
    return dict(root=root, model=model, tok=load_tokenizer(sp), flax=str(flax_dir), torch=str(torch_dir),
                bare=str(bare_dir))


def _write_tasks(root, until):
    """Three tasks over jsonl files: multiple choice (2-shot), rolling perplexity, generation until ``until``."""
    rng = np.random.default_rng(0)
    words = [w for w in _text(0, 3000).split() if w.isalpha()]
    mc = [dict(question=_text(i, 40 + 10 * i), choices=[" ".join(rng.choice(words, 1 + j % 3)) for j in range(4)],
               label=int(rng.integers(4))) for i in range(1, 9)]
    ppl = [dict(text=_text(i, n)) for i, n in ((10, 4000), (11, 900), (12, 40))]
    genr = [dict(prompt=_text(i, 60), answer="x") for i in (20, 21, 22, 20)]  # a repeated prompt: one shared row
    files = {"mc_train": mc[:4], "mc_test": mc[4:], "ppl": ppl, "gen": genr}
    for name, rows in files.items():
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root}/mc_train.jsonl
    test: {root}/mc_test.jsonl
training_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
num_fewshot: 2
metric_list:
  - metric: acc
""")
    (tasks / "tiny_ppl.yaml").write_text(f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    (tasks / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: {json.dumps([until])}
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return str(tasks), files


def _direct_logps(model, seqs, mode):
    """Float64 log-probabilities ``[N, L-1, V]`` of each token sequence's next tokens from one pass in ``mode``
    (sequences right-padded to a common length: causal, so padding after a sequence changes nothing of it)."""
    length = max(len(s) for s in seqs)
    ids = np.asarray([list(s) + [0] * (length - len(s)) for s in seqs])
    logits = np.asarray(model(ids[:, :-1], forward_mode=mode).logits, np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _logprobs(model, tok, pairs):
    """log p(continuation | BOS + context) of each (context, continuation) text pair from one parallel pass (the
    pair encoded whole and split where the context's encoding ends, as the harness does)."""
    ctxs = [[tok.bos_id] + tok.encode(c) for c, _ in pairs]
    wholes = [[tok.bos_id] + tok.encode(c + x) for c, x in pairs]
    logp = _direct_logps(model, wholes, "parallel")
    return np.asarray([sum(logp[n, t - 1, w[t]] for t in range(len(c), len(w)))
                       for n, (c, w) in enumerate(zip(ctxs, wholes))])


def _reference_generation(model, tok, prompt, steps=12):
    ids = [tok.bos_id] + tok.encode(prompt)
    out = gen.generate(model, np.asarray([ids]), max_new_tokens=steps, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    return tok.decode(out[:out.index(tok.eos_id)] if tok.eos_id in out else out)


@pytest.fixture(scope="module")
def run(env):
    """The three tasks evaluated once by ``lm_eval.simple_evaluate`` (samples logged)."""
    model, tok = env["model"], env["tok"]
    first = _reference_generation(model, tok, _text(20, 60))
    until = first[len(first) // 2:len(first) // 2 + 2]  # a stop string the greedy text does contain
    assert until.strip(), first
    include, files = _write_tasks(env["root"], until)
    lm = NucleusXLM(pretrained=env["flax"], batch_size=4, max_length=256)
    results = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_ppl", "tiny_gen"],
                                      task_manager=TaskManager(include_path=include), log_samples=True,
                                      bootstrap_iters=0)
    return dict(lm=lm, results=results, files=files, until=until, include=include)


def test_multiple_choice_matches_direct_logprobs(env, run):
    samples = run["results"]["samples"]["tiny_mc"]
    assert len(samples) == 4
    correct = []
    for s in samples:
        got = np.asarray([r[0][0] for r in s["resps"]])
        want = _logprobs(env["model"], env["tok"], s["arguments"])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        correct.append(float(np.argmax(want) == s["doc"]["label"]))
        assert s["acc"] == correct[-1]
    assert run["results"]["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))


def test_prefix_sharing_and_torch_dir_give_the_same_values(env, run):
    """Every MC pair again: without prefix sharing, and from the PyTorch directory with its HF tokenizer."""
    pairs = [run["lm"]._encode_pair(*a) for s in run["results"]["samples"]["tiny_mc"] for a in s["arguments"]]
    shared = run["lm"].loglikelihood_tokens(pairs)
    unshared = NucleusXLM(pretrained=env["flax"], batch_size=3, max_length=256,
                          share_prefix=False).loglikelihood_tokens(pairs)
    np.testing.assert_allclose([v for v, _ in shared], [v for v, _ in unshared], atol=1e-5, rtol=0)
    assert [g for _, g in shared] == [g for _, g in unshared]
    torch_lm = NucleusXLM(pretrained=env["torch"], batch_size=4, max_length=256)
    assert type(torch_lm.tokenizer).__name__ == "HFTokenizer"
    assert [torch_lm._encode_pair(*a) for s in run["results"]["samples"]["tiny_mc"] for a in s["arguments"]] == pairs
    np.testing.assert_allclose([v for v, _ in torch_lm.loglikelihood_tokens(pairs)], [v for v, _ in shared],
                               atol=1e-5, rtol=0)


def test_is_greedy_equals_a_direct_argmax(env, run):
    """The harness's is_greedy is whether every continuation token is the argmax of one parallel pass: true for
    the model's own greedy continuations, false once one token of them is changed, and as the argmax says for the
    multiple-choice pairs."""
    model, tok = env["model"], env["tok"]
    pairs = [run["lm"]._encode_pair(*a) for s in run["results"]["samples"]["tiny_mc"][:2] for a in s["arguments"]]
    for i in range(3):
        ctx = [tok.bos_id] + tok.encode(_text(i, 30 + 20 * i))
        greedy = gen.generate(model, np.asarray([ctx]), max_new_tokens=4, eos_token_id=[])[0, len(ctx):].tolist()
        pairs += [(ctx, greedy), (ctx, greedy[:-1] + [(greedy[-1] + 1) % VOCAB])]
    logp = _direct_logps(model, [list(c) + list(x) for c, x in pairs], "parallel")
    want = [all(np.argmax(logp[n, len(c) + t - 1]) == x[t] for t in range(len(x))) for n, (c, x) in enumerate(pairs)]
    assert [g for _, g in run["lm"].loglikelihood_tokens(pairs)] == want
    assert want[-6:] == [True, False] * 3


def test_chunkwise_contexts_give_the_parallel_values(env):
    """Contexts run chunkwise (past a threshold of 4 tokens; chunks of 16; left-padded batches) on a model with
    ``use_lm_decay`` and the default ``initializer_factor`` (small retention outputs: the per-head RMSNorm's
    epsilon keeps a per-row factor, so the reference's chunkwise rows show): with the default normalisation every
    loglikelihood, shared and not, equals the parallel pass over context and continuation within 1e-4."""
    config = env["model"].config.replace(use_lm_decay=True, initializer_factor=2**-2.5)
    rng = np.random.default_rng(5)
    contexts = [[1] + rng.integers(4, VOCAB, n).tolist() for n in (9, 23, 40, 57)]
    pairs = [(c, rng.integers(4, VOCAB, n).tolist()) for c in contexts for n in (1, 3, 6)]
    got = {}
    for norm in ("exact", "reference"):
        model = NucleusX(config.replace(chunkwise_normalization=norm), seed=3)
        for share in (True, False) if norm == "exact" else (True,):
            options = EvalOptions(batch_size=4, max_length=256, share_prefix=share, prompt_chunkwise_threshold=4)
            lm = NucleusXLM.from_model(model, env["tok"], options=options)
            got[norm, share] = np.asarray([v for v, _ in lm.loglikelihood_tokens(pairs)])
    logp = _direct_logps(model, [c + x for c, x in pairs], "parallel")
    want = [sum(logp[n, t - 1, (c + x)[t]] for t in range(len(c), len(c) + len(x))) for n, (c, x) in enumerate(pairs)]
    np.testing.assert_allclose(got["exact", True], want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["exact", False], want, atol=1e-4, rtol=0)
    assert np.max(np.abs(got["reference", True] - got["exact", True])) > 2e-5  # the reference's rows show


def test_rolling_perplexity_equals_one_parallel_pass(env, run):
    model, tok = env["model"], env["tok"]
    samples = run["results"]["samples"]["tiny_ppl"]
    docs = [[tok.bos_id] + tok.encode(s["doc"]["text"]) for s in samples]
    logp = _direct_logps(model, docs, "parallel")
    lengths = [len(d) for d in docs]
    for n, (s, ids) in enumerate(zip(samples, docs)):
        loss = -logp[n, np.arange(len(ids) - 1), ids[1:]].mean()
        assert -s["resps"][0][0] / (len(ids) - 1) == pytest.approx(loss, abs=1e-4)
    assert max(lengths) > 3 * 256 and min(lengths) < 256  # several windows, and a document in one window
    # One compiled window serves every document length: memory does not grow with the document.
    assert run["lm"].backend._window._cache_size() == 1


def test_generation_equals_generate_cut_at_stop(env, run):
    until = run["until"]
    samples = run["results"]["samples"]["tiny_gen"]
    assert len(samples) == 4 and samples[0]["doc"] == samples[3]["doc"]
    cut = 0
    for s in samples:
        full = _reference_generation(env["model"], env["tok"], s["doc"]["prompt"])
        want = full.split(until)[0]
        cut += want != full
        assert s["resps"][0][0] == want
    assert cut >= 1  # the stop string was applied


def test_cli_runs_the_harness(env, run, tmp_path, capsys):
    eval_main(["--model_args", f"pretrained={env['flax']},max_length=256", "--batch_size", "4", "--tasks", "tiny_mc",
               "--include_path", run["include"], "--output_path", str(tmp_path)])
    [path] = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.startswith("results")]
    with open(path) as f:
        acc = json.load(f)["results"]["tiny_mc"]["acc,none"]
    assert acc == run["results"]["results"]["tiny_mc"]["acc,none"]
    assert "tiny_mc" in capsys.readouterr().out


def test_cli_help_and_device_on_any_lm_eval(capsys):
    """The CLI works on the installed lm-eval (its command line changed in 0.4.10); --device is one error line."""
    done = subprocess.run([sys.executable, "-m", "nucleusx_jax.eval", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m nucleusx_jax.eval --model_args pretrained=DIR")
    assert "--tasks" in done.stdout and "--num_fewshot" in done.stdout
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--model_args", "pretrained=/nonexistent", "--device", "cuda:0", "--tasks", "tiny_mc"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --device cuda:0 is not supported")


def test_bad_input_errors(env, run):
    with pytest.raises(ValueError, match=r"unknown model argument\(s\) bogus; allowed: .*max_length"):
        lm_eval.simple_evaluate(model="nucleusx", model_args=f"pretrained={env['flax']},bogus=1",
                                tasks=["tiny_mc"], task_manager=TaskManager(include_path=run["include"]))
    short = NucleusXLM(pretrained=env["flax"], max_length=8)
    with pytest.raises(ValueError, match=r"max_length=8 .*truncation=true"):
        lm_eval.simple_evaluate(model=short, tasks=["tiny_mc"], task_manager=TaskManager(include_path=run["include"]))
    with pytest.raises(ValueError, match=r"no tokenizer for .*bare.*tokenizer=PATH"):
        NucleusXLM(pretrained=env["bare"])
    with pytest.raises(ValueError, match=r"batch_size='auto' is invalid"):
        NucleusXLM(pretrained=env["flax"], batch_size="auto")


def test_truncation_cuts_contexts_from_the_left(env):
    lm = NucleusXLM(pretrained=env["flax"], max_length=10, truncation=True)
    context, continuation = _text(30, 200), " end"
    ctx, cont = lm._encode_pair(context, continuation)
    [(value, _)] = lm.loglikelihood_tokens([(ctx[-(10 - len(cont)):], cont)])
    [(got, _)] = lm.loglikelihood([type("R", (), {"args": (context, continuation)})()], disable_tqdm=True)
    assert got == pytest.approx(value, abs=1e-6)


def test_lm_eval_tasks_during_training(env, run, tmp_path):
    """``lm_eval.every`` runs the tasks on the trainer's parameters and logs them (metrics.jsonl, split lm_eval);
    the last record equals the harness run on the exported final model."""
    from nucleusx_jax.train.config import load_config
    from nucleusx_jax.train.loop import run as train
    from nucleusx_jax.train.metrics import read_metrics

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = {k: v for k, v in env["model"].config.to_dict().items()
             if k in ("vocab_size", "decoder_embed_dim", "decoder_value_embed_dim", "decoder_ffn_embed_dim",
                      "decoder_layers", "decoder_retention_heads")}
    run_dir = str(tmp_path / "run")
    cfg = load_config(os.path.join(root, "configs", "tiny.yaml"), [
        f"train.run_dir={run_dir}", f"data.tokenizer={env['tok'].path}", f"data.vocab_size={VOCAB}",
        *[f"model.{k}={v}" for k, v in model.items()], "data.seq_len=32", "train.global_batch=4", "mesh.data=1",
        "train.steps=4", "train.eval_every=0", "checkpoint.every=0", "logging.every=1", "logging.sample_tokens=0",
        "logging.progress=false", "logging.plot=false", "lm_eval.every=2", "lm_eval.tasks=[tiny_mc]",
        f"lm_eval.include_path={run['include']}", "lm_eval.limit=2", "lm_eval.max_length=256"])
    train(cfg)
    records = read_metrics(run_dir, "lm_eval")
    assert [r["step"] for r in records] == [2, 4]
    final = lm_eval.simple_evaluate(model=NucleusXLM(pretrained=os.path.join(run_dir, "hf"), max_length=256),
                                    tasks=["tiny_mc"], task_manager=TaskManager(include_path=run["include"]),
                                    limit=2, bootstrap_iters=0)
    assert records[-1]["tiny_mc/acc"] == final["results"]["tiny_mc"]["acc,none"]
