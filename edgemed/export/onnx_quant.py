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
half a step when the block spans zero), which reproduces a Q4_1-style grid while the integer part stays in the fast
kernel (and int8 activations, accuracy level 4, see weights centred on zero). The correction is two small
MatMuls per weight, themselves 8-bit ``MatMulNBits`` in llama.cpp's Q8_0 layout (fp32 measured no better on
parity, at four times the bytes): ``x @ S`` (``K x K/block``, shared by the weights reading the same input) and
``K/block x N``.

The ``quantize_*`` and ``convert_fp16`` functions at the end are the steps `export onnx` runs on graph files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgemed.export.onnx_graph import save_graph

MS_DOMAIN = "com.microsoft"


def quantize_int4_min(model: Any, block_size: int, accuracy_level: int, exclude: set[str] | None = None,
                      base: Callable[[str], np.ndarray | None] | None = None, max_rank: int = 64,
                      importance: Callable[[str, np.ndarray], np.ndarray | None] | None = None,
                      bits: Callable[[str, np.ndarray, str], int] | None = None) -> dict[str, int]:
    """Rewrite, in place, every ``MatMul`` by a constant 2-D fp32 weight as 4-bit ``MatMulNBits`` with a per-block
    minimum (module docstring). Weights whose input dimension is not a multiple of ``block_size`` and nodes named in
    ``exclude`` stay as they are.

    ``base`` (initializer name -> the same weight before a LoRA merge, or None) quantises the base weight instead and
    carries the fine-tune's change as low-rank factors (8-bit, in the correction path) beside it, when the change has
    rank at most ``max_rank``: a LoRA delta is far smaller than a 4-bit step, so rounding the merged weight rounds much
    of the fine-tune away (demo model: top-1 54.5%, KL 1.87 merged-then-quantised). The factors ride in the correction
    MatMuls: ``x @ [S | U]`` then ``@ [rest ; V]``.

    ``importance`` (initializer name and weight [K, N] -> the weight's importance matrix, one value per input
    channel, or None) makes each block's scale and minimum a weighted search (:func:`_quantize`) instead of min-max.

    ``bits`` (initializer name, weight [K, N] and node name -> 4 or 8; :class:`edgemed.export.onnx_mixed.LlamaMix`)
    sends a weight to 8-bit ``MatMulNBits`` in Q8_0 blocks instead (the merged weight: an 8-bit step is fine enough
    for a LoRA change, and llama.cpp's q8_0 takes no importance matrix either).

    Returns counts: ``quantized`` (4-bit), ``int8``, ``skipped``, ``low_rank`` (of the quantised, those with
    factors), ``max_rank``, ``calibrated`` (of the quantised, those with an importance matrix).
    """
    exclude = exclude or set()
    inits = {t.name: t for t in model.graph.initializer}
    new_nodes, replaced, added = [], set(), []
    block_sums: dict[str, str] = {}  # input tensor -> its block-sum tensor (q, k and v, gate and up share one)
    counts = {"quantized": 0, "int8": 0, "skipped": 0, "low_rank": 0, "max_rank": 0, "calibrated": 0}
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
        stem = node.name or node.output[0]
        if bits is not None and bits(weight.name, w, f"{stem}.q8") == 8:
            new_nodes.append(_q8_matmul(node.input[0], w, node.output[0], f"{stem}.q8", added, accuracy_level))
            replaced.add(weight.name)
            counts["int8"] += 1
            continue
        imp = importance(weight.name, w) if importance else None  # of the merged weight: the one PyTorch ran
        counts["calibrated"] += imp is not None
        factors = None
        w_base = base(weight.name) if base else None
        if w_base is not None and w_base.shape == w.shape and np.any(w_base != w):
            factors = low_rank(w - w_base, max_rank)
            if factors is not None:
                w = w_base
        packed, scales, zps, rest = _quantize(w, block_size, imp)
        names = {s: f"{stem}.q4.{s}" for s in ("B", "scales", "zero_points", "nbits", "correction", "mixed")}
        added += [numpy_helper.from_array(packed, names["B"]), numpy_helper.from_array(scales, names["scales"]),
                  numpy_helper.from_array(zps, names["zero_points"])]
        x = node.input[0]
        sel = np.kron(np.eye(k // block_size, dtype=np.float32), np.ones((block_size, 1), np.float32))
        if factors is not None:  # its own x @ [S | U]: the fine-tune's factors join the block sums
            u, v = factors
            # S and U in separate blocks of 32 (zero padding between), so that each 8-bit block, of weights and of
            # activations, holds one kind of number and gets its own scale
            gap = -sel.shape[1] % 32
            left = np.concatenate([np.pad(sel, ((0, 0), (0, gap))), u], 1)
            new_nodes.append(_q8_matmul(x, left, names["mixed"], f"{stem}.q4.sum", added, accuracy_level,
                                        pad_out=True))
            right, sums = np.concatenate([np.pad(rest, ((0, gap), (0, 0))), v], 0), names["mixed"]
            counts["low_rank"] += 1
            counts["max_rank"] = max(counts["max_rank"], u.shape[1])
        else:
            if x not in block_sums:
                block_sums[x] = f"{x}.q4.block_sum"
                new_nodes.append(_q8_matmul(x, sel, block_sums[x], f"{stem}.q4.sum", added, accuracy_level,
                                            pad_out=True))
            right, sums = rest, block_sums[x]
        new_nodes.append(helper.make_node(
            "MatMulNBits", [x, names["B"], names["scales"], names["zero_points"]], [names["nbits"]], name=f"{stem}.q4",
            domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=block_size, accuracy_level=accuracy_level))
        pad = -right.shape[0] % 32  # the sums were padded to whole blocks: zero rows meet them
        new_nodes += [_q8_matmul(sums, np.pad(right, ((0, pad), (0, 0))), names["correction"], f"{stem}.q4.rest",
                                 added, accuracy_level),
                      helper.make_node("Add", [names["nbits"], names["correction"]], list(node.output),
                                       name=f"{stem}.q4.add")]
        replaced.add(weight.name)
        counts["quantized"] += 1
    if counts["quantized"] or counts["int8"]:
        _rewrite(model, new_nodes, added, replaced)
    return counts


def _rewrite(model: Any, nodes: list, added: list, replaced: set[str]) -> None:
    """Put ``nodes`` and the ``added`` initializers in the graph; a ``replaced`` weight goes once no node reads it
    (a weight shared with another node, a tied embedding say, stays)."""
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    # initializers are removed in place, never re-added: protobuf's extend() copies a message by serializing it,
    # which fails for a tensor over 2 GB (Gemma 3's 262k-row fp32 embedding at width 2304 and up, MedGemma 4B's)
    inits = model.graph.initializer
    for i in reversed(range(len(inits))):
        if inits[i].name in replaced and inits[i].name not in used:
            del inits[i]
    inits.extend(added)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _gather_q8(name: str, table: str, indices: str, scales: str, zero_points: str, outputs: list[str],
               block_size: int) -> Any:
    """Rows of an 8-bit table in Q8_0 blocks along the row (GatherBlockQuantized, zero point 128)."""
    return helper.make_node("GatherBlockQuantized", [table, indices, scales, zero_points], outputs, name=name,
                            domain=MS_DOMAIN, bits=8, block_size=block_size, gather_axis=0, quantize_axis=1)


def _q8_matmul(x: str, w: np.ndarray, out: str, name: str, inits: list, accuracy_level: int,
               pad_out: bool = False) -> list:
    """``x @ w`` as 8-bit Q8_0-style ``MatMulNBits`` (the correction terms: a quarter of the bytes of fp32, which
    a decode step reads once per token). ``pad_out`` pads the output columns to whole blocks of 32 with zeros (for
    an output that is the next one's input); returns the node and appends its initializers to ``inits``."""
    k, n = w.shape
    if pad_out:
        w = np.pad(w, ((0, 0), (0, -n % 32)))
    blk = 32 if k % 32 == 0 else 16
    q, scale = q8_blocks(w, blk)
    inits += [numpy_helper.from_array(q, f"{name}.B"), numpy_helper.from_array(scale, f"{name}.scales")]
    return helper.make_node("MatMulNBits", [x, f"{name}.B", f"{name}.scales"], [out], name=name, domain=MS_DOMAIN,
                            K=k, N=w.shape[1], bits=8, block_size=blk, accuracy_level=accuracy_level)


def q8_blocks(w: np.ndarray, block_size: int, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] in llama.cpp's Q8_0 layout for MatMulNBits: B [N, K/bs, bs] uint8 (q + 128, q in -127..127, the
    operator's default zero point for 8 bits) and scales [N, K/bs] = max|w| / 127 per block.

    ``chunk`` output columns at a time, into arrays allocated once: every step is per column, and whole-matrix
    temporaries (the transpose, |w|, the quotient, the rounding) cost five copies of the fp32 weight, 12 GB for a
    262k-row Gemma 3 head."""
    k, n = w.shape
    nb = k // block_size
    q = np.empty((n, nb, block_size), np.uint8)
    scale = np.empty((n, nb), np.float32)
    for start in range(0, n, chunk):
        blocks = np.asarray(w[:, start:start + chunk], np.float32).T.reshape(-1, nb, block_size)
        d = np.abs(blocks).max(-1) / 127
        d = np.where(d > 0, d, 1.0).astype(np.float32)
        q[start:start + chunk] = np.clip(np.rint(blocks / d[..., None]), -127, 127) + 128
        scale[start:start + chunk] = d
    return q, scale


def low_rank(delta: np.ndarray, max_rank: int, tol: float = 1e-3) -> tuple[np.ndarray, np.ndarray] | None:
    """``delta`` [K, N] as ``u @ v`` (u [K, r], v [r, N], r <= max_rank) when that holds to ``tol`` (relative
    Frobenius norm), else None. A randomised range finder (K x N x (max_rank + 8) work, not a full SVD, so a
    2560 x 10240 weight takes a fraction of a second), then an SVD of the small projection for the rank."""
    rng = np.random.default_rng(0)
    d = delta.astype(np.float64)
    q, _ = np.linalg.qr(d @ rng.standard_normal((d.shape[1], min(max_rank + 8, *d.shape))))
    small = q.T @ d
    norm = np.linalg.norm(d)
    if np.linalg.norm(d - q @ small) > tol * norm:
        return None
    ub, sv, vt = np.linalg.svd(small, full_matrices=False)
    r = int((sv > sv[0] * 1e-6).sum())
    if r > max_rank:
        return None
    root = np.sqrt(sv[:r])  # the scale split evenly: u and v of like magnitude for their 8-bit blocks
    u, v = (q @ ub[:, :r]) * root, vt[:r] * root[:, None]
    if np.linalg.norm(d - u @ v) > tol * norm:
        return None
    return u.astype(np.float32), v.astype(np.float32)


def _quantize(w: np.ndarray, block_size: int, importance: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """W [K, N] -> MatMulNBits B [N, K/bs, bs/2] (uint8, two 4-bit values a byte, low nibble first), scales
    [N, K/bs], packed zero points [N, ceil(K/bs / 2)], and the float rest of each block's minimum [K/bs, N].

    Without ``importance`` each block is its min-max grid. With it (one value per input channel K: the mean square
    of that channel's activations) each block's scale and minimum come from :func:`search_scale_min` under
    llama.cpp's element weights for an importance matrix, ``importance[k] * sqrt(sigma2 + w^2)`` (``sigma2`` the
    output row's mean square weight), as its Q4_1 / Q4_K quantizers weight them."""
    k, n = w.shape
    blocks = w.astype(np.float32).reshape(k // block_size, block_size, n)
    if importance is None:
        q, scale, lo = _min_max(blocks)
    else:
        sigma2 = np.mean(np.square(w, dtype=np.float32), axis=0)                         # [N]
        weights = np.asarray(importance, np.float32)[:, None] * np.sqrt(sigma2 + np.square(w, dtype=np.float32))
        q, scale, lo = search_scale_min(blocks, weights.reshape(blocks.shape))
    return _pack(q, scale, lo)


def _min_max(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each block [nb, bs, N] on its min-max grid: q [nb, bs, N] in 0..15, scale and minimum [nb, N]."""
    lo, hi = blocks.min(1), blocks.max(1)                          # [nb, N]
    scale = (hi - lo) / 15
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)    # a constant block: q = 0, ``rest`` holds it
    q = np.clip(np.rint((blocks - lo[:, None]) / scale[:, None]), 0, 15)
    return q.astype(np.uint8), scale, lo


def search_scale_min(blocks: np.ndarray, weights: np.ndarray | None = None, nmax: int = 15, rmin: float = -0.9,
                     rdelta: float = 0.05, nstep: int = 36) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block, the grid ``scale * q + lo`` (q in 0..nmax) of least weighted squared error
    ``sum_i w_i (x_i - scale * q_i - lo)^2`` among candidates, as llama.cpp's k-quants search with an importance
    matrix: the min-max grid, then for each of ``nstep + 1`` inverse scales ``(nmax + rmin + rdelta * i) / (max -
    min)`` the values are rounded on it and ``scale`` and ``lo`` refitted by weighted least squares for those
    levels. ``blocks`` and ``weights`` are [nb, bs, N] (blocks along axis 1); None weighs every value alike.

    Returns q [nb, bs, N] uint8, scale and lo [nb, N] float32 (scale > 0).
    """
    x = blocks.astype(np.float32)
    w = np.ones_like(x) if weights is None else np.asarray(weights, np.float32)
    q, scale, lo = _min_max(x)
    best = _werr(x, w, q, scale, lo)
    span = x.max(1) - x.min(1)
    span = np.where(span > 0, span, 1.0)
    sw, sx = w.sum(1, dtype=np.float64), (w * x).sum(1, dtype=np.float64)
    for i in range(nstep + 1):
        iscale = (nmax + rmin + rdelta * i) / span
        levels = np.clip(np.rint((x - x.min(1, keepdims=True)) * iscale[:, None]), 0, nmax).astype(np.float32)
        wl = w * levels
        sl, sl2, sxl = wl.sum(1, dtype=np.float64), (wl * levels).sum(1, dtype=np.float64), \
            (wl * x).sum(1, dtype=np.float64)
        det = sw * sl2 - sl * sl
        ok = det > 1e-12 * np.maximum(sw * sl2, 1e-30)    # all levels alike (or no weight): no fit
        det = np.where(ok, det, 1.0)
        s = ((sw * sxl - sx * sl) / det).astype(np.float32)
        m = ((sl2 * sx - sl * sxl) / det).astype(np.float32)
        ok &= s > 0
        err = _werr(x, w, levels, s, m)
        better = ok & (err < best)
        if better.any():
            q = np.where(better[:, None], levels, q)
            scale, lo, best = np.where(better, s, scale), np.where(better, m, lo), np.where(better, err, best)
    return q.astype(np.uint8), scale.astype(np.float32), lo.astype(np.float32)


def _werr(x: np.ndarray, w: np.ndarray, q: np.ndarray, scale: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Weighted squared error per block of the grid ``scale * q + lo`` against ``x`` ([nb, bs, N] -> [nb, N])."""
    d = scale[:, None] * q + lo[:, None] - x
    return (w * d * d).sum(1, dtype=np.float64)


def _pack(q: np.ndarray, scale: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """q [nb, bs, N], scale and minimum [nb, N] -> :func:`_quantize`'s MatMulNBits tensors and the float rest."""
    nb, _, n = q.shape
    zp = np.clip(np.rint(-lo / scale), 0, 15).astype(np.uint8)    # [nb, N]
    rest = (lo + scale * zp).astype(np.float32)                   # so that scale * (q - zp) + rest = scale * q + lo
    q = q.astype(np.uint8).transpose(2, 0, 1)                      # [N, nb, bs]
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


def quantize_head_int8(model: Any, head: str, accuracy_level: int, block_size: int = 32) -> bool:
    """The LM head, in place, to 8-bit ``MatMulNBits`` in llama.cpp's Q8_0 layout (symmetric blocks of 32, ``d =
    max|w| / 127``), and an embedding tied to it (``Transpose -> Gather`` of the same weight) to
    ``GatherBlockQuantized`` over the same bytes, as the genai builder lays it out. Written here rather than with
    onnxruntime's quantiser because that one scales by ``max|w| / 128`` (a Q8_0 head, SmolLM2's, is then rounded a
    second time) and quantises Gathers to 4 bits only. A head whose input width is not a multiple of
    ``block_size`` stays fp32. Returns whether an embedding was tied to the head."""
    producer = {o: n for n in model.graph.node for o in n.output}
    head_node = next(n for n in model.graph.node if n.name == head)
    weight = head_node.input[1]
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == weight), base_dir="")
    k, n_out = w.shape
    if k % block_size:
        return False
    tied = {g.output[0] for g in model.graph.node
            if g.op_type == "Gather" and g.input[0] in producer and producer[g.input[0]].op_type == "Transpose"
            and producer[g.input[0]].input[0] == weight}
    transposes = {producer[g.input[0]].output[0] for g in model.graph.node if g.output[0] in tied}
    name = f"{head}.q8"
    added: list = []
    matmul = _q8_matmul(head_node.input[0], w, head_node.output[0], name, added, accuracy_level)
    shared = []  # the embedding's view of the head's bytes, emitted once where the first tied Gather was
    if tied:
        nb = k // block_size
        added += [numpy_helper.from_array(np.array([n_out, k], np.int64), f"{name}.shape"),
                  numpy_helper.from_array(np.array([n_out, nb], np.int64), f"{name}.scale_shape"),
                  numpy_helper.from_array(np.full((n_out, nb), 128, np.uint8), f"{name}.zero_points")]
        shared = [helper.make_node("Reshape", [f"{name}.B", f"{name}.shape"], [f"{name}.table"], name=f"{name}.view"),
                  helper.make_node("Reshape", [f"{name}.scales", f"{name}.scale_shape"], [f"{name}.table_scales"],
                                   name=f"{name}.scale_view")]
    nodes = []
    for node in model.graph.node:  # rewritten in place: the graph stays in topological order
        if node.name == head:
            nodes.append(matmul)
        elif node.output[0] in tied:
            nodes += shared + [_gather_q8(f"{node.name}.q8", f"{name}.table", node.input[1], f"{name}.table_scales",
                                          f"{name}.zero_points", list(node.output), block_size)]
            shared = []
        elif node.output[0] not in transposes:
            nodes.append(node)
    _rewrite(model, nodes, added, {weight})
    return bool(tied)


def quantize_embedding_int8(model: Any, min_rows: int = 1024, block_size: int = 32) -> int:
    """Every ``Gather`` from a constant 2-D fp32 table of at least ``min_rows`` rows (a token embedding) to
    ``GatherBlockQuantized`` in Q8_0 blocks along the row, in place; returns how many. For image models the
    embedding sits in its own graph (``embed.onnx``), where a full fp32 vocabulary table is most of the file."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes, added, replaced = [], [], set()
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if (table is None or len(table.dims) != 2 or table.dims[0] < min_rows or table.dims[1] % block_size
                or table.data_type != onnx.TensorProto.FLOAT or axis != 0):
            nodes.append(node)
            continue
        t = numpy_helper.to_array(table, base_dir="")
        q, scale = q8_blocks(t.T, block_size)  # blocks along each row of the table (q8_blocks reads it by rows)
        name = f"{node.name or node.output[0]}.q8"
        added += [numpy_helper.from_array(q.reshape(t.shape), f"{name}.data"),
                  numpy_helper.from_array(scale, f"{name}.scales"),
                  numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), f"{name}.zero_points")]
        nodes.append(_gather_q8(name, f"{name}.data", node.input[1], f"{name}.scales", f"{name}.zero_points",
                                list(node.output), block_size))
        replaced.add(table.name)
    if replaced:
        _rewrite(model, nodes, added, replaced)
    return len(replaced)


# ---------------------------------------------------------------------------------------------- graph files
def quantize_decoder_int4(path: Path, block_size: int, accuracy_level: int, base_graph: Path | None = None,
                          base: Path | None = None,
                          importance: Callable[[str, np.ndarray], np.ndarray | None] | None = None,
                          bits: Callable[[str, np.ndarray, str], int] | None = None) -> str:
    """int4 (:func:`quantize_int4_min`): every MatMul by a constant weight to 4-bit blocks with a float minimum;
    the LM head, and an embedding tied to it, to 8-bit blocks of 32. With ``base_graph`` (the fp32 decoder of the
    model a LoRA merge started from) the base weights are quantised and the fine-tune's low-rank change is kept
    in the 8-bit correction MatMuls beside them. ``importance`` (see :func:`quantize_int4_min`) calibrates the
    4-bit blocks; ``bits`` (see :func:`quantize_int4_min`) sends some weights to 8 bits. Returns the algorithm's
    description."""
    m = onnx.load(str(path))
    head = lm_head(m)
    lookup = None
    if base_graph is not None:
        base_inits = {t.name: t for t in onnx.load(str(base_graph), load_external_data=False).graph.initializer}

        def lookup(name: str):
            t = base_inits.get(name)
            return numpy_helper.to_array(t, base_dir=str(base_graph.parent)) if t is not None else None
    counts = quantize_int4_min(m, block_size, accuracy_level, exclude=set(head), base=lookup, importance=importance,
                               bits=bits)
    tied = False
    if head:
        tied = quantize_head_int8(m, head[0], accuracy_level)
    save_graph(m, path)
    skipped = (f", {counts['skipped']} left fp32 (input width not a multiple of {block_size})"
               if counts["skipped"] else "")
    lora = (f"; the LoRA merge's change kept as low-rank factors (rank <= {counts['max_rank']}) on "
            f"{counts['low_rank']} of them, the 4-bit weights being those of the base {base}"
            if counts["low_rank"] else "")
    grid = "" if importance else "min-max "
    weighted = (f", each block's scale and minimum by an importance-weighted search on {counts['calibrated']} of "
                "them" if importance else "")
    int8 = (f"; {counts['int8']} weights 8-bit (Q8_0 blocks of 32) where llama.cpp stores more than 4-bit levels"
            if bits is not None else "")
    return (f"4-bit {grid}blocks of {block_size} with a float minimum (MatMulNBits + block-sum correction) on "
            f"{counts['quantized']} weights{weighted}{skipped}; "
            f"LM head{' and the embedding tied to it' if tied else ''} 8-bit (blocks of 32){int8}{lora}")


def quantize_embed_int8(path: Path) -> str:
    """embed.onnx's token table to 8-bit Q8_0 blocks (GatherBlockQuantized); the image-feature splice stays fp32."""
    m = onnx.load(str(path))
    n = quantize_embedding_int8(m, min_rows=1)  # the only constant table in embed.onnx is the vocabulary
    save_graph(m, path)
    return "token embedding table 8-bit (Q8_0 blocks of 32, GatherBlockQuantized)" if n else "fp32"


def lm_head(m: Any) -> list[str]:
    """The LM head's node name (a one-item list, empty if none): the last MatMul by a constant 2-D weight, since
    soft-capping or a cast may follow it before the graph's output."""
    ranks = {t.name: len(t.dims) for t in m.graph.initializer}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and ranks.get(n.input[1]) == 2][-1:]


def quantize_decoder_int8(path: Path, block_size: int, accuracy_level: int) -> None:
    """Block-wise weight-only int8 (MatMulNBits) with onnxruntime's MatMulNBitsQuantizer, for the decoders the genai
    builder does not write; LM head excluded."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    m = onnx.load(str(path))
    head = lm_head(m)
    q = MatMulNBitsQuantizer(m, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                             op_types_to_quantize=("MatMul",), nodes_to_exclude=head)
    q.process()
    save_graph(q.model.model, path)


def convert_fp16(path: Path) -> None:
    """fp16 weights and activations inside; fp32 inputs and outputs, so callers feed the same tensors."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    m = OnnxModel(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True, disable_shape_infer=True))
    m.topological_sort()  # the converter appends its input casts at the end; the checker wants them first
    save_graph(m.model, path)
