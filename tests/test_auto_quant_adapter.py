"""Auto-quant over base + adapter: a merged LoRA fine-tune whose run is still there gets the adapter form (each quant
of the base + the run's f16 LoRA) as candidates beside the merged files; the verdicts decide which form is kept,
and the kept folder is a working adapter export."""

from __future__ import annotations

import json

import pytest
from conftest import write_vqa

from edgemed.artifacts import read_manifest
from edgemed.recipe import Recipe
from edgemed.train import finetune


@pytest.fixture(scope="module")
def merged(tiny_model, tmp_path_factory):
    from edgemed.merge import merge

    tmp = tmp_path_factory.mktemp("aq")
    data = write_vqa(tmp / "data", n=4, image=False)
    recipe = Recipe.model_validate({
        "model": {"path": str(tiny_model("llama"))}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "init": "nonzero"},
        "optim": {"lr": 1e-2, "batch_size": 2}, "stages": [{"name": "s", "data": {"train": str(data)},
                                                             "train": {"decoder": "lora"}, "max_steps": 1}]})
    run = finetune(recipe, tmp / "run")
    return run, merge(run, tmp / "merged")


def _verdicts(monkeypatch, passing_form: str):
    """Parity as measured, but every row of the other form marked failing: the choice must follow the verdicts."""
    import edgemed.parity as parity

    real = parity.run_parity

    def judged(folder, **kw):
        res = real(folder, **kw)
        form = "adapter" if read_manifest(folder).get("adapters") else "merged"
        for row in res.rows:
            if form != passing_form:
                row.failures.append(f"forced for the test: the {form} form fails")
        return res

    monkeypatch.setattr(parity, "run_parity", judged)


def test_lora_run_is_found_only_behind_a_merged_lora(merged, tiny_model):
    from edgemed.export.auto_quant import lora_run

    run, model = merged
    assert lora_run(model) == run
    assert lora_run(run) is None and lora_run(tiny_model("llama")) is None


def test_adapter_form_is_kept_when_only_it_passes(merged, tmp_path, monkeypatch):
    from edgemed.backends import open_model
    from edgemed.export.auto_quant import auto_quant

    run, model = merged
    _verdicts(monkeypatch, "adapter")
    out = auto_quant(model, tmp_path / "auto", candidates=("q8_0",), max_probes=2, n_threads=1, data=None)
    m = read_manifest(out)
    assert m["auto_quant"]["chosen"] == "q8_0" and m["auto_quant"]["form"] == "base + f16 LoRA adapter"
    assert [d["form"] for d in m["auto_quant"]["tried"]] == ["merged", "merged", "base + f16 LoRA adapter"]
    assert (out / m["adapters"]["default"]).is_file() and "base + f16 LoRA adapter" in (
        out / "auto_quant.txt").read_text()
    b = open_model(out, quant="q8_0", n_threads=1)  # the kept folder answers with its adapter
    try:
        assert b.adapter == "default"
    finally:
        b.close()


def test_merged_form_wins_at_the_same_quant_when_it_passes(merged, tmp_path, monkeypatch):
    from edgemed.export.auto_quant import auto_quant

    _, model = merged
    _verdicts(monkeypatch, "merged")
    out = auto_quant(model, tmp_path / "auto", candidates=("q8_0",), max_probes=2, n_threads=1, adapters=True)
    m = read_manifest(out)
    assert m["auto_quant"]["form"] == "merged" and not m.get("adapters")
    assert json.loads(json.dumps(m["auto_quant"]["tried"]))[0]["accepted"]
