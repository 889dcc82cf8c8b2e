"""Report generation on the demo model: fine-tune on generated report text, merge, export GGUF, and print the
BLEU / ROUGE-L / CIDEr-D retention table of every export against the merged PyTorch model.

The phantom radiographs of ``edgemed data demo`` get a short findings report each, built from their labels
(lesion present, side, size), written in R2Gen's annotation.json layout, so the whole report path runs: the r2gen
reader and R2Gen's cleaning, training on report text, generation with the report budget, pycocoevalcap's scorers
(METEOR with Java), and the retention statistics.

    python tools/report_demo.py --out /tmp/report-demo [--steps 200] [--test-images 32] [--quant q8_0 --quant q4_k_m]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from edgemed.data import read_vqa_jsonl


def report_text(answers: dict[str, str]) -> str:
    """A findings report from one image's VQA answers (presence, side, size)."""
    if answers.get("presence") != "yes":
        return "Normal chest radiograph. Both lungs are clear. No lesion is seen."
    side, size = answers.get("side", "left"), answers.get("size", "small")
    return (f"Chest radiograph. There is a {size} lesion in the {side} lung, on the {side} side of the image. "
            f"The other lung is clear.")


def to_r2gen(data: dict[str, Path], out: Path) -> Path:
    """annotation.json (train/val/test) of the demo images, one report per image; images referenced in place."""
    ann: dict[str, list[dict]] = {}
    for split, key in (("train", "train"), ("val", "validation"), ("test", "test")):
        per_image: dict[Path, dict[str, str]] = defaultdict(dict)
        for r in read_vqa_jsonl(data[key]):
            if r.task in ("presence", "size") or (r.task == "side" and r.answer_type == "open"):
                per_image[r.image][r.task] = r.answer
        ann[split] = [{"id": img.stem, "report": report_text(a), "image_path": [img.name], "split": split}
                      for img, a in sorted(per_image.items())]
    path = out / "annotation.json"
    path.write_text(json.dumps(ann, indent=1))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--test-images", type=int, default=32)
    ap.add_argument("--quant", action="append", help="GGUF quants (default q8_0, q4_k_m)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from edgemed import embedded
    from edgemed.data import generate_demo_set
    from edgemed.evaluate import evaluate_many
    from edgemed.export.gguf import export_gguf
    from edgemed.merge import merge
    from edgemed.recipe import Recipe
    from edgemed.train import finetune

    t0 = time.time()
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=False)
    data = generate_demo_set(out / "data", n_train=480, n_val=16, n_test=args.test_images)
    ann = to_r2gen(data, out / "data")
    root = out / "data" / "images"
    recipe = Recipe.model_validate({
        "paper": "edgemed report demo", "model": {"path": "embedded:smollm2-135m-llava"}, "method": "lora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "prompt": {"system": "You are a radiology assistant. Write the findings of the radiograph."},
        "optim": {"lr": 1e-3, "batch_size": 8, "warmup_ratio": 0.1},
        "stages": [{"name": "report", "max_steps": args.steps,
                    "data": {"train": str(ann), "validation": str(ann), "format": "r2gen", "image_root": str(root)},
                    "train": {"vision": "frozen", "projector": "train", "decoder": "lora"}}],
        "max_length": 256, "eval_every": 100, "save_every": 1000, "max_eval_records": 16})
    t = time.time()
    run = finetune(recipe, out / "run")
    print(f"fine-tune: {args.steps} steps in {time.time() - t:.0f} s")
    model = merge(run, out / "model")
    gguf = export_gguf(model, args.quant or ["q8_0", "q4_k_m"], out / "gguf")
    t = time.time()
    base = embedded.materialize(embedded.IMAGE, quiet=True)
    res = evaluate_many([base, model, gguf], ann, task="report", split="test", image_root=root,
                        report=out / "eval-report.json", n_threads=args.threads)
    print(f"evaluation: {time.time() - t:.0f} s")
    print(res.table())
    for r in res.results:
        if r.get("retention"):
            print(f"{r['label']} vs {r['vs']}: ROUGE-L {r['retention']['text']}")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
