"""`edgemed export gguf`: a merged model folder -> GGUF files for llama.cpp (text model + mmproj for images).

The text model is written by gguf-py's ``GGUFWriter`` one tensor at a time (``gguf_tensors``), so peak memory stays
near the largest tensor. f32, f16, bf16 and q8_0 are written directly; k-quants and q4_0 come from llama.cpp's own
quantizer (``llama_model_quantize``) run on one f16 intermediate shared by all of them. Image models also get
``mmproj-<type>.gguf`` (``gguf_mmproj``), the CLIP-style file llama.cpp's multimodal library (mtmd) loads beside the
text model; the tokenizer is written by ``gguf_vocab``.

What differs between families (checkpoint key layout, extra tensor names, Q/K permutation, Gemma's norm
offset, extra metadata) is data in ``edgemed.archs`` (:class:`edgemed.archs.base.GGUFSpec`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from edgemed import memory
from edgemed.archs import arch_for_dir
from edgemed.artifacts import (
    atomic_dir,
    source_manifest,
    write_manifest,
)
from edgemed.errors import ArtifactError, ExportError
from edgemed.export.gguf_mmproj import warn_known_defects, write_mmproj_gguf
from edgemed.export.gguf_tensors import (
    Checkpoint,
    Entry,
    plan_tensors,
)
from edgemed.export.gguf_text import (
    DIRECT,
    LLAMA_QUANTS,
    MMPROJ_QUANTS,
    QUANTS,
    TOKENIZER_FILES,
    check_quants,
    image_placeholder_id,
    llama_quantize,
    load_config,
    source_provenance,
    text_kv,
    write_text_gguf,
)
from edgemed.export.gguf_vocab import TOKENIZER_KINDS, replace_template, tokenizer_kind

__all__ = ["DIRECT", "LLAMA_QUANTS", "MMPROJ_QUANTS", "QUANTS", "TOKENIZER_FILES", "TOKENIZER_KINDS", "Checkpoint",
           "Entry", "export_gguf", "image_placeholder_id", "llama_quantize", "plan_tensors", "text_kv",
           "tokenizer_kind", "write_mmproj_gguf", "write_text_gguf"]

log = logging.getLogger(__name__)


def export_gguf(model_dir: Path | str, quants: list[str], out: Path | str, *, overwrite: bool = False,
                mmproj_quant: str = "f16", adapter_quant: str = "f16", chat_template: str | None = None,
                calibration: Path | str | None = None, calibrate: bool = True,
                calibration_samples: int | None = None, calibration_tokens: int | None = None,
                compensate: int = 0, imatrix_types: str | None = None) -> Path:
    """Write ``model_dir`` as GGUF: ``model-<quant>.gguf`` per quant and, for image models, ``mmproj-*.gguf``.

    Given a fine-tune run folder instead, writes the base once plus the run's LoRA as a llama.cpp adapter file
    (:func:`edgemed.export.gguf_adapter.export_gguf_run`).

    Args:
        model_dir: merged transformers model folder (a kind "model" edgemed folder, or any folder with
            config.json and safetensors weights).
        quants: one or more of f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, iq4_xs, q3_k_m, iq3_m.
        out: output folder; written under a temporary name and renamed when complete.
        overwrite: replace an existing ``out``.
        mmproj_quant: tensor type of the projector file (f32, f16 or q8_0; embeddings always f32).
        adapter_quant: tensor type of the LoRA adapter file of a run folder (f16, q8_0 or f32).
        chat_template: template text to embed instead of the folder's (``--chat-template``; a base model has
            none); it is also saved as chat_template.jinja beside the GGUF files, so every runtime renders with it.
        calibration: data file (any training-data format) for the importance matrices of llama.cpp's quants,
            or a GGUF imatrix file whose matrices are used as they are; default: the training data of the run a
            merged model came from (see :mod:`edgemed.export.imatrix`).
        calibrate: False exports uncalibrated even when the run's data is at hand.
        calibration_samples, calibration_tokens: caps on the records read and the tokens per record.
        compensate: for a run folder, the rank of the low-rank correction of each llama.cpp quant's rounding error
            written beside the plain adapter (:func:`edgemed.export.gguf_adapter.export_gguf_run`); refused for a
            merged model, whose rounding no adapter file carries.
        imatrix_types: which quantized tensors of the text model get their matrix: "all" (llama.cpp's way) or
            "k-quants" (the legacy q4_0/q5_0 blocks llama.cpp falls back to at widths that are not a multiple of
            256 are rounded unweighted; :mod:`edgemed.export.ggml_quant`); None: ``ggml_quant.DEFAULT_SCOPE``.

    Returns:
        The output folder.
    """
    model_dir = Path(model_dir)
    from edgemed.export.ggml_quant import DEFAULT_SCOPE, check_scope

    if imatrix_types is not None:
        check_scope(imatrix_types)  # an unknown scope is refused first
    if _is_run(model_dir):  # a fine-tune run: base once + LoRA adapter file (edgemed.export.gguf_adapter)
        if imatrix_types is not None:
            raise ExportError(f"{model_dir}: --imatrix-types applies to a calibrated export of a merged model; "
                              "merge the run (`edgemed merge RUN_DIR --out MODEL_DIR`) and export MODEL_DIR")
        from edgemed.export.gguf_adapter import export_gguf_run

        return export_gguf_run(model_dir, quants, out, overwrite=overwrite, mmproj_quant=mmproj_quant,
                               adapter_quant=adapter_quant, compensate=compensate, calibration=calibration,
                               calibrate=calibrate, calibration_samples=calibration_samples,
                               calibration_tokens=calibration_tokens)
    imatrix_types = imatrix_types or DEFAULT_SCOPE
    if compensate:
        raise ExportError(f"{model_dir}: --compensate writes a correction into a run's LoRA adapter file; give the "
                          "run folder (`edgemed export gguf RUN_DIR --quant q4_0 --compensate 32`), not a merged model")
    quants = check_quants(quants, mmproj_quant)
    source = _source_manifest(model_dir)  # a run, an export or a folder missing listed files: refused first
    spec = arch_for_dir(model_dir)
    if spec.gguf_arch is None or spec.gguf is None:
        why = spec.no_gguf_reason or f"llama.cpp has no support for {spec.family}"
        raise ExportError(f"{model_dir}: {why}; use `edgemed export onnx {model_dir} --out DIR` instead")
    config = load_config(model_dir)
    ckpt = Checkpoint(model_dir)
    _refuse_quantized(model_dir, config, ckpt)
    text_plan = plan_tensors(spec, config, ckpt, "text")
    vision_plan = plan_tensors(spec, config, ckpt, "vision") if spec.is_vision else []
    warn_known_defects(spec, vision_plan, model_dir)  # before anything is written (a CLIP LLaVA)
    provenance = source_provenance(model_dir, source)
    wants = quants + (["mmproj-q5_0"] if spec.is_vision and mmproj_quant == "q5_0" else [])
    calib = _calibration_plan(model_dir, wants, calibration, calibrate, calibration_samples)
    from edgemed.export.imatrix import Calibration, check_matrices

    ready = calib if isinstance(calib, Calibration) else None  # read from an imatrix file: no model run
    if ready is not None:
        check_matrices(ready, text_plan + vision_plan, model_dir)
    computing = calib is not None and ready is None
    memory.require(memory.gguf_need(model_dir, calibrating=computing),
                   f"exporting {model_dir} to GGUF" + (" with importance matrices" if computing else ""))

    files: dict[str, str] = {}
    cal = None
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for q in quants:
            if q in DIRECT:
                write_text_gguf(spec, config, model_dir, ckpt, text_plan, q, tmp / f"model-{q}.gguf", provenance,
                                chat_template)
                files[q] = f"model-{q}.gguf"
        weighted: dict[str, int] = {}  # quant -> tensors quantized with their matrix
        if calib is not None:  # one set of matrices serves every quant and the mmproj
            from edgemed.export import imatrix

            if ready is not None:
                cal = ready
            else:
                records, data_path, data_sha = calib
                cal = imatrix.compute_imatrix(model_dir, records, data_path, data_sha, ckpt, text_plan + vision_plan,
                                              max_tokens=calibration_tokens or imatrix.MAX_TOKENS,
                                              system=imatrix.run_system_prompt(model_dir))
            imatrix.write_imatrix(cal, tmp / imatrix.IMATRIX_FILE)
        llama = [q for q in quants if q in LLAMA_QUANTS]
        if llama:  # llama.cpp quantizes from f16: the exported f16 file, or one written for this and removed
            src = tmp / ("model-f16.gguf" if "f16" in files else ".intermediate-f16.gguf")
            if "f16" not in files:
                write_text_gguf(spec, config, model_dir, ckpt, text_plan, "f16", src, provenance, chat_template)
            for q in llama:
                if cal is None:
                    llama_quantize(src, tmp / f"model-{q}.gguf", q)
                else:
                    weighted[q] = _calibrated_quantize(src, tmp, q, cal, imatrix_types)
                files[q] = f"model-{q}.gguf"
            if "f16" not in files:
                src.unlink()
        mmproj = None
        if spec.is_vision:
            mmproj = f"mmproj-{mmproj_quant}.gguf"
            write_mmproj_gguf(spec, config, model_dir, ckpt, vision_plan, mmproj_quant, tmp / mmproj, provenance,
                              cal.matrices if cal is not None else None)
        copied = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
        for name in copied:
            shutil.copy2(model_dir / name, tmp / name)
        if chat_template is not None:
            replace_template(tmp, chat_template)
        write_manifest(tmp, "gguf", arch=spec.name, gguf_arch=spec.gguf_arch, quants=quants, models=files,
                       mmproj=mmproj, mmproj_quant=mmproj_quant if mmproj else None,
                       image_placeholder=spec.image_placeholder, image_token_id=image_placeholder_id(model_dir, spec),
                       calibration={**cal.provenance(), "imatrix_types": imatrix_types, "weighted_tensors": weighted}
                       if cal is not None else None,
                       name=provenance["name"], base_model=provenance["base_model"],
                       base_model_sha256=provenance["base_model_sha256"],
                       parent={"path": str(model_dir.absolute()), "tree_sha256": provenance["tree_sha256"],
                               "manifest": provenance["manifest"]})
    return Path(out)


# ---------------------------------------------------------------- inputs
def _calibration_plan(model_dir: Path, quants: list[str], calibration: Path | str | None, calibrate: bool,
                      max_samples: int | None) -> tuple[list[Any], Path, str] | Any | None:
    """The calibration data for the llama.cpp quants among ``quants`` (``imatrix.calibration_plan``), or the
    ``Calibration`` read from a given imatrix file."""
    from edgemed.export import imatrix

    llama = [q for q in quants if q in LLAMA_QUANTS or q == "mmproj-q5_0"]
    return imatrix.calibration_plan(model_dir, calibration, calibrate, max_samples, used=bool(llama),
                                    unused=f"no llama.cpp quant asked for ({', '.join(quants)})", matrices_ok=True)


def _calibrated_quantize(src: Path, folder: Path, quant: str, cal: Any, scope: str = "all") -> int:
    """llama.cpp decides each tensor's type (uncalibrated pass); ggml's kernels quantize again with the matrices
    (those of ``scope``'s types). Returns how many tensors were weighted."""
    from edgemed.export.ggml_quant import requantize

    plain = folder / f".uncalibrated-{quant}.gguf"
    llama_quantize(src, plain, quant)
    dst = folder / f"model-{quant}.gguf"
    try:
        weighted = requantize(plain, src, dst, cal.matrices, {
            "quantize.imatrix.file": "imatrix.gguf", "quantize.imatrix.dataset": Path(cal.source).name,
            "quantize.imatrix.entries_count": len(cal.matrices), "quantize.imatrix.chunks_count": cal.samples,
            "edgemed.calibration.imatrix_sha256": cal.sha256, "edgemed.calibration.data_sha256": cal.data_sha256,
            "edgemed.calibration.imatrix_types": scope}, scope=scope)
    finally:
        plain.unlink(missing_ok=True)
    return len(weighted)


def _is_run(model_dir: Path) -> bool:
    from edgemed.manifest import kind_of

    try:
        return kind_of(model_dir) == "run"
    except ArtifactError:
        return False  # _source_manifest names the damage


def _source_manifest(model_dir: Path) -> dict[str, Any] | None:
    return source_manifest(model_dir)


def _refuse_quantized(model_dir: Path, config: Any, ckpt: Checkpoint) -> None:
    qc = getattr(config, "quantization_config", None)
    method = (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) if qc else None
    packed = next((k for k in ckpt.keys if k.endswith((".absmax", ".quant_map", ".SCB", ".quant_state"))
                   or ".quant_state." in k or ckpt.dtypes[k] in ("U8", "I8")), None)
    if qc or packed:
        what = f"quantization_config {method or qc!r}" if qc else f"packed tensor {packed!r}"
        raise ExportError(f"{model_dir}: is a quantised checkpoint ({what}); GGUF export needs 16/32-bit weights: "
                          "run `edgemed merge RUN_DIR --out MODEL_DIR` (it merges into full-precision weights) "
                          "and export MODEL_DIR")


