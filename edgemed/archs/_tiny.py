"""Tiny random-weight model folders for tests: the same files a real checkpoint has, a few MB in size.

Tokenizers are trained here, offline, on a small built-in corpus, so no test needs a hub download. A tiny
folder is written once per (arch, seed) and is a complete transformers model folder: config, safetensors,
tokenizer with chat template, and a processor for image models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CORPUS = [
    "The chest radiograph shows no focal consolidation, effusion or pneumothorax.",
    "Is there a lesion in the left lung? Yes. Is the lesion small or large? Large.",
    "Which side is the abnormality on? Right. Is this an MRI or a CT scan? CT.",
    "Magnetic resonance imaging of the brain demonstrates a hyperintense lesion.",
    "Café au lait spots, naïve T-cells, 12 mg/kg twice daily for 3–5 days; résumé Ärzte Ødem.",
    "You are a careful radiologist. Answer with one word. Describe the image.",
    "Patients with pneumonia were treated with antibiotics; 98 abstracts were reviewed in 2024.",
    "What organ is shown? Liver. Kidney. Heart. Lung. Brain. Abdomen. Pelvis. Spine.",
    "Hello, how are you today? I am fine, thank you. 0 1 2 3 4 5 6 7 8 9 10 100 1000",
]


def bpe_tokenizer(special: list[str], bos: str | None, eos: str, pad: str, chat_template: str,
                  vocab_size: int = 512, add_bos: bool = False, **extra: Any):
    """A byte-level BPE tokenizer (GPT-2 style, as Llama 3, Qwen2 and SmolLM2 use) trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    if add_bos and bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   chat_template=chat_template, **extra)


def save_folder(out: Path, model: Any, tokenizer: Any, processor: Any | None = None) -> Path:
    """Write model, tokenizer and processor into ``out`` as a from_pretrained-ready folder."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def seeded(seed: int):
    """Seed torch so a tiny model's weights are a function of its seed."""
    import torch

    torch.manual_seed(seed)
    return torch


# ChatML with typed content (text and image parts), the layout SmolLM2 and Qwen2 use. SmolLM2's own template
# takes string content only; this one renders a string exactly as SmolLM2's does.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
