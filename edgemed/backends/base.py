"""The one interface every runtime implements, so parity, eval, serve and ask treat them alike."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np
    from PIL import Image


@dataclass
class GenParams:
    """Decoding settings shared by every backend."""

    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # decode max_tokens whatever the model says (speed measurements, as llama-bench)


def render_question(backend: Any, question: str, image: bool, system: str | None) -> str:
    """The generation prompt for one question with the backend's saved processor or tokenizer (its chat template).

    A model without a chat template (a base model) gets the plain text prompt of ``prompting.plain``.
    """
    from edgemed import prompting
    from edgemed.errors import DataError

    if image and not backend.is_vision:
        raise DataError(f"{backend.folder}: is a text model ({backend.arch.name}) and takes no image; "
                        "ask without an image or use an image model")
    if not prompting.has_template(backend.processor):  # a base model: plain text, no turn markers
        if image:
            raise DataError(f"{backend.folder}: has no chat template to place the image in; give a template "
                            "with --chat-template FILE")
        return prompting.plain(question, system)
    msgs = prompting.messages(question, image=image, system=system, typed=backend.is_vision)
    return prompting.render(backend.processor, msgs)


def expand_placeholder(tokenizer: Any, processor: Any, tokens: list[int], image: Image.Image, image_token_id: int,
                       placeholder: str | None, return_tensors: str) -> tuple[Any, list[int], list[int]]:
    """Expand the one image placeholder in ``tokens`` with the model's own processor (so no family is named here).

    The tokens are decoded to text and run through the processor with the image; the expansion is found between the
    unchanged text before and after the placeholder. Returns (processor encoding, expanded ids, the row of each of
    ``tokens`` in the expanded sequence: the placeholder's row is the last image token's).
    """
    from edgemed.errors import DataError

    where = [i for i, t in enumerate(tokens) if t == image_token_id]
    if len(where) != 1:
        raise DataError(f"the prompt holds the image placeholder {placeholder!r} {len(where)} times; it must hold it "
                        "exactly once (render it with image=True)")
    k = where[0]
    text = tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    enc = processor(text=[text], images=[image.convert("RGB")], add_special_tokens=False,
                    return_tensors=return_tensors)
    full = [int(t) for t in enc["input_ids"][0]]
    tail = len(tokens) - k - 1
    if full[:k] != list(tokens[:k]) or full[len(full) - tail:] != list(tokens[k + 1:]) or len(full) < len(tokens):
        raise DataError("the processor tokenized the prompt differently from tokenize(); "
                        "give tokens made by this backend's tokenize(render(...))")
    n_img = len(full) - len(tokens) + 1
    rows = list(range(k)) + [k + n_img - 1] + [k + n_img + j for j in range(tail)]
    return enc, full, rows


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
    and ``processor`` (None for a text model) are the transformers objects saved with the model, which render its
    prompts; ``folder`` is the folder it was opened from.
    """

    name: str
    is_vision: bool
    folder: Path
    tokenizer: Any
    processor: Any

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
