"""Qwen2 text decoders (Qwen2.5-Instruct): Llama-like with biases on q/k/v."""

from __future__ import annotations

import json
from pathlib import Path

from edgemed.archs._tiny import bpe_tokenizer, perturb_constant_params, save_folder, seeded
from edgemed.archs.base import ArchSpec, GGUFSpec

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2.5-Instruct's template without the tool-calling branches, taking typed content (text parts) as well as
# strings; a string renders exactly as Qwen2.5's own template renders it.
QWEN2_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{ '<|im_start|>system\\n' + text(messages[0]['content']) + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (message['role'] == 'system' and loop.first) -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + text(message['content']) + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def qwen_tokenizer(special: list[str], chat_template: str, **extra):
    """Qwen2Tokenizer (Qwen's pre-tokenizer regex, NFC, byte-level BPE) over a vocabulary trained on the corpus."""
    from transformers import Qwen2Tokenizer

    trained = json.loads(bpe_tokenizer(special, None, "<|im_end|>", "<|endoftext|>", "").backend_tokenizer.to_str())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["model"]["merges"]]
    return Qwen2Tokenizer(vocab=trained["model"]["vocab"], merges=merges, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", unk_token=None, chat_template=chat_template,
                          extra_special_tokens=special, **extra)


def tiny_text_config(tok, **kw):
    from transformers import Qwen2Config

    base = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=True,
                bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    base.update(kw)
    return Qwen2Config(**base)


def build_tiny(out: Path, seed: int = 0) -> Path:
    from transformers import Qwen2ForCausalLM

    torch = seeded(seed)
    tok = qwen_tokenizer(QWEN_SPECIAL, QWEN2_TEMPLATE)
    model = Qwen2ForCausalLM(tiny_text_config(tok)).to(torch.float32)
    perturb_constant_params(model)  # q/k/v biases start at 0: an exporter that drops them must fail
    return save_folder(out, model, tok)


# checkpoint keys: model.* and lm_head.* as Qwen2ForCausalLM saves them; llama.cpp's qwen2 uses NEOX (rotate-half)
# RoPE like transformers, so Q/K rows stay as they are
GGUF = GGUFSpec(key_prefixes=(("model.", "text", "model."), ("lm_head.", "text", "lm_head.")))

SPEC = ArchSpec(
    name="qwen2",
    family="Qwen2 text decoder (Qwen2.5-Instruct)",
    model_types=("qwen2",),
    model_class="Qwen2ForCausalLM",
    real_model_ids=("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct"),
    decoder="model",
    gguf_arch="qwen2",
    gguf=GGUF,
    build_tiny=build_tiny,
    notes=(
        "q_proj, k_proj and v_proj have biases (o_proj and the MLP do not)",
        "RoPE theta 1e6 (rope_parameters); small checkpoints tie lm_head to embed_tokens, 7B+ do not",
        "tokenizer: byte-level BPE with Qwen2's pre-tokenizer regex and NFC normaliser (llama.cpp pre-tokenizer "
        "'qwen2'); no <bos> is added; ChatML turns <|im_start|>role ... <|im_end|>",
    ),
)
