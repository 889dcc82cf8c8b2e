"""ONNX export for onnxruntime: the text decoder with a KV cache, and for image models the vision graph and the
embedding step that splices image features into the token embeddings.

Which exporter, and why (measured on this 2-core CPU machine, SmolLM2-135M, the embedded default model):

* **Text decoders the onnxruntime-genai model builder knows** (``BUILDER_DECODERS``: Llama, Mistral, Qwen2,
  Gemma 3) go through the builder. It writes a fused graph (GroupQueryAttention with rotary embedding,
  SkipSimplifiedLayerNormalization, one QKV MatMul; 342 nodes) in 4-18 s; fp32 logits match PyTorch to 1.5e-4
  absolute (4e-6 relative to the largest logit) over prefill and decode steps, and its int4 graph decodes at
  240-310 tokens/s on an idle machine against 33 tokens/s for PyTorch fp32. The same decoder through
  torch.onnx.export (dynamo, transformers' modules, explicit KV cache) took 105 s, has 1144 nodes (unfused
  attention and rotary) and decoded at 10.6-22.1 tokens/s where the builder's fp32 graph did 11.4-27.4 in the
  same runs (shared cores, so ranges). So the builder is the well-kept exporter where it works. For image models
  the builder writes the decoder half only (``exclude_embeds=true``: it takes ``inputs_embeds``), from the
  decoder and LM head cut out of the image model into a plain causal-LM folder.
* **Everything else** goes through ``torch.onnx.export`` (dynamo): vision tower + projector (``vision.onnx``),
  the embedding lookup and image-feature splice (``embed.onnx``), and the decoders the builder cannot write
  exactly, run as transformers' own modules with the KV cache as explicit inputs and outputs: Llama 3.2 Vision's
  gated cross-attention decoder, and Gemma 3's image-text decoder, whose image tokens attend to each other both
  ways (the builder's Gemma 3 graph is purely causal: 0.11 relative logit error on image prompts of the tiny
  model, 1e-6 through torch.onnx). Qwen2.5-VL goes this way too (its M-RoPE decoder takes 3-D positions, which
  the builder does not write), with what depends on the image grid computed outside the graphs by the
  architecture entry's ``grid`` functions: the decoder takes ``position_ids`` [3, batch, seq], and the vision
  graph takes per-patch rotary positions, window ids and frame ids and masks its attention with them instead of
  transformers' data-dependent window permutation and sequence splits (``_export_grid_vision``); 2e-7 relative
  logit error on text and image prompts of the tiny model, for image sizes other than the traced one. A decoder
  none of these routes writes is refused before any weights load.

Post-processing, so that ``onnx.checker`` passes on every file: the builder emits ``SimplifiedLayerNormalization``
in the default ONNX domain (an onnxruntime-only schema the checker rejects); it is rewritten to the standard
``RMSNormalization`` (opset 23), which is the same computation. Contrib ops in ``com.microsoft``
(GroupQueryAttention, MatMulNBits) are legal there.

Quantisation is onnxruntime's weight-only MatMulNBits, on the decoder (the vision and embedding graphs stay fp32:
they are small and the image features are the most sensitive part of an image model). Measured on SmolLM2-135M against
PyTorch fp32 logits (4 chat prompts, 120 positions; top-1 agreement / mean KL):

* ``int8``: weight-only 8-bit MatMulNBits (block ``block_size``) - 98.3% / 0.009. onnxruntime's
  ``quantize_dynamic`` (QInt8 per-channel weights, dynamic uint8 activations) was tried first and rejected:
  54% / 1.17, because per-tensor activation quantisation cannot hold the decoder's outlier activations.
* ``int4``: 4-bit blocks of ``block_size`` with a float minimum per block (``edgemed.export.onnx_quant``: MatMulNBits
  with an integer zero point for the fast kernel, plus a block-sum correction for the float rest of the minimum) on
  every decoder weight, the LM head and an embedding tied to it in 8-bit Q8_0 blocks. On SmolLM2-135M: 97.7% / 0.005 on
  ``edgemed parity``'s 16 probes (thresholds 80% / 0.3), 110 MB, decoding at 192 tokens/s, 6.0x PyTorch fp32
  (``tools/bench_onnx.py``; the builder's own int4 ran 15-20% faster, and failed). The embedded weights were dequantised
  from a Q4_1 GGUF and lie on a 4-bit grid with a float offset per 32 weights, which this reproduces (up to the 8-bit
  rounding of each block's offset); onnxruntime's integer-zero-point grids do not (module docstring of ``onnx_quant``).
  Tried first and rejected, on the same probes: the builder's k-quant int4 with llama.cpp's mixed 8-bit layers, 73.4% /
  0.31; plain RTN int4 (symmetric or not, block 16 or 32, accuracy level 1 or 4), 53-63% / 0.75-0.88; MatMulNBits with
  float zero points, 86.6% / 0.043 but 1.8 tokens/s (onnxruntime's CPU kernel leaves its fast path). The same rewrite
  serves the torch.onnx decoders.
  A LoRA merge (``edgemed merge`` folder whose manifest names its base, still present with the same sha256) is
  quantised as base + change: the base's fp32 decoder graph is written by the same route, its weights are the ones
  rounded to 4 bits, and each weight's difference, low-rank by construction, rides as factors in the correction
  MatMuls. Rounding the merged weights instead erased the demo fine-tune (54.5% / 1.87); base + change kept it
  (97.2% / 0.0045 on the demo model's 16 parity probes, exported in 20 s).
* ``fp16``: onnxruntime's float16 converter with fp32 inputs and outputs kept, so callers feed the same tensors
  (100% / 4e-6).

The output folder (written via ``atomic_dir``: nothing is left on failure) holds ``decoder.onnx`` (+
``decoder.onnx.data``), ``vision.onnx`` and ``embed.onnx`` for image models, the HF tokenizer, processor and chat
template files, and a manifest of kind ``onnx`` that also describes the graphs for ``backends/onnx.py``.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from edgemed.archs import ArchSpec, arch_for_dir
from edgemed.artifacts import MANIFEST, atomic_dir, read_manifest, source_manifest, tree_sha256, write_manifest
from edgemed.errors import ArtifactError, EdgemedWarning, ExportError
from edgemed.files import reading

QUANTS = ("fp32", "fp16", "int8", "int4")
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# causal-LM classes onnxruntime-genai's builder dispatches on (config.architectures[0]) and that pass parity here
BUILDER_DECODERS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM")
# files of a model folder that are weights or edgemed's own, never copied into the export
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".data", ".msgpack", ".h5")
_SKIP_FILES = ("manifest.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
# keys of a processor's output that are not image inputs of the model
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
DECODER, EMBED, VISION = "decoder.onnx", "embed.onnx", "vision.onnx"
OPSET = 23  # RMSNormalization


def export_onnx(model_dir: Path | str, quant: str = "fp32", out: Path | str | None = None, *, overwrite: bool = False,
                block_size: int = 32, accuracy_level: int = 4) -> Path:
    """Export a merged model folder to ONNX for onnxruntime.

    Args:
        model_dir: a transformers model folder (``edgemed merge`` output, an embedded model, or any local
            checkpoint of a registered architecture) with 16/32-bit weights.
        quant: fp32, fp16, int8 or int4 (block-wise weight-only MatMulNBits).
        out: the folder to write; it must not exist unless ``overwrite``.
        overwrite: replace an existing ``out`` once the new folder is complete.
        block_size: int4/int8 block size (16, 32, 64, 128, 256).
        accuracy_level: int4/int8 MatMulNBits accuracy level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations).

    Returns:
        The output folder.
    """
    _check_options(quant, block_size, accuracy_level)
    model_dir = Path(model_dir)
    if out is None:
        raise ExportError("no output folder given; pass --out DIR")
    source_manifest(model_dir)  # a run, an export or a folder missing listed files is refused before any work
    spec = arch_for_dir(model_dir)
    _refuse_quantized(model_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    route = _decoder_route(spec, model_dir)  # before loading weights: an unsupported decoder fails at once
    model, processor, tokenizer = _load(model_dir, spec)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp, \
            tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=tmp.parent) as work:
        work = Path(work)
        graphs: dict[str, Any] = {}
        image_inputs = _example_image_inputs(processor, spec) if spec.is_vision else None
        graphs["decoder"] = _export_decoder(route, model, spec, tokenizer, tmp, work, quant, block_size,
                                            accuracy_level, image_inputs)
        if spec.is_vision:
            graphs["vision"] = _export_vision(model, spec, image_inputs, tmp / VISION)
        if graphs["decoder"]["input"] == "inputs_embeds":
            graphs["embed"] = _export_embed(model, tmp / EMBED)
            if quant in ("int8", "int4"):
                graphs["embed"]["quant_algorithm"] = _quantize_embedding(tmp / EMBED)
        if quant == "int4":
            del model  # a LoRA merge's base is loaded next: one model in memory at a time
            base = _lora_base(model_dir)
            base_graph = _base_decoder_graph(route, base, spec, tokenizer, work, image_inputs) if base else None
            graphs["decoder"]["quant_algorithm"] = _quantize_int4(tmp / DECODER, block_size, accuracy_level,
                                                                  base_graph, base)
        _copy_processing_files(model_dir, tmp)
        for g in graphs.values():
            check_graph(tmp / g["file"])
        write_manifest(tmp, "onnx", arch=spec.name, quant=quant,
                       options={"block_size": block_size, "accuracy_level": accuracy_level}
                       if quant in ("int4", "int8") else {},
                       graphs=graphs, parent=_parent(model_dir))
    return out.absolute()


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


def _example_image_inputs(processor: Any, spec: ArchSpec) -> dict[str, Any]:
    """The image inputs the processor makes for one image, as the runtime will feed them to vision.onnx."""
    import numpy as np
    from PIL import Image

    img = Image.fromarray((np.random.default_rng(0).random((96, 80, 3)) * 255).astype("uint8"))
    enc = processor(text=[spec.image_placeholder or ""], images=[img], return_tensors="pt", add_special_tokens=False)
    return {k: v for k, v in enc.items() if k not in TEXT_KEYS}


def check_graph(path: Path) -> None:
    """``onnx.checker`` on a graph file (external data read from beside it); an ExportError names the file."""

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise ExportError(f"{path.name}: onnx.checker rejects the exported graph ({first})") from e


# ---------------------------------------------------------------------------------------------- decoder
def _decoder_route(spec: ArchSpec, model_dir: Path) -> str:
    """Which exporter writes this model's decoder: "builder", or torch.onnx for "cross"-attention decoders,
    decoders whose attention mask depends on "token_types", and "grid" decoders whose rotary positions come from
    the image grid (the architecture entry's ``grid``: Qwen2.5-VL's M-RoPE)."""
    import transformers
    from transformers import AutoConfig

    forward = inspect.signature(getattr(transformers, spec.model_class).forward).parameters
    if "cross_attention_states" in forward:  # image features enter by cross-attention (Llama 3.2 Vision)
        return "cross"
    if spec.grid is not None:  # 3-D positions [3, batch, seq]; the builder writes 1-D rotary positions only
        return "grid"
    # token types change the attention mask (Gemma 3: image tokens attend to each other both ways), which the
    # builder's causal GroupQueryAttention cannot express
    if spec.is_vision and "token_type_ids" in forward:
        return "token_types"
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if _causal_lm_class(spec.text_config(config)) in BUILDER_DECODERS:
        import importlib.util

        if importlib.util.find_spec("onnxruntime_genai") is None:
            raise ExportError("onnxruntime-genai is not installed; its model builder writes the ONNX decoder of "
                              f"{spec.name} models: run `pip install onnxruntime-genai`")
        return "builder"
    text_cfg = spec.text_config(config)
    decoder = _causal_lm_class(text_cfg) or getattr(text_cfg, "model_type", "?")
    raise ExportError(f"{model_dir}: no ONNX exporter for the {spec.name} decoder ({decoder} in {spec.model_class}): "
                      "onnxruntime-genai's builder does not write it and it is not a cross-attention or M-RoPE "
                      "decoder; ONNX export supports Llama, Mistral, Qwen2 and Gemma 3 text decoders (alone or in "
                      "LLaVA and Gemma 3 image models), Llama 3.2 Vision and Qwen2.5-VL; use `edgemed export gguf` "
                      "if llama.cpp supports it")


def _export_decoder(route: str, model: Any, spec: ArchSpec, tokenizer: Any, tmp: Path, work: Path, quant: str,
                    block_size: int, accuracy_level: int, image_inputs: dict[str, Any] | None) -> dict[str, Any]:
    if route == "builder":
        lm_class = _causal_lm_class(spec.text_config(model.config))
        info = _builder_decoder(model, spec, tokenizer, lm_class, tmp / DECODER, work, quant, block_size,
                                accuracy_level)
    else:
        info = _TORCH_DECODERS[route](model, spec, tmp / DECODER, image_inputs)
        if quant == "int8":
            _quantize_int8(tmp / DECODER, block_size, accuracy_level)
    if quant == "fp16":
        _convert_fp16(tmp / DECODER)
    return {"file": DECODER, **info}


def _cross_decoder(model: Any, spec: ArchSpec, target: Path, image_inputs: dict[str, Any] | None) -> dict[str, Any]:
    """The decoder through torch.onnx, for what the builder does not write: cross-attention decoders.

    The graph runs the whole transformers model on token ids with the projected vision states as
    ``cross_attention_states`` and the processor's ``cross_attention_mask``; the KV cache of the self-attention
    layers is explicit input and output, and the cross-attention keys/values are recomputed from the states at
    every step (cheap beside the vision tower, and no second cache to carry). A text-only call passes one tile of
    zero states and a zero mask: every cross-attention layer then adds exactly zero, as transformers' skip does.
    """
    text_cfg = spec.text_config(model.config)
    dims = _decoder_dims(text_cfg)
    layers = model.get_submodule(spec.decoder).layers
    self_idx = [i for i, layer in enumerate(layers) if hasattr(layer, "self_attn")]
    vision = _VisionGraph(model, spec, list(image_inputs))
    with torch.no_grad():
        states = vision(*(image_inputs[n] for n in vision.names))
    seq, past_len = 5, 3
    args = (torch.randint(0, 100, (1, seq)), torch.ones(1, past_len + seq, dtype=torch.int64),
            torch.arange(past_len, past_len + seq)[None], states[None],
            torch.ones(1, seq, *image_inputs["cross_attention_mask"].shape[2:], dtype=torch.float32),
            tuple(torch.randn(1, dims["num_kv_heads"], past_len, dims["head_dim"]) for _ in range(2 * len(self_idx))))
    d = {n: torch.export.Dim(n) for n in ("sequence", "total_sequence", "past_sequence", "n_vision", "n_images",
                                           "n_tiles")}
    dynamic = ({1: d["sequence"]}, {1: d["total_sequence"]}, {1: d["sequence"]}, {1: d["n_vision"]},
               {1: d["sequence"], 2: d["n_images"], 3: d["n_tiles"]}, tuple({2: d["past_sequence"]} for _ in args[5]))
    kv = [f"{i}.{k}" for i in self_idx for k in ("key", "value")]
    _torch_export(_CrossDecoder(model, self_idx, len(layers)), args, target,
                  ["input_ids", "attention_mask", "position_ids", "cross_attention_states", "cross_attention_mask",
                   *(f"past_key_values.{n}" for n in kv)], ["logits", *(f"present.{n}" for n in kv)],
                  dynamic_shapes=dynamic)
    return {"exporter": f"torch.onnx (dynamo) {_version('torch')} ({type(model).__name__})", "input": "input_ids",
            "position_ids": True, "cross_attention": {"n_vision_per_tile": int(states.shape[0]) // int(
                image_inputs["cross_attention_mask"].shape[2] * image_inputs["cross_attention_mask"].shape[3])},
            **dims}


def _token_type_decoder(model: Any, spec: ArchSpec, target: Path, image_inputs: dict[str, Any] | None
                        ) -> dict[str, Any]:
    """The decoder through torch.onnx for image models whose attention mask depends on token types (Gemma 3).

    ``token_type_ids`` (1 on image tokens) go in beside the input embeddings, so transformers builds its own mask:
    causal, sliding window where the layer has one, and image tokens attending to their whole image.
    """
    return {**_embeds_decoder(model, spec, target, torch.arange(3, 9)[None],
                              token_type_ids=torch.tensor([[0, 1, 1, 1, 0, 0]])), "position_ids": True}


def _grid_decoder(model: Any, spec: ArchSpec, target: Path, image_inputs: dict[str, Any] | None) -> dict[str, Any]:
    """The decoder through torch.onnx for M-RoPE image models (Qwen2.5-VL), whose rotary positions are 3-D.

    onnxruntime-genai's builder writes 1-D rotary positions only. Here ``position_ids`` are [3, batch, seq]
    (temporal, row, column). They depend on the image grid (a data-dependent loop in transformers'
    ``get_rope_index``), so the runtime computes them with the architecture entry's ``grid.rope_index``: for the
    prompt from its ids and ``image_grid_thw``, for each later token its index plus the prompt's delta
    (``rope_deltas``).
    """
    positions = torch.tensor([[[3, 4, 4, 4, 4, 6]], [[3, 4, 4, 5, 5, 6]], [[3, 4, 5, 4, 5, 6]]])
    return {**_embeds_decoder(model, spec, target, positions), "position_ids": "grid"}


def _embeds_decoder(model: Any, spec: ArchSpec, target: Path, positions: Any, **extra: Any) -> dict[str, Any]:
    """The whole transformers model through torch.onnx on input embeddings (``embed.onnx`` splices the image
    features), with ``position_ids`` in the model's own layout (sequence on the last axis), ``extra`` per-token
    inputs (token types) and the KV cache as explicit input and output. ``positions`` and ``extra`` are the
    example tensors of one 6-token step after 3 cached ones."""
    dims = _decoder_dims(spec.text_config(model.config))
    n = dims["num_layers"]
    seq, past_len = positions.shape[-1], 3
    args = (torch.randn(1, seq, dims["hidden_size"]), torch.ones(1, past_len + seq, dtype=torch.int64), positions,
            tuple(extra.values()) or None,  # an empty tuple trips torch.onnx's dynamic-shape check
            tuple(torch.randn(1, dims["num_kv_heads"], past_len, dims["head_dim"]) for _ in range(2 * n)))
    d = {k: torch.export.Dim(k) for k in ("sequence", "total_sequence", "past_sequence")}
    dynamic = ({1: d["sequence"]}, {1: d["total_sequence"]}, {positions.dim() - 1: d["sequence"]},
               tuple({1: d["sequence"]} for _ in extra) or None, tuple({2: d["past_sequence"]} for _ in args[4]))
    kv = [f"{i}.{k}" for i in range(n) for k in ("key", "value")]
    _torch_export(_EmbedsDecoder(model, n, list(extra)), args, target,
                  ["inputs_embeds", "attention_mask", "position_ids", *extra, *(f"past_key_values.{k}" for k in kv)],
                  ["logits", *(f"present.{k}" for k in kv)], dynamic_shapes=dynamic)
    return {"exporter": f"torch.onnx (dynamo) {_version('torch')} ({type(model).__name__})",
            "input": "inputs_embeds", **dims}


_TORCH_DECODERS = {"cross": _cross_decoder, "token_types": _token_type_decoder, "grid": _grid_decoder}


def _cache(past: tuple, layers: list[int], n_layers: int) -> Any:
    """A transformers DynamicCache holding ``past`` (key, value, key, value...) for ``layers``; others empty."""
    from transformers.cache_utils import DynamicCache

    data: list[tuple[Any, Any]] = [(None, None)] * n_layers
    for j, i in enumerate(layers):
        data[i] = (past[2 * j], past[2 * j + 1])
    return DynamicCache(ddp_cache_data=data)


def _present(cache: Any, layers: list[int]) -> list[Any]:
    """The new KV cache of ``layers`` as graph outputs (key, value, key, value...)."""
    return [t for i in layers for t in (cache.layers[i].keys, cache.layers[i].values)]


class _EmbedsDecoder(torch.nn.Module):
    """Input embeddings, mask, positions (any layout the model takes), named extra inputs and the KV cache in;
    logits and the cache out."""

    def __init__(self, model: Any, n_layers: int, extra: list[str]):
        super().__init__()
        self.model, self.n_layers, self.extra = model, n_layers, extra

    def forward(self, inputs_embeds, attention_mask, position_ids, extra, past):
        cache = _cache(past, list(range(self.n_layers)), self.n_layers)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, **dict(zip(self.extra, extra or (), strict=True)))
        return (out.logits, *_present(cache, list(range(self.n_layers))))


class _CrossDecoder(torch.nn.Module):
    """Token ids, masks, positions, vision states and the self-attention KV cache in; logits and the cache out."""

    def __init__(self, model: Any, self_idx: list[int], n_layers: int):
        super().__init__()
        self.model, self.self_idx, self.n_layers = model, self_idx, n_layers

    def forward(self, input_ids, attention_mask, position_ids, cross_attention_states, cross_attention_mask, past):
        cache = _cache(past, self.self_idx, self.n_layers)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cross_attention_states=cross_attention_states, cross_attention_mask=cross_attention_mask,
                         past_key_values=cache, use_cache=True)
        return (out.logits, *_present(cache, self.self_idx))


def _causal_lm_class(text_cfg: Any) -> str | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text_cfg.model_type)


def _text_causal_lm(model: Any, spec: ArchSpec, lm_class: str, out: Path) -> Path:
    """Cut the text decoder and LM head out of ``model`` into a plain causal-LM folder (what the builder reads)."""
    import transformers

    cfg = copy.deepcopy(spec.text_config(model.config))
    cfg.architectures = [lm_class]
    lm = getattr(transformers, lm_class)(cfg).to(torch.float32)
    state = {f"model.{k}": v for k, v in model.get_submodule(spec.decoder).state_dict().items()}
    state.update({f"lm_head.{k}": v for k, v in model.get_submodule(spec.lm_head).state_dict().items()})
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"cannot cut the {spec.name} text decoder into {lm_class}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}; the architecture entry's decoder/lm_head paths are wrong")
    _clear_unused_attn_softcap(lm)
    lm.save_pretrained(out)
    return out


def _clear_unused_attn_softcap(lm: Any) -> None:
    """The builder applies ``attn_logit_softcapping`` whenever the config sets it; transformers applies it only
    where the attention module passes ``softcap`` to its attention function (Gemma 2 does, Gemma 3 keeps the field
    but does not). Read the modeling code itself, so the graph computes what PyTorch computes."""
    import inspect

    if getattr(lm.config, "attn_logit_softcapping", None) is None:
        return
    attn = next((m for m in lm.modules() if hasattr(m, "attn_logit_softcapping")), None)
    if attn is None or "softcap" not in inspect.getsource(type(attn).forward):
        lm.config.attn_logit_softcapping = None


def _builder_decoder(model: Any, spec: ArchSpec, tokenizer: Any, lm_class: str, target: Path, work: Path,
                     quant: str, block_size: int, accuracy_level: int) -> dict[str, Any]:
    """The decoder through onnxruntime-genai's model builder, then rewritten to checker-valid standard ops."""
    hf = _text_causal_lm(model, spec, lm_class, work / "hf")
    tokenizer.save_pretrained(hf)
    built = work / "builder"
    extra = ["filename=model.onnx", "windowed_kv_cache=false"]  # one growing cache per layer, sliding or not
    if spec.is_vision:
        extra.append("exclude_embeds=true")  # inputs_embeds in: embed.onnx splices the image features
    # int8: the builder's own (RTN). int4: an fp32 graph here, quantised by _quantize_int4 (module docstring)
    precision = "int8" if quant == "int8" else "fp32"
    if quant == "int8":
        extra += [f"block_size={block_size}", f"accuracy_level={accuracy_level}"]
    _run_builder(spec, hf, built, precision, work / "cache", extra)
    algorithm = "rtn" if quant == "int8" else None
    _standardise(built / "model.onnx", target)
    text_cfg = spec.text_config(model.config)
    return {"exporter": f"onnxruntime-genai model builder {_version('onnxruntime-genai')} ({lm_class})",
            "input": "inputs_embeds" if spec.is_vision else "input_ids", "position_ids": False,
            **({"quant_algorithm": algorithm} if algorithm else {}), **_decoder_dims(text_cfg)}


def _run_builder(spec: ArchSpec, hf: Path, built: Path, precision: str, cache: Path, extra: list[str]) -> None:
    args = {"input": str(hf), "output": str(built), "precision": precision, "cache": str(cache), "extra": extra}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # a subprocess: the builder prints per-tensor progress and holds its own copy of the weights
    res = subprocess.run([sys.executable, "-c", _BUILDER_DRIVER, json.dumps(args)], capture_output=True, text=True,
                         env=env)
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if ln.strip()]
        raise ExportError(f"onnxruntime-genai's model builder failed on the {spec.name} decoder "
                          f"({lines[-1] if lines else 'no output'}); this architecture cannot be exported to ONNX "
                          "with the installed onnxruntime-genai")


# Runs the builder as its CLI does, with one shim: transformers 5 writes per-layer-type RoPE parameters
# ({"full_attention": {...}, "sliding_attention": {...}}, Gemma 3) where the builder reads one flat dict plus
# rope_local_base_freq, the layout transformers 4 wrote.
_BUILDER_DRIVER = """
import json, sys
import onnxruntime_genai.models  # puts the builder's folder on sys.path, as `python -m` does
from onnxruntime_genai.models import builder
a = json.loads(sys.argv[1])
opts = builder.parse_extra_options(None, a["input"], a["output"], a["precision"], "cpu", a["cache"], a["extra"])
cfg = opts["hf_details"]["hf_config"]
rp = getattr(cfg, "rope_parameters", None)
if isinstance(rp, dict) and "rope_type" not in rp and "full_attention" in rp:
    local = (rp.get("sliding_attention") or {}).get("rope_theta")
    cfg.rope_parameters = dict(rp["full_attention"])
    cfg.rope_theta = cfg.rope_parameters["rope_theta"]
    if local is not None:
        cfg.rope_local_base_freq = local
builder.create_model(None, a["input"], a["output"], a["precision"], "cpu", a["cache"], **opts)
"""


def _decoder_dims(text_cfg: Any) -> dict[str, Any]:
    heads = text_cfg.num_attention_heads
    return {"num_layers": text_cfg.num_hidden_layers,
            "num_kv_heads": getattr(text_cfg, "num_key_value_heads", None) or heads,
            "head_dim": getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads,
            "hidden_size": text_cfg.hidden_size, "vocab_size": text_cfg.vocab_size}


def _standardise(src: Path, target: Path) -> None:
    """Rewrite onnxruntime's default-domain SimplifiedLayerNormalization as standard RMSNormalization (opset 23)
    and save with external data named after ``target``.

    Only the graph is loaded: the builder's one external-data file is moved, not read, so a 7B decoder does not
    have to fit in memory twice.
    """
    m = onnx.load(str(src), load_external_data=False)
    for node in m.graph.node:
        if node.op_type == "SimplifiedLayerNormalization" and node.domain in ("", "ai.onnx"):
            node.op_type = "RMSNormalization"
            keep = [a for a in node.attribute if a.name in ("axis", "epsilon")]
            del node.attribute[:]
            node.attribute.extend(keep)
            del node.output[1:]  # RMSNormalization has no inverse-std output; the builder never uses it
    for op in m.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, OPSET)
    external = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    if len(locations) != 1:  # weights inside the graph, or spread over several files: the general path
        onnx.load_external_data_for_model(m, str(src.parent))
        save_graph(m, target)
        return
    data = target.with_name(target.name + ".data")
    shutil.move(src.parent / locations.pop(), data)
    for t in external:
        for e in t.external_data:
            if e.key == "location":
                e.value = data.name
    onnx.save_model(m, str(target))


def save_graph(m: Any, target: Path) -> None:
    """Save a ModelProto with its weights as external data beside it (``NAME.onnx.data``) when they are large."""

    target.parent.mkdir(parents=True, exist_ok=True)
    big = sum(len(t.raw_data) for t in m.graph.initializer) > (64 << 20)
    for p in (target, target.with_name(target.name + ".data")):
        p.unlink(missing_ok=True)
    if big:
        onnx.save_model(m, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=target.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(m, str(target))


# ---------------------------------------------------------------------------------------------- quantisation
def _lora_base(model_dir: Path) -> Path | None:
    """The base model an ``edgemed merge`` folder merged LoRA into, when it is still here unchanged (sha256); a
    warning when it is a merge whose base is gone or changed."""
    from edgemed.artifacts import read_manifest
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
    info = _export_decoder(route, _load(base, spec)[0], spec, tokenizer, work / "base", work / "base-work", "fp32",
                           32, 4, image_inputs)
    return work / "base" / info["file"]


def _quantize_int4(path: Path, block_size: int, accuracy_level: int, base_graph: Path | None = None,
                   base: Path | None = None) -> str:
    """int4 (``edgemed.export.onnx_quant``): every MatMul by a constant weight to 4-bit blocks with a float minimum;
    the LM head, and an embedding tied to it, to 8-bit blocks of 32. With ``base_graph`` (the fp32 decoder of the
    model a LoRA merge started from) the base weights are quantised and the fine-tune's low-rank change is kept
    in the 8-bit correction MatMuls beside them. Returns the algorithm's description."""
    from onnx import numpy_helper

    from edgemed.export.onnx_quant import quantize_head_int8, quantize_int4_min

    m = onnx.load(str(path))
    head = _lm_head(m)
    lookup = None
    if base_graph is not None:
        base_inits = {t.name: t for t in onnx.load(str(base_graph), load_external_data=False).graph.initializer}

        def lookup(name: str):
            t = base_inits.get(name)
            return numpy_helper.to_array(t, base_dir=str(base_graph.parent)) if t is not None else None
    counts = quantize_int4_min(m, block_size, accuracy_level, exclude=set(head), base=lookup)
    tied = False
    if head:
        tied = quantize_head_int8(m, head[0], accuracy_level)
    save_graph(m, path)
    skipped = (f", {counts['skipped']} left fp32 (input width not a multiple of {block_size})"
               if counts["skipped"] else "")
    lora = (f"; the LoRA merge's change kept as low-rank factors (rank <= {counts['max_rank']}) on "
            f"{counts['low_rank']} of them, the 4-bit weights being those of the base {base}"
            if counts["low_rank"] else "")
    return (f"4-bit min-max blocks of {block_size} with a float minimum (MatMulNBits + block-sum correction) on "
            f"{counts['quantized']} weights{skipped}; LM head{' and the embedding tied to it' if tied else ''} "
            f"8-bit (blocks of 32){lora}")


def _quantize_embedding(path: Path) -> str:
    """embed.onnx's token table to 8-bit Q8_0 blocks (GatherBlockQuantized); the image-feature splice stays fp32."""
    from edgemed.export.onnx_quant import quantize_embedding_int8

    m = onnx.load(str(path))
    n = quantize_embedding_int8(m, min_rows=1)  # the only constant table in embed.onnx is the vocabulary
    save_graph(m, path)
    return "token embedding table 8-bit (Q8_0 blocks of 32, GatherBlockQuantized)" if n else "fp32"


def _lm_head(m: Any) -> list[str]:
    """The LM head's node name (a one-item list, empty if none): the last MatMul by a constant 2-D weight, since
    soft-capping or a cast may follow it before the graph's output."""
    ranks = {t.name: len(t.dims) for t in m.graph.initializer}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and ranks.get(n.input[1]) == 2][-1:]


def _quantize_int8(path: Path, block_size: int, accuracy_level: int) -> None:
    """Block-wise weight-only int8 (MatMulNBits) with onnxruntime's MatMulNBitsQuantizer, for the decoders the genai
    builder does not write; LM head excluded."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    m = onnx.load(str(path))
    head = _lm_head(m)
    q = MatMulNBitsQuantizer(m, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                             op_types_to_quantize=("MatMul",), nodes_to_exclude=head)
    q.process()
    save_graph(q.model.model, path)


def _convert_fp16(path: Path) -> None:
    """fp16 weights and activations inside; fp32 inputs and outputs, so callers feed the same tensors."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    m = OnnxModel(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True, disable_shape_infer=True))
    m.topological_sort()  # the converter appends its input casts at the end; the checker wants them first
    save_graph(m.model, path)


# ---------------------------------------------------------------------------------------------- vision and embeddings
def _export_vision(model: Any, spec: ArchSpec, image_inputs: dict[str, Any], target: Path) -> dict[str, Any]:
    """Image inputs -> projected image features [n_image_tokens, hidden], as the decoder consumes them."""
    if spec.grid is not None:
        return _export_grid_vision(model, spec, image_inputs, target)
    wrapper = _VisionGraph(model, spec, list(image_inputs))
    names = wrapper.names
    args = tuple(image_inputs[n] for n in names)
    with torch.no_grad():
        feats = wrapper(*args)
    _torch_export(wrapper, args, target, names, ["image_features"])
    return {"file": VISION, "exporter": f"torch.onnx (dynamo) {_version('torch')}", "inputs": names,
            "input_shapes": {n: list(image_inputs[n].shape) for n in names}, "n_image_tokens": int(feats.shape[0]),
            "hidden_size": int(feats.shape[-1])}


class _VisionGraph(torch.nn.Module):
    """The model's own ``get_image_features`` (or, where it has none, its vision tower then projector), flattened
    to [n_image_tokens, hidden]. Takes the processor outputs the model's function names, in the given order."""

    def __init__(self, model: Any, spec: ArchSpec, names: list[str]):
        super().__init__()
        self.model = model
        self.fn = getattr(model, "get_image_features", None) or model.get_submodule(spec.vision)
        self.projector = None if hasattr(model, "get_image_features") else model.get_submodule(spec.projector)
        params = inspect.signature(self.fn.forward if isinstance(self.fn, torch.nn.Module) else self.fn).parameters
        self.names = [n for n in names if n in params]

    def forward(self, *args):
        out = self.fn(**dict(zip(self.names, args, strict=True)))
        if self.projector is not None:
            out = self.projector(out[0] if isinstance(out, tuple) else out.last_hidden_state)
        elif hasattr(out, "pooler_output"):
            out = out.pooler_output
        if isinstance(out, list | tuple):
            out = torch.cat([f.reshape(-1, f.shape[-1]) for f in out])
        return out.reshape(-1, out.shape[-1])


def _export_grid_vision(model: Any, spec: ArchSpec, image_inputs: dict[str, Any], target: Path) -> dict[str, Any]:
    """The vision tower and merger of a family whose patch layout depends on the image grid (Qwen2.5-VL).

    transformers' tower computes, from ``image_grid_thw``, each patch's rotary (row, col), a permutation of the
    patches into attention windows and the window and image boundaries (``cu_seqlens``), then splits the sequence
    at those boundaries: data-dependent shapes torch.export stops on. Here the architecture entry's
    ``grid.vision_inputs`` computes per patch its (row, col), window id and frame id outside the graph (numpy, in
    the runtime), and the graph runs the tower's own modules with attention masked to equal window ids (window
    blocks) or frame ids (full-attention blocks). Masked attention does not depend on the order of the patches,
    so the window permutation and its inverse (both whole 2x2 merge units) cancel and are left out; the graph
    takes any number of patches (any image size the processor makes). Window blocks then cost patches^2 attention
    where transformers' split costs patches x window; at the 3B tower's width it is still the faster of the two
    (``tools/bench_grid_vision.py --depth 8``, 2 threads: 1024 patches 0.93 s against PyTorch's 1.82 s, 4096
    patches 5.9 s against 8.1 s, features equal to 1.7e-6 relative).
    """
    grid_inputs = spec.grid.vision_inputs(image_inputs["image_grid_thw"].numpy(), model.config.to_dict())
    names = ["pixel_values", *grid_inputs]
    args = (image_inputs["pixel_values"].to(torch.float32), *(torch.from_numpy(v) for v in grid_inputs.values()))
    wrapper = _GridVisionGraph(model.get_submodule(spec.vision))
    with torch.no_grad():
        feats = wrapper(*args)
    unit = wrapper.tower.spatial_merge_unit  # the merger takes whole 2x2 units of patches
    patches = unit * torch.export.Dim("n_image_tokens")
    _torch_export(wrapper, args, target, names, ["image_features"], dynamic_shapes=tuple({0: patches} for _ in args))
    return {"file": VISION, "exporter": f"torch.onnx (dynamo) {_version('torch')}", "inputs": names,
            "grid_inputs": list(grid_inputs), "hidden_size": int(feats.shape[-1])}


class _GridVisionGraph(torch.nn.Module):
    """Pixels and per-patch (row, col), window id and frame id in; merged image features out (see above)."""

    def __init__(self, tower: Any):
        super().__init__()
        self.tower = tower
        self.full = set(tower.fullatt_block_indexes)
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


def _export_embed(model: Any, target: Path) -> dict[str, Any]:
    """Token ids (+ image features) -> decoder input embeddings, with the family's embedding scale.

    The image features replace the rows of the image token, in order; a call without an image passes zero
    feature rows.
    """

    emb = model.get_input_embeddings()
    hidden = emb.weight.shape[1]
    image_token_id = _image_token_id(model.config)
    wrapper = _EmbedGraph(emb, image_token_id)
    ids = torch.tensor([[1, 2, image_token_id, image_token_id, 3]], dtype=torch.int64)
    feats = torch.randn(2, hidden)
    _torch_export(wrapper, (ids, feats), target, ["input_ids", "image_features"], ["inputs_embeds"],
                  dynamic={"input_ids": {0: "batch", 1: "sequence"}, "image_features": {0: "n_image_tokens"}})
    return {"file": EMBED, "exporter": f"torch.onnx (dynamo) {_version('torch')}",
            "image_token_id": image_token_id, "hidden_size": int(hidden)}


class _EmbedGraph(torch.nn.Module):
    def __init__(self, emb: Any, image_token_id: int):
        super().__init__()
        self.emb, self.image_token_id = emb, image_token_id

    def forward(self, input_ids, image_features):
        e = self.emb(input_ids)
        # gather-and-select rather than masked_scatter: exports to plain CumSum/Gather/Where
        flat = (input_ids == self.image_token_id).reshape(-1)
        n = image_features.shape[0]
        idx = torch.cumsum(flat.to(torch.int64), 0) - 1
        idx = torch.clamp(torch.where(flat, idx, n), max=n)
        table = torch.cat([image_features.to(e.dtype), torch.zeros_like(image_features[:1].expand(1, -1))])
        spliced = table[idx].reshape(e.shape)
        return torch.where(flat.reshape(input_ids.shape).unsqueeze(-1), spliced, e)


def _image_token_id(config: Any) -> int:
    for key in ("image_token_id", "image_token_index"):
        v = getattr(config, key, None)
        if v is not None:
            return int(v)
    raise ExportError("the model config names no image token (image_token_id / image_token_index); "
                      "the architecture entry must say where image features go")


def _torch_export(module: Any, args: tuple, target: Path, input_names: list[str], output_names: list[str],
                  dynamic: dict[str, dict[int, str]] | None = None, dynamic_shapes: Any = None) -> None:
    """torch.onnx.export (dynamo) at opset 23, saved with external data when large."""
    dyn = dynamic_shapes
    if dynamic:
        dyn = tuple({ax: torch.export.Dim.AUTO for ax in dynamic.get(n, {})} or None for n in input_names)
    try:
        prog = torch.onnx.export(module, args, input_names=input_names, output_names=output_names, dynamo=True,
                                 dynamic_shapes=dyn, opset_version=OPSET, optimize=True, verbose=False)
    except Exception as e:  # the exporter raises many types; name the graph and the first line of the reason
        raise ExportError(f"torch.onnx could not export {target.name} ({str(e).strip().splitlines()[0][:300]})") from e
    m = prog.model_proto
    if dynamic:  # readable names for the dynamic axes
        for vi in m.graph.input:
            for ax, name in dynamic.get(vi.name, {}).items():
                vi.type.tensor_type.shape.dim[ax].dim_param = name
    save_graph(m, target)


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


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"
