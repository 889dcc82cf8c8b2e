"""One int4 base and one onnxruntime LoRA adapter file per fine-tune, switched by onnxruntime-genai's ``og.Adapters``.

The int4 export of a LoRA merge already keeps the 4-bit base and the fine-tune's low-rank change apart
(``edgemed.export.onnx_quant``), with the change baked into the graph. Here the change moves out of the graph: every
4-bit decoder weight a fine-tune changes gets two graph inputs, ``WEIGHT.lora_A`` [K, rank] and ``WEIGHT.lora_B``
[rank, N], added to its output as ``(x @ A) @ B``; their default values are empty (rank 0), so the folder alone is
the base model. Each fine-tune's factors go into ``adapters/NAME.onnx_adapter`` (onnxruntime's ``AdapterFormat``), which
``og.Adapters(model).load(file, NAME)`` loads and ``generator.set_active_adapter(adapters, NAME)`` applies per
generator, the base held once. Measured against the int4 export of each merge in tests/test_onnx_genai.py.

The factors are those the int4 export finds (:func:`edgemed.export.onnx_quant.low_rank` of the merged fp32 decoder
minus the base's, weight by weight), kept in fp32: a run whose change is anything else (a trained norm, an
embedding, a full-rank change) cannot be an adapter file and is refused, naming the tensor.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgemed.artifacts import atomic_dir, read_manifest, tree_sha256, write_manifest
from edgemed.errors import ExportError
from edgemed.export.onnx_graph import DECODER, check_graph, save_graph

ADAPTERS = "adapters"  # the folder of the adapter files, NAME.onnx_adapter
SUFFIX = ".onnx_adapter"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def export_genai_adapters(merged: dict[str, Path | str], out: Path | str, *, overwrite: bool = False,
                          block_size: int = 32, accuracy_level: int = 4, max_rank: int = 64) -> Path:
    """Export one int4 base and an adapter file per fine-tune for onnxruntime-genai.

    Args:
        merged: adapter name -> an ``edgemed merge`` folder; every one must be a LoRA merge of the same base
            (its manifest names the base, which must still be there with the same sha256).
        out: the folder to write: an int4 `export onnx` folder of the base (``genai_config.json`` included) with
            ``adapters/NAME.onnx_adapter`` beside it; it must not exist unless ``overwrite``.
        overwrite: replace an existing ``out`` once the new folder is complete.
        block_size: int4 block size of the base.
        accuracy_level: MatMulNBits accuracy level of the base.
        max_rank: the largest rank a weight's change may have.

    Returns:
        The output folder.
    """
    from edgemed.export.onnx import export_onnx

    if not merged:
        raise ExportError("no fine-tunes given; pass at least one NAME=MERGED_DIR")
    for name in merged:
        if not _NAME.fullmatch(name):
            raise ExportError(f"adapter name {name!r}: use letters, digits, '.', '_' and '-' (at most 64, starting "
                              "with a letter or digit)")
    merged = {name: Path(p).absolute() for name, p in merged.items()}
    base = _common_base(merged)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp, \
            tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=tmp.parent) as work:
        work = Path(work)
        built = export_onnx(base, "int4", work / "base-int4", block_size=block_size, accuracy_level=accuracy_level)
        manifest = read_manifest(built, ("onnx",))
        genai = manifest["graphs"]["decoder"].get("genai") or {}
        if genai.get("config") is None:
            raise ExportError(f"{base}: onnxruntime-genai cannot open this model's export ({genai.get('reason')}), "
                              "so it cannot switch adapters on it either; use `edgemed export onnx` on each merged "
                              "folder")
        reference = _Weights(export_onnx(base, "fp32", work / "base-fp32") / DECODER)
        factors = {name: _run_factors(name, m, reference, export_onnx(m, "fp32", work / f"run-{name}") / DECODER,
                                      max_rank) for name, m in merged.items()}
        for p in built.iterdir():
            if p.name != "manifest.json":
                shutil.move(str(p), tmp / p.name)
        targets = {w: reference[w][0] for f in factors.values() for w in sorted(f)}  # weight -> its MatMul's name
        n_inputs = add_lora_inputs(tmp / DECODER, targets)
        check_graph(tmp / DECODER)
        (tmp / ADAPTERS).mkdir()
        entries = {name: _write_adapter(tmp / ADAPTERS / f"{name}{SUFFIX}", f, merged[name])
                   for name, f in factors.items()}
        graphs = manifest["graphs"]
        graphs["decoder"]["lora_inputs"] = {"weights": n_inputs, "names": "WEIGHT.lora_A [K, rank], "
                                            "WEIGHT.lora_B [rank, N]; empty by default (the base)"}
        write_manifest(tmp, "onnx", arch=manifest["arch"], quant="int4", options=manifest["options"], graphs=graphs,
                       parent=manifest["parent"], adapters=entries)
    return out.absolute()


def _common_base(merged: dict[str, Path]) -> Path:
    """The one base model every merge started from (sha256-checked), or an ExportError naming the odd one."""
    from edgemed.modeling import run_base

    bases = {}
    for name, folder in merged.items():
        manifest = read_manifest(folder, ("model",))
        if not (manifest.get("merge") or {}).get("lora_merged"):
            raise ExportError(f"{folder} ({name}): is not a LoRA merge (its manifest records no merged LoRA "
                              "weights); give `edgemed merge RUN_DIR` folders")
        bases[name] = run_base(folder, manifest).absolute()
    first = next(iter(bases.values()))
    odd = [f"{n}: {b}" for n, b in bases.items() if b != first]
    if odd:
        raise ExportError(f"the fine-tunes start from different base models ({first}; {', '.join(odd)}); adapters "
                          "share one base: export each group separately")
    from edgemed.archs import arch_for_dir

    spec = arch_for_dir(first)
    if spec.is_vision:
        raise ExportError(f"{first}: {spec.name} is an image model; onnxruntime-genai opens edgemed's text "
                          "decoders only (docs/onnx.md), so its adapters cannot be switched there")
    return first


class _Weights(dict):
    """Initializer name -> (the decoder projection's MatMul node that reads it, or "" for anything else: norms,
    embeddings, the LM head; its TensorProto) of a graph file; ``array(name)`` reads one weight's values, so a
    large decoder is compared weight by weight, never held whole."""

    def __init__(self, path: Path):
        from edgemed.export.onnx_quant import lm_head

        m = onnx.load(str(path), load_external_data=False)
        head = set(lm_head(m))
        readers = {n.input[1]: n.name for n in m.graph.node
                   if n.op_type == "MatMul" and len(n.input) == 2 and n.name not in head}
        super().__init__((t.name, (readers.get(t.name, ""), t)) for t in m.graph.initializer)
        self.base_dir = str(path.parent)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self[name][1], base_dir=self.base_dir)


def _run_factors(name: str, folder: Path, reference: _Weights, graph: Path, max_rank: int
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Weight name -> (A, B) low-rank factors of one merge's change from the base, its decoder graph against the
    base's; an ExportError for any change an adapter cannot carry."""
    from edgemed.export.onnx_quant import low_rank

    out = {}
    weights = _Weights(graph)
    for weight, (reader, proto) in weights.items():
        ref = reference.get(weight)
        if ref is None or list(ref[1].dims) != list(proto.dims):
            raise ExportError(f"{folder} ({name}): its decoder graph has {weight!r} where the base's has "
                              f"{'none' if ref is None else list(ref[1].dims)}; it was merged into another base")
        w, w_base = weights.array(weight), reference.array(weight)
        if np.array_equal(w_base, w):
            continue
        if not reader or w.ndim != 2:
            raise ExportError(f"{folder} ({name}): the fine-tune changes {weight!r}, which is not a decoder "
                              "projection; an adapter file carries low-rank changes of those only (trained norms, "
                              "embeddings or the LM head need the merged export: `edgemed export onnx` it)")
        factors = low_rank(w - w_base, max_rank)
        if factors is None:
            raise ExportError(f"{folder} ({name}): the change of {weight!r} is not of rank <= {max_rank} (not a "
                              "LoRA update); export the merged model with `edgemed export onnx`")
        out[weight] = factors
    if not out:
        raise ExportError(f"{folder} ({name}): its decoder equals the base's; the fine-tune changed nothing an "
                          "adapter would carry")
    return out


def add_lora_inputs(path: Path, weights: dict[str, str]) -> int:
    """Give the 4-bit ``MatMulNBits`` of the int4 decoder at ``path`` that stands for each of ``weights`` (fp32
    initializer name -> the name of the MatMul that read it, which the int4 rewrite keeps as its nodes' stem) the
    graph inputs ``WEIGHT.lora_A`` and ``WEIGHT.lora_B``, empty by default, added to its output; returns how many.
    An ExportError when a weight has no such node (a weight int4 left in fp32)."""
    m = onnx.load(str(path))
    nodes = {n.name: n for n in m.graph.node}
    by_output = {o: n for n in m.graph.node for o in n.output}
    added = []
    for weight, stem in weights.items():
        q4, add = nodes.get(f"{stem}.q4"), nodes.get(f"{stem}.q4.add")
        if q4 is None or add is None or by_output.get(add.output[0]) is not add:
            raise ExportError(f"{path.name}: the fine-tune changes {weight!r}, which the int4 base does not hold "
                              f"in 4 bits (no {stem}.q4 node); an adapter cannot be attached to it: export the "
                              "merged model with `edgemed export onnx`")
        attrs = {a.name: a.i for a in q4.attribute}
        a_name, b_name = f"{weight}.lora_A", f"{weight}.lora_B"
        m.graph.input.extend([
            helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [attrs["K"], "lora_rank"]),
            helper.make_tensor_value_info(b_name, TensorProto.FLOAT, ["lora_rank", attrs["N"]])])
        m.graph.initializer.extend([numpy_helper.from_array(np.zeros((attrs["K"], 0), np.float32), a_name),
                                    numpy_helper.from_array(np.zeros((0, attrs["N"]), np.float32), b_name)])
        out = add.output[0]
        add.output[0] = f"{stem}.lora.base"
        added += [helper.make_node("MatMul", [q4.input[0], a_name], [f"{stem}.lora.xa"], name=f"{stem}.lora.xa"),
                  helper.make_node("MatMul", [f"{stem}.lora.xa", b_name], [f"{stem}.lora.delta"],
                                   name=f"{stem}.lora.delta"),
                  helper.make_node("Add", [f"{stem}.lora.base", f"{stem}.lora.delta"], [out], name=f"{stem}.lora")]
    order = []  # each weight's three nodes right after its .q4.add, so the graph stays topologically sorted
    extra = {f"{stem}.q4.add": added[3 * i: 3 * i + 3] for i, stem in enumerate(weights.values())}
    for n in m.graph.node:
        order.append(n)
        order += extra.get(n.name, [])
    del m.graph.node[:]
    m.graph.node.extend(order)
    save_graph(m, path)
    return len(weights)


def _write_adapter(path: Path, factors: dict[str, tuple[np.ndarray, np.ndarray]], source: Path) -> dict[str, Any]:
    """``factors`` as an onnxruntime adapter file (``AdapterFormat``); returns its manifest entry."""
    import onnxruntime as ort

    from edgemed.artifacts import sha256_file

    params = {}
    for weight, (a, b) in factors.items():
        params[f"{weight}.lora_A"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, np.float32))
        params[f"{weight}.lora_B"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(b, np.float32))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    fmt.export_adapter(str(path))
    return {"file": f"{ADAPTERS}/{path.name}", "sha256": sha256_file(path), "weights": len(factors),
            "max_rank": max(a.shape[1] for a, _ in factors.values()),
            "merge": {"path": str(source), "tree_sha256": tree_sha256(source)}}
