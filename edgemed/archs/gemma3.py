"""Gemma 3 image-text: SigLIP vision tower, pooled soft-embedding projector, Gemma 3 decoder (MedGemma 4B)."""

from __future__ import annotations

from pathlib import Path

from edgemed.archs._tiny import perturb_constant_params, save_folder, save_spm_model, seeded
from edgemed.archs.base import TOWER_PROJECTOR_PREFIXES, ArchSpec, GGUFSpec, ONNXSpec
from edgemed.archs.gemma3_text import GGUF as TEXT_GGUF
from edgemed.archs.gemma3_text import NOTES as TEXT_NOTES
from edgemed.archs.gemma3_text import gemma_tokenizer, gguf_text_kv, tiny_text_config

IMAGE_SIZE, PATCH_SIZE, TOKENS_PER_IMAGE = 32, 8, 4  # 4x4 patches average-pooled 2x2 into 4 soft tokens


def vision_config(image_size: int, patch_size: int, hidden: int, layers: int, heads: int):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                              layer_norm_eps=1e-6, vision_use_head=False)


def processor(tokenizer, image_size: int, tokens_per_image: int):
    """Gemma3Processor with the PIL image backend (needs no torchvision)."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    ip = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=[0.5, 0.5, 0.5],
                                 image_std=[0.5, 0.5, 0.5], do_pan_and_scan=False)
    return Gemma3Processor(image_processor=ip, tokenizer=tokenizer, chat_template=tokenizer.chat_template,
                           image_seq_length=tokens_per_image)


def build_tiny(out: Path, seed: int = 0) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch = seeded(seed)
    tok = gemma_tokenizer()
    # Gemma3ForConditionalGeneration does not apply final_logit_softcapping (transformers 5.23), so it is left
    # unset here as in MedGemma 4B; the gemma3_text tiny model exercises it
    text = tiny_text_config(tok, final_logit_softcapping=None)
    cfg = Gemma3Config(text_config=text, vision_config=vision_config(IMAGE_SIZE, PATCH_SIZE, 32, 2, 4),
                       mm_tokens_per_image=TOKENS_PER_IMAGE, boi_token_index=tok.convert_tokens_to_ids(tok.boi_token),
                       eoi_token_index=tok.convert_tokens_to_ids(tok.eoi_token),
                       image_token_index=tok.image_token_id, tie_word_embeddings=True)
    model = Gemma3ForConditionalGeneration(cfg).to(torch.float32)
    # the projector matrix starts at zero and Gemma norms at w=0: without noise the image would change nothing
    perturb_constant_params(model)
    save_folder(out, model, tok, processor(tok, IMAGE_SIZE, TOKENS_PER_IMAGE))
    save_spm_model(out, tok)
    return out


def gguf_vlm_text_kv(c) -> dict:
    """The decoder's keys as for gemma3_text, without final_logit_softcapping, which the image-text model does
    not apply in transformers but llama.cpp would apply if the file carried it."""
    kv = gguf_text_kv(c)
    kv.pop("{arch}.final_logit_softcapping", None)
    return kv


def gguf_mmproj_kv(config, processor_config: dict) -> dict:
    """clip.cpp's gemma3 projector average-pools with a kernel of clip.vision.projector.scale_factor (default 4)."""
    from edgemed.errors import ExportError

    v = config.vision_config
    side = v.image_size // v.patch_size
    tokens_side = round(config.mm_tokens_per_image ** 0.5)
    if tokens_side ** 2 != config.mm_tokens_per_image or side % tokens_side:
        raise ExportError(f"mm_tokens_per_image {config.mm_tokens_per_image} is not a square that divides the "
                          f"{side}x{side} patch grid; llama.cpp's gemma3 projector cannot pool to it")
    return {"clip.vision.projector.scale_factor": side // tokens_side}


# checkpoint keys: transformers 5 saves Gemma 3 with the hub names (language_model.model.*, vision_tower.*,
# multi_modal_projector.*); hub checkpoints have vision_tower.vision_model.*; newer tools write module names
GGUF = GGUFSpec(
    key_prefixes=TOWER_PROJECTOR_PREFIXES,
    # a bare parameter, stored [vision hidden, text hidden] as clip.cpp expects (it transposes in its graph)
    tensor_names={"multi_modal_projector.mm_input_projection_weight": "mm.input_projection.weight"},
    norm_plus_one=TEXT_GGUF.norm_plus_one + (r"mm\.soft_emb_norm\.weight",),  # Gemma RMSNorm in the projector
    text_kv=gguf_vlm_text_kv,
    mmproj_kv=gguf_mmproj_kv,
    image_wrap=("\n\n<start_of_image>", "<end_of_image>\n\n"),  # what HF's processor puts around the soft tokens
)

SPEC = ArchSpec(
    dicom_render="ct-windows",  # MedGemma: CT as three Hounsfield windows in R, G, B (its CT notebooks)
    name="gemma3",
    family="Gemma 3 image-text (MedGemma 4B, Gemma 3 4B/12B/27B)",
    model_types=("gemma3",),
    model_class="Gemma3ForConditionalGeneration",
    real_model_ids=("google/medgemma-4b-it", "google/gemma-3-4b-it"),
    decoder="model.language_model",
    vision="model.vision_tower",
    projector="model.multi_modal_projector",
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
           "q_norm", "k_norm", "norm"),
    vision_lora=("q_proj", "k_proj", "v_proj", "out_proj"),  # SigLIP attention
    vision_norms=("layer_norm1", "layer_norm2", "post_layernorm"),  # SigLIP has no pre-norm
    image_placeholder="<start_of_image>",
    gguf_arch="gemma3",
    gguf_projector="gemma3",
    gguf=GGUF,
    text_config=lambda config: config.text_config,
    build_tiny=build_tiny,
    # image tokens attend to each other both ways (token_type_ids), which the builder's causal attention cannot
    # express: 0.11 relative logit error on image prompts of the tiny model through it, 1e-6 through torch.onnx
    onnx=ONNXSpec(decoder="token_types", attn_softcapping=False),
    notes=TEXT_NOTES + (
        "Gemma3ForConditionalGeneration does not apply final_logit_softcapping (transformers 5.23) even when the "
        "text config sets it; llama.cpp's gemma3 applies it whenever the GGUF carries it: match the PyTorch model",
        "the processor expands <start_of_image> into '\\n\\n<start_of_image>' + mm_tokens_per_image x "
        "<image_soft_token> + '<end_of_image>\\n\\n'; image soft tokens attend to each other bidirectionally "
        "(token_type_ids == 1 marks them)",
        "projector: SigLIP last hidden state (post_layernorm applied, no pooling head) -> 2D average pool to "
        "mm_tokens_per_image tokens -> mm_soft_emb_norm (Gemma RMSNorm, 1+w) -> x @ mm_input_projection_weight "
        "(a bare [vision_hidden, text_hidden] parameter, not a Linear: no transpose)",
        "llama.cpp's mmproj pools with kernel clip.vision.projector.scale_factor (default 4, MedGemma's 64 -> 16 "
        "patches per side): write (image_size / patch_size) / sqrt(mm_tokens_per_image)",
        "SigLIP vision tower: patch embedding conv, learned position embeddings, gelu_pytorch_tanh MLP; "
        "images normalised with mean 0.5 and std 0.5",
    ),
)
