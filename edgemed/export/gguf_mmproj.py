"""The mmproj file of an image model: the vision tower and projector as the CLIP-style GGUF that llama.cpp's
multimodal library (mtmd) loads beside the text model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from edgemed.archs.base import ArchSpec
from edgemed.errors import EdgemedWarning
from edgemed.export.gguf_tensors import Checkpoint, Entry, add_kv, file_type, general_kv, write_gguf

# llama.cpp's LLaVA graph (tools/mtmd/models/llava.cpp) with a class token: CLS concatenated after the patches
# (issue #25814; fix PR #25844 unmerged) and the skip-last-layer step run twice on block_count = n-1 (issue #25817).
# Per llama-cpp-python version: whether its llama.cpp has these defects. A release with the fix is one line
# ("0.x.y": False); a version not listed (or none installed) is taken to have them.
CLS_DEFECT = {
    "0.3.36": True,  # docs/parity.md, Known gaps: measured on the tiny CLIP LLaVA
}
CLS_DEFECT_PROJECTORS = ("mlp",)  # clip projector types whose graph is llava.cpp's (the ones edgemed writes)


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python's version (its llama.cpp runs the files), None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def has_cls_defect(version: str | None) -> bool:
    """Whether the llama.cpp of llama-cpp-python ``version`` has the LLaVA CLS defects (:data:`CLS_DEFECT`)."""
    return CLS_DEFECT.get(version or "", True)


def warn_known_defects(spec: ArchSpec, plan: list[Entry], where: Path) -> bool:
    """Warn, before anything is written, when llama.cpp is known to run this mmproj wrongly: a CLIP tower (class
    embedding) in llama.cpp's LLaVA graph. Returns whether it warned."""
    version = llama_cpp_version()
    if spec.gguf_projector not in CLS_DEFECT_PROJECTORS or not any(e.name == "v.class_embd" for e in plan) \
            or not has_cls_defect(version):
        return False
    which = f"llama.cpp of llama-cpp-python {version}" if version else "llama.cpp (llama-cpp-python not installed)"
    warnings.warn(
        f"{where}: its vision tower has a class token (CLIP; vision_feature_select_strategy 'default'), which the "
        f"{which} mishandles: its LLaVA graph concatenates CLS last, so the decoder gets [patch 1..n-1, CLS] instead "
        "of [patch 0..n-1] (llama.cpp issue #25814; the one-line fix, PR #25844, is unmerged), and it runs the "
        "skip-last-layer step twice when a converter writes block_count = n-1 (issue #25817). The GGUF files are "
        "written, but images reach the decoder differently from PyTorch and `edgemed parity` fails them; export "
        f"this model with `edgemed export onnx {where} --out DIR` instead (docs/parity.md, Known gaps)",
        EdgemedWarning, stacklevel=3)
    return True


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
    """The image processor's settings, merged from every file that may hold them, the most specific last: the
    processor's own fields (processor_config.json), the image processor as the hub ships it
    (preprocessor_config.json), and the image processor nested in processor_config.json (transformers 5's layout).
    The hub's Qwen2.5-VL and LLaVA folders have a processor_config.json without any image field, so taking the
    first file found lost their normalisation and pixel budget."""
    def read(name: str) -> dict[str, Any]:
        p = model_dir / name
        return json.loads(p.read_text()) if p.is_file() else {}

    proc, pre = read("processor_config.json"), read("preprocessor_config.json")
    merged = {k: v for k, v in proc.items() if k != "image_processor"}
    merged.update(pre)
    if isinstance(proc.get("image_processor"), dict):
        merged.update(proc["image_processor"])
    return merged


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
