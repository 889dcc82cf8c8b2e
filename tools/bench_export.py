"""Benchmark `edgemed export gguf` on one model: export time, peak RSS, size and bits per weight per quant, and
llama.cpp decode speed next to PyTorch fp32 decode speed on the same prompt, in the same run.

    python tools/bench_export.py                       # embedded SmolLM2-135M, f16 q8_0 q4_k_m, 2 threads
    python tools/bench_export.py --quants f16,q4_k_m --tokens 128 --threads 2

Each export runs in a fresh process so that its peak RSS (VmHWM) is its own. Decode speed is greedy, one token at
a time with the KV cache, timed after the prompt has been processed (prefill excluded), for both runtimes. Each
runtime is timed at every thread count from 1 to --threads, --repeats times, in interleaved rounds, and its best is
reported with the count that gave it: on a shared machine a busy core stalls every multi-threaded step (OpenMP and
ggml both spin at barriers), and reporting PyTorch's best keeps the baseline honest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Describe the findings of a normal chest radiograph in a few sentences."

# VmHWM, not ru_maxrss: Linux carries the parent's high-water mark across fork+exec into ru_maxrss
_EXPORT_CHILD = """
import json, re, sys, time
from edgemed.export.gguf import export_gguf
t = time.perf_counter()
export_gguf(sys.argv[1], sys.argv[2].split(","), sys.argv[3], overwrite=True)
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": hwm / 1024}))
"""


def export_one(model: Path, quant: str, out: Path) -> dict:
    """Export one quant in a child process; its wall time and peak resident memory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, "-c", _EXPORT_CHILD, str(model), quant, str(out)], env=env,
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"export {quant} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def n_params(gguf_file: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(gguf_file).tensors)


def llama_decode_tps(folder: Path, quant: str, prompt: str, n: int, threads: int) -> float:
    """Greedy tokens per second of llama.cpp decoding ``n`` tokens after the prompt."""
    from edgemed.backends.llamacpp import LlamaCppBackend

    b = LlamaCppBackend(folder, quant=quant, n_threads=threads, n_ctx=1024)
    try:
        tokens = b.tokenize(b.render(prompt))
        rows, pos = b._prefill(tokens, None, "last")
        t = int(rows[-1].argmax())
        start = time.perf_counter()
        for _ in range(n):  # EOS is not special here: the speed of n decode steps is what is measured
            t = int(b._decode_tokens([t], pos, "last")[-1].argmax())
            pos += 1
        return n / (time.perf_counter() - start)
    finally:
        b.close()


class TorchDecoder:
    """The PyTorch fp32 model, loaded once, timed decoding greedily with its KV cache."""

    def __init__(self, model_dir: Path, prompt: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        self.ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])

    def tps(self, n: int, threads: int) -> float:
        import torch

        torch.set_num_threads(threads)
        with torch.inference_mode():
            out = self.model(self.ids, use_cache=True)
            past, t = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(n):
                out = self.model(t, past_key_values=past, use_cache=True)
                past, t = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m", help="model folder or embedded:NAME")
    ap.add_argument("--quants", default="f16,q8_0,q4_k_m", help="comma-separated quants to export and time")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps to time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="decode timings per thread count; the fastest is kept")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--out", type=Path, help="keep the exports here (default: a temporary folder)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from edgemed.embedded import resolve

    model = resolve(args.model)
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    tmp = tempfile.TemporaryDirectory(prefix="bench-export-")
    root = args.out or Path(tmp.name)
    print(f"model {model}  threads 1..{args.threads}  decode steps {args.tokens}  repeats {args.repeats}", flush=True)
    exports = {}
    for q in quants:
        out = root / q
        e = export_one(model, q, out)
        f = out / f"model-{q}.gguf"
        exports[q] = (out, e, f.stat().st_size, f.stat().st_size * 8 / n_params(f))
        print(f"  exported {q}", flush=True)
    # timing rounds interleave the runtimes, so both meet the same load on a shared machine; the fastest of each
    # (runtime, thread count) is kept, as other processes can only slow a run down
    torch_dec = TorchDecoder(model, args.prompt)
    speed: dict[str, tuple[float, int]] = {}
    for _ in range(args.repeats):
        for t in range(1, args.threads + 1):
            speed["torch"] = max(speed.get("torch", (0.0, 0)), (torch_dec.tps(args.tokens, t), t))
            for q in quants:
                tps = llama_decode_tps(exports[q][0], q, args.prompt, args.tokens, t)
                speed[q] = max(speed.get(q, (0.0, 0)), (tps, t))
    torch_tps, torch_t = speed["torch"]
    rows = [(q, exports[q][1]["seconds"], exports[q][1]["peak_rss_mb"], exports[q][2] / 2**20, exports[q][3],
             *speed[q]) for q in quants]
    head = f"{'quant':<8} {'export s':>9} {'peak RSS MB':>12} {'size MB':>9} {'bits/w':>7} " \
           f"{'llama.cpp tok/s (thr)':>22} {'PyTorch fp32 tok/s (thr)':>25} {'speed-up':>9}"
    print(head)
    print("-" * len(head))
    for q, sec, rss, mb, bpw, tps, t in rows:
        print(f"{q:<8} {sec:>9.1f} {rss:>12.0f} {mb:>9.1f} {bpw:>7.2f} {tps:>16.1f} ({t}) {torch_tps:>19.1f} "
              f"({torch_t}) {tps / torch_tps:>8.1f}x")
    src = sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))
    print(f"source checkpoint {src / 2**20:.0f} MB (fp32); load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    tmp.cleanup()


if __name__ == "__main__":
    main()
