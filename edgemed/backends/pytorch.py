"""The PyTorch reference runtime: a transformers model folder (or a run folder with its adapter) as a Backend.

Every other runtime is compared against this one, so it does the least possible by hand: transformers' processor
expands the image placeholder and its ``generate`` drives the decoder (KV cache, the family's position and
attention rules). Sampling is done in a logits processor with a private ``torch.Generator``, so the same seed gives
the same answer in any thread and whatever else ran before.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed.archs import ArchSpec, arch_for_dir
from edgemed.artifacts import MANIFEST, read_manifest
from edgemed.backends.base import Chunk, GenParams, expand_placeholder, render_question, stream_text, texts
from edgemed.errors import ArtifactError, DataError
from edgemed.files import reading

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

DTYPES = ("float32", "bfloat16", "float16")
# keys of a processor's output that are not image inputs of the model
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ArtifactError(f"unknown dtype {name!r} for the PyTorch backend; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def _load(folder: Path, dtype: str, device: str) -> tuple[Any, Any, Any, ArchSpec]:
    """(model, processor or tokenizer, tokenizer, arch) of a model folder or a run folder, from local files only."""
    kind = read_manifest(folder).get("kind") if (folder / MANIFEST).is_file() else None
    try:  # the shared loader (run folders: base + adapter + trained tensors), when it is present
        from edgemed.modeling import load_any
    except ImportError:
        load_any = None
    if load_any is not None:
        loaded = load_any(folder, dtype=dtype, device=device)
        return loaded.model, loaded.processor, loaded.tokenizer, loaded.arch
    if kind == "run":
        raise ArtifactError(f"{folder}: is a run folder, and this installation cannot load adapters "
                            "(edgemed.modeling is missing); merge it with `edgemed merge RUN_DIR --out MODEL_DIR` "
                            "and give the model folder")
    import transformers
    from transformers import AutoProcessor, AutoTokenizer

    arch = arch_for_dir(folder)
    cls = getattr(transformers, arch.model_class)
    with reading(folder, "a transformers model folder"):
        model = cls.from_pretrained(folder, dtype=_torch_dtype(dtype), local_files_only=True).to(device)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if arch.is_vision:
            proc = AutoProcessor.from_pretrained(folder, local_files_only=True)
            return model, proc, proc.tokenizer, arch
    return model, tok, tok, arch


class _Sampler:
    """Temperature and top-p sampling as a logits processor: keeps only the drawn token, so greedy search takes it.

    transformers' own sampling draws from torch's global generator, which concurrent or earlier work disturbs;
    a private generator makes an answer a function of its seed alone.
    """

    def __init__(self, temperature: float, top_p: float, seed: int, device: Any):
        import torch

        self.temperature, self.top_p = temperature, top_p
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True, dim=-1)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= self.top_p  # keeps at least the most likely token
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        pick = torch.multinomial(probs, 1, generator=self.gen)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, pick, 0.0)


class _Cancel:
    """Stopping criterion that ends generation when the consumer has gone away."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _QueueStreamer:
    """Receives generated token ids from ``generate`` (the prompt's first push is skipped) into a queue."""

    def __init__(self, q: queue.Queue):
        self.q, self.prompt_seen = q, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.q.put(("ids", value.reshape(-1).tolist()))

    def end(self) -> None:
        self.q.put(("end", None))


class TorchBackend:
    """A transformers model answering through the edgemed Backend protocol (the reference for every export).

    Args:
        folder: a model folder (manifest kind "model", or any transformers folder with config.json) or a run
            folder (kind "run": base model plus adapter).
        dtype: float32, bfloat16 or float16.
        n_threads: CPU threads for torch (default: torch's choice).
        device: "cpu", "cuda", "cuda:1"...; default CUDA when available.
    """

    name = "pytorch"
    thread_safe = False  # one generation at a time per instance; calls are serialised by a lock

    def __init__(self, folder: Path | str, dtype: str = "float32", n_threads: int | None = None,
                 device: str | None = None, **_: Any):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is in the folder
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file() and not (self.folder / MANIFEST).is_file():
            raise ArtifactError(f"{self.folder}: neither a model folder (config.json) nor an edgemed folder "
                                "(manifest.json); give a model, run or export folder")
        if n_threads:
            torch.set_num_threads(int(n_threads))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        _torch_dtype(dtype)
        self.model, self.processor, self.tokenizer, self.arch = _load(self.folder, dtype, self.device)
        self.model.eval()
        self.is_vision = self.arch.is_vision
        self._lock = threading.Lock()
        self.image_token_id = None
        if self.is_vision and self.arch.image_placeholder:
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.arch.image_placeholder)
        self._prefix = self.tokenizer("", add_special_tokens=True).input_ids  # what the tokenizer adds (BOS)
        self.eos_ids = self._eos_ids()

    # ------------------------------------------------------------------ text
    def render(self, question: str, *, image: bool = False, system: str | None = None) -> str:
        return render_question(self, question, image, system)

    def chat_template(self) -> str:
        return self.processor.chat_template or self.tokenizer.chat_template

    def tokenize(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if self._prefix and ids[: len(self._prefix)] != self._prefix:  # BOS once, as the model adds it
            ids = self._prefix + ids
        return ids

    def _eos_ids(self) -> list[int]:
        """End of text and end of turn: the generation config's eos ids and the tokenizer's eos."""
        ids: list[int] = []
        gc = getattr(self.model, "generation_config", None)
        for v in (getattr(gc, "eos_token_id", None), self.tokenizer.eos_token_id):
            for i in v if isinstance(v, list | tuple) else [v]:
                if i is not None and int(i) not in ids:
                    ids.append(int(i))
        return ids

    # ------------------------------------------------------------------ model inputs
    def _inputs(self, tokens: list[int], image: Image.Image | None) -> tuple[dict[str, Any], list[int]]:
        """Model inputs for ``tokens`` (and the image), and for each token the row of the model's output it maps to.

        With an image the processor does the family's expansion of the placeholder (so this code knows no
        family): the tokens are decoded to text, run through the processor with the image, and the expansion is
        found between the unchanged text before and after the placeholder.
        """
        import torch

        if image is None:
            ids = torch.tensor([tokens], device=self.device)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, list(range(len(tokens)))
        if not self.is_vision:
            raise DataError(f"{self.folder}: is a text model ({self.arch.name}) and takes no image")
        enc, _, rows = expand_placeholder(self.tokenizer, self.processor, list(tokens), image, self.image_token_id,
                                          self.arch.image_placeholder, "pt")
        inputs = {key: (v.to(self.device) if hasattr(v, "to") else v) for key, v in enc.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs, rows

    def _image_inputs(self, image: Image.Image) -> dict[str, Any]:
        prompt = self.render("", image=True)
        inputs, _ = self._inputs(self.tokenize(prompt), image)
        return {k: v for k, v in inputs.items() if k not in _TEXT_KEYS}

    # ------------------------------------------------------------------ numbers
    def logits(self, tokens: list[int], image: Image.Image | None = None) -> np.ndarray:
        import torch

        inputs, rows = self._inputs(list(tokens), image)
        with self._lock, torch.inference_mode():
            out = self.model(**inputs, use_cache=False)
        return out.logits[0, rows].float().cpu().numpy()

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        import torch

        if not self.is_vision:
            raise DataError(f"{self.folder}: is a text model ({self.arch.name}); it has no image embeddings")
        inputs = self._image_inputs(image)
        fn = getattr(self.model, "get_image_features", None) or getattr(getattr(self.model, "model", None),
                                                                        "get_image_features", None)
        with self._lock, torch.inference_mode():
            if fn is not None:
                feats = fn(**_accepted(fn, inputs))
            else:  # cross-attention families (mllama): the projected vision states the decoder attends to
                root = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # PEFT
                vision = root.get_submodule(self.arch.vision)
                out = vision(**_accepted(vision.forward, inputs))
                feats = root.get_submodule(self.arch.projector)(out[0])
        if hasattr(feats, "pooler_output"):
            feats = feats.pooler_output
        if isinstance(feats, list | tuple):
            feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
        return feats.reshape(-1, feats.shape[-1]).float().cpu().numpy()

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: str, image: Image.Image | None = None, params: GenParams | None = None
                 ) -> Iterator[str]:
        """The text pieces of ``stream``."""
        return texts(self.stream(prompt, image, params))

    def stream(self, prompt: str, image: Image.Image | None = None, params: GenParams | None = None
               ) -> Iterator[Chunk]:
        """Stream the answer, piece by piece; closing the iterator stops the model within one token."""
        params = params or GenParams()
        inputs, _ = self._inputs(self.tokenize(prompt), image)
        with self._lock:
            yield from self._stream(inputs, params)

    def _stream(self, inputs: dict[str, Any], params: GenParams) -> Iterator[Chunk]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        if params.max_tokens <= 0:
            yield Chunk("", 0, "length")
            return
        cancel = threading.Event()
        q: queue.Queue = queue.Queue()
        processors = LogitsProcessorList()
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
            processors.append(_Sampler(params.temperature, params.top_p, seed, self.model.device))
        # a clean config: the folder's sampling defaults (top_k, repetition penalty) must not change the answer
        config = GenerationConfig(max_new_tokens=params.max_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=self.eos_ids or None,
                                  # ignore_eos: end of turn is suppressed until max_tokens (HF refills a None eos)
                                  min_new_tokens=params.max_tokens if params.ignore_eos else None,
                                  pad_token_id=self.tokenizer.pad_token_id
                                  if self.tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0])

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**inputs, generation_config=config, logits_processor=processors,
                                        stopping_criteria=StoppingCriteriaList([_Cancel(cancel)]),
                                        streamer=_QueueStreamer(q))
            except BaseException as e:  # handed to the consumer, which raises it
                q.put(("error", e))
                q.put(("end", None))

        thread = threading.Thread(target=work, name="edgemed-generate", daemon=True)
        thread.start()

        def token_ids() -> Generator[int, None, str]:
            while True:
                kind, value = q.get()
                if kind == "error":
                    raise value
                if kind == "end":
                    return "length"
                for t in value:
                    if t in self.eos_ids and not params.ignore_eos:  # end of text or end of turn
                        return "stop"
                    yield t

        try:
            yield from stream_text(token_ids(), self._decode, params.stop)
        finally:
            cancel.set()
            thread.join()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def close(self) -> None:
        with self._lock:
            self.model = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


def _accepted(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``kwargs`` that ``fn`` names as parameters (all of them if it takes ``**kwargs``)."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


