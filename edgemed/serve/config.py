"""What ``edgemed serve`` takes, the settings it refuses, and who may call it (loopback, Host and Origin rules).

The rules run in ``FrontDoor``, one ASGI layer in front of every endpoint, so ``/health``, ``/metrics`` and
``/v1/models`` get them too.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from edgemed.errors import ServeError
from edgemed.limits import DEFAULT_MAX_TOKENS_CAP
from edgemed.serve.schema import ApiError

log = logging.getLogger("edgemed.serve")

LOOPBACK_NAMES = ("localhost",)
WILDCARDS = ("0.0.0.0", "::", "")


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
    adapters: dict[str, Path] = field(default_factory=dict)  # model name -> adapter export on this GGUF base


# ---------------------------------------------------------------------------------------------- settings
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_config(config: ServeConfig) -> None:
    """Refuse settings that would expose the model or cannot work, all problems at once."""
    problems = []
    if not is_loopback(config.host) and not config.api_key:
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
    for name, d in config.adapters.items():
        if not Path(d).is_dir():
            problems.append(f"--adapter {name}={d}: {d} is not a folder; give the folder `edgemed export gguf "
                            "RUN_DIR` wrote")
    if problems:
        raise ServeError("cannot serve: " + "; ".join(problems))


def parse_adapters(specs: Iterable[str]) -> dict[str, Path]:
    """``--adapter NAME=DIR`` options as {NAME: DIR}, refusing a malformed one or a name given twice."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name = name.strip()
        if not sep or not name or not folder or any(c.isspace() for c in name):
            raise ServeError(f"--adapter {spec!r} is not NAME=DIR; write e.g. --adapter chest=exports/chest-gguf "
                             "(NAME is the model clients ask for, without spaces)")
        if name in adapters:
            raise ServeError(f"--adapter name {name!r} is given twice; give each adapter its own name")
        adapters[name] = Path(folder)
    return adapters


# ---------------------------------------------------------------------------------------------- who may call
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
    if config.host not in WILDCARDS and name == _host_name(config.host):
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
        body = json.dumps(ApiError(403, message, code, "permission_error").body()).encode()
        await self._respond(send, 403, body, [(b"content-type", b"application/json")])

    @staticmethod
    async def _respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
