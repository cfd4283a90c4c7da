"""Measure the errors behind the suite's numerical tolerances: runs the numerical tests with
``NUCLEUSX_MEASURE_ERRORS`` set (``assert_close`` then records every error instead of asserting) and prints,
per tolerance, the largest error seen over every fixture and parameter, the tolerance and their ratio (the
table of docs/testing.md). Exits 1 if an error reaches its tolerance or a tolerance is over 10x its error.

    PYTHONPATH=$PWD python tests/measure_tolerances.py [--records FILE] [TEST FILES ...]

``--records FILE`` keeps every recorded error (JSON lines: test, tolerance, error).
"""

import collections
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ["tests/test_parity.py", "tests/test_core.py", "tests/test_scan_layers.py", "tests/test_epsilons.py",
         "tests/test_hf.py", "tests/test_train_mesh.py", "tests/test_carry_train.py"]


def measure(files, records_file=None):
    """{tolerance name: (tolerance, relative, largest error, [tests])} from one pytest run of ``files``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = records_file or os.path.join(tmp, "errors.jsonl")
        if os.path.exists(out):
            os.remove(out)
        env = dict(os.environ, NUCLEUSX_MEASURE_ERRORS=out)
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                       cwd=os.path.dirname(HERE), env=env, check=False)
        with open(out) as f:
            records = [json.loads(line) for line in f]
    table = collections.OrderedDict()
    for r in records:
        value, relative, worst, tests = table.get(r["tol"], (r["value"], r["relative"], 0.0, set()))
        table[r["tol"]] = (value, relative, max(worst, r["error"]), tests | {r["test"].split("[")[0]})
    return table


def main(argv):
    records = None
    if argv[:1] == ["--records"]:
        records, argv = os.path.abspath(argv[1]), argv[2:]
    table = measure(argv or FILES, records)
    print("| tolerance | kind | tests | measured (largest) | tolerance | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    bad = []
    for name, (value, relative, worst, tests) in table.items():
        ratio = value / worst if worst else float("inf")
        names = ", ".join(sorted(t.split("::")[-1] for t in tests))
        files = sorted({t.split("::")[0].split("/")[-1] for t in tests})
        print(f"| `{name}` | {'relative' if relative else 'absolute'} | {', '.join(files)}: {names} | "
              f"{worst:.2g} | {value:.2g} | {ratio:.1f} |")
        if not 1 < ratio <= 10:
            bad.append(name)
    if bad:
        print(f"tolerances not within (1, 10] x their measured error: {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
