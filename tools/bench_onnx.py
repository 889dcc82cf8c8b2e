"""Benchmark `edgemed export onnx` on one text model: decode tokens/s and time to first token of ONNX fp32, int8
and int4 through onnxruntime, next to PyTorch fp32 and the GGUF q4_k_m export of the same model, in one run.

    python tools/bench_onnx.py                                  # embedded SmolLM2-135M, 2 threads, 64 steps
    python tools/bench_onnx.py --tokens 128 --threads 2 --repeat 5 --out /tmp/bench-onnx

Time to first token (TTFT) is the prompt's forward pass up to the first token's logits (the chat-rendered prompt,
about 40 tokens). Decode speed is greedy, one token at a time with the KV cache, ``--tokens`` steps after the
prompt (EOS is not special: the speed of the steps is what is measured). All exports are made first; then
every runtime is timed once per round, ``--repeat`` rounds after one warm-up, and the median is reported, so that
each runtime meets the same load on shared cores. GGUF is skipped with a note when
``edgemed.export.gguf`` or llama-cpp-python is missing or fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PROMPT = "Describe the findings of a normal chest radiograph in a few sentences."


def torch_run(model_dir: Path, prompt: str, n: int, threads: int) -> Callable[[], tuple[float, float]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])

    def run() -> tuple[float, float]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            past, t = out.past_key_values, out.logits[:, -1:].argmax(-1)
            ttft = time.perf_counter() - t0
            start = time.perf_counter()
            for _ in range(n):
                out = model(t, past_key_values=past, use_cache=True)
                past, t = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return ttft, n / (time.perf_counter() - start)

    return run


def onnx_run(folder: Path, prompt: str, n: int, threads: int) -> Callable[[], tuple[float, float]]:
    from edgemed.backends.onnx import OnnxBackend

    b = OnnxBackend(folder, n_threads=threads)
    tokens = b.tokenize(b.render(prompt))

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        logits, past, _, pos, cross = b._prefill(tokens, None)
        t = int(logits[-1].argmax())
        ttft = time.perf_counter() - t0
        start = time.perf_counter()
        for _ in range(n):
            step, past = b._forward([t], None, past, pos, cross)
            t, pos = int(step[-1].argmax()), pos + 1
        return ttft, n / (time.perf_counter() - start)

    return run


def gguf_run(folder: Path, quant: str, prompt: str, n: int, threads: int) -> Callable[[], tuple[float, float]]:
    from edgemed.backends.llamacpp import LlamaCppBackend

    b = LlamaCppBackend(folder, quant=quant, n_threads=threads, n_ctx=1024)
    tokens = b.tokenize(b.render(prompt))

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        rows, pos = b._prefill(tokens, None, "last")
        t = int(rows[-1].argmax())
        ttft = time.perf_counter() - t0
        start = time.perf_counter()
        for _ in range(n):
            t = int(b._decode_tokens([t], pos, "last")[-1].argmax())
            pos += 1
        return ttft, n / (time.perf_counter() - start)

    return run


def folder_mb(folder: Path, pattern: str) -> float:
    return sum(p.stat().st_size for p in folder.glob(pattern)) / 2**20


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m", help="text model folder or embedded:NAME")
    ap.add_argument("--quants", default="fp32,int8,int4", help="comma-separated ONNX quants")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps to time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per runtime (median reported)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--out", type=Path, help="keep the exports here (default: a temporary folder)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")

    from edgemed.embedded import resolve
    from edgemed.export.onnx import export_onnx

    model = resolve(args.model)
    tmp = tempfile.TemporaryDirectory(prefix="bench-onnx-")
    root = args.out or Path(tmp.name)
    print(f"model {model}  threads {args.threads}  decode steps {args.tokens}  median of {args.repeat}", flush=True)
    # exports first, then interleaved timing rounds, so every runtime meets the same load on shared cores
    runners: list[tuple[str, str, float | None, float, Callable[[], tuple[float, float]]]] = [
        ("PyTorch", "fp32", None, folder_mb(model, "*.safetensors"),
         torch_run(model, args.prompt, args.tokens, args.threads))]
    for q in [q.strip() for q in args.quants.split(",") if q.strip()]:
        t0 = time.perf_counter()
        out = export_onnx(model, q, root / f"onnx-{q}", overwrite=True)
        runners.append(("onnxruntime", q, time.perf_counter() - t0, folder_mb(out, "*.onnx*"),
                        onnx_run(out, args.prompt, args.tokens, args.threads)))
        print(f"  exported ONNX {q}", flush=True)
    note = ""
    try:
        from edgemed.export.gguf import export_gguf

        t0 = time.perf_counter()
        out = export_gguf(model, ["q4_k_m"], root / "gguf", overwrite=True)
        runners.append(("llama.cpp", "q4_k_m", time.perf_counter() - t0, folder_mb(out, "*.gguf"),
                        gguf_run(out, "q4_k_m", args.prompt, args.tokens, args.threads)))
        print("  exported GGUF q4_k_m", flush=True)
    except Exception as e:  # noqa: BLE001 - the GGUF row is a comparison; its failure must not hide the ONNX figures
        note = f"GGUF q4_k_m skipped: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    for *_, run in runners:  # warm-up
        run()
    timings: list[list[tuple[float, float]]] = [[] for _ in runners]
    for r in range(args.repeat):
        for i, (*_, run) in enumerate(runners):
            timings[i].append(run())
        print(f"  round {r + 1}/{args.repeat}", flush=True)
    rows = [(rt, q, secs, mb, statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for (rt, q, secs, mb, _), ts in zip(runners, timings, strict=True)]

    base = rows[0][5]
    head = (f"{'runtime':<12} {'quant':<7} {'export s':>9} {'size MB':>8} {'TTFT ms':>8} {'decode tok/s':>13} "
            f"{'vs PyTorch':>11}")
    print(head)
    print("-" * len(head))
    for rt, q, secs, mb, ttft, tps in rows:
        s = f"{secs:>9.1f}" if secs is not None else f"{'-':>9}"
        print(f"{rt:<12} {q:<7} {s} {mb:>8.1f} {ttft * 1000:>8.1f} {tps:>13.1f} {tps / base:>10.1f}x")
    if note:
        print(note)
    tmp.cleanup()


if __name__ == "__main__":
    main()
