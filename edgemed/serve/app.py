"""The FastAPI app: endpoints, authentication, error answers, and the two entry points (``serve``, ``ask``).

Offline by construction: the process sets the hub's offline switches before any model is loaded, no endpoint
fetches a URL (remote image URLs are refused), and a local image path is read only under an ``--allow-dir``.
The server binds 127.0.0.1 unless told otherwise, and refuses any other address without an API key.

Limits: the request body size, an image's pixel count (checked from its header, before decoding), ``max_tokens``,
a bounded queue (429 when full), a per-request timeout (504), and a client that disconnects stops its
generation within one token. Every error is OpenAI-shaped JSON: ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request  # at run time: FastAPI resolves the endpoints' annotations from this module
from starlette.exceptions import HTTPException

from edgemed.backends import open_model
from edgemed.errors import DataError
from edgemed.limits import gen_params
from edgemed.serve.admission import Gate
from edgemed.serve.config import WILDCARDS, FrontDoor, ServeConfig, check_config
from edgemed.serve.generation import Job, Worker
from edgemed.serve.metrics import Metrics, outcome_of
from edgemed.serve.models import Models, open_models
from edgemed.serve.prompts import parse
from edgemed.serve.schema import ApiError

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.responses import Response

    from edgemed.backends.base import Backend

log = logging.getLogger("edgemed.serve")


class Service:
    """One app's state (its models, gate, metrics and worker) and its endpoints, registered by ``routes``."""

    def __init__(self, config: ServeConfig, models: Models):
        self.config, self.models = config, models
        self.gate = Gate(models.slots, config.max_queue)
        self.metrics = Metrics(self.gate)
        self.worker = Worker(models, self.gate, self.metrics, config.request_timeout)
        self.created = int(time.time())

    @property
    def model_id(self) -> str:
        return self.models.model_id

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        yield
        self.worker.shutdown()
        self.models.close()

    def routes(self, app: FastAPI) -> None:
        app.add_exception_handler(HTTPException, self.http_error)
        app.add_exception_handler(Exception, self.internal_error)
        for path, endpoint, method in (("/health", self.health, "GET"), ("/v1/models", self.list_models, "GET"),
                                       ("/metrics", self.metrics_page, "GET"),
                                       ("/v1/chat/completions", self.chat, "POST"),
                                       ("/v1/completions", self.completions, "POST")):
            app.add_api_route(path, endpoint, methods=[method], response_model=None)

    # ------------------------------------------------------------------ errors and keys
    def error(self, e: ApiError) -> Response:
        from fastapi.responses import JSONResponse

        self.metrics.ended(outcome_of(e.status))
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return self.error(ApiError(exc.status_code, str(exc.detail), code))

    async def internal_error(self, request: Request, exc: Exception) -> Response:
        log.exception("internal error")
        return self.error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error"))

    def refused(self, request: Request) -> Response | None:
        """A 401 unless the request carries the API key (when the server has one)."""
        key = self.config.api_key
        if not key:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return None
        return self.error(ApiError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'",
                                   "invalid_api_key", "authentication_error"))

    # ------------------------------------------------------------------ endpoints
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_id, "backend": self.models.base.name,
                "queue_depth": self.gate.waiting, "running": self.gate.running}

    async def list_models(self, request: Request) -> Any:
        if (no := self.refused(request)) is not None:
            return no
        return {"object": "list", "data": [{"id": mid, "object": "model", "created": self.created,
                                            "owned_by": "edgemed"} for mid in self.models.ids()]}

    async def metrics_page(self, request: Request) -> Any:
        """JSON by default; ``?format=prometheus`` gives the Prometheus text format for a scraper."""
        if (no := self.refused(request)) is not None:
            return no
        if request.query_params.get("format") == "prometheus":
            from starlette.responses import Response

            body, content_type = self.metrics.exposition(request.headers.get("accept", ""))
            return Response(body, media_type=content_type)
        return self.metrics.snapshot()

    async def chat(self, request: Request) -> Any:
        return await self.answer(request, "chat")

    async def completions(self, request: Request) -> Any:
        return await self.answer(request, "text")

    async def answer(self, request: Request, kind: str) -> Any:
        """One request to either endpoint: parse, queue, then a whole answer or a stream."""
        arrived = time.monotonic()
        self.metrics.arrived()
        if (no := self.refused(request)) is not None:
            return no
        ticket = None
        streaming = False
        try:
            prompt = await parse(request, kind, self.models.base, self.config)
            adapter = self.models.route(prompt.model)
            ticket = self.gate.ticket()
            job = Job(prompt, ticket, arrived, arrived + self.config.request_timeout, adapter or self.model_id,
                      adapter)
            watcher = asyncio.ensure_future(_watch_disconnect(request))
            try:
                await _race(ticket.admit(job.deadline, self.config.request_timeout), watcher)
                if prompt.stream:
                    streaming = True
                    return _streaming_response(self.worker.events(job, request), ticket.close)
                return await _race(self.worker.whole(job), watcher)
            finally:
                watcher.cancel()
        except ApiError as e:
            return self.error(e)
        except _Disconnected:
            from fastapi.responses import JSONResponse

            self.metrics.ended("cancelled")
            return JSONResponse({"error": {"message": "client disconnected", "type": "cancelled",
                                           "code": "client_disconnected", "param": None}}, status_code=499)
        finally:
            if ticket is not None and not streaming:
                ticket.close()


class _Disconnected(Exception):
    pass


async def _watch_disconnect(request: Request) -> None:
    """Return when the client goes away (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _race(work, watcher: asyncio.Future):
    """Await ``work`` unless the client disconnects first (then cancel it and raise _Disconnected)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise _Disconnected


def _streaming_response(body: AsyncIterator[str], on_close: Callable[[], None]) -> Response:
    """A StreamingResponse that runs ``on_close`` however it ends, even if its body never started."""
    from starlette.responses import StreamingResponse

    class _Stream(StreamingResponse):
        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                with contextlib.suppress(Exception):
                    await body.aclose()  # runs the generator's cleanup (stop the model) if it was started
                on_close()

    return _Stream(body, media_type="text/event-stream",
                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(config: ServeConfig, backend: Backend | None = None) -> FastAPI:
    """The FastAPI app serving ``config.export_dir`` (or ``backend``, already open, which the caller closes)."""
    from fastapi import FastAPI

    from edgemed import __version__

    check_config(config)
    service = Service(config, open_models(config, backend))
    app = FastAPI(title="edgemed", version=__version__, lifespan=service.lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.edgemed = service
    app.add_middleware(FrontDoor, config=config)
    service.routes(app)
    return app


# ---------------------------------------------------------------------------------------------- entry points
def serve(config: ServeConfig) -> None:
    """Check the settings, open the export and serve it with uvicorn until interrupted."""
    import uvicorn

    from edgemed.console import log_path, user_err

    check_config(config)
    if config.host in WILDCARDS and not config.allow_hosts:
        log.warning("listening on %s, but only loopback Host names are accepted: give --allow-host NAME for each "
                    "name or address clients use to reach this machine", config.host or "all addresses")
    app = create_app(config)
    log.info("serving %s on http://%s:%d", config.export_dir, config.host, config.port)
    print(f"serving {config.export_dir} on http://{config.host}:{config.port}/v1 (Ctrl-C stops)"
          + (f"; server log: {log_path()}" if log_path() else ""), file=user_err(), flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", access_log=False,
                timeout_graceful_shutdown=5)


def ask(export_dir: Path | str, question: str, image: Path | str | None = None, system: str | None = None,
        max_tokens: int = 128, temperature: float = 0.0, seed: int | None = None, n_threads: int | None = None,
        chat_template: str | None = None) -> Iterator[str]:
    """Stream the answer to one question (about an optional PNG, JPEG or DICOM file) from an export.

    A model without a chat template (and no ``chat_template`` given) continues the question as plain text.
    """
    from edgemed.data import load_image

    params = gen_params(max_tokens, temperature, 1.0, seed)  # the same limits as a request to the server
    kw: dict[str, Any] = {"n_threads": n_threads} if n_threads else {}
    backend = open_model(export_dir, verify=False, chat_template=chat_template, **kw)
    try:
        pil = None
        if image is not None:  # DICOM rendered as the family was trained (MedGemma: three CT windows)
            pil = load_image(image, max_pixels=ServeConfig(export_dir=Path(export_dir)).max_image_pixels,
                             render=backend.arch.dicom_render)
        if pil is not None and not backend.is_vision:
            raise DataError(f"{export_dir} is a text model and takes no image; ask without --image")
        prompt = backend.render(question, image=pil is not None, system=system)
        yield from backend.generate(prompt, pil, params)
    finally:
        backend.close()
