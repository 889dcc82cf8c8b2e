"""Parity figures and timing on the embedded default model (real SmolLM2-135M-Instruct weights).

Exports the model to GGUF (f16, q8_0, q5_k_m, q4_k_m by default), runs ``edgemed parity`` on each quant over the
default probe set (32 probes), and prints the table, the wall time of one quant's check and of all of them.
These figures are what the thresholds in ``edgemed/parity/thresholds.py`` and ``docs/parity.md`` are derived from.

    .venv/bin/python tools/bench_parity.py [--model smollm2-135m] [--quants f16,q8_0,q5_k_m,q4_k_m]
        [--work DIR] [--probes 32] [--report parity-bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="embedded model name, or a model folder")
    ap.add_argument("--quants", default="f16,q8_0,q5_k_m,q4_k_m")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("EDGEMED_HOME", Path.home() / ".cache/edgemed"))
                    / "bench-parity")
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--report", type=Path, default=None)
    ap.add_argument("--timing-quant", default="q8_0", help="quant whose check alone is timed (the 2-minute budget)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per runtime (0: the runtimes' default)")
    ap.add_argument("--onnx", default="", help="also ONNX exports of these quants, e.g. fp32,fp16,int8,int4")
    ap.add_argument("--skip-timing", action="store_true", help="skip the single-quant timing run")
    args = ap.parse_args()

    from edgemed import embedded
    from edgemed.export.auto_quant import fresh_float_export
    from edgemed.export.gguf import export_gguf
    from edgemed.parity import THRESHOLDS, run_parity

    model = Path(args.model) if Path(args.model).is_dir() else embedded.materialize(args.model, quiet=True)
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    out = args.work / f"{model.name}-gguf"
    t0 = time.time()
    export_gguf(model, quants, out, overwrite=True)
    t_export = time.time() - t0
    print(f"export {','.join(quants)}: {t_export:.1f} s -> {out}")

    threads = args.threads or None
    t_one = c_one = None
    if not args.skip_timing:  # one quant alone: the figure the "135M over 32 probes under 2 minutes" budget is about
        single = args.work / f"{model.name}-gguf-{args.timing_quant}"
        export_gguf(model, [args.timing_quant], single, overwrite=True)
        t0, c0 = time.time(), time.process_time()
        one = run_parity(single, reference=model, max_probes=args.probes, n_threads=threads,
                         float_export=fresh_float_export)
        t_one, c_one = time.time() - t0, time.process_time() - c0
        print(f"parity of {args.timing_quant} alone over {one.probes} probes ({one.positions} positions), "
              f"{threads or 'default'} thread(s): {t_one:.1f} s wall, {c_one:.1f} s CPU; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    t0 = time.time()
    res = run_parity(out, reference=model, max_probes=args.probes, report=args.report, n_threads=threads,
                     float_export=fresh_float_export)
    t_all = time.time() - t0
    print(res.table())
    print(f"parity of {len(quants)} quants in one pass: {t_all:.1f} s")
    rows = list(res.rows)
    for q in [q.strip() for q in args.onnx.split(",") if q.strip()]:
        from edgemed.export.onnx import export_onnx

        folder = export_onnx(model, q, args.work / f"{model.name}-onnx-{q}", overwrite=True)
        r = run_parity(folder, reference=model, max_probes=args.probes, n_threads=threads,
                       float_export=fresh_float_export)
        print(r.table())
        rows += r.rows
    print("\nmarkdown:")
    print("| quant | top-1 agreement | KL mean | KL p99 | KL max | max |dlogit| | greedy match | threshold kl_mean |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r.metrics
        print(f"| {r.quant} | {m.top1:.1%} | {m.kl_mean:.2e} | {m.kl_p99:.2e} | {m.kl_max:.2e} | "
              f"{m.logit_diff_max:.2f} | {m.greedy_match:.0%} | {THRESHOLDS[r.quant].kl_mean} |")
    print(json.dumps({"model": str(model), "probes": res.probes, "positions": res.positions,
                      "seconds_one_quant": t_one and round(t_one, 1),
                      "cpu_seconds_one_quant": c_one and round(c_one, 1),
                      "seconds_all": round(t_all, 1), "threads": threads,
                      "rows": {r.quant: {k: getattr(r.metrics, k) for k in ("top1", "kl_mean", "kl_p99", "kl_max",
                                                                             "logit_diff_max", "greedy_match")}
                               for r in rows}}, indent=1))


if __name__ == "__main__":
    main()
