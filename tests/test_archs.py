"""The architecture registry against the transformers module tree of each family's tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import ARCHS, REGISTRY, TEXT_ARCHS, VISION_ARCHS

from edgemed import prompting
from edgemed.archs import arch_for_dir, get_arch
from edgemed.errors import ArchError

QUESTION = "Is there a lesion in the left lung? Answer with one word and describe the image."
SYSTEM = "You are a careful radiologist."


def _model(folder: Path):
    import transformers

    spec = arch_for_dir(folder)
    return getattr(transformers, spec.model_class).from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def loaded(tiny_model):
    """``loaded(arch)`` -> (folder, model) of the seed-0 tiny model, loaded once per module."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            folder = tiny_model(arch)
            cache[arch] = (folder, _model(folder))
        return cache[arch]

    return get


def _image(seed: int, size: tuple[int, int] = (48, 40)):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _decoder_layers(spec, model) -> int:
    return spec.text_config(model.config).num_hidden_layers


# --- building and loading -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_is_a_complete_small_folder(arch, tiny_model):
    folder = tiny_model(arch)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    if REGISTRY[arch].is_vision:
        assert "processor_config.json" in names or "preprocessor_config.json" in names
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 10_000_000, f"{arch} tiny model is {size / 1e6:.1f} MB"


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_for_dir_finds_the_entry(arch, tiny_model):
    assert arch_for_dir(tiny_model(arch)) is REGISTRY[arch]
    assert get_arch(arch) is REGISTRY[arch]


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ArchError) as e:
        arch_for_dir(tmp_path)
    message = str(e.value)
    assert "'bert'" in message
    for name in ARCHS:
        assert name in message


@pytest.mark.parametrize("arch", ARCHS)
def test_text_prompt_forwards(arch, loaded):
    import torch
    from transformers import AutoTokenizer

    spec = REGISTRY[arch]
    folder, model = loaded(arch)
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = prompting.render(tok, prompting.messages(QUESTION, system=SYSTEM, typed=spec.is_vision))
    assert QUESTION in prompt and SYSTEM in prompt
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    assert tok.decode(ids["input_ids"][0]) == prompt  # the tokenizer round-trips the rendered prompt
    with torch.no_grad():
        logits = model(**ids).logits
    vocab = spec.text_config(model.config).vocab_size
    assert logits.shape == (1, ids["input_ids"].shape[1], vocab)
    assert torch.isfinite(logits).all()
    assert logits[0, -1].std() > 0


@pytest.mark.parametrize("arch", VISION_ARCHS)
def test_image_prompt_renders_processes_and_forwards(arch, loaded):
    import torch
    from transformers import AutoProcessor

    spec = REGISTRY[arch]
    folder, model = loaded(arch)
    arch_for_dir(folder)  # what every loader does first (registers Qwen2.5-VL's processor class)
    proc = AutoProcessor.from_pretrained(folder)
    prompt = proc.apply_chat_template(prompting.messages(QUESTION, image=True, typed=True, system=SYSTEM),
                                      add_generation_prompt=True, tokenize=False)
    assert prompt.count(spec.image_placeholder) == 1
    logits = []
    for seed in (0, 1):
        inputs = proc(text=prompt, images=[_image(seed)], return_tensors="pt")
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
    assert torch.isfinite(logits[0]).all()
    # the image reaches the decoder: a different image changes the next-token logits
    assert (logits[0] - logits[1]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", VISION_ARCHS)
def test_processor_expands_the_placeholder_into_the_models_image_tokens(arch, loaded):
    folder, model = loaded(arch)
    from transformers import AutoProcessor

    arch_for_dir(folder)
    proc = AutoProcessor.from_pretrained(folder)
    prompt = proc.apply_chat_template(prompting.messages(QUESTION, image=True, typed=True),
                                      add_generation_prompt=True, tokenize=False)
    ids = proc(text=prompt, images=[_image(0, (64, 64))], return_tensors="pt")["input_ids"][0].tolist()
    image_id = model.config.image_token_id
    n = ids.count(image_id)
    assert n >= 1
    cfg = model.config
    if arch == "gemma3":
        assert n == cfg.mm_tokens_per_image
    elif arch == "mllama":
        assert n == 1  # cross-attention: the placeholder stays one token
    elif arch == "qwen2_5_vl":
        assert n == (64 // cfg.vision_config.patch_size // cfg.vision_config.spatial_merge_size) ** 2


# --- prompt rendering -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_string_and_typed_content_render_alike_for_text_turns(arch, tiny_model):
    from transformers import AutoProcessor, AutoTokenizer

    folder = tiny_model(arch)
    arch_for_dir(folder)
    owners = [AutoTokenizer.from_pretrained(folder)]
    if REGISTRY[arch].is_vision:
        owners.append(AutoProcessor.from_pretrained(folder))
    for owner in owners:
        for system in (None, SYSTEM):
            for answer, gen in ((None, True), ("Yes, a large one.", False)):
                plain = prompting.render(owner, prompting.messages(QUESTION, system=system, answer=answer), gen)
                typed = prompting.render(owner, prompting.messages(QUESTION, system=system, typed=True,
                                                                   answer=answer), gen)
                assert plain == typed, f"{type(owner).__name__} system={system!r} answer={answer!r}"
                assert QUESTION in plain and (system is None or system in plain)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_and_answer_split_keeps_the_end_of_turn(arch, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model(arch))
    prompt, answer = prompting.prompt_and_answer(tok, QUESTION, "Large.", image=False, system=SYSTEM,
                                                 typed=REGISTRY[arch].is_vision)
    assert answer.startswith("Large.") and len(answer) > len("Large.")
    assert prompt.endswith("\n")


# --- module paths, LoRA targets, parts, norms ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_lora_regex_hits_every_decoder_layer_and_nothing_else(arch, loaded):
    import torch

    spec = REGISTRY[arch]
    _, model = loaded(arch)
    modules = dict(model.named_modules())
    regex = spec.decoder_lora_regex()
    hits = [n for n in modules if re.fullmatch(regex, n)]
    assert hits
    for n in hits:
        assert isinstance(modules[n], torch.nn.Linear), n
        assert n.startswith(spec.decoder + ".layers."), n
        if spec.vision:
            assert not n.startswith(spec.vision + "."), n
        if spec.projector:
            assert not n.startswith(spec.projector + "."), n
    for i in range(_decoder_layers(spec, model)):
        leaves = {n.rsplit(".", 1)[-1] for n in hits if n.startswith(f"{spec.decoder}.layers.{i}.")}
        # attention (self- or cross-) and MLP projections of every layer
        assert {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"} <= leaves, (i, sorted(leaves))
    # every Linear the default targets name inside the decoder layers is hit (none silently missed)
    wanted = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)
              and n.startswith(spec.decoder + ".layers.") and n.rsplit(".", 1)[-1] in spec.decoder_lora]
    assert sorted(wanted) == sorted(hits)


def test_mllama_lora_targets_cross_attention():
    spec = get_arch("mllama")
    regex = spec.decoder_lora_regex()
    for leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert re.fullmatch(regex, f"model.language_model.layers.3.cross_attn.{leaf}")
        assert re.fullmatch(regex, f"model.language_model.layers.2.self_attn.{leaf}")
    assert not re.fullmatch(regex, "model.vision_model.transformer.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("arch", VISION_ARCHS)
def test_vision_lora_regex_hits_only_vision_linears(arch, loaded):
    import torch

    spec = REGISTRY[arch]
    _, model = loaded(arch)
    modules = dict(model.named_modules())
    hits = [n for n in modules if re.fullmatch(spec.vision_lora_regex(), n)]
    assert hits
    for n in hits:
        assert isinstance(modules[n], torch.nn.Linear), f"{n} is a {type(modules[n]).__name__}"
        assert spec.part_of(n + ".weight") == "vision", n
    assert {n.rsplit(".", 1)[-1] for n in hits} == {t.rsplit(".", 1)[-1] for t in spec.vision_lora}


@pytest.mark.parametrize("arch", ARCHS)
def test_part_of_places_every_parameter(arch, loaded):
    spec = REGISTRY[arch]
    _, model = loaded(arch)
    parts: dict[str, list[str]] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        parts.setdefault(spec.part_of(name), []).append(name)
    assert "other" not in parts, parts.get("other")
    assert parts["decoder"] and all(n.startswith(spec.decoder + ".") for n in parts["decoder"])
    assert parts["lm_head"] == ["lm_head.weight"]
    if spec.is_vision:
        assert parts["vision"] and parts["projector"]
        assert all(n.startswith(spec.vision + ".") for n in parts["vision"])
        assert all(n.startswith(spec.projector + ".") for n in parts["projector"])
    else:
        assert set(parts) == {"decoder", "lm_head"}


def test_qwen2_5_vl_merger_is_the_projector_although_inside_the_vision_module():
    spec = get_arch("qwen2_5_vl")
    assert spec.part_of("model.visual.merger.mlp.0.weight") == "projector"
    assert spec.part_of("model.visual.merger.ln_q.weight") == "projector"
    assert spec.part_of("model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert not re.fullmatch(spec.vision_lora_regex(), "model.visual.patch_embed.proj")


@pytest.mark.parametrize("arch", ARCHS)
def test_norms_named_in_the_spec_exist(arch, loaded):
    spec = REGISTRY[arch]
    _, model = loaded(arch)
    modules = dict(model.named_modules())

    def norm_leaves(prefix: str) -> set[str]:
        return {n.rsplit(".", 1)[-1] for n, m in modules.items()
                if n.startswith(prefix + ".") and "norm" in type(m).__name__.lower()}

    decoder_norms = norm_leaves(spec.decoder)
    assert set(spec.norms) == decoder_norms, f"spec {sorted(spec.norms)} vs model {sorted(decoder_norms)}"
    norm_params = [n for n, _ in model.named_parameters() if spec.is_decoder_norm(n)]
    assert norm_params and all(n.rsplit(".", 2)[-2] in spec.norms for n in norm_params)
    if spec.is_vision:
        vision_norms = norm_leaves(spec.vision) - norm_leaves(spec.projector)
        assert set(spec.vision_norms) == vision_norms, (sorted(spec.vision_norms), sorted(vision_norms))


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_declares_gguf_support_or_why_not(arch):
    spec = REGISTRY[arch]
    assert spec.gguf_arch or "onnx" in spec.no_gguf_reason
    assert spec.gguf or spec.no_gguf_reason  # `export gguf` says why it cannot write this family
    if spec.is_vision and spec.gguf_arch:
        assert spec.gguf_projector
    assert spec.notes or arch in ("llama", "llava")


def test_gguf_names_are_the_ones_gguf_py_knows():
    import gguf

    archs = set(gguf.MODEL_ARCH_NAMES.values())
    projectors = {v for k, v in vars(gguf.VisionProjectorType).items() if not k.startswith("_")}
    for spec in REGISTRY.values():
        if spec.gguf_arch:
            assert spec.gguf_arch in archs, spec.name
        if spec.gguf_projector and spec.gguf_projector != "mlp":  # "mlp" is clip.cpp's LLaVA projector name
            assert spec.gguf_projector in projectors, spec.name


# --- what the tiny configs must exercise ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gemma3", "gemma3_text"])
def test_gemma_tiny_config_exercises_what_breaks_exports(arch, loaded):
    spec = REGISTRY[arch]
    folder, model = loaded(arch)
    text = spec.text_config(model.config)
    assert set(text.layer_types) == {"full_attention", "sliding_attention"}
    # and in the pattern llama.cpp's gemma3 hard-codes (global iff il % 6 == 5), so GGUF exports can match it
    assert text.layer_types == ["full_attention" if i % 6 == 5 else "sliding_attention"
                                for i in range(text.num_hidden_layers)]
    assert text.attn_logit_softcapping is not None
    assert text.rope_parameters["sliding_attention"]["rope_theta"] != text.rope_parameters["full_attention"][
        "rope_theta"]
    if arch == "gemma3_text":
        assert text.final_logit_softcapping is not None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    prompt = prompting.render(tok, prompting.messages(QUESTION, typed=spec.is_vision))
    assert len(tok(prompt, add_special_tokens=False)["input_ids"]) > 2 * text.sliding_window
    # Gemma norms are stored as w and applied as 1 + w: the tiny weights are not all zero
    norms = [p for n, p in model.named_parameters() if spec.is_decoder_norm(n)]
    assert all(p.abs().max() > 0 for p in norms)


def _softcap_variant(arch: str, model, final: float | None, attn: float | None):
    """Logits of the same weights under a config with these soft-capping values (eager attention)."""
    import copy

    import torch

    ids = torch.tensor([[2, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110]])
    cfg = copy.deepcopy(model.config)
    text = REGISTRY[arch].text_config(cfg)
    text.final_logit_softcapping, text.attn_logit_softcapping = final, attn
    m = type(model)._from_config(cfg, attn_implementation="eager").eval()
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        return m(input_ids=ids).logits


def test_gemma_softcapping_claims_in_the_notes_hold(loaded):
    """Gemma3ForCausalLM applies final_logit_softcapping; neither model applies attn_logit_softcapping, and
    Gemma3ForConditionalGeneration ignores final_logit_softcapping (transformers 5.23)."""
    import torch

    variant = _softcap_variant
    for arch in ("gemma3_text", "gemma3"):
        _, model = loaded(arch)
        plain = variant(arch, model, None, None)
        assert torch.allclose(variant(arch, model, None, 1e-3), plain, atol=1e-6), f"{arch} applies attn capping"
        capped = variant(arch, model, 1e-3, None)
        if arch == "gemma3_text":
            assert capped.abs().max() <= 1e-3 < plain.abs().max()
        else:
            assert torch.allclose(capped, plain, atol=1e-6)


@pytest.mark.parametrize("arch", ["gemma3", "gemma3_text"])
def test_gemma_sentencepiece_model_agrees_with_tokenizer_json(arch, tiny_model):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from edgemed.archs._tiny import CORPUS

    folder = tiny_model(arch)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    for text in CORPUS + ["<start_of_turn>user\nunseen wörds 🙂 x-ray<end_of_turn>\n"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert tok("Liver")["input_ids"][0] == tok.bos_token_id  # adds <bos>, as Gemma's tokenizer does


def test_mllama_tiny_model_mixes_self_and_cross_attention_layers(loaded):
    _, model = loaded("mllama")
    text = model.config.text_config
    assert 0 < len(text.cross_attention_layers) < text.num_hidden_layers
    for i, layer in enumerate(model.model.language_model.layers):
        assert hasattr(layer, "cross_attn") == (i in text.cross_attention_layers)
    gates = {n: p.item() for n, p in model.named_parameters() if n.endswith(("attn_gate", "mlp_gate"))}
    assert gates and all(abs(g) >= 0.5 for g in gates.values())
    # as in Llama 3.2 Vision: <|image|> is the first id past the text vocabulary
    assert model.config.image_token_id == text.vocab_size
    assert model.model.language_model.embed_tokens.num_embeddings == text.vocab_size + 8


def test_qwen2_5_vl_tiny_model_has_window_and_full_attention_blocks_and_mrope(loaded):
    _, model = loaded("qwen2_5_vl")
    vision, text = model.config.vision_config, model.config.text_config
    assert 0 < len(vision.fullatt_block_indexes) < vision.depth
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    # the 64 px test image spans more than one attention window
    assert 64 > vision.window_size
    assert any(n.endswith("q_proj.bias") for n, _ in model.named_parameters())


def test_qwen2_q_k_v_biases_are_not_zero(loaded):
    _, model = loaded("qwen2")
    biases = {n: p for n, p in model.named_parameters() if n.endswith("_proj.bias")}
    assert {n.rsplit(".", 2)[-2] for n in biases} == {"q_proj", "k_proj", "v_proj"}
    assert all(p.abs().max() > 0 for p in biases.values())


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_text_archs_have_no_vision_parts(arch):
    spec = REGISTRY[arch]
    assert spec.vision is None and spec.projector is None and spec.image_placeholder is None
    with pytest.raises(ValueError):
        spec.vision_lora_regex()


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_build_is_a_function_of_the_seed(arch, tiny_model, tmp_path):
    import hashlib

    def digest(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}

    build = REGISTRY[arch].build_tiny
    assert digest(build(tmp_path / "again", 0)) == digest(tiny_model(arch))
    assert digest(build(tmp_path / "other", 1))["model.safetensors"] != digest(tiny_model(arch))["model.safetensors"]


def test_qwen2_5_vl_processor_loads_in_a_fresh_process_after_arch_for_dir(tiny_model):
    """transformers' Qwen2.5-VL processor needs torchvision; the registered image-only one needs arch_for_dir."""
    import os
    import subprocess
    import sys

    folder = tiny_model("qwen2_5_vl")
    code = ("import sys; from edgemed.archs import arch_for_dir; arch_for_dir(sys.argv[1]); "
            "from transformers import AutoProcessor; p = AutoProcessor.from_pretrained(sys.argv[1]); "
            "print(type(p).__name__, p.image_token)")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["Qwen2_5_VLImageTextProcessor", "<|image_pad|>"]


def test_gemma3_gguf_refuses_what_llama_cpp_hard_codes(loaded):
    """llama.cpp's gemma3 fixes the layer pattern, the local RoPE base and the attention scale: a config asking
    for anything else must be refused, not exported into a file that answers differently."""
    import copy

    from edgemed.errors import ExportError

    _, model = loaded("gemma3_text")
    kv = REGISTRY["gemma3_text"].gguf.text_kv
    ok = kv(model.config)
    assert ok["{arch}.attention.sliding_window"] == model.config.sliding_window
    assert ok["{arch}.final_logit_softcapping"] == model.config.final_logit_softcapping
    assert ok["{arch}.rope.freq_base"] == model.config.rope_parameters["full_attention"]["rope_theta"]
    for change in ({"query_pre_attn_scalar": 24},
                   {"layer_types": ["sliding_attention", "full_attention"] * 3},
                   {"rope_parameters": {**model.config.rope_parameters,
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 20_000.0}}}):
        cfg = copy.deepcopy(model.config)
        for k, v in change.items():
            setattr(cfg, k, v)
        with pytest.raises(ExportError, match=next(iter(change))):
            kv(cfg)
    # the image-text model's decoder is checked the same way, and never carries the soft-capping it ignores
    _, vlm = loaded("gemma3")
    vlm_kv = REGISTRY["gemma3"].gguf.text_kv
    text = copy.deepcopy(vlm.config.text_config)
    text.final_logit_softcapping = 30.0
    assert "{arch}.final_logit_softcapping" not in vlm_kv(text)
    text.query_pre_attn_scalar = 24
    with pytest.raises(ExportError, match="query_pre_attn_scalar"):
        vlm_kv(text)


# --- ONNX and image-token facts the exporters read from the spec, checked against transformers --------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_decoder_route_matches_what_the_model_class_takes(arch):
    """cross: image features enter by cross-attention; grid: 3-D rotary positions from the image grid; token_types:
    token types change the attention mask (the builder's causal attention cannot express it); else the builder."""
    import inspect

    import transformers

    spec = REGISTRY[arch]
    forward = inspect.signature(getattr(transformers, spec.model_class).forward).parameters
    if "cross_attention_states" in forward:
        want = "cross"
    elif spec.grid is not None:
        want = "grid"
    elif spec.is_vision and "token_type_ids" in forward:
        want = "token_types"
    else:
        want = "builder"
    assert spec.onnx.decoder == want
    if spec.grid is not None:  # the grid route's vision graph is the entry's own
        assert spec.grid.vision_graph is not None


def test_onnx_spec_refuses_an_unknown_route():
    from edgemed.archs.base import ONNXSpec

    with pytest.raises(ValueError, match="'tensorrt'.*builder, cross, token_types, grid"):
        ONNXSpec(decoder="tensorrt")


@pytest.mark.parametrize("arch", [a for a in VISION_ARCHS if REGISTRY[a].grid is None])
def test_onnx_vision_inputs_are_what_the_image_function_takes(arch, loaded):
    """ONNXSpec.image_features says whether the model has get_image_features, and vision_inputs are exactly the
    processor outputs that function (or the vision tower) takes."""
    import inspect

    from transformers import AutoProcessor

    from edgemed.export.onnx_vision import TEXT_KEYS

    folder, model = loaded(arch)
    spec = REGISTRY[arch]
    assert spec.onnx.image_features == hasattr(model, "get_image_features")
    fn = model.get_image_features if spec.onnx.image_features else model.get_submodule(spec.vision).forward
    params = inspect.signature(fn).parameters
    enc = AutoProcessor.from_pretrained(folder)(text=[spec.image_placeholder], images=[_image(0)], return_tensors="pt",
                                                add_special_tokens=False)
    assert set(spec.onnx.vision_inputs) == {k for k in enc if k not in TEXT_KEYS and k in params}


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_attn_softcapping_says_what_pytorch_does(arch, loaded):
    """Where the text config has attn_logit_softcapping, ONNXSpec.attn_softcapping says whether transformers
    applies it (the builder applies it whenever set); elsewhere the default stands."""
    import torch

    _, model = loaded(arch)
    spec = REGISTRY[arch]
    if not hasattr(spec.text_config(model.config), "attn_logit_softcapping"):
        assert spec.onnx.attn_softcapping
        return
    plain = _softcap_variant(arch, model, None, None)
    applied = not torch.allclose(_softcap_variant(arch, model, None, 1e-3), plain, atol=1e-6)
    assert spec.onnx.attn_softcapping == applied


@pytest.mark.parametrize("arch", VISION_ARCHS)
def test_image_token_ids_are_the_placeholder_and_its_expansion(arch, loaded):
    """placeholder_id: the one token a rendered prompt holds per image; image_token_id: the token the processor
    expands it into, whose rows the image features replace (Gemma 3: two different tokens)."""
    from transformers import AutoProcessor

    folder, model = loaded(arch)
    spec = REGISTRY[arch]
    proc = AutoProcessor.from_pretrained(folder)
    tok = proc.tokenizer
    placeholder = spec.placeholder_id(tok)
    assert tok(spec.image_placeholder, add_special_tokens=False)["input_ids"] == [placeholder]
    ids = proc(text=[spec.image_placeholder], images=[_image(0)], return_tensors="pt",
               add_special_tokens=False)["input_ids"][0].tolist()
    image = spec.image_token_id(model.config)
    assert image in ids
    assert (image != placeholder) == (arch == "gemma3")
    with pytest.raises(ArchError, match=f"{arch} model config has no image_token_id"):
        spec.image_token_id(object())  # a config without the attribute


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_text_archs_have_no_placeholder_id(arch, tiny_model):
    from transformers import AutoTokenizer

    assert REGISTRY[arch].placeholder_id(AutoTokenizer.from_pretrained(tiny_model(arch))) is None


@pytest.mark.parametrize("arch", [a for a in VISION_ARCHS if REGISTRY[a].gguf])
def test_gguf_vision_keys_name_the_vision_configs_block_and_head_counts(arch, loaded):
    import torch

    _, model = loaded(arch)
    g, v = REGISTRY[arch].gguf, model.config.vision_config
    tower = model.get_submodule(REGISTRY[arch].vision)
    n_blocks = max(len(m) for m in tower.modules() if isinstance(m, torch.nn.ModuleList))  # the tower's blocks
    assert getattr(v, g.vision_block_key) == n_blocks
    assert v.hidden_size % getattr(v, g.vision_head_key) == 0
