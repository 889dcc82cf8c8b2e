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


def spm_tokenizer(special: list[str], chat_template: str, vocab_size: int = 400, **extra: Any):
    """A SentencePiece BPE tokenizer with byte fallback, as Gemma uses, trained on CORPUS and wrapped.

    Ids 0-3 are <pad>, <eos>, <bos>, <unk> (Gemma's order); ``special`` follow as user-defined pieces. The
    returned GemmaTokenizer keeps the trained model in ``spm_model_proto`` so that :func:`save_spm_model` can
    write ``tokenizer.model`` beside ``tokenizer.json``, as real Gemma checkpoints ship both.
    """
    import io
    import tempfile

    import sentencepiece as spm
    from transformers import GemmaTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=special, hard_vocab_limit=False, minloglevel=2)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "tokenizer.model").write_bytes(buf.getvalue())
        # transformers converts a folder holding only tokenizer.model into its tokenizers-backed GemmaTokenizer
        tok = GemmaTokenizer.from_pretrained(d, chat_template=chat_template, **extra)
    tok.init_kwargs.pop("vocab_file", None)  # the temporary path would be saved into tokenizer_config.json
    tok.vocab_file = None
    tok.spm_model_proto = buf.getvalue()
    return tok


def save_spm_model(out: Path, tokenizer: Any) -> None:
    """Write the SentencePiece model of a :func:`spm_tokenizer` tokenizer as ``out/tokenizer.model``."""
    (out / "tokenizer.model").write_bytes(tokenizer.spm_model_proto)


def perturb_constant_params(model: Any, vector_std: float = 0.1, matrix_std: float = 0.02) -> list[str]:
    """Add noise to every parameter initialised to a constant (norm weights, biases, zero-init gates/projections).

    Random-weight test models otherwise keep norms at exactly 1 (or 0 for Gemma's 1+w), biases and tanh gates at
    0, so an exporter that drops a bias, forgets Gemma's +1 or a gate would still agree with PyTorch. Returns
    the names of the parameters changed.
    """
    import torch

    changed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() > 1 and not bool((p == p.flatten()[0]).all()):
                continue
            std = vector_std if p.dim() <= 1 else matrix_std
            p.add_(torch.randn_like(p) * std)
            changed.append(name)
    return changed
