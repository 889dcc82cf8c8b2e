"""`export gguf RUN_DIR`: the base once plus the run's LoRA as a llama.cpp adapter file. llama.cpp's base+adapter
logits must match the PyTorch adapter model (the run itself, unmerged), the adapter must change them, the mmproj
must carry the trained projector, and what llama.cpp cannot apply (trained norms) must be refused: a test runs
llama.cpp on an adapter file holding a norm tensor to show that it skips it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_vqa

from edgemed.artifacts import read_manifest
from edgemed.errors import EdgemedError, ExportError
from edgemed.recipe import Recipe
from edgemed.train import finetune

F32_REL = 1e-3  # max |llama.cpp - PyTorch| / max |PyTorch|, f32 base and adapter, f32 KV cache


def train_run(model, tmp_path, parts, name="run", image=False, seed=0):
    data = write_vqa(tmp_path / f"data-{name}", n=4, image=image)
    recipe = Recipe.model_validate({
        "model": {"path": str(model)}, "seed": seed,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "init": "nonzero"},
        "optim": {"lr": 1e-2, "batch_size": 2},
        "stages": [{"name": "s", "data": {"train": str(data)}, "train": parts, "max_steps": 1}]})
    return finetune(recipe, tmp_path / name)


def export_run(run, out, quants, **kw):
    from edgemed.export.gguf import export_gguf

    return export_gguf(run, quants, out, **kw)


@pytest.fixture(scope="module")
def text_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapter")
    run = train_run(tiny_model("llama"), tmp, {"decoder": "lora"})
    return run, _export(run, tmp)


def _export(run, tmp):
    from edgemed.export.gguf_adapter import export_gguf_run

    return export_gguf_run(run, ["f32", "q8_0"], tmp / "gguf", adapter_quant="f32")


def _llama(folder, quant="f32", **kw):
    from edgemed.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(folder, quant=quant, n_threads=1, n_ctx=512, **kw)


def test_folder_holds_base_adapter_and_binding(text_run):
    import gguf

    run, out = text_run
    m = read_manifest(out)
    assert m["kind"] == "gguf" and m["adapters"] == {"default": "adapter-f32.gguf"}
    assert set(m["models"]) == {"f32", "q8_0"} and m["parent"]["kind"] == "run"
    assert m["binding"]["adapter"] == m["files"]["adapter-f32.gguf"]
    assert m["binding"]["base"]["q8_0"] == m["files"]["model-q8_0.gguf"]
    r = gguf.GGUFReader(out / "adapter-f32.gguf")
    field = r.fields["general.type"]
    assert bytes(field.parts[field.data[0]]).decode() == "adapter"
    field = r.fields["adapter.type"]
    assert bytes(field.parts[field.data[0]]).decode() == "lora"
    assert float(r.fields["adapter.lora.alpha"].parts[-1][0]) == 8.0
    names = {t.name for t in r.tensors}
    # 2 layers x 7 targets, an A and a B each, named after the base tensors
    assert len(names) == 28 and "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    base = {t.name for t in gguf.GGUFReader(out / "model-f32.gguf").tensors}
    assert {n.rsplit(".", 1)[0] for n in names} <= base


def test_base_plus_adapter_matches_the_run_and_the_adapter_matters(text_run):
    from edgemed.backends.pytorch import TorchBackend

    run, out = text_run
    ref = TorchBackend(run, device="cpu")
    with_adapter, bare = _llama(out), _llama(out, adapter=None)
    try:
        for text in (ref.render("Is there a lesion in the left lung?"), "Magnetic resonance imaging: 98 abstracts"):
            tokens = ref.tokenize(text)
            want = ref.logits(tokens)
            got, base = with_adapter.logits(tokens), bare.logits(tokens)
            rel = np.abs(got - want).max() / np.abs(want).max()
            assert rel <= F32_REL, f"base+adapter vs the run: relative error {rel:.2e} on {text!r}"
            moved = np.abs(base - want).max() / np.abs(want).max()
            assert moved > 20 * F32_REL, f"the adapter changed the logits by only {moved:.2e}: it is not applied"
    finally:
        ref.close()
        with_adapter.close()
        bare.close()


def test_one_instance_switches_adapter_without_reloading(text_run):
    run, out = text_run
    b = _llama(out)
    try:
        tokens = b.tokenize("Magnetic resonance imaging")
        a1 = b.logits(tokens)
        b.adapter = None
        plain = b.logits(tokens)
        b.adapter = "default"
        a2 = b.logits(tokens)
        assert np.array_equal(a1, a2) and not np.allclose(a1, plain)
    finally:
        b.close()


def test_llama_cpp_skips_norm_tensors_in_an_adapter(text_run, tmp_path):
    """Why a LayerNorm-only run is refused: llama.cpp loads an adapter with a norm tensor and ignores it."""
    import shutil

    from edgemed.archs import get_arch
    from edgemed.export.gguf_adapter import write_adapter_gguf

    run, out = text_run
    folder = tmp_path / "x"
    shutil.copytree(out, folder)
    prov = {"name": "n", "base_model_sha256": read_manifest(out)["binding"]["base_tree_sha256"], "tree_sha256": "t"}
    (folder / "adapter-f32.gguf").unlink()
    a, b = np.full((4, 64), 0.5, np.float32), np.full((64, 4), 0.5, np.float32)
    write_adapter_gguf(get_arch("llama"), [("blk.0.attn_q.weight.lora_a", a), ("blk.0.attn_q.weight.lora_b", b * 0),
                                           ("blk.0.attn_norm.weight", np.full(64, 7.0, np.float32))],
                       8.0, "f32", folder / "adapter-f32.gguf", prov)
    with_norm, bare = _llama(folder), _llama(folder, adapter=None)
    try:
        tokens = bare.tokenize("Magnetic resonance imaging")
        np.testing.assert_allclose(with_norm.logits(tokens), bare.logits(tokens), rtol=0, atol=1e-5)
    finally:
        with_norm.close()
        bare.close()


def test_layernorm_only_run_is_refused_with_the_merged_route(tiny_model, tmp_path):
    run = train_run(tiny_model("llama"), tmp_path, {"decoder": "layernorm"})
    with pytest.raises(ExportError, match="norm.*edgemed merge") as e:
        export_run(run, tmp_path / "o", ["f16"])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.*"))


def test_dora_adapter_is_refused(text_run, tmp_path):
    import shutil

    run, _ = text_run
    copy = shutil.copytree(run, tmp_path / "run")
    cfg_path = copy / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_dora"] = True
    cfg_path.write_text(json.dumps(cfg))
    from edgemed.export.gguf_adapter import read_run_lora

    with pytest.raises(EdgemedError, match="DoRA"):
        read_run_lora(copy)


def test_image_run_mmproj_carries_the_trained_projector(tiny_model, tmp_path):
    """The adapter export's mmproj gives the image embeddings of the merged run's mmproj, not the base's."""
    from PIL import Image

    from edgemed.merge import merge

    run = train_run(tiny_model("llava"), tmp_path, {"vision": "lora", "projector": "train", "decoder": "lora"},
                    image=True)
    out = export_run(run, tmp_path / "gguf", ["f32"], mmproj_quant="f32")
    assert read_manifest(out)["adapter"]["vision_lora_merged"] > 0
    merged = export_run(merge(run, tmp_path / "merged"), tmp_path / "gguf-merged", ["f32"], mmproj_quant="f32")
    base = export_run(tiny_model("llava"), tmp_path / "gguf-base", ["f32"], mmproj_quant="f32")
    img = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))
    embs = {}
    for name, folder in (("adapter", out), ("merged", merged), ("base", base)):
        b = _llama(folder)
        try:
            embs[name] = b.image_embeddings(img)
        finally:
            b.close()
    scale = np.abs(embs["merged"]).max()
    assert np.abs(embs["adapter"] - embs["merged"]).max() <= 1e-4 * scale
    assert np.abs(embs["adapter"] - embs["base"]).max() > 1e-2 * scale, "the trained projector did not reach mmproj"


def test_parity_without_reference_compares_with_the_run(text_run):
    """`edgemed parity DIR` of an adapter export: the reference is the run itself (PyTorch, adapter unmerged)."""
    from edgemed.parity import run_parity

    run, out = text_run
    result = run_parity(out, max_probes=3, n_threads=1, localise=False)
    assert result.reference == str(run)
    f32 = next(r for r in result.rows if r.quant == "f32")
    assert f32.passed, f32.failures


def test_cli_exports_a_run_and_refuses_a_bad_adapter_quant(text_run, tmp_path):
    from click.testing import CliRunner

    from edgemed.cli import main

    run, _ = text_run
    r = CliRunner().invoke(main, ["export", "gguf", str(run), "--quant", "f16", "--adapter-quant", "q3",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "adapter quant 'q3'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["export", "gguf", str(run), "--quant", "f16", "--adapter-quant", "q8_0",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert read_manifest(tmp_path / "o")["adapters"] == {"default": "adapter-q8_0.gguf"}


def _amplify(run, factor: float) -> None:
    from safetensors.torch import load_file, save_file

    path = run / "adapter" / "adapter_model.safetensors"
    state = {k: v * factor if ".lora_B." in k else v for k, v in load_file(path).items()}
    save_file(state, str(path))


def test_two_adapters_on_one_base_answer_as_each_alone_under_concurrency(tiny_model, tmp_path):
    """Mixed concurrent greedy requests for two adapters on one base instance: every answer is its adapter's."""
    from concurrent.futures import ThreadPoolExecutor

    from edgemed.backends.base import GenParams

    outs = {}
    for name, seed in (("a", 3), ("b", 7)):
        run = train_run(tiny_model("llama"), tmp_path, {"decoder": "lora"}, name=f"run-{name}", seed=seed)
        _amplify(run, 40.0)  # one tiny step leaves both answering alike; a large, different change each
        outs[name] = export_run(run, tmp_path / f"gguf-{name}", ["f32"], adapter_quant="f32")
    out_a, out_b = outs["a"], outs["b"]
    params = GenParams(max_tokens=8, ignore_eos=True)
    questions = ["Is there a lesion?", "Which side is bright?", "Describe the image."]
    alone = {}
    for name, folder in (("a", out_a), ("b", out_b)):
        b = _llama(folder)
        try:
            alone[name] = ["".join(b.generate(b.render(q), params=params)) for q in questions]
        finally:
            b.close()
    assert alone["a"] != alone["b"], "the two adapters answer alike: the test could not tell them apart"
    shared = _llama(out_a)
    try:
        shared.add_adapter("b", out_b)
        views = {"a": shared.with_adapter("default"), "b": shared.with_adapter("b")}
        jobs = [(n, i) for _ in range(3) for n in ("a", "b", "b", "a") for i in range(len(questions))]

        def ask(job):
            n, i = job
            v = views[n]
            return "".join(v.generate(v.render(questions[i]), params=params))

        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(ask, jobs))
        for (n, i), got in zip(jobs, answers, strict=True):
            assert got == alone[n][i], f"adapter {n} question {i}: {got!r} served together, {alone[n][i]!r} alone"
        with pytest.raises(EdgemedError, match="no adapter 'c'"):
            shared.with_adapter("c")
    finally:
        shared.close()
