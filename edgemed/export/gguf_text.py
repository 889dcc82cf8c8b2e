"""The GGUF pieces both exporters share (the merged model's, ``edgemed.export.gguf``, and the run's base + adapter,
``edgemed.export.gguf_adapter``): the quant names, the text model's file and llama.cpp's quantizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgemed.archs.base import ArchSpec
from edgemed.artifacts import MANIFEST, atomic_file, sha256_file, tree_sha256
from edgemed.errors import ExportError
from edgemed.export.gguf_tensors import Checkpoint, Entry, add_kv, file_type, general_kv, write_gguf
from edgemed.export.gguf_vocab import add_tokenizer, hf_tokenizer

DIRECT = ("f32", "f16", "bf16", "q8_0")  # written by gguf-py
LLAMA_QUANTS = {"q6_k": "MOSTLY_Q6_K", "q5_k_m": "MOSTLY_Q5_K_M", "q4_k_m": "MOSTLY_Q4_K_M", "q4_0": "MOSTLY_Q4_0",
                "iq4_xs": "MOSTLY_IQ4_XS", "q3_k_m": "MOSTLY_Q3_K_M", "iq3_m": "MOSTLY_IQ3_M"}
QUANTS = DIRECT + tuple(LLAMA_QUANTS)
MMPROJ_QUANTS = ("f32", "f16", "q8_0", "q5_0")  # q5_0: the vision tower's matrices, calibrated when data is given

# Files the runtime needs to render prompts exactly as PyTorch did (copied beside the GGUF files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "processor_config.json", "preprocessor_config.json", "generation_config.json", "config.json")


def check_quants(quants: list[str], mmproj_quant: str) -> list[str]:
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


def load_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


def source_provenance(model_dir: Path, source: dict[str, Any] | None) -> dict[str, Any]:
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


def image_placeholder_id(model_dir: Path, spec: ArchSpec) -> int | None:
    """Id of the image placeholder the rendered prompt holds (``ArchSpec.placeholder_id``; llama.cpp's mtmd
    expands it), None for text models."""
    return spec.placeholder_id(hf_tokenizer(model_dir)) if spec.image_placeholder else None



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
        general_kv(w, provenance, file_type(quant), "model")
        add_kv(w, kv)
        add_tokenizer(w, model_dir, n_vocab, chat_template)

    write_gguf(path, spec.gguf_arch, plan, ckpt, quant, False, meta, f"model-{quant}")
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
