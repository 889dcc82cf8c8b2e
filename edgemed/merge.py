"""Merge a run's adapters into the 16/32-bit original weights, shard by shard.

The base checkpoint is streamed one safetensors shard at a time: each tensor that a LoRA pair targets becomes
``W + (alpha/r) * B @ A`` computed in fp32 and cast back to W's dtype; trained norm and projector tensors replace
their originals; everything else is copied. Peak memory stays near one shard, never the whole model twice. The
output keeps the base's tensor names, dtypes, config, tokenizer, processor and chat template, so
``from_pretrained`` opens it like the original. A bitsandbytes-quantised base is refused: merging into a 4-bit copy
would bake quantisation error into the deployed weights.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from edgemed.archs import arch_for_dir
from edgemed.artifacts import MANIFEST, atomic_dir, tree_sha256, write_manifest
from edgemed.errors import ArtifactError
from edgemed.files import load_safetensors, read_json, reading, safetensors_keys
from edgemed.manifest import load
from edgemed.modeling import ADAPTER, TRAINED, refuse_bnb, run_base

_COPY_SKIP = ("model.safetensors", "model.safetensors.index.json", MANIFEST)


def checkpoint_to_module_names(base: Path, keys: list[str]) -> dict[str, str]:
    """Map checkpoint tensor names to the module-tree names of transformers 5 (they differ for legacy layouts,
    e.g. LLaVA's ``language_model.model.layers`` is ``model.language_model.layers``). Uses transformers' own
    conversion table for the model class, so no renaming rule is written here."""
    import torch
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import rename_source_key

    from edgemed.modeling import model_class

    arch = arch_for_dir(base)
    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = model_class(arch)._from_config(config)
    meta = model.state_dict()
    renamings = [t for t in get_model_conversion_mapping(model) if type(t).__name__ != "WeightConverter"]
    out = {}
    for key in keys:
        name, _ = rename_source_key(key, renamings, [], model.base_model_prefix, meta)
        out[key] = name if name in meta else key
    return out


def _lora_pairs(run_dir: Path) -> tuple[dict[str, tuple[Any, Any]], float]:
    """LoRA (A, B) per target weight name (module-tree names) and the scale alpha/r."""
    adapter = run_dir / ADAPTER
    if not adapter.is_dir():  # loading the manifest has refused a run whose manifest lists adapter files that are gone
        return {}, 0.0
    cfg_path = adapter / "adapter_config.json"
    cfg = read_json(cfg_path, "a PEFT adapter config", todo="fine-tune again")
    if cfg.get("use_dora") or cfg.get("use_rslora"):
        raise ArtifactError(f"{adapter}: DoRA/rsLoRA adapters are not supported by merge; train plain LoRA")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, int | float):
        raise ArtifactError(f"{cfg_path}: needs a positive integer 'r' and a number 'lora_alpha' (got r={r!r}, "
                            f"lora_alpha={alpha!r}); fine-tune again")
    scale = alpha / r
    state = load_safetensors(adapter / "adapter_model.safetensors")
    pairs: dict[str, list[Any]] = {}
    for k, v in state.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", k)
        if not m:
            raise ArtifactError(f"{adapter}: unexpected adapter tensor {k!r}; only LoRA A/B weights can merge")
        pairs.setdefault(m.group(1) + ".weight", [None, None])["AB".index(m.group(2))] = v
    for k, (a, b) in pairs.items():
        if a is None or b is None:
            raise ArtifactError(f"{adapter}: {k!r} has lora_{'A' if a is None else 'B'} missing; fine-tune again")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ArtifactError(f"{adapter}: LoRA pair of {k!r} has shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                "B @ A needs A (r, in) and B (out, r); the adapter is damaged, fine-tune again")
    return {k: (a, b) for k, (a, b) in pairs.items()}, scale


def _shards(base: Path) -> list[str]:
    index = base / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ArtifactError(f"{index}: has no 'weight_map' of tensor name -> shard file; the checkpoint is "
                                "damaged")
        return sorted(set(weight_map.values()))
    if (base / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ArtifactError(f"{base}: no model.safetensors or index; the base must be a safetensors checkpoint")


def merge_weights(base: Path, run_dir: Path, out: Path) -> dict[str, int]:
    """Stream the base shards into ``out`` with LoRA and trained tensors applied; returns counts."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    pairs, scale = _lora_pairs(run_dir)
    trained = load_safetensors(run_dir / TRAINED) if (run_dir / TRAINED).is_file() else {}
    shards = _shards(base)
    all_keys = []
    for shard in shards:
        all_keys.extend(safetensors_keys(base / shard))
    names = checkpoint_to_module_names(base, all_keys)
    used_lora, used_trained = set(), set()
    for shard in shards:
        merged: dict[str, Any] = {}
        with reading(base / shard, "a safetensors file"), safe_open(base / shard, "pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                w = f.get_tensor(key)
                name = names[key]
                if name in trained:
                    if trained[name].shape != w.shape:
                        raise ArtifactError(f"{run_dir / TRAINED}: {name!r} has shape {tuple(trained[name].shape)}, "
                                            f"the base's is {tuple(w.shape)}; the run was trained on another base")
                    w = trained[name].to(w.dtype)
                    used_trained.add(name)
                if name in pairs:
                    a, b = pairs[name]
                    if (b.shape[0], a.shape[1]) != tuple(w.shape):
                        raise ArtifactError(f"{run_dir / ADAPTER}: LoRA pair of {name!r} makes a "
                                            f"{b.shape[0]}x{a.shape[1]} change for a {tuple(w.shape)} weight; the "
                                            "adapter was trained on another base or is damaged")
                    w = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
                    used_lora.add(name)
                merged[key] = w.contiguous()
        save_file(merged, str(out / shard), metadata=metadata or {"format": "pt"})
        del merged
    missing = (set(pairs) - used_lora) | (set(trained) - used_trained)
    if missing:
        raise ArtifactError(f"{run_dir}: {len(missing)} trained tensors have no counterpart in {base}, e.g. "
                            f"{sorted(missing)[0]!r}; the run was trained on another base")
    return {"lora_merged": len(used_lora), "tensors_replaced": len(used_trained)}


def _copy_side_files(base: Path, out: Path) -> None:
    for p in base.iterdir():
        if p.is_file() and p.name not in _COPY_SKIP and not p.name.endswith(".safetensors"):
            shutil.copy2(p, out / p.name)


def check_merge(run_dir: Path, merged: Path, base: Path, prompts: list[str]) -> float:
    """Largest absolute logit difference between the adapter model and the merged model on ``prompts``."""
    import torch

    from edgemed import prompting
    from edgemed.modeling import load_base, load_run

    adapter = load_run(run_dir, base_dir=base)
    flat = load_base(merged)
    worst = 0.0
    with torch.no_grad():
        for q in prompts:
            text = prompting.render(flat.processor, prompting.messages(q, typed=flat.arch.is_vision))
            ids = flat.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            a = adapter.model(input_ids=ids).logits.float()
            b = flat.model(input_ids=ids).logits.float()
            worst = max(worst, float((a - b).abs().max()))
    return worst


CHECK_PROMPTS = ["Is there a lesion in this radiograph?", "What are the common causes of community-acquired "
                 "pneumonia?", "Describe the findings of a normal chest X-ray."]


def merge(run_dir: Path | str, out: Path | str, *, overwrite: bool = False, check: bool = True) -> Path:
    """Merge ``run_dir`` into its base and write a standard transformers checkpoint to ``out``.

    Running it twice is safe: an existing ``out`` is refused without ``overwrite``, and with it is replaced only
    once the new folder is complete.
    """
    run_dir = Path(run_dir).absolute()
    run = load(run_dir, ("run",))
    base = run_base(run_dir, run)
    refuse_bnb(base, "merge")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        counts = merge_weights(base, run_dir, tmp)
        index = base / "model.safetensors.index.json"
        if index.is_file():
            shutil.copy2(index, tmp / index.name)
        _copy_side_files(base, tmp)
        max_diff = check_merge(run_dir, tmp, base, CHECK_PROMPTS) if check else None
        write_manifest(tmp, "model", name=f"{Path(out).name}", arch=run.arch, base_model=run.base_model,
                       data=run.data, recipe=run.recipe,
                       parent={"kind": "run", "path": str(run_dir), "tree_sha256": tree_sha256(run_dir)},
                       merge={**counts, "check_max_abs_logit_diff": max_diff,
                              "check_prompts": len(CHECK_PROMPTS) if check else 0})
    return Path(out).absolute()
