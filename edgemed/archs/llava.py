"""LLaVA layout: CLIP vision tower, MLP projector, Llama-family decoder (LLaVA-Med; the embedded image model)."""

from __future__ import annotations

from pathlib import Path

from edgemed.archs._tiny import save_folder, seeded
from edgemed.archs.base import TOWER_PROJECTOR_PREFIXES, ArchSpec, GGUFSpec
from edgemed.archs.llama import chatml_tokenizer, tiny_text_config


def vision_config(image_size: int, patch_size: int, hidden: int, layers: int, heads: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                            projection_dim=hidden, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def siglip_vision_config(image_size: int, patch_size: int, hidden: int, layers: int, heads: int):
    """A SigLIP tower (no class token) for the LLaVA layout, used with vision_feature_select_strategy 'full'."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                              vision_use_head=False, layer_norm_eps=1e-6)


def siglip_processor(tokenizer, image_size: int, patch_size: int):
    """LlavaProcessor for a SigLIP tower: every patch is an image token (no class token to add or drop)."""
    from transformers import LlavaProcessor, SiglipImageProcessorPil

    ip = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="full", chat_template=tokenizer.chat_template,
                          image_token="<image>", num_additional_image_tokens=0)


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


def mmproj_kv(config, processor_config: dict) -> dict:
    """clip.cpp runs the CLIP tower up to the deepest clip.vision.feature_layer (counted from the embeddings, 0 =
    input) and always drops the CLS position before the projector: LLaVA's "default" strategy."""
    from edgemed.errors import ExportError

    strategy = getattr(config, "vision_feature_select_strategy", "default")
    has_cls = config.vision_config.model_type != "siglip_vision_model"  # SigLIP towers have no class embedding
    if strategy != ("default" if has_cls else "full"):
        raise ExportError(f"vision_feature_select_strategy {strategy!r} cannot be exported to llama.cpp, whose LLaVA "
                          "projector drops the CLS token of a CLIP tower and keeps every token of a tower without "
                          "one; supported: 'default' for CLIP, 'full' for SigLIP")
    n = config.vision_config.num_hidden_layers
    layers = config.vision_feature_layer
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    return {"clip.vision.feature_layer": [fl if fl >= 0 else n + 1 + fl for fl in layers]}


def roll_positions(w):
    """llama.cpp's LLaVA graph appends CLS after the patches and adds position rows 0..n in that order; HF puts
    CLS first. Moving CLS's position row to the end gives every token the position HF gives it. A tower without CLS
    (SigLIP) has a square number of rows (llama.cpp takes square images only) and keeps its order."""
    n = w.shape[0]
    if round(n ** 0.5) ** 2 == n:
        return w
    return w[[*range(1, n), 0]]


# checkpoint keys: transformers 5 saves LLaVA with the legacy hub names (language_model.model.*,
# vision_tower.*, multi_modal_projector.*); newer tools write the module names (model.language_model.*)
GGUF = GGUFSpec(
    key_prefixes=TOWER_PROJECTOR_PREFIXES,
    # clip.cpp's PROJECTOR_TYPE_MLP reads mm.0 and mm.2 (the legacy llava surgery names)
    tensor_names={"multi_modal_projector.linear_1": "mm.0", "multi_modal_projector.linear_2": "mm.2"},
    # hidden_states[feature_layer] is taken before CLIP's post_layernorm, which LLaVA never applies
    skip=(r"vision_tower\.vision_model\.post_layernorm\.(weight|bias)",
          r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
    permute_qk=True,  # Llama/Mistral decoders
    mmproj_kv=mmproj_kv,
    transforms=((r"v\.position_embd\.weight", roll_positions),),
)

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
    gguf=GGUF,
    text_config=lambda config: config.text_config,
    build_tiny=build_tiny,
)
