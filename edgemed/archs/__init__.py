"""The architecture registry: one module per model family, looked up by name or by a model's config."""

from __future__ import annotations

from pathlib import Path

from edgemed.archs.base import ArchSpec
from edgemed.errors import ArchError

_MODULES = ("llava", "llama", "qwen2", "gemma3", "gemma3_text", "mllama", "qwen2_5_vl")


def _load() -> dict[str, ArchSpec]:
    import importlib

    specs = {}
    for mod in _MODULES:
        try:
            spec = importlib.import_module(f"edgemed.archs.{mod}").SPEC
        except ModuleNotFoundError as e:  # a family not written yet is simply absent
            if e.name == f"edgemed.archs.{mod}":
                continue
            raise
        specs[spec.name] = spec
    return specs


REGISTRY: dict[str, ArchSpec] = _load()


def supported() -> str:
    return ", ".join(sorted(REGISTRY))


def get_arch(name: str) -> ArchSpec:
    """The registry entry called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ArchError(f"unsupported architecture {name!r}; supported: {supported()}") from None


def arch_for_model_type(model_type: str, where: str = "") -> ArchSpec:
    """The registry entry that serves a config's ``model_type``."""
    for spec in REGISTRY.values():
        if model_type in spec.model_types:
            return spec
    at = f"{where}: " if where else ""
    raise ArchError(f"{at}unsupported architecture model_type={model_type!r}; supported: {supported()}")


def arch_for_dir(model_dir: Path | str) -> ArchSpec:
    """The registry entry for a model folder, read from its config.json."""
    model_dir = Path(model_dir)
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise ArchError(f"{model_dir}: no config.json; give a transformers model folder")
    from edgemed.files import read_json

    model_type = read_json(cfg, "a model config", ArchError, "give a transformers model folder"
                           ).get("model_type")
    if not isinstance(model_type, str):
        raise ArchError(f"{cfg}: has no model_type string (got {model_type!r}); give a transformers model folder")
    spec = arch_for_model_type(model_type, str(model_dir))
    if spec.prepare is not None:
        spec.prepare()
    return spec


__all__ = ["ArchSpec", "REGISTRY", "arch_for_dir", "arch_for_model_type", "get_arch", "supported"]
