"""What makes parity fast changes no figure: batched reference forwards and generation equal the one-at-a-time
ones up to float summation order, a runtime that keeps the prompt prefix in its cache gives the logits and answers
of a fresh one, the one-pass GGUF header reader sees what gguf-py sees, and the greedy check is bounded."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ARCHS, GGUF_ARCHS, write_vqa
from test_parity import copy_model, perturb_one

from edgemed.backends.base import GenParams
from edgemed.parity import GENERAL_PROMPTS, GREEDY_PROBES, GREEDY_TOKENS, compare_logits, run_parity

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing")
needs_onnx = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime missing")
GREEDY = GenParams(max_tokens=GREEDY_TOKENS, temperature=0.0)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGEMED_PARITY_CACHE_DIR", str(tmp_path / "parity-ref"))
    return tmp_path / "parity-ref"


def _old_compare(ref: np.ndarray, cand: np.ndarray):
    """compare_logits as it was before the reference side was worked out once (float64 log-softmax, full sort)."""
    def lsm(x):
        x = x.astype(np.float64)
        m = x.max(axis=-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))

    lr, lc = lsm(ref), lsm(cand)
    srt = np.sort(ref, axis=-1)
    return (np.maximum((np.exp(lr) * (lr - lc)).sum(-1), 0), ref.argmax(-1) == cand.argmax(-1),
            np.abs(ref.astype(np.float64) - cand).max(-1), (srt[:, -1] - srt[:, -2]).astype(np.float64))


def test_compare_logits_gives_the_figures_it_gave_before():
    from edgemed.parity import RefLogits

    rng = np.random.default_rng(3)
    ref = (rng.standard_normal((20, 5000)) * 4).astype(np.float32)
    for scale in (0.0, 1e-4, 0.3):
        cand = ref + (rng.standard_normal(ref.shape) * scale).astype(np.float32)
        kl, top1, diff, margin = _old_compare(ref, cand)
        for r in (ref, RefLogits.of(ref)):
            got = compare_logits(r, cand)
            assert np.allclose(got.kl, kl, rtol=1e-9, atol=1e-14), (scale, np.abs(got.kl - kl).max())
            assert (got.top1 == top1).all() and (got.margin == margin).all()
            assert np.allclose(got.diff, diff, rtol=1e-6, atol=0)
    narrow = compare_logits(RefLogits.of(ref), cand[:, :4000])  # widths differ: the common vocabulary
    assert np.allclose(narrow.kl, _old_compare(ref[:, :4000], cand[:, :4000])[0], rtol=1e-9, atol=1e-14)


def test_greedy_check_is_bounded_and_spread():
    from edgemed.parity.compare import _parted, greedy_probes

    picked = greedy_probes(32)
    assert len(picked) == GREEDY_PROBES and min(picked) == 0 and max(picked) == 31
    assert greedy_probes(4) == {0, 1, 2, 3} and greedy_probes(0) == set()
    # an answer is cut only once it can no longer equal the reference's, stripped
    want = "The lobes are three."
    assert not _parted(" The lobes", want) and not _parted("The lobes are three. ", want)
    assert _parted("The lungs", want) and not _parted("  ", "x")


# ---------------------------------------------------------------- PyTorch: batched = one at a time
@pytest.mark.parametrize("arch", ARCHS)
def test_pytorch_batched_forward_and_generation_equal_one_at_a_time(arch, tiny_model):
    from edgemed.backends.pytorch import TorchBackend

    b = TorchBackend(tiny_model(arch), device="cpu", n_threads=1)
    try:
        prompts = [b.render(q) for q in GENERAL_PROMPTS[:5]]
        single = ["".join(b.generate(p, params=GREEDY)) for p in prompts]
        assert b.generate_batch(prompts, GREEDY) == single
        seqs = [b.tokenize(p + a) for p, a in zip(prompts, single, strict=True)]
        for one, many in zip((b.logits(s) for s in seqs), b.logits_batch(seqs), strict=True):
            assert one.shape == many.shape and np.allclose(one, many, rtol=1e-4, atol=1e-5), np.abs(one - many).max()
    finally:
        b.close()


def test_parity_figures_equal_with_and_without_batching(tiny_model, tmp_path, monkeypatch):
    from edgemed.backends.pytorch import TorchBackend

    ref = tiny_model("qwen2")
    probes = write_vqa(tmp_path / "probes", n=4, image=False)
    cand = copy_model(ref, tmp_path / "cand")
    perturb_one(cand, scale=0.5)
    batched = run_parity(cand, reference=ref, probes=probes, localise=False)
    monkeypatch.setenv("EDGEMED_PARITY_CACHE", "off")
    monkeypatch.setattr(TorchBackend, "logits_batch", None)  # the reference then goes one probe at a time
    monkeypatch.setattr(TorchBackend, "generate_batch", None)
    single = run_parity(cand, reference=ref, probes=probes, localise=False)
    assert batched.reference_cache["forwards"]["logits"] == 1 and single.reference_cache["forwards"]["logits"] == 4
    assert batched.passed == single.passed and batched.positions == single.positions
    a, b = batched.rows[0].metrics, single.rows[0].metrics
    for key in ("kl_mean", "kl_p99", "kl_max", "logit_diff_max"):
        assert np.isclose(getattr(a, key), getattr(b, key), rtol=1e-3, atol=1e-9), (key, a, b)
    assert (a.top1, a.greedy_match, a.flip_rate) == (b.top1, b.greedy_match, b.flip_rate)


# ---------------------------------------------------------------- exports: the cached prompt prefix
def _script(b, prompts: list[str], fresh) -> list[tuple[np.ndarray, str]]:
    """Per prompt, as parity asks: teacher-forced logits of prompt + a continuation, then the greedy answer."""
    out = []
    for p in prompts:
        seq = b.tokenize(p + " and so the answer is this")
        fresh()
        lg = b.logits(seq)
        fresh()
        out.append((lg, "".join(b.generate(p, params=GREEDY))))
    return out


def _equal_runs(b, reset) -> None:
    prompts = [b.render(q) for q in GENERAL_PROMPTS[:4]]
    cold = _script(b, prompts, reset)
    warm = _script(b, prompts, lambda: None)
    for (la, aa), (lb, ab) in zip(cold, warm, strict=True):
        assert aa == ab and np.allclose(la, lb, rtol=1e-5, atol=1e-6), np.abs(la - lb).max()


@needs_gguf
@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_llamacpp_prompt_prefix_reuse_changes_nothing(arch, tiny_model, tmp_path):
    from edgemed.backends.llamacpp import LlamaCppBackend, _Cached
    from edgemed.export.gguf import export_gguf

    b = LlamaCppBackend(export_gguf(tiny_model(arch), ["f32"], tmp_path / "gguf"), n_threads=1)
    try:
        def reset():
            b._kv = _Cached()

        _equal_runs(b, reset)
        seq = b.tokenize(b.render(GENERAL_PROMPTS[0]))
        b.logits(seq)
        assert b._kv.tokens == seq and len(b._kv.rows) == len(seq)  # what the next prompt may start from
    finally:
        b.close()


@needs_onnx
def test_onnx_prompt_prefix_reuse_changes_nothing(tiny_model, tmp_path):
    from edgemed.backends.onnx import OnnxBackend
    from edgemed.export.onnx import export_onnx

    b = OnnxBackend(export_onnx(tiny_model("llama"), "fp32", tmp_path / "onnx"), n_threads=1)
    assert b.reuse_prefix is False  # off unless parity asks: with int8 activations a suffix run rounds differently
    b.reuse_prefix = True
    try:
        def reset():
            b._kept = None

        _equal_runs(b, reset)
        assert b._kept is not None
    finally:
        b.close()


# ---------------------------------------------------------------- GGUF headers in one pass
@needs_gguf
def test_gguf_header_reads_what_gguf_py_reads(tiny_model, tmp_path):
    import gguf

    from edgemed.errors import ArtifactError
    from edgemed.export.gguf import export_gguf
    from edgemed.files import check_gguf
    from edgemed.gguf_header import StringArray, read_header

    out = export_gguf(tiny_model("llama"), ["q8_0"], tmp_path / "gguf")
    file = next(out.glob("model-*.gguf"))
    ours, theirs = read_header(file), gguf.GGUFReader(file)
    for key, f in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        want, got = f.contents(), ours.fields[key]
        if isinstance(got, StringArray):
            assert got.count == len(want), key
        elif isinstance(got, np.ndarray):
            assert got.tolist() == want, key
        else:
            assert got == want, key
    assert [(t.name, t.offset, t.nbytes, t.ggml_type) for t in ours.tensors] == [
        (t.name, int(t.data_offset), int(t.n_bytes), int(t.tensor_type)) for t in theirs.tensors]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(file.read_bytes()[: file.stat().st_size - 10])
    with pytest.raises(ValueError, match="past the end"):
        read_header(cut)
    with pytest.raises(ArtifactError, match="cut short"):
        check_gguf(cut)
    (tmp_path / "text.gguf").write_text(json.dumps({"not": "gguf"}) * 4)
    with pytest.raises(ArtifactError, match="not a GGUF file"):
        check_gguf(tmp_path / "text.gguf")


def test_greedy_batches_are_bounded_by_one_step_of_logits(tiny_model, monkeypatch):
    """Greedy answers keep one logits row per sequence at a step, so their batches may be far wider than the
    teacher-forced ones (each decode step reads every weight once per batch), within both budgets."""
    from edgemed.backends import pytorch
    from edgemed.backends.pytorch import TorchBackend

    b = TorchBackend(tiny_model("qwen2"), device="cpu", n_threads=1)
    try:
        vocab = int(b.model.get_output_embeddings().weight.shape[0])
        monkeypatch.setattr(pytorch, "BATCH_LOGIT_BYTES", 4 * vocab * 100)  # 100 rows of logits
        lengths = [30 + (7 * i) % 20 for i in range(32)]
        forced, greedy = b._groups(lengths), b._groups(lengths, rows_per_token=False)
        for groups in (forced, greedy):
            assert sorted(i for g in groups for i in g) == list(range(32))
        assert all(len(g) * max(lengths[i] for i in g) <= 100 for g in forced)  # logits rows of every token
        assert len(greedy) == 1 and len(forced) >= 10
        monkeypatch.setattr(pytorch, "GENERATE_TOKENS", 200)
        greedy = b._groups(lengths, rows_per_token=False)
        assert all(len(g) * max(lengths[i] for i in g) <= 200 for g in greedy) and len(greedy) > 1
    finally:
        b.close()
