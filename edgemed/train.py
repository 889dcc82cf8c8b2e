"""Parameter-efficient fine-tuning: LoRA / QLoRA on the text decoder, LayerNorm-only, projector + LoRA, in stages.

``finetune(recipe, out)`` writes a run folder: ``adapter/`` (PEFT), ``trained.safetensors`` (projector and norm
weights that trained), ``recipe.yaml``, ``trainable.json``, ``frozen_check.json``, ``train_log.jsonl``,
``loss.png`` and ``manifest.json``. While it runs the folder is ``OUT.partial`` with checkpoints under it;
``--resume`` continues from the last one, and the folder is renamed to OUT only when training is complete.

Records become batches in ``train_batches`` and the model to train is built in ``train_model``; this module is
the run: stages, the loop, checkpoints and the run folder. The loop is accelerate's, so the same code runs on one
CPU, one GPU, or several processes under ``accelerate launch`` / ``torchrun`` (DDP; gloo on CPU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from edgemed.artifacts import tree_sha256, write_manifest
from edgemed.errors import ArtifactError, RecipeError
from edgemed.modeling import ADAPTER, TRAINED, Loaded, bnb_quantized
from edgemed.recipe import Recipe, Stage, dump_recipe
from edgemed.train_batches import Example, answer_loss, collate, encode, evaluate_examples, make_batches
from edgemed.train_model import (
    build_model,
    device_and_method,
    mixed_precision,
    param_hashes,
    set_trainable,
    trainable_names,
    trainable_report,
)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
SCHEDULER = "scheduler.pt"


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


def finetune(recipe: Recipe, out: Path | str, *, resume: bool = False, strict: bool = False,
             overwrite: bool = False) -> Path:
    """Fine-tune as ``recipe`` says and write the run folder ``out``; returns its path."""
    out = Path(out).absolute()
    work = out.parent / f"{out.name}.partial"
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun / accelerate launch only rank 0 owns folders
    if main:
        _check_output(out, work, resume, overwrite)
    base, stages = _resolve_paths(recipe)
    device, use_4bit = device_and_method(recipe, strict)
    encoded = encode_stages(recipe, base, stages)  # every record checked (images decoded) before weights load
    _check_memory(recipe, base, device, encoded)
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


def _check_memory(recipe: Recipe, base: Path, device: str,
                  encoded: list[tuple[Stage, list[Example], list[Example]]]) -> None:
    """Refuse a fine-tune that will not fit (RAM on the CPU, free GPU memory on CUDA) before the weights load: the
    plan's sum at the longest example's length and supervised tokens (not max_length, which most data never fills)."""
    from edgemed import memory
    from edgemed.plan import plan

    examples = [e for _, train, val in encoded for e in (*train, *val)]
    seq = min(recipe.max_length, max(int(e.labels.shape[-1]) for e in examples))
    supervised = max(int((e.labels >= 0).sum()) for e in examples)
    what = f"fine-tuning {base} ({recipe.method}, batch {recipe.optim.batch_size} x {seq} tokens)"
    try:
        need = plan(recipe, base, seq=seq, supervised=supervised, ram=False,
                    device="cuda" if device.startswith("cuda") else "cpu").gpu_peak * memory.GB
    except Exception as e:  # noqa: BLE001 - the estimate is a courtesy: a config plan cannot read still trains
        log.warning("no memory estimate for %s (%s: %s); training without the check", base, type(e).__name__, e)
        return
    if device.startswith("cuda"):
        import torch

        memory.require(need + 300 * memory.MB, what + " on the GPU", available=torch.cuda.mem_get_info()[0])
    else:
        memory.require(need + 300 * memory.MB, what)


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
        params = set_trainable(accel.unwrap_model(model) if si else model, names)
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
