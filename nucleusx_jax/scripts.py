"""Console scripts (``[project.scripts]`` in pyproject.toml) for the tools whose ``main`` returns something
other than an exit status; the others point at their ``main`` directly."""

from .generate import main as generate_main


def generate() -> int:
    """``nucleusx-generate``: :func:`nucleusx_jax.generate.main`, whose return value (the completion, already
    printed) is not an exit status."""
    generate_main()
    return 0
