"""The suite checked on itself: each mutant (a plausible bug, put in with a monkeypatch) must make some of the
suite's own tests fail, run here in-process on their real fixtures (without a mutant the suite runs the same
tests, which pass).

* ``rms_norm_eps`` x 4 and ``groupnorm_eps`` x 4 at config load (``NucleusXConfig.from_dict``, ours and
  transformers'): caught by tests/test_epsilons.py's float64 comparison on every generated config. The
  public-fixture parity tests of tests/test_parity.py are run too and their verdict is printed (4x
  ``rms_norm_eps`` moves the logits there by ~1e-6: the fixtures alone hardly see it).
* the server's sampler ignoring ``temperature``, or ``top_p``: caught by tests/test_sampler.py's frequencies."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import nucleusx_jax
from nucleusx_jax import configuration
from nucleusx_jax.serve import engine

import reference64
import test_epsilons
import test_parity
import test_sampler
from conftest import FIXTURE_NAMES, FIXTURES, load_cases


def eps_mutant(monkeypatch, field):
    """Multiply ``field`` by 4 in every config loaded: ``from_dict`` of our NucleusXConfig (which its
    ``from_pretrained`` calls) and of transformers' (which ``AutoConfig`` and its ``from_pretrained`` call)."""
    def wrap(cls):
        original = cls.from_dict

        def from_dict(*args, **kwargs):
            out = original(*args, **kwargs)
            config = out[0] if isinstance(out, tuple) else out
            setattr(config, field, getattr(config, field) * 4)
            return out
        monkeypatch.setattr(cls, "from_dict", from_dict)

    wrap(configuration.NucleusXConfig)
    try:
        from nucleusx_jax import hf
    except ImportError:  # tests/without_transformers
        return
    wrap(hf.NucleusXConfig)


def sampler_mutant(monkeypatch, ignored):
    """The server's sampler with ``temperature`` (or ``top_p``) treated as 1 for every sampled row."""
    original = engine.sample

    def sample(logits, rows, count):
        value = getattr(rows, ignored)
        if ignored == "temperature":  # 0 still means greedy
            value = jnp.where(value > 0, 1.0, 0.0)
        else:
            value = jnp.ones_like(value)
        return original(logits, rows._replace(**{ignored: value}), count)

    monkeypatch.setattr(engine, "sample", sample)


def failures(checks):
    """The names of the checks (name -> callable running real test code) that fail."""
    failed = []
    for name, check in checks.items():
        try:
            check()
        except AssertionError:
            failed.append(name)
    return failed


def epsilon_checks(tmp_path):
    """test_epsilons' float64 comparison on each generated config, and test_parity's logits and cache checks on
    each public fixture, models loaded (under whatever mutant is active) from their directories."""
    checks = {}
    for case in sorted(test_epsilons.CASES):
        def run(case=case):
            directory = tmp_path / case
            directory.mkdir(exist_ok=True)
            state, config = test_epsilons.generated(case, directory)
            ids = load_cases(test_epsilons.CASES[case][0])["input_ids"]
            test_epsilons.test_parallel_and_recurrent_logits_equal_the_float64_reference(
                (case, directory, reference64.logits(state, config, ids), ids))
        checks[f"test_epsilons[{case}]"] = run
    for name in FIXTURE_NAMES:
        def run(name=name):
            model = nucleusx_jax.from_pretrained(FIXTURES / name)
            test_parity.test_parallel_logits_and_cache((name, model, load_cases(name)))
        checks[f"test_parity.test_parallel_logits_and_cache[{name}]"] = run
    return checks


def sampler_checks():
    return {f"test_sampler[{s}]": (lambda s=s: test_sampler.test_token_frequencies_follow_the_filtered_probabilities(s))
            for s in test_sampler.SETTINGS}


@pytest.mark.parametrize("field", ["rms_norm_eps", "groupnorm_eps"])
def test_epsilon_x4_at_config_load_is_caught(field, monkeypatch, tmp_path):
    eps_mutant(monkeypatch, field)
    assert getattr(nucleusx_jax.from_pretrained(FIXTURES / FIXTURE_NAMES[0]).config, field) == 4e-6  # in place
    failed = failures(epsilon_checks(tmp_path))
    print(f"{field} x4 caught by: {json.dumps(failed)}")
    assert {f"test_epsilons[{case}]" for case in test_epsilons.CASES} <= set(failed), failed


@pytest.mark.parametrize("ignored", ["temperature", "top_p"])
def test_sampler_ignoring_a_setting_is_caught(ignored, monkeypatch):
    sampler_mutant(monkeypatch, ignored)
    failed = failures(sampler_checks())
    print(f"sampler ignoring {ignored} caught by: {json.dumps(failed)}")
    changed = [f"test_sampler[{s}]" for s in test_sampler.SETTINGS
               if not np.allclose(test_sampler.probabilities(test_sampler.LOGITS, *s),
                                  test_sampler.probabilities(test_sampler.LOGITS, *(
                                      (1.0, s[1], s[2]) if ignored == "temperature" else (s[0], s[1], 1.0))))]
    assert changed and set(changed) <= set(failed), (changed, failed)  # every setting the bug changes
