"""Qwen2.5-VL: window-attention ViT with a 2x2 patch merger, Qwen2 decoder with multimodal RoPE (M-RoPE)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgemed.archs._tiny import perturb_constant_params, save_folder, seeded
from edgemed.archs.base import ArchSpec, GGUFSpec, GridSpec, ONNXSpec
from edgemed.archs.qwen2 import QWEN_SPECIAL, qwen_tokenizer, tiny_text_config

VL_SPECIAL = QWEN_SPECIAL + ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                             "<|video_pad|>"]

# Qwen2.5-VL-Instruct's own template (string or typed content; images become vision_start/image_pad/vision_end)
QWEN2_5_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# 64x64 px, patch 8, merge 2: 8x8 patches -> 16 image tokens; window 32 px = 2x2 merged units, so the image
# spans 4 attention windows and block 0 (windowed) differs from block 1 (full attention)
IMAGE_SIZE, PATCH_SIZE, MERGE, WINDOW = 64, 8, 2, 32


def vision_config(hidden: int, out_hidden: int):
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    return Qwen2_5_VLVisionConfig(depth=2, hidden_size=hidden, intermediate_size=hidden * 2, num_heads=4,
                                  patch_size=PATCH_SIZE, spatial_merge_size=MERGE, temporal_patch_size=2,
                                  window_size=WINDOW, out_hidden_size=out_hidden, fullatt_block_indexes=[1])


_PROCESSOR_CLASS: list = []


def processor_class():
    """Qwen2_5_VLProcessor without the video processor, registered with AutoProcessor.

    transformers' Qwen2_5_VLProcessor requires a video processor, and every video processor needs torchvision,
    which edgemed does not install; images need only the PIL image processor. Saved folders name this class in
    processor_config.json, so ``AutoProcessor.from_pretrained`` finds it once this function has run
    (``ArchSpec.prepare``, called by ``arch_for_dir``).
    """
    if not _PROCESSOR_CLASS:
        from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLProcessor
        from transformers.processing_utils import ProcessorMixin

        class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
            """Qwen2.5-VL processor for images and text (no video: needs no torchvision)."""

            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
                self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
                self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
                self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
                self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
                ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

        AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageTextProcessor, exist_ok=True)
        _PROCESSOR_CLASS.append(Qwen2_5_VLImageTextProcessor)
    return _PROCESSOR_CLASS[0]


def load_processor(folder: Path):
    """The processor of a Qwen2.5-VL folder as the hub ships it: its processor_config names Qwen2_5_VLProcessor,
    whose video processor needs torchvision, so AutoProcessor fails there; the image-only class loads the same
    files (image processor, tokenizer, chat template)."""
    return processor_class().from_pretrained(folder, local_files_only=True)


def prepare() -> None:
    """Make AutoProcessor able to load tiny Qwen2.5-VL folders (see :func:`processor_class`)."""
    processor_class()


def processor(tokenizer):
    """The Qwen2.5-VL processor with the PIL image backend and a fixed pixel budget (no video processor)."""
    from transformers import Qwen2VLImageProcessorPil

    pixels = IMAGE_SIZE * IMAGE_SIZE
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=PATCH_SIZE,
                                  merge_size=MERGE, temporal_patch_size=2)
    return processor_class()(image_processor=ip, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def build_tiny(out: Path, seed: int = 0) -> Path:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch = seeded(seed)
    tok = qwen_tokenizer(VL_SPECIAL, QWEN2_5_VL_TEMPLATE)
    qwen = tiny_text_config(tok)  # head_dim 16: M-RoPE sections (t, h, w) must sum to 8
    text = qwen.to_dict() | {"rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0,
                                                 "mrope_section": [2, 3, 3]}}
    for key in ("model_type", "architectures", "transformers_version", "dtype"):
        text.pop(key, None)
    ids = tok.convert_tokens_to_ids
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision_config(32, qwen.hidden_size).to_dict(),
                           image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                           vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                           tie_word_embeddings=True)
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.float32)
    perturb_constant_params(model)  # q/k/v and vision biases, norms
    return save_folder(out, model, tok, processor(tok))


def gguf_split_qkv(name: str, w):
    """The vision blocks' fused qkv -> the separate q, k, v clip.cpp reads (convert_hf_to_gguf does the same)."""
    c = w.shape[0] // 3
    return [(name.replace(".qkv.", f".{x}."), w[i * c:(i + 1) * c]) for i, x in enumerate("qkv")]


def gguf_split_conv3d(name: str, w):
    """Conv3d over 2 frames -> two Conv2d kernels (v.patch_embd.weight, v.patch_embd.weight.1) clip.cpp adds."""
    return [("visual.patch_embed.proj.weight", w[:, :, 0]), ("visual.patch_embed.frame1", w[:, :, 1])]


def gguf_processor_pixels(out: dict, ip: Any):
    """The processor's flat patches (``patchify``: rows (h/m, w/m, m, m), columns (C, T, P, P)) back into the
    resized image [C, H, W], its first frame (the two frames of a still image are the same pixels)."""
    import numpy as np

    (t, gh, gw), = np.asarray(out["image_grid_thw"]).tolist()
    m, p, tp = int(ip.merge_size), int(ip.patch_size), int(ip.temporal_patch_size)
    x = np.asarray(out["pixel_values"]).reshape(t, gh // m, gw // m, m, m, 3, tp, p, p)[0, ..., 0, :, :]
    # (gh/m, gw/m, mh, mw, C, ph, pw) -> (C, gh/m, mh, ph, gw/m, mw, pw)
    return x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)


def gguf_mtmd_tokens(ip: Any) -> tuple[int, int]:
    """mtmd's image-token bounds for images the processor has already sized: from one token (mtmd's floor of 8
    would enlarge what the processor keeps small) up to the most the processor can give (not mtmd's 4096).

    smart_resize keeps the area under ``max_pixels`` when it shrinks, but when it enlarges a small image to
    ``min_pixels`` it rounds each side up to the factor f, so the area can pass both bounds: at most
    (sqrt(lo r) + f)(sqrt(lo / r) + f) = lo + f sqrt(lo) (sqrt(r) + 1 / sqrt(r)) + f^2, largest at the aspect
    ratio r = 200 it refuses beyond.
    """
    size = dict(getattr(ip, "size", None) or {})
    lo = int(size.get("shortest_edge") or getattr(ip, "min_pixels", None) or 0)
    hi = int(size.get("longest_edge") or getattr(ip, "max_pixels", None) or 0)
    f = int(ip.patch_size) * int(ip.merge_size)
    most = max(hi, lo + f * lo ** 0.5 * (200 ** 0.5 + 200 ** -0.5) + f * f)
    return 1, max(1, int(-(-most // (f * f))))


def gguf_text_kv(c) -> dict:
    """llama.cpp's qwen2vl reads the M-RoPE sections as four numbers (the fourth unused)."""
    sections = list(c.rope_parameters["mrope_section"])
    return {"{arch}.rope.dimension_sections": sections + [0] * (4 - len(sections))}


def gguf_mmproj_kv(config, processor_config: dict) -> dict:
    """Window attention every n_wa_pattern-th block full (clip.cpp's rule), SwiGLU (silu), the processor's pixel
    budget so clip.cpp resizes images as the HF processor does."""
    from edgemed.errors import ExportError

    v = config.vision_config
    full = list(v.fullatt_block_indexes)
    n_wa = full[0] + 1
    if full != list(range(n_wa - 1, v.depth, n_wa)):
        raise ExportError(f"fullatt_block_indexes {full} are not every {n_wa}th block, the only pattern llama.cpp's "
                          "qwen2.5vl_merger runs; use `edgemed export onnx`")
    # Every block full (a cut model): no windows at all. clip.cpp then must not be told a pattern of 1, since it
    # builds a window mask no block reads and aborts the process on encode ("Failed to get tensor window_mask").
    n_wa = 0 if n_wa == 1 else n_wa
    size = processor_config.get("size", {})
    lo = size.get("shortest_edge", processor_config.get("min_pixels"))
    hi = size.get("longest_edge", processor_config.get("max_pixels"))
    return {"clip.use_gelu": False, "clip.use_silu": True, "clip.vision.n_wa_pattern": n_wa,
            "clip.vision.window_size": int(v.window_size), "clip.vision.attention.layer_norm_epsilon": 1e-6,
            "clip.vision.image_size": min(560, int(hi ** 0.5)),  # warm-up size only (convert_hf_to_gguf: 560)
            "clip.vision.image_min_pixels": int(lo), "clip.vision.image_max_pixels": int(hi)}


# Grid positions for the ONNX graphs (GridSpec). Written here in numpy from transformers' algorithms
# (vision_utils.get_vision_position_ids / get_vision_window_index, Qwen2_5_VLModel.get_rope_index) because they
# have data-dependent shapes no exported graph can hold, and the ONNX runtime does not need torch.
def vision_grid_inputs(grid: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Per patch, in the processor's order (2x2 merge blocks row by row): its (row, col) in the patch grid for the
    2-D rotary embedding, the attention window it belongs to (window blocks) and its frame (full-attention blocks).

    Windows are ``window_size`` px squares of merged units, counted over all frames and images, as
    ``get_vision_window_index`` cuts them; full attention spans one frame of one image (``cu_seqlens``).
    """
    import numpy as np

    v = config["vision_config"]
    m = int(v["spatial_merge_size"])
    side = int(v["window_size"]) // m // int(v["patch_size"])  # merged units per window side
    pos, windows, frames = [], [], []
    n_windows = n_frames = 0
    for t, h, w in np.asarray(grid, dtype=np.int64).reshape(-1, 3).tolist():
        br, bc, ir, ic = np.meshgrid(np.arange(h // m), np.arange(w // m), np.arange(m), np.arange(m), indexing="ij")
        rows, cols = (br * m + ir).reshape(-1), (bc * m + ic).reshape(-1)
        per_row = -(-(w // m) // side)
        window = ((br // side) * per_row + bc // side).reshape(-1)
        for _ in range(t):
            pos.append(np.stack([rows, cols], -1))
            windows.append(window + n_windows)
            frames.append(np.full(h * w, n_frames))
            n_windows += -(-(h // m) // side) * per_row
            n_frames += 1
    return {"vision_position_ids": np.concatenate(pos).astype(np.int64),
            "window_ids": np.concatenate(windows).astype(np.int64),
            "frame_ids": np.concatenate(frames).astype(np.int64)}


def rope_index(ids: list[int], grid: Any, config: dict[str, Any]) -> tuple[Any, int]:
    """M-RoPE positions [3, len(ids)] of a prompt and the delta later tokens add to their index.

    Text tokens count on in all three rows; each image's tokens (a run of image_token_id, one image per grid row)
    take (start + t, start + row, start + col) over the merged grid, and the text after it starts at
    start + max(rows, cols). Still images only (no video time scaling).
    """
    import numpy as np

    from edgemed.errors import DataError

    image = int(config["image_token_id"])
    m = int(config["vision_config"]["spatial_merge_size"])
    grids = [] if grid is None else np.asarray(grid, dtype=np.int64).reshape(-1, 3).tolist()
    parts, cur, i, n = [], 0, 0, len(ids)
    while i < n:
        j = i
        if ids[i] != image:
            while j < n and ids[j] != image:
                j += 1
            parts.append(np.broadcast_to(np.arange(cur, cur + j - i), (3, j - i)))
            cur += j - i
        else:
            if not grids:
                raise DataError(f"the prompt has more image tokens than the {len(grid) if grid is not None else 0} "
                                "image grid(s) given; expand the placeholder with the model's processor")
            t, h, w = grids.pop(0)
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
            j = i + tt.size
            if j > n or any(x != image for x in ids[i:j]):
                raise DataError(f"an image of grid {t}x{h}x{w} needs {tt.size} image tokens at position {i}; the "
                                "prompt has fewer: expand the placeholder with the model's processor")
            parts.append(np.stack([tt, hh, ww]).reshape(3, -1) + cur)
            cur += max(h, w) // m
        i = j
    pos = np.concatenate(parts, 1).astype(np.int64) if parts else np.zeros((3, 0), np.int64)
    return pos, int(pos.max()) + 1 - n if n else 0


def vision_graph(tower: Any) -> Any:
    """The vision tower and merger as one exportable torch module: pixels and, per patch, (row, col), window id
    and frame id (:func:`vision_grid_inputs`) in; merged image features out.

    transformers' tower computes, from ``image_grid_thw``, each patch's rotary (row, col), a permutation of the
    patches into attention windows and the window and image boundaries (``cu_seqlens``), then splits the sequence
    at those boundaries: data-dependent shapes torch.export stops on. This module runs the tower's own blocks with
    attention masked to equal window ids (window blocks) or frame ids (full-attention blocks). Masked attention
    does not depend on the order of the patches, so the window permutation and its inverse (both whole 2x2 merge
    units) cancel and are left out; the graph takes any number of patches (any image size the processor makes).
    Window blocks then cost patches^2 attention where transformers' split costs patches x window; at the 3B tower's
    width it is still the faster of the two (docs/onnx.md).
    """
    import sys

    import torch

    class GridVisionGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = tower
            self.full = set(tower.fullatt_block_indexes)
            self.patches_per_token = tower.spatial_merge_unit  # the merger takes whole 2x2 units of patches
            # the rotary helper of the tower's own modeling module, so the rotation is the one transformers applies
            self.rotate = sys.modules[type(tower.blocks[0].attn).__module__].apply_rotary_pos_emb_vision

        def forward(self, pixel_values, vision_position_ids, window_ids, frame_ids):
            t = self.tower
            x = t.patch_embed(pixel_values)
            cos, sin = t.rotary_pos_emb(x, vision_position_ids)
            masks = [torch.where(ids[:, None] == ids[None, :], 0.0, float("-inf")).to(x.dtype)
                     for ids in (window_ids, frame_ids)]
            for i, block in enumerate(t.blocks):
                x = x + self._attention(block.attn, block.norm1(x), cos, sin, masks[i in self.full])
                x = x + block.mlp(block.norm2(x))
            return t.merger(x)

        def _attention(self, attn: Any, x: Any, cos: Any, sin: Any, mask: Any) -> Any:
            """The tower's attention over all patches at once, with a mask instead of splitting at boundaries."""
            n = x.shape[0]
            q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = self.rotate(q, k, cos, sin)
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask,
                scale=attn.scaling)
            return attn.proj(out[0].transpose(0, 1).reshape(n, -1))

    return GridVisionGraph()


# checkpoint keys: transformers 5 saves the hub names (model.layers.*, model.embed_tokens, visual.*, lm_head);
# newer tools write module names (model.language_model.*, model.visual.*). The merger is the projector.
GGUF = GGUFSpec(
    key_prefixes=(
        ("model.language_model.", "text", "model."),
        ("model.layers.", "text", "model.layers."),
        ("model.embed_tokens.", "text", "model.embed_tokens."),
        ("model.norm.", "text", "model.norm."),
        ("lm_head.", "text", "lm_head."),
        ("model.visual.merger.", "projector", "visual.merger."),
        ("visual.merger.", "projector", "visual.merger."),
        ("model.visual.", "vision", "visual."),
        ("visual.", "vision", "visual."),
    ),
    tensor_names={"visual.merger.mlp.2": "mm.2", "visual.patch_embed.frame1": "v.patch_embd.weight.1"},
    splits=((r"visual\.blocks\.\d+\.attn\.qkv\.(weight|bias)", gguf_split_qkv),
            (r"visual\.patch_embed\.proj\.weight", gguf_split_conv3d)),
    text_kv=gguf_text_kv,
    mmproj_kv=gguf_mmproj_kv,
    processor_pixels=gguf_processor_pixels,
    mtmd_tokens=gguf_mtmd_tokens,
    vision_block_key="depth",
    vision_head_key="num_heads",
)

SPEC = ArchSpec(
    name="qwen2_5_vl",
    family="Qwen2.5-VL",
    model_types=("qwen2_5_vl",),
    model_class="Qwen2_5_VLForConditionalGeneration",
    real_model_ids=("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"),
    decoder="model.language_model",
    vision="model.visual",
    projector="model.visual.merger",  # inside the vision module: part_of checks the projector first
    vision_lora=("attn.qkv", "attn.proj"),  # fused qkv; "proj" alone would also hit the patch-embedding conv
    vision_norms=("norm1", "norm2"),  # RMSNorm in each block; the merger's ln_q belongs to the projector
    image_placeholder="<|image_pad|>",
    gguf_arch="qwen2vl",
    gguf_projector="qwen2.5vl_merger",
    gguf=GGUF,
    text_config=lambda config: config.text_config,
    build_tiny=build_tiny,
    prepare=prepare,
    load_processor=load_processor,  # hub folders name the video-capable processor (torchvision)
    grid=GridSpec(vision_inputs=vision_grid_inputs, rope_index=rope_index, vision_graph=vision_graph),
    onnx=ONNXSpec(decoder="grid"),  # M-RoPE: the builder writes 1-D rotary positions only
    notes=(
        "M-RoPE: rope_parameters.mrope_section [t, h, w] splits each head's rotary half-dims into temporal, "
        "height and width sections (Qwen2.5-VL-3B: [16, 24, 24]); text tokens use one position for all three, "
        "image tokens (t, row, col) of the merged grid, and text after an image restarts at max position + 1",
        "decoder: Qwen2 (q/k/v biases, RoPE theta 1e6); llama.cpp architecture qwen2vl with rope.dimension_sections",
        "vision: Conv3d patch embedding over temporal_patch_size=2 frames (a still image is repeated), RMSNorm "
        "blocks with fused qkv (bias) and SwiGLU MLP (gate/up/down with bias), 2D rotary position embedding",
        "window attention: blocks not in fullatt_block_indexes attend within window_size px windows; patches are "
        "reordered into window order before the blocks and restored after the merger",
        "merger (the projector, model.visual.merger): ln_q RMSNorm per patch, then 2x2 neighbouring patches "
        "concatenated (spatial_merge_size**2 * hidden) -> Linear -> GELU -> Linear to the text hidden size",
        "image processor resizes to multiples of patch_size*merge_size within min/max pixels; the number of "
        "<|image_pad|> tokens is grid_t*grid_h*grid_w / merge_size**2 (image_grid_thw)",
    ),
)
