"""Bad inputs through the command line: a one-line error naming the file, line or key and what to do, a non-zero
exit, and no output folder left behind."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import write_vqa
from PIL import Image

from edgemed.cli import main


def finetune(tmp_path, model, train, extra=None):
    doc = {"model": {"path": str(model)}, "stages": [{"name": "s", "data": {"train": str(train)}, "max_steps": 1}]}
    doc.update(extra or {})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["finetune", str(recipe), "--out", str(out)])
    assert r.exit_code != 0, r.output
    assert not out.exists() and not (tmp_path / "run.partial").exists()
    msg = r.output.strip()
    assert msg.startswith("error: ") and "\n" not in msg and "Traceback" not in msg, msg
    return msg


def vqa_with(tmp_path, image_name, write=None):
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    if write:
        write(folder / image_name)
    p = folder / "train.jsonl"
    p.write_text(json.dumps({"image": image_name, "question": "q?", "answer": "yes"}) + "\n")
    return p


def test_unknown_recipe_key(tiny_model, tmp_path):
    data = write_vqa(tmp_path / "d", n=2, image=False)
    msg = finetune(tmp_path, tiny_model("llama"), data, {"optim": {"learning_rate": 1e-3}})
    assert "optim.learning_rate: unknown key" in msg and "recipe.yaml" in msg


def test_missing_image(tiny_model, tmp_path):
    msg = finetune(tmp_path, tiny_model("llava"), vqa_with(tmp_path, "nope.png"))
    assert "train.jsonl:1" in msg and "nope.png" in msg


def test_corrupt_png(tiny_model, tmp_path):
    def write(p):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(p)
        p.write_bytes(p.read_bytes()[:60])

    msg = finetune(tmp_path, tiny_model("llava"), vqa_with(tmp_path, "bad.png", write))
    assert "bad.png" in msg


def test_dicom_without_pixels(tiny_model, tmp_path):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def write(p):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(p), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.PatientID = "x"
        ds.save_as(p, enforce_file_format=True)

    msg = finetune(tmp_path, tiny_model("llava"), vqa_with(tmp_path, "scan.dcm", write))
    assert "scan.dcm" in msg and "pixel" in msg.lower()


def test_jsonl_line_not_json(tiny_model, tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"question": "q", "answer": "yes", "image": null}\nnot json\n')
    msg = finetune(tmp_path, tiny_model("llama"), p)
    assert "t.jsonl:2" in msg and "JSON" in msg


def test_unsupported_architecture(tiny_model, tmp_path):
    import shutil

    model = shutil.copytree(tiny_model("llama"), tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (model / "config.json").write_text(json.dumps(cfg))
    msg = finetune(tmp_path, model, write_vqa(tmp_path / "d", n=2, image=False))
    assert "falcon" in msg and "llava" in msg and "supported" in msg


def test_adapter_trained_on_another_base(tiny_model, tmp_path):
    import shutil

    base = shutil.copytree(tiny_model("llama"), tmp_path / "base")
    data = write_vqa(tmp_path / "d", n=2, image=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(base)}, "optim": {"batch_size": 2},
                                      "stages": [{"name": "s", "data": {"train": str(data)}, "max_steps": 1}]}))
    assert CliRunner().invoke(main, ["finetune", str(recipe), "--out", str(tmp_path / "run")]).exit_code == 0
    shutil.copy(tiny_model("llama", seed=3) / "model.safetensors", base / "model.safetensors")
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    assert r.exit_code != 0 and "trained on" in r.output and "\n" not in r.output.strip()
    assert not (tmp_path / "merged").exists()


def test_help_is_fast():
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "edgemed.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "finetune" in r.stdout
    # heavy libraries are imported inside commands, never at start-up
    r = subprocess.run([sys.executable, "-c", "import edgemed.cli, sys; print(sorted(m for m in ('torch', "
                        "'transformers', 'llama_cpp', 'onnxruntime') if m in sys.modules))"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "[]"
    assert time.perf_counter() - t0 < 10


@pytest.mark.slow
def test_models_embedded_command(embedded_image):
    r = CliRunner().invoke(main, ["models", "embedded", "--name", "smollm2-135m-llava"])
    assert r.exit_code == 0 and str(embedded_image) in r.output


# ---------------------------------------------------------------- export gguf --auto-quant passes on what it was given
def _record_gguf_exports(monkeypatch) -> list[dict]:
    """Replace the GGUF exporter with one that records its call and stops (auto-quant's first step is an export)."""
    from edgemed.errors import ArtifactError

    calls: list[dict] = []

    def fake(model_dir, quants, out, **kw):
        calls.append({"quants": list(quants), **kw})
        raise ArtifactError("stopped after the export call was recorded")

    monkeypatch.setattr("edgemed.export.gguf.export_gguf", fake)
    return calls


def test_auto_quant_chooses_among_the_quants_given_even_the_default_one(tiny_model, tmp_path, monkeypatch):
    calls = _record_gguf_exports(monkeypatch)
    r = CliRunner().invoke(main, ["export", "gguf", str(tiny_model("llama")), "--auto-quant", "--quant", "f16",
                                  "--mmproj-quant", "q8_0", "--out", str(tmp_path / "auto")])
    assert r.exit_code == 2 and "stopped after the export call" in r.output, r.output
    assert calls and all(c["quants"] == ["f16"] for c in calls), calls  # `--quant f16` is the one candidate
    assert all(c["mmproj_quant"] == "q8_0" for c in calls), calls  # --mmproj-quant reaches the exporter
    assert not [p.name for p in tmp_path.iterdir()], "auto-quant left a folder behind"


def test_auto_quant_without_quant_tries_the_default_candidates(tiny_model, tmp_path, monkeypatch):
    from edgemed.export.auto_quant import DEFAULT_CANDIDATES

    calls = _record_gguf_exports(monkeypatch)
    r = CliRunner().invoke(main, ["export", "gguf", str(tiny_model("llama")), "--auto-quant", "--quant", "q8_0",
                                  "--quant", "q4_k_m", "--out", str(tmp_path / "given")])
    assert r.exit_code == 2 and calls[-1]["quants"] == ["q4_k_m", "q8_0"], (r.output, calls)  # smallest first
    calls.clear()
    r = CliRunner().invoke(main, ["export", "gguf", str(tiny_model("llama")), "--auto-quant",
                                  "--out", str(tmp_path / "auto")])
    assert r.exit_code == 2 and calls, r.output
    assert calls[0]["quants"] == list(DEFAULT_CANDIDATES) and calls[0]["mmproj_quant"] == "f16", calls


def test_auto_quant_passes_every_export_option_to_every_candidate(tiny_model, tmp_path, monkeypatch):
    """--no-calibration, --calibration-samples, --chat-template and --adapter-quant reach each candidate's export
    (they were once dropped under --auto-quant): no calibrated trial, and the adapter trial gets --adapter-quant."""
    from edgemed.errors import ArtifactError

    calls: list[tuple[str, dict]] = []

    def fake(model_dir, quants, out, **kw):
        calls.append((Path(out).name, kw))
        return Path(out)

    def stop(*a, **kw):
        raise ArtifactError("stopped before parity")

    monkeypatch.setattr("edgemed.export.gguf.export_gguf", fake)
    monkeypatch.setattr("edgemed.export.auto_quant.lora_run", lambda model_dir: tmp_path / "run")
    monkeypatch.setattr("edgemed.parity.run_parity", stop)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    r = CliRunner().invoke(main, ["export", "gguf", str(tiny_model("llama")), "--auto-quant", "--no-calibration",
                                  "--calibration-samples", "7", "--chat-template", str(template),
                                  "--adapter-quant", "q8_0", "--out", str(tmp_path / "auto")])
    assert r.exit_code == 2 and "stopped before parity" in r.output, r.output
    assert [name for name, _ in calls] == ["uncalibrated", "adapter"], calls  # --no-calibration: no calibrated trial
    for _, kw in calls:
        assert kw["calibration_samples"] == 7 and kw["chat_template"] == template.read_text(), kw
    assert calls[1][1]["adapter_quant"] == "q8_0" and calls[1][1]["calibrate"] is False, calls


def test_a_usage_error_raised_by_a_command_is_a_usage_error_not_a_bug(tiny_model, tmp_path):
    """Options that contradict each other are found inside some commands; click's usage error must reach the user
    as such (exit 2, the usage line), not as edgemed's "internal error ... this is a bug" with a crash log."""
    from click.testing import CliRunner

    from edgemed.cli import main

    r = CliRunner().invoke(main, ["export", "gguf", str(tiny_model("llama")), "--auto-quant", "--compensate", "8",
                                  "--out", str(tmp_path / "g")])
    assert r.exit_code == 2, r.output
    assert "--auto-quant does not try --compensate" in r.output and "internal error" not in r.output, r.output
    assert not (tmp_path / "g").exists()
