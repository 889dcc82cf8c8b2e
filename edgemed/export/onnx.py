"""`edgemed export onnx`: a merged model folder -> onnxruntime graphs: the text decoder with a KV cache and, for
image models, the vision graph and the embedding step that splices image features into the token embeddings.

The decoder goes through onnxruntime-genai's model builder where it writes the family's decoder exactly (fused,
faster), and through torch.onnx on transformers' own modules where it does not (``ONNXSpec.decoder`` in the
architecture entry); docs/onnx.md has the measurements behind each choice and the quantisations tried.

The output folder (written via ``atomic_dir``: nothing is left on failure) holds ``decoder.onnx`` (+
``decoder.onnx.data``), ``vision.onnx`` and ``embed.onnx`` for image models, the HF tokenizer, processor and chat
template files, and a manifest of kind ``onnx`` that also describes the graphs for ``backends/onnx.py``. Every
graph passes ``onnx.checker``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from edgemed import memory
from edgemed.archs import ArchSpec, arch_for_dir
from edgemed.artifacts import MANIFEST, atomic_dir, read_manifest, source_manifest, tree_sha256, write_manifest
from edgemed.errors import ArtifactError, EdgemedWarning, ExportError
from edgemed.export import imatrix
from edgemed.export.gguf_vocab import replace_template
from edgemed.export.onnx_decoder import decoder_route, export_decoder
from edgemed.export.onnx_genai import write_genai_config
from edgemed.export.onnx_graph import DECODER, EMBED, VISION, check_graph
from edgemed.export.onnx_mixed import check_mix, llama_mix
from edgemed.export.onnx_quant import quantize_decoder_int4, quantize_embed_int8
from edgemed.export.onnx_vision import example_image_inputs, export_embed, export_vision
from edgemed.export.onnx_vision import export_grid_vision as _export_grid_vision  # noqa: F401 - tools/bench_grid_vision.py
from edgemed.files import reading

QUANTS = ("fp32", "fp16", "int8", "int4")
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# files of a model folder that are weights or edgemed's own, never copied into the export
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".data", ".msgpack", ".h5")
_SKIP_FILES = ("manifest.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def export_onnx(model_dir: Path | str, quant: str = "fp32", out: Path | str | None = None, *, overwrite: bool = False,
                block_size: int = 32, accuracy_level: int = 4, chat_template: str | None = None,
                calibration: Path | str | None = None, calibrate: bool = True,
                calibration_samples: int | None = None, mixed: str | None = None) -> Path:
    """Export a merged model folder to ONNX for onnxruntime.

    Args:
        model_dir: a transformers model folder (``edgemed merge`` output, an embedded model, or any local
            checkpoint of a registered architecture) with 16/32-bit weights.
        quant: fp32, fp16, int8 or int4 (block-wise weight-only MatMulNBits).
        out: the folder to write; it must not exist unless ``overwrite``.
        overwrite: replace an existing ``out`` once the new folder is complete.
        block_size: int4/int8 block size (16, 32, 64, 128, 256).
        accuracy_level: int4/int8 MatMulNBits accuracy level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations).
        chat_template: template text saved as the folder's chat_template.jinja instead of the model's
            (``--chat-template``; a base model has none), so the ONNX runtime renders prompts with it.
        calibration: data file (any training-data format) for the importance matrices that weight int4's search
            for each block's scale and minimum; default: the training data of the run a merged model came from, as
            `export gguf` (see :mod:`edgemed.export.imatrix`). Only int4 uses it.
        calibrate: False exports uncalibrated even when the run's data is at hand.
        calibration_samples: cap on the calibration records read.
        mixed: a llama.cpp policy (q4_k_m, ...): int4 weights that llama.cpp's own quantization of this model
            stores above 4-bit levels go 8-bit (:mod:`edgemed.export.onnx_mixed`); the manifest lists the mix.

    Returns:
        The output folder.
    """
    _check_options(quant, block_size, accuracy_level)
    check_mix(quant, mixed)
    model_dir = Path(model_dir)
    if out is None:
        raise ExportError("no output folder given; pass --out DIR")
    source_manifest(model_dir)  # a run, an export or a folder missing listed files is refused before any work
    spec = arch_for_dir(model_dir)
    _refuse_quantized(model_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    route = decoder_route(spec, model_dir)  # before loading weights: an unsupported decoder fails at once
    calib = imatrix.calibration_plan(model_dir, calibration, calibrate, calibration_samples, used=quant == "int4",
                                     unused=f"--quant {quant} (only int4 is calibrated)")
    memory.require(memory.onnx_need(model_dir), f"exporting {model_dir} to ONNX")
    model, processor, tokenizer = _load(model_dir, spec)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp, \
            tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=tmp.parent) as work:
        work = Path(work)
        graphs: dict[str, Any] = {}
        importance = None
        image_inputs = example_image_inputs(processor, spec) if spec.is_vision else None
        graphs["decoder"] = export_decoder(route, model, spec, tokenizer, tmp, work, quant, block_size,
                                           accuracy_level, image_inputs)
        if spec.is_vision:
            graphs["vision"] = export_vision(model, spec, image_inputs, tmp / VISION)
        if graphs["decoder"]["input"] == "inputs_embeds":
            graphs["embed"] = export_embed(model, spec, tmp / EMBED)
            if quant in ("int8", "int4"):
                graphs["embed"]["quant_algorithm"] = quantize_embed_int8(tmp / EMBED)
        if quant == "int4":
            del model  # a LoRA merge's base is loaded next: one model in memory at a time
            base = _lora_base(model_dir)
            base_graph = _base_decoder_graph(route, base, spec, tokenizer, work, image_inputs) if base else None
            importance = _importance(model_dir, calib) if calib is not None else None
            mix = llama_mix(model_dir, mixed, work) if mixed else None
            graphs["decoder"]["quant_algorithm"] = quantize_decoder_int4(tmp / DECODER, block_size, accuracy_level,
                                                                         base_graph, base, importance, mix)
            if mix is not None:
                graphs["decoder"]["mixed"] = mix.summary()
            if importance is not None and not importance.cal.matrices:
                raise ExportError(f"{model_dir}: no int4 weight of the ONNX decoder matches a linear layer of the "
                                  "PyTorch model, so the calibration cannot apply; export with --no-calibration")
        _copy_processing_files(model_dir, tmp)
        if chat_template is not None:
            replace_template(tmp, chat_template)
        for g in graphs.values():
            check_graph(tmp / g["file"])
        graphs["decoder"]["genai"] = write_genai_config(tmp, spec, graphs["decoder"])  # og.Model(folder) opens it
        write_manifest(tmp, "onnx", arch=spec.name, quant=quant,
                       options={"block_size": block_size, "accuracy_level": accuracy_level}
                       if quant in ("int4", "int8") else {},
                       graphs=graphs, parent=_parent(model_dir),
                       **({"calibration": importance.cal.provenance(file=None)} if importance is not None else {}))
    return out.absolute()


def _importance(model_dir: Path, calib: tuple[list[Any], Path, str]) -> imatrix.WeightImportance:
    """The PyTorch model's importance matrices on the calibration records, to be matched to the ONNX weights."""
    records, data_path, sha = calib
    return imatrix.compute_weight_importance(model_dir, records, data_path, sha,
                                             system=imatrix.run_system_prompt(model_dir))


# ---------------------------------------------------------------------------------------------- checks and loading
def _check_options(quant: str, block_size: int, accuracy_level: int) -> None:
    if quant not in QUANTS:
        raise ExportError(f"unknown quant {quant!r} for --quant; choose one of {', '.join(QUANTS)}")
    if block_size not in BLOCK_SIZES:
        raise ExportError(f"block size {block_size} is not supported; choose one of "
                          f"{', '.join(map(str, BLOCK_SIZES))}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ExportError(f"accuracy level {accuracy_level} is not supported; choose one of 0-4 "
                          "(4: int8 activations, fastest on CPU)")


def _refuse_quantized(model_dir: Path) -> None:
    """A bitsandbytes (or any pre-quantised) folder cannot be exported: the 4-bit error would be baked in."""
    cfg = model_dir / "config.json"
    qc = json.loads(cfg.read_text()).get("quantization_config") if cfg.is_file() else None
    if qc:
        method = qc.get("quant_method", "unknown")
        raise ExportError(f"{model_dir}: is a {method}-quantised checkpoint (config.json has quantization_config); "
                          "ONNX export needs the 16/32-bit weights: run `edgemed merge RUN_DIR --out MODEL_DIR`, "
                          "which merges into the 16-bit original, and export that folder")


def _load(model_dir: Path, spec: ArchSpec) -> tuple[Any, Any, Any]:
    """(fp32 model in eval mode, processor or tokenizer, tokenizer) from local files only."""
    import transformers
    from transformers import AutoProcessor, AutoTokenizer

    cls = getattr(transformers, spec.model_class)
    with reading(model_dir, "a transformers model folder (config, safetensors weights, tokenizer)"):
        model = cls.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        proc = AutoProcessor.from_pretrained(model_dir, local_files_only=True) if spec.is_vision else tok
    return model, proc, tok


# ---------------------------------------------------------------------------------------------- a LoRA merge's base
def _lora_base(model_dir: Path) -> Path | None:
    """The base model an ``edgemed merge`` folder merged LoRA into, when it is still here unchanged (sha256); a
    warning when it is a merge whose base is gone or changed."""
    from edgemed.modeling import run_base

    try:
        manifest = read_manifest(model_dir, ("model",))
    except Exception:  # noqa: BLE001 - a checkpoint from elsewhere has no edgemed manifest: nothing to use
        return None
    if not (manifest.get("merge") or {}).get("lora_merged") or not (manifest.get("base_model") or {}).get("path"):
        return None
    try:
        return run_base(model_dir, manifest)
    except ArtifactError as e:
        warnings.warn(f"{e} (a LoRA merge: int4 now rounds the merged weights, which can round the fine-tune away; "
                      "run `edgemed parity` on the export, or use int8)", EdgemedWarning, stacklevel=2)
        return None


def _base_decoder_graph(route: str, base: Path, spec: ArchSpec, tokenizer: Any, work: Path,
                        image_inputs: dict[str, Any] | None) -> Path:
    """The base model's fp32 decoder graph, written by the same route, so its initializers carry the same names."""
    (work / "base").mkdir(parents=True, exist_ok=True)
    info = export_decoder(route, _load(base, spec)[0], spec, tokenizer, work / "base", work / "base-work", "fp32",
                          32, 4, image_inputs)
    return work / "base" / info["file"]


# ---------------------------------------------------------------------------------------------- files
def _parent(model_dir: Path) -> dict[str, Any]:
    """The model folder this export was made from (tiny test folders and hub checkpoints have no manifest)."""
    kind = None
    if (model_dir / MANIFEST).is_file():
        kind = read_manifest(model_dir).get("kind")
    return {"path": str(model_dir.absolute()), "kind": kind, "tree_sha256": tree_sha256(model_dir)}


def _copy_processing_files(model_dir: Path, out: Path) -> list[str]:
    """Tokenizer, processor, chat template, config and generation config: the runtime renders prompts with them."""
    copied = []
    for p in sorted(model_dir.iterdir()):
        if not p.is_file() or p.name in _SKIP_FILES or p.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(p, out / p.name)
        copied.append(p.name)
    return copied
