"""Importance matrices (edgemed.export.imatrix) and calibrated GGUF export: the matrices come from the right
layers, calibration changes the quantized bytes, and bad calibration data is refused before anything is written."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_vqa

from edgemed.errors import DataError

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")


def _cal(model: Path, data: Path, which: tuple[str, ...] = ("text",)):
    from edgemed.archs import arch_for_dir
    from edgemed.export import imatrix
    from edgemed.export.gguf import Checkpoint, load_config, plan_tensors

    spec, config, ckpt = arch_for_dir(model), load_config(model), Checkpoint(model)
    entries = [e for w in which for e in plan_tensors(spec, config, ckpt, w)]
    records, sha = imatrix.read_calibration(data)
    return imatrix.compute_imatrix(model, records, data, sha, ckpt, entries, max_tokens=64), entries


def test_matrices_cover_every_text_matrix_and_share_inputs(tiny_model, tmp_path):
    model = tiny_model("llama")
    cal, entries = _cal(model, write_vqa(tmp_path / "d", n=4, image=False))
    two_d = {e.name for e in entries if len(e.shape) == 2 and e.name != "token_embd.weight"}
    assert two_d <= set(cal.matrices), sorted(two_d - set(cal.matrices))
    for e in entries:  # each matrix has one value per input column (GGUF ne[0])
        if e.name in cal.matrices:
            assert cal.matrices[e.name].shape == (e.shape[-1],) and (cal.matrices[e.name] >= 0).all()
    # q, k and v read the same normed hidden state, gate and up too: a mis-mapped layer would break this
    assert np.array_equal(cal.matrices["blk.0.attn_q.weight"], cal.matrices["blk.0.attn_v.weight"])
    assert np.array_equal(cal.matrices["blk.1.ffn_gate.weight"], cal.matrices["blk.1.ffn_up.weight"])
    assert not np.array_equal(cal.matrices["blk.0.attn_q.weight"], cal.matrices["blk.1.attn_q.weight"])
    # every token of every sample reached every decoder layer once
    assert cal.counts["blk.0.attn_q.weight"] == cal.tokens == cal.counts["blk.1.ffn_down.weight"]
    assert cal.samples == 4 and cal.images == 0 and len(cal.sha256) == 64


def test_vision_tower_and_projector_get_matrices_from_the_images(tiny_model, tmp_path):
    model = tiny_model("llava")
    cal, entries = _cal(model, write_vqa(tmp_path / "d", n=2, image=True), ("text", "vision"))
    vision = {e.name for e in entries if len(e.shape) == 2 and e.name.startswith(("v.", "mm."))
              and "embd" not in e.name}  # position embeddings are added, not multiplied: no matrix
    assert vision and vision <= set(cal.matrices), sorted(vision - set(cal.matrices))
    assert cal.images == 2
    # the decoder saw the image tokens: the one placeholder of each prompt expanded into the image's patches
    assert cal.counts["blk.0.attn_q.weight"] > cal.tokens
    assert cal.counts["blk.0.attn_q.weight"] > cal.counts["mm.0.weight"] > 0


def test_calibration_changes_the_quantized_bytes_and_is_recorded(mixed_width_llama, tmp_path):
    from edgemed.artifacts import read_manifest
    from edgemed.export.gguf import export_gguf

    model = mixed_width_llama  # 256-wide matrices take q4_K, which the default scope weighs
    data = write_vqa(tmp_path / "d", n=4, image=False)
    plain = export_gguf(model, ["q4_k_m"], tmp_path / "plain", calibrate=False)
    cal = export_gguf(model, ["q4_k_m"], tmp_path / "cal", calibration=data)
    a, b = gguf.GGUFReader(plain / "model-q4_k_m.gguf"), gguf.GGUFReader(cal / "model-q4_k_m.gguf")
    assert [(t.name, t.tensor_type) for t in a.tensors] == [(t.name, t.tensor_type) for t in b.tensors]  # same mix
    changed = [t.name for t, u in zip(a.tensors, b.tensors, strict=True)
               if not np.array_equal(np.asarray(t.data), np.asarray(u.data))]
    assert "blk.0.attn_q.weight" in changed and "output_norm.weight" not in changed
    m = read_manifest(cal)
    c = m["calibration"]
    assert c["samples"] == 4 and c["data"] == str(data.absolute()) and len(c["data_sha256"]) == 64
    assert c["imatrix_sha256"] and (cal / "imatrix.gguf").is_file() and "imatrix.gguf" in m["files"]
    assert read_manifest(plain)["calibration"] is None
    assert b.get_field("edgemed.calibration.imatrix_sha256").contents() == c["imatrix_sha256"]

    from edgemed.backends import open_model

    with contextlib.closing(open_model(cal, quant="q4_k_m")) as be:
        assert np.isfinite(be.logits(be.tokenize("Which side is bright?"))).all()  # llama.cpp loads it


def test_corrupt_calibration_file_is_refused_with_no_output(tiny_model, tmp_path):
    from edgemed.export.gguf import export_gguf

    model = tiny_model("llama")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok", "answer": "yes"}\n{"question": 3\n')
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        export_gguf(model, ["q4_k_m"], out, calibration=bad)
    msg = str(e.value)
    assert "calibration" in msg and f"{bad}:2" in msg and "\n" not in msg
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="calibration"):
        export_gguf(model, ["q4_k_m"], out, calibration=empty)
    assert not out.exists()


def test_cli_refuses_corrupt_calibration(tiny_model, tmp_path):
    from click.testing import CliRunner

    from edgemed.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    r = CliRunner().invoke(main, ["export", "gguf", str(tiny_model("llama")), "--quant", "q4_k_m", "--calibration",
                                  str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "calibration" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_imatrix_file_is_in_llama_cpp_layout(tiny_model, tmp_path):
    from edgemed.export import imatrix

    cal, _ = _cal(tiny_model("llama"), write_vqa(tmp_path / "d", n=2, image=False))
    path = imatrix.write_imatrix(cal, tmp_path / "imatrix.gguf")
    r = gguf.GGUFReader(path)
    t = {x.name: x for x in r.tensors}
    name = "blk.0.attn_q.weight"
    sums, counts = np.asarray(t[f"{name}.in_sum2"].data).reshape(-1), np.asarray(t[f"{name}.counts"].data)
    assert np.allclose(sums / counts.reshape(-1)[0], cal.matrices[name], rtol=1e-5)
    assert json.loads(r.get_field("edgemed.calibration").contents())["imatrix_sha256"] == cal.sha256


def test_mmproj_q5_0_is_calibrated_and_keeps_the_image_embeddings(tiny_model, tmp_path):
    from edgemed.backends import open_model
    from edgemed.export.gguf import export_gguf
    from edgemed.parity import mean_cosine

    model = tiny_model("llava")
    data = write_vqa(tmp_path / "d", n=2, image=True)
    f16 = export_gguf(model, ["f16"], tmp_path / "f16")
    q5 = export_gguf(model, ["f16"], tmp_path / "q5", mmproj_quant="q5_0", calibration=data)
    plain = export_gguf(model, ["f16"], tmp_path / "plain", mmproj_quant="q5_0", calibrate=False)
    r = {t.name: t for t in gguf.GGUFReader(q5 / "mmproj-q5_0.gguf").tensors}
    p = {t.name: t for t in gguf.GGUFReader(plain / "mmproj-q5_0.gguf").tensors}
    T = gguf.GGMLQuantizationType
    assert r["v.blk.0.attn_q.weight"].tensor_type == T.Q5_0 and r["v.patch_embd.weight"].tensor_type == T.F32
    assert r["mm.0.weight"].tensor_type == T.Q8_0  # the projector stays 8-bit
    assert not np.array_equal(np.asarray(r["v.blk.0.attn_q.weight"].data), np.asarray(p["v.blk.0.attn_q.weight"].data))
    from PIL import Image

    img = Image.open(data.parent / "img0.png").convert("RGB")
    with contextlib.closing(open_model(f16, quant="f16")) as a, \
            contextlib.closing(open_model(q5, quant="f16")) as b:
        assert mean_cosine(a.image_embeddings(img), b.image_embeddings(img)) > 0.99


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_checkpoint_fingerprints_read_a_few_values_and_equal_the_loaded_ones(tmp_path, dtype):
    """Matching weights by value read each checkpoint matrix whole beside the loaded model (MedGemma one-layer:
    a 5.5 GB spike over its 3.5 GB model for the 262k x 2560 bf16 embedding); the strided read gives the same
    fingerprint from 97 values."""
    import torch
    from safetensors.torch import save_file

    from edgemed.export.gguf_tensors import Checkpoint
    from edgemed.export.imatrix import checkpoint_fingerprint, weight_fingerprint

    g = torch.Generator().manual_seed(3)
    tensors = {"a.weight": torch.randn(300, 64, generator=g), "b.weight": torch.randn(5, 7, generator=g),
               "c.weight": torch.randn(64, 64, generator=g)}
    save_file({k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    prints = set()
    for key in tensors:
        full = ckpt.get(key)
        assert full.dtype == np.float32
        np.testing.assert_array_equal(full, tensors[key].to(getattr(torch, dtype)).float().numpy())
        assert checkpoint_fingerprint(ckpt, key) == weight_fingerprint(full)
        np.testing.assert_array_equal(ckpt.strided(key, 3, 10), full.reshape(-1)[::3][:10])
        prints.add(checkpoint_fingerprint(ckpt, key))
    assert len(prints) == 3


def _blocks(path: Path) -> dict[str, tuple[int, bytes]]:
    return {t.name: (int(t.tensor_type), np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def test_k_quant_scope_weighs_k_quants_only_and_reuses_an_earlier_exports_matrices(mixed_width_llama, tmp_path):
    """--imatrix-types k-quants: the k-quant tensors are the calibrated file's, the legacy fallback tensors the
    uncalibrated file's, byte for byte; --calibration imatrix.gguf reuses the matrices (no model run) and keeps
    the data's provenance."""
    from edgemed.artifacts import read_manifest
    from edgemed.export.gguf import export_gguf

    T = gguf.GGMLQuantizationType
    model, data = mixed_width_llama, write_vqa(tmp_path / "d", n=4, image=False)
    plain = _blocks(export_gguf(model, ["q4_k_m"], tmp_path / "plain", calibrate=False) / "model-q4_k_m.gguf")
    cal_dir = export_gguf(model, ["q4_k_m"], tmp_path / "cal", calibration=data, imatrix_types="all")
    computed = _blocks(cal_dir / "model-q4_k_m.gguf")
    # the file keeps float32 sums and counts (llama.cpp's layout); the matrices it reads back are those used
    full = _blocks(export_gguf(model, ["q4_k_m"], tmp_path / "re", calibration=cal_dir / "imatrix.gguf",
                               imatrix_types="all") / "model-q4_k_m.gguf")
    assert full == computed
    k_dir = export_gguf(model, ["q4_k_m"], tmp_path / "k", calibration=cal_dir / "imatrix.gguf",
                        imatrix_types="k-quants")
    kq = _blocks(k_dir / "model-q4_k_m.gguf")
    kinds = {T(t).name for t, _ in plain.values()}
    assert {"Q4_K", "Q5_0"} <= kinds, kinds  # the fixture mixes both
    for name, (t, b) in kq.items():
        legacy = T(t).name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
        assert b == (plain[name][1] if legacy else full[name][1]), (name, T(t).name)
    assert kq != plain and kq != full
    # with no scope asked for, a calibrated export is the k-quants one (ggml_quant.DEFAULT_SCOPE)
    default_dir = export_gguf(model, ["q4_k_m"], tmp_path / "default", calibration=cal_dir / "imatrix.gguf")
    assert _blocks(default_dir / "model-q4_k_m.gguf") == kq
    assert read_manifest(default_dir)["calibration"]["imatrix_types"] == "k-quants"
    c, c0 = read_manifest(k_dir)["calibration"], read_manifest(cal_dir)["calibration"]
    assert c["imatrix_types"] == "k-quants" and c0["imatrix_types"] == "all"
    assert c["data"] == c0["data"] == str(data.absolute()) and c["data_sha256"] == c0["data_sha256"]
    assert c["read_from"] == str((cal_dir / "imatrix.gguf").absolute()) and c["samples"] == 4
    n_k = sum(T(t).name not in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F32", "F16") for t, _ in kq.values())
    assert 0 < c["weighted_tensors"]["q4_k_m"] == n_k < c0["weighted_tensors"]["q4_k_m"]


def test_an_imatrix_file_of_another_model_or_a_broken_one_is_refused_with_no_output(tiny_model, mixed_width_llama,
                                                                                       tmp_path):
    from click.testing import CliRunner

    from edgemed.cli import main
    from edgemed.export.gguf import export_gguf

    data = write_vqa(tmp_path / "d", n=2, image=False)
    other = export_gguf(tiny_model("llama"), ["q4_k_m"], tmp_path / "other", calibration=data) / "imatrix.gguf"
    model_file = export_gguf(tiny_model("llama"), ["f16"], tmp_path / "f16") / "model-f16.gguf"
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(other.read_bytes()[:200])
    for bad, words in ((other, "another model"), (model_file, "not an importance matrix"),
                       (broken, "not a readable GGUF")):
        out = tmp_path / "out"
        r = CliRunner().invoke(main, ["export", "gguf", str(mixed_width_llama), "--quant", "q4_k_m",
                                      "--calibration", str(bad), "--out", str(out)])
        assert r.exit_code != 0 and words in r.output and "Traceback" not in r.output, (bad.name, r.output)
        assert not out.exists()
    r = CliRunner().invoke(main, ["export", "onnx", str(mixed_width_llama), "--quant", "int4",
                                  "--calibration", str(other), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "JSONL" in r.output and not (tmp_path / "o").exists(), r.output
