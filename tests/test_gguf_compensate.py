"""`export gguf RUN --compensate RANK`: a run's LoRA plus a low-rank correction of the 4-bit base's rounding error
in one llama.cpp adapter file (edgemed.export.lowrank). The stacking must be exact, the weighted SVD must beat an
unweighted one where the activations say it should, llama.cpp's base+corrected adapter must be closer to the run
than base+plain adapter, and bad requests must be refused with nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from test_export_gguf_adapter import train_run

from edgemed.artifacts import read_manifest
from edgemed.errors import EdgemedError, ExportError
from edgemed.export import lowrank


def test_stacked_pair_under_llama_cpps_scale_is_lora_plus_correction():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 24)).astype(np.float32), rng.normal(size=(16, 4)).astype(np.float32)
    u, v = rng.normal(size=(16, 3)).astype(np.float32), rng.normal(size=(3, 24)).astype(np.float32)
    sa, sb = lowrank.stack((a, b, 2.0), (u, v))
    assert sa.shape == (7, 24) and sb.shape == (16, 7)
    got = lowrank.FILE_ALPHA / sa.shape[0] * sb @ sa  # what llama.cpp adds: alpha / r * B A
    np.testing.assert_allclose(got, 2.0 * b @ a + u @ v, rtol=1e-5, atol=1e-5)
    ca, cb = lowrank.stack(None, (u, v))  # a matrix with no LoRA: the correction alone
    np.testing.assert_allclose(lowrank.FILE_ALPHA / ca.shape[0] * cb @ ca, u @ v, rtol=1e-5, atol=1e-5)


def test_weighted_correction_targets_the_columns_that_carry_activation():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 96)).astype(np.float32)
    q = w + rng.normal(scale=0.1, size=w.shape).astype(np.float32)  # a rounding error with no structure
    imat = np.full(96, 1e-3, np.float32)
    imat[:8] = 100.0  # eight outlier input channels carry almost all the signal
    x = rng.normal(size=(512, 96)).astype(np.float32) * np.sqrt(imat)

    def out_err(uv):
        return float(np.linalg.norm(x @ (w - q - uv).T))

    u, v = lowrank.correction(w, q, imat, rank=8)
    uu, uv_ = lowrank.correction(w, q, None, rank=8)
    assert u.shape == (64, 8) and v.shape == (8, 96)
    none = out_err(np.zeros_like(w))
    assert out_err(u @ v) < 0.1 * none, "the weighted rank-8 fix should remove the outlier columns' error"
    assert out_err(u @ v) < 0.5 * out_err(uu @ uv_), "weighting by the importance matrix did not help"
    np.testing.assert_array_equal(lowrank.correction(w, q, imat, rank=8)[0], u)  # deterministic bytes


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    from edgemed.export.gguf_adapter import export_gguf_run

    tmp = tmp_path_factory.mktemp("compensate")
    run = train_run(tiny_model("llama"), tmp, {"decoder": "lora"})
    plain = export_gguf_run(run, ["q4_0"], tmp / "plain")
    fixed = export_gguf_run(run, ["q4_0"], tmp / "fixed", compensate=16)
    return run, plain, fixed


def _kl(p_logits, q_logits):
    p = np.exp(p_logits - p_logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    lq = q_logits - q_logits.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return float((p * (np.log(p + 1e-30) - lq)).sum(-1).mean())


def test_corrected_adapter_is_closer_to_the_run_than_the_plain_one(runs):
    import gguf

    from edgemed.backends.llamacpp import LlamaCppBackend
    from edgemed.backends.pytorch import TorchBackend

    run, plain, fixed = runs
    m = read_manifest(fixed)
    assert m["compensated"] == {"q4_0": "adapter-f16-q4_0.gguf"} and m["compensation"]["rank"] == 16
    assert m["compensation"]["calibration"]["samples"] > 0  # weighted by the run's own training data
    assert m["binding"]["compensated"]["q4_0"] == m["files"]["adapter-f16-q4_0.gguf"]
    # the same llama.cpp base bytes in both folders: only the adapter differs
    assert m["binding"]["base"]["q4_0"] == read_manifest(plain)["binding"]["base"]["q4_0"]
    quantized = {t.name for t in gguf.GGUFReader(fixed / "model-q4_0.gguf").tensors
                 if t.name.startswith("blk.") and len(t.shape) == 2 and t.tensor_type not in (0, 1)}
    pairs = {t.name.rsplit(".", 1)[0] for t in gguf.GGUFReader(fixed / "adapter-f16-q4_0.gguf").tensors}
    assert quantized and quantized <= pairs

    ref = TorchBackend(run, device="cpu")
    a = LlamaCppBackend(plain, quant="q4_0", n_threads=1, n_ctx=512, kv_type="f32")
    b = LlamaCppBackend(fixed, quant="q4_0", n_threads=1, n_ctx=512, kv_type="f32")
    try:
        kl_plain = kl_fixed = 0.0
        for text in (ref.render("Is there a lesion in the left lung?"), "Magnetic resonance imaging of the knee"):
            tokens = ref.tokenize(text)
            want = ref.logits(tokens)
            kl_plain += _kl(want, a.logits(tokens))
            kl_fixed += _kl(want, b.logits(tokens))
    finally:
        ref.close()
        a.close()
        b.close()
    print(f"KL to the run: corrected {kl_fixed:.4g}, plain {kl_plain:.4g}")
    assert kl_fixed < 0.7 * kl_plain, f"KL to the run: corrected {kl_fixed:.3g}, plain {kl_plain:.3g}"


def test_bad_compensate_requests_are_refused_and_write_nothing(runs, tiny_model, tmp_path):
    from edgemed.cli import main
    from edgemed.export.gguf import export_gguf

    run = runs[0]
    with pytest.raises(ExportError, match="rounded by llama.cpp"):
        export_gguf(run, ["f16"], tmp_path / "a", compensate=8)
    with pytest.raises(ExportError, match="at least 1"):
        export_gguf(run, ["q4_0"], tmp_path / "b", compensate=-1)
    with pytest.raises(ExportError, match="give the run folder"):
        export_gguf(tiny_model("llama"), ["q4_0"], tmp_path / "c", compensate=8)
    bad = tmp_path / "cal.jsonl"
    bad.write_text('{"question": "q"\n')
    with pytest.raises(EdgemedError, match="calibration"):
        export_gguf(run, ["q4_0"], tmp_path / "d", compensate=8, calibration=bad)
    res = CliRunner().invoke(main, ["export", "gguf", str(run), "--quant", "q4_0", "--compensate", "8",
                                    "--auto-quant", "--out", str(tmp_path / "e")])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert not any((tmp_path / n).exists() for n in "abcde")
