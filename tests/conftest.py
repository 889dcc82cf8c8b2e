"""Shared fixtures: tiny random-weight model folders for every registered architecture, built once a session.

Parametrise a test over ``ARCHS`` (or ``VISION_ARCHS``, ``GGUF_ARCHS``) and a new architecture gets it too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
def embedded_text() -> Path:
    """The embedded SmolLM2-135M-Instruct folder (real weights), materialised once into the user cache."""
    from edgemed import embedded

    return embedded.materialize(embedded.TEXT, quiet=True)


@pytest.fixture(scope="session")
def embedded_image() -> Path:
    """The embedded LLaVA-layout image model folder (real decoder, random vision tower and projector)."""
    from edgemed import embedded

    return embedded.materialize(embedded.IMAGE, quiet=True)


def write_vqa(folder: Path, n: int = 6, image: bool = True, size: int = 40) -> Path:
    """A small VQA JSONL with PNG images whose answers depend on the picture (bright left or right half)."""
    import json

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        side = "left" if i % 2 == 0 else "right"
        rec = {"question": "Which side is bright?", "answer": side, "answer_type": "open", "image": None}
        if image:
            arr = np.zeros((size, size, 3), dtype=np.uint8)
            arr[:, : size // 2] = 220 if side == "left" else 20
            arr[:, size // 2:] = 20 if side == "left" else 220
            Image.fromarray(arr).save(folder / f"img{i}.png")
            rec["image"] = f"img{i}.png"
        else:
            rec["question"] = f"Say {side}."
        lines.append(json.dumps(rec))
    path = folder / "vqa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
