"""Serving: an OpenAI-compatible HTTP server over a continuous-batching engine on the fixed-size state.

* :mod:`.backend`: the one place that loads the model and calls it (prefill, one recurrent step);
* :mod:`.engine`: the slots, the compiled step, per-request sampling, the bounded queue (no HTTP);
* :mod:`.api`: the FastAPI app (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``);
* :mod:`.text`: generated ids -> text in O(1) work per token (incremental detokenizing, stop strings);
* :mod:`.guard`: the API key, the request-size limit, connection limits and timeouts (uvicorn's config);
* :mod:`.cli`: ``python -m nucleusx_jax.serve MODEL_DIR [--host 127.0.0.1 --port 8000 --max-batch 32]``.

Needs the ``serve`` extra (fastapi, uvicorn).
"""

from .api import create_app, plain_chat_prompt
from .backend import Backend, load_backend
from .engine import Engine, EngineStopped, Event, QueueFull, RequestError, SamplingParams

__all__ = ["Backend", "Engine", "EngineStopped", "Event", "QueueFull", "RequestError", "SamplingParams", "create_app",
           "load_backend", "plain_chat_prompt"]
