"""Runtimes that answer from a model folder: PyTorch (reference), llama.cpp (GGUF) and onnxruntime (ONNX).

``open_backend(path)`` picks the runtime from the folder's manifest, so every command needs only a path.
"""

from __future__ import annotations

from pathlib import Path

from edgemed.artifacts import read_manifest
from edgemed.backends.base import Backend, GenParams
from edgemed.errors import ArtifactError


def open_backend(path: Path | str, **kw) -> Backend:
    """Open the model in ``path`` with the runtime its manifest names (kind run/model -> PyTorch, gguf, onnx)."""
    manifest = read_manifest(path)
    kind = manifest.get("kind")
    if kind in ("run", "model"):
        from edgemed.backends.pytorch import TorchBackend

        return TorchBackend(Path(path), **kw)
    if kind == "gguf":
        from edgemed.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(Path(path), **kw)
    if kind == "onnx":
        from edgemed.backends.onnx import OnnxBackend

        return OnnxBackend(Path(path), **kw)
    raise ArtifactError(f"{path}: artifact kind {kind!r} has no runtime; give a model, run, gguf or onnx folder")


__all__ = ["Backend", "GenParams", "open_backend"]
