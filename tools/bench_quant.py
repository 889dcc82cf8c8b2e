"""Uncalibrated vs calibrated GGUF quantization, measured on held-out probes (prints a markdown table).

For each quant: KL mean / p99, top-1 over all positions, flip rate on decided positions, the share of free-running
greedy answers that differ from the PyTorch model's, and, where the probes are VQA records with reference answers,
the held-out answer flip rate: the share of questions whose correctness changed against PyTorch (``edgemed eval
--compare``'s flips, right in one and wrong in the other); file size and export time. The calibration data and the
probes must not overlap (checked: the same question text in both is refused).

    python tools/bench_quant.py MODEL_DIR --probes held_out.jsonl [--calibration FILE] [--quants q4_k_m,q3_k_m]
        [--onnx int4,int4:q4_k_m]

Without --calibration a merged fine-tune uses its run's training data (as `edgemed export gguf` does). Each GGUF
quant is measured three ways: uncalibrated; calibrated with every quantized tensor weighted (``--imatrix-types
all``, llama.cpp's way); and calibrated with llama.cpp's legacy fallback blocks (q4_0/q5_0 of matrices whose width is
not a multiple of 256) left unweighted (``--imatrix-types k-quants``, edgemed's default, from the first calibrated
export's own imatrix.gguf, so both use the same matrices). ``--onnx``
adds ONNX exports to each mode, measured by the same parity run on the same probes: ``int4`` is plain int4,
``int4:q4_k_m`` is int4 with llama.cpp's q4_k_m bits (`export onnx --quant int4 --mixed q4_k_m`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

ALL = "calibrated, all tensors"
K_ONLY = "calibrated, k-quants only"
MODES = ("uncalibrated", ALL, K_ONLY)
FOLDERS = dict(zip(MODES, ("uncalibrated", "all", "k-quants"), strict=True))  # each mode's export folder

def _questions(path: Path) -> set[str]:
    from edgemed.data import TextRecord, read_dataset

    return {r.text if isinstance(r, TextRecord) else r.question + "\0" + str(r.image) for r in read_dataset(path)}


def _has_answers(path: Path) -> bool:
    """Whether ``path`` reads as VQA records with reference answers (a file of bare probe questions does not)."""
    from edgemed.data import VQARecord, read_dataset
    from edgemed.errors import DataError

    try:
        return all(isinstance(r, VQARecord) for r in read_dataset(path))
    except DataError:
        return False


def _answer_flips(r: dict) -> str:
    if r["answer_flips"] is None:
        return "-"
    return f"{r['answer_flips']:.1%} ({r['lost']} lost, {r['gained']} gained of {r['n']})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--probes", type=Path, required=True, help="held-out probe JSONL (question, optional image)")
    ap.add_argument("--calibration", type=Path, default=None)
    ap.add_argument("--quants", default="q4_k_m,q3_k_m,iq4_xs")
    ap.add_argument("--max-probes", type=int, default=16)
    ap.add_argument("--samples", type=int, default=64, help="calibration records")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--onnx", default="", help="ONNX exports too: comma-separated int4, int8, int4:q4_k_m (mixed)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--no-eval", action="store_true", help="skip the answer-correctness flips of VQA probes")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from edgemed.evaluate import evaluate_many
    from edgemed.export.gguf import export_gguf
    from edgemed.export.imatrix import default_calibration
    from edgemed.export.onnx import export_onnx
    from edgemed.parity import read_probes, run_parity

    quants = [q for q in args.quants.split(",") if q]
    onnx = [q for q in args.onnx.split(",") if q]
    names = quants + [f"onnx {q}" for q in onnx]
    cal = args.calibration or default_calibration(args.model)
    if cal is None:
        raise SystemExit("no calibration data: pass --calibration FILE (the model has no run with training data)")
    probes = read_probes(args.probes)[: args.max_probes]
    held = {p.question + "\0" + str(p.image) for p in probes}
    overlap = held & _questions(cal)
    if overlap:
        raise SystemExit(f"{len(overlap)} probes also occur in the calibration data {cal}; use held-out probes")
    # correctness flips need reference answers: VQA records (a probe file of bare questions has none)
    answered = not args.no_eval and _has_answers(args.probes)
    work = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    exported = []  # (folder, spec) of every export, for the eval below
    rows = []
    try:
        for mode in MODES:
            kw = {"calibrate": mode != "uncalibrated", "calibration": cal if mode == ALL else None,
                  "calibration_samples": args.samples}
            scope = {"uncalibrated": None, ALL: "all", K_ONLY: "k-quants"}[mode]
            if mode == K_ONLY:
                kw.update(calibration=work / "all" / "imatrix.gguf")
            t0 = time.time()
            folder = (export_gguf(args.model, quants, work / FOLDERS[mode], imatrix_types=scope, **kw)
                      if quants else None)
            runs = [] if folder is None else [(folder, time.time() - t0, None)]
            for spec in onnx if mode != K_ONLY else ():
                onnx_quant, _, mix = spec.partition(":")
                t0 = time.time()
                out = work / f"{FOLDERS[mode]}-onnx-{spec.replace(':', '-')}"
                runs.append((export_onnx(args.model, onnx_quant, out, mixed=mix or None, **kw), time.time() - t0, spec))
            for folder, export_s, spec in runs:
                exported.append((folder, spec))
                res = run_parity(folder, reference=args.model, probes=args.probes, max_probes=args.max_probes,
                                 localise=False, n_threads=args.threads)
                for r in res.rows:
                    m = r.metrics
                    files = [folder / f"model-{r.quant}.gguf"] if spec is None else list(folder.glob("decoder.onnx*"))
                    rows.append({"quant": r.quant if spec is None else f"onnx {spec}", "mode": mode,
                                 "kl_mean": m.kl_mean, "kl_p99": m.kl_p99, "top1": m.top1, "flip_rate": m.flip_rate,
                                 "decided": m.decided_positions, "positions": m.positions,
                                 "greedy_differs": 1 - m.greedy_match, "answer_flips": None,
                                 "image_cos": m.image_cos, "passed": r.passed, "folder": str(folder.absolute()),
                                 "size_mb": sum(f.stat().st_size for f in files) / 1e6, "export_s": export_s})
        if answered:  # one eval: the PyTorch model first, every export compared with it (as `edgemed eval`)
            res = evaluate_many([args.model, *(f for f, _ in exported)], args.probes, limit=args.max_probes,
                                n_threads=args.threads)
            for e in res.results[1:]:
                spec = next(s for f, s in exported if str(f.absolute()) == e["path"])
                quant = e["quant"] if spec is None else f"onnx {spec}"
                row = next(r for r in rows if r["quant"] == quant and r["folder"] == e["path"])
                ret = e["retention"]
                row.update(answer_flips=ret["flip_rate"], lost=ret["lost"], gained=ret["gained"], n=ret["n"],
                           accuracy=e["overall"]["score"])
            print(f"PyTorch reference: {res.results[0]['overall']['score']:.1%} on {res.results[0]['overall']['n']} "
                  f"questions of {args.probes}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"model {args.model}; calibration {cal}; {len(probes)} held-out probes from {args.probes}")
    print("| quant | calibration | KL mean | KL p99 | top-1 (all) | flip rate (decided) | greedy differs "
          "| answers flipped | img cos | size MB | export s (GGUF: all quants) | parity |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (names.index(r["quant"]), MODES.index(r["mode"]))):
        cos = "-" if r["image_cos"] is None else f"{r['image_cos']:.4f}"
        print(f"| {r['quant']} | {r['mode']} | {r['kl_mean']:.4f} | {r['kl_p99']:.3f} | {r['top1']:.1%} | "
              f"{r['flip_rate']:.1%} ({r['decided']}/{r['positions']}) | {r['greedy_differs']:.0%} | "
              f"{_answer_flips(r)} | {cos} | "
              f"{r['size_mb']:.1f} | {r['export_s']:.0f} | {'pass' if r['passed'] else 'FAIL'} |")
    for q in names:
        u = next(r for r in rows if r["quant"] == q and r["mode"] == "uncalibrated")
        for c in (r for r in rows if r["quant"] == q and r["mode"] != "uncalibrated"):
            gain = 100 * (1 - c["kl_mean"] / u["kl_mean"])
            flips = [round(r["flip_rate"] * r["decided"]) for r in (c, u)]
            answers = ("" if c["answer_flips"] is None else
                       f"; answers flipped {_answer_flips(c)} vs {_answer_flips(u)}")
            print(f"{q}: {c['mode']}: KL mean {abs(gain):.0f}% {'lower' if gain >= 0 else 'higher'} than "
                  f"uncalibrated, flip rate {c['flip_rate']:.1%} vs {u['flip_rate']:.1%} "
                  f"({flips[0]} vs {flips[1]} of {c['decided']} decided positions){answers}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "calibration": str(cal), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
