"""The command-line tools: each runs as ``python -m nucleusx_jax.<tool>`` and as the console script that
pyproject.toml's ``[project.scripts]`` names, and a wrongly typed config value is one ``error:`` line."""

import importlib
import io
import os
import subprocess
import sys

import pytest
import sentencepiece as spm
from pydoc_data.topics import topics

from nucleusx_jax.cli import reports_user_errors
from nucleusx_jax.train.__main__ import main as train_main

from conftest import FIXTURES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "configs", "tiny.yaml")
# each tool's module under nucleusx_jax (``python -m nucleusx_jax.<module>``; its script is nucleusx-<tool>)
TOOLS = {"train": "train", "convert": "convert", "generate": "generate", "data": "data", "eval": "eval",
         "serve": "serve", "positions": "eval.positions"}
NEEDS = {"eval": "lm_eval", "serve": "fastapi"}  # optional extras a tool imports


def scripts():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def run(args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
                          **kw)


def skip_without_extra(tool):
    if tool in NEEDS:
        pytest.importorskip(NEEDS[tool], exc_type=ImportError)


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_runs_as_a_module(tool):
    skip_without_extra(tool)
    result = run(["-m", f"nucleusx_jax.{TOOLS[tool]}", "--help"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: python -m nucleusx_jax.{TOOLS[tool]}"), result.stdout[:200]


def test_every_tool_has_an_entry_point_that_resolves_to_a_callable():
    entries = scripts()
    assert set(entries) == {f"nucleusx-{tool}" for tool in TOOLS}
    for name, target in entries.items():
        if name.removeprefix("nucleusx-") in NEEDS:
            skip_without_extra(name.removeprefix("nucleusx-"))
        module, _, attribute = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), target


@pytest.mark.parametrize("tool", TOOLS)
def test_entry_points_run_as_console_scripts(tool):
    """What pip's generated script does: ``sys.exit(entry())`` with the tool's name as ``argv[0]``."""
    skip_without_extra(tool)
    module, _, attribute = scripts()[f"nucleusx-{tool}"].partition(":")
    code = (f"import sys; sys.argv = ['nucleusx-{tool}', '--help']; from {module} import {attribute}; "
            f"sys.exit({attribute}())")
    result = run(["-c", code])
    assert result.returncode == 0 and result.stdout.startswith("usage: "), result.stderr[-2000:]


@pytest.mark.slow
def test_generate_entry_point_exits_zero_with_the_module_output(tmp_path):
    """The completion goes to stdout once and the status is 0 (``generate.main`` returns the text, which
    ``sys.exit`` would print to stderr with status 1); the output equals ``python -m nucleusx_jax.generate``'s."""
    lines = [line for name in sorted(topics)[:40] for line in topics[name].splitlines() if line.strip()][:600]
    model = io.BytesIO()  # as many pieces as the model's vocabulary: every generated id decodes
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=256,
                                   model_type="bpe", character_coverage=0.995, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    argv = [os.path.join(FIXTURES, "nucleus_x_tiny"), "--tokenizer", str(tmp_path / "tokenizer.model"), "--prompt",
            "The return statement", "--max-new-tokens", "5"]
    module, _, attribute = scripts()["nucleusx-generate"].partition(":")
    script = run(["-c", f"import sys; sys.argv = ['nucleusx-generate', *{argv!r}]; from {module} import "
                        f"{attribute}; sys.exit({attribute}())"])
    as_module = run(["-m", "nucleusx_jax.generate", *argv])
    assert as_module.returncode == 0, as_module.stderr[-2000:]
    assert script.returncode == 0, script.stderr[-2000:]
    assert script.stdout == as_module.stdout and script.stdout.endswith("\n")


def test_a_wrongly_typed_config_value_is_one_line_from_the_real_cli():
    result = run(["-m", "nucleusx_jax.train", "--config", TINY_YAML, "--set", "train.steps=[1]"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == "error: train.steps: expected int, got list [1]\n"


@pytest.mark.parametrize("override, message", [
    ("model.path=[1]", "model.path: expected str, got list [1]"),  # was a TypeError from os.fspath
    ("model.generic=1", "unknown key(s) ['generic'] in section 'model'"),  # was a TypeError from NucleusXConfig
    ("model.decoder_layers={a: 1}", "model.decoder_layers: expected int, got dict {'a': 1}"),
    ("data.sources=5", "data.sources: expected list of str, got int 5"),
])
def test_wrongly_typed_values_are_user_errors(override, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_main(["--config", TINY_YAML, "--set", override])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_type_error_from_a_bug_keeps_its_traceback():
    with pytest.raises(TypeError, match="has no len"):
        reports_user_errors(lambda: len(5))()


@pytest.mark.parametrize("options, message", [
    ({"seed": "abc"}, "seed='abc' is invalid: must be an integer >= 0"),
    ({"prompt_chunkwise_threshold": "abc"}, "prompt_chunkwise_threshold='abc' is invalid: must be an integer >= 1"),
])
def test_eval_options_refuse_wrongly_typed_values(options, message):
    harness = pytest.importorskip("nucleusx_jax.eval.harness", exc_type=ImportError)
    with pytest.raises(ValueError, match=f"^{message}$"):
        harness.EvalOptions(**options)
