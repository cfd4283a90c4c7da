"""Put this directory first on PYTHONPATH to make ``import transformers`` fail, in this process and every
subprocess: the core must work without transformers (``.ci/run`` runs the core tests this way)."""

raise ModuleNotFoundError("transformers is blocked by tests/without_transformers (the core must not need it)")
