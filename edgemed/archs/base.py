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

DECODER_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    image_wrap: tuple[str, str] = ("", "")  # text llama.cpp's mtmd puts around an image (HF renders it too)


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
    grid: GridSpec | None = None  # image-grid positions computed outside exported graphs (M-RoPE families)
    notes: tuple[str, ...] = field(default_factory=tuple)  # architecture details exports must honour
    dicom_render: str = "voi"  # how CT DICOM becomes RGB for this family (edgemed.dicom.RENDERS)

    @property
    def is_vision(self) -> bool:
        return self.vision is not None

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
