"""Training throughput and peak memory.

CPU (always): the demo recipe on the embedded default image model, a few steps, tokens/s and peak RSS, fp32 and
bf16 autocast. CUDA (when present): QLoRA at sequence length 1024 with gradient checkpointing on randomly
initialised models built from the public configs of MedGemma 4B and Llama 3.2 11B Vision, against a plain
transformers + PEFT baseline (bf16 LoRA, no checkpointing) in the same run.

    python tools/bench_finetune.py [--steps 6] [--gpu-only]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

# Public configs (shapes only; weights are random here, nothing is downloaded).
MEDGEMMA_4B = {"model_type": "gemma3", "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
               "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
               "vocab_size": 262208, "sliding_window": 1024, "query_pre_attn_scalar": 256},
               "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                 "num_attention_heads": 16, "image_size": 896, "patch_size": 14},
               "mm_tokens_per_image": 256}
LLAMA32_11B_VISION = {"model_type": "mllama", "text_config": {"hidden_size": 4096, "intermediate_size": 14336,
                      "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
                      "vocab_size": 128256, "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38]},
                      "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                                        "num_global_layers": 8, "attention_heads": 16, "image_size": 560,
                                        "patch_size": 14, "max_num_tiles": 4}}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_bench(steps: int) -> list[dict]:
    import torch

    from edgemed import embedded
    from edgemed.data import generate_demo_set, read_dataset
    from edgemed.recipe import load_recipe
    from edgemed.train import answer_loss, build_model, collate, encode

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_demo_set(Path(tmp) / "data", n_train=16, n_val=2, n_test=2)
        recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "demo.yaml",
                             [f"stages.0.data.train={data['train']}"])
        base = embedded.materialize(embedded.IMAGE)
        for precision, weights in (("no", "float32"), ("bf16", "float32"), ("bf16", "bfloat16")):
            recipe.dtype = weights
            loaded, _ = build_model(recipe, base, "cpu", False)
            model = loaded.model
            params = [p for n, p in model.named_parameters() if "lora_" in n or "multi_modal_projector" in n]
            for p in params:
                p.requires_grad_(True)
                p.data = p.data.float()  # trainable weights stay fp32, as in edgemed.train
            opt = torch.optim.AdamW(params, lr=1e-4)
            ex = encode(loaded, recipe, read_dataset(data["train"]))
            bs = recipe.optim.batch_size
            tokens, t0 = 0, None
            for step in range(steps + 1):
                batch = collate(ex[(step * bs) % len(ex):][:bs] or ex[:bs], loaded.tokenizer.pad_token_id)
                if step == 1:
                    t0, tokens = time.perf_counter(), 0  # step 0 is warm-up
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss, _, _ = answer_loss(model, batch)
                loss.backward()
                opt.step()
                opt.zero_grad()
                tokens += int(batch["attention_mask"].sum())
            dt = time.perf_counter() - t0
            rows.append({"device": "cpu", "model": "smollm2-135m-llava (demo recipe)", "autocast": precision,
                         "frozen_weights": weights, "batch": bs, "steps": steps, "tokens_per_s": round(tokens / dt, 1),
                         "s_per_step": round(dt / steps, 2), "peak_rss_mb": round(peak_rss_mb())})
            del model, opt, loaded
    return rows


def gpu_bench(name: str, cfg: dict, seq: int = 1024, steps: int = 5) -> list[dict]:
    """QLoRA (edgemed path) vs plain transformers + PEFT bf16 LoRA on a random-weight model of a public shape."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText, BitsAndBytesConfig

    rows = []
    for mode in ("edgemed-qlora", "baseline-peft-bf16"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        config = AutoConfig.for_model(**cfg)
        with tempfile.TemporaryDirectory() as tmp:
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
            model.save_pretrained(tmp)
            del model
            kw = {"dtype": torch.bfloat16, "device_map": {"": 0}}
            if mode == "edgemed-qlora":
                kw["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["vision", "multi_modal_projector",
                                                                                  "lm_head"])
            model = AutoModelForImageTextToText.from_pretrained(tmp, **kw)
        if mode == "edgemed-qlora":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        targets = r".*language_model.*\.(q|k|v|o|gate|up|down)_proj"
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, 1000, (1, seq), device="cuda")
        try:
            for step in range(steps + 1):
                if step == 1:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                if mode == "edgemed-qlora":
                    keep = torch.arange(seq - 16, seq - 1, device="cuda")  # answer-only logits
                    out = model(input_ids=ids, logits_to_keep=keep)
                    loss = out.logits.float().logsumexp(-1).mean()
                else:
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            rows.append({"device": torch.cuda.get_device_name(), "model": name, "mode": mode, "seq": seq,
                         "tokens_per_s": round(seq * steps / dt, 1),
                         "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)})
        except torch.OutOfMemoryError:
            rows.append({"model": name, "mode": mode, "seq": seq, "error": "out of memory"})
        del model, opt
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--json", type=Path, help="Also write the rows as JSON here.")
    args = ap.parse_args(argv)
    import torch

    rows = [] if args.gpu_only else cpu_bench(args.steps)
    if torch.cuda.is_available():
        rows += gpu_bench("MedGemma 4B shape (random weights)", MEDGEMMA_4B)
        rows += gpu_bench("Llama 3.2 11B Vision shape (random weights)", LLAMA32_11B_VISION)
    else:
        print("no CUDA GPU here: the QLoRA figures for MedGemma 4B / Llama 3.2 11B Vision shapes were not measured",
              file=sys.stderr)
    for r in rows:
        print(json.dumps(r))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
