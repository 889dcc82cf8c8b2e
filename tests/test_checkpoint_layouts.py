"""Checkpoint folders as transformers saves them and as the hub ships them, through `export gguf` (f16).

A tiny random model is loaded by transformers and saved again with ``save_pretrained`` in bf16, fp16 and fp32, as
one file or sharded (model.safetensors.index.json), with its LM head tied or untied: what a user's fine-tune
leaves. Each folder must export, llama.cpp's logits must match PyTorch's on the same folder, and the head must be
in the file exactly when it is not the embedding. The legacy (transformers 4) key layouts the hub still serves for
LLaVA and Llama 3.2 Vision are written by renaming the checkpoint's keys. Also here: LLaVA with a CLIP tower (the
llama.cpp defect warning) and a chat template given to a base model at `export onnx`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import base_model, mean_kl

from edgemed.archs import REGISTRY
from edgemed.errors import EdgemedWarning, ExportError

QUESTION = "Is there a lesion in the left lung? Café naïve Ødem, 12 mg/kg x3; résumé 2024."
RAW = "Magnetic resonance imaging: hyperintense lesion, 98 abstracts, Ärzte 0 1 2 3 10 100 1000"
FAMILIES = ("llama", "gemma3")  # the plain text Llama and a vision family (SigLIP tower, Gemma's norms)
DTYPES = {"bf16": ("bfloat16", "BF16"), "fp16": ("float16", "F16"), "fp32": ("float32", "F32")}
LAYOUTS = ("single", "sharded")
HEADS = ("tied", "untied")
SHARD = "40KB"  # splits every tiny model into several files
# f16 GGUF vs PyTorch fp32 on the same folder, measured over the matrix: max relative error <= 2.8e-3 and KL mean
# <= 5e-8 (fp32 sources; bf16 and fp16 ones convert exactly); a head left out of the file gives 1.5 and 2.5e-2
F16_REL, F16_KL = 1e-2, 1e-6
# LLaVA-1.5 as the hub ships it (transformers 4): decoder under language_model (head included), the CLIP tower
# wrapped in vision_model; and module-tree names, as a state_dict() save writes them (the prefix table names both)
LLAVA_LAYOUTS = {
    "hub-transformers4": (("language_model.model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                          ("vision_tower.", "vision_tower.vision_model."),
                          ("multi_modal_projector.", "multi_modal_projector.")),
    "module-names": (("language_model.model.", "model.language_model."), ("lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower.vision_model."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")),
}
# Llama 3.2 Vision: transformers 5 saves the hub's own layout; module-tree names as a state_dict() save writes them
MLLAMA_HUB = ("language_model.model.", "language_model.lm_head.", "vision_model.", "multi_modal_projector.")
MLLAMA_MODULES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                  ("vision_model.", "model.vision_model."), ("multi_modal_projector.", "model.multi_modal_projector."))


# ---------------------------------------------------------------------------------------------- folders
def resave(src: Path, dst: Path, dtype: str, layout: str, head: str, seed: int = 3) -> Path:
    """``src`` loaded by transformers and written again by ``save_pretrained`` in ``dtype``; an untied head gets its
    own random weights (set on the top-level config, as a user unties a model; LLaVA's config copies its text
    config's flag up, so that is cleared too)."""
    import torch
    import transformers

    from edgemed.archs import arch_for_dir

    spec = arch_for_dir(src)
    model = getattr(transformers, spec.model_class).from_pretrained(src, dtype=torch.float32)
    if head == "untied":
        model.config.tie_word_embeddings = False
        if type(model.config).from_dict(model.config.to_dict()).tie_word_embeddings:
            spec.text_config(model.config).tie_word_embeddings = False
        emb = model.get_input_embeddings().weight
        g = torch.Generator().manual_seed(seed)
        model.lm_head.weight = torch.nn.Parameter(torch.randn(emb.shape, generator=g) * emb.std())
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    kw = {"max_shard_size": SHARD} if layout == "sharded" else {}
    model.to(getattr(torch, DTYPES[dtype][0])).save_pretrained(dst, **kw)
    return dst


def checkpoint(folder: Path) -> dict[str, dict]:
    """{tensor name: safetensors header entry} over every weight file of ``folder``."""
    out = {}
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        out.update({k: v for k, v in header.items() if k != "__metadata__"})
    return out


def rename_keys(folder: Path, rules: tuple[tuple[str, str], ...]) -> list[str]:
    """Rename checkpoint keys by prefix (first rule that matches), in every shard and in the index; the new keys."""
    from safetensors.torch import load_file, save_file

    def new(k: str) -> str:
        return next((b + k[len(a):] for a, b in rules if k.startswith(a)), k)

    for f in folder.glob("*.safetensors"):
        save_file({new(k): v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {new(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
    return sorted(checkpoint(folder))


def export(folder: Path, out: Path) -> Path:
    from edgemed.export.gguf import export_gguf

    return export_gguf(folder, ["f16"], out)


def export_clip(folder: Path, out: Path) -> Path:
    """`export gguf` of a LLaVA with a CLIP tower, which warns (see the CLIP section below)."""
    with pytest.warns(EdgemedWarning, match="#25814"):
        return export(folder, out)


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader

    r = GGUFReader(path)
    names = [t.name for t in r.tensors]
    assert len(names) == len(set(names)), f"{path.name}: a tensor is written twice"
    return {t.name: np.array(t.data) for t in r.tensors}


def picture(seed: int, size: int):
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size
    rng = np.random.RandomState(seed)
    smooth = np.stack([np.sin((3 + seed) * xx), np.cos(2 * yy + seed), xx * yy], -1) * 100 + 128
    return Image.fromarray(np.clip(smooth + rng.randn(size, size, 3) * 20, 0, 255).astype("uint8"))


def open_pair(folder: Path, out: Path):
    """(PyTorch on ``folder``, llama.cpp on its f16 export), both through edgemed's one loader."""
    from edgemed.backends import open_model

    return open_model(folder, device="cpu", n_threads=2), open_model(out, quant="f16", n_threads=2, n_ctx=512)


def assert_logits_match(ref, gg, what: str) -> None:
    for text in (ref.render(QUESTION), RAW):
        tokens = ref.tokenize(text)
        got, want = gg.logits(tokens), ref.logits(tokens)
        assert got.shape == want.shape
        rel, kl = np.abs(got - want).max() / np.abs(want).max(), mean_kl(got, want)
        i, j = np.unravel_index(np.abs(got - want).argmax(), got.shape)
        assert rel <= F16_REL and kl <= F16_KL, (
            f"{what}: relative error {rel:.2e}, KL mean {kl:.2e} on {text[:30]!r}; worst at row {i} token {j}: "
            f"llama.cpp {got[i, j]:.5f} vs PyTorch {want[i, j]:.5f}")


def head_is_tied(ref) -> bool:
    """Whether transformers itself shares the LM head with the embedding for the loaded folder."""
    return ref.model.lm_head.weight.data_ptr() == ref.model.get_input_embeddings().weight.data_ptr()


def image_size(ref) -> int:
    ip = ref.processor.image_processor
    size = getattr(ip, "crop_size", None) or ip.size
    return int(size.get("height") or size.get("shortest_edge"))


# ---------------------------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", FAMILIES)
def test_saved_checkpoint_exports_and_matches_pytorch(arch, layout, dtype, head, tiny_model, tmp_path):
    folder = resave(tiny_model(arch), tmp_path / "model", dtype, layout, head)
    header = checkpoint(folder)
    assert {v["dtype"] for v in header.values() if v["dtype"] in ("F32", "F16", "BF16")} == {DTYPES[dtype][1]}
    shards = list(folder.glob("*.safetensors"))
    if layout == "sharded":
        assert (folder / "model.safetensors.index.json").is_file() and len(shards) > 1
    else:
        assert [p.name for p in shards] == ["model.safetensors"]
    out = export(folder, tmp_path / "gguf")
    ref, gg = open_pair(folder, out)
    try:
        assert head_is_tied(ref) == (head == "tied"), "the folder is not what the case says"
        tensors = gguf_tensors(out / "model-f16.gguf")
        if head == "untied":
            want = ref.model.lm_head.weight.detach().float().numpy()
            np.testing.assert_allclose(tensors["output.weight"].astype(np.float32).reshape(want.shape), want,
                                       rtol=1e-3, atol=1e-6)
        else:
            assert "output.weight" not in tensors, "a tied head was written again beside token_embd"
        assert_logits_match(ref, gg, f"{arch} {layout} {dtype} {head}")
        if ref.is_vision:  # the tower and projector came through the same dtype and shards
            img = picture(0, image_size(ref))
            e, f = gg.image_embeddings(img), ref.image_embeddings(img)
            cos = (e * f).sum(-1) / np.linalg.norm(e, axis=-1) / np.linalg.norm(f, axis=-1)
            assert e.shape == f.shape and cos.min() >= 0.999, f"image embedding cosine {cos.min():.5f}"
    finally:
        ref.close()
        gg.close()


def test_tied_head_saved_anyway_is_not_duplicated(tiny_model, tmp_path):
    """Some checkpoints keep lm_head.weight although the config ties it: transformers ties it all the same, so the
    file holds token_embd once and no output.weight."""
    from safetensors.torch import load_file, save_file

    folder = resave(tiny_model("llama"), tmp_path / "model", "fp32", "single", "tied")
    sd = load_file(folder / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    out = export(folder, tmp_path / "gguf")
    assert "output.weight" not in gguf_tensors(out / "model-f16.gguf")
    ref, gg = open_pair(folder, out)
    try:
        assert head_is_tied(ref)
        assert_logits_match(ref, gg, "tied head saved anyway")
    finally:
        ref.close()
        gg.close()


def test_untied_config_without_head_is_refused(tiny_model, tmp_path):
    """tie_word_embeddings false but no lm_head in the checkpoint: transformers would start the head from random
    values, so the export refuses and says what to do."""
    folder = resave(tiny_model("llama"), tmp_path / "model", "fp32", "single", "tied")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="no lm_head weight.*save the model again with its head"):
        export(folder, tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()


@pytest.mark.parametrize("arch", ["llama", "gemma3", "llava"])
def test_exporter_ties_the_head_as_transformers_does(arch, tiny_model, tmp_path):
    """Only the top-level config decides (Gemma 3 saved untied keeps text_config.tie_word_embeddings true)."""
    from edgemed.backends import open_model
    from edgemed.export.gguf_tensors import Checkpoint, plan_tensors
    from edgemed.export.gguf_text import load_config

    folder = resave(tiny_model(arch), tmp_path / "model", "fp32", "single", "untied")
    ref = open_model(folder, device="cpu", n_threads=2)
    try:
        assert not head_is_tied(ref)
        text = REGISTRY[arch].text_config(ref.model.config)
        if arch == "gemma3":  # the case this test exists for
            assert text.tie_word_embeddings and not ref.model.config.tie_word_embeddings
    finally:
        ref.close()
    plan = plan_tensors(REGISTRY[arch], load_config(folder), Checkpoint(folder), "text")
    assert [e.key for e in plan if e.name == "output.weight"] == ["lm_head.weight"]


# ---------------------------------------------------------------------------------------------- legacy layouts
@pytest.mark.parametrize("layout", list(LLAVA_LAYOUTS))
def test_llava_hub_layouts_open_and_export(layout, tiny_model, tmp_path):
    """LLaVA-1.5 as the hub ships it (fp16, sharded, untied head) in each key layout: transformers opens it to the
    same model, and the export is tensor for tensor the one of the folder as transformers 5 saves it."""
    saved = resave(tiny_model("llava"), tmp_path / "saved", "fp16", "sharded", "untied")
    folder = shutil.copytree(saved, tmp_path / layout)
    keys = rename_keys(folder, LLAVA_LAYOUTS[layout])
    wanted = tuple(b for _, b in LLAVA_LAYOUTS[layout])
    assert all(k.startswith(wanted) for k in keys) and keys != sorted(checkpoint(saved))
    out, plain = export_clip(folder, tmp_path / "gguf"), export_clip(saved, tmp_path / "gguf-saved")
    for name in ("model-f16.gguf", "mmproj-f16.gguf"):
        got, want = gguf_tensors(out / name), gguf_tensors(plain / name)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want), name
    assert "output.weight" in gguf_tensors(out / "model-f16.gguf")
    ref, gg = open_pair(folder, out)
    from edgemed.backends import open_model

    same = open_model(saved, device="cpu", n_threads=2)
    try:
        tokens = ref.tokenize(ref.render(QUESTION))
        np.testing.assert_array_equal(ref.logits(tokens), same.logits(tokens))
        img = picture(1, image_size(ref))
        np.testing.assert_array_equal(ref.image_embeddings(img), same.image_embeddings(img))
        assert_logits_match(ref, gg, f"llava {layout}")
    finally:
        for b in (ref, gg, same):
            b.close()


def test_mllama_hub_layout_opens_and_points_to_onnx(tiny_model, tmp_path):
    """Llama 3.2 Vision: transformers 5 saves the hub's legacy layout; it opens in PyTorch, and `export gguf`
    refuses it naming `export onnx` (llama.cpp has no mllama); the module-name layout opens to the same model."""
    from edgemed.backends import open_model

    src = tiny_model("mllama")
    assert all(k.startswith(MLLAMA_HUB) for k in checkpoint(src))
    renamed = shutil.copytree(src, tmp_path / "module-names")
    assert all(k.startswith(tuple(b for _, b in MLLAMA_MODULES)) for k in rename_keys(renamed, MLLAMA_MODULES))
    a, b = open_model(src, device="cpu", n_threads=2), open_model(renamed, device="cpu", n_threads=2)
    try:
        tokens = a.tokenize(a.render(QUESTION, image=True))
        img = picture(2, 32)
        np.testing.assert_array_equal(a.logits(tokens, img), b.logits(tokens, img))
    finally:
        a.close()
        b.close()
    for folder in (src, renamed):
        with pytest.raises(ExportError, match="no mllama.*edgemed export onnx"):
            export(folder, tmp_path / "gguf")
        assert not (tmp_path / "gguf").exists()


@pytest.mark.slow  # torch.onnx on the tiny mllama: about 25 s here
def test_mllama_module_layout_exports_to_onnx(tiny_model, tmp_path):
    from edgemed.backends import open_model
    from edgemed.export.onnx import export_onnx

    folder = shutil.copytree(tiny_model("mllama"), tmp_path / "module-names")
    rename_keys(folder, MLLAMA_MODULES)
    out = export_onnx(folder, "fp32", tmp_path / "onnx")
    ref, ox = open_model(folder, device="cpu", n_threads=2), open_model(out, n_threads=2)
    try:
        tokens = ref.tokenize(ref.render(QUESTION, image=True))
        img = picture(3, 32)
        got, want = ox.logits(tokens, img), ref.logits(tokens, img)
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-3
    finally:
        ref.close()
        ox.close()


# ---------------------------------------------------------------------------------------------- LLaVA, CLIP tower
def siglip_llava(folder: Path) -> Path:
    """The tiny LLaVA with a SigLIP tower (no class token; strategy 'full'), as the embedded image model."""
    from transformers import LlavaForConditionalGeneration

    from edgemed.archs._tiny import save_folder, seeded
    from edgemed.archs.llama import chatml_tokenizer, tiny_text_config
    from edgemed.archs.llava import llava_config, siglip_processor, siglip_vision_config

    torch = seeded(0)
    tok = chatml_tokenizer()
    text = tiny_text_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    cfg = llava_config(text, siglip_vision_config(32, 8, 32, 2, 4), tok.convert_tokens_to_ids("<image>"), -1, "full")
    return save_folder(folder, LlavaForConditionalGeneration(cfg).to(torch.float32), tok, siglip_processor(tok, 32, 8))


def test_clip_llava_warns_before_writing(tiny_model, tmp_path, monkeypatch):
    """The warning names llama.cpp's defects and the way out, and comes before any file is written."""
    import edgemed.export.gguf as gguf_export

    def no_write(*a, **k):
        raise AssertionError("the export started writing before it warned")

    monkeypatch.setattr(gguf_export, "atomic_dir", no_write)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EdgemedWarning)  # the warning stops the export where it is given
        with pytest.raises(EdgemedWarning) as e:
            export(tiny_model("llava"), tmp_path / "gguf")
    msg = str(e.value)
    from importlib.metadata import version

    for part in ("#25814", "[patch 1..n-1, CLS]", "#25844", "#25817", "block_count = n-1", "edgemed export onnx",
                 f"llama-cpp-python {version('llama-cpp-python')}"):
        assert part in msg, f"{part!r} missing from: {msg}"
    assert not (tmp_path / "gguf").exists()


def test_siglip_llava_and_text_models_export_without_warning(tiny_model, tmp_path):
    for i, folder in enumerate((siglip_llava(tmp_path / "siglip"), tiny_model("gemma3"), tiny_model("llama"))):
        with warnings.catch_warnings():
            warnings.simplefilter("error", EdgemedWarning)
            export(folder, tmp_path / f"gguf{i}")


def test_cls_warning_follows_the_llama_cpp_version(tiny_model, tmp_path, monkeypatch):
    """Pinned to llama-cpp-python's version: the installed one is listed as having the defect; a release listed
    as fixed exports without the warning, and an unlisted one is taken to have it."""
    from importlib.metadata import version

    from edgemed.export import gguf_mmproj

    installed = version("llama-cpp-python")
    assert gguf_mmproj.CLS_DEFECT.get(installed) is True, (
        f"llama-cpp-python {installed} is not in edgemed.export.gguf_mmproj.CLS_DEFECT: check whether its llama.cpp "
        "has the LLaVA CLS fix (PR #25844) and add it (test_gguf_clean_llava_export_passes in test_parity.py then "
        "tells whether parity passes)")
    assert gguf_mmproj.has_cls_defect("0.0.0-unlisted") and gguf_mmproj.has_cls_defect(None)
    monkeypatch.setitem(gguf_mmproj.CLS_DEFECT, installed, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EdgemedWarning)
        export(tiny_model("llava"), tmp_path / "fixed")


@pytest.mark.slow  # a fresh `edgemed` process (import, supervision) and an export: about 14 s here
def test_cli_shows_the_clip_warning_on_the_terminal(tiny_model, tmp_path):
    """Through the real `edgemed` program (supervised, library noise to the log): one warning line on stderr."""
    exe = Path(sys.executable).with_name("edgemed")
    r = subprocess.run([str(exe), "export", "gguf", str(tiny_model("llava")), "--out", str(tmp_path / "gguf")],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "EDGEMED_HOME": str(tmp_path / "home"),
                            "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(lines) == 1 and "#25814" in lines[0] and "edgemed export onnx" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and (tmp_path / "gguf" / "mmproj-f16.gguf").is_file()


# ---------------------------------------------------------------------------------------------- templates at export
@pytest.mark.slow  # an ONNX export and two runtimes: about 14 s here
def test_onnx_export_gives_a_base_model_the_template(tiny_model, tmp_path):
    """A base model (no template) exported with --chat-template answers chat prompts through the ONNX runtime with
    that template, as PyTorch does with the model it came from."""
    from edgemed.backends import open_model
    from edgemed.backends.base import GenParams
    from edgemed.cli import main

    src = tiny_model("llama")
    base = base_model(src, tmp_path / "base")
    template = (src / "chat_template.jinja").read_text()
    (tmp_path / "t.jinja").write_text(template)
    r = CliRunner().invoke(main, ["export", "onnx", str(base), "--out", str(tmp_path / "onnx"),
                                  "--chat-template", str(tmp_path / "t.jinja")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "onnx" / "chat_template.jinja").read_text() == template
    ox, ref = open_model(tmp_path / "onnx", n_threads=2), open_model(src, device="cpu", n_threads=2)
    try:
        prompt = ox.render(QUESTION, system="You are a careful radiologist.")
        assert prompt == ref.render(QUESTION, system="You are a careful radiologist.")
        assert prompt.endswith("<|im_start|>assistant\n") and ox.chat_template() == template
        params = GenParams(max_tokens=8)
        assert "".join(ox.generate(prompt, None, params)) == "".join(ref.generate(prompt, None, params))
    finally:
        ox.close()
        ref.close()
    plain = open_model(base, device="cpu", n_threads=2)  # the source keeps no template: the export carries it
    try:
        assert "<|im_start|>" not in plain.render(QUESTION)
    finally:
        plain.close()


@pytest.mark.parametrize("content", ["{% for m in messages %}{{ m['content'] }", "", b"\xff\xfe\x00bad"])
def test_onnx_export_refuses_a_bad_template_file(content, tiny_model, tmp_path):
    from edgemed.cli import main

    path = tmp_path / "t.jinja"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    r = CliRunner().invoke(main, ["export", "onnx", str(base_model(tiny_model("llama"), tmp_path / "base")),
                                  "--out", str(tmp_path / "onnx"), "--chat-template", str(path)])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: --chat-template") and "Traceback" not in r.output, r.output
    assert not (tmp_path / "onnx").exists()
