"""llama.cpp's kernels through libggml-base (edgemed.export.ggml_quant): without a matrix the requantized file is
llama.cpp's own, byte for byte; with one the weighted tensors change and fit the columns that matter better."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")


def test_requantize_without_matrix_reproduces_llama_cpp_bytes(tiny_model, tmp_path):
    from edgemed.export.ggml_quant import requantize
    from edgemed.export.gguf import export_gguf, llama_quantize

    f16 = export_gguf(tiny_model("llama"), ["f16"], tmp_path / "f16") / "model-f16.gguf"
    for q in ("q4_k_m", "iq4_xs"):
        plain = llama_quantize(f16, tmp_path / f"{q}.gguf", q)
        again = tmp_path / f"{q}-again.gguf"
        requantize(plain, f16, again, None)
        a, b = gguf.GGUFReader(plain), gguf.GGUFReader(again)
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
        for t, u in zip(a.tensors, b.tensors, strict=True):
            assert t.tensor_type == u.tensor_type and np.array_equal(np.asarray(t.data), np.asarray(u.data)), t.name
        assert {k for k in a.fields if not k.startswith("GGUF.")} == {k for k in b.fields if not k.startswith("GGUF.")}


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_0", "IQ4_XS", "Q3_K"])
def test_matrix_weights_the_rounding_toward_important_columns(qtype):
    from edgemed.export.ggml_quant import quantize

    t = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    imp = np.ones(256, np.float32)
    imp[::8] = 100.0  # a few columns carry most of the activation energy

    def err(q):
        d = gguf.quants.dequantize(q, t).reshape(w.shape)
        return float((((d - w) ** 2) * imp).sum())

    plain, weighted = quantize(w, t), quantize(w, t, imp)
    assert plain.shape == weighted.shape and not np.array_equal(plain, weighted)
    assert err(weighted) < 0.9 * err(plain)  # the weighted error, the one the matrix asks to keep small


def test_wrong_matrix_length_is_refused():
    from edgemed.errors import ExportError
    from edgemed.export.ggml_quant import quantize

    with pytest.raises(ExportError, match="does not match"):
        quantize(np.zeros((2, 64), np.float32), gguf.GGMLQuantizationType.Q5_0, np.ones(32, np.float32))
