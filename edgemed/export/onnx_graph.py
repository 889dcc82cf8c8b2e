"""What every `export onnx` graph goes through: torch.onnx's exporter, saving beside external data, the checker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from edgemed.errors import ExportError

DECODER, EMBED, VISION = "decoder.onnx", "embed.onnx", "vision.onnx"
OPSET = 23  # RMSNormalization


def torch_export(module: Any, args: tuple, target: Path, input_names: list[str], output_names: list[str],
                 dynamic: dict[str, dict[int, str]] | None = None, dynamic_shapes: Any = None) -> None:
    """torch.onnx.export (dynamo) at opset 23, saved with external data when large."""
    import torch

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


def check_graph(path: Path) -> None:
    """``onnx.checker`` on a graph file (external data read from beside it); an ExportError names the file."""

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise ExportError(f"{path.name}: onnx.checker rejects the exported graph ({first})") from e


def version(dist: str) -> str:
    """An installed distribution's version, "?" when absent (recorded as each graph's exporter)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"
