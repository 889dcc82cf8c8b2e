"""The image half of an `export onnx` folder: ``vision.onnx`` (vision tower + projector) and ``embed.onnx`` (the
token embedding with the image features spliced in), both through torch.onnx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgemed.archs.base import ArchSpec
from edgemed.export.onnx_graph import EMBED, VISION, torch_export, version

# keys of a processor's output that are not image inputs of the model
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def example_image_inputs(processor: Any, spec: ArchSpec) -> dict[str, Any]:
    """The image inputs the processor makes for one image, as the runtime will feed them to vision.onnx."""
    import numpy as np
    from PIL import Image

    img = Image.fromarray((np.random.default_rng(0).random((96, 80, 3)) * 255).astype("uint8"))
    enc = processor(text=[spec.image_placeholder or ""], images=[img], return_tensors="pt", add_special_tokens=False)
    return {k: v for k, v in enc.items() if k not in TEXT_KEYS}


def export_vision(model: Any, spec: ArchSpec, image_inputs: dict[str, Any], target: Path) -> dict[str, Any]:
    """Image inputs -> projected image features [n_image_tokens, hidden], as the decoder consumes them."""
    if spec.grid is not None:
        return export_grid_vision(model, spec, image_inputs, target)
    wrapper = VisionGraph(model, spec, list(image_inputs))
    names = wrapper.names
    args = tuple(image_inputs[n] for n in names)
    with torch.no_grad():
        feats = wrapper(*args)
    torch_export(wrapper, args, target, names, ["image_features"])
    return {"file": VISION, "exporter": f"torch.onnx (dynamo) {version('torch')}", "inputs": names,
            "input_shapes": {n: list(image_inputs[n].shape) for n in names}, "n_image_tokens": int(feats.shape[0]),
            "hidden_size": int(feats.shape[-1])}


class VisionGraph(torch.nn.Module):
    """The model's own ``get_image_features`` (or, where the family has none, its vision tower then projector),
    flattened to [n_image_tokens, hidden]. Takes the processor outputs the family names (``ONNXSpec.vision_inputs``),
    in the processor's order."""

    def __init__(self, model: Any, spec: ArchSpec, names: list[str]):
        super().__init__()
        self.model = model
        self.fn = model.get_image_features if spec.onnx.image_features else model.get_submodule(spec.vision)
        self.projector = None if spec.onnx.image_features else model.get_submodule(spec.projector)
        self.names = [n for n in names if n in spec.onnx.vision_inputs]

    def forward(self, *args):
        out = self.fn(**dict(zip(self.names, args, strict=True)))
        if self.projector is not None:
            out = self.projector(out[0] if isinstance(out, tuple) else out.last_hidden_state)
        elif hasattr(out, "pooler_output"):
            out = out.pooler_output
        if isinstance(out, list | tuple):
            out = torch.cat([f.reshape(-1, f.shape[-1]) for f in out])
        return out.reshape(-1, out.shape[-1])


def export_grid_vision(model: Any, spec: ArchSpec, image_inputs: dict[str, Any], target: Path) -> dict[str, Any]:
    """The vision tower and merger of a family whose patch layout depends on the image grid (Qwen2.5-VL).

    The architecture entry's ``grid.vision_inputs`` computes per-patch positions outside the graph (numpy, in the
    runtime) and its ``grid.vision_graph`` runs the tower on them with masked attention, for any number of patches.
    """
    grid_inputs = spec.grid.vision_inputs(image_inputs["image_grid_thw"].numpy(), model.config.to_dict())
    names = ["pixel_values", *grid_inputs]
    args = (image_inputs["pixel_values"].to(torch.float32), *(torch.from_numpy(v) for v in grid_inputs.values()))
    wrapper = spec.grid.vision_graph(model.get_submodule(spec.vision))
    with torch.no_grad():
        feats = wrapper(*args)
    patches = wrapper.patches_per_token * torch.export.Dim("n_image_tokens")
    torch_export(wrapper, args, target, names, ["image_features"], dynamic_shapes=tuple({0: patches} for _ in args))
    return {"file": VISION, "exporter": f"torch.onnx (dynamo) {version('torch')}", "inputs": names,
            "grid_inputs": list(grid_inputs), "hidden_size": int(feats.shape[-1])}


def export_embed(model: Any, spec: ArchSpec, target: Path) -> dict[str, Any]:
    """Token ids (+ image features) -> decoder input embeddings, with the family's embedding scale.

    The image features replace the rows of the image token (``ArchSpec.image_token_id``), in order; a call
    without an image passes zero feature rows.
    """

    emb = model.get_input_embeddings()
    hidden = emb.weight.shape[1]
    image_token_id = spec.image_token_id(model.config)
    wrapper = _EmbedGraph(emb, image_token_id)
    ids = torch.tensor([[1, 2, image_token_id, image_token_id, 3]], dtype=torch.int64)
    feats = torch.randn(2, hidden)
    torch_export(wrapper, (ids, feats), target, ["input_ids", "image_features"], ["inputs_embeds"],
                 dynamic={"input_ids": {0: "batch", 1: "sequence"}, "image_features": {0: "n_image_tokens"}})
    return {"file": EMBED, "exporter": f"torch.onnx (dynamo) {version('torch')}",
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
