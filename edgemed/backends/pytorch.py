"""The PyTorch reference runtime: a transformers model folder (or a run folder with its adapter) as a Backend.

Every other runtime is compared against this one, so it does the least possible by hand: transformers' processor
expands the image placeholder and its ``generate`` drives the decoder (KV cache, the family's position and
attention rules). Sampling is done in a logits processor with the request's own seeded generator (the draw the
ONNX runtime makes too), so the same seed gives the same answer in any thread and whatever else ran before.
"""

from __future__ import annotations

import gc
import queue
import threading
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed.artifacts import MANIFEST
from edgemed.backends.base import GenParams, offline
from edgemed.backends.hf import HFBackend, sample
from edgemed.errors import ArtifactError
from edgemed.modeling import DTYPES, load_any

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# keys of a processor's output that are not image inputs of the model
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
BATCH_TOKENS = 1024  # padded tokens per batched forward: beyond a few hundred rows a CPU matmul gains little
BATCH_LOGIT_BYTES = 256 << 20  # float32 logits per batch (262144-wide Gemma rows: 256 tokens)
# padded tokens (prompt + answer) per batch of greedy answers. Greedy decoding keeps one logits row per sequence,
# and each decode step reads every weight once for the whole batch, so on a CPU its time goes with the number of
# batches, not their width: a 0.5B fp32 model's 32 probes took 38 s in batches of 441 tokens (4 of them, the logits
# budget above) and far less in one
GENERATE_TOKENS = 4096


class _Sampler:
    """Temperature and top-p sampling as a logits processor: keeps only the drawn token, so greedy search takes it.

    transformers' own sampling draws from torch's global generator, which concurrent or earlier work disturbs;
    the request's own generator makes an answer a function of its seed alone (the draw is ``hf.sample``'s, as
    onnxruntime's is).
    """

    def __init__(self, params: GenParams, rng: Any):
        self.temperature, self.top_p, self.rng = params.temperature, params.top_p, rng

    def __call__(self, input_ids, scores):
        import torch

        pick = sample(scores[0].float().cpu().numpy(), self.temperature, self.top_p, self.rng)
        out = torch.full_like(scores, float("-inf"))
        out[:, pick] = 0.0
        return out


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


def _require_memory(folder: Path, dtype: str) -> None:
    """Refuse, before any weight loads, a model this machine cannot hold at ``dtype`` (edgemed.memory's rule).
    Parity's lazy reference is left to parity's own check, which counts the reference with the exports."""
    from edgemed import memory
    from edgemed.modeling import weights_dir

    memory.require(memory.pytorch_need(weights_dir(folder), dtype),
                   f"opening {folder} in PyTorch ({dtype}; a GGUF or ONNX export of it needs a fraction of that)")


class TorchBackend(HFBackend):
    """A transformers model answering through the edgemed Backend protocol (the reference for every export).

    Args:
        folder: a model folder (manifest kind "model", or any transformers folder with config.json) or a run
            folder (kind "run": base model plus adapter).
        dtype: float32, bfloat16 or float16.
        n_threads: CPU threads for torch (default: torch's choice).
        device: "cpu", "cuda", "cuda:1"...; default CUDA when available.
        lazy: load only the tokenizer and processor now, the weights when a number or an answer is first asked
            for (parity's reference: a warm cache needs its prompts, not its weights).
    """

    name = "pytorch"

    def __init__(self, folder: Path | str, dtype: str = "float32", n_threads: int | None = None,
                 device: str | None = None, lazy: bool = False, **_: Any):
        offline()  # never reach for a hub: everything is in the folder
        import torch

        folder = Path(folder)
        if not (folder / "config.json").is_file() and not (folder / MANIFEST).is_file():
            raise ArtifactError(f"{folder}: neither a model folder (config.json) nor an edgemed folder "
                                "(manifest.json); give a model, run or export folder")
        if dtype not in DTYPES:
            raise ArtifactError(f"unknown dtype {dtype!r} for the PyTorch backend; choose one of {', '.join(DTYPES)}")
        if n_threads:
            torch.set_num_threads(int(n_threads))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype, self._model, self._closed = dtype, None, False
        if lazy:
            arch, processor, tokenizer, base_dir = _text_side(folder)
        else:
            if self.device == "cpu":
                _require_memory(folder, dtype)
            loaded = load_any(folder, dtype=dtype, device=self.device)  # a run folder: base + adapter + trained
            self._model = loaded.model.eval()
            arch, processor, tokenizer, base_dir = loaded.arch, loaded.processor, loaded.tokenizer, loaded.base_dir
        super().__init__(folder, arch, arch.is_vision, processor, tokenizer, hf_dir=base_dir)

    @property
    def model(self) -> Any:
        """The transformers model (loaded here on first use when the backend was opened ``lazy``)."""
        if self._model is None and not self._closed:
            self._model = load_any(self.folder, dtype=self.dtype, device=self.device).model.eval()
        return self._model

    @model.setter
    def model(self, value: Any) -> None:
        self._model = value

    @property
    def weights_loaded(self) -> bool:
        return self._model is not None

    # ------------------------------------------------------------------ model inputs
    def _inputs(self, tokens: list[int], image: Image.Image | None) -> tuple[dict[str, Any], list[int]]:
        """Model inputs for ``tokens`` (and the image), and for each token the row of the model's output it maps to;
        with an image the processor does the family's expansion of the placeholder."""
        import torch

        if image is None:
            ids = torch.tensor([tokens], device=self.device)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, list(range(len(tokens)))
        enc, _, rows = self._expand_placeholder(list(tokens), image, "pt")
        inputs = {key: (v.to(self.device) if hasattr(v, "to") else v) for key, v in enc.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs, rows

    def _image_inputs(self, image: Image.Image) -> dict[str, Any]:
        prompt = self.render("", image=True)
        inputs, _ = self._inputs(self.tokenize(prompt), image)
        return {k: v for k, v in inputs.items() if k not in _TEXT_KEYS}

    # ------------------------------------------------------------------ numbers
    def _logits(self, tokens: list[int], image: Image.Image | None) -> np.ndarray:
        import torch

        inputs, rows = self._inputs(tokens, image)
        with torch.inference_mode():
            out = self.model(**inputs, use_cache=False)
        return out.logits[0, rows].float().cpu().numpy()

    def logits_batch(self, seqs: list[list[int]]) -> list[np.ndarray]:
        """Teacher-forced logits of several text sequences (``logits`` of each, up to float summation order): run
        in right-padded batches of similar length, at most ``BATCH_TOKENS`` tokens and ``BATCH_LOGIT_BYTES`` of
        logits each. Right padding leaves every real position's causal context unchanged."""
        import torch

        out: list[np.ndarray | None] = [None] * len(seqs)
        with self._lock:
            for group in self._groups([len(s) for s in seqs]):
                width = max(len(seqs[i]) for i in group)
                ids = torch.full((len(group), width), self._pad_id(), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, i in enumerate(group):
                    ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
                    mask[r, :len(seqs[i])] = 1
                with torch.inference_mode():
                    logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                        use_cache=False).logits
                for r, i in enumerate(group):
                    out[i] = logits[r, :len(seqs[i])].float().cpu().numpy()
        return out  # type: ignore[return-value]

    def generate_batch(self, prompts: list[str], params: GenParams | None = None) -> list[str]:
        """Greedy answers to several rendered text prompts, each what ``generate`` gives (up to float summation
        order): left-padded batches through transformers' ``generate``, each row cut at its first end id. Sampling,
        stop strings and ``ignore_eos`` go one prompt at a time."""
        params = params or GenParams()
        if params.temperature > 0 or params.stop or params.ignore_eos or params.max_tokens <= 0:
            return ["".join(self.generate(p, params=params)) for p in prompts]
        toks = [self.tokenize(p) for p in prompts]
        out = [""] * len(prompts)
        with self._lock:
            for group in self._groups([len(t) + params.max_tokens for t in toks], rows_per_token=False):
                for i, ids in zip(group, self._greedy_ids([toks[i] for i in group], params.max_tokens), strict=True):
                    out[i] = _text_of(ids, self._detokenize)
        return out

    def _greedy_ids(self, toks: list[list[int]], max_tokens: int) -> list[list[int]]:
        import torch
        from transformers import GenerationConfig

        width = max(len(t) for t in toks)
        ids = torch.full((len(toks), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, t in enumerate(toks):
            ids[r, width - len(t):] = torch.tensor(t)
            mask[r, width - len(t):] = 1
        config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=self.eos_ids or None, pad_token_id=self._pad_id())
        with torch.inference_mode():
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=config)
        rows = []
        for row in gen[:, width:].tolist():
            end = next((k for k, t in enumerate(row) if t in self.eos_ids), len(row))
            rows.append(row[:end])
        return rows

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else (self.eos_ids or [0])[0]

    def _groups(self, lengths: list[int], rows_per_token: bool = True) -> list[list[int]]:
        """Indices batched by similar length. Teacher-forced batches (``rows_per_token``: a logits row per token)
        hold at most BATCH_TOKENS padded tokens and BATCH_LOGIT_BYTES of float32 logits; greedy batches (a row per
        sequence at each step) at most GENERATE_TOKENS padded tokens and BATCH_LOGIT_BYTES of one step's logits."""
        head = self.model.get_output_embeddings()
        vocab = int(head.weight.shape[0]) if head is not None else 262144  # unknown: budget for a wide one
        tokens = BATCH_TOKENS if rows_per_token else GENERATE_TOKENS
        groups: list[list[int]] = []
        for i in sorted(range(len(lengths)), key=lengths.__getitem__):  # ascending: lengths[i] is the widest
            n = len(groups[-1]) + 1 if groups else 1
            rows = n * lengths[i] if rows_per_token else n
            if groups and n * lengths[i] <= tokens and rows * 4 * vocab <= BATCH_LOGIT_BYTES:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def _image_embeddings(self, image: Image.Image) -> np.ndarray:
        import torch

        inputs = self._image_inputs(image)
        fn = getattr(self.model, "get_image_features", None) or getattr(getattr(self.model, "model", None),
                                                                        "get_image_features", None)
        with torch.inference_mode():
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
    def _token_ids(self, tokens: list[int], image: Image.Image | None, params: GenParams
                   ) -> Generator[int, None, str]:
        """transformers' ``generate`` in a thread, its ids handed over through a queue; closing this ends it."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        inputs, _ = self._inputs(tokens, image)
        cancel = threading.Event()
        q: queue.Queue = queue.Queue()
        rng = self._rng(params)
        processors = LogitsProcessorList([_Sampler(params, rng)] if rng is not None else [])
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
        try:
            while True:
                kind, value = q.get()
                if kind == "error":
                    raise value
                if kind == "end":
                    return "length"
                yield from value
        finally:
            cancel.set()
            thread.join()

    def release_weights(self) -> None:
        """Drop the loaded weights of a ``lazy`` backend (they load again if asked for); tokenizer and processor
        stay. Parity calls it once the reference's turns are had."""
        if self._model is None:
            return
        with self._lock:
            self._model = None
        gc.collect()

    def close(self) -> None:
        with self._lock:
            self._closed, self._model = True, None
        # garbage cycles that still point at the model (left from loading it) go now, not whenever the collector
        # next runs, which tensor bytes never trigger: what comes next (an export converting its tensors after an
        # importance-matrix pass) does not run beside a dead fp32 model
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


def _text_of(ids: list[int], detokenize: Any) -> str:
    """The text ``generate`` yields for these ids (the shared stream loop, no stop strings)."""
    from edgemed.backends.base import stream_text

    def gen() -> Generator[int, None, str]:
        yield from ids
        return "stop"

    return "".join(c.text for c in stream_text(gen(), detokenize, []))


def _text_side(folder: Path) -> tuple[Any, Any, Any, Path]:
    """(arch, processor, tokenizer, folder of the transformers files) of a model or run folder, without its weights:
    what ``load_any`` gives besides the model. A run's base is hash-checked when its weights load."""
    from edgemed.archs import arch_for_dir
    from edgemed.files import reading
    from edgemed.manifest import kind_of
    from edgemed.modeling import load_processor, run_base

    base = run_base(folder, check_hash=False) if kind_of(folder) == "run" else folder
    arch = arch_for_dir(base)
    with reading(base, "the tokenizer and processor files saved with the model"):
        processor, tokenizer = load_processor(base, arch)
    return arch, processor, tokenizer, base


def _accepted(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``kwargs`` that ``fn`` names as parameters (all of them if it takes ``**kwargs``)."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


