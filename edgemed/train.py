"""Parameter-efficient fine-tuning: LoRA / QLoRA on the text decoder, LayerNorm-only, projector + LoRA, in stages.

``finetune(recipe, out)`` writes a run folder: ``adapter/`` (PEFT), ``trained.safetensors`` (projector and norm
weights that trained), ``recipe.yaml``, ``trainable.json``, ``frozen_check.json``, ``train_log.jsonl``,
``loss.png`` and ``manifest.json``. While it runs the folder is ``OUT.partial`` with checkpoints under it;
``--resume`` continues from the last one, and the folder is renamed to OUT only when training is complete.

The loop is accelerate's, so the same code runs on one CPU, one GPU, or several processes under
``accelerate launch`` / ``torchrun`` (DDP; gloo on CPU).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemed import prompting
from edgemed.archs import ArchSpec
from edgemed.artifacts import tree_sha256, write_manifest
from edgemed.errors import ArtifactError, EdgemedWarning, RecipeError
from edgemed.modeling import ADAPTER, TRAINED, Loaded, bnb_quantized, load_base
from edgemed.recipe import Recipe, Stage, dump_recipe

IGNORE = -100
CHECKPOINTS = "checkpoints"
SCHEDULER = "scheduler.pt"


# ----------------------------------------------------------------------------- examples
@dataclass
class Example:
    """One tokenised training or validation example."""

    inputs: dict[str, Any]  # processor output for one sample (tensors with batch dim 1)
    labels: Any  # LongTensor [seq], IGNORE outside the answer
    has_image: bool
    source: str


def system_prompt(recipe: Recipe, record: Any) -> str | None:
    """The record's system prompt, else the recipe's, with the role-based prompt in front."""
    system = getattr(record, "system", None) or recipe.prompt.system
    if recipe.prompt.role:
        role = f"You are {recipe.prompt.role}."
        system = f"{role} {system}" if system else role
    return system


def question_text(recipe: Recipe, record: Any) -> str:
    """The question with its task-specific instruction (LLaMA32-Med style task prompts) in front."""
    task = getattr(record, "task", None)
    if task and task in recipe.prompt.tasks:
        return f"{recipe.prompt.tasks[task]}\n{record.question}"
    return record.question


def encode_vqa(loaded: Loaded, recipe: Recipe, record: Any) -> Example:
    """Tokenise one VQA record: loss only on the answer tokens (and the template's end of turn)."""
    from edgemed.data import load_image

    has_image = record.image is not None
    if has_image and not loaded.arch.is_vision:
        raise RecipeError(f"{record.source}: has an image but {loaded.arch.name} is a text model; "
                          "use an image model or drop the image")
    prompt, answer = prompting.prompt_and_answer(
        loaded.processor, question_text(recipe, record), record.answer, image=has_image,
        system=system_prompt(recipe, record), typed=loaded.arch.is_vision)
    # the rendered template already holds BOS where the model wants one (Gemma, Llama 3): add no specials
    kwargs: dict[str, Any] = {"return_tensors": "pt", "add_special_tokens": False}
    if has_image:
        kwargs["images"] = [load_image(record.image, render=loaded.arch.dicom_render)]
    if loaded.arch.is_vision:
        full = loaded.processor(text=prompt + answer, **kwargs)
        n_prompt = loaded.processor(text=prompt, **kwargs)["input_ids"].shape[1]
    else:
        full = loaded.tokenizer(prompt + answer, return_tensors="pt", add_special_tokens=False)
        n_prompt = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = full["input_ids"][0]
    if len(ids) > recipe.max_length:
        raise RecipeError(f"{record.source}: {len(ids)} tokens exceed max_length={recipe.max_length}; "
                          "raise max_length in the recipe or shorten the record")
    labels = ids.clone()
    labels[:n_prompt] = IGNORE
    return Example(inputs=dict(full), labels=labels, has_image=has_image, source=record.source)


def encode_text(loaded: Loaded, recipe: Recipe, record: Any) -> list[Example]:
    """A corpus document as causal-LM examples of at most max_length tokens (loss on every token)."""
    import torch

    tok = loaded.tokenizer
    ids = tok(record.text, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        ids = ids + [tok.eos_token_id]
    out = []
    for start in range(0, len(ids), recipe.max_length):
        chunk = torch.tensor(ids[start:start + recipe.max_length])
        if len(chunk) < 2:
            continue
        inputs = {"input_ids": chunk[None], "attention_mask": torch.ones_like(chunk)[None]}
        out.append(Example(inputs=inputs, labels=chunk.clone(), has_image=False, source=record.source))
    return out


def encode(loaded: Loaded, recipe: Recipe, records: list[Any]) -> list[Example]:
    out: list[Example] = []
    for r in records:
        out.extend(encode_text(loaded, recipe, r) if hasattr(r, "text") else [encode_vqa(loaded, recipe, r)])
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-pad a homogeneous batch; tensors aligned with the sequence are padded, others concatenated."""
    import torch

    seq = max(len(e.labels) for e in examples)
    batch: dict[str, Any] = {}
    for key in examples[0].inputs:
        vals = [e.inputs[key] for e in examples]
        if not torch.is_tensor(vals[0]):
            continue
        seq_aligned = vals[0].dim() >= 2 and all(v.shape[1] == len(e.labels) for v, e in zip(vals, examples,
                                                                                           strict=True))
        if seq_aligned:
            fill = pad_id if key == "input_ids" else 0
            padded = []
            for v in vals:
                pad = [0, 0] * (v.dim() - 2) + [0, seq - v.shape[1]]
                padded.append(torch.nn.functional.pad(v, pad, value=fill))
            batch[key] = torch.cat(padded)
        else:
            batch[key] = torch.cat(vals)
    batch["labels"] = torch.stack([torch.nn.functional.pad(e.labels, (0, seq - len(e.labels)), value=IGNORE)
                                   for e in examples])
    return batch


def make_batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of indices, each with only image or only text examples; a function of (seed, epoch)."""
    rng = random.Random(seed * 100003 + epoch)
    batches: list[list[int]] = []
    for kind in (True, False):
        idx = [i for i, e in enumerate(examples) if e.has_image is kind]
        rng.shuffle(idx)
        batches.extend(idx[i:i + batch_size] for i in range(0, len(idx), batch_size))
    rng.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------- loss
def answer_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, Any, int]:
    """Cross-entropy over supervised positions only; returns (loss, correct-answer mask per row, n tokens).

    Logits are computed only where a label follows (``logits_to_keep`` with the positions), which on a 49k-word
    vocabulary is most of a small model's training cost. The model's own head, soft-capping included, is used.
    """
    import torch

    labels = batch.pop("labels")
    target = labels[:, 1:]
    keep = (target != IGNORE).any(0).nonzero().flatten()  # positions p whose next token is supervised
    out = model(**batch, logits_to_keep=keep, use_cache=False)
    logits = out.logits.float()  # [B, len(keep), V]
    tgt = target[:, keep]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=IGNORE)
    hit = (logits.argmax(-1) == tgt) | (tgt == IGNORE)
    batch["labels"] = labels
    return loss, hit.all(-1), int((tgt != IGNORE).sum())


# ----------------------------------------------------------------------------- what trains
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
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {k: v.hexdigest() for k, v in sorted(by_part.items())}


# ----------------------------------------------------------------------------- run
def _device_and_method(recipe: Recipe, strict: bool) -> tuple[str, bool]:
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


def _resolve_paths(recipe: Recipe) -> tuple[Path, list[tuple[Stage, list[Any], list[Any]]]]:
    from edgemed import embedded
    from edgemed.data import read_dataset

    base = embedded.resolve(recipe.model.path)
    if not (base / "config.json").is_file():
        raise ArtifactError(f"model.path {recipe.model.path!r}: {base} is not a model folder (no config.json)")
    if bnb_quantized(base):
        raise ArtifactError(f"model.path {base}: is already bitsandbytes-quantised; start from the 16-bit "
                            "checkpoint (method: qlora quantises it while loading) so that merge can use it")
    stages = []
    for st in recipe.stages:
        root = Path(st.data.image_root) if st.data.image_root else None
        outside = st.data.allow_outside_images
        kw = {"trust_pickle": st.data.trust_pickle}
        train = read_dataset(Path(st.data.train), fmt=st.data.format, image_root=root, allow_outside=outside,
                             split=st.data.split, **kw)
        if st.data.limit:
            train = train[:st.data.limit]
        val_split = st.data.validation_split or ("val" if st.data.format == "r2gen" else None)
        val = read_dataset(Path(st.data.validation), fmt=st.data.format, image_root=root, allow_outside=outside,
                           split=val_split, **kw) if st.data.validation else []
        stages.append((st, train, val[:recipe.max_eval_records]))
    return base, stages


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


def _set_trainable(model: Any, names: set[str]) -> list[Any]:
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


def evaluate_examples(model: Any, examples: list[Example], pad_id: int, batch_size: int) -> dict[str, float]:
    """Validation loss and answer accuracy: teacher-forced exact match of every answer token, which for greedy
    decoding equals exact match of the generated answer (each step's argmax given a correct prefix)."""
    import torch

    if not examples:
        return {}
    was_training = model.training
    model.eval()
    losses, hits, tokens = [], 0, 0
    with torch.no_grad():
        for batch_idx in make_batches(examples, batch_size, 0, 0):
            batch = collate([examples[i] for i in batch_idx], pad_id)
            batch = {k: v.to(_model_device(model)) for k, v in batch.items()}
            loss, hit, n = answer_loss(model, batch)
            losses.append(float(loss) * n)
            tokens += n
            hits += int(hit.sum())
    model.train(was_training)
    return {"val_loss": sum(losses) / max(tokens, 1), "val_accuracy": hits / len(examples)}


def _model_device(model: Any):
    return next(model.parameters()).device


def finetune(recipe: Recipe, out: Path | str, *, resume: bool = False, strict: bool = False,
             overwrite: bool = False) -> Path:
    """Fine-tune as ``recipe`` says and write the run folder ``out``; returns its path."""
    out = Path(out).absolute()
    work = out.parent / f"{out.name}.partial"
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun / accelerate launch only rank 0 owns folders
    if main:
        _check_output(out, work, resume, overwrite)
    base, stages = _resolve_paths(recipe)
    device, use_4bit = _device_and_method(recipe, strict)
    encoded = encode_stages(recipe, base, stages)  # every record checked (images decoded) before weights load
    work.mkdir(parents=True, exist_ok=True)
    try:
        _train(recipe, base, encoded, work, device, use_4bit, resume)
    except BaseException:
        if main and not (work / CHECKPOINTS).is_dir():
            shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming: leave no folder behind
        raise
    if main:
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    return out


def _check_output(out: Path, work: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another --out or pass --overwrite")
    if work.exists() and not resume:
        if not overwrite:
            raise ArtifactError(f"{work} holds an unfinished run; pass --resume to continue it, or --overwrite "
                                "to start again")
        shutil.rmtree(work)
    if resume and not (work / CHECKPOINTS).is_dir():
        raise ArtifactError(f"--resume: no checkpoint under {work}; start without --resume")


def encode_stages(recipe: Recipe, base: Path, stages: list[tuple[Stage, list[Any], list[Any]]]
                  ) -> list[tuple[Stage, list[Example], list[Example]]]:
    """Tokenise every stage's records with the base model's processor (no weights needed)."""
    from edgemed.archs import arch_for_dir
    from edgemed.modeling import load_processor

    arch = arch_for_dir(base)
    proc, tok = load_processor(base, arch)
    shell = Loaded(model=None, processor=proc, tokenizer=tok, arch=arch, base_dir=base)
    out = []
    for stage, train, val in stages:
        train_ex = encode(shell, recipe, train)
        if not train_ex:
            raise RecipeError(f"stage {stage.name}: no training examples in {stage.data.train}")
        out.append((stage, train_ex, encode(shell, recipe, val)))
    return out


def _train(recipe: Recipe, base: Path, stages: list[tuple[Stage, list[Example], list[Example]]], work: Path,
           device: str, use_4bit: bool, resume: bool) -> None:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from edgemed.console import user_err

    set_seed(recipe.seed)
    loaded, prefix = build_model(recipe, base, device, use_4bit)
    model, arch = loaded.model, loaded.arch
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    stage_names = [trainable_names(model, arch, st.train, prefix) for st, _, _ in stages]
    all_names = set().union(*stage_names)
    if not all_names:
        raise RecipeError("nothing trains: every stage has vision frozen, projector frozen and decoder frozen")
    frozen_before = param_hashes(model, arch, all_names, prefix)
    report = trainable_report(model, arch, all_names, prefix)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # accelerate keeps its settings process-wide; one process may run several fine-tunes (the demo, tests)
    AcceleratorState._reset_state(reset_partial_state=False)
    accel = Accelerator(gradient_accumulation_steps=recipe.optim.grad_accum, kwargs_handlers=[ddp],
                        cpu=device == "cpu", mixed_precision=mixed_precision(recipe, device, use_4bit))
    main = accel.is_main_process
    state = {"stage": 0, "step": 0, "global_step": 0, "tokens": 0}
    ckpt_root = work / CHECKPOINTS
    if resume:
        state = json.loads((_latest(ckpt_root) / "state.json").read_text())
        loaded_log = work / "train_log.jsonl"
        log = [json.loads(x) for x in loaded_log.read_text().splitlines()] if loaded_log.is_file() else []
        log = [e for e in log if e.get("global_step", 0) <= state["global_step"]]
    else:
        log = []
    started = time.time()
    for si, (stage, train_ex, val_ex) in enumerate(stages):
        if si < state["stage"]:
            continue
        names = stage_names[si]
        params = _set_trainable(accel.unwrap_model(model) if si else model, names)
        if not params:
            raise RecipeError(f"stage {stage.name}: nothing trains in this stage ({stage.train})")
        world = accel.num_processes
        # every process takes the same number of batches per epoch, or DDP's all-reduce would wait forever
        per_epoch = max(1, len(make_batches(train_ex, recipe.optim.batch_size, 0, 0)) // world)
        steps = stage.max_steps or max(1, math.ceil(stage.epochs * per_epoch / recipe.optim.grad_accum))
        lr = stage.lr or recipe.optim.lr
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=recipe.optim.weight_decay)
        sched = get_cosine_schedule_with_warmup(opt, int(recipe.optim.warmup_ratio * steps), steps)
        # the scheduler stays unwrapped: accelerate's wrapper steps it once per process, which under DDP would
        # run the cosine schedule num_processes times too fast; it is stepped below on real optimizer steps
        model, opt = accel.prepare(accel.unwrap_model(model) if si else model, opt)
        start_step = state["step"] if si == state["stage"] else 0
        if resume and si == state["stage"] and start_step:
            accel.load_state(str(_latest(ckpt_root)))
            sched.load_state_dict(torch.load(_latest(ckpt_root) / SCHEDULER, weights_only=True))
        model.train()
        bar = tqdm(total=steps, initial=start_step, desc=f"{stage.name}", disable=not main, dynamic_ncols=True,
                   file=user_err())
        step = start_step
        micro = step * recipe.optim.grad_accum
        t0, tok0 = time.time(), 0
        while step < steps:
            epoch, offset = divmod(micro, per_epoch)
            batches = make_batches(train_ex, recipe.optim.batch_size, recipe.seed, epoch) * world
            mine = batches[accel.process_index::world][:per_epoch]
            for bi in range(offset, len(mine)):
                batch = collate([train_ex[i] for i in mine[bi]], pad_id)
                batch = {k: v.to(accel.device) for k, v in batch.items()}
                with accel.accumulate(model):
                    loss, _, n = answer_loss(model, batch)
                    accel.backward(loss)
                    if accel.sync_gradients:
                        accel.clip_grad_norm_(params, recipe.optim.max_grad_norm)
                    opt.step()
                    if accel.sync_gradients:
                        sched.step()
                    opt.zero_grad()
                micro += 1
                tok0 += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
                if not accel.sync_gradients:
                    continue
                step += 1
                state.update(stage=si, step=step, global_step=state["global_step"] + 1)
                rate = tok0 * world / max(time.time() - t0, 1e-9)
                entry = {"stage": stage.name, "step": step, "global_step": state["global_step"],
                         "loss": float(loss.detach()), "lr": sched.get_last_lr()[0], "tokens_per_s": round(rate, 1)}
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{entry['lr']:.2e}", tok_s=f"{rate:.0f}")
                bar.update(1)
                if val_ex and (step % recipe.eval_every == 0 or step == steps):
                    entry.update(evaluate_examples(model, val_ex, pad_id, recipe.optim.batch_size))
                log.append(entry)
                if main:
                    with open(work / "train_log.jsonl", "a") as f:
                        f.write(json.dumps(entry) + "\n")
                if step % recipe.save_every == 0 and step < steps:
                    _checkpoint(accel, ckpt_root, state, sched)
                if step >= steps:
                    break
        bar.close()
        state.update(stage=si + 1, step=0)
        if si + 1 < len(stages):
            _checkpoint(accel, ckpt_root, state, None)
    accel.wait_for_everyone()
    if main:
        final = accel.unwrap_model(model)
        frozen_after = param_hashes(final, arch, all_names, prefix)
        changed = sorted(k for k in frozen_before if frozen_before[k] != frozen_after.get(k))
        (work / "frozen_check.json").write_text(json.dumps(
            {"before": frozen_before, "after": frozen_after, "identical": not changed}, indent=2) + "\n")
        if changed:
            raise ArtifactError(f"frozen parts changed during training: {changed}; this is a bug, please report it")
        _save_outputs(final, loaded, recipe, base, stages, work, all_names, prefix, report, use_4bit, device,
                      log, time.time() - started)
        shutil.rmtree(ckpt_root, ignore_errors=True)
    accel.wait_for_everyone()


def _latest(root: Path) -> Path:
    ckpts = sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if not ckpts:
        raise ArtifactError(f"--resume: no checkpoint under {root}")
    return ckpts[-1]


def _checkpoint(accel: Any, root: Path, state: dict[str, Any], sched: Any | None) -> None:
    """Save model, optimizer, RNG (accelerate) and scheduler state; keep the last two checkpoints."""
    import torch

    path = root / f"step-{state['global_step']}"
    tmp = root / f".step-{state['global_step']}.partial"
    if accel.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
    accel.wait_for_everyone()
    accel.save_state(str(tmp))
    if accel.is_main_process:
        (tmp / "state.json").write_text(json.dumps(state))
        if sched is not None:
            torch.save(sched.state_dict(), tmp / SCHEDULER)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        for old in sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
    accel.wait_for_everyone()


def _save_outputs(model: Any, loaded: Loaded, recipe: Recipe, base: Path, stages: list[Any], work: Path,
                  all_names: set[str], prefix: str, report: dict[str, Any], use_4bit: bool, device: str,
                  log: list[dict[str, Any]], seconds: float) -> None:
    from safetensors.torch import save_file

    from edgemed.data import dataset_sha256

    extra = {n[len(prefix):]: p.detach().cpu().float().contiguous() for n, p in model.named_parameters()
             if n in all_names and ".lora_" not in n}
    if extra:
        save_file(extra, str(work / TRAINED))
    if prefix:
        model.save_pretrained(work / ADAPTER)
    (work / "recipe.yaml").write_text(dump_recipe(recipe))
    (work / "trainable.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot_loss(log, work / "loss.png")
    cfg = json.loads((base / "config.json").read_text())
    final_val = {k: v for e in log for k, v in e.items() if k.startswith("val_")}
    write_manifest(
        work, "run",
        recipe=recipe.model_dump(mode="json"),
        arch=loaded.arch.name,
        base_model={"path": str(base), "sha256": tree_sha256(base), "model_type": cfg.get("model_type"),
                    "id": recipe.model.id},
        data={st.name: {"train": str(Path(st.data.train).absolute()), "train_sha256": dataset_sha256(
            Path(st.data.train), st.data.format, st.data.image_root, st.data.allow_outside_images,
            split=st.data.split, trust_pickle=st.data.trust_pickle), "validation": st.data.validation}
            for st, _, _ in stages},
        method={"asked": recipe.method, "used": "qlora" if use_4bit else "lora", "device": device},
        trainable=report, final=final_val, seconds=round(seconds, 1),
        parent={"kind": "model", "path": str(base)},
    )


def _plot_loss(log: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    xs = [e["global_step"] for e in log]
    ax.plot(xs, [e["loss"] for e in log], label="train loss", lw=1)
    val = [(e["global_step"], e["val_loss"]) for e in log if "val_loss" in e]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
