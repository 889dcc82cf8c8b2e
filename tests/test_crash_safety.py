"""Crash safety: a fine-tune killed with SIGKILL resumes from its last checkpoint and reaches the same result;
an export killed mid-way leaves nothing that looks complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import write_vqa
from safetensors.torch import load_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgemed.cli", *args]


def recipe(tmp_path, model, data, steps):
    p = tmp_path / f"r{steps}.yaml"
    p.write_text(yaml.safe_dump({
        "model": {"path": str(model)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "optim": {"batch_size": 2, "lr": 1e-3}, "save_every": 2, "mixed_precision": "no",
        "stages": [{"name": "s", "data": {"train": str(data)}, "max_steps": steps}]}))
    return p


def test_sigkill_then_resume_reaches_same_result(tiny_model, tmp_path):
    data = write_vqa(tmp_path / "data", n=16, image=False)
    r = recipe(tmp_path, tiny_model("llama"), data, 8)
    subprocess.run(cli("finetune", str(r), "--out", str(tmp_path / "straight")), env=ENV, check=True,
                   capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli("finetune", str(r), "--out", str(killed)), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed.partial" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not any(ckpt.glob("step-*")):
        if proc.poll() is not None:
            pytest.fail("the run finished before a checkpoint could be interrupted")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not killed.exists(), "a killed run must not look finished"
    assert any(ckpt.glob("step-*"))
    again = subprocess.run(cli("finetune", str(r), "--out", str(killed)), env=ENV, capture_output=True, text=True)
    assert again.returncode != 0 and "--resume" in again.stderr
    subprocess.run(cli("finetune", str(r), "--out", str(killed), "--resume"), env=ENV, check=True,
                   capture_output=True, timeout=300)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k


@pytest.mark.slow
def test_killed_export_leaves_no_complete_looking_file(embedded_text, tmp_path):
    out = tmp_path / "gguf"
    proc = subprocess.Popen(cli("export", "gguf", str(embedded_text), "--quant", "f16", "--quant", "q4_k_m",
                                "--out", str(out)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".gguf.partial") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(1.0)  # mid-way through writing tensors
    if proc.poll() is not None:
        pytest.skip("the export finished before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(n.startswith(".") and "partial" in n for n in leftovers), leftovers
    # a new export is not blocked by the debris, and finishes complete
    subprocess.run(cli("export", "gguf", str(embedded_text), "--quant", "q8_0", "--out", str(out)), env=ENV,
                   check=True, capture_output=True, timeout=600)
    assert (out / "model-q8_0.gguf").is_file() and (out / "manifest.json").is_file()
