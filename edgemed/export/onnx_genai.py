"""``genai_config.json`` for an `export onnx` folder, so that onnxruntime-genai opens it (``og.Model(folder)``).

onnxruntime-genai reads a folder by that file: which graph is the decoder, the names of its inputs and outputs, the
KV cache's layout, the token ids that end an answer and the default search. Its own model builder writes one beside
the decoders it builds; edgemed rewrites those decoders (``decoder.onnx``, standard RMSNormalization, its own int4),
so the file is written here, from the exported graph's real input and output names (read with onnx) and the model
config saved in the folder. The tokenizer files genai reads (``tokenizer.json``, ``tokenizer_config.json``) are the
ones the export copies anyway.

Only a graph genai runs as it is gets a config: a text decoder on token ids with genai's KV-cache names. Image models
get none, with the reason in the manifest (docs/onnx.md, "onnxruntime-genai"): a config that opens but answers
differently from the graphs edgemed checks would be worse than none.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import onnx

from edgemed.archs.base import ArchSpec
from edgemed.export.onnx_graph import version

GENAI_CONFIG = "genai_config.json"
# causal-LM class of a builder-written text decoder -> onnxruntime-genai's model type, as its builder names them
GENAI_TYPES = {
    "LlamaForCausalLM": "llama",  # Llama 3.x, SmolLM2
    "MistralForCausalLM": "mistral",  # Mistral
    "Qwen2ForCausalLM": "qwen2",  # Qwen2.5
    "Gemma3ForCausalLM": "gemma3_text",  # Gemma 3 1B, MedGemma 27B text
}
# why an image model's folder gets no config, by its decoder route (ONNXSpec.decoder)
_IMAGE_REASONS = {
    "builder": "onnxruntime-genai has no pipeline for this layout (a LLaVA-style vision.onnx + embed.onnx + a decoder "
               "on inputs_embeds); its image model types (phi3v, gemma3, qwen2_5_vl, ...) each expect their own "
               "vision, embedding and processor files",
    "token_types": "the decoder takes token_type_ids and position_ids beside inputs_embeds (image tokens attend to "
                   "their whole image), which onnxruntime-genai's gemma3 pipeline does not feed; its causal decoder "
                   "gave 0.11 relative logit error on image prompts of the tiny Gemma 3 (docs/onnx.md)",
    "grid": "the decoder takes 3-D M-RoPE position_ids and the one vision.onnx takes window and rotary inputs that "
            "edgemed computes outside the graph; onnxruntime-genai's qwen2_5_vl pipeline expects three vision "
            "graphs (patch_embed, vision_attn, patch_merger) and computes its own",
    "cross": "onnxruntime-genai has no cross-attention (Llama 3.2 Vision) model type",
}
_KV = re.compile(r"(past_key_values|present)\.(\d+)\.(key|value)")


def write_genai_config(folder: Path, spec: ArchSpec, decoder: dict[str, Any]) -> dict[str, Any]:
    """Write ``folder/genai_config.json`` for the export's decoder when onnxruntime-genai can run it.

    Args:
        folder: the export folder, already holding the final ``decoder.onnx`` and the model's config and
            tokenizer files.
        spec: the architecture entry.
        decoder: the decoder's manifest entry (``graphs["decoder"]``).

    Returns:
        The manifest entry: ``{"config": "genai_config.json", "type": ...}`` or ``{"config": None, "reason": ...}``.
    """
    io = _unsupported(folder, spec, decoder)
    config = genai_config(folder, spec, decoder["file"], io) if isinstance(io, dict) else None
    if config is None:
        (folder / GENAI_CONFIG).unlink(missing_ok=True)  # one the source folder held would describe other graphs
        return {"config": None, "reason": io if isinstance(io, str) else f"no {GENAI_CONFIG}: the model has no "
                "end-of-sequence token (generation_config.json, the tokenizer or the chat template)"}
    (folder / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n")
    return {"config": GENAI_CONFIG, "type": config["model"]["type"],
            "written_for": f"onnxruntime-genai {version('onnxruntime-genai')}"}


def _unsupported(folder: Path, spec: ArchSpec, decoder: dict[str, Any]) -> str | dict[str, Any]:
    """Why onnxruntime-genai cannot run this export as it is, or the decoder graph's I/O (see :func:`graph_io`)."""
    if spec.is_vision:
        return (f"no {GENAI_CONFIG}: {spec.name} is an image model; "
                f"{_IMAGE_REASONS.get(spec.onnx.decoder, 'onnxruntime-genai has no pipeline for its graphs')}")
    lm_class = _text_config(folder, spec).get("architectures", [None])[0]
    if lm_class not in GENAI_TYPES:
        return f"no {GENAI_CONFIG}: onnxruntime-genai has no model type for the {lm_class} decoder"
    io = graph_io(folder / decoder["file"])
    if io["other_inputs"] or io["other_outputs"]:
        return (f"no {GENAI_CONFIG}: the decoder has inputs or outputs onnxruntime-genai does not feed or read "
                f"({', '.join(io['other_inputs'] + io['other_outputs'])})")
    return io


def graph_io(path: Path) -> dict[str, Any]:
    """The decoder graph's inputs and outputs as onnxruntime-genai names them: the token input, attention mask,
    KV-cache name patterns and layer count, the cache's KV heads, the vocabulary (logits' last axis), the attention
    heads of its GroupQueryAttention nodes, and anything else (``other_inputs``, ``other_outputs``)."""
    m = onnx.load(str(path), load_external_data=False)
    inputs = {v.name: v for v in m.graph.input}
    outputs = {v.name: v for v in m.graph.output}
    io: dict[str, Any] = {"inputs": {}, "outputs": {}, "other_inputs": [], "other_outputs": []}
    layers: dict[str, set[int]] = {"past_key_values": set(), "present": set()}
    for names, known, side, other in ((inputs, ("input_ids", "attention_mask", "position_ids"), "inputs",
                                       "other_inputs"), (outputs, ("logits",), "outputs", "other_outputs")):
        for name in names:
            kv = _KV.fullmatch(name)
            if kv:
                layers[kv.group(1)].add(int(kv.group(2)))
            elif name in known:
                io[side][name] = name
            else:
                io[other].append(name)
    for req, side, other in (("input_ids", "inputs", "other_inputs"), ("attention_mask", "inputs", "other_inputs"),
                             ("logits", "outputs", "other_outputs")):
        if req not in io[side]:
            io[other].append(f"no {req}")
    n = len(layers["past_key_values"])
    if layers["past_key_values"] != set(range(n)) or layers["present"] != set(range(n)) or not n:
        io["other_inputs"].append("a KV cache that is not past_key_values.N.key/value -> present.N.key/value")
        return io
    io["inputs"].update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    io["outputs"].update(present_key_names="present.%d.key", present_value_names="present.%d.value")
    io["num_layers"] = n
    io["kv_heads"] = _dim(inputs["past_key_values.0.key"], 1)
    io["vocab_size"] = _dim(outputs["logits"], -1) if "logits" in outputs else None
    gqa = [node for node in m.graph.node if node.op_type == "GroupQueryAttention"]
    io["gqa"] = bool(gqa)
    io["num_heads"] = next((onnx.helper.get_attribute_value(a) for a in gqa[0].attribute if a.name == "num_heads"),
                           None) if gqa else None
    return io


def _dim(value: Any, axis: int) -> int | None:
    d = value.type.tensor_type.shape.dim[axis]
    return d.dim_value if d.HasField("dim_value") else None


def _text_config(folder: Path, spec: ArchSpec) -> dict[str, Any]:
    """The text decoder's config as a dict, class defaults filled in, from the export folder's config.json."""
    from transformers import AutoConfig

    cfg = spec.text_config(AutoConfig.from_pretrained(folder, local_files_only=True))
    out = cfg.to_dict()
    out["architectures"] = out.get("architectures") or [spec.model_class]
    out["head_dim"] = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return out


def genai_config(folder: Path, spec: ArchSpec, filename: str, io: dict[str, Any]) -> dict[str, Any] | None:
    """The ``genai_config.json`` content for the decoder graph ``filename`` with inputs and outputs ``io``
    (:func:`graph_io`), in the layout of onnxruntime-genai's builder (``make_genai_config``); None for a model with
    no end-of-sequence token, which genai needs."""
    cfg = _text_config(folder, spec)
    bos, eos, pad = _token_ids(folder, spec, cfg)
    if not eos:
        return None
    context = int(cfg.get("max_position_embeddings") or 4096)
    gen = _generation(folder)
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": int(cfg["head_dim"]),
                "hidden_size": int(cfg["hidden_size"]),
                "inputs": io["inputs"],
                "outputs": io["outputs"],
                "num_attention_heads": int(io["num_heads"] or cfg["num_attention_heads"]),
                "num_hidden_layers": io["num_layers"],
                "num_key_value_heads": int(io["kv_heads"] or cfg.get("num_key_value_heads")
                                           or cfg["num_attention_heads"]),
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": pad,
            "type": GENAI_TYPES[cfg["architectures"][0]],
            "vocab_size": int(io["vocab_size"] or cfg["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,  # greedy, as every edgemed runtime by default; sampling is the caller's choice
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # the builder's GroupQueryAttention reads a cache of max_length that it writes in place
            "past_present_share_buffer": io["gqa"],
            "repetition_penalty": float(gen.get("repetition_penalty") or 1.0),
            "temperature": float(gen.get("temperature") or 1.0),
            "top_k": int(gen.get("top_k") or 50),
            "top_p": float(gen.get("top_p") or 1.0),
        },
    }


def _generation(folder: Path) -> dict[str, Any]:
    p = folder / "generation_config.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _token_ids(folder: Path, spec: ArchSpec, cfg: dict[str, Any]) -> tuple[int, list[int], int]:
    """(bos, eos ids, pad): the eos ids are the ones edgemed's runtimes stop on (the generation settings' list,
    the tokenizer's eos and the chat template's end of turn), so genai ends an answer where they do."""
    from edgemed import prompting
    from edgemed.modeling import generation_eos, load_processor

    processor, tok = load_processor(folder, spec, vision=False)
    eos: list[int] = []
    for i in (*generation_eos(folder), tok.eos_token_id, prompting.end_of_turn(processor, tok, typed=False)):
        if i is not None and int(i) not in eos:
            eos.append(int(i))
    bos = next((int(v) for v in (cfg.get("bos_token_id"), tok.bos_token_id, *eos) if v is not None), 0)
    pad = next((int(v) for v in (cfg.get("pad_token_id"), tok.pad_token_id, *eos) if v is not None), 0)
    return bos, eos, pad
