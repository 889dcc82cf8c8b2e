"""The mmproj file of an image model: the vision tower and projector as the CLIP-style GGUF that llama.cpp's
multimodal library (mtmd) loads beside the text model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgemed.archs.base import ArchSpec
from edgemed.export.gguf_tensors import Checkpoint, Entry, add_kv, file_type, general_kv, write_gguf


def mmproj_kv(spec: ArchSpec, config: Any, model_dir: Path) -> dict[str, Any]:
    """The clip.* metadata llama.cpp's mtmd reads (tools/mtmd/clip.cpp load_hparams)."""
    from gguf import Keys

    v = config.vision_config
    proc = _processor_config(model_dir)
    act = str(getattr(v, "hidden_act", "quick_gelu"))
    kv: dict[str, Any] = {
        Keys.Clip.HAS_VISION_ENCODER: True,
        Keys.Clip.PROJECTOR_TYPE: spec.gguf_projector,
        Keys.ClipVision.IMAGE_SIZE: getattr(v, "image_size", None),  # families without one give it in mmproj_kv
        Keys.ClipVision.PATCH_SIZE: v.patch_size,
        Keys.ClipVision.EMBEDDING_LENGTH: v.hidden_size,
        Keys.ClipVision.FEED_FORWARD_LENGTH: v.intermediate_size,
        Keys.ClipVision.BLOCK_COUNT: getattr(v, spec.gguf.vision_block_key),
        Keys.ClipVision.Attention.HEAD_COUNT: getattr(v, spec.gguf.vision_head_key),
        Keys.ClipVision.Attention.LAYERNORM_EPS: float(getattr(v, "layer_norm_eps", 1e-6)),
        Keys.ClipVision.PROJECTION_DIM: spec.text_config(config).hidden_size,
        Keys.ClipVision.IMAGE_MEAN: [float(x) for x in proc.get("image_mean", [0.5, 0.5, 0.5])],
        Keys.ClipVision.IMAGE_STD: [float(x) for x in proc.get("image_std", [0.5, 0.5, 0.5])],
        Keys.ClipVision.USE_GELU: act.startswith("gelu"),  # clip.cpp: gelu if set, else quick_gelu
    }
    if spec.gguf.mmproj_kv:
        kv.update(spec.gguf.mmproj_kv(config, proc))
    return kv


def _processor_config(model_dir: Path) -> dict[str, Any]:
    for name in ("processor_config.json", "preprocessor_config.json"):
        p = model_dir / name
        if p.is_file():
            data = json.loads(p.read_text())
            return data.get("image_processor", data)
    return {}


def write_mmproj_gguf(spec: ArchSpec, config: Any, model_dir: Path, ckpt: Checkpoint, plan: list[Entry],
                      quant: str, path: Path, provenance: dict[str, Any], imatrix: dict[str, Any] | None = None
                      ) -> Path:
    """Write the vision tower and projector as llama.cpp's mmproj file."""
    import gguf

    kv = mmproj_kv(spec, config, model_dir)

    def meta(w):
        general_kv(w, provenance, file_type(quant), "mmproj")
        add_kv(w, kv)

    write_gguf(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ], plan, ckpt, quant, True, meta, "mmproj", imatrix)
    return path
