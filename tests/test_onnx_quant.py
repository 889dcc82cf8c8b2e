"""The 4-bit-with-float-minimum and 8-bit head rewrites of ``edgemed.export.onnx_quant``, checked by running the
rewritten graphs in onnxruntime against numpy on the weights the quantised tensors stand for."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgemed.export.onnx_quant import (  # noqa: E402
    _quantize,
    dequantize,
    low_rank,
    quantize_embedding_int8,
    quantize_head_int8,
    quantize_int4_min,
)


def linear_graph(weights: dict[str, np.ndarray], k: int, tied_embedding: str | None = None):
    """x [B, S, K] -> MatMul by each weight (outputs y_<name>); optionally ids -> Gather(Transpose(weight))."""
    nodes, inits, outputs = [], [], []
    for name, w in weights.items():
        inits.append(numpy_helper.from_array(w, name))
        nodes.append(helper.make_node("MatMul", ["x", name], [f"y_{name}"], name=f"mm_{name}"))
        outputs.append(helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, ["b", "s", w.shape[1]]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])]
    if tied_embedding:
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]))
        nodes = [helper.make_node("Transpose", [tied_embedding], ["table"], perm=[1, 0], name="t"),
                 helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather")] + nodes
        outputs.append(helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["b", "s", k]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def run(model, **feeds) -> dict[str, np.ndarray]:
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def q4_1_grid(k: int, n: int, seed: int) -> np.ndarray:
    """Weights as llama.cpp's Q4_1 stores them: d * q + m per block of 32, m a float (not a multiple of d)."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.01, 0.05, (k // 32, 1, n)).astype(np.float32)
    m = rng.uniform(-0.4, -0.05, (k // 32, 1, n)).astype(np.float32)
    q = rng.integers(0, 16, (k // 32, 32, n)).astype(np.float32)
    q[:, 0], q[:, 1] = 0, 15  # every block spans the whole grid, as Q4_1's min/max blocks do
    return (d * q + m).reshape(k, n).astype(np.float32)


def test_q4_1_grid_weights_are_reproduced_exactly():
    w = q4_1_grid(96, 40, 0)
    back = dequantize(*_quantize(w, 32), block_size=32)
    assert np.abs(back - w).max() < 1e-6
    # the integer-zero-point grid onnxruntime's own quantisers use shifts whole blocks (what this module avoids)
    lo = w.reshape(3, 32, 40).min(1, keepdims=True)
    scale = (w.reshape(3, 32, 40).max(1, keepdims=True) - lo) / 15
    zp = np.clip(np.rint(-lo / scale), 0, 15)
    int_zp = (np.clip(np.rint(w.reshape(3, 32, 40) / scale + zp), 0, 15) - zp) * scale
    assert np.abs(int_zp.reshape(96, 40) - w).max() > 1e-3


def test_general_weights_error_is_within_half_a_step():
    w = np.random.default_rng(1).normal(0, 0.05, (64, 24)).astype(np.float32)
    packed, scales, zps, rest = _quantize(w, 32)
    back = dequantize(packed, scales, zps, rest, 32)
    step = np.repeat(scales.T, 32, axis=0)  # [K, N]
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)


@pytest.mark.parametrize("accuracy_level", [1, 4])
def test_graph_computes_x_times_the_quantised_weights(accuracy_level):
    k = 64
    weights = {"a": q4_1_grid(k, 48, 2), "b": q4_1_grid(k, 24, 3),
               "odd": np.random.default_rng(4).normal(size=(k, 8)).astype(np.float32)}
    model = linear_graph(weights, k)
    x = np.random.default_rng(5).normal(size=(2, 3, k)).astype(np.float32)
    counts = quantize_int4_min(model, 32, accuracy_level, exclude={"mm_odd"})
    assert counts == {"quantized": 2, "skipped": 0, "low_rank": 0, "max_rank": 0}
    ops = [n.op_type for n in model.graph.node]
    # a and b: 4-bit each, one shared 8-bit block sum of x, an 8-bit correction each; odd stays a MatMul
    assert ops.count("MatMulNBits") == 2 + 1 + 2 and ops.count("MatMul") == 1 and ops.count("Add") == 2
    assert {t.name for t in model.graph.initializer}.isdisjoint({"a", "b"})  # fp32 weights gone
    out = run(model, x=x)
    for name in ("a", "b"):
        want = x @ weights[name]  # the grid is reproduced; the 8-bit minimum and int8 activations round a little
        tol = 3e-3 if accuracy_level == 1 else 2e-2
        assert np.abs(out[f"y_{name}"] - want).max() <= tol * np.abs(want).max(), name
    assert np.allclose(out["y_odd"], x @ weights["odd"], atol=1e-5)


def test_integer_zero_point_graph_is_measurably_worse_on_a_q4_1_grid():
    """What the float minimum buys: the same weights through onnxruntime's own asymmetric RTN quantiser."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    k = 128
    w = q4_1_grid(k, 64, 8)
    x = np.random.default_rng(9).normal(size=(1, 16, k)).astype(np.float32)
    ours = linear_graph({"w": w}, k)
    quantize_int4_min(ours, 32, 1)
    theirs = MatMulNBitsQuantizer(linear_graph({"w": w}, k), bits=4, block_size=32, is_symmetric=False,
                                  accuracy_level=1)
    theirs.process()
    want = x @ w
    err_ours = np.abs(run(ours, x=x)["y_w"] - want).mean()
    err_theirs = np.abs(run(theirs.model.model, x=x)["y_w"] - want).mean()
    assert err_ours * 5 < err_theirs, (err_ours, err_theirs)


def test_lora_change_is_kept_in_low_rank_factors_beside_the_base():
    """A merged weight = base on a 4-bit grid + a rank-4 change far smaller than a 4-bit step: with the base
    known, the graph computes x @ merged closely; rounding the merged weight instead loses most of the change."""
    k, n = 64, 48
    rng = np.random.default_rng(10)
    base = q4_1_grid(k, n, 11)
    delta = (rng.normal(size=(k, 4)) @ rng.normal(size=(4, n))).astype(np.float32) * 2e-3
    merged = base + delta
    x = rng.normal(size=(1, 8, k)).astype(np.float32)
    with_base = linear_graph({"w": merged}, k)
    counts = quantize_int4_min(with_base, 32, 1, base=lambda name: base if name == "w" else None)
    assert counts["low_rank"] == 1 and counts["max_rank"] == 4
    without = linear_graph({"w": merged}, k)
    quantize_int4_min(without, 32, 1)
    change = x @ delta
    kept = run(with_base, x=x)["y_w"] - x @ base
    lost = run(without, x=x)["y_w"] - x @ base
    err_kept = np.abs(kept - change).mean() / np.abs(change).mean()
    err_lost = np.abs(lost - change).mean() / np.abs(change).mean()
    assert err_kept < 0.05 and err_lost > 5 * err_kept, (err_kept, err_lost)


def test_a_change_of_high_rank_is_quantised_as_merged():
    k, n = 64, 48
    rng = np.random.default_rng(12)
    base = q4_1_grid(k, n, 13)
    model = linear_graph({"w": base + rng.normal(size=(k, n)).astype(np.float32) * 1e-3}, k)
    counts = quantize_int4_min(model, 32, 1, base=lambda name: base, max_rank=8)
    assert counts["quantized"] == 1 and counts["low_rank"] == 0


def test_low_rank_recovers_the_factors_or_refuses():
    rng = np.random.default_rng(14)
    d = (rng.normal(size=(96, 5)) @ rng.normal(size=(5, 70))).astype(np.float32)
    u, v = low_rank(d, 16)
    assert u.shape == (96, 5) and v.shape == (5, 70)
    assert np.abs(u @ v - d).max() < 1e-4 * np.abs(d).max()
    assert low_rank(rng.normal(size=(96, 70)).astype(np.float32), 16) is None


def test_input_width_not_a_multiple_of_the_block_is_left_alone():
    model = linear_graph({"w": np.ones((48, 8), np.float32)}, 48)
    assert quantize_int4_min(model, 32, 4) == {"quantized": 0, "skipped": 1, "low_rank": 0, "max_rank": 0}
    assert [n.op_type for n in model.graph.node] == ["MatMul"]


def test_head_goes_8_bit_and_a_tied_embedding_reads_the_same_bytes():
    k, vocab = 64, 80
    rng = np.random.default_rng(6)
    d = rng.uniform(0.001, 0.01, (vocab, k // 32, 1)).astype(np.float32)
    q = rng.integers(-127, 128, (vocab, k // 32, 32)).astype(np.float32)
    q[:, :, 0] = 127  # Q8_0: d = max|w| / 127 in every block, so the 8-bit blocks are reproduced exactly
    table = (d * q).reshape(vocab, k)                      # embedding rows; the head weight is its transpose
    head = np.ascontiguousarray(table.T)
    model = linear_graph({"head": head}, k, tied_embedding="head")
    tied = quantize_head_int8(model, "mm_head", accuracy_level=1)
    assert tied
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and not {"Gather", "Transpose"} & ops
    assert "head" not in {t.name for t in model.graph.initializer}
    x = rng.normal(size=(1, 4, k)).astype(np.float32)
    ids = np.array([[0, 5, 79, 5]], np.int64)
    out = run(model, x=x, ids=ids)
    assert np.abs(out["emb"] - table[ids]).max() < 1e-6
    assert np.abs(out["y_head"] - x @ head).max() < 1e-4 * np.abs(x @ head).max()


def test_head_without_a_tied_embedding_is_only_quantised():
    model = linear_graph({"head": np.random.default_rng(7).normal(size=(64, 16)).astype(np.float32)}, 64)
    tied = quantize_head_int8(model, "mm_head", accuracy_level=4)
    assert not tied and [n.op_type for n in model.graph.node] == ["MatMulNBits"]


def test_embedding_table_goes_8_bit_and_gathers_the_same_rows():
    vocab, k = 1200, 64
    rng = np.random.default_rng(15)
    d = rng.uniform(0.001, 0.01, (vocab, k // 32, 1)).astype(np.float32)
    q = rng.integers(-127, 128, (vocab, k // 32, 32)).astype(np.float32)
    q[:, :, 0] = -127  # Q8_0 blocks (max|w| = 127 d): reproduced exactly
    table = (d * q).reshape(vocab, k)
    small = rng.normal(size=(8, k)).astype(np.float32)  # too few rows to be a vocabulary: left alone
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("Gather", ["small", "ids_small"], ["other"], name="other")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]),
                     helper.make_tensor_value_info("ids_small", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["b", "s", k]),
         helper.make_tensor_value_info("other", TensorProto.FLOAT, ["n", k])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(small, "small")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert quantize_embedding_int8(model) == 1
    assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized", "Gather"]
    assert {t.name for t in model.graph.initializer} >= {"small"} and "table" not in {t.name for t in
                                                                                       model.graph.initializer}
    ids = np.array([[0, 1199, 7, 7]], np.int64)
    out = run(model, ids=ids, ids_small=np.array([3, 0], np.int64))
    assert np.abs(out["emb"] - table[ids]).max() < 1e-6
    assert np.array_equal(out["other"], small[[3, 0]])
