"""``export onnx --quant int4 --mixed POLICY``: each weight's bits follow the type llama.cpp's own quantizer gives
the same matrix (read from a separate `export gguf` of the same model), and the ONNX file holds 8-bit nodes exactly
there."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")

from onnx import helper  # noqa: E402

from edgemed.errors import ExportError  # noqa: E402
from edgemed.export.onnx_mixed import MAX_INT4_BPW, LlamaMix, bits_per_weight  # noqa: E402


def _nbits_nodes(folder) -> dict[str, int]:
    m = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    return {n.name: next(helper.get_attribute_value(a) for a in n.attribute if a.name == "bits")
            for n in m.graph.node if n.op_type == "MatMulNBits"}


@pytest.mark.parametrize("policy, want_bits", [("q4_k_m", 8), ("q4_0", 4)])
def test_mix_follows_llama_cpp_types_and_the_graph_follows_the_mix(tiny_model, tmp_path, policy, want_bits):
    from gguf import GGMLQuantizationType

    from edgemed.artifacts import read_manifest
    from edgemed.export.gguf import export_gguf
    from edgemed.export.onnx import export_onnx
    from edgemed.gguf_header import read_header

    model = tiny_model("llama")
    out = export_onnx(model, "int4", tmp_path / "onnx", mixed=policy)
    gguf_dir = export_gguf(model, [policy], tmp_path / "gguf", calibrate=False)
    types = {t.name: GGMLQuantizationType(t.ggml_type).name
             for t in read_header(gguf_dir / f"model-{policy}.gguf").tensors}
    mix = read_manifest(out, ("onnx",))["graphs"]["decoder"]["mixed"]
    rows = mix["tensors"]
    assert mix["policy"] == policy and rows and mix["int4"] + mix["int8"] == len(rows)
    covered = [g for r in rows for g in r["gguf"]]
    # every 2-D GGUF matrix but the tied embedding (the ONNX LM head, 8-bit in every int4 export) is one ONNX weight's
    matrices = {n for n in types if n.endswith(".weight") and "norm" not in n and n != "token_embd.weight"}
    assert sorted(covered) == sorted(matrices)
    for r in rows:
        assert r["llama_types"] == [types[g] for g in r["gguf"]]  # the types of llama.cpp's own file
        assert r["bits"] == (8 if max(bits_per_weight(t) for t in r["llama_types"]) > MAX_INT4_BPW else 4)
    # llama.cpp on this 64-wide model: q4_k_m falls back to q5_0 / q8_0 everywhere, q4_0 stays q4_0
    assert {r["bits"] for r in rows} == {want_bits}
    assert any(len(r["gguf"]) == 3 for r in rows)  # the builder's packed q, k, v matched part by part
    nodes = _nbits_nodes(out)
    for r in rows:
        stem = r["node"].removesuffix(".q8")
        if r["bits"] == 8:
            assert nodes[r["node"]] == 8 and f"{stem}.q4" not in nodes
        else:
            assert nodes[f"{stem}.q4"] == 4 and r["node"] not in nodes
    # beyond the mix, 8-bit nodes are only the head and the 4-bit weights' corrections
    extra = {n for n, b in nodes.items() if b == 8} - {r["node"] for r in rows if r["bits"] == 8}
    assert len([n for n in extra if ".q4." not in n]) == 1, extra  # the head (its name is the exporter's)


def test_plain_int4_has_no_8_bit_weights_beyond_the_head(tiny_model, tmp_path):
    from edgemed.artifacts import read_manifest
    from edgemed.export.onnx import export_onnx

    out = export_onnx(tiny_model("llama"), "int4", tmp_path / "onnx")
    assert "mixed" not in read_manifest(out, ("onnx",))["graphs"]["decoder"]
    assert not [n for n, b in _nbits_nodes(out).items() if b == 8 and ".q4." not in n and "lm_head" not in n]


def test_packed_weight_parts_and_unmatched_weights():
    from edgemed.export.imatrix import weight_fingerprint

    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(8, 32)).astype(np.float32), rng.normal(size=(4, 32)).astype(np.float32)
    prints = {np.ascontiguousarray(w[0]).tobytes(): [(n, w.shape[0], weight_fingerprint(w))] for n, w in
              (("blk.0.attn_q.weight", q), ("blk.0.attn_k.weight", k))}
    mix = LlamaMix("q4_k_m", {"blk.0.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "Q6_K"}, prints)
    assert mix.parts(np.concatenate([q, k]).T) == ["blk.0.attn_q.weight", "blk.0.attn_k.weight"]
    assert mix("q", q.T, "q.q8") == 4 and mix("qk", np.concatenate([q, k]).T, "qk.q8") == 8  # one part above 4 bits
    assert mix.parts(np.concatenate([q, q[:1] + 1]).T) is None  # a tail that is no matrix
    with pytest.raises(ExportError, match="matches no tensor"):
        mix("noise", rng.normal(size=(32, 8)).astype(np.float32), "n.q8")
    assert [r["bits"] for r in mix.summary()["tensors"]] == [4, 8]


@pytest.mark.parametrize("args, message", [
    (["--quant", "int4", "--mixed", "q9_x"], "unknown llama.cpp policy 'q9_x' for --mixed; choose one of"),
    (["--quant", "int8", "--mixed", "q4_k_m"], "applies to --quant int4 only"),
    (["--mixed", "q4_k_m"], "applies to --quant int4 only (got --quant fp32)"),
])
def test_bad_mixed_values_are_refused_with_no_output(tiny_model, tmp_path, args, message):
    from click.testing import CliRunner

    from edgemed.cli import main

    r = CliRunner().invoke(main, ["export", "onnx", str(tiny_model("llama")), *args, "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()
