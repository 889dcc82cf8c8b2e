"""Serve an export offline with an OpenAI-compatible API, and ask it one question from the terminal.

``/v1/chat/completions`` renders conversations with the model's chat template; ``/v1/completions`` continues a
plain text prompt, which is how a base model (no chat template) is used. Chat on a base model is refused with
a 400 that says so, unless ``--chat-template FILE`` gave it a template.

``serve(config)`` runs ``create_app(config)`` under uvicorn. The runtime follows from the folder's manifest
(``edgemed.backends.open_model``): GGUF through llama.cpp, ONNX through onnxruntime, a model or run folder
through PyTorch. A plain transformers folder (config.json, no manifest) is served through PyTorch, unverified.

Offline by construction: the process sets the hub's offline switches before any model is loaded, no endpoint
fetches a URL (remote image URLs are refused), and a local image path is read only under an ``--allow-dir``.
The server binds 127.0.0.1 unless told otherwise, and refuses any other address without an API key.

Limits: the request body size, an image's pixel count (checked from its header, before decoding), ``max_tokens``,
a bounded queue (429 when full), a per-request timeout (504), and a client that disconnects stops its
generation within one token. Every error is OpenAI-shaped JSON: ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlparse

from fastapi import Request  # at run time: FastAPI resolves the endpoints' annotations from this module
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgemed import prompting
from edgemed.backends import open_model
from edgemed.backends.base import GenParams
from edgemed.errors import DataError, EdgemedError, ServeError
from edgemed.limits import (
    DEFAULT_MAX_TOKENS_CAP,
    MAX_JSON_DEPTH,
    LimitError,
    MaxTokens,
    Seed,
    Temperature,
    TopP,
    gen_params,
    json_depth_ok,
)

if TYPE_CHECKING:
    from fastapi import FastAPI
    from PIL import Image

    from edgemed.backends.base import Backend

log = logging.getLogger("edgemed.serve")

IMAGE_MIMES = ("image/png", "image/jpeg", "image/jpg", "application/dicom")
SUFFIX_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".dcm": "application/dicom",
               ".dicom": "application/dicom"}


@dataclass
class ServeConfig:
    """Everything ``edgemed serve`` takes; the defaults are the safe ones."""

    export_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_concurrency: int = 1  # generations at once: one replica of the model per slot when the server opens it
    max_queue: int = 16  # requests waiting for a slot; one more is answered 429
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP
    request_timeout: float = 120.0  # seconds from arrival to the last token, queueing included
    allow_dirs: list[Path] = field(default_factory=list)  # folders from which file:// images may be read
    verify: bool = True  # check the bundle's files against its manifest before serving
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 50_000_000  # width x height; larger images are refused before decoding
    n_threads: int | None = None  # CPU threads of the runtime (default: the runtime's choice)
    allow_hosts: list[str] = field(default_factory=list)  # Host names accepted beside loopback ("*": any)
    allow_origins: list[str] = field(default_factory=list)  # browser origins allowed to call the API ("*": any)
    chat_template: str | None = None  # template text replacing the export's (--chat-template FILE)


# ---------------------------------------------------------------------------------------------- settings
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_config(config: ServeConfig) -> None:
    """Refuse settings that would expose the model or cannot work, all problems at once."""
    problems = []
    if not _is_loopback(config.host) and not config.api_key:
        problems.append(f"--host {config.host} is not a loopback address; serving beyond this machine needs "
                        "--api-key KEY (or EDGEMED_API_KEY), or bind 127.0.0.1")
    for name in ("max_concurrency", "max_tokens_cap", "max_body_bytes", "max_image_pixels"):
        if getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.max_queue < 0:
        problems.append(f"--max-queue must be 0 or more, got {config.max_queue}")
    if config.request_timeout <= 0:
        problems.append(f"--timeout must be positive seconds, got {config.request_timeout}")
    if not 0 <= config.port <= 65535:
        problems.append(f"--port must be 0-65535, got {config.port}")
    for d in config.allow_dirs:
        if not Path(d).is_dir():
            problems.append(f"--allow-dir {d} is not a folder")
    for o in config.allow_origins:
        if o != "*" and (not (urlparse(o).scheme and urlparse(o).netloc) or o.endswith("/")):
            problems.append(f"--allow-origin {o!r} is not an origin; write scheme://host[:port], e.g. "
                            "http://localhost:3000, with no path")
    if problems:
        raise ServeError("cannot serve: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- images
def decode_image(data: bytes, mime: str, max_pixels: int) -> Image.Image:
    """PNG, JPEG or DICOM bytes as an RGB image, windowed as in training; pixel count checked before decoding."""
    from edgemed.data import load_image_bytes

    return load_image_bytes(data, mime, max_pixels=max_pixels, name="the image_url image")


def image_from_url(url: str, config: ServeConfig) -> Image.Image:
    """An image from a ``data:`` URL, or a local path (``file://`` or plain) under one of the allowed folders."""
    if url.startswith("data:"):
        head, sep, payload = url[5:].partition(",")
        if not sep or not head.endswith(";base64"):
            raise _Api(400, "image_url data URLs must be base64: data:image/png;base64,...", "invalid_image_url")
        mime = head[: -len(";base64")].lower() or "image/png"
        if mime not in IMAGE_MIMES:
            raise _Api(400, f"image type {mime!r} is not accepted; send one of {', '.join(IMAGE_MIMES)}",
                       "unsupported_image_type")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise _Api(400, f"the image's base64 payload is invalid ({e})", "invalid_base64") from e
        return _image_or_400(data, mime, config)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "ftp"):
        raise _Api(400, "remote image URLs are not fetched (this server is offline); send the image as a "
                   "base64 data: URL", "remote_url_refused")
    if parsed.scheme not in ("file", ""):
        raise _Api(400, f"image URL scheme {parsed.scheme!r} is not accepted; use data: URLs", "invalid_image_url")
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else url)
    if not config.allow_dirs:
        raise _Api(403, "local image paths are not allowed on this server (start it with --allow-dir FOLDER); "
                   "send the image as a base64 data: URL", "path_not_allowed")
    try:
        real = path.resolve()  # links followed: a link inside an allowed folder cannot point out of it
    except (OSError, RuntimeError):
        raise _Api(400, f"image path {path} cannot be resolved", "invalid_image_url") from None
    # checked before existence, so that nothing can be learnt about files outside the allowed folders
    if not path.is_absolute() or not any(real.is_relative_to(Path(d).resolve()) for d in config.allow_dirs):
        raise _Api(403, f"image file {path} is outside the allowed folders", "path_not_allowed")
    if not real.is_file():
        raise _Api(404, f"image file {path} does not exist", "image_not_found")
    if real.stat().st_size > config.max_body_bytes:
        raise _Api(413, f"image file {path} is larger than {config.max_body_bytes} bytes", "image_too_large")
    return _image_or_400(real.read_bytes(), SUFFIX_MIME.get(real.suffix.lower(), "image/png"), config)


def _image_or_400(data: bytes, mime: str, config: ServeConfig) -> Image.Image:
    try:
        return decode_image(data, mime, config.max_image_pixels)
    except DataError as e:
        code = "image_too_large" if "pixels" in str(e) and "limit" in str(e) else "invalid_image"
        raise _Api(413 if code == "image_too_large" else 400, str(e), code) from None


# ---------------------------------------------------------------------------------------------- the front door
LOOPBACK_NAMES = ("localhost",)
_WILDCARDS = ("0.0.0.0", "::", "")


def _host_name(host_header: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8080`` -> ``::1``, ``localhost:8080`` -> ``localhost``."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def host_allowed(host_header: str | None, config: ServeConfig) -> bool:
    """Whether a request's Host names this server: loopback names, the bound address, or an --allow-host.

    A DNS-rebinding page reaches 127.0.0.1 under its own domain name, and its requests carry that name as Host;
    refusing unknown names is what makes such a page unable to read answers.
    """
    if host_header is None:  # HTTP/1.0 without Host: not a browser, which always sends it
        return True
    name = _host_name(host_header)
    allowed = [h.lower() for h in config.allow_hosts]
    if "*" in allowed or name in allowed or name.endswith(".localhost") or name in LOOPBACK_NAMES:
        return True
    if config.host not in _WILDCARDS and name == _host_name(config.host):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def origin_allowed(origin: str, config: ServeConfig) -> bool:
    """Whether a browser page from ``origin`` may call the API: only origins listed with --allow-origin."""
    return "*" in config.allow_origins or origin.rstrip("/") in config.allow_origins


class FrontDoor:
    """ASGI middleware in front of every endpoint: Host and Origin checks, and CORS for the listed origins.

    Written as plain ASGI (not Starlette's BaseHTTPMiddleware) so that streamed answers and disconnect
    detection pass through untouched. Refusals are OpenAI-shaped JSON with status 403.
    """

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host, origin = headers.get("host"), headers.get("origin")
        if not host_allowed(host, self.config):
            return await self._refuse(send, f"Host {host!r} is not a name of this server; only loopback names are "
                                      "accepted (start it with --allow-host NAME to accept another)", "host_refused")
        fetch_site = headers.get("sec-fetch-site", "")
        if origin is not None and not origin_allowed(origin, self.config) or (
                origin is None and fetch_site in ("cross-site", "same-site")):
            return await self._refuse(send, f"cross-origin requests from {origin or 'another site'!r} are refused; "
                                      "list the origin with --allow-origin (or EDGEMED_ORIGINS) to allow a web app",
                                      "origin_refused")
        if origin is not None and scope["method"] == "OPTIONS":  # a CORS preflight from an allowed origin
            return await self._respond(send, 204, b"", self._cors(origin) + [
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", b"authorization, content-type"),
                (b"access-control-max-age", b"600")])
        if origin is None:
            return await self.app(scope, receive, send)
        cors = self._cors(origin)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        return await self.app(scope, receive, send_with_cors)

    @staticmethod
    def _cors(origin: str) -> list[tuple[bytes, bytes]]:
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]

    async def _refuse(self, send, message: str, code: str) -> None:
        log.warning("refused a request: %s", code)  # the reason only: no header values or body in the log
        body = json.dumps(_Api(403, message, code, "permission_error").body()).encode()
        await self._respond(send, 403, body, [(b"content-type", b"application/json")])

    @staticmethod
    async def _respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------- requests
class _ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    url: str
    detail: str | None = None


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: _ImageURL | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part] | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat completion request this server honours; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    messages: list[_Message] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature = 0.0  # greedy unless asked: answers are reproducible
    top_p: TopP = 1.0
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)


class CompletionRequest(BaseModel):
    """The fields of an OpenAI (legacy) text completion request this server honours; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    echo: bool = False
    n: int = Field(default=1, ge=1, le=1)


class _Api(Exception):
    """An answer other than 200: HTTP status and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, code: str, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": None}}


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:8]:
        where = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


@dataclass
class _Prompt:
    text: str
    image: Image.Image | None
    params: GenParams
    stream: bool
    include_usage: bool
    kind: str = "chat"  # "chat" (chat.completion objects) or "text" (text_completion objects)
    echo: str = ""  # a completion's prompt, sent before its answer when asked (echo)


def _text_of(content: str | list[_Part] | None, images: list[str]) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type == "text":
            if part.text is None:
                raise _Api(400, "a text content part needs 'text'", "invalid_content")
            texts.append(part.text)
        else:
            if part.image_url is None:
                raise _Api(400, "an image_url content part needs 'image_url': {'url': ...}", "invalid_content")
            images.append(part.image_url.url)
    return "\n".join(texts)


def build_prompt(req: ChatRequest, backend: Backend, config: ServeConfig) -> _Prompt:
    """The rendered prompt, image and decoding settings of one request.

    One user message (and an optional system message) is rendered by ``backend.render``, exactly as a direct
    call renders it. A conversation with history is rendered with the model's own chat template, with the image
    in the user turn that carried it.
    """
    system_parts, turns, images = [], [], []  # turns: (role, text, carries the image)
    for m in req.messages:
        found: list[str] = []
        text = _text_of(m.content, found)
        if m.role in ("system", "developer"):
            if turns:
                raise _Api(400, "a system message must come before the conversation", "invalid_conversation")
            system_parts.append(text)
        else:
            turns.append((m.role, text, bool(found)))
        if found and m.role != "user":
            raise _Api(400, f"images belong in a user message, not a {m.role} message", "invalid_content")
        images += found
    if not turns or turns[-1][0] != "user":
        raise _Api(400, "the last message must be the user's question", "invalid_conversation")
    if not prompting.has_template(getattr(backend, "processor", None)):
        raise _Api(400, "this model has no chat template (a base model): send a plain text prompt to "
                   "/v1/completions, or restart the server with --chat-template FILE", "no_chat_template")
    if len(images) > 1:
        raise _Api(400, f"one image per request is supported (got {len(images)})", "too_many_images")
    if images and not backend.is_vision:
        raise _Api(400, "this model is a text model and takes no image; send text only", "image_not_supported")
    params = _params(req.max_completion_tokens or req.max_tokens, req.temperature, req.top_p, req.seed, req.stop,
                     config)
    image = image_from_url(images[0], config) if images else None
    system = "\n".join(p for p in system_parts if p) or None
    try:
        if len(turns) == 1:
            text = backend.render(turns[0][1], image=image is not None, system=system)
        else:
            text = _render_history(backend, system, turns)
    except EdgemedError as e:
        raise _Api(400, str(e), "invalid_prompt") from None
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _Prompt(text, image, params, req.stream, include_usage)


def _params(max_tokens: int | None, temperature: float, top_p: float, seed: int | None,
            stop: str | list[str] | None, config: ServeConfig) -> GenParams:
    """Decoding settings through the limits every front end shares (edgemed.limits), or a 400."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    try:
        return gen_params(max_tokens or config.max_tokens_cap, temperature, top_p, seed, stops,
                          cap=config.max_tokens_cap)
    except LimitError as e:
        raise _Api(400, str(e), e.code) from None


def build_completion(req: CompletionRequest, config: ServeConfig) -> _Prompt:
    """The prompt and decoding settings of one text completion: the prompt text as given, no template."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise _Api(400, f"one prompt per request is supported (got {len(prompts)})", "too_many_prompts")
    if not prompts[0]:
        raise _Api(400, "prompt is empty; send the text to continue", "invalid_prompt")
    params = _params(req.max_tokens, req.temperature, req.top_p, req.seed, req.stop, config)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _Prompt(prompts[0], None, params, req.stream, include_usage, kind="text",
                   echo=prompts[0] if req.echo else "")


def _render_history(backend: Backend, system: str | None, turns: list[tuple[str, str, bool]]) -> str:
    """A whole conversation through the chat template of the processor or tokenizer the backend renders with."""
    from edgemed import prompting

    owner = getattr(backend, "processor", None)
    if owner is None or not hasattr(owner, "apply_chat_template"):
        raise _Api(400, f"the {getattr(backend, 'name', '?')} runtime answers single questions only; send an "
                   "optional system message and one user message", "unsupported_conversation")
    typed = backend.is_vision  # image models' templates take typed content, text models' plain strings

    def content(text: str, image: bool = False) -> Any:
        return ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}] if typed else text

    msgs = [{"role": "system", "content": content(system)}] if system else []
    msgs += [{"role": role, "content": content(text, image)} for role, text, image in turns]
    try:
        return prompting.render(owner, msgs)
    except Exception as e:  # the template's own refusal (e.g. roles must alternate), from jinja
        raise _Api(400, f"the model's chat template refused this conversation: {e}", "invalid_conversation"
                   ) from None


# ---------------------------------------------------------------------------------------------- state
class _QueueFull(Exception):
    pass


class _Gate:
    """At most ``slots`` generations at once and ``max_queue`` waiting; lives in the event loop (no locks)."""

    def __init__(self, slots: int, max_queue: int):
        self.slots, self.max_queue = slots, max_queue
        self.running = 0
        self.waiting = 0
        self.sem = asyncio.Semaphore(slots)

    def leave(self) -> None:
        self.running -= 1
        self.sem.release()


class _Ticket:
    """One request's place: waiting, then admitted (holds a slot), then handed to the worker, which gives it back.

    ``close()`` undoes whatever the request still holds, so a request that ends at any point (disconnect,
    timeout, an error before its generation started) never leaks a place or a slot.
    """

    def __init__(self, gate: _Gate):
        if gate.running + gate.waiting >= gate.slots + gate.max_queue:
            raise _QueueFull
        gate.waiting += 1
        self.gate, self.state = gate, "waiting"

    async def admit(self) -> None:
        try:
            await self.gate.sem.acquire()
        except BaseException:
            self.close()
            raise
        self.gate.waiting -= 1
        self.gate.running += 1
        self.state = "admitted"

    def hand_over(self) -> None:
        self.state = "handed"

    def close(self) -> None:
        if self.state == "waiting":
            self.gate.waiting -= 1
        elif self.state == "admitted":
            self.gate.leave()
        if self.state != "handed":
            self.state = "closed"


class _Metrics:
    def __init__(self):
        self.started = time.time()
        self.counts: dict[str, int] = {"requests": 0, "completed": 0, "rejected_queue_full": 0,
                                       "client_errors": 0, "server_errors": 0, "timed_out": 0, "cancelled": 0}
        self.tokens = 0
        self.gen_seconds = 0.0
        self.latencies: deque[float] = deque(maxlen=1000)

    def snapshot(self, gate: _Gate) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 4) if lat else None

        return {
            **{f"requests_{k}" if k != "requests" else "requests_total": v for k, v in self.counts.items()},
            "tokens_generated": self.tokens,
            "generation_seconds": round(self.gen_seconds, 4),
            "tokens_per_second": round(self.tokens / self.gen_seconds, 3) if self.gen_seconds else 0.0,
            "queue_depth": gate.waiting,
            "running": gate.running,
            "max_queue": gate.max_queue,
            "max_concurrency": gate.slots,
            "latency_p50_s": pct(0.5),
            "latency_p95_s": pct(0.95),
            "uptime_s": round(time.time() - self.started, 1),
        }


class _State:
    def __init__(self, config: ServeConfig, backend: Backend, owns_backend: bool, replicas: list[Backend]):
        self.config, self.backend, self.owns_backend = config, backend, owns_backend
        slots = config.max_concurrency
        if len(replicas) > 1:
            slots = len(replicas)
        elif slots > 1 and not getattr(backend, "thread_safe", False):
            log.warning("the %s backend was opened by the caller and runs one generation at a time; "
                        "--max-concurrency %d acts as 1", getattr(backend, "name", "?"), slots)
            slots = 1
        # each generation takes a replica and gives it back; a thread-safe backend is its own replica per slot
        self.all_replicas = replicas
        self.replicas: queue.SimpleQueue = queue.SimpleQueue()
        for b in replicas if len(replicas) > 1 else [backend] * slots:
            self.replicas.put(b)
        self.gate = _Gate(slots, config.max_queue)
        self.metrics = _Metrics()
        self.closing = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="edgemed-serve")
        self.model_id = _model_id(config.export_dir)
        self.created = int(time.time())


def _model_id(folder: Path | str) -> str:
    folder = Path(folder)
    try:
        name = json.loads((folder / "manifest.json").read_text()).get("name")
    except (OSError, ValueError, AttributeError):  # no manifest, not JSON, not an object
        name = None
    return str(name or folder.resolve().name)


# ---------------------------------------------------------------------------------------------- generation
async def _generate(state: _State, prompt: _Prompt, ticket: _Ticket, deadline: float
                    ) -> AsyncIterator[tuple[str, Any]]:
    """Run the backend in the pool; yield ("piece", text) ... then ("end", (finish_reason, usage, text)).

    Pieces are posted to the event loop only for a streamed answer: a whole answer wakes the loop once, which
    keeps the server's cost per token near nothing.

    The worker thread gives the slot back when the backend has really finished, so a cancelled request never
    lets a second generation start while the first still holds the model. Leaving early (timeout, disconnect,
    cancellation) tells the worker to stop, which closes the backend's generator: the model stops within one
    token. Raises TimeoutError past the deadline.
    """
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def post(item: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            loop.call_soon_threadsafe(q.put_nowait, item)

    def work() -> None:
        t0 = time.perf_counter()
        reason, pieces, n_tokens = "cancelled", [], 0
        backend = state.replicas.get()
        try:
            it = backend.stream(prompt.text, prompt.image, prompt.params)
            try:
                for chunk in it:
                    n_tokens = chunk.tokens
                    if chunk.text:
                        pieces.append(chunk.text)
                        if prompt.stream:
                            post(("piece", chunk.text))
                    if chunk.finish_reason is not None:
                        reason = chunk.finish_reason
                        break
                    if stop.is_set() or state.closing.is_set():
                        break
            finally:
                it.close()
            # counted here, in the thread that owns the backend, not beside another generation
            usage = {"prompt_tokens": len(backend.tokenize(prompt.text)), "completion_tokens": n_tokens}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            state.metrics.gen_seconds += time.perf_counter() - t0
            state.metrics.tokens += usage["completion_tokens"]
            post(("end", (reason, usage, "".join(pieces))))
        except BaseException as e:  # handed to the request, which answers 500
            post(("error", e))
        finally:
            state.replicas.put(backend)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(state.gate.leave)

    ticket.hand_over()
    try:
        loop.run_in_executor(state.pool, work)
    except RuntimeError:  # the pool is shut down
        state.gate.leave()
        raise
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            kind, value = await asyncio.wait_for(q.get(), remaining)
            if kind == "error":
                raise value
            yield kind, value
            if kind == "end":
                return
    finally:
        stop.set()


def _chunk(state: _State, rid: str, delta: dict[str, Any], finish: str | None, kind: str = "chat") -> str:
    if kind == "text":  # a text_completion chunk carries the piece as "text"
        body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": state.model_id,
                "choices": [{"index": 0, "text": delta.get("content", ""), "logprobs": None,
                             "finish_reason": finish}]}
    else:
        body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": state.model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


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


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (declared or actual)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise _Api(400, f"invalid Content-Length {declared!r}", "invalid_request") from None
        if too_big:
            raise _Api(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                       "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _Api(413, f"request body exceeds the limit of {limit} bytes", "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _admit(state: _State, ticket: _Ticket, deadline: float) -> None:
    """Wait for a generation slot; 504 past the deadline."""
    try:
        await asyncio.wait_for(ticket.admit(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise _Api(504, f"the request waited longer than {state.config.request_timeout:g} s for a free slot; "
                   "try again later", "timeout") from None


async def _complete(state: _State, prompt: _Prompt, ticket: _Ticket, deadline: float, arrived: float
                    ) -> dict[str, Any]:
    """A whole (non-streamed) answer, once a slot is held."""
    text, reason, usage = "", "stop", {}
    try:
        async with contextlib.aclosing(_generate(state, prompt, ticket, deadline)) as gen:
            async for kind, value in gen:
                if kind == "end":
                    reason, usage, text = value
    except TimeoutError:
        raise _Api(504, f"the answer took longer than {state.config.request_timeout:g} s; ask for fewer tokens "
                   "or try again later", "timeout") from None
    except EdgemedError as e:
        raise _Api(400, str(e), "invalid_request") from None
    except Exception as e:
        log.exception("generation failed")
        raise _Api(500, f"generation failed: {type(e).__name__}: {e}", "generation_failed") from None
    state.metrics.counts["completed"] += 1
    state.metrics.latencies.append(time.monotonic() - arrived)
    if prompt.kind == "text":
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_id, "system_fingerprint": f"edgemed-{getattr(state.backend, 'name', '?')}",
            "choices": [{"index": 0, "text": prompt.echo + text, "logprobs": None, "finish_reason": _finish(reason)}],
            "usage": usage,
        }
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": state.model_id, "system_fingerprint": f"edgemed-{getattr(state.backend, 'name', '?')}",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": _finish(reason)}],
        "usage": usage,
    }


async def _sse(state: _State, request: Request, prompt: _Prompt, ticket: _Ticket, deadline: float,
               arrived: float) -> AsyncIterator[str]:
    """Server-sent events of one answer; a disconnect (polled between pieces, or seen by Starlette) stops it."""
    fmt = prompt.kind  # "chat" or "text" (not `kind`: the loop below names its items so)
    rid = f"{'cmpl' if fmt == 'text' else 'chatcmpl'}-{uuid.uuid4().hex}"
    last_check = time.monotonic()
    try:
        if fmt == "text":
            if prompt.echo:
                yield _chunk(state, rid, {"content": prompt.echo}, None, fmt)
        else:
            yield _chunk(state, rid, {"role": "assistant", "content": ""}, None)
        # aclosing: however this generator ends, the inner one's cleanup (stop the model) runs at once
        async with contextlib.aclosing(_generate(state, prompt, ticket, deadline)) as gen:
            async for kind, value in gen:
                if kind == "end":
                    reason, usage, _ = value
                    yield _chunk(state, rid, {}, _finish(reason), fmt)
                    if prompt.include_usage:
                        obj = "text_completion" if fmt == "text" else "chat.completion.chunk"
                        body = {"id": rid, "object": obj, "created": int(time.time()),
                                "model": state.model_id, "choices": [], "usage": usage}
                        yield f"data: {json.dumps(body)}\n\n"
                    break
                yield _chunk(state, rid, {"content": value}, None, fmt)
                if time.monotonic() - last_check > 0.1:  # a cheap poll, at most ten times a second
                    last_check = time.monotonic()
                    if await request.is_disconnected():
                        state.metrics.counts["cancelled"] += 1
                        return
        yield "data: [DONE]\n\n"
        state.metrics.counts["completed"] += 1
        state.metrics.latencies.append(time.monotonic() - arrived)
    except TimeoutError:
        state.metrics.counts["timed_out"] += 1
        err = _Api(504, f"the answer took longer than {state.config.request_timeout:g} s", "timeout")
        yield f"data: {json.dumps(err.body())}\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        state.metrics.counts["cancelled"] += 1
        raise
    except Exception as e:
        log.exception("generation failed")
        state.metrics.counts["server_errors"] += 1
        err = _Api(500, f"generation failed: {type(e).__name__}: {e}", "generation_failed")
        yield f"data: {json.dumps(err.body())}\n\n"


def _streaming_response(body: AsyncIterator[str], on_close):
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


# ---------------------------------------------------------------------------------------------- the app
def create_app(config: ServeConfig, backend: Backend | None = None) -> FastAPI:
    """The FastAPI app serving ``config.export_dir`` (or ``backend``, already open, which the caller closes)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    check_config(config)
    owns = backend is None
    slots = config.max_concurrency
    # replicas share the cores: each gets its part unless --threads says otherwise
    threads = config.n_threads or (max(1, (os.cpu_count() or 1) // slots) if owns and slots > 1 else None)
    kw: dict[str, Any] = {"n_threads": threads} if threads else {}
    if config.chat_template is not None:
        kw["chat_template"] = config.chat_template
    backend = backend or open_model(config.export_dir, verify=config.verify, **kw)
    replicas = [backend]
    if owns and slots > 1 and not getattr(backend, "thread_safe", False):
        # one model instance per slot (a backend holds one KV cache and is driven by one thread at a time); GGUF
        # files are memory-mapped, so llama.cpp replicas share the weights' pages; others hold a copy each
        replicas += [open_model(config.export_dir, verify=False, **kw) for _ in range(slots - 1)]
    state = _State(config, backend, owns, replicas)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.closing.set()  # running generations stop within one token instead of finishing their answers
        state.pool.shutdown(wait=True, cancel_futures=True)
        if state.owns_backend:
            for b in state.all_replicas:
                b.close()

    app = FastAPI(title="edgemed", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.edgemed = state
    app.add_middleware(FrontDoor, config=config)

    def error(e: _Api) -> JSONResponse:
        if e.status == 429:
            state.metrics.counts["rejected_queue_full"] += 1
        elif e.status == 504:
            state.metrics.counts["timed_out"] += 1
        elif e.status >= 500:
            state.metrics.counts["server_errors"] += 1
        else:
            state.metrics.counts["client_errors"] += 1
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(_Api(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error(_Api(400, f"invalid request: {exc.errors()[:3]}", "invalid_request"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error")
        return error(_Api(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error"))

    def authorized(request: Request) -> bool:
        if not config.api_key:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), config.api_key.encode())

    def unauthorized() -> JSONResponse:
        return error(_Api(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'",
                          "invalid_api_key", "authentication_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_id, "backend": getattr(backend, "name", "?"),
                "queue_depth": state.gate.waiting, "running": state.gate.running}

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorized(request):
            return unauthorized()
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.created,
                                            "owned_by": "edgemed"}]}

    @app.get("/metrics")
    async def metrics(request: Request):
        """JSON by default; ``?format=prometheus`` gives the Prometheus text format for a scraper."""
        if not authorized(request):
            return unauthorized()
        snap = state.metrics.snapshot(state.gate)
        if request.query_params.get("format") == "prometheus":
            from starlette.responses import PlainTextResponse

            lines = [f"edgemed_{k} {float(v)}" for k, v in snap.items() if isinstance(v, int | float)]
            return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
        return snap

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, "text")

    async def answer(request: Request, kind: str):
        """One request to either endpoint: parse, queue, then a whole answer or a stream."""
        arrived = time.monotonic()
        deadline = arrived + config.request_timeout
        state.metrics.counts["requests"] += 1
        if not authorized(request):
            return unauthorized()
        ticket = None
        streaming = False
        try:
            prompt = await _parse(request, state, kind)
            try:
                ticket = _Ticket(state.gate)
            except _QueueFull:
                raise _Api(429, f"the server is busy ({state.gate.running} running, {state.gate.waiting} waiting, "
                           f"queue bound {config.max_queue}); retry shortly", "queue_full", "rate_limit_error"
                           ) from None
            watcher = asyncio.ensure_future(_watch_disconnect(request))
            try:
                await _race(_admit(state, ticket, deadline), watcher)
                if prompt.stream:
                    streaming = True
                    return _streaming_response(_sse(state, request, prompt, ticket, deadline, arrived),
                                               ticket.close)
                return await _race(_complete(state, prompt, ticket, deadline, arrived), watcher)
            finally:
                watcher.cancel()
        except _Api as e:
            return error(e)
        except _Disconnected:
            state.metrics.counts["cancelled"] += 1
            return JSONResponse({"error": {"message": "client disconnected", "type": "cancelled",
                                           "code": "client_disconnected", "param": None}}, status_code=499)
        finally:
            if ticket is not None and not streaming:
                ticket.close()

    return app


async def _parse(request: Request, state: _State, kind: str = "chat") -> _Prompt:
    """The request's prompt (a chat request, or a text completion for ``kind`` "text"), or a 4xx _Api error
    saying what is wrong with it."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        # text/plain and form bodies are what a web page can send cross-site without a preflight: never accepted
        raise _Api(415, f"Content-Type must be application/json, got {ctype or 'none'!r}", "unsupported_media_type")
    body = await _read_body(request, state.config.max_body_bytes)
    if not json_depth_ok(body):
        raise _Api(400, f"the request body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels; a chat request "
                   "needs fewer than 10", "invalid_json")
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, an integer of over 4300 digits
        raise _Api(400, f"the request body is not valid JSON ({e})", "invalid_json") from None
    if not isinstance(obj, dict):
        raise _Api(400, f"the request body must be a JSON object, got {type(obj).__name__}", "invalid_request")
    if kind == "text":
        try:
            return build_completion(CompletionRequest.model_validate(obj), state.config)
        except ValidationError as e:
            raise _Api(400, _validation_message(e), "invalid_request") from None
    try:
        req = ChatRequest.model_validate(obj)
    except ValidationError as e:
        raise _Api(400, _validation_message(e), "invalid_request") from None
    has_image = any(isinstance(m.content, list) and any(p.type == "image_url" for p in m.content)
                    for m in req.messages)
    if not has_image:  # rendering text is quick: a hop to another thread would cost more than it saves
        return build_prompt(req, state.backend, state.config)
    # image decoding is CPU work: off the event loop
    return await asyncio.get_running_loop().run_in_executor(None, build_prompt, req, state.backend, state.config)


def _version() -> str:
    from edgemed import __version__

    return __version__


# ---------------------------------------------------------------------------------------------- entry points
def serve(config: ServeConfig) -> None:
    """Check the settings, open the export and serve it with uvicorn until interrupted."""
    import uvicorn

    check_config(config)
    if config.host in _WILDCARDS and not config.allow_hosts:
        log.warning("listening on %s, but only loopback Host names are accepted: give --allow-host NAME for each "
                    "name or address clients use to reach this machine", config.host or "all addresses")
    app = create_app(config)
    log.info("serving %s on http://%s:%d", config.export_dir, config.host, config.port)
    from edgemed.console import log_path, user_err

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
    pil = None
    if image is not None:
        pil = load_image(image, max_pixels=ServeConfig(export_dir=Path(export_dir)).max_image_pixels)
    kw: dict[str, Any] = {"n_threads": n_threads} if n_threads else {}
    if chat_template is not None:
        kw["chat_template"] = chat_template
    backend = open_model(export_dir, verify=False, **kw)
    try:
        if pil is not None and not backend.is_vision:
            raise DataError(f"{export_dir} is a text model and takes no image; ask without --image")
        prompt = backend.render(question, image=pil is not None, system=system)
        yield from backend.generate(prompt, pil, params)
    finally:
        backend.close()


__all__ = ["ChatRequest", "CompletionRequest", "ServeConfig", "ask", "check_config", "create_app", "decode_image",
           "serve"]
