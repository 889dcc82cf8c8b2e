"""Every strategy trains on the tiny config of every architecture: two steps, frozen parts bit-identical,
trainable share as the strategy implies, and a run folder that describes itself."""

from __future__ import annotations

import json

import pytest
from conftest import ARCHS, VISION_ARCHS, write_vqa

from edgemed.archs import REGISTRY
from edgemed.errors import ArtifactError, RecipeError
from edgemed.recipe import Recipe
from edgemed.train import finetune

STRATEGIES = {
    "decoder_lora": {"vision": "frozen", "projector": "frozen", "decoder": "lora"},
    "layernorm": {"vision": "frozen", "projector": "frozen", "decoder": "layernorm"},
    "projector_lora": {"vision": "frozen", "projector": "train", "decoder": "lora"},
    "vision_lora": {"vision": "lora", "projector": "frozen", "decoder": "lora"},
}
CASES = [(a, s) for a in ARCHS for s in STRATEGIES if REGISTRY[a].is_vision or s in ("decoder_lora", "layernorm")]


def recipe_for(model, data, parts=None, **kw) -> Recipe:
    doc = {"model": {"path": str(model)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "optim": {"lr": 1e-3, "batch_size": 2}, "eval_every": 1, "save_every": 100,
           "stages": [{"name": "s1", "data": {"train": str(data), "validation": str(data)},
                       "train": parts or STRATEGIES["decoder_lora"], "max_steps": 2}]}
    for k, v in kw.items():
        doc[k] = {**doc.get(k, {}), **v} if isinstance(v, dict) else v
    return Recipe.model_validate(doc)


@pytest.mark.parametrize("arch,strategy", CASES)
def test_strategy_trains_two_steps(arch, strategy, tiny_model, tmp_path):
    spec = REGISTRY[arch]
    data = write_vqa(tmp_path / "data", n=4, image=spec.is_vision)
    run = finetune(recipe_for(tiny_model(arch), data, STRATEGIES[strategy]), tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["kind"] == "run" and manifest["arch"] == arch
    assert json.loads((run / "frozen_check.json").read_text())["identical"] is True
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in log] == [1, 2] and all(e["loss"] > 0 for e in log)
    assert "val_accuracy" in log[-1]
    assert _leading_bos(spec, tiny_model(arch)) <= 1, "training example starts with a doubled BOS"
    rep = json.loads((run / "trainable.json").read_text())
    parts = rep["per_part"]
    assert rep["trainable"] > 0 and 0 < rep["percent"] < 100
    if strategy == "layernorm":
        # only norm weights: no LoRA, and far less than a percent of a real model
        assert not (run / "adapter").exists() and (run / "trained.safetensors").is_file()
        assert parts["decoder"]["trainable"] == rep["trainable"]
    else:
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
    if spec.is_vision:
        assert (parts["projector"]["trainable"] > 0) == (strategy == "projector_lora")
        assert (parts["vision"]["trainable"] > 0) == (strategy == "vision_lora")
        if strategy == "projector_lora":
            assert parts["projector"]["trainable"] == parts["projector"]["total"]
    assert (run / "loss.png").stat().st_size > 1000


def test_qlora_4bit_path_on_cpu(tiny_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    data = write_vqa(tmp_path / "data", n=4)
    recipe = recipe_for(tiny_model("llava"), data, STRATEGIES["projector_lora"], method="qlora",
                        quant={"allow_cpu": True, "compute_dtype": "float32"})
    run = finetune(recipe, tmp_path / "run")
    m = json.loads((run / "manifest.json").read_text())
    assert m["method"]["used"] == "qlora"
    assert json.loads((run / "frozen_check.json").read_text())["identical"] is True


def test_qlora_without_cuda_falls_back_or_fails_strict(tiny_model, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    data = write_vqa(tmp_path / "data", n=4, image=False)
    recipe = recipe_for(tiny_model("llama"), data, method="qlora")
    with pytest.raises(RecipeError, match="--strict"):
        finetune(recipe, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists() and not (tmp_path / "strict.partial").exists()
    with pytest.warns(UserWarning, match="32-bit LoRA"):
        run = finetune(recipe, tmp_path / "run")
    assert json.loads((run / "manifest.json").read_text())["method"]["used"] == "lora"


@pytest.mark.parametrize("arch", VISION_ARCHS[:1])
def test_two_stage_recipe(arch, tiny_model, tmp_path):
    data = write_vqa(tmp_path / "data", n=4)
    recipe = recipe_for(tiny_model(arch), data, STRATEGIES["projector_lora"])
    doc = recipe.model_dump()
    doc["stages"].append({**doc["stages"][0], "name": "s2", "train": STRATEGIES["decoder_lora"]})
    doc["prompt"] = {"role": "an experienced radiologist", "tasks": {"side": "Answer left or right."}}
    run = finetune(Recipe.model_validate(doc), tmp_path / "run")
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["step"]) for e in log] == [("s1", 1), ("s1", 2), ("s2", 1), ("s2", 2)]


def test_refuses_existing_output_and_leaves_nothing_on_error(tiny_model, tmp_path):
    data = write_vqa(tmp_path / "data", n=4, image=False)
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(ArtifactError, match="--overwrite"):
        finetune(recipe_for(tiny_model("llama"), data), out)
    bad = recipe_for(tiny_model("llama"), data, STRATEGIES["projector_lora"])
    with pytest.raises(RecipeError, match="no projector"):
        finetune(bad, tmp_path / "run2")
    assert not (tmp_path / "run2").exists() and not (tmp_path / "run2.partial").exists()


def test_resume_reaches_same_result(tiny_model, tmp_path):
    """A run stopped after a checkpoint and resumed ends with the same adapter as one that ran straight."""
    from safetensors.torch import load_file

    data = write_vqa(tmp_path / "data", n=8, image=False)
    model = tiny_model("llama")
    straight = finetune(_steps(recipe_for(model, data, save_every=2), 4), tmp_path / "a")
    partial = tmp_path / "b.partial"
    import edgemed.train as t

    real = t._checkpoint

    def stop_after_first(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    t._checkpoint = stop_after_first
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune(_steps(recipe_for(model, data, save_every=2), 4), tmp_path / "b")
    finally:
        t._checkpoint = real
    assert (partial / "checkpoints").is_dir() and not (tmp_path / "b").exists()
    resumed = finetune(_steps(recipe_for(model, data, save_every=2), 4), tmp_path / "b", resume=True)
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k


def _steps(recipe: Recipe, n: int) -> Recipe:
    recipe.stages[0].max_steps = n
    return recipe


def _leading_bos(spec, model_dir) -> int:
    """BOS tokens at the start of one encoded training example: the template's own, never one more."""
    from edgemed.modeling import Loaded, load_processor
    from edgemed.train_batches import encode_vqa

    proc, tok = load_processor(model_dir, spec)
    shell = Loaded(model=None, processor=proc, tokenizer=tok, arch=spec, base_dir=model_dir)
    rec = type("R", (), {"question": "Which side?", "answer": "left", "image": None, "system": None, "task": None,
                         "source": "t:1"})()
    ids = encode_vqa(shell, Recipe.model_validate({"model": {"path": "x"}, "stages": [
        {"name": "s", "data": {"train": "t"}}]}), rec).inputs["input_ids"][0].tolist()
    n = 0
    while n < len(ids) and ids[n] == tok.bos_token_id:
        n += 1
    return n


def test_frozen_part_hashes_read_tensors_without_copying_them():
    """The frozen-part check hashes every frozen tensor twice per fine-tune; copying each one (``tobytes()``) cost a
    transient as large as the embedding (1.3 GB on MedGemma's 262144-word vocabulary, docs/scale.md). The hash is
    the sha256 of the name and the raw bytes, as before, and Python allocates far less than the tensor meanwhile."""
    import hashlib
    import tracemalloc

    import torch

    from edgemed.archs import get_arch
    from edgemed.train_model import param_hashes

    embed = torch.nn.Embedding(4096, 2048, dtype=torch.bfloat16)  # 16 MB
    model = torch.nn.ModuleDict({"embed_tokens": embed})
    want = hashlib.sha256(b"embed_tokens.weight" + embed.weight.detach().view(torch.uint8).numpy().tobytes())
    tracemalloc.start()
    try:
        got = param_hashes(model, get_arch("llama"), set(), "")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert list(got.values()) == [want.hexdigest()]
    assert peak < 2 * 2**20, f"{peak / 2**20:.1f} MiB allocated while hashing a 16 MiB tensor"


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl", "gemma3"])
def test_encoded_image_examples_hold_no_pixels_until_their_batch_is_built(tiny_model, tmp_path, arch):
    """Every record is encoded before training, but its pixel tensors are made again per batch (the demo's 1440
    records held 1.9 GB of them at 336 px); the batch gets exactly the processor's pixels and tokens."""
    import torch

    from edgemed.archs import REGISTRY
    from edgemed.data import load_image, read_vqa_jsonl
    from edgemed.modeling import Loaded, load_processor
    from edgemed.train_batches import collate, encode_vqa

    model_dir, spec = tiny_model(arch), REGISTRY[arch]
    proc, tok = load_processor(model_dir, spec)
    shell = Loaded(model=None, processor=proc, tokenizer=tok, arch=spec, base_dir=model_dir)
    recipe = Recipe.model_validate({"model": {"path": "x"}, "stages": [{"name": "s", "data": {"train": "t"}}]})
    records = read_vqa_jsonl(write_vqa(tmp_path / "d", n=2))
    ex = [encode_vqa(shell, recipe, r) for r in records]
    assert all(not any(k.startswith("pixel_values") for k in e.inputs) for e in ex)
    batch = collate(ex, tok.pad_token_id or 0)
    from edgemed import prompting

    prompt, answer = prompting.prompt_and_answer(proc, records[1].question, records[1].answer, image=True,
                                                 system=recipe.prompt.system, typed=True)
    direct = proc(text=prompt + answer, images=[load_image(records[1].image)], return_tensors="pt",
                  add_special_tokens=False)
    n = direct["pixel_values"].shape[0]
    assert torch.equal(batch["pixel_values"][-n:], direct["pixel_values"])
    assert torch.equal(batch["input_ids"][1, :direct["input_ids"].shape[1]], direct["input_ids"][0])


def _shell(model_dir):
    from edgemed.modeling import Loaded, load_processor

    spec = REGISTRY[json.loads((model_dir / "config.json").read_text())["model_type"]]
    proc, tok = load_processor(model_dir, spec)
    return Loaded(model=None, processor=proc, tokenizer=tok, arch=spec, base_dir=model_dir), tok


def test_text_examples_begin_with_bos_where_the_tokenizer_adds_one(tiny_model):
    """A corpus document is trained as the model reads input: with BOS in front (Gemma's tokenizer adds it),
    on every chunk of a long document, and with no BOS where the tokenizer adds none (SmolLM2's)."""
    from edgemed.data import TextRecord
    from edgemed.train_batches import encode_text

    recipe = Recipe.model_validate({"model": {"path": "x"}, "max_length": 16,
                                    "stages": [{"name": "s", "data": {"train": "t"}}]})
    doc = TextRecord(" ".join(f"word{i}" for i in range(40)), "t:1")
    gemma, tok = _shell(tiny_model("gemma3_text"))
    examples = encode_text(gemma, recipe, doc)
    assert len(examples) > 1
    for e in examples:
        ids = e.inputs["input_ids"][0].tolist()
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and len(ids) <= 16
    body = tok(doc.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [t for e in examples for t in e.inputs["input_ids"][0].tolist()[1:]] == body  # nothing lost
    llama, ltok = _shell(tiny_model("llama"))
    first = encode_text(llama, recipe, doc)[0].inputs["input_ids"][0].tolist()
    assert first == ltok(doc.text, add_special_tokens=False)["input_ids"][:16]


def test_a_base_model_without_chat_template_fine_tunes_on_questions_and_merges(tiny_model, tmp_path):
    """A base model (no chat template) trains on question/answer records as plain text (BOS, question, the answer
    on the next line, EOS, loss on the answer only) and its run merges with the logit check."""
    from conftest import base_model

    from edgemed.merge import merge
    from edgemed.train_batches import encode_vqa

    base = base_model(tiny_model("gemma3_text"), tmp_path / "base")
    data = write_vqa(tmp_path / "data", n=4, image=False)
    recipe = recipe_for(base, data)
    shell, tok = _shell(base)
    rec = type("R", (), {"question": "Say left.", "answer": "left", "image": None, "system": None, "task": None,
                         "source": "t:1"})()
    ex = encode_vqa(shell, recipe, rec)
    ids = ex.inputs["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and ids.count(tok.bos_token_id) == 1
    supervised = [t for t, lab in zip(ids, ex.labels.tolist(), strict=True) if lab != -100]
    assert tok.decode(supervised) == "\nleft" + tok.eos_token
    run = finetune(recipe, tmp_path / "run")
    out = merge(run, tmp_path / "merged")
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "model.safetensors").is_file() and manifest["merge"]["check_prompts"] > 0
