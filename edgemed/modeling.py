"""Loading models for training, merging and inference: model folders, run folders, 16/32-bit or 4-bit.

A run folder (``edgemed finetune`` output) holds ``adapter/`` (PEFT LoRA weights), ``trained.safetensors`` (the
non-LoRA parameters that trained: projector, norms; named as in the base model's module tree) and a manifest
naming the base model and its sha256.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemed.archs import ArchSpec, arch_for_dir
from edgemed.artifacts import MANIFEST, read_manifest, tree_sha256
from edgemed.errors import ArtifactError, ExportError
from edgemed.files import load_safetensors, read_json, reading
from edgemed.manifest import Manifest, load, validate

ADAPTER = "adapter"
TRAINED = "trained.safetensors"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Loaded:
    """A model with what renders its prompts."""

    model: Any
    processor: Any  # processor for image models, tokenizer for text models: owns the chat template
    tokenizer: Any
    arch: ArchSpec
    base_dir: Path


def bnb_quantized(model_dir: Path) -> bool:
    """True when a model folder's config says its weights are bitsandbytes-quantised."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        return False
    qc = read_json(cfg, "a model config").get("quantization_config") or {}
    if not isinstance(qc, dict):
        return False
    return qc.get("quant_method") == "bitsandbytes" or bool(qc.get("load_in_4bit") or qc.get("load_in_8bit"))


def refuse_bnb(model_dir: Path, what: str) -> None:
    """Raise if ``model_dir`` holds bitsandbytes weights: merging or exporting those would bake in 4-bit error."""
    if bnb_quantized(model_dir):
        raise ExportError(
            f"{model_dir}: is a bitsandbytes-quantised checkpoint; {what} needs the 16/32-bit weights. "
            "Fine-tune with QLoRA on the original model, then run `edgemed merge RUN_DIR --out MODEL_DIR`, "
            "which merges into the 16-bit original, and use that folder")


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def model_class(arch: ArchSpec):
    import transformers

    return getattr(transformers, arch.model_class)


def load_processor(model_dir: Path, arch: ArchSpec, vision: bool | None = None) -> tuple[Any, Any]:
    """(processor, tokenizer) of a model folder, from its local files; for text models both are the tokenizer.

    ``vision`` overrides ``arch.is_vision`` for a folder that holds an image family's text part only.
    """
    from transformers import AutoProcessor, AutoTokenizer

    if arch.is_vision if vision is None else vision:
        proc = (arch.load_processor(model_dir) if arch.load_processor else
                AutoProcessor.from_pretrained(model_dir, local_files_only=True))
        return proc, proc.tokenizer
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return tok, tok


def load_base(model_dir: Path, *, dtype: str = "float32", quant: Any | None = None, device: str | None = None,
              skip_4bit: list[str] | None = None) -> Loaded:
    """Load a transformers model folder; with ``quant`` (a recipe QuantSpec) in 4-bit NF4/FP4 via bitsandbytes."""
    model_dir = Path(model_dir)
    arch = arch_for_dir(model_dir)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if quant is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type, bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
            # the vision tower, projector and head stay in 16/32-bit: QLoRA quantises the decoder only
            llm_int8_skip_modules=skip_4bit or [])
        kwargs["dtype"] = torch_dtype(quant.compute_dtype) if quant.compute_dtype != "float32" else None
        if device:
            kwargs["device_map"] = {"": device}
    with reading(model_dir, "a transformers model folder (config, safetensors weights, tokenizer)"):
        model = model_class(arch).from_pretrained(model_dir, **{k: v for k, v in kwargs.items() if v is not None})
        proc, tok = load_processor(model_dir, arch)
    if device and quant is None:
        model.to(device)
    return Loaded(model=model, processor=proc, tokenizer=tok, arch=arch, base_dir=model_dir)


def weights_dir(folder: Path) -> Path:
    """The folder holding a model's weights: a run's base model, else the folder itself."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file() and read_manifest(folder).get("kind") == "run":
        return run_base(folder, check_hash=False)
    return folder


def run_base(run_dir: Path, manifest: Manifest | dict[str, Any] | None = None, check_hash: bool = True) -> Path:
    """The base model folder of a run (or of a merge, which records the same base), checked against the sha256
    the artifact recorded."""
    if manifest is None:
        manifest = load(run_dir, ("run",))
    elif not isinstance(manifest, Manifest):
        manifest = validate(manifest, Path(run_dir) / MANIFEST)
    ref = manifest.base_model
    if ref is None or not ref.path:
        raise ArtifactError(f"{run_dir}: its manifest names no base model folder; the folder is damaged, fine-tune "
                            "again (or `edgemed merge` it if the merge still works and export the merged model)")
    base = Path(ref.path)
    if not (base / "config.json").is_file():
        raise ArtifactError(f"{run_dir}: its base model {base} is missing; restore it or re-run the fine-tune")
    if check_hash:
        have = tree_sha256(base)
        if ref.sha256 and ref.sha256 != have:
            raise ArtifactError(
                f"{run_dir}: the adapter was trained on a base with sha256 {ref.sha256[:12]}…, but {base} now has "
                f"{have[:12]}…; use the base it was trained on")
    return base


def load_run(run_dir: Path, *, dtype: str = "float32", device: str | None = None,
             base_dir: Path | None = None) -> Loaded:
    """A run folder as a model: its 16/32-bit base with the LoRA adapter and trained tensors applied (unmerged)."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir, ("run",))
    if base_dir is None:
        base_dir = run_base(run_dir, manifest)
    else:
        check_adapter_matches(run_dir, manifest, base_dir)
    loaded = load_base(base_dir, dtype=dtype, device=device)
    model = loaded.model
    trained = run_dir / TRAINED
    if trained.is_file():
        state = load_safetensors(trained)
        missing = set(state) - set(dict(model.named_parameters()))
        if missing:
            raise ArtifactError(f"{trained}: names {sorted(missing)[:3]} are not in the base model; "
                                "the run was made for another architecture")
        with __import__("torch").no_grad():
            params = dict(model.named_parameters())
            for name, value in state.items():
                params[name].copy_(value.to(params[name].dtype))
    if (run_dir / ADAPTER).is_dir():
        with reading(run_dir / ADAPTER, "a PEFT LoRA adapter folder", todo="fine-tune again"):
            model = PeftModel.from_pretrained(model, run_dir / ADAPTER)
    model.eval()
    loaded.model = model
    return loaded


def check_adapter_matches(run_dir: Path, manifest: dict[str, Any], base_dir: Path) -> None:
    """Refuse to apply a run to a base whose architecture or shapes differ from the one it was trained on."""
    want = manifest.get("base_model", {})
    cfg = read_json(Path(base_dir) / "config.json", "a model config")
    if want.get("model_type") and cfg.get("model_type") != want["model_type"]:
        raise ArtifactError(f"{run_dir}: adapter trained on a {want['model_type']!r} model, but {base_dir} is "
                            f"{cfg.get('model_type')!r}; give the base it was trained on")
    if want.get("sha256") and want["sha256"] != tree_sha256(base_dir):
        raise ArtifactError(f"{run_dir}: adapter trained on another base (sha256 {want['sha256'][:12]}…) than "
                            f"{base_dir}; give the base it was trained on")


def load_any(path: Path, *, dtype: str = "float32", device: str | None = None) -> Loaded:
    """A model folder or a run folder, for inference."""
    path = Path(path)
    from edgemed.manifest import kind_of

    if kind_of(path) == "run":
        return load_run(path, dtype=dtype, device=device)
    return load_base(path, dtype=dtype, device=device)


def generation_eos(folder: Path) -> list[int]:
    """The eos ids of the generation settings transformers keeps for ``folder``: ``generation_config.json``, or
    the model config's (top level or text config) when there is none. Several are usual (Gemma 3: ``[1, 106]``)."""
    from transformers import GenerationConfig

    from edgemed.files import read_json, reading

    with reading(folder, "the generation settings saved with the model"):
        if (folder / "generation_config.json").is_file():
            config = GenerationConfig.from_pretrained(folder, local_files_only=True)
        elif (folder / "config.json").is_file():
            config = GenerationConfig.from_model_config(read_json(folder / "config.json", "a model config"))
        else:
            return []
    v = config.eos_token_id
    return [int(i) for i in (v if isinstance(v, list | tuple) else [v]) if i is not None]
