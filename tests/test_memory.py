"""Memory before work: a command that will not fit is refused before it starts, saying how much it needs and how
much there is, and leaves nothing behind; the needs come from the checkpoint's headers."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from conftest import write_vqa

from edgemed import memory
from edgemed.cli import main
from edgemed.recipe import Recipe
from edgemed.train import finetune


def test_require_names_need_and_room_and_can_be_skipped(monkeypatch):
    memory.require(2e9, "x", available=3e9)  # fits: nothing happens
    with pytest.raises(memory.MemoryShortError, match=r"merging A needs about 2\.0 GB .* has 0\.5 GB available; "
                                                      r"nothing was started"):
        memory.require(2e9, "merging A", available=int(5e8))
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    memory.require(2e9, "merging A", available=int(5e8))


def test_available_is_capped_by_a_cgroup_limit(monkeypatch):
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 12345)
    assert memory.available_bytes() == 12345
    monkeypatch.setattr(memory, "_cgroup_room", lambda: None)
    assert memory.available_bytes() > 12345  # MemAvailable of this machine


def test_sizes_come_from_the_headers(tiny_model):
    from transformers import AutoModelForCausalLM

    folder = tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(folder)
    numels = {n: p.numel() for n, p in model.state_dict().items()}
    total, largest = memory.tensor_sizes(folder)
    assert largest == max(numels.values())
    assert total == sum(v for k, v in numels.items() if k != "lm_head.weight" or not model.config.tie_word_embeddings)
    assert memory.merge_need(folder) == pytest.approx(1.1 * memory.largest_shard(folder) + 200e6)
    assert memory.onnx_need(folder) > memory.gguf_need(folder)  # ONNX holds the whole graph, GGUF one tensor
    assert memory.gguf_need(folder, calibrating=True) >= 4 * total  # the imatrix forward holds the fp32 model


def _recipe(model, data):
    return Recipe.model_validate({
        "model": {"path": str(model)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "init": "nonzero"},
        "optim": {"lr": 1e-2, "batch_size": 2}, "stages": [{"name": "s", "data": {"train": str(data)},
                                                             "max_steps": 1}]})


def test_finetune_and_merge_refuse_before_work_when_memory_is_short(tiny_model, tmp_path, monkeypatch):
    model = tiny_model("llama")
    recipe = _recipe(model, write_vqa(tmp_path / "data", n=4, image=False))
    run = finetune(recipe, tmp_path / "run")  # room enough: trains
    monkeypatch.setattr(memory, "available_bytes", lambda: 1_000_000)
    with pytest.raises(memory.MemoryShortError, match=r"fine-tuning .* needs about .* 0\.0 GB available"):
        finetune(recipe, tmp_path / "run2")
    assert not (tmp_path / "run2").exists() and not (tmp_path / "run2.partial").exists()
    r = CliRunner().invoke(main, ["merge", str(run), "--out", str(tmp_path / "merged")])
    assert r.exit_code != 0 and "needs about" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "merged").exists()
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    assert (CliRunner().invoke(main, ["merge", str(run), "--out", str(tmp_path / "merged")]).exit_code == 0)


def test_finetune_need_is_the_plan_at_the_data_s_real_lengths(tiny_model, tmp_path, monkeypatch):
    """The refusal threshold is edgemed plan's sum at the longest example and its supervised tokens (what the data
    really holds, not max_length), plus 300 MB: just below it refuses, at it trains."""
    from edgemed.plan import plan

    model = tiny_model("llama")
    recipe = _recipe(model, write_vqa(tmp_path / "data", n=4, image=False))
    seen = []
    real = memory.require
    monkeypatch.setattr(memory, "require", lambda need, what, available=None: (seen.append((need, what)),
                                                                                real(need, what, available)))
    finetune(recipe, tmp_path / "a")
    ((need, what),) = seen
    seq = int(what.split(" x ")[1].split()[0])
    assert 4 < seq < recipe.max_length  # "Say left." and its answer, far below 1024
    assert need == pytest.approx(plan(recipe, model, seq=seq, supervised=seq, device="cpu").gpu_peak * 1e9 + 300e6,
                                 rel=0.05)
    monkeypatch.setattr(memory, "available_bytes", lambda: int(need) - 1)
    with pytest.raises(memory.MemoryShortError):
        finetune(recipe, tmp_path / "b")
    monkeypatch.setattr(memory, "available_bytes", lambda: int(need) + 1)
    assert finetune(recipe, tmp_path / "c").is_dir()


@pytest.mark.parametrize("kind", ["gguf", "onnx"])
def test_exports_refuse_before_writing_when_memory_is_short(kind, tiny_model, tmp_path, monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(memory, "available_bytes", lambda: 1_000_000)
    r = CliRunner().invoke(main, ["export", kind, str(model), "--out", str(tmp_path / "out")])
    assert r.exit_code != 0 and f"exporting {model} to {kind.upper()} needs about" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial folder either


def test_parity_refuses_before_loading_when_memory_is_short(tiny_model, tmp_path, monkeypatch):
    from edgemed.export.gguf import export_gguf

    model = tiny_model("llama")
    out = export_gguf(model, ["f16"], tmp_path / "g")
    monkeypatch.setattr(memory, "available_bytes", lambda: 1_000_000)
    r = CliRunner().invoke(main, ["parity", str(out), "--reference", str(model), "--report", str(tmp_path / "r.json")])
    assert r.exit_code != 0 and f"parity of {out} against {model}, its reference in bfloat16, needs about" \
        in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "r.json").exists()
    r = CliRunner().invoke(main, ["parity", str(out), "--reference", str(model), "--reference-dtype", "float32"])
    assert r.exit_code != 0 and "its reference in float32, needs about" in r.output, r.output


def test_parity_takes_a_16_bit_reference_where_float32_does_not_fit(tiny_model, tmp_path, monkeypatch):
    """A 4B model's fp32 reference alone is 17 GB: where it does not fit, parity loads the checkpoint's 16-bit type,
    says so in its report, and judges float files by the bf16 bounds; where float32 fits it stays float32."""
    from edgemed.export.gguf import export_gguf
    from edgemed.parity import run_parity
    from edgemed.parity.thresholds import THRESHOLDS

    monkeypatch.setenv("EDGEMED_PARITY_CACHE", "off")
    model = tiny_model("llama")
    out = export_gguf(model, ["f16"], tmp_path / "g")
    files = list(out.glob("*.gguf"))
    bf16, fp32 = memory.parity_need(model, files, "bfloat16"), memory.parity_need(model, files)
    assert bf16 < fp32
    monkeypatch.setattr(memory, "available_bytes", lambda: int(bf16) + 1)
    res = run_parity(out, reference=model, max_probes=3, localise=False, report=tmp_path / "r.json")
    assert res.reference_dtype == "bfloat16" and res.rows[0].thresholds == THRESHOLDS["bf16"]
    assert res.passed, res.table()
    assert '"reference_dtype": "bfloat16"' in (tmp_path / "r.json").read_text()
    assert "reference: PyTorch in bfloat16" in res.table()
    monkeypatch.setattr(memory, "available_bytes", lambda: int(fp32) + 1)
    res = run_parity(out, reference=model, max_probes=3, localise=False)
    assert res.reference_dtype == "float32" and res.rows[0].thresholds == THRESHOLDS["f16"]


def test_answering_from_a_pytorch_folder_refuses_before_loading_when_memory_is_short(tiny_model, tmp_path,
                                                                                        monkeypatch):
    """ask/serve/eval on a model or run folder load it in PyTorch (fp32 by default: 17 GB at MedGemma 4B); a run's
    need is its base's weights, and the refusal comes before any weight is read."""
    from edgemed.backends import open_model
    from edgemed.backends.pytorch import TorchBackend

    model = tiny_model("llama")
    run = finetune(_recipe(model, write_vqa(tmp_path / "data", n=4, image=False)), tmp_path / "run")
    total = memory.tensor_sizes(model)[0]
    assert memory.pytorch_need(model) == pytest.approx(1.25 * 4 * total + 300e6)
    assert memory.pytorch_need(model, "bfloat16") == pytest.approx(1.25 * 2 * total + 300e6)
    assert memory.parity_need(model, []) == memory.pytorch_need(model)  # parity's reference is the same load
    loads = []
    monkeypatch.setattr("edgemed.backends.pytorch.load_any", lambda *a, **k: loads.append(a) or 1 / 0)
    monkeypatch.setattr(memory, "available_bytes", lambda: int(memory.pytorch_need(model)) - 1)
    for folder in (model, run):
        with pytest.raises(memory.MemoryShortError, match=rf"opening {folder} in PyTorch \(float32.* needs about"):
            open_model(folder, device="cpu")
    r = CliRunner().invoke(main, ["ask", str(run), "Say left."])
    assert r.exit_code != 0 and f"opening {run} in PyTorch" in r.output and "Traceback" not in r.output, r.output
    assert not loads  # refused before the loader was called
    TorchBackend(model, device="cpu", lazy=True)  # parity's lazy reference: parity's own check covers it


def test_an_image_model_s_onnx_need_counts_its_token_table_twice(tiny_model):
    """embed.onnx holds the token table and the decoder holds the head (tied for Gemma 3): the one-layer MedGemma
    4B export peaked at 11.87 GB above the interpreter where the whole-model rule said 7.46 GB."""
    from conftest import VISION_ARCHS

    text, image = tiny_model("llama"), tiny_model(VISION_ARCHS[0])
    assert not memory.is_image_model(text) and memory.is_image_model(image)
    t_total, _ = memory.tensor_sizes(text)
    i_total, i_largest = memory.tensor_sizes(image)
    assert memory.onnx_need(text) == pytest.approx(2.3 * 4 * t_total + 200e6)
    assert memory.onnx_need(image) == pytest.approx(2.3 * 4 * (i_total + i_largest) + 200e6)
    assert memory.onnx_bytes(789_000_000, 671_000_000, image_model=True) / 1e9 == pytest.approx(13.63, abs=0.01)
