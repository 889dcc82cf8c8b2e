"""Runtimes that answer from a model folder: PyTorch (reference), llama.cpp (GGUF) and onnxruntime (ONNX).

``open_model(path)`` is the one way edgemed opens a model: it picks the runtime from the folder's manifest (or
PyTorch for a plain transformers folder), so every command needs only a path.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgemed.artifacts import MANIFEST, read_manifest
from edgemed.backends.base import Backend, Chunk, GenParams, offline
from edgemed.errors import ArtifactError

log = logging.getLogger(__name__)

RUNTIMES = {"run": "pytorch", "model": "pytorch", "gguf": "llamacpp", "onnx": "onnx"}  # manifest kind -> runtime


def runtime_of(manifest: dict[str, Any] | None) -> str:
    """The runtime that opens a folder with this manifest (a plain transformers folder has none: PyTorch)."""
    return RUNTIMES.get((manifest or {}).get("kind", ""), "pytorch")


def open_model(path: Path | str, *, verify: bool = False, chat_template: str | None = None, **kw: Any) -> Backend:
    """Open the model in ``path``: an edgemed folder with the runtime its manifest names (run/model -> PyTorch,
    gguf -> llama.cpp, onnx -> onnxruntime), or a plain transformers folder (config.json, no manifest) with PyTorch.

    Args:
        verify: refuse a folder whose files do not match its manifest (serve does this before it listens).
        chat_template: template text that replaces the one the folder carries, or gives a base model one.
        **kw: passed to the runtime (quant, n_threads, n_ctx, dtype, ...).
    """
    offline()
    folder = Path(path)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such folder; give an export, run or model folder")
    if (folder / MANIFEST).is_file():
        manifest = read_manifest(folder)
        kind = manifest.get("kind")
        if kind not in RUNTIMES:
            raise ArtifactError(f"{folder}: artifact kind {kind!r} has no runtime; give a model, run, gguf or onnx "
                                "folder")
        if verify:
            _verify(folder)
        runtime = RUNTIMES[kind]
    elif (folder / "config.json").is_file():
        log.warning("%s has no manifest.json: opening it as a plain transformers folder, unverified", folder)
        runtime = "pytorch"
    else:
        raise ArtifactError(f"{folder}: neither an edgemed folder (manifest.json) nor a transformers model folder "
                            "(config.json); give the folder `edgemed export`, `merge` or `finetune` wrote")
    if runtime == "llamacpp":
        from edgemed.backends.llamacpp import LlamaCppBackend as cls
    elif runtime == "onnx":
        from edgemed.backends.onnx import OnnxBackend as cls
    else:
        from edgemed.backends.pytorch import TorchBackend as cls
    return use_template(cls(folder, **kw), chat_template)


def _verify(folder: Path) -> None:
    from edgemed.bundle import verify

    problems = verify(folder)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ArtifactError(f"{folder}: fails verification against its manifest ({shown}); "
                            "re-export it, or pass --no-verify to use it anyway")


def use_template(backend: Backend, chat_template: str | None) -> Backend:
    """Make ``backend`` render with ``chat_template`` (a user's --chat-template), on its tokenizer and processor."""
    if chat_template is not None:
        for owner in {id(o): o for o in (backend.processor, backend.tokenizer) if o is not None}.values():
            owner.chat_template = chat_template
    return backend


__all__ = ["Backend", "Chunk", "GenParams", "offline", "open_model", "runtime_of", "use_template"]
