"""The 4-bit-with-float-minimum and 8-bit head rewrites of ``edgemed.export.onnx_quant``, checked by running the
rewritten graphs in onnxruntime against numpy on the weights the quantised tensors stand for."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import write_vqa  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgemed.errors import DataError, ExportError  # noqa: E402
from edgemed.export.onnx_quant import (  # noqa: E402
    _quantize,
    _werr,
    dequantize,
    low_rank,
    q8_blocks,
    quantize_embedding_int8,
    quantize_head_int8,
    quantize_int4_min,
    search_scale_min,
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
    assert counts == {"quantized": 2, "int8": 0, "skipped": 0, "low_rank": 0, "max_rank": 0, "calibrated": 0}
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


def test_bits_callback_sends_a_weight_to_8_bit_and_onnxruntime_computes_it():
    k = 64
    weights = {"a": np.random.default_rng(6).normal(0, 0.05, (k, 40)).astype(np.float32), "b": q4_1_grid(k, 24, 7)}
    model = linear_graph(weights, k)
    asked = []

    def bits(name, w, node):
        asked.append((name, w.shape, node))
        return 8 if name == "a" else 4

    counts = quantize_int4_min(model, 32, 1, bits=bits)
    assert counts["int8"] == 1 and counts["quantized"] == 1
    assert asked == [("a", (k, 40), "mm_a.q8"), ("b", (k, 24), "mm_b.q8")]
    nbits = {n.name: helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
             for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert nbits["mm_a.q8"] == 8 and nbits["mm_b.q4"] == 4 and "mm_a.q4" not in nbits
    x = np.random.default_rng(8).normal(size=(2, 3, k)).astype(np.float32)
    out = run(model, x=x)
    q, scale = q8_blocks(weights["a"], 32)  # the Q8_0 weights the node stands for
    w8 = ((q.astype(np.float32) - 128) * scale[..., None]).reshape(40, k).T
    want = x @ w8
    assert np.abs(out["y_a"] - want).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(out["y_a"] - x @ weights["a"]).max() > 1e-4 * np.abs(want).max()  # it was rounded to 8 bits


def test_input_width_not_a_multiple_of_the_block_is_left_alone():
    model = linear_graph({"w": np.ones((48, 8), np.float32)}, 48)
    assert quantize_int4_min(model, 32, 4) == {"quantized": 0, "int8": 0, "skipped": 1, "low_rank": 0,
                                               "max_rank": 0, "calibrated": 0}
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


# ---------------------------------------------------------------- calibrated int4 (importance-weighted search)
def _blocks(seed: int, nb: int = 6, n: int = 40) -> np.ndarray:
    """Blocks [nb, 32, N] of heavy-tailed weights, as trained matrices have (a few outliers per block)."""
    return np.random.default_rng(seed).standard_t(4, size=(nb, 32, n)).astype(np.float32) * 0.02


def _importance(k: int, seed: int) -> np.ndarray:
    """Per-channel mean squares spread over two decades, as a decoder's input channels are."""
    return np.exp(np.random.default_rng(seed).normal(0, 1.5, k)).astype(np.float32)


def test_weighted_search_with_uniform_weights_equals_the_unweighted_one():
    x = _blocks(20)
    q, scale, lo = search_scale_min(x)
    for c in (1.0, 3.7):  # any constant weight: the same grid (the fit and the choice are scale-free)
        qc, sc, lc = search_scale_min(x, np.full_like(x, c))
        assert np.array_equal(qc, q)
        assert np.allclose(sc, scale, rtol=1e-5) and np.allclose(lc, lo, rtol=1e-5, atol=1e-8)


def test_search_is_never_worse_than_min_max_and_usually_better():
    from edgemed.export.onnx_quant import _min_max

    x = _blocks(21)
    w = np.ones_like(x)
    err_search = _werr(x, w, *search_scale_min(x))
    err_minmax = _werr(x, w, *_min_max(x))
    assert np.all(err_search <= err_minmax * (1 + 1e-6))
    assert err_search.sum() < 0.9 * err_minmax.sum(), (err_search.sum(), err_minmax.sum())  # measured 0.82x


def test_weighted_search_beats_the_unweighted_one_on_the_weighted_metric():
    x = _blocks(22)
    w = np.broadcast_to(_importance(x.shape[0] * 32, 23).reshape(x.shape[0], 32, 1), x.shape).copy()
    weighted, plain = _werr(x, w, *search_scale_min(x, w)), _werr(x, w, *search_scale_min(x))
    assert np.all(weighted <= plain * (1 + 1e-6))  # per block: the weighted fit is optimal for its own metric
    assert weighted.sum() < 0.85 * plain.sum(), (weighted.sum(), plain.sum())
    # and the unweighted search keeps the lower plain error: the two searches answer different questions
    ones = np.ones_like(x)
    assert _werr(x, ones, *search_scale_min(x)).sum() < _werr(x, ones, *search_scale_min(x, w)).sum()


def test_calibrated_blocks_pack_into_the_same_layout_and_cut_the_output_error():
    k, n = 128, 48
    rng = np.random.default_rng(24)
    w = (rng.standard_t(4, size=(k, n)) * 0.02 + rng.normal(0, 0.01, (1, n))).astype(np.float32)
    w[:32, :4] += 0.05  # blocks entirely above zero: the minimum is positive, the rest carries it
    imp = _importance(k, 25)
    plain, cal = _quantize(w, 32), _quantize(w, 32, imp)
    assert [a.shape for a in plain] == [a.shape for a in cal] and not np.array_equal(plain[0], cal[0])
    # the packed tensors stand for the searched grid exactly (zero points and the float rest included)
    sigma2 = (w * w).mean(0)
    elem = (imp[:, None] * np.sqrt(sigma2 + w * w)).reshape(k // 32, 32, n)
    q, scale, lo = search_scale_min(w.reshape(k // 32, 32, n), elem)
    want = (scale[:, None] * q + lo[:, None]).reshape(k, n)
    assert np.abs(dequantize(*cal, block_size=32) - want).max() < 1e-6
    # E|x @ (W - W_q)|^2 for activations of per-channel mean square imp: lower calibrated
    out_err = {name: float((imp[:, None] * (dequantize(*t, block_size=32) - w) ** 2).sum())
               for name, t in (("plain", plain), ("calibrated", cal))}
    assert out_err["calibrated"] < 0.8 * out_err["plain"], out_err


def test_importance_reaches_the_graph_and_onnxruntime_computes_the_calibrated_weights():
    k = 64
    weights = {"a": np.random.default_rng(26).normal(0, 0.02, (k, 48)).astype(np.float32),
               "b": np.random.default_rng(27).normal(0, 0.02, (k, 24)).astype(np.float32)}
    imp = _importance(k, 28)
    seen = []

    def importance(name, w):
        seen.append((name, w.shape))
        return imp if name == "a" else None

    model = linear_graph(weights, k)
    counts = quantize_int4_min(model, 32, 1, importance=importance)
    assert counts["quantized"] == 2 and counts["calibrated"] == 1
    assert sorted(seen) == [("a", (k, 48)), ("b", (k, 24))]
    x = np.random.default_rng(29).normal(size=(1, 5, k)).astype(np.float32)
    out = run(model, x=x)
    for name, want_w in (("a", dequantize(*_quantize(weights["a"], 32, imp), block_size=32)),
                         ("b", dequantize(*_quantize(weights["b"], 32), block_size=32))):
        want = x @ want_w
        assert np.abs(out[f"y_{name}"] - want).max() <= 3e-3 * np.abs(want).max(), name


def _q4_bytes(folder) -> dict[str, bytes]:
    m = onnx.load(str(folder / "decoder.onnx"))
    return {t.name: numpy_helper.to_array(t, base_dir=str(folder)).tobytes() for t in m.graph.initializer
            if t.name.endswith(".q4.B")}


def _calibrated_export(arch: str, tiny_model, tmp_path):
    from edgemed.artifacts import read_manifest
    from edgemed.export.onnx import export_onnx

    model = tiny_model(arch)
    data = write_vqa(tmp_path / "d", n=3, image=arch in ("gemma3",))
    plain = export_onnx(model, "int4", tmp_path / "plain")  # a plain checkpoint: uncalibrated by default
    cal = export_onnx(model, "int4", tmp_path / "cal", calibration=data, calibration_samples=2)
    a, b = _q4_bytes(plain), _q4_bytes(cal)
    assert a and a.keys() == b.keys()
    assert sum(a[n] != b[n] for n in a) == len(a)  # every 4-bit weight moved: each one found its matrix
    m, p = read_manifest(cal, ("onnx",)), read_manifest(plain, ("onnx",))
    c = m["calibration"]
    assert p.get("calibration") is None and c["samples"] == 2 and c["data"] == str(data.absolute())
    assert c["matrices"] == len(a) and len(c["imatrix_sha256"]) == 64 and len(c["data_sha256"]) == 64
    algo = m["graphs"]["decoder"]["quant_algorithm"]
    assert f"importance-weighted search on {len(a)} of them" in algo and "min-max" in p["graphs"]["decoder"][
        "quant_algorithm"]
    return cal


@pytest.mark.slow  # two int4 exports through the genai builder: about 25 s here
def test_calibration_changes_the_int4_bytes_and_is_recorded(tiny_model, tmp_path):
    """The genai builder's graph (q, k and v packed into one MatMul): every 4-bit weight is calibrated."""
    cal = _calibrated_export("llama", tiny_model, tmp_path)
    from edgemed.backends import open_model

    be = open_model(cal)
    try:
        assert np.isfinite(be.logits(be.tokenize("Which side is bright?"))).all()
    finally:
        be.close()


@pytest.mark.slow
def test_calibration_reaches_the_torch_onnx_graph_of_an_image_model(tiny_model, tmp_path):
    """torch.onnx names weights val_NNN: they are matched by value, calibrated on prompts with their images."""
    _calibrated_export("gemma3", tiny_model, tmp_path)


def test_weights_are_matched_by_value_including_a_packed_qkv(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from edgemed.export import imatrix

    model = tiny_model("llama")
    data = write_vqa(tmp_path / "d", n=2, image=False)
    records, sha = imatrix.read_calibration(data)
    imp = imatrix.compute_weight_importance(model, records, data, sha, max_tokens=32)
    torch_model = AutoModelForCausalLM.from_pretrained(model, local_files_only=True)
    attn = torch_model.model.layers[0].self_attn
    q, k, v = (getattr(attn, f"{n}_proj").weight.detach().numpy() for n in "qkv")
    packed = np.concatenate([q, k, v], 0).T  # the builder's qkv_proj: [K, Nq + Nk + Nv]
    got = imp("qkv", packed)
    assert got is not None and got.shape == (q.shape[1],) and (got > 0).all()
    assert np.array_equal(imp("q", q.T), got)  # the parts of a pack share their input
    down = torch_model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    assert imp("down", down.T).shape == (down.shape[1],) and not np.array_equal(imp("down", down.T), got)
    assert imp("noise", np.random.default_rng(0).normal(size=packed.shape).astype(np.float32)) is None
    assert imp("wrong tail", np.concatenate([q.T, np.zeros((q.shape[1], 3), np.float32)], 1)) is not None
    assert imp("wrong values", np.concatenate([q.T[:, :1], q.T[:, 1:] + 1], 1)) is None
    assert set(imp.cal.matrices) == {"qkv", "q", "down", "wrong tail"}


def test_corrupt_calibration_file_is_refused_with_no_output(tiny_model, tmp_path):
    from edgemed.export.onnx import export_onnx

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok", "answer": "yes"}\n{"question": 3\n')
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        export_onnx(tiny_model("llama"), "int4", out, calibration=bad)
    msg = str(e.value)
    assert "calibration" in msg and f"{bad}:2" in msg and "\n" not in msg
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ExportError, match="contradict"):
        export_onnx(tiny_model("llama"), "int4", out, calibration=write_vqa(tmp_path / "d", 2), calibrate=False)
    assert not out.exists()


def test_cli_export_onnx_takes_the_calibration_options(tiny_model, tmp_path):
    from click.testing import CliRunner

    from edgemed.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    r = CliRunner().invoke(main, ["export", "onnx", str(tiny_model("llama")), "--quant", "int4", "--calibration",
                                  str(bad), "--calibration-samples", "4", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "calibration" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(main, ["export", "onnx", str(tiny_model("llama")), "--no-calibration", "--calibration",
                                  str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "contradict" in r.output, r.output


def test_q8_blocks_by_chunks_equal_the_whole_matrix_formula():
    rng = np.random.default_rng(21)
    w = rng.normal(size=(64, 20)).astype(np.float32)
    w[:32, 3] = 0.0  # an all-zero block keeps scale 1
    blocks = w.T.reshape(20, 2, 32)
    d = np.abs(blocks).max(-1) / 127
    d = np.where(d > 0, d, 1.0).astype(np.float32)
    want = (np.clip(np.rint(blocks / d[..., None]), -127, 127) + 128).astype(np.uint8)
    for chunk in (7, 20, 8192):  # a chunk that does not divide N, exactly N, more than N
        q, scale = q8_blocks(w, 32, chunk=chunk)
        assert q.dtype == np.uint8 and np.array_equal(q, want) and np.array_equal(scale, d)
    q, scale = q8_blocks(np.ascontiguousarray(w.T).T, 32, chunk=7)  # a transposed view, as the embedding passes
    assert np.array_equal(q, want)


def _available_gb() -> float:
    from edgemed import memory

    return (memory.available_bytes() or 0) / 1e9


@pytest.mark.skipif(_available_gb() < 10, reason="needs about 7 GB of memory for a tensor over 2 GB")
def test_a_tied_head_over_2_gb_is_quantised_and_runs(tmp_path):
    """Gemma 3's 262k-row vocabulary at width 2304 and up (MedGemma 4B's) is an fp32 tensor over protobuf's 2 GB;
    re-adding it with extend() serializes it and failed ('Failed to serialize proto', measured on the one-layer
    MedGemma). The weight is set in place here for the same reason."""
    from edgemed.export.onnx_graph import save_graph
    from edgemed.export.onnx_quant import quantize_decoder_int4

    vocab, k = 262144, 2080  # 2.18 GB in fp32
    table = np.random.default_rng(22).standard_normal((vocab, k), dtype=np.float32)
    table *= 0.02
    nodes = [helper.make_node("Transpose", ["head_w"], ["table"], perm=[1, 0], name="t"),
             helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("MatMul", ["emb", "w1"], ["h"], name="mm1"),  # 4-bit first, while the head is kept
             helper.make_node("MatMul", ["h", "head_w"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])],
                              [numpy_helper.from_array(np.eye(k, dtype=np.float32), "w1")])  # exact in 4 bits
    big = graph.initializer.add()
    big.name, big.data_type = "head_w", TensorProto.FLOAT
    big.dims.extend([k, vocab])
    big.raw_data = np.ascontiguousarray(table.T).tobytes()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = tmp_path / "decoder.onnx"
    save_graph(model, path)
    del model, graph, big
    ids = np.array([[0, 7, vocab - 1]], np.int64)
    rows = table[ids[0]]
    want = rows @ table[:4096].T  # the first 4096 logits are enough to see the head's bytes
    del table
    desc = quantize_decoder_int4(path, 32, 4)
    assert "on 1 weights" in desc and "LM head and the embedding tied to it 8-bit" in desc
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node} >= {"MatMulNBits",
                                                                                              "GatherBlockQuantized"}
    logits = sess.run(None, {"ids": ids})[0][0, :, :4096]
    assert np.abs(logits - want).max() < 0.02 * np.abs(want).max()
