"""What a request may hold: the OpenAI request models this server honours, how a body is read into one, and the
error every non-200 answer is (OpenAI-shaped JSON: ``{"error": {"message", "type", "code", "param"}}``).

Bodies are read by hand (not by FastAPI's parameter binding), so that the size limit, the nesting limit and the
Content-Type rule apply before any parsing, and every refusal says what was wrong in OpenAI's shape.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgemed.limits import MAX_JSON_DEPTH, MaxTokens, Seed, Temperature, TopP, json_depth_ok

if TYPE_CHECKING:
    from starlette.requests import Request


class ApiError(Exception):
    """An answer other than 200: HTTP status and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, code: str, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": None}}


# ---------------------------------------------------------------------------------------------- request models
class _ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    url: str
    detail: str | None = None


class Part(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: _ImageURL | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


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


# ---------------------------------------------------------------------------------------------- reading a body
def validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:8]:
        where = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


async def read_request(request: Request, model: type[ChatRequest | CompletionRequest], limit: int
                       ) -> ChatRequest | CompletionRequest:
    """The JSON body as ``model``, or a 4xx ApiError saying what is wrong with it."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        # text/plain and form bodies are what a web page can send cross-site without a preflight: never accepted
        raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                       "unsupported_media_type")
    body = await _read_body(request, limit)
    if not json_depth_ok(body):
        raise ApiError(400, f"the request body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels; a chat "
                       "request needs fewer than 10", "invalid_json")
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, an integer of over 4300 digits
        raise ApiError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(obj).__name__}", "invalid_request")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise ApiError(400, validation_message(e), "invalid_request") from None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (declared or actual)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise ApiError(400, f"invalid Content-Length {declared!r}", "invalid_request") from None
        if too_big:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                           "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)
