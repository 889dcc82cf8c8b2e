"""`edgemed export gguf`: a merged model folder -> GGUF files for llama.cpp (text model + mmproj for images).

The text model is written by gguf-py's ``GGUFWriter`` one tensor at a time (tensor infos first, then each
tensor read from safetensors, converted and written), so peak memory stays near the largest tensor. f32, f16,
bf16 and q8_0 are written directly; k-quants and q4_0 come from llama.cpp's own quantizer
(``llama_model_quantize``) run on one f16 intermediate shared by all of them. Image models also get
``mmproj-<type>.gguf``, the CLIP-style file llama.cpp's multimodal library (mtmd) loads beside the text model.

What differs between families (checkpoint key layout, extra tensor names, Q/K permutation, Gemma's norm
offset, extra metadata) is data in ``edgemed.archs`` (:class:`edgemed.archs.base.GGUFSpec`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemed.archs import arch_for_dir
from edgemed.archs.base import ArchSpec, GGUFSpec
from edgemed.artifacts import (
    MANIFEST,
    atomic_dir,
    atomic_file,
    sha256_file,
    source_manifest,
    tree_sha256,
    write_manifest,
)
from edgemed.errors import ExportError
from edgemed.files import reading

DIRECT = ("f32", "f16", "bf16", "q8_0")  # written by gguf-py
LLAMA_QUANTS = {"q6_k": "MOSTLY_Q6_K", "q5_k_m": "MOSTLY_Q5_K_M", "q4_k_m": "MOSTLY_Q4_K_M", "q4_0": "MOSTLY_Q4_0",
                "iq4_xs": "MOSTLY_IQ4_XS", "q3_k_m": "MOSTLY_Q3_K_M", "iq3_m": "MOSTLY_IQ3_M"}
QUANTS = DIRECT + tuple(LLAMA_QUANTS)
MMPROJ_QUANTS = ("f32", "f16", "q8_0", "q5_0")  # q5_0: the vision tower's matrices, calibrated when data is given

# Files the runtime needs to render prompts exactly as PyTorch did (copied beside the GGUF files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "processor_config.json", "preprocessor_config.json", "generation_config.json", "config.json")

# llama.cpp pre-tokenizer names for the byte-level BPE pre-tokenizers transformers writes in tokenizer.json,
# keyed by a signature of that JSON (see _pre_signature). convert_hf_to_gguf hashes a tokenization instead; a
# signature also recognises the small tokenizers tests train, whose hash no table holds.
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
            r"\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE = {
    "bytelevel+re": "gpt-2",  # GPT-2 regex (SmolLM2 as transformers saves it, the tiny test tokenizers)
    "digits1|bytelevel+re": "smollm",  # SmolLM2's hub tokenizer: digits split one by one, then GPT-2
    f"split:{LLAMA3_RE}|bytelevel": "llama-bpe",  # Llama 3.x
    f"split:{QWEN2_RE}|bytelevel": "qwen2",  # Qwen2, Qwen2.5(-VL)
}

log = logging.getLogger(__name__)


def export_gguf(model_dir: Path | str, quants: list[str], out: Path | str, *, overwrite: bool = False,
                mmproj_quant: str = "f16", adapter_quant: str = "f16", chat_template: str | None = None,
                calibration: Path | str | None = None, calibrate: bool = True,
                calibration_samples: int | None = None, calibration_tokens: int | None = None) -> Path:
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
        calibration: data file (any training-data format) for the importance matrices of llama.cpp's quants;
            default: the training data of the run a merged model came from (see :mod:`edgemed.export.imatrix`).
        calibrate: False exports uncalibrated even when the run's data is at hand.
        calibration_samples, calibration_tokens: caps on the records read and the tokens per record.

    Returns:
        The output folder.
    """
    model_dir = Path(model_dir)
    if _is_run(model_dir):  # a fine-tune run: base once + LoRA adapter file (edgemed.export.gguf_adapter)
        from edgemed.export.gguf_adapter import export_gguf_run

        return export_gguf_run(model_dir, quants, out, overwrite=overwrite, mmproj_quant=mmproj_quant,
                               adapter_quant=adapter_quant)
    quants = _check_quants(quants, mmproj_quant)
    source = _source_manifest(model_dir)  # a run, an export or a folder missing listed files: refused first
    spec = arch_for_dir(model_dir)
    if spec.gguf_arch is None or spec.gguf is None:
        why = spec.no_gguf_reason or f"llama.cpp has no support for {spec.family}"
        raise ExportError(f"{model_dir}: {why}; use `edgemed export onnx {model_dir} --out DIR` instead")
    config = _load_config(model_dir)
    ckpt = Checkpoint(model_dir)
    _refuse_quantized(model_dir, config, ckpt)
    text_plan = plan_tensors(spec, config, ckpt, "text")
    vision_plan = plan_tensors(spec, config, ckpt, "vision") if spec.is_vision else []
    provenance = _provenance(model_dir, source)
    wants = quants + (["mmproj-q5_0"] if spec.is_vision and mmproj_quant == "q5_0" else [])
    calib = _calibration_plan(model_dir, wants, calibration, calibrate, calibration_samples)

    files: dict[str, str] = {}
    cal = None
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for q in quants:
            if q in DIRECT:
                write_text_gguf(spec, config, model_dir, ckpt, text_plan, q, tmp / f"model-{q}.gguf", provenance,
                                chat_template)
                files[q] = f"model-{q}.gguf"
        if calib is not None:  # one set of matrices serves every quant and the mmproj
            from edgemed.export import imatrix

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
                    _calibrated_quantize(src, tmp, q, cal)
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
            _replace_template(tmp, chat_template)
        write_manifest(tmp, "gguf", arch=spec.name, gguf_arch=spec.gguf_arch, quants=quants, models=files,
                       mmproj=mmproj, mmproj_quant=mmproj_quant if mmproj else None,
                       image_placeholder=spec.image_placeholder, image_token_id=_image_token_id(model_dir, spec),
                       calibration=cal.provenance() if cal is not None else None,
                       name=provenance["name"], base_model=provenance["base_model"],
                       base_model_sha256=provenance["base_model_sha256"],
                       parent={"path": str(model_dir.absolute()), "tree_sha256": provenance["tree_sha256"],
                               "manifest": provenance["manifest"]})
    return Path(out)


# ---------------------------------------------------------------- inputs
def _calibration_plan(model_dir: Path, quants: list[str], calibration: Path | str | None, calibrate: bool,
                      max_samples: int | None) -> tuple[list[Any], Path, str] | None:
    """(records, file, sha256) of the calibration data the export will use, read and checked before anything is
    written (a bad file leaves no output); None for an uncalibrated export."""
    from edgemed.export import imatrix

    llama = [q for q in quants if q in LLAMA_QUANTS or q == "mmproj-q5_0"]
    if calibration is not None and not calibrate:
        raise ExportError("--calibration and --no-calibration contradict each other; give one")
    path = Path(calibration) if calibration is not None else (
        imatrix.default_calibration(model_dir) if calibrate and llama else None)
    if path is None:
        return None
    records, sha = imatrix.read_calibration(path, max_samples or imatrix.MAX_SAMPLES)  # a bad file fails here
    if not llama:
        log.info("no llama.cpp quant asked for (%s): the calibration data is not needed", ", ".join(quants))
        return None
    return records, path, sha


def _calibrated_quantize(src: Path, folder: Path, quant: str, cal: Any) -> Path:
    """llama.cpp decides each tensor's type (uncalibrated pass); ggml's kernels quantize again with the matrices."""
    from edgemed.export.ggml_quant import requantize

    plain = folder / f".uncalibrated-{quant}.gguf"
    llama_quantize(src, plain, quant)
    dst = folder / f"model-{quant}.gguf"
    try:
        requantize(plain, src, dst, cal.matrices, {
            "quantize.imatrix.file": "imatrix.gguf", "quantize.imatrix.dataset": Path(cal.source).name,
            "quantize.imatrix.entries_count": len(cal.matrices), "quantize.imatrix.chunks_count": cal.samples,
            "edgemed.calibration.imatrix_sha256": cal.sha256, "edgemed.calibration.data_sha256": cal.data_sha256})
    finally:
        plain.unlink(missing_ok=True)
    return dst


def _check_quants(quants: list[str], mmproj_quant: str) -> list[str]:
    if not quants:
        raise ExportError(f"no --quant given; choose one or more of {', '.join(QUANTS)}")
    seen: list[str] = []
    for q in quants:
        q = q.lower()
        if q not in QUANTS:
            raise ExportError(f"unknown quant {q!r} for --quant; choose one of {', '.join(QUANTS)}")
        if q not in seen:
            seen.append(q)
    if mmproj_quant not in MMPROJ_QUANTS:
        raise ExportError(f"unknown quant {mmproj_quant!r} for --mmproj-quant; choose one of "
                          f"{', '.join(MMPROJ_QUANTS)}")
    return seen


def _is_run(model_dir: Path) -> bool:
    path = model_dir / MANIFEST
    try:
        return path.is_file() and json.loads(path.read_text()).get("kind") == "run"
    except json.JSONDecodeError:
        return False  # _source_manifest names the damage


def _source_manifest(model_dir: Path) -> dict[str, Any] | None:
    return source_manifest(model_dir)


def _load_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


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


def _provenance(model_dir: Path, source: dict[str, Any] | None) -> dict[str, Any]:
    """Name, base model and hashes recorded in every GGUF file and in the export's manifest."""
    name = (source or {}).get("name") or model_dir.name
    base = (source or {}).get("base_model")
    base_sha = None
    if isinstance(base, dict):  # merge/train write {"path", "sha256", "model_type"}
        base_sha = base.get("sha256")
        base = base.get("name") or (Path(base["path"]).name if base.get("path") else None)
    if not base and source and isinstance(source.get("parent"), dict):
        base = source["parent"].get("name") or source["parent"].get("path")
    return {
        "name": str(name),
        "base_model": str(base) if base else None,
        "base_model_sha256": base_sha,
        "tree_sha256": tree_sha256(model_dir),
        "manifest": ({"sha256": sha256_file(model_dir / MANIFEST), "kind": source.get("kind"),
                      "files": source.get("files", {})} if source else "no manifest"),
    }


def _image_token_id(model_dir: Path, spec: ArchSpec) -> int | None:
    """Id of the image placeholder the rendered prompt holds (not the family's expanded image token)."""
    if not spec.image_placeholder:
        return None
    return int(_hf_tokenizer(model_dir).convert_tokens_to_ids(spec.image_placeholder))


# safetensors dtype -> numpy dtype read from disk (BF16 is widened by hand below)
_ST_DTYPES = {"F32": "float32", "F16": "float16", "F64": "float64", "BF16": "uint16", "I8": "int8", "U8": "uint8",
              "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool"}


class Checkpoint:
    """Lazy view of a folder's safetensors weights: names and shapes now, one tensor at a time on demand.

    Tensors are read with plain file reads at the offsets the safetensors header gives, not through
    ``safe_open``: its memory map keeps every page it has read resident, so peak RSS would grow to the size of
    the whole checkpoint instead of the largest tensor.
    """

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise ExportError(f"{folder}: no *.safetensors weights; export needs a merged model folder "
                              "(`edgemed merge` writes one)")
        self.folder = folder
        self.where: dict[str, tuple[str, int, int]] = {}  # key -> (file, absolute offset, nbytes)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for f in files:
            with reading(folder / f, "a safetensors file", todo="the checkpoint is damaged; write it again"):
                self._read_header(f)
        self.keys = list(self.where)

    def _read_header(self, f: str) -> None:
        path = self.folder / f
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            size = path.stat().st_size
            if n < 2 or 8 + n > size:
                raise ExportError(f"{path}: not a safetensors file, or cut short (header of {n} bytes in a file of "
                                  f"{size}); write the checkpoint again")
            header = json.loads(fh.read(n))
        for k, info in header.items():
            if k == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= size - 8 - n:
                raise ExportError(f"{path}: tensor {k!r} lies past the end of the file (cut short); write the "
                                  "checkpoint again")
            self.where[k] = (f, 8 + n + start, end - start)
            self.shapes[k] = tuple(info["shape"])
            self.dtypes[k] = info["dtype"]

    def get(self, key: str):
        """One tensor as float32 numpy."""
        import numpy as np

        f, offset, nbytes = self.where[key]
        dtype = self.dtypes[key]
        if dtype not in _ST_DTYPES:
            raise ExportError(f"tensor {key!r} has dtype {dtype}, which GGUF export cannot read")
        raw = np.empty(self.shapes[key], dtype=_ST_DTYPES[dtype])
        with open(self.folder / f, "rb") as fh:
            fh.seek(offset)
            if fh.readinto(memoryview(raw.reshape(-1)).cast("B")) != nbytes:
                raise ExportError(f"{self.folder / f}: truncated at tensor {key!r}; the checkpoint is damaged")
        if dtype == "F32":
            return raw
        if dtype == "BF16":  # bf16 is the top half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)


# ---------------------------------------------------------------- tensor plans


@dataclass
class Entry:
    """One GGUF tensor: where it comes from, its GGUF name and shape, and how its values change."""

    key: str
    name: str
    shape: tuple[int, ...]
    transform: Callable[[Any], Any] | None = None
    make: Callable[[], Any] | None = None  # a tensor computed from the config instead of read (rope_freqs)


def _rewrite(g: GGUFSpec, key: str) -> tuple[str, str] | None:
    for prefix, part, new in g.key_prefixes:
        if key.startswith(prefix):
            return part, new + key[len(prefix):]
    return None


def _permute(n_head: int) -> Callable[[Any], Any]:
    """HF's rotate-half Q/K rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf's LlamaModel.permute)."""

    def f(w):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    return f


def _chain(*fns: Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
    fns = tuple(f for f in fns if f)
    if not fns:
        return None

    def f(x):
        for fn in fns:
            x = fn(x)
        return x

    return f


def plan_tensors(spec: ArchSpec, config: Any, ckpt: Checkpoint, which: str) -> list[Entry]:
    """Map every checkpoint tensor of ``which`` ("text", or "vision" for vision tower + projector) to GGUF.

    Stops at the first tensor that no rule maps, naming it.
    """
    import gguf

    g = spec.gguf
    assert g is not None
    text_cfg = spec.text_config(config)
    if which == "text":
        arch = _model_arch(spec.gguf_arch)
        tmap = gguf.get_tensor_name_map(arch, text_cfg.num_hidden_layers)
        parts = ("text",)
    else:
        vcfg = config.vision_config
        # extra block ids cover numbered projector layers (mm.0 .. mm.N), as convert_hf_to_gguf does
        tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, _vision_layers(vcfg) + 8)
        parts = ("vision", "projector")
    n_head = text_cfg.num_attention_heads
    n_kv = getattr(text_cfg, "num_key_value_heads", None) or n_head
    tied = bool(getattr(text_cfg, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
    entries: list[Entry] = []
    for key in ckpt.keys:
        rewritten = _rewrite(g, key)
        if rewritten is None:
            raise ExportError(f"cannot map tensor {key!r} of {ckpt.folder} to GGUF: no {spec.name} rule covers it; "
                              "is this a model of that architecture?")
        part, name = rewritten
        if part == "skip" or part not in parts or any(re.fullmatch(p, name) for p in g.skip):
            continue
        if which == "text" and tied and name.startswith("lm_head."):
            continue  # llama.cpp uses token_embd when output.weight is absent
        for sub, pick in _split(g, name, ckpt.shapes[key]):
            new = _gguf_name(g, tmap, sub)
            if new is None:
                file = "text model" if which == "text" else "mmproj"
                raise ExportError(f"cannot map tensor {key!r} (as {sub!r}) to a GGUF {file} tensor name; add it to "
                                  f"the {spec.name} entry's GGUFSpec.tensor_names")
            transform = pick
            if g.permute_qk and re.fullmatch(r"blk\.\d+\.attn_q\.(weight|bias)", new):
                transform = _chain(transform, _permute(n_head))
            elif g.permute_qk and re.fullmatch(r"blk\.\d+\.attn_k\.(weight|bias)", new):
                transform = _chain(transform, _permute(n_kv))
            if any(re.fullmatch(p, new) for p in g.norm_plus_one):
                transform = _chain(transform, lambda w: w + 1.0)
            for pattern, fn in g.transforms:
                if re.fullmatch(pattern, new):
                    transform = _chain(transform, fn)
            shape = ckpt.shapes[key] if pick is None else tuple(pick(_shape_only(ckpt.shapes[key])).shape)
            entries.append(Entry(key, new, shape, transform))
    if which == "text" and (freqs := _llama3_rope_factors(text_cfg)) is not None:
        entries.append(Entry("", "rope_freqs.weight", freqs.shape, make=lambda: freqs))
    if not entries:
        raise ExportError(f"{ckpt.folder}: no {which} tensors found for {spec.name}")
    names = [e.name for e in entries]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ExportError(f"two checkpoint tensors map to GGUF {dup!r}: "
                          f"{[e.key for e in entries if e.name == dup]}; the checkpoint holds duplicates")
    return entries


def _llama3_rope_factors(c: Any):
    """Llama 3.1+ frequency-dependent RoPE scaling as llama.cpp's rope_freqs tensor (convert_hf_to_gguf's formula)."""
    import math

    import numpy as np

    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type") != "llama3":
        return None
    dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    freqs = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old = float(rope["original_max_position_embeddings"])
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _gguf_name(g: GGUFSpec, tmap, name: str) -> str | None:
    stem, suffix = (name.rsplit(".", 1) if name.endswith((".weight", ".bias")) else (name, ""))
    new = g.tensor_names.get(stem)
    if new is not None:
        return f"{new}.{suffix}" if suffix else new
    return tmap.get_name(name, try_suffixes=(".weight", ".bias"))


def _shape_only(shape: tuple[int, ...]):
    """An array of ``shape`` that takes no memory: enough to learn the shapes a split produces."""
    import numpy as np

    return np.broadcast_to(np.float32(0), shape)


def _split(g: GGUFSpec, name: str, shape: tuple[int, ...]) -> list[tuple[str, Callable[[Any], Any] | None]]:
    """``(name, picker)`` for each GGUF tensor one checkpoint tensor becomes (fused q/k/v, a 3-D conv's slices)."""
    for pattern, fn in g.splits:
        if re.fullmatch(pattern, name):
            names = [n for n, _ in fn(name, _shape_only(shape))]
            return [(n, (lambda w, i=i, fn=fn: fn(name, w)[i][1])) for i, n in enumerate(names)]
    return [(name, None)]


def _model_arch(name: str | None):
    import gguf

    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise ExportError(f"gguf {gguf.__version__ if hasattr(gguf, '__version__') else ''} does not know llama.cpp "
                      f"architecture {name!r}; upgrade the gguf package")


# ---------------------------------------------------------------- writing


def _tensor_type(name: str, shape: tuple[int, ...], quant: str, mmproj: bool = False):
    """The GGML type one tensor is stored as (1-D tensors and norms f32, as convert_hf_to_gguf does)."""
    from gguf import GGMLQuantizationType as T

    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return T.F32
    if mmproj and re.search(r"(patch_embd|position_embd|class_embd)", name):
        return T.F32  # the projector's embeddings stay f32 (as convert_hf_to_gguf keeps them)
    if quant == "f32":
        return T.F32
    if quant == "bf16":
        return T.BF16
    if quant == "q8_0" or (quant == "q5_0" and name.startswith("mm.")):  # the projector feeds every image token
        return T.Q8_0 if shape[-1] % 32 == 0 else T.F16  # q8_0 blocks are 32 wide; convert_hf_to_gguf falls back too
    if quant == "q5_0":
        return T.Q5_0 if shape[-1] % 32 == 0 else T.F16
    return T.F16


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import math

    import gguf

    return math.prod(gguf.quant_shape_to_byte_shape(shape, qtype)) if qtype not in (
        gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else math.prod(shape) * (
        4 if qtype == gguf.GGMLQuantizationType.F32 else 2)


def _convert(data, qtype, imatrix=None):
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if qtype == T.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    if qtype in (T.Q8_0, T.BF16):
        return quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
    from edgemed.export.ggml_quant import quantize  # llama.cpp's kernel, weighted by the matrix when there is one

    return quantize(np.asarray(data, dtype=np.float32).reshape(-1, data.shape[-1]), qtype, imatrix).reshape(-1)


def _file_type(quant: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q5_0": F.MOSTLY_Q5_0}[quant]


def _add_kv(w, kv: dict[str, Any]) -> None:
    """Typed metadata: ints as uint32 (int32 if negative), floats as float32, lists by their first item."""
    for key, val in kv.items():
        if val is None:
            continue
        if isinstance(val, bool):
            w.add_bool(key, val)
        elif isinstance(val, int):
            (w.add_uint32 if val >= 0 else w.add_int32)(key, val)
        elif isinstance(val, float):
            w.add_float32(key, val)
        elif isinstance(val, str):
            w.add_string(key, val)
        elif isinstance(val, (list, tuple)):
            w.add_array(key, list(val))
        else:
            raise TypeError(f"metadata {key}: cannot store {type(val).__name__}")


def _write(path: Path, arch: str, plan: list[Entry], ckpt: Checkpoint, quant: str, mmproj: bool,
           kv: Callable[[Any], None], desc: str, imatrix: dict[str, Any] | None = None) -> None:
    """Write one GGUF file lazily: tensor infos first, then each tensor read, converted and written in turn."""
    import gguf
    import numpy as np
    from tqdm import tqdm

    from edgemed.console import user_err

    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        try:
            kv(w)
            types = [_tensor_type(e.name, e.shape, quant, mmproj) for e in plan]
            for e, t in zip(plan, types, strict=True):
                w.add_tensor_info(e.name, e.shape, np.dtype(np.float32), _nbytes(e.shape, t), raw_dtype=t)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for e, t in tqdm(list(zip(plan, types, strict=True)), desc=desc, unit="tensor", leave=False,
                             file=user_err()):
                data = e.make() if e.make else ckpt.get(e.key)
                if e.transform:
                    data = e.transform(data)
                w.write_tensor_data(_convert(data, t, (imatrix or {}).get(e.name)))
                del data
        finally:
            w.close()


def _general_kv(w, provenance: dict[str, Any], file_type: int, kind: str) -> None:
    import gguf

    w.add_type(gguf.GGUFType.MODEL if kind == "model" else gguf.GGUFType.MMPROJ)
    w.add_name(provenance["name"])
    if provenance["base_model"]:
        w.add_base_model_count(1)
        w.add_base_model_name(0, provenance["base_model"])
    if provenance.get("base_model_sha256"):
        w.add_string("edgemed.base_model.tree_sha256", provenance["base_model_sha256"])
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string("edgemed.source.tree_sha256", provenance["tree_sha256"])
    w.add_string("edgemed.source.manifest", json.dumps(provenance["manifest"], sort_keys=True))


def text_kv(spec: ArchSpec, config: Any) -> dict[str, Any]:
    """Hyper-parameters of the text model under llama.cpp's key names (the arch adds or overrides via text_kv)."""
    from gguf import Keys

    c = spec.text_config(config)
    arch = spec.gguf_arch
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    kv: dict[str, Any] = {
        Keys.LLM.VOCAB_SIZE: c.vocab_size,
        Keys.LLM.CONTEXT_LENGTH: c.max_position_embeddings,
        Keys.LLM.EMBEDDING_LENGTH: c.hidden_size,
        Keys.LLM.BLOCK_COUNT: c.num_hidden_layers,
        Keys.LLM.FEED_FORWARD_LENGTH: c.intermediate_size,
        Keys.Attention.HEAD_COUNT: heads,
        Keys.Attention.HEAD_COUNT_KV: getattr(c, "num_key_value_heads", None) or heads,
        Keys.Attention.LAYERNORM_RMS_EPS: float(c.rms_norm_eps),
        Keys.Rope.DIMENSION_COUNT: head_dim,
        Keys.Attention.KEY_LENGTH: head_dim,
        Keys.Attention.VALUE_LENGTH: head_dim,
    }
    rope = getattr(c, "rope_parameters", None) or {}
    if "rope_theta" in rope or hasattr(c, "rope_theta"):
        rtype = rope.get("rope_type", "default")
        kv[Keys.Rope.FREQ_BASE] = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
        if rtype == "linear":
            kv[Keys.Rope.SCALING_TYPE] = "linear"
            kv[Keys.Rope.SCALING_FACTOR] = float(rope["factor"])
        elif rtype not in ("default", "llama3"):  # llama3: the rope_freqs tensor carries it
            raise ExportError(f"rope type {rtype!r} of {spec.name} is not supported by `export gguf` yet; "
                              "supported: default, linear, llama3")
    kv = {k.format(arch=arch): v for k, v in kv.items()}
    if spec.gguf and spec.gguf.text_kv:
        kv.update({k.format(arch=arch): v for k, v in spec.gguf.text_kv(c).items()})
    return kv


def write_text_gguf(spec: ArchSpec, config: Any, model_dir: Path, ckpt: Checkpoint, plan: list[Entry], quant: str,
                    path: Path, provenance: dict[str, Any], chat_template: str | None = None) -> Path:
    """Write the text model at ``quant`` (f32, f16, bf16 or q8_0) to ``path``."""
    n_vocab = next(e.shape[0] for e in plan if e.name == "token_embd.weight")
    kv = text_kv(spec, config)

    def meta(w):
        _general_kv(w, provenance, _file_type(quant), "model")
        _add_kv(w, kv)
        add_tokenizer(w, model_dir, n_vocab, chat_template)

    _write(path, spec.gguf_arch, plan, ckpt, quant, False, meta, f"model-{quant}")
    return path


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
        Keys.ClipVision.BLOCK_COUNT: _vision_layers(v),
        Keys.ClipVision.Attention.HEAD_COUNT: getattr(v, "num_attention_heads", None) or v.num_heads,
        Keys.ClipVision.Attention.LAYERNORM_EPS: float(getattr(v, "layer_norm_eps", 1e-6)),
        Keys.ClipVision.PROJECTION_DIM: spec.text_config(config).hidden_size,
        Keys.ClipVision.IMAGE_MEAN: [float(x) for x in proc.get("image_mean", [0.5, 0.5, 0.5])],
        Keys.ClipVision.IMAGE_STD: [float(x) for x in proc.get("image_std", [0.5, 0.5, 0.5])],
        Keys.ClipVision.USE_GELU: act.startswith("gelu"),  # clip.cpp: gelu if set, else quick_gelu
    }
    if spec.gguf and spec.gguf.mmproj_kv:
        kv.update(spec.gguf.mmproj_kv(config, proc))
    return kv


def _vision_layers(v: Any) -> int:
    return getattr(v, "num_hidden_layers", None) or v.depth  # Qwen2.5-VL's vision config says depth


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
        _general_kv(w, provenance, _file_type(quant), "mmproj")
        _add_kv(w, kv)

    _write(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ], plan, ckpt, quant, True, meta, "mmproj", imatrix)
    return path


def llama_quantize(src: Path, dst: Path, quant: str, n_threads: int = 0) -> Path:
    """Quantize an f16 GGUF with llama.cpp's own quantizer (``llama_model_quantize``)."""
    import ctypes

    import gguf
    import llama_cpp
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp logs every tensor it quantizes
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, LLAMA_QUANTS[quant]))
    params.nthread = n_threads
    with atomic_file(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise ExportError(f"llama.cpp could not quantize {src.name} to {quant} (llama_model_quantize returned "
                              f"{rc}); the f16 file is in {src.parent}")
    return dst


# ---------------------------------------------------------------- tokenizer


def _pre_signature(pre: dict[str, Any] | None) -> str:
    if not pre:
        return "none"
    items = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    sig = []
    for p in items:
        t = p.get("type")
        if t == "ByteLevel":
            sig.append("bytelevel+re" if p.get("use_regex", True) else "bytelevel")
        elif t == "Digits":
            sig.append("digits1" if p.get("individual_digits") else "digits")
        elif t == "Split":
            pat = p.get("pattern", {})
            sig.append("split:" + (pat.get("Regex") or pat.get("String") or ""))
        else:
            sig.append(str(t))
    return "|".join(sig)


# The tokenizer kinds edgemed writes to GGUF: how each is recognised is tokenizer_kind, how each is written is
# add_tokenizer. Tests parametrise over this table.
TOKENIZER_KINDS = {
    "byte-level-bpe": "GPT-2 style byte-level BPE from tokenizer.json (SmolLM2, Llama 3, Qwen2)",
    "sentencepiece": "SentencePiece with byte fallback, from tokenizer.model (Gemma, Llama 2 as the hub ships them)",
    "bpe-byte-fallback": "SentencePiece-style BPE with byte fallback from tokenizer.json alone (Gemma saved by "
                         "transformers 5, hub checkpoints without tokenizer.model)",
}


def tokenizer_kind(model_dir: Path) -> str:
    """Which of :data:`TOKENIZER_KINDS` the folder's tokenizer is; an ExportError names what it has otherwise."""
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        if (model_dir / "tokenizer.model").is_file():
            return "sentencepiece"
        raise ExportError(f"{model_dir}: no tokenizer.json; the model folder must hold its tokenizer "
                          "(save it with tokenizer.save_pretrained)")
    try:
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{tj_path}: not valid JSON ({e}); save the tokenizer again") from None
    model = tj.get("model") or {}
    decoder = tj.get("decoder") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        return "byte-level-bpe"
    if (model_dir / "tokenizer.model").is_file():
        return "sentencepiece"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "bpe-byte-fallback"
    raise ExportError(f"{tj_path}: tokenizer model {model.get('type')!r} (byte_fallback "
                      f"{bool(model.get('byte_fallback'))}) is not supported for GGUF; supported: "
                      + "; ".join(TOKENIZER_KINDS.values()))


def add_tokenizer(w, model_dir: Path, n_vocab: int, chat_template: str | None = None) -> None:
    """Vocabulary, merges, special tokens and chat template (``chat_template`` or the folder's), as llama.cpp's
    tokenizer reads them."""
    kind = tokenizer_kind(model_dir)
    if kind == "byte-level-bpe":
        tj_path = model_dir / "tokenizer.json"
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
        tokens, types = _bpe_tokens(model_dir, n_vocab)
        sig = _pre_signature(tj.get("pre_tokenizer"))
        pre = BPE_PRE.get(sig)
        if pre is None:
            raise ExportError(f"{tj_path}: pre-tokenizer {sig!r} has no llama.cpp equivalent known to edgemed; "
                              f"known: {', '.join(BPE_PRE)}")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        _special_vocab(model_dir, True, len(tokens)).add_to_gguf(w, quiet=True)
    else:
        if kind == "sentencepiece":
            tokens, scores, types = _spm_tokens(model_dir, n_vocab)
        else:
            tokens, scores, types = _hf_spm_tokens(model_dir, n_vocab)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(_adds_space_prefix(model_dir))
        _special_vocab(model_dir, False, len(tokens)).add_to_gguf(w, quiet=True)
    template = chat_template if chat_template is not None else _chat_template(model_dir)
    if template:
        w.add_chat_template(template)  # the exact template the model was fine-tuned with


def _adds_space_prefix(model_dir: Path) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama 2's Prepend normalizer, Metaspace prepend_scheme).

    Gemma's tokenizers do not. Read from tokenizer.json; a folder with only tokenizer.model keeps llama.cpp's
    answer for SentencePiece models of this kind (no prefix), which edgemed has always written.
    """
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        return False
    tj = json.loads(tj_path.read_text(encoding="utf-8"))

    def steps(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
        if not node:
            return []
        return list(node.get(key) or []) if node.get("type") == "Sequence" else [node]

    for n in steps(tj.get("normalizer"), "normalizers"):
        if n.get("type") == "Prepend" and n.get("prepend") == "\u2581":
            return True
    for p in steps(tj.get("pre_tokenizer"), "pretokenizers"):
        if p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never":
            return True
    return False


def _special_vocab(model_dir: Path, merges: bool, n_vocab: int):
    """gguf-py's merges and special-token ids; the chat template is added separately (chat_template.jinja)."""
    import gguf

    sv = gguf.SpecialVocab(model_dir, load_merges=merges, n_vocab=n_vocab)
    sv.chat_template = None
    for k, v in _adds_bos_eos(model_dir).items():  # what gguf-py read from the files wins; else transformers'
        sv.add_special_token.setdefault(k, v)
    return sv


def _adds_bos_eos(model_dir: Path) -> dict[str, bool]:
    """Whether transformers puts BOS before and EOS after an encoded text, as this folder's tokenizer is loaded.

    Asked of transformers itself, for what gguf-py's reading of tokenizer_config.json and the tokenizer.json
    post-processor leaves unset (the tokenizer class's default).
    """
    tok = _hf_tokenizer(model_dir)
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    out: dict[str, bool] = {}
    if tok.bos_token_id is not None:
        out["bos"] = bool(full[:1] == [tok.bos_token_id] and plain[:1] != [tok.bos_token_id])
    if tok.eos_token_id is not None:
        out["eos"] = bool(full[-1:] == [tok.eos_token_id] and plain[-1:] != [tok.eos_token_id])
    return out


def _chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json", "processor_config.json"):
        p = model_dir / name
        if p.is_file():
            t = json.loads(p.read_text()).get("chat_template")
            if isinstance(t, str):
                return t
    return None


def _replace_template(folder: Path, template: str) -> None:
    """Make ``template`` the one transformers reads from ``folder``: chat_template.jinja, no other copy."""
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    (folder / "chat_template.json").unlink(missing_ok=True)
    for name in ("tokenizer_config.json", "processor_config.json"):
        p = folder / name
        if p.is_file():
            data = json.loads(p.read_text(encoding="utf-8"))
            if data.pop("chat_template", None) is not None:
                p.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def _bpe_tokens(model_dir: Path, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token texts and types by id, padded to the embedding rows (convert_hf_to_gguf's get_vocab_base)."""
    import gguf

    tok = _hf_tokenizer(model_dir)
    vocab = tok.get_vocab()
    if len(vocab) > n_vocab:
        raise ExportError(f"{model_dir}: the tokenizer has {len(vocab)} tokens but the embedding only {n_vocab} rows; "
                          "resize the model's embeddings to the tokenizer before export")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")  # embedding rows beyond the tokenizer (vocab padding)
            types.append(gguf.TokenType.UNUSED)
            continue
        text = reverse[i]
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    return tokens, [int(t) for t in types]


def _spm_tokens(model_dir: Path, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """SentencePiece pieces, scores and types (convert_hf_to_gguf's _create_vocab_sentencepiece)."""
    import gguf

    path = model_dir / "tokenizer.model"
    if not path.is_file():
        raise ExportError(f"{model_dir}: SentencePiece-style tokenizer without tokenizer.model; llama.cpp needs the "
                          "SentencePiece model file beside tokenizer.json")
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(path))
    size = sp.vocab_size()
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-1000.0] * n_vocab
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for i in range(min(size, n_vocab)):
        piece = sp.id_to_piece(i)
        tokens[i] = piece.encode("utf-8")
        scores[i] = sp.get_score(i)
        t = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        types[i] = int(t)
    tok = _hf_tokenizer(model_dir)
    for i, added in tok.added_tokens_decoder.items():
        if i >= n_vocab:
            raise ExportError(f"{model_dir}: added token {added.content!r} id {i} is beyond the {n_vocab} "
                              "embedding rows; resize the model's embeddings to the tokenizer before export")
        tokens[i] = added.content.encode("utf-8")
        scores[i] = -1000.0
        if types[i] in (int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.BYTE)):
            continue
        types[i] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    return tokens, scores, types


def _hf_spm_tokens(model_dir: Path, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and types of a SentencePiece-style BPE kept only as tokenizer.json (no tokenizer.model).

    Texts and base types come from gguf-py's ``LlamaHfVocab``. Its scores are a -1000 placeholder, but
    llama.cpp's SentencePiece tokenizer merges the pair of highest score first, so equal scores would merge left
    to right. tokenizer.json keeps SentencePiece's order as the rank of each merge, so a piece's score here is
    minus the rank of the merge that makes it (the same order as the scores in the SentencePiece model).
    Added tokens are typed as transformers holds them: special ones CONTROL, the others USER_DEFINED (llama.cpp
    then matches them whole, before tokenizing, as transformers does).
    """
    import gguf

    try:
        vocab = gguf.LlamaHfVocab(model_dir)
    except (FileNotFoundError, TypeError) as e:
        raise ExportError(f"{model_dir / 'tokenizer.json'}: not a SentencePiece-style BPE tokenizer gguf-py can "
                          f"read ({e})") from None
    base = vocab.vocab_size_base
    order = [i for i in range(base) if i not in vocab.added_tokens_ids]
    order += [vocab.added_tokens_dict[t] for t in vocab.added_tokens_list]
    if max(order, default=-1) >= n_vocab:
        raise ExportError(f"{model_dir}: the tokenizer has {max(order) + 1} tokens but the embedding only {n_vocab} "
                          "rows; resize the model's embeddings to the tokenizer before export")
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-1000.0] * n_vocab
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for i, (text, _score, ttype) in zip(order, vocab.all_tokens(), strict=True):
        tokens[i], types[i] = text, int(ttype)
    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = tj["model"]["vocab"]
    for rank, merge in enumerate(tj["model"].get("merges") or []):
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        i = ids.get(a + b)
        if i is not None and i < n_vocab and scores[i] == -1000.0:
            scores[i] = -float(rank)
    for i, t in enumerate(types):
        if t == int(gguf.TokenType.NORMAL) and scores[i] == -1000.0:
            scores[i] = 0.0  # single characters: never a merge result, any score works (SentencePiece gives 0)
    for i, added in vocab.tokenizer.added_tokens_decoder.items():
        if i < n_vocab and types[i] not in (int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.BYTE)):
            tokens[i] = added.content.encode("utf-8")
            scores[i] = -1000.0
            types[i] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    unk = vocab.tokenizer.unk_token_id
    if unk is not None and unk < n_vocab:
        types[unk] = int(gguf.TokenType.UNKNOWN)
    return tokens, scores, types
