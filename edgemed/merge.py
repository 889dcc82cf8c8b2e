"""Merge a run's adapters into the 16/32-bit original weights, one tensor at a time.

The base checkpoint is streamed tensor by tensor: each tensor that a LoRA pair targets becomes
``W + (alpha/r) * B @ A`` computed in fp32 and cast back to W's dtype; trained norm and projector tensors replace
their originals; everything else is copied. Each output shard is written as it is read, so peak memory is one
shard's mapped pages and one tensor's fp32 change, never the whole model. The check that follows (the adapter
model against the merged one, on a few prompts) runs both in the checkpoint's dtype with their decoder layers
offloaded to the safetensors files and read back one layer at a time, so it too stays bounded. The output keeps
the base's tensor names, dtypes, config, tokenizer, processor and chat template, so ``from_pretrained`` opens it
like the original. A bitsandbytes-quantised base is refused: merging into a 4-bit copy would bake quantisation
error into the deployed weights. tools/bench_merge.py measures the peak.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from edgemed import memory
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

    pairs, scale = _lora_pairs(run_dir)
    trained = load_safetensors(run_dir / TRAINED) if (run_dir / TRAINED).is_file() else {}
    shards = _shards(base)
    all_keys = []
    for shard in shards:
        all_keys.extend(safetensors_keys(base / shard))
    names = checkpoint_to_module_names(base, all_keys)
    used_lora, used_trained = set(), set()

    def apply(key: str, w: Any) -> Any:
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
                raise ArtifactError(f"{run_dir / ADAPTER}: LoRA pair of {name!r} makes a {b.shape[0]}x{a.shape[1]} "
                                    f"change for a {tuple(w.shape)} weight; the adapter was trained on another base "
                                    "or is damaged")
            w = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
            used_lora.add(name)
        return w

    for shard in shards:
        with reading(base / shard, "a safetensors file"), safe_open(base / shard, "pt") as f:
            write_streamed(out / shard, f, apply)
    missing = (set(pairs) - used_lora) | (set(trained) - used_trained)
    if missing:
        raise ArtifactError(f"{run_dir}: {len(missing)} trained tensors have no counterpart in {base}, e.g. "
                            f"{sorted(missing)[0]!r}; the run was trained on another base")
    return {"lora_merged": len(used_lora), "tensors_replaced": len(used_trained)}


def write_streamed(path: Path, src: Any, apply: Any) -> None:
    """Write a safetensors file with ``src``'s tensors (a ``safe_open`` handle), each passed through ``apply``.

    Written by hand because safetensors' ``save_file`` takes every tensor of the file in memory at once; the format
    is an 8-byte little-endian header length, a JSON header of dtype/shape/byte offsets padded to 8 bytes, then the
    tensors' bytes in offset order. Each tensor is read, changed, written and freed before the next.
    """
    import json
    import struct

    keys = sorted(src.keys())
    header: dict[str, Any] = {"__metadata__": src.metadata() or {"format": "pt"}}
    offset = 0
    for k in keys:  # a merge never changes a dtype or a shape, so the header is known before any tensor is read
        sl = src.get_slice(k)
        shape = list(sl.get_shape())
        n = _ST_SIZES[sl.get_dtype()]
        for d in shape:
            n *= d
        header[k] = {"dtype": sl.get_dtype(), "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k in keys:
            w = apply(k, src.get_tensor(k)).contiguous()
            data = w.reshape(-1).view(_uint8()).numpy()
            if data.nbytes != header[k]["data_offsets"][1] - header[k]["data_offsets"][0]:
                raise ArtifactError(f"{path}: {k!r} changed size in the merge; this is a bug in edgemed")
            f.write(memoryview(data))
            del w, data


_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def _uint8() -> Any:
    import torch

    return torch.uint8


def _copy_side_files(base: Path, out: Path) -> None:
    for p in base.iterdir():
        if p.is_file() and p.name not in _COPY_SKIP and not p.name.endswith(".safetensors"):
            shutil.copy2(p, out / p.name)


def check_merge(run_dir: Path, merged: Path, base: Path, prompts: list[str]) -> float:
    """Largest absolute logit difference between the adapter model and the merged model on ``prompts``.

    The adapter model is the base with each LoRA pair added at run time (``W x + alpha/r * B (A x)`` on the module
    the adapter names, as PEFT computes it; tests/test_merge.py checks it equals PEFT's model), the merged model is
    the written checkpoint. Both load in the checkpoint's dtype (a bf16 base is compared in bf16) with their decoder
    layers and vision tower left in the safetensors files and read one layer at a time (transformers' disk
    offload), so the check needs about one layer, the embedding and the head, whatever the model's size.
    """
    import tempfile

    from edgemed import prompting
    from edgemed.modeling import load_processor

    arch = arch_for_dir(base)
    pairs, scale = _lora_pairs(run_dir)
    trained = load_safetensors(run_dir / TRAINED) if (run_dir / TRAINED).is_file() else {}
    proc, tok = load_processor(merged, arch)
    texts = [prompting.generation_prompt(proc, q, typed=arch.is_vision) for q in prompts]
    # a rendered template holds its own BOS; a base model's plain prompt gets the tokenizer's
    specials = not prompting.has_template(proc)
    ids = [tok(t, return_tensors="pt", add_special_tokens=specials)["input_ids"] for t in texts]
    with tempfile.TemporaryDirectory(prefix=".edgemed-check-") as off:
        reference = _offloaded(base, arch, Path(off) / "a")
        try:
            _add_lora(reference, pairs, scale, trained)
            want = _logits(reference, ids)
        finally:
            del reference
        flat = _offloaded(merged, arch, Path(off) / "b")
        try:
            got = _logits(flat, ids)
        finally:
            del flat
    return max(float((a - b).abs().max()) for a, b in zip(want, got, strict=True))


def _offloaded(folder: Path, arch: Any, offload: Path) -> Any:
    """The model in ``folder`` in its checkpoint's dtype with its decoder layers and vision tower on "disk" (read
    per layer). Not upcast: transformers would rewrite every offloaded tensor in fp32 to the offload folder first
    (2.4 GB peak instead of 0.5 GB on a 0.66B bf16 checkpoint, tools/bench_merge.py)."""
    import torch
    from transformers import AutoConfig

    from edgemed.modeling import model_class

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        skeleton = model_class(arch)._from_config(config)
    device_map = _device_map(skeleton, arch)
    del skeleton
    with reading(folder, "a transformers model folder"):
        model = model_class(arch).from_pretrained(folder, dtype="auto", device_map=device_map,
                                                  offload_folder=str(offload), local_files_only=True)
    return model.eval()


def _device_map(model: Any, arch: Any) -> dict[str, str]:
    """Every top-level module on "cpu" except the decoder's layers and the vision tower, which go to "disk"."""
    out: dict[str, str] = {}

    def walk(module: Any, prefix: str) -> None:
        for child, sub in module.named_children():
            path = f"{prefix}{child}"
            if path == arch.vision:
                out[path] = "disk"
            elif path == f"{arch.decoder}.layers":
                out.update({f"{path}.{i}": "disk" for i in range(len(sub))})
            elif arch.decoder.startswith(path + ".") or path == arch.decoder:
                walk(sub, path + ".")
            else:
                out[path] = "cpu"

    walk(model, "")
    return out


def _add_lora(model: Any, pairs: dict[str, tuple[Any, Any]], scale: float, trained: dict[str, Any]) -> None:
    """Make ``model`` the run's adapter model: each LoRA pair added at run time, trained tensors swapped in."""
    import torch

    modules = dict(model.named_modules())
    for name, (a, b) in pairs.items():
        module = modules.get(name.removesuffix(".weight"))
        if module is None:
            raise ArtifactError(f"the adapter targets {name!r}, which is no module of the base model")
        a32, b32 = a.float(), b.float()
        module.register_forward_hook(
            lambda _m, args, out, a32=a32, b32=b32: out + (scale * (args[0].float() @ a32.T) @ b32.T).to(out.dtype))
    params = dict(model.named_parameters())
    loaders = _offload_loaders(model)
    for name, t in trained.items():
        if name in params and params[name].device.type != "meta":
            with torch.no_grad():
                params[name].copy_(t.to(params[name].dtype))
            continue
        # an offloaded tensor (a trained norm inside a decoder layer): served in place of the file's when its
        # layer is read back (accelerate's loader looks in its in-memory state_dict before the files)
        owners = [d for d in loaders if name in d.index or name in d.state_dict]
        if not owners:
            raise ArtifactError(f"{name!r} is trained by the run but is no weight of the offloaded base model")
        for d in owners:
            d.state_dict[name] = t


def _offload_loaders(model: Any) -> list[Any]:
    """The weight loaders behind accelerate's offload hooks on ``model`` (one object, shared by every hook)."""
    found: dict[int, Any] = {}
    for m in model.modules():
        hook = getattr(m, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            wm = getattr(h, "weights_map", None)
            loader = getattr(wm, "dataset", wm)
            if loader is not None and hasattr(loader, "state_dict") and hasattr(loader, "index"):
                found[id(loader)] = loader
    return list(found.values())


def _logits(model: Any, ids: list[Any]) -> list[Any]:
    import torch

    with torch.no_grad():
        return [model(input_ids=x).logits.float() for x in ids]


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
    memory.require(memory.merge_need(base), f"merging {run_dir} into {base}")
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
