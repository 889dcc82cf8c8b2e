"""LoRA adapter files on one llama.cpp base model: loaded once each, switched per request on the context.

llama.cpp keeps the base weights untouched and adds ``alpha/r * B (A x)`` per adapted tensor at compute time, so
switching adapters is a pointer swap on the context (``llama_set_adapters_lora``), never a reload of the base.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from edgemed.backends.hf import HFBackend
from edgemed.errors import ArtifactError

BASE_TREE_KEY = "edgemed.base_model.tree_sha256"  # written by edgemed.export.gguf_adapter
SOURCE_TREE_KEY = "edgemed.source.tree_sha256"  # written in every base GGUF by edgemed.export.gguf


def _meta(fn, obj, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = fn(obj, key.encode(), buf, len(buf))
    return buf.value.decode() if n >= 0 else None


def adapter_files(manifest: dict[str, Any], quant: str, base_sha256: str | None = None) -> dict[str, str]:
    """Adapter name -> file of an export for a base at ``quant``: where the export holds a correction of that
    quant's rounding (``export gguf RUN --compensate``), "default" is that file, which was made for exactly that
    base file. ``base_sha256``: the served base file's hash where it is another export's; the correction is used
    only if the export's own base at ``quant`` had the same bytes (otherwise the plain LoRA file is)."""
    files = dict(manifest.get("adapters") or {})
    own = (manifest.get("compensated") or {}).get(quant)
    made_for = ((manifest.get("binding") or {}).get("base") or {}).get(quant)
    if own and "default" in files and (base_sha256 is None or base_sha256 == made_for):
        files["default"] = own
    return files


class Adapters:
    """The adapters loaded on one llama.cpp model, and which one is set on its context."""

    def __init__(self, model: Any, ctx: Any, base_path: Path):
        self._model, self._ctx, self.base_path = model, ctx, base_path
        self.loaded: dict[str, Any] = {}
        self.active: str | None = None

    def add(self, name: str, path: Path) -> None:
        """Load ``path`` (a GGUF with general.type = adapter) as ``name``, after checking it fits this base."""
        import llama_cpp

        if name in self.loaded:
            raise ArtifactError(f"adapter name {name!r} is given twice; give each adapter its own name")
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; the export is incomplete, export again")
        ptr = llama_cpp.llama_adapter_lora_init(self._model, str(path).encode())
        if not ptr:
            raise ArtifactError(f"llama.cpp could not load the LoRA adapter {path} on {self.base_path.name} (wrong "
                                "architecture or tensor shapes); export the run again against this base")
        want = _meta(llama_cpp.llama_adapter_meta_val_str, ptr, BASE_TREE_KEY)
        have = _meta(llama_cpp.llama_model_meta_val_str, self._model, SOURCE_TREE_KEY)
        if want and have and want != have:
            llama_cpp.llama_adapter_lora_free(ptr)
            raise ArtifactError(f"{path}: adapter made for base {want[:12]}…, but {self.base_path.name} was exported "
                                f"from {have[:12]}…; serve it with the base it was exported with")
        self.loaded[name] = ptr

    def use(self, name: str | None) -> None:
        """Set adapter ``name`` (None: the bare base) on the context; a no-op when it is already set."""
        import llama_cpp

        if name == self.active:
            return
        if name is None:
            rc = llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            if name not in self.loaded:
                raise ArtifactError(f"no adapter {name!r}; loaded: {', '.join(self.loaded) or 'none'}")
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.loaded[name])
            scales = (ctypes.c_float * 1)(1.0)
            rc = llama_cpp.llama_set_adapters_lora(self._ctx, arr, 1, scales)
        if rc != 0:
            raise ArtifactError(f"llama.cpp could not set adapter {name!r} (llama_set_adapters_lora returned {rc})")
        self.active = name


def add_export(backend: Any, name: str, export_dir: Path) -> None:
    """Load the LoRA file of adapter export ``export_dir`` onto ``backend``'s base, checking both were exported
    from the same base checkpoint (the manifests' binding)."""
    from edgemed.artifacts import read_manifest

    m = read_manifest(export_dir, ("gguf",))
    served = read_manifest(backend.folder)
    base_sha = ((served.get("binding") or {}).get("base") or {}).get(backend.quant) or "not an adapter export"
    files = adapter_files(m, backend.quant, base_sha)
    if "default" not in files:
        raise ArtifactError(f"{export_dir}: holds no LoRA adapter file; export the run folder with "
                            "`edgemed export gguf RUN_DIR` to get one")
    own = read_manifest(backend.folder).get("binding", {}).get("base_tree_sha256") or (read_manifest(
        backend.folder).get("base_model") or {}).get("sha256")
    theirs = (m.get("binding") or {}).get("base_tree_sha256")
    if own and theirs and own != theirs:
        raise ArtifactError(f"{export_dir}: its adapter was made for base {theirs[:12]}…, not the served base "
                            f"{own[:12]}…; serve it with the base it was exported with")
    backend.adapters.add(name, export_dir / files["default"])


class AdapterView:
    """One backend's base answering with one adapter: everything else is the backend's (weights, context, lock).

    The request methods are the backend's own (``HFBackend``'s), run on this view: under the shared lock they set
    ``self.adapter``, the view's, on the context.
    """

    def __init__(self, backend: Any, adapter: str | None):
        self._backend = backend
        self.adapter = adapter

    def __getattr__(self, name: str) -> Any:  # tokenizer, render, tokenize, image_embeddings, _lock, ...
        return getattr(self._backend, name)

    logits = HFBackend.logits
    stream = HFBackend.stream
    generate = HFBackend.generate

    def _select(self) -> None:
        self._backend.adapters.use(self.adapter)

    def close(self) -> None:
        """A view owns nothing: closing it leaves the shared backend open."""
