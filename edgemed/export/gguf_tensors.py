"""The tensors of a GGUF file: a checkpoint read lazily, each tensor mapped to its GGUF name by the family's
:class:`edgemed.archs.base.GGUFSpec`, and gguf-py's writer fed one tensor at a time (peak memory near the largest
tensor)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemed.archs.base import ArchSpec, GGUFSpec
from edgemed.artifacts import atomic_file
from edgemed.errors import ExportError
from edgemed.files import reading

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

        path, offset, dtype = self._locate(key)
        raw = np.empty(self.shapes[key], dtype=dtype)
        with open(path, "rb") as fh:
            fh.seek(offset)
            if fh.readinto(memoryview(raw.reshape(-1)).cast("B")) != raw.nbytes:
                raise self._truncated(key)
        return _float32(raw, self.dtypes[key])

    def strided(self, key: str, step: int, count: int):
        """``get(key).reshape(-1)[::step][:count]``, reading only those values (a fingerprint of MedGemma's 2.7 GB
        fp32 embedding reads 97 values instead of converting the tensor beside the loaded model)."""
        import numpy as np

        path, offset, dtype = self._locate(key)
        picks = range(0, math.prod(self.shapes[key]), step)[:count]
        raw = np.empty(len(picks), dtype=dtype)
        with open(path, "rb") as fh:
            for j, i in enumerate(picks):
                fh.seek(offset + i * dtype.itemsize)
                if fh.readinto(memoryview(raw[j:j + 1]).cast("B")) != dtype.itemsize:
                    raise self._truncated(key)
        return _float32(raw, self.dtypes[key])

    def _locate(self, key: str) -> tuple[Path, int, Any]:
        """(file, byte offset, numpy dtype of the stored values) of a tensor GGUF export can read."""
        import numpy as np

        f, offset, _ = self.where[key]
        if self.dtypes[key] not in _ST_DTYPES:
            raise ExportError(f"tensor {key!r} has dtype {self.dtypes[key]}, which GGUF export cannot read")
        return self.folder / f, offset, np.dtype(_ST_DTYPES[self.dtypes[key]])

    def _truncated(self, key: str) -> ExportError:
        return ExportError(f"{self.folder / self.where[key][0]}: truncated at tensor {key!r}; the checkpoint is "
                           "damaged")


def _float32(raw: Any, dtype: str) -> Any:
    """Checkpoint values of safetensors ``dtype`` as float32, with one full-size array made at most."""
    import numpy as np

    if dtype == "F32":
        return raw
    if dtype == "BF16":  # bf16 is the top half of a float32; shifted in place (a copy more was 2.7 GB at Gemma 3 4B)
        out = raw.astype(np.uint32)
        out <<= 16
        return out.view(np.float32)
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


def permute(n_head: int) -> Callable[[Any], Any]:
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
        tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, getattr(vcfg, g.vision_block_key) + 8)
        parts = ("vision", "projector")
    n_head = text_cfg.num_attention_heads
    n_kv = getattr(text_cfg, "num_key_value_heads", None) or n_head
    # transformers ties the head by the top-level config alone (LlavaConfig copies its text config's flag up; a Gemma 3
    # saved untied keeps text_config.tie_word_embeddings true and is untied all the same)
    tied = bool(getattr(config, "tie_word_embeddings", False))
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
                transform = _chain(transform, permute(n_head))
            elif g.permute_qk and re.fullmatch(r"blk\.\d+\.attn_k\.(weight|bias)", new):
                transform = _chain(transform, permute(n_kv))
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
    if which == "text" and not tied and not any(e.name == "output.weight" for e in entries):
        raise ExportError(f"{ckpt.folder}: config.json says the LM head is not tied to the embeddings "
                          "(tie_word_embeddings false) but the checkpoint has no lm_head weight, so transformers "
                          "would start it from random values; save the model again with its head, or set "
                          "tie_word_embeddings to true if the head is the embedding matrix")
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


def tensor_type(name: str, shape: tuple[int, ...], quant: str, mmproj: bool = False):
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


def convert(data, qtype, imatrix=None):
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


def file_type(quant: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q5_0": F.MOSTLY_Q5_0}[quant]


def add_kv(w, kv: dict[str, Any]) -> None:
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


def write_gguf(path: Path, arch: str, plan: list[Entry], ckpt: Checkpoint, quant: str, mmproj: bool,
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
            types = [tensor_type(e.name, e.shape, quant, mmproj) for e in plan]
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
                w.write_tensor_data(convert(data, t, (imatrix or {}).get(e.name)))
                del data
        finally:
            w.close()


def general_kv(w, provenance: dict[str, Any], ftype: int, kind: str) -> None:
    """general.* keys and edgemed's provenance (source tree and manifest, base model), in every file."""
    import gguf

    w.add_type(gguf.GGUFType.MODEL if kind == "model" else gguf.GGUFType.MMPROJ)
    w.add_name(provenance["name"])
    if provenance["base_model"]:
        w.add_base_model_count(1)
        w.add_base_model_name(0, provenance["base_model"])
    if provenance.get("base_model_sha256"):
        w.add_string("edgemed.base_model.tree_sha256", provenance["base_model_sha256"])
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string("edgemed.source.tree_sha256", provenance["tree_sha256"])
    w.add_string("edgemed.source.manifest", json.dumps(provenance["manifest"], sort_keys=True))
