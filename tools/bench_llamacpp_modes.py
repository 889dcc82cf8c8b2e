"""Decode speed of a GGUF export under each llama.cpp CPU mode (edgemed.probe): the fast path on and off.

    python tools/bench_llamacpp_modes.py GGUF_DIR                      # every quant, modes full and plain
    python tools/bench_llamacpp_modes.py GGUF_DIR --quants q8_0,q4_k_m --modes full,no-amx,plain --threads 2

Each (quant, mode) runs in its own process (a mode is process-wide), through edgemed's llama.cpp backend with
EDGEMED_LLAMACPP_MODE forcing the mode, in interleaved rounds; the best of --repeats is printed. A mode that this
CPU cannot run is reported with the signal that killed it, not benchmarked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

_CHILD = """
import json, sys
from edgemed.backends.llamacpp import LlamaCppBackend
from edgemed.demo import decode_speed
b = LlamaCppBackend(sys.argv[1], quant=sys.argv[2], n_threads=int(sys.argv[3]))
print(json.dumps({"tok_s": decode_speed(b, max_tokens=int(sys.argv[4])), "mode": b.cpu_mode}))
"""


def run_one(folder: Path, quant: str, mode: str, threads: int, tokens: int) -> dict:
    from edgemed.probe import describe_exit

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EDGEMED_LLAMACPP_MODE": mode}
    p = subprocess.run([sys.executable, "-c", _CHILD, str(folder), quant, str(threads), str(tokens)],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"error": describe_exit(p.returncode)}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--quants", help="comma-separated (default: every quant of the export)")
    ap.add_argument("--modes", default="full,plain")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from edgemed.artifacts import read_manifest
    from edgemed.doctor import machine_summary

    manifest = read_manifest(a.folder)
    quants = a.quants.split(",") if a.quants else manifest["quants"]
    modes = a.modes.split(",")
    best: dict[tuple[str, str], dict] = {}
    for _ in range(a.repeats):
        for q in quants:
            for m in modes:
                r = run_one(a.folder, q, m, a.threads, a.tokens)
                k = (q, m)
                if "error" in r or r["tok_s"] > best.get(k, {}).get("tok_s", -1):
                    best[k] = r
    print(f"machine: {machine_summary()}")
    print(f"{a.folder}, {a.threads} threads, {a.tokens} tokens, best of {a.repeats}")
    print("| quant | " + " | ".join(f"{m} tok/s" for m in modes) + " |")
    print("|---|" + "---|" * len(modes))
    for q in quants:
        cells = [best[(q, m)].get("error") or f"{best[(q, m)]['tok_s']:.1f}" for m in modes]
        print(f"| {q} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
