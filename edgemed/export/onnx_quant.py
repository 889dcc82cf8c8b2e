"""4-bit weights with a float minimum per block, for onnxruntime: ``MatMulNBits`` plus a block-sum correction.

Why this exists beside onnxruntime's own quantisers (``MatMulNBitsQuantizer``, the genai builder's RTN and k-quant):
their 4-bit grid per block is ``scale * (q - zero_point)`` with an integer zero point, so the block's minimum is
rounded to a multiple of the scale. Weights that already lie on a 4-bit grid with a float minimum (llama.cpp's
Q4_1 and Q4_K, the usual way small models are distributed, and the embedded SmolLM2-135M) are then shifted by up to
half a step, every weight of a block the same way, and a 135M decoder loses a quarter of its top-1 agreement
(measured: 53-63% plain RTN, 72% k-quant with 8-bit mixed layers, against PyTorch). ``MatMulNBits`` accepts float
zero points, which fixes the grid, but onnxruntime's CPU kernel then falls off its fast path (1.8 tokens/s against
about 200). So the float part of the minimum is carried separately, with standard ops:

    W[k, n] ~= scale[b, n] * (q[k, n] - zp[b, n]) + rest[b, n]          (k in block b, q and zp in 0..15)
    x @ W    = MatMulNBits(x; q, scale, zp) + (x @ S) @ rest              (S[k, b] = 1 where k is in block b)

``scale = (max - min) / 15``, ``zp = round(-min / scale)`` clipped to 0..15 and ``rest = min + scale * zp`` (at most
half a step when the block spans zero), which reproduces a Q4_1-style grid exactly while the integer part stays in
the fast kernel (and int8 activations, accuracy level 4, see weights centred on zero). The correction is two small
MatMuls per weight: ``x @ S`` (``K x K/block``, shared by the weights reading the same input) and ``K/block x N``;
``rest`` adds a quarter to the 4-bit weight bytes in fp32 storage.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


def quantize_int4_min(model: Any, block_size: int, accuracy_level: int, exclude: set[str] | None = None
                      ) -> dict[str, int]:
    """Rewrite, in place, every ``MatMul`` by a constant 2-D fp32 weight as 4-bit ``MatMulNBits`` with a per-block
    minimum (module docstring). Weights whose input dimension is not a multiple of ``block_size`` and nodes named in
    ``exclude`` stay as they are. Returns counts: ``quantized``, ``skipped``.
    """
    exclude = exclude or set()
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    new_nodes, drop, added = [], set(), []
    block_sums: dict[str, str] = {}  # input tensor -> its block-sum tensor (q, k and v, gate and up share one)
    selectors: dict[int, str] = {}   # K -> the K x K/block selector initializer
    counts = {"quantized": 0, "skipped": 0}
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if (weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT
                or node.name in exclude):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(weight, base_dir="")
        k, n = w.shape
        if k % block_size:
            counts["skipped"] += 1
            new_nodes.append(node)
            continue
        packed, scales, zps, rest = _quantize(w, block_size)
        base = node.name or node.output[0]
        names = {s: f"{base}.q4.{s}" for s in ("B", "scales", "zero_points", "rest", "nbits", "correction")}
        added += [numpy_helper.from_array(packed, names["B"]), numpy_helper.from_array(scales, names["scales"]),
                  numpy_helper.from_array(zps, names["zero_points"]), numpy_helper.from_array(rest, names["rest"])]
        x = node.input[0]
        if x not in block_sums:
            if k not in selectors:
                selectors[k] = f"q4.block_selector.{k}x{k // block_size}"
                sel = np.kron(np.eye(k // block_size, dtype=np.float32), np.ones((block_size, 1), np.float32))
                added.append(numpy_helper.from_array(sel, selectors[k]))
            block_sums[x] = f"{x}.q4.block_sum"
            new_nodes.append(helper.make_node("MatMul", [x, selectors[k]], [block_sums[x]], name=f"{base}.q4.sum"))
        new_nodes += [
            helper.make_node("MatMulNBits", [x, names["B"], names["scales"], names["zero_points"]], [names["nbits"]],
                             name=f"{base}.q4", domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=block_size,
                             accuracy_level=accuracy_level),
            helper.make_node("MatMul", [block_sums[x], names["rest"]], [names["correction"]], name=f"{base}.q4.rest"),
            helper.make_node("Add", [names["nbits"], names["correction"]], list(node.output), name=f"{base}.q4.add"),
        ]
        consumers[weight.name] -= 1
        if not consumers[weight.name]:
            drop.add(weight.name)
        counts["quantized"] += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    kept = [t for t in model.graph.initializer if t.name not in drop]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + added)
    if counts["quantized"] and not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts


def _quantize(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """W [K, N] -> MatMulNBits B [N, K/bs, bs/2] (uint8, two 4-bit values a byte, low nibble first), scales
    [N, K/bs], packed zero points [N, ceil(K/bs / 2)], and the float rest of each block's minimum [K/bs, N]."""
    k, n = w.shape
    nb = k // block_size
    blocks = w.astype(np.float32).reshape(nb, block_size, n)
    lo, hi = blocks.min(1), blocks.max(1)                          # [nb, N]
    scale = (hi - lo) / 15
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)    # a constant block: q = 0, ``rest`` holds it
    q = np.clip(np.rint((blocks - lo[:, None]) / scale[:, None]), 0, 15).astype(np.uint8)  # [nb, bs, N]
    zp = np.clip(np.rint(-lo / scale), 0, 15).astype(np.uint8)    # [nb, N]
    rest = (lo + scale * zp).astype(np.float32)                   # so that scale * (q - zp) + rest = scale * q + lo
    q = q.transpose(2, 0, 1)                                       # [N, nb, bs]
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    zpt = zp.T                                                     # [N, nb]
    if nb % 2:
        zpt = np.concatenate([zpt, np.zeros((n, 1), np.uint8)], 1)
    zpacked = (zpt[:, 0::2] | (zpt[:, 1::2] << 4)).astype(np.uint8)
    return packed, scale.T.copy(), zpacked.reshape(-1), rest


def dequantize(packed: np.ndarray, scales: np.ndarray, zps: np.ndarray, rest: np.ndarray, block_size: int
               ) -> np.ndarray:
    """The weights [K, N] that :func:`_quantize`'s outputs stand for (tests compare onnxruntime against this)."""
    n, nb, _ = packed.shape
    q = np.stack([packed & 15, packed >> 4], -1).reshape(n, nb, block_size).astype(np.float32)
    zp = np.stack([zps.reshape(n, -1) & 15, zps.reshape(n, -1) >> 4], -1).reshape(n, -1)[:, :nb].astype(np.float32)
    w = (q - zp[..., None]) * scales[..., None] + rest.T[..., None]
    return w.reshape(n, nb * block_size).T


def quantize_head_int8(model: Any, head: str, accuracy_level: int, block_size: int = 32) -> tuple[Any, bool]:
    """The LM head to 8-bit ``MatMulNBits`` in llama.cpp's Q8_0 layout (symmetric blocks of 32, ``d = max|w| /
    127``), and an embedding tied to it (``Transpose -> Gather`` of the same weight) to ``GatherBlockQuantized``
    over the same bytes, as the genai builder lays it out. Written here rather than with onnxruntime's quantiser
    because that one scales by ``max|w| / 128`` (a Q8_0 head, SmolLM2's, is then rounded a second time) and
    quantises Gathers to 4 bits only. A head whose input width is not a multiple of ``block_size`` stays fp32.
    Returns the model and whether an embedding was tied to the head."""
    producer = {o: n for n in model.graph.node for o in n.output}
    head_node = next(n for n in model.graph.node if n.name == head)
    weight = head_node.input[1]
    inits = {t.name: t for t in model.graph.initializer}
    w = numpy_helper.to_array(inits[weight], base_dir="")
    k, n_out = w.shape
    if k % block_size:
        return model, False
    nb = k // block_size
    blocks = w.astype(np.float32).T.reshape(n_out, nb, block_size)
    scale = np.abs(blocks).max(-1) / 127
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = (np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128).astype(np.uint8)  # MatMulNBits' zero point
    tied = {g.output[0]: g for g in model.graph.node
            if g.op_type == "Gather" and g.input[0] in producer and producer[g.input[0]].op_type == "Transpose"
            and producer[g.input[0]].input[0] == weight}
    transposes = {producer[g.input[0]].output[0] for g in tied.values()}
    names = {s: f"{head}.q8.{s}" for s in ("B", "scales", "table", "table_scales", "zero_points", "shape",
                                             "scale_shape")}
    new_inits = [numpy_helper.from_array(q, names["B"]), numpy_helper.from_array(scale, names["scales"])]
    shared = []  # the embedding's view of the head's bytes, emitted once where the first tied Gather was
    if tied:
        new_inits += [numpy_helper.from_array(np.array([n_out, k], np.int64), names["shape"]),
                      numpy_helper.from_array(np.array([n_out, nb], np.int64), names["scale_shape"]),
                      numpy_helper.from_array(np.full((n_out, nb), 128, np.uint8), names["zero_points"])]
        shared = [helper.make_node("Reshape", [names["B"], names["shape"]], [names["table"]], name=f"{head}.q8.view"),
                  helper.make_node("Reshape", [names["scales"], names["scale_shape"]], [names["table_scales"]],
                                   name=f"{head}.q8.scale_view")]
    nodes = []
    for node in model.graph.node:  # rewritten in place: the graph stays in topological order
        if node.name == head:
            nodes.append(helper.make_node("MatMulNBits", [node.input[0], names["B"], names["scales"]],
                                          list(node.output), name=f"{head}.q8", domain=MS_DOMAIN, K=k, N=n_out, bits=8,
                                          block_size=block_size, accuracy_level=accuracy_level))
        elif node.output[0] in transposes:
            continue
        elif node.output[0] in tied:
            nodes += shared + [helper.make_node(
                "GatherBlockQuantized", [names["table"], node.input[1], names["table_scales"], names["zero_points"]],
                list(node.output), name=f"{node.name}.q8", domain=MS_DOMAIN, bits=8, block_size=block_size,
                gather_axis=0, quantize_axis=1)]
            shared = []
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]  # the fp32 head weight goes
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_inits)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model, bool(tied)
