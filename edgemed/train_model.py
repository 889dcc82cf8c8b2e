"""The model a recipe trains: the base loaded (4-bit for QLoRA), LoRA where the recipe asks, which parameters
train, and on which device and precision."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

from edgemed.archs import ArchSpec
from edgemed.errors import EdgemedWarning, RecipeError
from edgemed.modeling import Loaded, load_base
from edgemed.recipe import Recipe


def trainable_names(model: Any, arch: ArchSpec, parts: Any, peft_prefix: str) -> set[str]:
    """Parameter names that train in one stage, given its parts (names as ``model.named_parameters``)."""
    names = set()
    for name, _ in model.named_parameters():
        base = name[len(peft_prefix):] if name.startswith(peft_prefix) else name
        part = arch.part_of(base)
        if ".lora_" in base:
            if (part == "decoder" and parts.decoder == "lora") or (part == "vision" and parts.vision == "lora"):
                names.add(name)
        elif part == "projector" and parts.projector == "train":
            names.add(name)
        elif parts.decoder == "layernorm" and arch.is_decoder_norm(base):
            names.add(name)
    return names


def lora_regex(arch: ArchSpec, recipe: Recipe) -> str | None:
    """One full-match regex over module names for every LoRA target that any stage trains."""
    pats = []
    if any(s.train.decoder == "lora" for s in recipe.stages):
        targets = tuple(recipe.lora.decoder_targets) if recipe.lora.decoder_targets else None
        pats.append(arch.decoder_lora_regex(targets))
    if any(s.train.vision == "lora" for s in recipe.stages):
        if not arch.is_vision:
            raise RecipeError(f"vision: lora asked for, but {arch.name} has no vision tower")
        targets = tuple(recipe.lora.vision_targets) if recipe.lora.vision_targets else None
        pats.append(arch.vision_lora_regex(targets))
    if any(s.train.projector == "train" for s in recipe.stages) and not arch.is_vision:
        raise RecipeError(f"projector: train asked for, but {arch.name} has no projector")
    return "|".join(f"(?:{p})" for p in pats) or None


def param_hashes(model: Any, arch: ArchSpec, skip: set[str], prefix: str) -> dict[str, str]:
    """sha256 per model part over every state-dict tensor not in ``skip`` (the frozen-part check).

    The state dict, not ``named_parameters``: bitsandbytes repacks 4-bit weights into a CPU-specific layout the
    first time they run in eval mode, and its state dict restores the canonical layout (with the quantisation
    constants), so the hash sees values, not layouts.
    """
    import torch

    by_part: dict[str, Any] = {}
    for name, t in model.state_dict().items():
        if name in skip or not torch.is_tensor(t):
            continue
        h = by_part.setdefault(arch.part_of(name[len(prefix):]), hashlib.sha256())
        h.update(name.encode())
        # the array itself, not .tobytes(): hashlib reads its buffer, where tobytes() copied the whole tensor (at a
        # 262144-word vocabulary a 1.3 GB transient, twice per fine-tune; docs/scale.md)
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return {k: v.hexdigest() for k, v in sorted(by_part.items())}


# ----------------------------------------------------------------------------- run
def device_and_method(recipe: Recipe, strict: bool) -> tuple[str, bool]:
    """(device, use_4bit): QLoRA needs CUDA unless the recipe allows 4-bit on CPU; else it falls back."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if recipe.method != "qlora":
        return device, False
    if cuda or recipe.quant.allow_cpu:
        return device, True
    msg = ("method qlora needs a CUDA GPU for bitsandbytes 4-bit at a useful speed; none found, so this run "
           "uses 32-bit LoRA with the same adapters instead")
    if strict:
        raise RecipeError(msg.replace("so this run uses", "and --strict forbids falling back to") +
                          "; drop --strict, or set quant.allow_cpu: true to run 4-bit on the CPU (slow)")
    warnings.warn(msg, EdgemedWarning, stacklevel=2)
    return device, False


def mixed_precision(recipe: Recipe, device: str, use_4bit: bool) -> str:
    """accelerate's mixed_precision: bf16 autocast where the hardware has it (CUDA bf16, or a CPU where a probe
    measured PyTorch's bf16 matmul at least 1.2x faster than fp32: CPUID alone is no proof); LoRA weights stay
    fp32."""
    import torch

    if recipe.mixed_precision != "auto":
        return recipe.mixed_precision
    if use_4bit:  # autocast in the 4-bit compute dtype: frozen 16-bit parts meet fp32 trainable ones (projector)
        return {"bfloat16": "bf16", "float16": "fp16"}.get(recipe.quant.compute_dtype, "no")
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    from edgemed.probe import probe_torch

    return "bf16" if probe_torch().use_bf16 else "no"


def build_model(recipe: Recipe, base: Path, device: str, use_4bit: bool) -> tuple[Loaded, str]:
    """Load the base (4-bit for QLoRA) and wrap it with LoRA where the recipe asks; returns (loaded, prefix)."""
    import torch

    from edgemed.archs import arch_for_dir

    arch = arch_for_dir(base)
    skip = [m for m in (arch.vision, arch.projector, arch.lm_head) if m]
    loaded = load_base(base, dtype=recipe.dtype if not use_4bit else "float32",
                       quant=recipe.quant if use_4bit else None, device=device if use_4bit else None,
                       skip_4bit=skip)
    model = loaded.model
    if not use_4bit:
        model.to(device)
    regex = lora_regex(arch, recipe)
    prefix = ""
    if use_4bit:
        # bitsandbytes repacks 4-bit weights for AVX512-bf16 CPUs on the first eval-mode forward, and packing
        # back re-quantises the nested absmax: the frozen base would change under validation. Keep one layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if recipe.gradient_checkpointing:
        # Not peft.prepare_model_for_kbit_training: it casts every weight that is not 4-bit (embeddings, vision
        # tower, projector, norms, head) to fp32, so the residual stream and attention run in fp32 and, on
        # MedGemma 4B, the 262k-word embedding alone doubles to 2.7 GB. The frozen 16-bit weights stay as loaded
        # (RMSNorm computes in fp32 inside transformers' modules; LoRA weights are fp32, PEFT's default); the
        # rest of what that helper does is these two lines. tools/bench_finetune.py measures both on a GPU.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    for p in model.parameters():
        p.requires_grad_(False)
    if regex:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                         target_modules=regex, init_lora_weights=recipe.lora.init != "nonzero", bias="none")
        try:
            model = get_peft_model(model, cfg)
        except ValueError as e:
            raise RecipeError(f"LoRA targets matched nothing in {arch.name} ({e}); check lora.decoder_targets / "
                              f"lora.vision_targets against the model's module names") from None
        if recipe.lora.init == "nonzero":  # B random too, so a merge does real work (tests)
            g = torch.Generator().manual_seed(recipe.seed)
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
        prefix = "base_model.model."
    loaded.model = model
    return loaded, prefix


def set_trainable(model: Any, names: set[str]) -> list[Any]:
    params = []
    for n, p in model.named_parameters():
        on = n in names
        if on and not p.dtype.is_floating_point:
            raise RecipeError(f"parameter {n} is quantised ({p.dtype}) and cannot train; keep that part frozen")
        p.requires_grad_(on)
        if on:
            if p.dtype != __import__("torch").float32 and not getattr(p, "quant_state", None):
                p.data = p.data.float()  # trainable tensors train in fp32 even in a 16-bit or 4-bit model
            params.append(p)
    return params


def trainable_report(model: Any, arch: ArchSpec, all_names: set[str], prefix: str) -> dict[str, Any]:
    """Trainable parameter count and share, in total and per part (4-bit weights counted at full size)."""
    total = 0
    per_part: dict[str, dict[str, int]] = {}
    for n, p in model.named_parameters():
        count = p.numel() * (2 if getattr(p, "quant_state", None) is not None else 1)  # packed 4-bit: 2 per byte
        part = arch.part_of(n[len(prefix):])
        if ".lora_" not in n:
            total += count
        d = per_part.setdefault(part, {"total": 0, "trainable": 0})
        if ".lora_" not in n:
            d["total"] += count
        if n in all_names:
            d["trainable"] += count
    trainable = sum(d["trainable"] for d in per_part.values())
    return {"trainable": trainable, "total": total, "percent": round(100.0 * trainable / max(total, 1), 4),
            "per_part": per_part}


