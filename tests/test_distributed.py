"""The fine-tune runs unchanged under torchrun: two CPU processes with the gloo backend (DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import write_vqa


@pytest.mark.slow  # two torchrun processes load and train the model: up to the 300 s timeout on shared cores
def test_two_process_ddp_on_cpu(tiny_model, tmp_path):
    data = write_vqa(tmp_path / "data", n=8, image=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model("llama"))}, "lora": {"r": 4, "alpha": 8},
        "optim": {"batch_size": 2, "lr": 1e-3}, "save_every": 2,
        "stages": [{"name": "s", "data": {"train": str(data)}, "max_steps": 3}]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "edgemed.cli", "finetune", str(recipe), "--out", str(tmp_path / "run")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in log] == [1, 2, 3]  # written once, by rank 0
    assert json.loads((run / "frozen_check.json").read_text())["identical"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run.partial").exists()
