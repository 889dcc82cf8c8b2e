"""Llama 3.2 Vision (mllama): tiled ViT with a gated global encoder, Llama 3 decoder with gated cross-attention."""

from __future__ import annotations

from pathlib import Path

from edgemed.archs._tiny import bpe_tokenizer, perturb_constant_params, save_folder, seeded
from edgemed.archs.base import ArchSpec, ONNXSpec

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|finetune_right_pad_id|>", "<|python_tag|>"]
IMAGE_TOKEN = "<|image|>"

# Modelled on Llama-3.2-11B-Vision-Instruct's template, without tools. Two deliberate differences: the real one
# raises "Prompting with images is incompatible with system messages" and applies |trim to typed system content
# (a list); this one writes a plain system turn when an image is present and reads typed system text. It also
# fixes the date the real one takes from strftime_now, so renders are reproducible.
MLLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- else %}{%- set system_message = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') | trim %}{%- endif %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- set image_ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- if message['content'] is not string %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}"
    "{%- set image_ns.has_images = true %}{%- endif %}{%- endfor %}{%- endif %}{%- endfor %}"
    "{%- if not image_ns.has_images %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- elif system_message %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

IMAGE_SIZE, PATCH_SIZE, MAX_TILES = 32, 8, 4  # 4x4 patches (+CLS) per 32 px tile, up to 4 tiles as the real one


def llama3_tokenizer():
    """Llama 3-like tokenizer: adds <|begin_of_text|>, ends turns with <|eot_id|>; <|image|> is the last id, one
    past the text vocabulary, as in Llama 3.2 Vision (id 128256 = text vocab_size)."""
    from tokenizers import AddedToken

    tok = bpe_tokenizer(LLAMA3_SPECIAL, bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
                        chat_template=MLLAMA_TEMPLATE, add_bos=True)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tok


def processor(tokenizer):
    """MllamaProcessor with the PIL image backend (needs no torchvision)."""
    from transformers import MllamaImageProcessorPil, MllamaProcessor

    ip = MllamaImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=MAX_TILES)
    return MllamaProcessor(image_processor=ip, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def build_tiny(out: Path, seed: int = 0) -> Path:
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaTextConfig, MllamaVisionConfig

    torch = seeded(seed)
    tok = llama3_tokenizer()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                                max_num_tiles=MAX_TILES, intermediate_layers_indices=[0, 1],
                                vision_output_dim=32 * 3)  # hidden * (len(intermediate_layers_indices) + 1)
    text = MllamaTextConfig(vocab_size=image_id, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                            max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 64},
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    cfg = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id)
    model = MllamaForConditionalGeneration(cfg).to(torch.float32)
    # cross-attention and global-encoder tanh gates start at 0: without noise the image would change nothing;
    # gates get |g| in [0.5, 1.5] so that an exporter that drops a gate or its tanh is far off
    perturb_constant_params(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 1 and "gate" in name.rsplit(".", 1)[-1]:
                p.uniform_(0.5, 1.5).mul_(1 if torch.rand(()) < 0.5 else -1)
    return save_folder(out, model, tok, processor(tok))


SPEC = ArchSpec(
    name="mllama",
    family="Llama 3.2 Vision (mllama)",
    model_types=("mllama",),
    model_class="MllamaForConditionalGeneration",
    real_model_ids=("meta-llama/Llama-3.2-11B-Vision-Instruct",),
    decoder="model.language_model",
    vision="model.vision_model",
    projector="model.multi_modal_projector",
    # the default leaves match both self_attn.{q,k,v,o}_proj and the cross-attention layers' cross_attn.*_proj
    vision_lora=("q_proj", "k_proj", "v_proj", "o_proj"),
    norms=("input_layernorm", "post_attention_layernorm", "q_norm", "k_norm", "norm"),
    vision_norms=("input_layernorm", "post_attention_layernorm", "layernorm_pre", "layernorm_post"),
    image_placeholder=IMAGE_TOKEN,
    gguf_arch=None,
    no_gguf_reason=("llama.cpp has no mllama (Llama 3.2 Vision) support: its gated cross-attention layers have no "
                    "llama.cpp graph and libmtmd has no projector for it; use `edgemed export onnx` instead"),
    text_config=lambda config: config.text_config,
    build_tiny=build_tiny,
    # image features enter by gated cross-attention; transformers 5 has no get_image_features for mllama, so the
    # vision graph runs the tower on the tiles then the projector
    onnx=ONNXSpec(decoder="cross", vision_inputs=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"),
                  image_features=False),
    notes=(
        "text_config.cross_attention_layers lists the decoder layers that are cross-attention layers "
        "(11B: [3, 8, 13, 18, 23, 28, 33, 38]); they have no self-attention: cross_attn (q/k/v/o_proj, q_norm and "
        "k_norm RMSNorm) reads the projected vision states as keys/values",
        "gated cross-attention: h = h + tanh(cross_attn_attn_gate) * cross_attn(...); "
        "h = h + tanh(cross_attn_mlp_gate) * mlp(...); text tokens before the first <|image|> have a zero "
        "cross-attention mask and their cross-attention layers output 0 (full_text_row_masked_out_mask)",
        "embed_tokens has vocab_size + 8 rows; <|image|> is id vocab_size, outside lm_head's rows",
        "vision: each image is cut into up to max_num_tiles tiles (aspect_ratio_ids, aspect_ratio_mask); "
        "pre/post-tile and gated positional embeddings (tanh gates), CLS per tile, patches padded to a multiple "
        "of 8; local encoder then a gated global encoder (gate_attn, gate_ffn tanh gates); the output "
        "concatenates the final state with the intermediate_layers_indices hidden states (vision_output_dim)",
        "projector: one Linear(vision_output_dim -> text hidden) applied to every tile's patch states; the "
        "decoder cross-attends to all of them (no image tokens are inserted in the text)",
        "RoPE: Llama 3 scaling (rope_type llama3) with theta 5e5",
        "the real chat template adds today's date (strftime_now) to text-only prompts and refuses a system "
        "message together with an image",
        "tokenizer adds <|begin_of_text|> and the chat template starts with it too: tokenise rendered prompts "
        "with add_special_tokens=False",
    ),
)
