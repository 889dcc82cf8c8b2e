"""The model instances a server answers with, and the name clients know it by.

The runtime follows from the folder's manifest (``edgemed.backends.open_model``): GGUF through llama.cpp, ONNX
through onnxruntime, a model or run folder through PyTorch. A plain transformers folder (config.json, no
manifest) is served through PyTorch, unverified.
"""

from __future__ import annotations

import os
import queue
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed.artifacts import read_manifest
from edgemed.backends import open_model
from edgemed.errors import ArtifactError
from edgemed.serve.admission import slot_count

if TYPE_CHECKING:
    from edgemed.backends.base import Backend
    from edgemed.serve.config import ServeConfig


class Models:
    """One instance per slot; a generation takes one, uses it alone, and gives it back.

    ``base`` is the first instance: prompts are rendered with it (all instances are the same export).
    """

    def __init__(self, instances: list[Backend], model_id: str, owned: bool):
        self.all, self.base, self.model_id, self.owned = instances, instances[0], model_id, owned
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for b in instances:
            self._free.put(b)

    @property
    def slots(self) -> int:
        return len(self.all)

    def take(self) -> Backend:
        """An idle instance (from a worker thread; waits for one, which the gate makes immediate)."""
        return self._free.get()

    def give(self, backend: Backend) -> None:
        self._free.put(backend)

    def close(self) -> None:
        """Close the instances the server opened; one the caller gave is the caller's to close."""
        if self.owned:
            for b in self.all:
                b.close()


def open_models(config: ServeConfig, backend: Backend | None = None) -> Models:
    """The instances serving ``config.export_dir``: ``backend`` if given (already open), else one per slot."""
    slots = slot_count(config.max_concurrency, backend)
    if backend is not None:
        return Models([backend], model_id(config.export_dir), owned=False)
    # replicas share the cores: each gets its part unless --threads says otherwise
    threads = config.n_threads or (max(1, (os.cpu_count() or 1) // slots) if slots > 1 else None)
    kw: dict[str, Any] = {"n_threads": threads} if threads else {}
    instances = [open_model(config.export_dir, verify=config.verify, chat_template=config.chat_template, **kw)]
    try:
        # GGUF files are memory-mapped, so llama.cpp replicas share the weights' pages; others hold a copy each
        for _ in range(slots - 1):
            instances.append(open_model(config.export_dir, chat_template=config.chat_template, **kw))
    except BaseException:
        for b in instances:
            b.close()
        raise
    return Models(instances, model_id(config.export_dir), owned=True)


def model_id(folder: Path | str) -> str:
    """The name /v1/models gives: the manifest's name, else the folder's."""
    folder = Path(folder)
    try:
        name = read_manifest(folder, complete=False).get("name")
    except (ArtifactError, AttributeError):  # no manifest, not JSON, not an object
        name = None
    return str(name or folder.resolve().name)
