"""Memory of LoRA adapters on one llama.cpp base: resident memory after the base, then after each extra adapter.

    PYTHONPATH=. python tools/bench_adapters.py EXPORT_DIR [--extra N]

EXPORT_DIR is an adapter export (`edgemed export gguf RUN_DIR`); its adapter file is loaded N more times under
other names, as `edgemed serve` would load other runs' adapters on the same base. Prints MB per step.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--extra", type=int, default=3)
    args = ap.parse_args()
    from edgemed.artifacts import read_manifest
    from edgemed.backends.llamacpp import LlamaCppBackend

    m = read_manifest(args.export_dir)
    adapter = args.export_dir / m["adapters"]["default"]
    before = rss_mb()
    b = LlamaCppBackend(args.export_dir, adapter=None, n_ctx=512, n_threads=1)
    base = rss_mb()
    print(f"base {b.path.name}: +{base - before:.1f} MB resident (file {b.path.stat().st_size / 2**20:.1f} MB)")
    tokens = b.tokenize("Is there a lesion?")
    b.logits(tokens)  # touch the base pages once
    last = rss_mb()
    print(f"after one forward: {last:.1f} MB")
    for i in range(args.extra + 1):
        name = f"x{i}"
        b.add_adapter(name, args.export_dir)
        b.with_adapter(name).logits(tokens)
        now = rss_mb()
        print(f"adapter {i + 1} ({adapter.stat().st_size / 2**20:.1f} MB file): +{now - last:.1f} MB resident")
        last = now
    b.close()


if __name__ == "__main__":
    main()
