"""The decoder of an `export onnx` folder (``decoder.onnx``), by the route its architecture entry names
(``ONNXSpec.decoder``): onnxruntime-genai's model builder where it writes the decoder exactly, else torch.onnx on
transformers' own modules with the KV cache as explicit inputs and outputs (docs/onnx.md says why each)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
import torch

from edgemed.archs.base import ONNX_BUILDER_DECODERS, ArchSpec
from edgemed.errors import ExportError
from edgemed.export.onnx_graph import DECODER, OPSET, save_graph, torch_export, version
from edgemed.export.onnx_quant import convert_fp16, quantize_decoder_int8
from edgemed.export.onnx_vision import VisionGraph


def decoder_route(spec: ArchSpec, model_dir: Path) -> str:
    """The architecture entry's route for this model's decoder (``ONNXSpec.decoder``), checked before any weights
    load: the builder route also needs a text decoder the builder writes, and onnxruntime-genai installed."""
    from transformers import AutoConfig

    if spec.onnx.decoder != "builder":
        return spec.onnx.decoder
    text_cfg = spec.text_config(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    if _causal_lm_class(text_cfg) in ONNX_BUILDER_DECODERS:
        import importlib.util

        if importlib.util.find_spec("onnxruntime_genai") is None:
            raise ExportError("onnxruntime-genai is not installed; its model builder writes the ONNX decoder of "
                              f"{spec.name} models: run `pip install onnxruntime-genai`")
        return "builder"
    decoder = _causal_lm_class(text_cfg) or getattr(text_cfg, "model_type", "?")
    raise ExportError(f"{model_dir}: no ONNX exporter for the {spec.name} decoder ({decoder} in {spec.model_class}): "
                      "onnxruntime-genai's builder does not write it and it is not a cross-attention or M-RoPE "
                      "decoder; ONNX export supports Llama, Mistral, Qwen2 and Gemma 3 text decoders (alone or in "
                      "LLaVA and Gemma 3 image models), Llama 3.2 Vision and Qwen2.5-VL; use `edgemed export gguf` "
                      "if llama.cpp supports it")


def export_decoder(route: str, model: Any, spec: ArchSpec, tokenizer: Any, tmp: Path, work: Path, quant: str,
                   block_size: int, accuracy_level: int, image_inputs: dict[str, Any] | None) -> dict[str, Any]:
    """Write ``tmp/decoder.onnx`` by ``route`` at ``quant`` (int4 is applied later, on the fp32 graph); returns its
    manifest entry. ``work`` holds the builder's intermediate files."""
    if route == "builder":
        lm_class = _causal_lm_class(spec.text_config(model.config))
        info = _builder_decoder(model, spec, tokenizer, lm_class, tmp / DECODER, work, quant, block_size,
                                accuracy_level)
    else:
        info = _TORCH_DECODERS[route](model, spec, tmp / DECODER, image_inputs)
        if quant == "int8":
            quantize_decoder_int8(tmp / DECODER, block_size, accuracy_level)
    if quant == "fp16":
        convert_fp16(tmp / DECODER)
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
    vision = VisionGraph(model, spec, list(image_inputs))
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
    torch_export(_CrossDecoder(model, self_idx, len(layers)), args, target,
                  ["input_ids", "attention_mask", "position_ids", "cross_attention_states", "cross_attention_mask",
                   *(f"past_key_values.{n}" for n in kv)], ["logits", *(f"present.{n}" for n in kv)],
                  dynamic_shapes=dynamic)
    return {"exporter": f"torch.onnx (dynamo) {version('torch')} ({type(model).__name__})", "input": "input_ids",
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
    torch_export(_EmbedsDecoder(model, n, list(extra)), args, target,
                  ["inputs_embeds", "attention_mask", "position_ids", *extra, *(f"past_key_values.{k}" for k in kv)],
                  ["logits", *(f"present.{k}" for k in kv)], dynamic_shapes=dynamic)
    return {"exporter": f"torch.onnx (dynamo) {version('torch')} ({type(model).__name__})",
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
    if not spec.onnx.attn_softcapping and getattr(lm.config, "attn_logit_softcapping", None) is not None:
        lm.config.attn_logit_softcapping = None  # the builder applies it whenever set; this family's PyTorch does not
    lm.save_pretrained(out)
    return out


def _builder_decoder(model: Any, spec: ArchSpec, tokenizer: Any, lm_class: str, target: Path, work: Path,
                     quant: str, block_size: int, accuracy_level: int) -> dict[str, Any]:
    """The decoder through onnxruntime-genai's model builder, then rewritten to checker-valid standard ops."""
    hf = _text_causal_lm(model, spec, lm_class, work / "hf")
    tokenizer.save_pretrained(hf)
    built = work / "builder"
    extra = ["filename=model.onnx", "windowed_kv_cache=false"]  # one growing cache per layer, sliding or not
    if spec.is_vision:
        extra.append("exclude_embeds=true")  # inputs_embeds in: embed.onnx splices the image features
    # int8: the builder's own (RTN). int4: an fp32 graph here, quantised by onnx_quant (docs/onnx.md)
    precision = "int8" if quant == "int8" else "fp32"
    if quant == "int8":
        extra += [f"block_size={block_size}", f"accuracy_level={accuracy_level}"]
    _run_builder(spec, hf, built, precision, work / "cache", extra)
    algorithm = "rtn" if quant == "int8" else None
    _standardise(built / "model.onnx", target)
    text_cfg = spec.text_config(model.config)
    return {"exporter": f"onnxruntime-genai model builder {version('onnxruntime-genai')} ({lm_class})",
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
