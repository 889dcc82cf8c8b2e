"""Runtimes that answer from a model folder: PyTorch (reference), llama.cpp (GGUF) and onnxruntime (ONNX).

``open_backend(path)`` picks the runtime from the folder's manifest, so every command needs only a path.
"""

from __future__ import annotations

from pathlib import Path

from edgemed.artifacts import read_manifest
from edgemed.backends.base import Backend, GenParams
from edgemed.errors import ArtifactError


def open_backend(path: Path | str, *, chat_template: str | None = None, **kw) -> Backend:
    """Open the model in ``path`` with the runtime its manifest names (kind run/model -> PyTorch, gguf, onnx).

    ``chat_template`` (template text) replaces the template the folder carries, or gives a base model one.
    """
    manifest = read_manifest(path)
    kind = manifest.get("kind")
    if kind in ("run", "model"):
        from edgemed.backends.pytorch import TorchBackend

        return use_template(TorchBackend(Path(path), **kw), chat_template)
    if kind == "gguf":
        from edgemed.backends.llamacpp import LlamaCppBackend

        return use_template(LlamaCppBackend(Path(path), **kw), chat_template)
    if kind == "onnx":
        from edgemed.backends.onnx import OnnxBackend

        return use_template(OnnxBackend(Path(path), **kw), chat_template)
    raise ArtifactError(f"{path}: artifact kind {kind!r} has no runtime; give a model, run, gguf or onnx folder")


def use_template(backend: Backend, chat_template: str | None) -> Backend:
    """Make ``backend`` render with ``chat_template`` (a user's --chat-template), on its tokenizer and processor."""
    if chat_template is not None:
        for owner in {id(o): o for o in (getattr(backend, "processor", None), getattr(backend, "tokenizer", None))
                      if o is not None}.values():
            owner.chat_template = chat_template
    return backend


__all__ = ["Backend", "GenParams", "open_backend", "use_template"]
