"""Llama-architecture text decoders (Llama 3.x, SmolLM2: the embedded default text model)."""

from __future__ import annotations

from pathlib import Path

from edgemed.archs._tiny import CHATML, bpe_tokenizer, save_folder, seeded
from edgemed.archs.base import ArchSpec, GGUFSpec


def tiny_text_config(vocab_size: int, **kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    base.update(kw)
    return LlamaConfig(**base)


def chatml_tokenizer():
    """SmolLM2-like tokenizer: <|endoftext|>, <|im_start|>, <|im_end|>, and <image> for image models."""
    return bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"], bos="<|im_start|>",
                         eos="<|im_end|>", pad="<|endoftext|>", chat_template=CHATML)


def build_tiny(out: Path, seed: int = 0) -> Path:
    from transformers import LlamaForCausalLM

    torch = seeded(seed)
    tok = chatml_tokenizer()
    cfg = tiny_text_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    return save_folder(out, model, tok)


# checkpoint keys: model.* and lm_head.* as LlamaForCausalLM saves them
GGUF = GGUFSpec(
    key_prefixes=(("model.", "text", "model."), ("lm_head.", "text", "lm_head.")),
    skip=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),  # old checkpoints kept the rope table
    permute_qk=True,  # llama.cpp's llama uses interleaved rope pairs; HF rotates halves
)

SPEC = ArchSpec(
    name="llama",
    family="Llama text decoder (Llama 3.x, SmolLM2)",
    model_types=("llama",),
    model_class="LlamaForCausalLM",
    real_model_ids=("meta-llama/Llama-3.2-1B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    decoder="model",
    gguf_arch="llama",
    gguf=GGUF,
    build_tiny=build_tiny,
)
