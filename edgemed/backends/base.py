"""The one interface every runtime implements, so parity, eval, serve and ask treat them alike."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
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


@runtime_checkable
class Backend(Protocol):
    """A loaded model that renders prompts with its own chat template and answers them.

    ``name`` is "pytorch", "llamacpp" or "onnx". ``is_vision`` says whether images are accepted.
    """

    name: str
    is_vision: bool

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

    def generate(self, prompt: str, image: Image.Image | None = None, params: GenParams | None = None
                 ) -> Iterator[str]:
        """Stream the answer to a rendered prompt, piece by piece, stopping at end of turn or a stop string."""

    def close(self) -> None:
        """Free the model."""
