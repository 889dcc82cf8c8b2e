"""How training records become supervised token batches (the answer tokens carry the loss), and that loss."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgemed import prompting
from edgemed.errors import RecipeError
from edgemed.modeling import Loaded
from edgemed.recipe import Recipe

IGNORE = -100


# ----------------------------------------------------------------------------- examples
@dataclass
class Example:
    """One tokenised training or validation example.

    Every record is encoded (and checked) before the model loads, but an image's pixel tensors are not kept: at
    336 px one image is 1.35 MB of float32, so the demo's 1440 training records held 1.9 GB before the first step,
    beside the model (measured on LLaVA-1.5-7B: 18.0 GB against 15.5 predicted). ``pixels`` makes them again,
    from the same processor call, when the example's batch is built."""

    inputs: dict[str, Any]  # processor output for one sample (tensors with batch dim 1), pixel tensors left out
    labels: Any  # LongTensor [seq], IGNORE outside the answer
    has_image: bool
    source: str
    pixels: Callable[[], dict[str, Any]] | None = None  # the image tensors ``inputs`` leaves out

    def model_inputs(self) -> dict[str, Any]:
        """``inputs`` with the pixel tensors made again (the processor is deterministic)."""
        return {**self.inputs, **self.pixels()} if self.pixels is not None else self.inputs


PIXEL_KEYS = ("pixel_values", "pixel_values_videos")  # the processor outputs that scale with the image's pixels


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
    pixels = None
    if loaded.arch.is_vision:
        full = dict(loaded.processor(text=prompt + answer, **kwargs))
        n_prompt = loaded.processor(text=prompt, **kwargs)["input_ids"].shape[1]
        if has_image:
            image = record.image

            def pixels(text: str = prompt + answer) -> dict[str, Any]:
                again = loaded.processor(text=text, return_tensors="pt", add_special_tokens=False,
                                         images=[load_image(image, render=loaded.arch.dicom_render)])
                return {k: again[k] for k in PIXEL_KEYS if k in again}

            full = {k: v for k, v in full.items() if k not in PIXEL_KEYS}
    else:
        full = loaded.tokenizer(prompt + answer, return_tensors="pt", add_special_tokens=False)
        n_prompt = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = full["input_ids"][0]
    if len(ids) > recipe.max_length:
        raise RecipeError(f"{record.source}: {len(ids)} tokens exceed max_length={recipe.max_length}; "
                          "raise max_length in the recipe or shorten the record")
    labels = ids.clone()
    labels[:n_prompt] = IGNORE
    return Example(inputs=dict(full), labels=labels, has_image=has_image, source=record.source, pixels=pixels)


def encode_text(loaded: Loaded, recipe: Recipe, record: Any) -> list[Example]:
    """A corpus document as causal-LM examples of at most max_length tokens (loss on every token)."""
    import torch

    tok = loaded.tokenizer
    ids = tok(record.text, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        ids = ids + [tok.eos_token_id]
    # each example begins as the model's input always begins: with BOS where the tokenizer adds one (Gemma and
    # Llama 3 are far off their training distribution without it; every runtime edgemed serves with adds it)
    bos_text = prompting.bos_text(tok)
    bos = tok(bos_text, add_special_tokens=False)["input_ids"] if bos_text else []
    step = recipe.max_length - len(bos)
    out = []
    for start in range(0, len(ids), step):
        piece = ids[start:start + step]
        if len(bos) + len(piece) < 2:
            continue
        chunk = torch.tensor(bos + piece)
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
    inputs = [e.model_inputs() for e in examples]
    for key in inputs[0]:
        vals = [i[key] for i in inputs]
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


