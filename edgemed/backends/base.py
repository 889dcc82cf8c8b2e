"""The one interface every runtime implements, so parity, eval, serve and ask treat them alike.

What the runtimes share in code (prompting, end-of-generation ids, the lock, generate and stream) is
``edgemed.backends.hf.HFBackend``; this module holds the interface, the decoding settings and the stream loop.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from edgemed.archs import ArchSpec


def offline() -> None:
    """Make every library that could reach a hub refuse to, before any model is loaded."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@dataclass
class GenParams:
    """Decoding settings shared by every backend."""

    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # decode max_tokens whatever the model says (speed measurements, as llama-bench)


def cut_at_stop(text: str, sent: str, stops: list[str]) -> tuple[str, bool]:
    """What of ``text`` may be yielded after ``sent``: up to a stop string (and True), or up to a possible start of
    one (held back until the next token decides). The one stop-string rule every backend shares."""
    stops = [s for s in stops if s]
    for s in stops:
        i = text.find(s, max(0, len(sent) - len(s) + 1))
        if i >= 0:
            return text[len(sent):i] if i > len(sent) else "", True
    end = len(text)
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                end = min(end, len(text) - n)
                break
    return (text[len(sent):end] if end > len(sent) else ""), False


@dataclass(frozen=True)
class Chunk:
    """One step of a streamed answer (as mlx-lm's ``GenerationResponse``), so no caller re-tokenizes the output or
    reads state left on a backend.

    ``text`` is the new text (may be empty while a split character or a possible stop string waits), ``tokens`` the
    number of tokens generated so far, and ``finish_reason`` is None until the last chunk, which carries "stop" (end
    of turn or a stop string) or "length" (max_tokens or the context).
    """

    text: str
    tokens: int
    finish_reason: str | None = None


def texts(chunks: Iterator[Chunk]) -> Generator[str, None, None]:
    """The non-empty text pieces of a chunk stream (what ``generate`` yields); closing it closes the stream."""
    try:
        for c in chunks:
            if c.text:
                yield c.text
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def stream_text(token_ids: Generator[int, None, str], detokenize: Callable[[list[int]], str],
                stops: list[str]) -> Generator[Chunk, None, None]:
    """Chunks from a backend's stream of sampled token ids, the loop every streaming backend shares.

    A piece waits while the text ends in a split character, is cut at a stop string (which ends the stream) and
    holds back a possible start of one until the next token decides; what was held is flushed at the end.
    ``token_ids`` yields ids and returns its finish reason ("stop" at end of turn, "length" at a limit); it is
    closed when a stop string ends the stream. The last chunk carries the finish reason."""
    ids: list[int] = []
    sent = ""
    try:
        while True:
            try:
                t = next(token_ids)
            except StopIteration as end:
                reason = end.value or "length"
                break
            ids.append(t)
            text = detokenize(ids)
            if not text.endswith("\ufffd"):  # a character split across tokens waits for the rest
                piece, hit = cut_at_stop(text, sent, stops)
                if hit:
                    yield Chunk(piece, len(ids), "stop")
                    return
                if piece:
                    sent += piece
                    yield Chunk(piece, len(ids))
    finally:
        token_ids.close()
    text = detokenize(ids).rstrip("\ufffd")
    rest = text[len(sent):] if len(text) > len(sent) and text.startswith(sent) else ""  # what a stop-start held
    yield Chunk(rest, len(ids), reason)


@runtime_checkable
class Backend(Protocol):
    """A loaded model that renders prompts with its own chat template and answers them.

    ``name`` is "pytorch", "llamacpp" or "onnx". ``is_vision`` says whether images are accepted. ``tokenizer``
    and ``processor`` (the tokenizer again for a text model) are the transformers objects saved with the model,
    which render its prompts; ``folder`` is the folder it was opened from and ``arch`` its architecture entry.
    ``eos_ids`` are the ids an answer ends on (the generation settings' eos list, the tokenizer's eos and the
    template's end of turn); ``image_token_id`` is the placeholder a rendered image prompt holds once (None for a
    text model).
    """

    name: str
    is_vision: bool
    folder: Path
    tokenizer: Any
    processor: Any
    arch: ArchSpec
    eos_ids: list[int]
    image_token_id: int | None

    def render(self, question: str, *, image: bool = False, system: str | None = None) -> str:
        """The generation prompt for one question, rendered with the model's chat template."""

    def chat_template(self) -> str:
        """The chat template text the model carries."""

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as this runtime tokenizes it (special tokens parsed, BOS as the model adds it)."""

    def logits(self, tokens: list[int], image: Image.Image | None = None) -> np.ndarray:
        """Teacher-forced logits for ``tokens``, shape [len(tokens), vocab], float32.

        ``tokens`` is the tokenization of rendered text, holding the image placeholder once where the image
        goes. With an image, the runtime expands the placeholder into the image's embeddings and returns the
        logits of the text positions only, so every runtime's rows line up with ``tokens``; the row of the
        placeholder itself is the logit after the last image embedding.
        """

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """Projected image features as the decoder sees them, shape [n_image_tokens, hidden]."""

    def stream(self, prompt: str, image: Image.Image | None = None, params: GenParams | None = None
               ) -> Iterator[Chunk]:
        """Stream the answer to a rendered prompt as chunks, stopping at end of turn or a stop string; the last
        chunk carries the finish reason. Closing the iterator stops the model within one token."""

    def generate(self, prompt: str, image: Image.Image | None = None, params: GenParams | None = None
                 ) -> Iterator[str]:
        """The text pieces of ``stream``."""

    def close(self) -> None:
        """Free the model."""


# the protocol's attributes whose type can be checked on an instance (the rest are transformers or arch objects)
_KINDS: dict[str, type | tuple[type, ...]] = {"name": str, "is_vision": bool, "folder": Path, "eos_ids": list,
                                              "image_token_id": (int, type(None))}


def protocol_gaps(backend: Any) -> list[str]:
    """What ``backend`` lacks of the Backend protocol, one line each; empty when it has every member.

    Stricter than ``isinstance(backend, Backend)``, which only asks that the names exist: attributes must hold
    values of their kind, and every method must take the protocol's parameters (names, kinds and defaults).
    """
    gaps = []
    for attr in Backend.__annotations__:
        if not hasattr(backend, attr):
            gaps.append(f"no attribute {attr}")
        elif attr in _KINDS and not isinstance(value := getattr(backend, attr), _KINDS[attr]):
            kinds = _KINDS[attr] if isinstance(_KINDS[attr], tuple) else (_KINDS[attr],)
            gaps.append(f"{attr} is {value!r}, not {' or '.join(k.__name__ for k in kinds)}")
    for meth, fn in vars(Backend).items():
        if meth.startswith("_") or not inspect.isfunction(fn):
            continue
        got = getattr(backend, meth, None)
        if not callable(got):
            gaps.append(f"no method {meth}")
            continue
        want = [(p.name, p.kind, p.default) for p in list(inspect.signature(fn).parameters.values())[1:]]
        have = [(p.name, p.kind, p.default) for p in inspect.signature(got).parameters.values()]
        if have != want:
            gaps.append(f"{meth}{inspect.signature(got)} does not take the protocol's {inspect.signature(fn)}")
    return gaps
