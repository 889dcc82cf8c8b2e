"""`edgemed plan`: what a recipe's fine-tune will need before it runs (GPU memory, term by term) and the size of the
16-bit checkpoint that merge writes, from the model's config alone (built on the meta device: no weights are read).

The fine-tune estimate follows what ``edgemed.train`` does, term by term:

* weights: NF4 decoder linears at 4.5 bits each with double quantisation (bitsandbytes: 4-bit codes, one 8-bit
  absmax per 64 weights, one fp32 scale per 256 absmax), everything else (embeddings, vision tower, projector,
  norms, head) in the compute dtype; 16/32-bit LoRA keeps all of it in ``recipe.dtype``;
* LoRA: parameters, gradients and AdamW's two moments in fp32 (16 bytes per trainable value);
* activations: with gradient checkpointing, each decoder layer's input is kept and one layer's activations are
  rebuilt at a time; without it every layer's are kept. A layer's activations are counted per token from its
  widths (the norms' fp32 copies, the q/k/v/o and MLP outputs, LoRA dropout's copies of each adapted input);
* logits at the supervised positions only, in fp32, with their log-softmax and gradient.

Nothing here is fitted to measurements; tests/test_plan.py checks it against the GPU measurements in
docs/benchmarks-gpu.md. The RAM each later command needs comes from edgemed.memory, whose rules the commands
themselves check before they start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgemed.errors import ArtifactError

GB = 1e9
NF4_BYTES = 4.5 / 8  # 4-bit code + 8-bit absmax per 64 + fp32 per 256 absmax (double quant): ~4.5 bits/weight
ADAM_BYTES = 16  # fp32 weight + grad + two moments per trainable value


@dataclass(frozen=True)
class Counts:
    """Parameter counts of a model by how a fine-tune holds them."""

    total: int
    quantizable: int  # decoder linears (NF4 under QLoRA)
    kept: int  # everything else: embeddings, vision tower, projector, norms, head
    lora: int  # trainable LoRA values for the recipe's targets
    other_trainable: int  # trained norms / projector
    largest_tensor: int
    layers: int
    hidden: int
    intermediate: int
    q_width: int
    kv_width: int
    vocab: int


@dataclass(frozen=True)
class Plan:
    """Predicted peaks in GB: ``gpu_*`` is GPU memory allocated while training (torch.cuda.max_memory_allocated)."""

    model: str
    method: str
    batch: int
    seq: int
    supervised: int
    counts: Counts
    gpu_weights: float
    gpu_trainable: float
    gpu_activations: float
    gpu_logits: float
    gpu_peak: float
    checkpoint_gb: float
    largest_tensor_gb: float
    ram_gb: dict[str, float] = field(default_factory=dict)  # peak RAM above the interpreter, per command

    def table(self) -> str:
        c = self.counts
        rows = [
            f"model: {self.model} ({c.total / 1e9:.2f}B parameters; {c.lora / 1e6:.1f}M LoRA values trained"
            + (f", {c.other_trainable / 1e6:.1f}M other" if c.other_trainable else "") + ")",
            f"fine-tune ({self.method}, batch {self.batch} x {self.seq} tokens, {self.supervised} supervised):",
            f"  weights      {self.gpu_weights:6.2f} GB",
            f"  trainable    {self.gpu_trainable:6.2f} GB  (LoRA + grads + AdamW, fp32)",
            f"  activations  {self.gpu_activations:6.2f} GB",
            f"  logits       {self.gpu_logits:6.2f} GB",
            f"  peak GPU     {self.gpu_peak:6.2f} GB",
            f"merged 16-bit checkpoint {self.checkpoint_gb:.2f} GB; largest tensor {self.largest_tensor_gb:.2f} GB "
            "in 16-bit",
        ]
        if self.ram_gb:
            rows.append("RAM, peak above the interpreter (about 0.4 GB with torch), as each command checks before "
                        "it starts:")
            rows += [f"  {k:<34} {v:6.2f} GB" for k, v in self.ram_gb.items()]
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def meta_model(model_dir: Path) -> tuple[Any, Any]:
    """The model of ``model_dir``'s config built on the meta device (shapes only), and its ArchSpec."""
    import torch
    from transformers import AutoConfig

    from edgemed.archs import arch_for_dir
    from edgemed.modeling import model_class

    if not (Path(model_dir) / "config.json").is_file():
        raise ArtifactError(f"{model_dir}: no config.json; give the recipe's model folder (or --model DIR)")
    arch = arch_for_dir(Path(model_dir))
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        model = model_class(arch)._from_config(config)
    return model, arch


def count(model: Any, arch: Any, recipe: Any) -> Counts:
    """Parameter counts of ``model`` (a meta model) for ``recipe``'s method and trained parts."""
    import re

    import torch

    from edgemed.train_model import lora_regex

    skip = [m for m in (arch.vision, arch.projector, arch.lm_head) if m]
    regex = lora_regex(arch, recipe)
    pattern = re.compile(regex) if regex else None
    total = quantizable = lora = other = largest = 0
    seen: set[int] = set()
    r = recipe.lora.r
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            if not any(name == s or name.startswith(s + ".") for s in skip) \
                    and arch.part_of(name + ".weight") == "decoder":
                quantizable += w.numel()
            if pattern is not None and pattern.fullmatch(name):
                lora += r * (module.in_features + module.out_features)
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        largest = max(largest, p.numel())
        if _trained_other(arch, recipe, name):
            other += p.numel()
    text = arch.text_config(model.config)
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    return Counts(total=total, quantizable=quantizable, kept=total - quantizable, lora=lora, other_trainable=other,
                  largest_tensor=largest, layers=text.num_hidden_layers, hidden=hidden,
                  intermediate=text.intermediate_size, q_width=heads * head_dim, kv_width=kv * head_dim,
                  vocab=text.vocab_size)


def _trained_other(arch: Any, recipe: Any, name: str) -> bool:
    parts = {p for s in recipe.stages for p in (("decoder_norms",) if s.train.decoder == "layernorm" else ())
             + (("projector",) if s.train.projector == "train" else ())}
    if "projector" in parts and arch.part_of(name) == "projector":
        return True
    return "decoder_norms" in parts and arch.is_decoder_norm(name)


def layer_bytes_per_token(c: Counts, lora: bool, act_bytes: int) -> float:
    """Bytes one decoder layer keeps per token for its backward (see the module docstring)."""
    h, i, q, kv = c.hidden, c.intermediate, c.q_width, c.kv_width
    # norm outputs and residual adds (h), q/k/v/o and rope copies, MLP gate/up/act/product and down output
    widths = 6 * h + 3 * q + 3 * kv + 4 * i
    if lora:  # dropout keeps a copy of each adapted input: q,k,v read h; o reads q; gate/up read h; down reads i
        widths += 3 * h + q + 2 * h + i
    return widths * act_bytes + 4 * h * 4  # + the RMSNorms' fp32 upcasts


def plan(recipe: Any, model_dir: Path, *, batch: int | None = None, seq: int | None = None,
         supervised: int | None = None, device: str = "cuda", ram: bool = True) -> Plan:
    """Predicted memory for ``recipe`` on the model in ``model_dir`` (its config only); ``ram``: also each later
    command's RAM need (``ram_gb``), which reads the checkpoint's safetensors headers."""
    model, arch = meta_model(Path(model_dir))
    c = count(model, arch, recipe)
    batch = batch or recipe.optim.batch_size
    seq = seq or recipe.max_length
    supervised = min(supervised or seq, seq)
    qlora = recipe.method == "qlora" and device == "cuda"
    weights, trainable, acts, logits = _terms(c, recipe, batch, seq, supervised, qlora)
    peak = weights + trainable + acts + logits
    cpu_peak = peak if not qlora else sum(_terms(c, recipe, batch, seq, supervised, False))  # LoRA on the CPU
    return Plan(model=str(model_dir), method="qlora" if qlora else f"lora-{recipe.dtype}", batch=batch, seq=seq,
                supervised=supervised, counts=c, gpu_weights=weights / GB, gpu_trainable=trainable / GB,
                gpu_activations=acts / GB, gpu_logits=logits / GB, gpu_peak=peak / GB,
                checkpoint_gb=c.total * 2 / GB, largest_tensor_gb=c.largest_tensor * 2 / GB,
                ram_gb=ram_needs(Path(model_dir), c, cpu_peak) if ram else {})


def _terms(c: Counts, recipe: Any, batch: int, seq: int, supervised: int, qlora: bool
           ) -> tuple[float, float, float, float]:
    """(weights, trainable, activations, logits) in bytes, as the module docstring adds them up."""
    compute = 2 if (qlora or recipe.dtype != "float32") else 4
    weights = (c.quantizable * NF4_BYTES + c.kept * compute) if qlora else c.total * compute
    trainable = (c.lora + c.other_trainable) * ADAM_BYTES
    per_layer = layer_bytes_per_token(c, c.lora > 0, compute) * batch * seq
    if recipe.gradient_checkpointing:
        acts = c.layers * batch * seq * c.hidden * compute + per_layer
    else:
        acts = c.layers * per_layer
    logits = 3 * batch * supervised * c.vocab * 4  # logits, log-softmax, gradient (fp32)
    return weights, trainable, acts, logits


SHARD_BYTES = 5e9  # transformers' default max_shard_size ("5GB"): the merged shards when the folder has no weights
Q4_K_M_BITS = 4.85  # llama.cpp's q4_k_m file, bits per weight (its own table for 7B-class models)


def ram_needs(model_dir: Path, c: Counts, cpu_finetune: float) -> dict[str, float]:
    """Each command's RAM need in GB (edgemed.memory's rules) for this model: from its safetensors headers when
    the folder has weights, else from the config's counts with hub-sized (5 GB) shards."""
    from edgemed import memory

    if any(model_dir.glob("*.safetensors")):
        total, largest = memory.tensor_sizes(model_dir)
        shard = memory.largest_shard(model_dir)
    else:
        total, largest, shard = c.total, c.largest_tensor, min(SHARD_BYTES, 2 * c.total)
    return {"finetune (this recipe, 16/32-bit LoRA on CPU)": (cpu_finetune + 300 * memory.MB) / GB,
            "merge (its logit check included)": memory.merge_bytes(shard) / GB,
            "export gguf": memory.gguf_bytes(total, largest) / GB,
            "export gguf, calibrated": memory.gguf_bytes(total, largest, calibrating=True) / GB,
            "export onnx": memory.onnx_bytes(total, largest, memory.is_image_model(model_dir)) / GB,
            "parity of a q4_k_m export": memory.parity_bytes(total, total * Q4_K_M_BITS / 8) / GB,
            "parity of q4_k_m, 16-bit reference": memory.parity_bytes(total, total * Q4_K_M_BITS / 8, 2) / GB}

