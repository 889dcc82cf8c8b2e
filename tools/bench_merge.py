"""Peak memory of `edgemed merge` on a sharded bf16 checkpoint, against the interpreter's own baseline.

    python tools/bench_merge.py                      # a 0.66B random Llama in three bf16 shards, 1-step LoRA run
    python tools/bench_merge.py --layers 20 --hidden 1536 --shard 600MB

The checkpoint (random weights, SmolLM2's tokenizer and chat template) and the run are written once under
``$EDGEMED_HOME/bench/merge-<shape>`` and reused. Each measured command runs in a fresh child process whose peak
resident memory is read from its own /proc/self/status (VmHWM): the baseline child imports torch, transformers and
peft and stops; the merge children run ``edgemed.merge.merge`` with and without its logit check. The bound issue 15
sets: largest shard + 10% + 200 MB above the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

_HWM = "int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) / 1024"
_BASELINE = f"import re, torch, transformers, peft, safetensors\nprint({_HWM})"
_MERGE = f"""
import re, sys, time
from edgemed.merge import merge
t = time.perf_counter()
merge(sys.argv[1], sys.argv[2], overwrite=True, check=sys.argv[3] == "check")
print(time.perf_counter() - t, {_HWM})
"""


def child(code: str, *args: str) -> list[float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"child failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return [float(x) for x in p.stdout.split()[-2:]] if " " in p.stdout.strip() else [float(p.stdout.split()[-1])]


def build_checkpoint(folder: Path, layers: int, hidden: int, shard: str) -> Path:
    """A random-weight Llama in bf16, sharded as the hub does, with the embedded SmolLM2 tokenizer."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgemed import embedded

    tok = embedded.resolve("embedded:smollm2-135m")
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=shard)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tok / name).is_file():
            shutil.copy2(tok / name, tmp / name)
    tmp.rename(folder)
    return folder


def build_run(model: Path, run: Path) -> Path:
    """A 1-step bf16 LoRA run of ``model`` on a few text records (what merge needs: an adapter and a manifest)."""
    if (run / "manifest.json").is_file():
        return run
    data = run.with_name(run.name + "-data.jsonl")
    data.write_text("".join(json.dumps({"text": f"Finding {i}: the chest radiograph is normal."}) + "\n"
                            for i in range(8)))
    recipe = run.with_name(run.name + "-recipe.yaml")
    recipe.write_text(f"""model: {{path: {model}}}
method: lora
dtype: bfloat16
lora: {{r: 16, alpha: 32, dropout: 0.0, init: nonzero}}
optim: {{lr: 1.0e-3, batch_size: 1}}
stages:
  - name: text
    data: {{train: {data}, format: text}}
    train: {{decoder: lora}}
    max_steps: 1
max_length: 64
""")
    subprocess.run([sys.executable, "-m", "edgemed.cli", "finetune", str(recipe), "--out", str(run), "--overwrite"],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--shard", default="600MB")
    args = ap.parse_args()
    from edgemed.paths import cache_root

    root = cache_root() / "bench" / f"merge-l{args.layers}-h{args.hidden}-{args.shard}"
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = build_checkpoint(root / "model", args.layers, args.hidden, args.shard)
    run = build_run(model, root / "run")
    shards = sorted(model.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards) / 2**20
    total = sum(p.stat().st_size for p in shards) / 2**20
    print(f"checkpoint: {len(shards)} shards, {total:.0f} MiB, largest {largest:.0f} MiB "
          f"(setup {time.time() - t0:.0f} s)")
    base = child(_BASELINE)[0]
    print(f"baseline (torch, transformers, peft imported): {base:.0f} MiB")
    bound = base + largest * 1.1 + 200
    for mode in ("no-check", "check"):
        seconds, hwm = child(_MERGE, str(run), str(root / f"merged-{mode}"), mode)
        verdict = "within" if hwm <= bound else "over"
        print(f"merge ({mode}): {seconds:.1f} s, peak {hwm:.0f} MiB = baseline + {hwm - base:.0f} MiB "
              f"({verdict} the bound {bound:.0f} MiB = baseline + 1.1 x largest shard + 200)")


if __name__ == "__main__":
    main()
