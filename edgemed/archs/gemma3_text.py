"""Gemma 3 text decoder (Gemma3ForCausalLM, model_type gemma3_text: Gemma 3 1B, MedGemma 27B text)."""

from __future__ import annotations

from pathlib import Path

from edgemed.archs._tiny import perturb_constant_params, save_folder, save_spm_model, seeded, spm_tokenizer
from edgemed.archs.base import ArchSpec, GGUFSpec, ONNXSpec

GEMMA_SPECIAL = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]

# Gemma 3's own template (google/gemma-3-*-it, google/medgemma-4b-it): <bos>, the system turn folded into the
# first user turn, role "assistant" written as "model", typed or string content, text trimmed.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def gemma_tokenizer():
    """Gemma-like SentencePiece tokenizer: <pad>=0 <eos>=1 <bos>=2 <unk>=3, turn and image tokens, adds <bos>."""
    return spm_tokenizer(GEMMA_SPECIAL, GEMMA_TEMPLATE, add_bos_token=True,
                         extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                               "image_token": "<image_soft_token>"})


# Six layers, not two: llama.cpp's gemma3 hard-codes Gemma 3's pattern (every 6th layer global, il % 6 == 5), so
# the smallest model that mixes local and global layers the way real checkpoints do has six.
LAYER_TYPES = ["sliding_attention"] * 5 + ["full_attention"]


def tiny_text_config(tok, **kw):
    """Gemma3TextConfig that trips naive exporters: sliding and global layers with a window shorter than the
    test prompts, separate local/global RoPE bases, soft-capping set, 1+w norms.

    query_pre_attn_scalar equals head_dim here, as in Gemma 3 1B/4B and MedGemma 4B, because llama.cpp's gemma3
    cannot express anything else (:func:`gguf_text_kv` refuses it; tests/test_archs.py checks the refusal)."""
    from transformers import Gemma3TextConfig

    base = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=len(LAYER_TYPES),
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                sliding_window=8, layer_types=LAYER_TYPES,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                                 "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
                final_logit_softcapping=30.0, attn_logit_softcapping=50.0, max_position_embeddings=512,
                rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")],
                pad_token_id=tok.pad_token_id)
    base.update(kw)
    return Gemma3TextConfig(**base)


def build_tiny(out: Path, seed: int = 0) -> Path:
    from transformers import Gemma3ForCausalLM

    torch = seeded(seed)
    tok = gemma_tokenizer()
    model = Gemma3ForCausalLM(tiny_text_config(tok)).to(torch.float32)
    perturb_constant_params(model)  # Gemma norms start at w=0 (scale 1+w): make the +1 matter
    save_folder(out, model, tok)
    save_spm_model(out, tok)
    return out


NOTES = (
    "RMSNorm weights are stored as w and applied as x*(1+w) (all norms, q_norm/k_norm included); llama.cpp's "
    "gemma3 expects 1+w in the GGUF",
    "token embeddings are multiplied by sqrt(hidden_size) (in the model's dtype); image embeddings are not",
    "layer_types gives each layer sliding_attention (window config.sliding_window) or full_attention; the two use "
    "different RoPE bases (rope_parameters sliding_attention/full_attention rope_theta)",
    "attention scores are scaled by query_pre_attn_scalar**-0.5, not head_dim**-0.5; llama.cpp's gemma3 ignores "
    "query_pre_attn_scalar (it uses head_dim**-0.5, or (hidden/heads)**-0.5 when n_layer == 62): fold the "
    "difference into attn_q_norm, i.e. store (1+w)*sqrt(head_dim/query_pre_attn_scalar)",
    "llama.cpp's gemma3 hard-codes the layer pattern (layer il is global iff il % 6 == 5) and the local RoPE base "
    "10000: refuse to export layer_types or a sliding rope_theta that differ",
    "q_norm and k_norm (RMSNorm over head_dim) are applied to queries and keys before RoPE",
    "four norms per layer: input_layernorm, post_attention_layernorm (after attention, before the residual add), "
    "pre_feedforward_layernorm, post_feedforward_layernorm",
    "Gemma3ForCausalLM applies final_logit_softcapping: logits = c*tanh(logits/c) when set",
    "attn_logit_softcapping may be set in config but transformers' Gemma 3 (and llama.cpp's gemma3) ignore it: do "
    "not apply it",
    "MLP activation is gelu_pytorch_tanh; lm_head is tied to embed_tokens",
    "tokenizer is SentencePiece BPE with byte fallback (tokenizer.model beside tokenizer.json); it adds <bos> and "
    "the chat template starts with <bos> too: tokenise rendered prompts with add_special_tokens=False",
)

def gguf_text_kv(c) -> dict:
    """Gemma 3 keys llama.cpp's gemma3 reads, after checking the config asks nothing llama.cpp hard-codes otherwise.

    llama.cpp's gemma3 fixes the layer pattern (global iff il % 6 == 5), the local RoPE base (10000) and the
    attention scale (head_dim**-0.5, or (hidden/heads)**-0.5 for 62 layers, the 27B); a model that differs would
    export without error and answer differently, so it is refused.
    """
    from edgemed.errors import ExportError

    want = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(c.num_hidden_layers)]
    if list(c.layer_types) != want:
        raise ExportError(f"layer_types {list(c.layer_types)} differ from llama.cpp's fixed Gemma 3 pattern (every "
                          "6th layer global); this model cannot be exported to GGUF; use `edgemed export onnx`")
    local = (c.rope_parameters or {}).get("sliding_attention", {}).get("rope_theta", 10_000.0)
    if local != 10_000.0:
        raise ExportError(f"rope_parameters: sliding-layer rope_theta {local} differs from llama.cpp's fixed 10000 "
                          "for Gemma 3; use `edgemed export onnx`")
    scale = c.hidden_size / c.num_attention_heads if c.num_hidden_layers == 62 else c.head_dim
    if c.query_pre_attn_scalar != scale:
        raise ExportError(f"query_pre_attn_scalar {c.query_pre_attn_scalar} differs from the {scale:g} llama.cpp's "
                          "gemma3 uses for this model; `export gguf` cannot fold the difference into attn_q_norm yet; "
                          "use `edgemed export onnx`")
    full = (c.rope_parameters or {}).get("full_attention", {}).get("rope_theta", 1_000_000.0)
    return {"{arch}.attention.sliding_window": int(c.sliding_window), "{arch}.rope.freq_base": float(full),
            "{arch}.final_logit_softcapping": c.final_logit_softcapping}


# checkpoint keys: model.* and lm_head.* as Gemma3ForCausalLM saves them; Gemma RMSNorm weights are w with 1 + w
# applied, llama.cpp multiplies by the stored weight; RoPE is NEOX-style in both (no Q/K permutation)
GGUF = GGUFSpec(
    key_prefixes=(("model.", "text", "model."), ("lm_head.", "text", "lm_head.")),
    norm_plus_one=(r"blk\.\d+\.(attn_norm|post_attention_norm|ffn_norm|post_ffw_norm|attn_q_norm|attn_k_norm)"
                   r"\.weight", r"output_norm\.weight"),
    text_kv=gguf_text_kv,
)

SPEC = ArchSpec(
    name="gemma3_text",
    family="Gemma 3 text decoder (Gemma 3 1B, MedGemma 27B text)",
    model_types=("gemma3_text",),
    model_class="Gemma3ForCausalLM",
    real_model_ids=("google/gemma-3-1b-it", "google/medgemma-27b-text-it"),
    decoder="model",
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
           "q_norm", "k_norm", "norm"),
    gguf_arch="gemma3",
    gguf=GGUF,
    build_tiny=build_tiny,
    onnx=ONNXSpec(attn_softcapping=False),  # Gemma3Attention never passes softcap (transformers 5.24)
    notes=NOTES,
)
