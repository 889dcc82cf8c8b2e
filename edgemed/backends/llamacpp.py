"""The llama.cpp runtime: a GGUF export folder (``edgemed export gguf``) as a Backend.

Prompts are rendered by the HF tokenizer/processor files saved beside the GGUF files, so the template is the
one the model was fine-tuned with; tokens, logits and answers come from llama.cpp (through llama-cpp-python's
low-level API). Images go through llama.cpp's multimodal library (mtmd) with the export's mmproj file: the
image placeholder in the token list is replaced by the projector's embeddings, decoded at the placeholder's
position, so logits line up with PyTorch's row for row.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed.archs import get_arch
from edgemed.artifacts import read_manifest
from edgemed.backends.base import GenParams, offline
from edgemed.backends.hf import HFBackend, load_processing
from edgemed.errors import ArtifactError, DataError
from edgemed.files import check_gguf, reading
from edgemed.probe import apply_mode, llamacpp_mode

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

KV_TYPES = {"f32": 0, "f16": 1}  # ggml_type of the KV cache


def _quiet(verbose: bool) -> None:
    """Route llama.cpp's and mtmd's logs through llama-cpp-python's logger (errors only unless verbose)."""
    import llama_cpp
    from llama_cpp import _logger, mtmd_cpp

    _logger.set_verbose(verbose)
    mtmd_cpp.mtmd_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


@dataclass
class _Cached:
    """What the context's cache holds for sequence 0: the text tokens decoded (empty: unknown, or an image), the
    logits rows kept for the first of them, and the LoRA adapter they were decoded with."""

    tokens: list[int] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    adapter: str | None = None

    def shared(self, tokens: list[int], need_rows: bool, adapter: str | None) -> int:
        """How many leading ``tokens`` can stay in the cache: at most all but the last (whose logits the decode
        gives), and, when every row's logits are wanted, only those whose rows were kept."""
        if not self.tokens or adapter != self.adapter:
            return 0
        limit = min(len(self.tokens), len(tokens) - 1, len(self.rows) if need_rows else len(tokens))
        n = 0
        while n < limit and self.tokens[n] == tokens[n]:
            n += 1
        return n

    def extended(self, token: int) -> _Cached:
        return _Cached([*self.tokens, token], self.rows, self.adapter) if self.tokens else _Cached()


class LlamaCppBackend(HFBackend):
    """A GGUF export answering through the edgemed Backend protocol.

    Args:
        folder: an export folder of kind "gguf".
        quant: which ``model-<quant>.gguf`` to load (default: the first quant the export lists).
        n_threads: CPU threads (default: all cores).
        n_ctx: context length in tokens.
        kv_type: KV-cache precision, "f32", "f16" or "auto" (f32 for an f32 model, so that it reproduces
            PyTorch's fp32 numbers; f16 otherwise, llama.cpp's default).
        verbose: let llama.cpp print its logs.
        processing: (processor, tokenizer) already loaded from this folder (another quant of it), instead of
            loading them again.
    """

    name = "llamacpp"

    def __init__(self, folder: Path | str, quant: str | None = None, n_threads: int | None = None,
                 n_ctx: int = 4096, n_batch: int = 512, kv_type: str = "auto", verbose: bool = False,
                 adapter: str | None = "default", processing: tuple[Any, Any] | None = None, **_: Any):
        offline()
        import llama_cpp
        from llama_cpp import _internals

        folder = Path(folder)
        manifest = read_manifest(folder, ("gguf",))
        models: dict[str, str] = manifest.get("models") or {}
        self.quant = (quant or (manifest.get("quants") or [None])[0] or "").lower()
        if self.quant not in models:
            raise ArtifactError(f"{folder}: has no model-{self.quant}.gguf; quants in this export: "
                                f"{', '.join(models) or 'none'}")
        self.path = folder / models[self.quant]
        if not self.path.is_file():
            raise ArtifactError(f"{self.path} is missing; the export is incomplete, export again")
        arch, is_vision = get_arch(manifest["arch"]), bool(manifest.get("mmproj"))
        super().__init__(folder, arch, is_vision, *(processing or load_processing(folder, arch, is_vision)))
        if self.image_token_id is None:  # a family without a placeholder text: the id the exporter recorded
            self.image_token_id = manifest.get("image_token_id")
        _quiet(verbose)
        llama_cpp.llama_backend_init()
        n_threads = int(n_threads or os.cpu_count() or 1)
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.cpu_mode = llamacpp_mode()  # AMX / repacked kernels only where a probe proved they run here
        apply_mode(self.cpu_mode, mp)
        check_gguf(self.path)  # a cut or foreign file is named here, not left to llama.cpp's loader
        with reading(self.path, "a GGUF model llama.cpp can load", todo="export it again"):
            self._model = _internals.LlamaModel(path_model=str(self.path), params=mp, verbose=verbose)
        if kv_type == "auto":
            kv_type = "f32" if self.quant == "f32" else "f16"
        if kv_type not in KV_TYPES:
            raise ArtifactError(f"unknown kv_type {kv_type!r}; choose auto, f32 or f16")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.type_k = cp.type_v = KV_TYPES[kv_type]
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # its f16 accumulation moves fp32 logits
        cp.no_perf = True
        self._ctx = _internals.LlamaContext(model=self._model, params=cp, verbose=verbose)
        self._load_adapters(manifest, adapter)
        self.n_ctx, self.n_batch = n_ctx, n_batch
        self._batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=verbose)
        self.n_vocab = self._model.n_vocab()
        self.n_embd = llama_cpp.llama_model_n_embd_inp(self._model.model)
        self._kv = _Cached()
        self._mtmd = None
        if self.is_vision:
            self._mtmd = self._load_mtmd(self.folder / manifest["mmproj"], n_threads)

    # ------------------------------------------------------------------ loading
    def _load_adapters(self, manifest: dict[str, Any], adapter: str | None) -> None:
        """LoRA adapter files of an adapter export (``export gguf RUN_DIR``); ``adapter`` picks the one used
        (None: the bare base). Adapters switch per request without reloading the base."""
        from edgemed.backends.llamacpp_adapters import Adapters, adapter_files

        self.adapters = Adapters(self._model.model, self._ctx.ctx, self.path)
        for name, file in adapter_files(manifest, self.quant).items():
            self.adapters.add(name, self.folder / file)
        if adapter == "default" and "default" not in self.adapters.loaded:
            adapter = None  # a merged export: the base is the model
        self.adapter = adapter
        self.adapters.use(adapter)

    def _select(self) -> None:
        """Set this request's adapter on the shared context (an AdapterView's own ``adapter``)."""
        self.adapters.use(self.adapter)

    def add_adapter(self, name: str, export_dir: Path | str) -> None:
        """Load another adapter export's LoRA file on this base (``edgemed serve --adapter NAME=DIR``)."""
        from edgemed.backends.llamacpp_adapters import add_export

        add_export(self, name, Path(export_dir))

    def with_adapter(self, name: str | None) -> LlamaCppBackend:
        """A view of this backend that answers with adapter ``name`` (None: the bare base), sharing the base
        weights, context and lock: a request switches the adapter on the context, the base is never reloaded."""
        from edgemed.backends.llamacpp_adapters import AdapterView

        if name is not None and name not in self.adapters.loaded:
            raise ArtifactError(f"no adapter {name!r}; loaded: {', '.join(self.adapters.loaded) or 'none'}")
        return AdapterView(self, name)  # type: ignore[return-value]

    def _load_mtmd(self, mmproj: Path, n_threads: int):
        from llama_cpp import mtmd_cpp

        if not mmproj.is_file():
            raise ArtifactError(f"{mmproj} is missing; the export is incomplete, export again")
        check_gguf(mmproj)
        p = mtmd_cpp.mtmd_context_params_default()
        p.use_gpu = False
        p.n_threads = n_threads
        p.print_timings = False
        p.warmup = False
        ip = getattr(self.processor, "image_processor", None)
        if self.arch.gguf is not None and self.arch.gguf.mtmd_tokens is not None and ip is not None:
            p.image_min_tokens, p.image_max_tokens = self.arch.gguf.mtmd_tokens(ip)
        ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self._model.model, p)
        if not ctx:
            raise ArtifactError(f"llama.cpp's mtmd could not load {mmproj} with {self.path.name}; "
                                "run with verbose=True to see why")
        return ctx

    # ------------------------------------------------------------------ text
    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenization: special tokens parsed, BOS added once when the model adds one."""
        ids = self._model.tokenize(text.encode("utf-8"), False, True)
        bos = self._model.token_bos()
        if self._model.add_bos_token() and ids[:1] != [bos]:  # not when the template wrote BOS itself
            ids = [bos, *ids]
        return ids

    def _detokenize(self, ids: list[int]) -> str:
        return self._model.detokenize(ids, special=False).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ decoding
    def _decode_tokens(self, tokens: list[int], pos0: int, logits: str) -> list[np.ndarray]:
        """Decode ``tokens`` at positions pos0...; return logits rows (all, or only the last)."""
        import numpy as np

        rows: list[np.ndarray] = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            last_chunk = start + self.n_batch >= len(tokens)
            b = self._batch.batch
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = pos0 + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = logits == "all" or (logits == "last" and last_chunk and i == len(chunk) - 1)
            self._ctx.decode(self._batch)
            if logits == "all":
                ptr = self._ctx.get_logits()
                arr = np.ctypeslib.as_array(ptr, shape=(len(chunk), self.n_vocab))
                rows.extend(arr.copy())
            elif logits == "last" and last_chunk:
                rows.append(self._last_logits())
        return rows

    def _last_logits(self) -> np.ndarray:
        import numpy as np

        return np.ctypeslib.as_array(self._ctx.get_logits_ith(-1), shape=(self.n_vocab,)).copy()

    def _image_chunk(self, image: Image.Image):
        """mtmd's image chunk for ``image``, kept in a chunks list. mtmd is given the image as the model's processor
        resized it, so that its own resize changes nothing (``edgemed.backends.mtmd_images``)."""
        from llama_cpp import mtmd_cpp

        from edgemed.backends.mtmd_images import processor_pixels

        rgb = processor_pixels(self.processor, self.arch, image)
        data = rgb.tobytes()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        bitmap = mtmd_cpp.mtmd_bitmap_init(rgb.width, rgb.height, buf)
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        marker = mtmd_cpp.mtmd_default_marker()
        text = mtmd_cpp.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
        bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
        try:
            rc = mtmd_cpp.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise DataError(f"llama.cpp's mtmd could not read the image ({rgb.width}x{rgb.height}), code {rc}")
        finally:
            mtmd_cpp.mtmd_bitmap_free(bitmap)
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                return chunks, chunk
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        raise DataError("llama.cpp's mtmd made no image chunk from the image")

    def _encode(self, chunk) -> np.ndarray:
        import numpy as np
        from llama_cpp import mtmd_cpp

        if mtmd_cpp.mtmd_encode_chunk(self._mtmd, chunk) != 0:
            raise DataError("llama.cpp's mtmd failed to encode the image")
        n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
        ptr = mtmd_cpp.mtmd_get_output_embd(self._mtmd)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_embd)).copy()

    def _decode_image(self, chunk, emb: np.ndarray, pos0: int) -> tuple[np.ndarray, int]:
        """Decode image embeddings at pos0...; return the logits after the last one and the positions used.

        Where the image tokens attend causally (LLaVA, Qwen2.5-VL) they are decoded in pieces of ``n_batch``, as
        mtmd's own helper does: LLaVA-1.5's 576 tokens exceed the default batch of 512. Where they attend both ways
        (Gemma 3) the whole image must be one batch; a context opened too small for it says so."""
        import numpy as np
        from llama_cpp import mtmd_cpp

        n = emb.shape[0]
        mrope = mtmd_cpp.mtmd_decode_use_mrope(self._mtmd)
        n_pos = mtmd_cpp.mtmd_input_chunk_get_n_pos(chunk)
        non_causal = mtmd_cpp.mtmd_decode_use_non_causal(self._mtmd, chunk)
        if non_causal and n > self.n_batch:
            raise DataError(f"the image gives {n} embeddings that attend to each other both ways, more than "
                            f"n_batch={self.n_batch}; open the backend with n_batch of at least {n}")
        nx = mtmd_cpp.mtmd_image_tokens_get_nx(mtmd_cpp.mtmd_input_chunk_get_tokens_image(chunk)) if mrope else 0
        flat = np.ascontiguousarray(emb, dtype=np.float32)
        for start in range(0, n, self.n_batch):
            self._decode_embeddings(flat[start:start + self.n_batch], start, n, pos0, nx, mrope, non_causal)
        return self._last_logits(), n_pos

    def _decode_embeddings(self, part: np.ndarray, start: int, n: int, pos0: int, nx: int, mrope: bool,
                           non_causal: bool) -> None:
        """One llama_decode of image embeddings ``start..start+len(part)`` of ``n``; logits for the image's last."""
        import llama_cpp

        m = part.shape[0]
        # M-RoPE (Qwen2.5-VL) takes 4 positions per embedding: allocate room for them in the batch itself
        batch = llama_cpp.llama_batch_init(4 * m if mrope else m, self.n_embd, 1)
        try:
            batch.n_tokens = m
            ctypes.memmove(batch.embd, part.ctypes.data, part.nbytes)
            for j in range(m):
                i = start + j
                if mrope:  # temporal, row, column and an unused section, laid out as mtmd's helper does
                    y, x = divmod(i, nx)
                    batch.pos[j], batch.pos[m + j], batch.pos[2 * m + j], batch.pos[3 * m + j] = (
                        pos0, pos0 + y, pos0 + x, 0)
                else:
                    batch.pos[j] = pos0 + i
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = i == n - 1
            if non_causal:  # image tokens attend to each other both ways (Gemma 3)
                llama_cpp.llama_set_causal_attn(self._ctx.ctx, False)
            try:
                rc = llama_cpp.llama_decode(self._ctx.ctx, batch)
            finally:
                if non_causal:
                    llama_cpp.llama_set_causal_attn(self._ctx.ctx, True)
            if rc != 0:
                raise DataError(f"llama_decode of the image embeddings returned {rc}")
        finally:
            llama_cpp.llama_batch_free(batch)

    def _prefill(self, tokens: list[int], image: Image.Image | None, logits: str) -> tuple[list[np.ndarray], int]:
        """Decode the prompt (image placeholder expanded) into a fresh cache; return logits rows and n_past.

        A text prompt that starts with tokens already in the cache (the chat template's opening, or the prompt of
        the teacher-forced sequence just scored) decodes only the rest: the cache is cut after the shared part,
        whose logits rows, when asked for, are those kept from when it was decoded (same tokens, same positions).
        """
        from llama_cpp import mtmd_cpp

        if len(tokens) == 0:
            raise DataError("no tokens to decode")
        if image is None and len(tokens) >= self.n_ctx:
            raise DataError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}")
        kept, self._kv = self._kv, _Cached()  # unknown until this decode completes
        if image is None:
            n = kept.shared(tokens, logits == "all", self.adapters.active)
            if n and self._ctx.kv_cache_seq_rm(0, n, -1):
                rows = self._decode_tokens(tokens[n:], n, logits)
                rows = [*kept.rows[:n], *rows] if logits == "all" else rows
                self._kv = _Cached(list(tokens), rows if logits == "all" else kept.rows[:n], self.adapters.active)
                return rows, len(tokens)
        self._ctx.kv_cache_clear()
        if image is None:
            rows = self._decode_tokens(tokens, 0, logits)
            self._kv = _Cached(list(tokens), rows if logits == "all" else [], self.adapters.active)
            return rows, len(tokens)
        k = self._placeholder_index(tokens)
        pre, post = tokens[:k], tokens[k + 1:]
        wrap = self.arch.gguf.image_wrap if self.arch.gguf else ("", "")
        before = self._model.tokenize(wrap[0].encode(), False, True) if wrap[0] else []
        after = self._model.tokenize(wrap[1].encode(), False, True) if wrap[1] else []
        chunks, chunk = self._image_chunk(image)
        try:
            rows = self._decode_tokens(pre + before, 0, "all" if logits == "all" else "none")[: len(pre)]
            pos = len(pre) + len(before)
            emb = self._encode(chunk)
            last, n_pos = self._decode_image(chunk, emb, pos)
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
        pos += n_pos
        if after:
            last = self._decode_tokens(after, pos, "last")[-1]
            pos += len(after)
        if pos + len(post) >= self.n_ctx:
            raise DataError(f"the prompt with its image does not fit the context of {self.n_ctx} tokens")
        rest = self._decode_tokens(post, pos, logits) if post else []
        if logits == "all":
            return [*rows, last, *rest], pos + len(post)
        return ([rest[-1]] if rest else [last]), pos + len(post)

    # ------------------------------------------------------------------ numbers
    def _logits(self, tokens: list[int], image: Image.Image | None) -> np.ndarray:
        import numpy as np

        rows, _ = self._prefill(tokens, image, "all")
        return np.stack(rows).astype(np.float32, copy=False)  # stack copies: the rows kept stay as they were

    def _image_embeddings(self, image: Image.Image) -> np.ndarray:
        from llama_cpp import mtmd_cpp

        chunks, chunk = self._image_chunk(image)
        try:
            return self._encode(chunk)
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)

    # ------------------------------------------------------------------ generation
    def _sampler(self, params: GenParams):
        from llama_cpp import _internals

        s = _internals.LlamaSampler()
        if params.temperature <= 0:
            s.add_greedy()
            return s
        s.add_temp(params.temperature)  # temperature, then top-p, as transformers orders them
        if params.top_p < 1.0:
            s.add_top_p(params.top_p, 1)
        s.add_dist(self._seed(params) & 0xFFFFFFFF)
        return s

    def _token_ids(self, tokens: list[int], image: Image.Image | None, params: GenParams
                   ) -> Generator[int, None, str]:
        """Sampled ids, each decoded into the context once the next one is asked for.

        The end of an answer is the shared ``eos_ids`` (what transformers stops on), not llama.cpp's
        ``llama_vocab_is_eog``, so that a GGUF export stops where its PyTorch model does."""
        import llama_cpp

        _, n_past = self._prefill(tokens, image, "last")
        sampler = self._sampler(params)
        try:
            while n_past < self.n_ctx:
                t = llama_cpp.llama_sampler_sample(sampler.sampler, self._ctx.ctx, -1)
                yield t
                kept, self._kv = self._kv, _Cached()
                self._decode_tokens([t], n_past, "last")
                self._kv = kept.extended(t)
                n_past += 1
            return "length"
        finally:
            sampler.close()

    def close(self) -> None:
        from llama_cpp import mtmd_cpp

        with self._lock:
            if self._mtmd:
                mtmd_cpp.mtmd_free(self._mtmd)
                self._mtmd = None
            for obj in ("_batch", "_ctx", "_model"):
                o = getattr(self, obj, None)
                if o is not None:
                    o.close()
                    setattr(self, obj, None)

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass


