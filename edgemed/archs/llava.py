"""LLaVA layout: CLIP vision tower, MLP projector, Llama-family decoder (LLaVA-Med; the embedded image model)."""

from __future__ import annotations

from pathlib import Path

from edgemed.archs._tiny import save_folder, seeded
from edgemed.archs.base import ArchSpec
from edgemed.archs.llama import chatml_tokenizer, tiny_text_config


def vision_config(image_size: int, patch_size: int, hidden: int, layers: int, heads: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                            projection_dim=hidden, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def processor(tokenizer, image_size: int, patch_size: int, strategy: str):
    """LlavaProcessor with the PIL image backend (needs no torchvision)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy=strategy, chat_template=tokenizer.chat_template,
                          image_token="<image>", num_additional_image_tokens=1)


def llava_config(text_config, vcfg, image_token_id: int, feature_layer: int, strategy: str):
    from transformers import LlavaConfig

    return LlavaConfig(vision_config=vcfg, text_config=text_config, image_token_index=image_token_id,
                       projector_hidden_act="gelu", vision_feature_layer=feature_layer,
                       vision_feature_select_strategy=strategy, tie_word_embeddings=text_config.tie_word_embeddings)


def build_tiny(out: Path, seed: int = 0) -> Path:
    from transformers import LlavaForConditionalGeneration

    torch = seeded(seed)
    tok = chatml_tokenizer()
    text = tiny_text_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    # feature layer -2 and CLS dropped, as real LLaVA checkpoints do
    cfg = llava_config(text, vision_config(32, 8, 32, 2, 4), tok.convert_tokens_to_ids("<image>"), -2, "default")
    model = LlavaForConditionalGeneration(cfg).to(torch.float32)
    return save_folder(out, model, tok, processor(tok, 32, 8, "default"))


SPEC = ArchSpec(
    name="llava",
    family="LLaVA (LLaVA-1.5, LLaVA-Med)",
    model_types=("llava",),
    model_class="LlavaForConditionalGeneration",
    real_model_ids=("llava-hf/llava-1.5-7b-hf", "microsoft/llava-med-v1.5-mistral-7b"),
    decoder="model.language_model",
    vision="model.vision_tower",
    projector="model.multi_modal_projector",
    image_placeholder="<image>",
    gguf_arch="llama",
    gguf_projector="mlp",
    text_config=lambda config: config.text_config,
    build_tiny=build_tiny,
)
