"""Request limits, in one place for every front end: ``edgemed ask``, the HTTP API and anything added later.

The field types below are what ``serve``'s request schema is built from, and :func:`gen_params` is the one check
of a request's decoding settings; ``ask --max-tokens -1`` is refused with the message a request with
``"max_tokens": -1`` gets.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgemed.backends.base import GenParams
from edgemed.errors import DataError

MAX_TEMPERATURE = 2.0  # OpenAI's range
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_SEED = 2**63 - 1
DEFAULT_MAX_TOKENS_CAP = 512  # `serve --max-tokens-cap` default, and what `ask` allows
MAX_JSON_DEPTH = 32  # nesting of a request body; an OpenAI chat request needs 6
MAX_PROMPT_CHARS = 1_000_000  # characters of text in one request, all messages together

MaxTokens = Annotated[int, Field(ge=1, description="tokens to generate, at least 1")]
Temperature = Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE, description="0 is greedy")]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class Sampling(BaseModel):
    """The decoding settings of one request, as every front end receives them."""

    model_config = ConfigDict(extra="forbid", strict=True)
    max_tokens: MaxTokens
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list, max_length=MAX_STOP)


class LimitError(DataError):
    """A request setting out of range; ``code`` is the OpenAI-style error code the HTTP API answers with."""

    def __init__(self, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.code = code


def _message(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:6]:
        where = ".".join(str(x) for x in err["loc"]) or "request"
        parts.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


def gen_params(max_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop: list[str] | None = None, cap: int = DEFAULT_MAX_TOKENS_CAP) -> GenParams:
    """Checked decoding settings; a DataError saying which setting is out of range and what is allowed."""
    try:
        s = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=list(stop or []))
    except ValidationError as e:
        raise LimitError(f"invalid request: {_message(e)}; max_tokens >= 1, temperature 0-{MAX_TEMPERATURE:g}, "
                        f"top_p in (0, 1], seed 0-{MAX_SEED}, up to {MAX_STOP} non-empty stop strings") from None
    if s.max_tokens > cap:
        raise LimitError(f"max_tokens {s.max_tokens} exceeds the cap of {cap}; ask for fewer (or restart the server "
                         "with a larger --max-tokens-cap)", "max_tokens_exceeded")
    return GenParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed, stop=s.stop)


_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')  # a whole string literal, or one bracket


def json_depth_ok(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when no array or object in the JSON text ``body`` nests deeper than ``limit``: checked before parsing,
    because Python's json recurses once per level (100,000 levels raise RecursionError). String literals are
    skipped whole by the regular expression, so a large base64 image costs one C-level scan."""
    depth = 0
    for m in _TOKENS.finditer(body):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return False
        elif c in (b"]", b"}"):
            depth -= 1
    return True
