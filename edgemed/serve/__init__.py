"""Serve an export offline with an OpenAI-compatible API, and ask it one question from the terminal.

``serve(config)`` runs ``create_app(config)`` under uvicorn. The package, by concern:

- ``config``: ServeConfig, the settings refused, and who may call (loopback, Host and Origin rules);
- ``schema``: the OpenAI request models, how a body is read, and the OpenAI-shaped error (ApiError);
- ``images``: images from data: URLs and allowed local paths; ``prompts``: a request made into a prompt;
- ``admission``: slots, the bounded queue and the ticket each request holds; ``models``: the model instances;
- ``generation``: the worker threads and the answers (whole or streamed); ``metrics``: the Prometheus registry;
- ``app``: the FastAPI app and its endpoints, ``serve`` and ``ask``.
"""

from __future__ import annotations

from edgemed.serve.app import ask, create_app, serve
from edgemed.serve.config import ServeConfig, check_config, host_allowed, origin_allowed, parse_adapters
from edgemed.serve.images import decode_image
from edgemed.serve.schema import ChatRequest, CompletionRequest

__all__ = ["ChatRequest", "CompletionRequest", "ServeConfig", "ask", "check_config", "create_app", "decode_image",
           "host_allowed", "origin_allowed", "parse_adapters", "serve"]
