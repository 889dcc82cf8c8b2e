"""The model instances a server answers with, and the names clients choose among (``/v1/models``).

The runtime follows from the folder's manifest (``edgemed.backends.open_model``): GGUF through llama.cpp, ONNX
through onnxruntime, a model or run folder through PyTorch. A plain transformers folder (config.json, no
manifest) is served through PyTorch, unverified.

On a GGUF base, ``--adapter NAME=DIR`` adds the LoRA file of an adapter export to every instance, checked against
the base before the server listens; a request's ``model`` field then picks the adapter (``Models.route``), and
llama.cpp switches it on the context per request without reloading the base.
"""

from __future__ import annotations

import os
import queue
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed.artifacts import read_manifest
from edgemed.backends import open_model
from edgemed.errors import ArtifactError, EdgemedWarning, ServeError
from edgemed.serve.admission import slot_count
from edgemed.serve.schema import ApiError

if TYPE_CHECKING:
    from edgemed.backends.base import Backend
    from edgemed.serve.config import ServeConfig


class Models:
    """One instance per slot; a generation takes one, uses it alone, and gives it back.

    ``base`` is the first instance: prompts are rendered with it (all instances are the same export).
    """

    def __init__(self, instances: list[Backend], model_id: str, owned: bool, adapters: list[str] | None = None):
        self.all, self.base, self.model_id, self.owned = instances, instances[0], model_id, owned
        self.adapters = adapters or []
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for b in instances:
            self._free.put(b)

    def ids(self) -> list[str]:
        """The model ids /v1/models lists: the base's, then one per adapter."""
        return [self.model_id, *self.adapters]

    def route(self, requested: str | None) -> str | None:
        """The adapter a request's ``model`` field picks; None: the base.

        A server of one model answers whatever name a client sends, as llama.cpp's server does (many clients send a
        fixed placeholder name). Once adapters are served the name chooses the weights, so an unknown one is a 404
        ``model_not_found``, as OpenAI answers it, listing the ids served, rather than an answer from weights the
        client did not ask for. No name, or the base id, is the base.
        """
        if requested in self.adapters:
            return requested
        if not self.adapters or requested is None or requested == self.model_id:
            return None
        raise ApiError(404, f"the model {requested!r} is not served here; choose one of {', '.join(self.ids())} "
                       "(GET /v1/models lists them)", "model_not_found")

    def answering(self, backend: Backend, adapter: str | None) -> Backend:
        """``backend`` (an instance a worker holds) answering with ``adapter``: a view sharing its weights."""
        return backend if adapter is None else backend.with_adapter(adapter)

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
    """The instances serving ``config.export_dir``: ``backend`` if given (already open; the adapters are added to
    it), else one per slot, each with every adapter."""
    slots = slot_count(config.max_concurrency, backend)
    mid = model_id(config.export_dir)
    if backend is not None:
        _add_adapters([backend], config, mid)
        return Models([backend], mid, owned=False, adapters=list(config.adapters))
    # replicas share the cores: each gets its part unless --threads says otherwise
    threads = config.n_threads or (max(1, (os.cpu_count() or 1) // slots) if slots > 1 else None)
    kw: dict[str, Any] = {"n_threads": threads} if threads else {}
    instances = [open_model(config.export_dir, verify=config.verify, chat_template=config.chat_template, **kw)]
    _warn_drift(config.export_dir)
    try:
        # GGUF files are memory-mapped, so llama.cpp replicas share the weights' pages; others hold a copy each
        for _ in range(slots - 1):
            instances.append(open_model(config.export_dir, chat_template=config.chat_template, **kw))
        _add_adapters(instances, config, mid)
    except BaseException:
        for b in instances:
            b.close()
        raise
    return Models(instances, mid, owned=True, adapters=list(config.adapters))


def _warn_drift(folder: Path) -> None:
    """Say so when the parity figures shipped in the bundle were measured on another build of the runtime."""
    from edgemed.bundle import parity_drift

    drift = parity_drift(folder)
    if drift:
        warnings.warn(drift, EdgemedWarning, stacklevel=2)


def _add_adapters(instances: list[Backend], config: ServeConfig, base_id: str) -> None:
    """Load every ``--adapter`` onto every instance, each checked (bundle, and made for this base) first."""
    if not config.adapters:
        return
    if not hasattr(instances[0], "add_adapter"):
        raise ServeError(f"--adapter needs a GGUF base export (llama.cpp applies the LoRA files); "
                         f"{config.export_dir} is served through {instances[0].name}")
    from edgemed.bundle import verify

    for name, folder in config.adapters.items():
        if name == base_id:
            raise ServeError(f"--adapter {name}={folder}: {name!r} is the base model's id; give the adapter "
                             "another name")
        problems = verify(folder) if config.verify else []
        if problems:
            raise ServeError(f"--adapter {name}={folder}: fails verification against its manifest "
                             f"({'; '.join(problems[:5])}); export it again, or pass --no-verify")
        try:
            for b in instances:
                b.add_adapter(name, folder)
        except ArtifactError as e:
            raise ServeError(f"cannot serve --adapter {name}={folder}: {e}") from e


def model_id(folder: Path | str) -> str:
    """The name /v1/models gives: the manifest's name, else the folder's."""
    folder = Path(folder)
    try:
        name = read_manifest(folder, complete=False).get("name")
    except (ArtifactError, AttributeError):  # no manifest, not JSON, not an object
        name = None
    return str(name or folder.resolve().name)
