"""What every runtime shares: prompts through the transformers files saved with the model, the ids that end an
answer, one request at a time, and the generate -> stream chain.

A runtime (PyTorch, onnxruntime, llama.cpp) subclasses :class:`HFBackend` and adds only its own loading,
prefill/logits (``_logits``), image embeddings (``_image_embeddings``) and the loop that turns a prompt into
sampled token ids (``_token_ids``); llama.cpp also tokenizes and detokenizes with its own vocabulary.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed.backends.base import Chunk, GenParams, stream_text, texts
from edgemed.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from edgemed.archs import ArchSpec


def load_processing(folder: Path, arch: ArchSpec, vision: bool) -> tuple[Any, Any]:
    """(processor, tokenizer) saved in ``folder``: an image model's processor, or the tokenizer twice."""
    from edgemed.files import reading
    from edgemed.modeling import load_processor

    with reading(folder, "the tokenizer and processor files saved with the model"):
        return load_processor(folder, arch, vision=vision)


def stop_ids(folder: Path, processor: Any, tokenizer: Any, typed: bool) -> list[int]:
    """The ids every runtime ends an answer on: the generation settings' eos list, the tokenizer's eos and the
    chat template's end of turn (which a base model lacks), each once."""
    from edgemed import prompting

    ids: list[int] = []
    from edgemed.modeling import generation_eos

    for i in (*generation_eos(folder), tokenizer.eos_token_id,
              prompting.end_of_turn(processor, tokenizer, typed=typed)):
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: Any) -> int:
    """Greedy (temperature 0, or no generator) or temperature / top-p sampling from a seeded numpy generator."""
    import numpy as np

    if temperature <= 0 or rng is None:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        sp = p[order]
        drop = (np.cumsum(sp) - sp) >= top_p  # keeps at least the most likely token
        sp[drop] = 0.0
        p = np.zeros_like(p)
        p[order] = sp
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


class HFBackend(ABC):
    """A runtime that renders prompts with the model's own transformers files (see the module docstring).

    Subclasses call ``super().__init__`` once their processor and tokenizer are loaded. ``folder`` is what the
    backend was opened from; ``hf_dir`` holds the transformers files when that differs (a run folder's base).
    """

    name: str

    def __init__(self, folder: Path, arch: ArchSpec, is_vision: bool, processor: Any, tokenizer: Any,
                 hf_dir: Path | None = None):
        self.folder, self.arch, self.is_vision = Path(folder), arch, is_vision
        self.processor, self.tokenizer = processor, tokenizer
        self.image_token_id: int | None = None  # the token a rendered prompt holds once per image
        if is_vision and arch.image_placeholder:
            self.image_token_id = tokenizer.convert_tokens_to_ids(arch.image_placeholder)
        self._prefix = tokenizer("", add_special_tokens=True).input_ids  # what the tokenizer adds (BOS)
        self.eos_ids = stop_ids(Path(hf_dir or folder), processor, tokenizer, is_vision)
        self._lock = threading.Lock()  # one request at a time per instance

    # ------------------------------------------------------------------ text
    def render(self, question: str, *, image: bool = False, system: str | None = None) -> str:
        """The generation prompt for one question with the model's chat template; a model without one (a base
        model) gets the plain text prompt of ``prompting.plain``."""
        from edgemed import prompting

        self._check_image(image)
        if image and not prompting.has_template(self.processor):  # a base model: plain text, no turn markers
            raise DataError(f"{self.folder}: has no chat template to place the image in; give a template "
                            "with --chat-template FILE")
        return prompting.generation_prompt(self.processor, question, image=image, system=system,
                                           typed=self.is_vision)

    def chat_template(self) -> str:
        return getattr(self.processor, "chat_template", None) or self.tokenizer.chat_template

    def tokenize(self, text: str) -> list[int]:
        """The tokenizer's ids of ``text`` (special tokens parsed), with BOS once as the model adds it."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if self._prefix and ids[: len(self._prefix)] != self._prefix:  # not when the template wrote BOS itself
            ids = self._prefix + ids
        return ids

    def _detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _check_image(self, wanted: bool) -> None:
        """The one refusal of an image by a text model."""
        if wanted and not self.is_vision:
            raise DataError(f"{self.folder}: is a text model ({self.arch.name}) and takes no image; "
                            "ask without an image or use an image model")

    def _placeholder_index(self, tokens: list[int]) -> int:
        """Where the one image placeholder of an image prompt's ``tokens`` stands."""
        where = [i for i, t in enumerate(tokens) if t == self.image_token_id]
        if len(where) != 1:
            raise DataError(f"the prompt holds the image placeholder {self.arch.image_placeholder!r} {len(where)} "
                            "times; it must hold it exactly once (render it with image=True)")
        return where[0]

    def _expand_placeholder(self, tokens: list[int], image: Image.Image, return_tensors: str
                            ) -> tuple[Any, list[int], list[int]]:
        """Expand the one image placeholder in ``tokens`` with the model's own processor (so no family is named).

        The tokens are decoded to text and run through the processor with the image; the expansion is found
        between the unchanged text before and after the placeholder. Returns (processor encoding, expanded ids,
        the row of each of ``tokens`` in the expanded sequence: the placeholder's row is the last image token's).
        """
        k = self._placeholder_index(tokens)
        text = self.tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        enc = self.processor(text=[text], images=[image.convert("RGB")], add_special_tokens=False,
                             return_tensors=return_tensors)
        full = [int(t) for t in enc["input_ids"][0]]
        tail = len(tokens) - k - 1
        if full[:k] != list(tokens[:k]) or full[len(full) - tail:] != list(tokens[k + 1:]) or len(full) < len(tokens):
            # the text the processor adds around the image merged with the prompt's own (Gemma 3 writes "\n\n"
            # before <start_of_image>, and its real vocabulary joins that with the template's "\n"): expand the
            # placeholder alone and splice it in, so the prompt keeps the tokens tokenize() gave it
            enc, full = self._splice_expansion(tokens, k, image, return_tensors)
        n_img = len(full) - len(tokens) + 1
        rows = list(range(k)) + [k + n_img - 1] + [k + n_img + j for j in range(tail)]
        return enc, full, rows

    def _splice_expansion(self, tokens: list[int], k: int, image: Image.Image, return_tensors: str
                          ) -> tuple[Any, list[int]]:
        """(encoding, ids) of ``tokens`` with the processor's expansion of the placeholder alone put at ``k``.
        Per-token fields are spliced: input ids from ``tokens``, attention 1, every other per-token field 0 (as
        for text); a field with more than one value per token (Mllama's cross-attention mask) cannot be spliced
        without knowing its meaning, so such a model keeps the error."""
        import numpy as np

        mismatch = DataError("the processor tokenized the prompt differently from tokenize(); "
                             "give tokens made by this backend's tokenize(render(...))")
        alone = self.tokenizer.decode([tokens[k]], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        enc = self.processor(text=[alone], images=[image.convert("RGB")], add_special_tokens=False,
                             return_tensors=return_tensors)
        mid = [int(t) for t in enc["input_ids"][0]]
        before, after = list(tokens[:k]), list(tokens[k + 1:])
        for key in list(enc.keys()):
            value = enc[key]
            shape = tuple(getattr(value, "shape", ()))
            if len(shape) < 2 or shape[0] != 1 or shape[1] != len(mid):
                continue  # pixel values, grids: not per token
            if len(shape) > 2:
                raise mismatch
            arr = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
            if key == "input_ids":
                row = np.asarray(before + mid + after, dtype=arr.dtype)
            else:
                fill = 1 if key == "attention_mask" else 0
                row = np.concatenate([np.full(len(before), fill, arr.dtype), arr[0],
                                      np.full(len(after), fill, arr.dtype)])
            if return_tensors == "pt":
                import torch

                enc[key] = torch.from_numpy(row[None].copy())
            else:
                enc[key] = row[None]
        return enc, before + mid + after

    # ------------------------------------------------------------------ numbers
    def logits(self, tokens: list[int], image: Image.Image | None = None) -> np.ndarray:
        """Teacher-forced logits for ``tokens``, one row per token (see ``Backend.logits``)."""
        self._check_image(image is not None)
        with self._lock:
            self._select()
            return self._logits(list(tokens), image)

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """Projected image features as the decoder sees them, shape [n_image_tokens, hidden]."""
        if not self.is_vision:
            raise DataError(f"{self.folder}: is a text model ({self.arch.name}); it has no image embeddings")
        with self._lock:
            return self._image_embeddings(image)

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: str, image: Image.Image | None = None, params: GenParams | None = None
                 ) -> Iterator[str]:
        """The text pieces of ``stream``."""
        return texts(self.stream(prompt, image, params))

    def stream(self, prompt: str, image: Image.Image | None = None, params: GenParams | None = None
               ) -> Iterator[Chunk]:
        """Stream the answer as chunks: greedy at temperature 0, else temperature + top-p with ``seed``; it ends
        at an end-of-generation id, a stop string, ``max_tokens`` or the context. Closing the iterator stops the
        model within one token."""
        params = params or GenParams()
        self._check_image(image is not None)
        tokens = self.tokenize(prompt)
        with self._lock:
            self._select()
            if params.max_tokens <= 0:
                yield Chunk("", 0, "length")
                return
            ids = self._until_end(self._token_ids(tokens, image, params), params)
            yield from stream_text(ids, self._detokenize, params.stop)

    def _until_end(self, ids: Generator[int, None, str], params: GenParams) -> Generator[int, None, str]:
        """The runtime's sampled ids up to an end-of-generation id (unless ``ignore_eos``) or ``max_tokens``; the
        runtime's own finish reason ("length" at its context) otherwise. The next id is asked for only when one
        more is wanted, so a runtime never runs a step whose token is not used."""
        try:
            for _ in range(params.max_tokens):
                try:
                    t = next(ids)
                except StopIteration as end:
                    return end.value or "length"
                if t in self.eos_ids and not params.ignore_eos:
                    return "stop"
                yield t
            return "length"
        finally:
            ids.close()

    @staticmethod
    def _seed(params: GenParams) -> int:
        """The request's seed, or a fresh random one."""
        return params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")

    def _rng(self, params: GenParams) -> Any:
        """A numpy generator seeded for this request, or None for greedy decoding."""
        import numpy as np

        return np.random.default_rng(self._seed(params)) if params.temperature > 0 else None

    def _select(self) -> None:
        """Set what this request runs with (llama.cpp: its LoRA adapter); called under the lock."""
        return None

    # ------------------------------------------------------------------ what each runtime provides
    @abstractmethod
    def _logits(self, tokens: list[int], image: Image.Image | None) -> np.ndarray:
        """``logits`` under the lock."""

    @abstractmethod
    def _image_embeddings(self, image: Image.Image) -> np.ndarray:
        """``image_embeddings`` under the lock."""

    @abstractmethod
    def _token_ids(self, tokens: list[int], image: Image.Image | None, params: GenParams
                   ) -> Generator[int, None, str]:
        """Sampled ids after the prompt, each fed back once the next one is asked for; returns "length" when the
        context is full. Closing it ends the runtime's work."""

    @abstractmethod
    def close(self) -> None:
        """Free the model."""
