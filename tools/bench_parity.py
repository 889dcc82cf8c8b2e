"""Parity figures and timing: an export's quants against the model they came from, over the default probe set.

Exports the model to GGUF (f16, q8_0, q5_k_m, q4_k_m by default; ``--export DIR`` reuses an export), then times
``run_parity`` of all the quants in one pass, each run in a fresh process: once with an empty reference cache
(cold) and once with the entry that run left (warm). Prints the table, the wall and CPU time of each run with the
load average around it, and the metrics as markdown. ``--model`` is an embedded model name or any model folder
(e.g. a Gemma 3 270M base folder). On a checkout without the reference cache (before it existed) one run is made.

    .venv/bin/python tools/bench_parity.py [--model smollm2-135m | DIR] [--quants f16,q8_0,q4_k_m]
        [--export DIR] [--work DIR] [--probes 32] [--threads 1] [--report parity-bench.json] [--skip-timing]

``--timing-quant q8_0`` (the default, skipped with ``--skip-timing``) also times one quant alone, the figure of the
"135M over 32 probes under 2 minutes" budget in docs/parity.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def one(args: argparse.Namespace) -> None:
    """One parity run in this process; prints its figures as one JSON line (the parent reads the last line)."""
    from edgemed.export.auto_quant import fresh_float_export
    from edgemed.parity import run_parity

    load0 = os.getloadavg()[0]
    t0, c0 = time.time(), time.process_time()
    res = run_parity(args.one, reference=args.reference, max_probes=args.probes, report=args.report,
                     n_threads=args.threads or None, localise=not args.no_localise, float_export=fresh_float_export)
    wall, cpu = time.time() - t0, time.process_time() - c0
    print(res.table(), file=sys.stderr)
    cache = getattr(res, "reference_cache", None)
    print(json.dumps({"seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "probes": res.probes,
                      "positions": res.positions, "load_before": round(load0, 1),
                      "load_after": round(os.getloadavg()[0], 1), "cache_hit": cache and cache["hit"],
                      "greedy": getattr(res, "greedy", None), "passed": res.passed,
                      "rows": {r.quant: {k: getattr(r.metrics, k) for k in ("top1", "kl_mean", "kl_p99", "kl_max",
                                                                             "logit_diff_max", "greedy_match")}
                               for r in res.rows}}))


def timed(export: Path, model: Path, args: argparse.Namespace, env: dict[str, str], report: Path | None = None
          ) -> dict:
    """``one`` in a fresh process (so each run pays its own imports and loads, as ``edgemed parity`` does)."""
    cmd = [sys.executable, __file__, "--one", str(export), "--reference", str(model), "--probes", str(args.probes),
           "--threads", str(args.threads)] + (["--report", str(report)] if report else []) + (
        ["--no-localise"] if args.no_localise else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"parity run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    table = [ln for ln in proc.stderr.splitlines() if not ln.startswith(("Loading weights", "llama_", "warning"))]
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"table": "\n".join(table[-12:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="embedded model name, or a model folder")
    ap.add_argument("--quants", default="f16,q8_0,q5_k_m,q4_k_m")
    ap.add_argument("--export", type=Path, default=None, help="an existing GGUF export of --model to time")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("EDGEMED_HOME", Path.home() / ".cache/edgemed"))
                    / "bench-parity")
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--report", type=Path, default=None)
    ap.add_argument("--timing-quant", default="q8_0", help="quant whose check alone is timed (the 2-minute budget)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per runtime (0: the runtimes' default)")
    ap.add_argument("--onnx", default="", help="also ONNX exports of these quants, e.g. fp32,fp16,int8,int4")
    ap.add_argument("--skip-timing", action="store_true", help="skip the single-quant timing run")
    ap.add_argument("--no-localise", action="store_true", help="time the check without localisation")
    ap.add_argument("--one", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--reference", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)

    from edgemed import embedded
    from edgemed.export.gguf import export_gguf

    model = Path(args.model) if Path(args.model).is_dir() else embedded.materialize(args.model, quiet=True)
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    out = args.export or args.work / f"{model.name}-gguf"
    if args.export is None:
        t0 = time.time()
        export_gguf(model, quants, out, overwrite=True)
        print(f"export {','.join(quants)}: {time.time() - t0:.1f} s -> {out}")
    cached = importlib.util.find_spec("edgemed.parity.reference") is not None
    cache_root = Path(tempfile.mkdtemp(prefix="parity-ref-", dir=args.work if args.work.is_dir() else None))
    env = os.environ | {"EDGEMED_PARITY_CACHE_DIR": str(cache_root / "all")}
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (shared with other work); "
          f"{args.threads or 'default'} thread(s) per runtime")

    try:
        runs = measure(model, out, args, env, cache_root, cached)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)  # a bench's entries (about 1 GB for Gemma's vocabulary)
    report(model, quants, runs)


def measure(model: Path, out: Path, args: argparse.Namespace, env: dict[str, str], cache_root: Path, cached: bool
            ) -> dict[str, dict]:
    from edgemed.export.gguf import export_gguf

    runs: dict[str, dict] = {}
    if not args.skip_timing:  # one quant alone, its own cold cache
        single = args.work / f"{model.name}-gguf-{args.timing_quant}"
        export_gguf(model, [args.timing_quant], single, overwrite=True)
        runs[f"{args.timing_quant} alone"] = timed(single, model, args,
                                                   env | {"EDGEMED_PARITY_CACHE_DIR": str(cache_root / "one")})
    runs["all, cold cache" if cached else "all (no reference cache)"] = timed(out, model, args, env, args.report)
    if cached:
        runs["all, warm cache"] = timed(out, model, args, env)
    for q in [q.strip() for q in args.onnx.split(",") if q.strip()]:
        from edgemed.export.onnx import export_onnx

        folder = export_onnx(model, q, args.work / f"{model.name}-onnx-{q}", overwrite=True)
        runs[f"onnx {q}"] = timed(folder, model, args, env)
    return runs


def report(model: Path, quants: list[str], runs: dict[str, dict]) -> None:
    from edgemed.parity import THRESHOLDS

    last = runs.get("all, warm cache") or runs.get("all, cold cache") or runs["all (no reference cache)"]
    print(last["table"])
    print(f"\nparity of {model.name}, {len(quants)} quants ({','.join(quants)}), {last['probes']} probes, "
          f"{last['positions']} positions:")
    print("| run | wall s | CPU s | load before/after | reference cache |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['seconds']} | {r['cpu_seconds']} | {r['load_before']}/{r['load_after']} | "
              f"{'hit' if r['cache_hit'] else 'miss' if r['cache_hit'] is False else '-'} |")
    rows = dict(last["rows"])
    for name, r in runs.items():
        if name.startswith("onnx "):
            print(r["table"])
            rows.update(r["rows"])
    print("\nmarkdown:")
    print("| quant | top-1 agreement | KL mean | KL p99 | KL max | max |dlogit| | greedy match | threshold kl_mean |")
    print("|---|---|---|---|---|---|---|---|")
    for q, m in rows.items():
        print(f"| {q} | {m['top1']:.1%} | {m['kl_mean']:.2e} | {m['kl_p99']:.2e} | {m['kl_max']:.2e} | "
              f"{m['logit_diff_max']:.2f} | {m['greedy_match']:.0%} | {THRESHOLDS[q].kl_mean} |")
    print(json.dumps({"model": str(model), "quants": quants,
                      "runs": {k: {x: v for x, v in r.items() if x != "table"} for k, r in runs.items()}}, indent=1))


if __name__ == "__main__":
    main()
