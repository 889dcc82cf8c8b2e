"""A tampered bundle fails verify, naming the file: one byte changed, a file missing, a file added, the
manifest edited. A clean bundle passes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgemed.artifacts import write_manifest
from edgemed.bundle import finalize, verify
from edgemed.cli import main


@pytest.fixture
def bundle(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model-q8_0.gguf").write_bytes(bytes(range(256)) * 64)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "parity.json").write_text('{"passed": true}')
    # exports record the base model as a string with its sha beside it, as export gguf writes
    write_manifest(folder, "gguf", name="t", quants=["q8_0"], arch="llama", base_model="HuggingFaceTB/SmolLM2",
                   base_model_sha256="ab" * 32)
    finalize(folder, summary={"parity": "passed"})
    return folder


def test_clean_bundle_verifies(bundle):
    assert verify(bundle) == []
    r = CliRunner().invoke(main, ["verify", str(bundle)])
    assert r.exit_code == 0 and "OK" in r.output
    card = (bundle / "README.md").read_text()
    assert "HuggingFaceTB/SmolLM2" in card and "abababab" in card


def test_one_byte_changed_is_named(bundle):
    p = bundle / "model-q8_0.gguf"
    data = bytearray(p.read_bytes())
    data[1000] ^= 1
    p.write_bytes(bytes(data))
    problems = verify(bundle)
    assert len(problems) == 1 and "model-q8_0.gguf" in problems[0] and "sha256" in problems[0]
    r = CliRunner().invoke(main, ["verify", str(bundle)])
    assert r.exit_code == 1 and "model-q8_0.gguf" in r.output


def test_missing_and_added_files_are_named(bundle):
    (bundle / "tokenizer.json").unlink()
    (bundle / "extra.bin").write_bytes(b"x")
    problems = "\n".join(verify(bundle))
    assert "tokenizer.json: missing" in problems and "extra.bin: not in the manifest" in problems


def test_edited_manifest_is_caught(bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    m["arch"] = "qwen2"
    (bundle / "manifest.json").write_text(json.dumps(m))
    problems = verify(bundle)
    assert problems and "manifest.json" in problems[0] and "edited" in problems[0]


def test_edited_file_hash_in_manifest_is_caught(bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"]["model-q8_0.gguf"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(m))
    assert any("edited" in p for p in verify(bundle))


def test_folder_without_manifest(tmp_path):
    assert "missing" in verify(tmp_path)[0]


def test_parity_measured_on_another_llama_cpp_build_is_noted(tmp_path, monkeypatch):
    """A parity report holds for the runtime build it was measured with: verify (still OK) and serve say so when
    this machine runs another build, and say nothing when it is the same."""
    import warnings

    import edgemed.machine as machine
    from edgemed.bundle import PARITY_REPORT, parity_drift
    from edgemed.serve.models import _warn_drift

    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "model-q4_k_m.gguf").write_bytes(b"GGUF" + bytes(60))
    report = tmp_path / "parity.json"
    report.write_text(json.dumps({"passed": True, "runtimes": {"llama_cpp": "0.3.36+aaaaaaaaaaaa"}}))
    write_manifest(folder, "gguf", models={"q4_k_m": "model-q4_k_m.gguf"})
    finalize(folder, {PARITY_REPORT: report})
    monkeypatch.setattr(machine, "runtime_versions", lambda: {"llama_cpp": "0.3.36+aaaaaaaaaaaa", "onnxruntime": "1"})
    assert parity_drift(folder) is None
    monkeypatch.setattr(machine, "runtime_versions", lambda: {"llama_cpp": "0.3.40+bbbbbbbbbbbb", "onnxruntime": "1"})
    drift = parity_drift(folder)
    assert drift and "0.3.36+aaaaaaaaaaaa" in drift and "0.3.40+bbbbbbbbbbbb" in drift and "edgemed parity" in drift
    r = CliRunner().invoke(main, ["verify", str(folder)])
    assert r.exit_code == 0 and "OK" in r.output and "note" in r.output and "0.3.40" in r.output
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _warn_drift(folder)
    assert any("0.3.36+aaaaaaaaaaaa" in str(w.message) for w in seen)
