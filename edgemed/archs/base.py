"""What edgemed needs to know about one model family, declared as data.

Each module in ``edgemed.archs`` builds one :class:`ArchSpec`. Code elsewhere asks the spec (where the vision
tower sits, which modules LoRA targets, the GGUF architecture name) and never tests ``model_type`` itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemed.errors import ArchError

# checkpoint key prefix -> (part, canonical prefix) of transformers' language_model / vision_tower /
# multi_modal_projector layout, legacy (hub) and transformers 5 spellings alike: LLaVA-1.5 and Gemma 3 (MedGemma)
TOWER_PROJECTOR_PREFIXES = (
    ("language_model.model.", "text", "model."),
    ("language_model.lm_head.", "text", "lm_head."),
    ("model.language_model.", "text", "model."),
    ("lm_head.", "text", "lm_head."),
    ("vision_tower.vision_model.", "vision", "vision_tower.vision_model."),
    ("model.vision_tower.vision_model.", "vision", "vision_tower.vision_model."),
    ("vision_tower.", "vision", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision", "vision_tower.vision_model."),
    ("multi_modal_projector.", "projector", "multi_modal_projector."),
    ("model.multi_modal_projector.", "projector", "multi_modal_projector."),
)
DECODER_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# causal-LM classes onnxruntime-genai's model builder writes and that pass parity here (the class of a family's
# text decoder, ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text_config.model_type]``)
ONNX_BUILDER_DECODERS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM")
# how `export onnx` writes a decoder: onnxruntime-genai's builder, or torch.onnx on transformers' modules for
# decoders the builder cannot write exactly (see ONNXSpec.decoder)
ONNX_DECODERS = ("builder", "cross", "token_types", "grid")


@dataclass(frozen=True)
class GGUFSpec:
    """How a family's checkpoint becomes llama.cpp files: data read by ``edgemed.export.gguf``.

    ``key_prefixes`` sorts checkpoint tensor names into parts and rewrites them to the names gguf-py's
    ``TensorNameMap`` knows: ``(checkpoint prefix, part, new prefix)``, part one of text, vision, projector or
    skip; the first matching prefix wins. ``tensor_names`` names what that map lacks (name without
    .weight/.bias -> GGUF name). ``skip`` lists rewritten names (regex, full match) that are not exported.
    """

    key_prefixes: tuple[tuple[str, str, str], ...]
    tensor_names: dict[str, str] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    permute_qk: bool = False  # HF rotate-half Q/K rows -> llama.cpp's interleaved rope (Llama)
    norm_plus_one: tuple[str, ...] = ()  # GGUF names (regex) whose weights are stored as w - 1 in HF (Gemma)
    transforms: tuple[tuple[str, Callable[[Any], Any]], ...] = ()  # (GGUF name regex, numpy array -> array)
    # (rewritten-name regex, fn(name, array) -> [(rewritten name, array part), ...]): one checkpoint tensor becomes
    # several (fused qkv, a Conv3d patch embedding split per frame); the parts are then named as any other
    splits: tuple[tuple[str, Callable[[str, Any], list[tuple[str, Any]]]], ...] = ()
    text_kv: Callable[[Any], dict[str, Any]] | None = None  # extra text-model keys ("{arch}" is filled in)
    mmproj_kv: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None  # (config, processor cfg) -> keys
    # (processor output without rescale and normalisation, image processor) -> the resized image [C, H, W], for a
    # processor whose pixel_values are not images (Qwen's flat patches); None: pixel_values[0]. The llama.cpp
    # backend gives mtmd these pixels, so mtmd's own resize cannot differ from the processor's
    # (edgemed.backends.mtmd_images)
    processor_pixels: Callable[[Any, Any], Any] | None = None
    # image processor -> (min, max) image tokens mtmd may make of one image; None: mtmd's own bounds
    mtmd_tokens: Callable[[Any], tuple[int, int]] | None = None
    image_wrap: tuple[str, str] = ("", "")  # text llama.cpp's mtmd puts around an image (HF renders it too)
    vision_block_key: str = "num_hidden_layers"  # vision config attribute: number of tower blocks
    vision_head_key: str = "num_attention_heads"  # vision config attribute: attention heads per block


@dataclass(frozen=True)
class GridSpec:
    """Position inputs a family computes from the processor's image grid (``image_grid_thw``) outside the exported
    graphs, because their shapes depend on the image (Qwen2.5-VL's windows and M-RoPE): read by
    ``edgemed.export.onnx`` (which graphs take them) and ``edgemed.backends.onnx`` (which computes them).

    Both are numpy functions of ``config``, the model's config as a dict (``PretrainedConfig.to_dict()``, class
    defaults filled in): ``vision_inputs(grid, config)`` -> {name: array} fed to the vision graph beside the
    pixels; ``rope_index(ids, grid, config)`` -> (positions [3, len(ids)] int64, delta): the 3-D rotary positions
    of a prompt, and what later positions add to their index.
    """

    vision_inputs: Callable[[Any, dict[str, Any]], dict[str, Any]]
    rope_index: Callable[[list[int], Any, dict[str, Any]], tuple[Any, int]]
    # vision_graph(tower) -> torch module (pixel_values, *vision_inputs) -> merged image features: the tower's own
    # modules, masked instead of split at the grid's boundaries; its ``patches_per_token`` patches make one feature
    vision_graph: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class ONNXSpec:
    """How a family's model becomes onnxruntime graphs: data read by ``edgemed.export.onnx``.

    ``decoder`` is the route (one of ``ONNX_DECODERS``): "builder" (onnxruntime-genai, for a text decoder in
    ``ONNX_BUILDER_DECODERS``, alone or in an image model), "cross" (image features enter by cross-attention),
    "token_types" (token types change the attention mask: the builder's causal attention cannot express it) or
    "grid" (3-D rotary positions from the image grid, with ``ArchSpec.grid``).
    """

    decoder: str = "builder"
    vision_inputs: tuple[str, ...] = ("pixel_values",)  # processor outputs the vision graph takes
    # the model's get_image_features gives projected image features; False: run the vision tower, then the projector
    image_features: bool = True
    # transformers applies config.attn_logit_softcapping (Gemma 2 does; Gemma 3 keeps the field and ignores it);
    # False: the builder, which applies it whenever the config sets it, is given a config without it
    attn_softcapping: bool = True

    def __post_init__(self):
        if self.decoder not in ONNX_DECODERS:
            raise ValueError(f"ONNXSpec.decoder {self.decoder!r}: choose one of {', '.join(ONNX_DECODERS)}")


@dataclass(frozen=True)
class ArchSpec:
    """One model family.

    Module paths are those of the transformers 5 module tree (``model.named_modules()``), not of the
    checkpoint's tensor names.
    """

    name: str  # registry key and the name users write in recipes
    family: str  # what a person calls it
    model_types: tuple[str, ...]  # config.model_type values this entry serves
    model_class: str  # transformers class that loads the full model
    real_model_ids: tuple[str, ...]  # the public checkpoints this entry is written for
    decoder: str  # module path of the text decoder stack (holds .layers)
    lm_head: str = "lm_head"
    vision: str | None = None  # module path of the vision tower, None for text models
    projector: str | None = None  # module path of the vision-to-text projector
    decoder_lora: tuple[str, ...] = DECODER_LORA  # leaf names LoRA targets inside decoder layers
    vision_lora: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")  # leaf names inside the vision tower
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm", "norm")  # decoder norm leaf names
    vision_norms: tuple[str, ...] = ("layer_norm1", "layer_norm2", "post_layernorm", "pre_layrnorm")
    image_placeholder: str | None = None  # text the processor expands into image tokens
    gguf_arch: str | None = None  # llama.cpp architecture of the text model; None: no llama.cpp support
    gguf_projector: str | None = None  # llama.cpp clip projector type for the mmproj file
    no_gguf_reason: str = ""  # said when gguf_arch is None
    gguf: GGUFSpec | None = None  # tensor names and metadata for `export gguf`; None: no llama.cpp support
    text_config: Callable[[Any], Any] = lambda config: config  # the text decoder's config
    build_tiny: Callable[[Path, int], Path] | None = None  # writes a tiny random-weight model folder
    prepare: Callable[[], None] | None = None  # run by arch_for_dir before a folder is loaded (registers classes)
    # loads the processor from a folder where AutoProcessor cannot (None: AutoProcessor)
    load_processor: Callable[[Path], Any] | None = None
    grid: GridSpec | None = None  # image-grid positions computed outside exported graphs (M-RoPE families)
    onnx: ONNXSpec = field(default_factory=ONNXSpec)  # how `export onnx` writes this family
    # config attribute holding the id the image placeholder expands into (the rows image features replace)
    image_token_key: str = "image_token_id"
    notes: tuple[str, ...] = field(default_factory=tuple)  # architecture details exports must honour
    dicom_render: str = "voi"  # how CT DICOM becomes RGB for this family (edgemed.dicom.RENDERS)

    @property
    def is_vision(self) -> bool:
        return self.vision is not None

    def image_token_id(self, config: Any) -> int:
        """Id of the token whose embedding rows the image features replace: what the processor expands
        ``image_placeholder`` into (Gemma 3: <image_soft_token>, not <start_of_image>), read from the model config."""
        v = getattr(config, self.image_token_key, None)
        if v is None:
            raise ArchError(f"the {self.name} model config has no {self.image_token_key}; the architecture entry's "
                            "image_token_key must name the config attribute that holds the image token id")
        return int(v)

    def placeholder_id(self, tokenizer: Any) -> int | None:
        """Id of ``image_placeholder``, the one token a rendered prompt holds per image before the processor
        expands it (None for text models)."""
        if not self.image_placeholder:
            return None
        return int(tokenizer.convert_tokens_to_ids(self.image_placeholder))

    def decoder_lora_regex(self, targets: tuple[str, ...] | None = None) -> str:
        """Full-match regex over module names: LoRA targets inside the text decoder's layers only."""
        leaves = "|".join(re.escape(t) for t in (targets or self.decoder_lora))
        return rf"{re.escape(self.decoder)}\.layers\.\d+\.(?:[\w.]+\.)?(?:{leaves})"

    def vision_lora_regex(self, targets: tuple[str, ...] | None = None) -> str:
        """Full-match regex over module names: LoRA targets inside the vision tower."""
        if self.vision is None:
            raise ValueError(f"{self.name} has no vision tower")
        leaves = "|".join(re.escape(t) for t in (targets or self.vision_lora))
        return rf"{re.escape(self.vision)}\.(?:[\w.]+\.)?(?:{leaves})"

    def part_of(self, param_name: str) -> str:
        """Which part a parameter belongs to: vision, projector, decoder, lm_head or other.

        The projector is tested first because it may sit inside the vision module (Qwen2.5-VL's merger).
        """
        for part, prefix in (("projector", self.projector), ("vision", self.vision), ("decoder", self.decoder),
                             ("lm_head", self.lm_head)):
            if prefix and (param_name == prefix or param_name.startswith(prefix + ".")):
                return part
        return "other"

    def is_decoder_norm(self, param_name: str) -> bool:
        """True for the weights and biases of the text decoder's norm layers."""
        if self.part_of(param_name) != "decoder":
            return False
        leaf = param_name.rsplit(".", 2)[-2] if param_name.count(".") >= 1 else param_name
        return leaf in self.norms
