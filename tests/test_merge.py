"""Merged weights equal the adapter model: fp32 logits within 1e-4 on every architecture, with LoRA B started
non-zero so the merge does real work; merge is safe to run twice and refuses what it must not merge."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import ARCHS, write_vqa

from edgemed import prompting
from edgemed.archs import REGISTRY
from edgemed.artifacts import tree_sha256
from edgemed.errors import ArtifactError, ExportError
from edgemed.merge import merge
from edgemed.modeling import load_base, load_run
from edgemed.recipe import Recipe
from edgemed.train import finetune


def train_run(model, tmp_path, arch, parts=None):
    vision = REGISTRY[arch].is_vision
    data = write_vqa(tmp_path / "data", n=4, image=vision)
    parts = parts or {"vision": "lora" if vision else "frozen", "projector": "train" if vision else "frozen",
                      "decoder": "lora"}
    recipe = Recipe.model_validate({
        "model": {"path": str(model)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "init": "nonzero"},
        "optim": {"lr": 1e-2, "batch_size": 2}, "stages": [{"name": "s", "data": {"train": str(data)},
                                                             "train": parts, "max_steps": 1}]})
    return finetune(recipe, tmp_path / "run"), data


def logits_pair(run, merged, arch, image_path=None):
    a, b = load_run(run), load_base(merged)
    from PIL import Image

    msgs = prompting.messages("Which side is bright?", image=image_path is not None, typed=b.arch.is_vision)
    text = prompting.render(b.processor, msgs)
    if image_path is not None:
        inputs = b.processor(text=text, images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    else:
        inputs = b.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return a.model(**inputs).logits.float().numpy(), b.model(**inputs).logits.float().numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_logits_equal_adapter_logits(arch, tiny_model, tmp_path):
    run, data = train_run(tiny_model(arch), tmp_path, arch)
    out = merge(run, tmp_path / "merged")
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "model" and m["parent"]["kind"] == "run"
    assert m["merge"]["lora_merged"] > 0
    assert m["merge"]["check_max_abs_logit_diff"] < 1e-4
    a, b = logits_pair(run, out, arch)
    assert np.abs(a - b).max() < 1e-4
    base = load_base(tiny_model(arch))  # the merge changed the model: LoRA B was non-zero
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert (base.model(input_ids=ids).logits - load_base(out).model(input_ids=ids).logits).abs().max() > 1e-3
    if REGISTRY[arch].is_vision:
        a, b = logits_pair(run, out, arch, image_path=data.parent / "img0.png")
        assert np.abs(a - b).max() < 1e-4


def test_layernorm_run_merges(tiny_model, tmp_path):
    run, _ = train_run(tiny_model("llava"), tmp_path, "llava",
                       {"vision": "frozen", "projector": "frozen", "decoder": "layernorm"})
    out = merge(run, tmp_path / "merged")
    assert json.loads((out / "manifest.json").read_text())["merge"]["tensors_replaced"] > 0
    a, b = logits_pair(run, out, "llava")
    assert np.abs(a - b).max() < 1e-5


def test_merge_twice_is_safe(tiny_model, tmp_path):
    run, _ = train_run(tiny_model("llama"), tmp_path, "llama")
    out = merge(run, tmp_path / "merged", check=False)
    first = tree_sha256(out / "model.safetensors")
    with pytest.raises(ArtifactError, match="--overwrite"):
        merge(run, out)
    merge(run, out, overwrite=True, check=False)
    assert tree_sha256(out / "model.safetensors") == first
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name or ".old" in p.name]


def test_adapter_on_another_base_is_refused(tiny_model, tmp_path):
    base = shutil.copytree(tiny_model("llama"), tmp_path / "base")
    data = write_vqa(tmp_path / "data", n=4, image=False)
    recipe = Recipe.model_validate({"model": {"path": str(base)}, "optim": {"batch_size": 2},
                                    "stages": [{"name": "s", "data": {"train": str(data)}, "max_steps": 1}]})
    run = finetune(recipe, tmp_path / "run")
    shutil.copy(tiny_model("llama", seed=1) / "model.safetensors", base / "model.safetensors")
    with pytest.raises(ArtifactError, match="another base|sha256"):
        merge(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_bitsandbytes_base_is_refused(tiny_model, tmp_path):
    run, _ = train_run(tiny_model("llama"), tmp_path, "llama")
    manifest = json.loads((run / "manifest.json").read_text())
    base = shutil.copytree(tiny_model("llama"), tmp_path / "bnb-base")
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(cfg))
    manifest["base_model"].update(path=str(base), sha256=tree_sha256(base))
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="bitsandbytes"):
        merge(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("arch", ["llama", "gemma3", "llava"])
def test_the_bounded_check_sees_what_peft_sees_and_bites(arch, tiny_model, tmp_path):
    """The check's adapter model (LoRA hooks on an offloaded base) gives PEFT's logits, and a merged checkpoint
    with one wrong tensor fails it by far more than the 1e-4 a good merge gives."""
    from safetensors.torch import load_file, save_file

    from edgemed.merge import CHECK_PROMPTS, _add_lora, _logits, _lora_pairs, _offloaded, check_merge
    from edgemed.modeling import load_run

    spec = REGISTRY[arch]
    parts = {"vision": "frozen", "projector": "frozen", "decoder": "lora"}
    run, _ = train_run(tiny_model(arch), tmp_path, arch, parts)
    out = merge(run, tmp_path / "merged", check=False)
    ids = [torch.tensor([[1, 5, 9, 12, 3]])]
    pairs, scale = _lora_pairs(run)
    ref = _offloaded(tiny_model(arch), spec, tmp_path / "off")
    _add_lora(ref, pairs, scale, {})
    peft = load_run(run).model
    with torch.no_grad():
        want = peft(input_ids=ids[0]).logits.float()
    assert (want - _logits(ref, ids)[0]).abs().max() < 1e-4
    assert check_merge(run, out, tiny_model(arch), CHECK_PROMPTS) < 1e-4
    state = load_file(out / "model.safetensors")
    target = next(k for k in sorted(state) if "layers.0" in k and "proj" in k and k.endswith(".weight"))
    state[target] = state[target] + 0.5
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    assert check_merge(run, out, tiny_model(arch), CHECK_PROMPTS) > 1e-2


def test_sharded_checkpoint_streams_into_equal_shards(tiny_model, tmp_path):
    """A base in several shards merges shard for shard: same files, names, dtypes and shapes, index copied."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    src = tiny_model("llama")
    base = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).to(torch.bfloat16).save_pretrained(base, max_shard_size="20KB")
    for p in src.iterdir():
        if p.suffix != ".safetensors" and p.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(p, base / p.name)
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 2
    run, _ = train_run(base, tmp_path, "llama")
    out = merge(run, tmp_path / "merged")
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert (out / "model.safetensors.index.json").read_text() == (base / "model.safetensors.index.json").read_text()
    changed = 0
    for s in shards:
        with safe_open(base / s, "pt") as a, safe_open(out / s, "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for k in a.keys():
                x, y = a.get_tensor(k), b.get_tensor(k)
                assert x.dtype == y.dtype == torch.bfloat16 and x.shape == y.shape
                changed += not torch.equal(x, y)
    assert changed > 0
    assert json.loads((out / "manifest.json").read_text())["merge"]["check_max_abs_logit_diff"] < 0.05  # bf16
