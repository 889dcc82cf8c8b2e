"""Which tensors of a quantized GGUF carry its error, and how much of that calibration can reach (prints a table).

    python tools/quant_parts.py MODEL_DIR --probes held_out.jsonl [--calibration FILE] [--quant q4_k_m]

Exports MODEL_DIR to f16 and QUANT, uncalibrated and calibrated (as `edgemed export gguf` does), then builds, for each
GGML type llama.cpp chose in the QUANT file, a variant in which only the tensors of that type stay quantized and
every other tensor is the f16 file's: the KL of that variant against the PyTorch model is the error that type's
tensors carry. The variants are measured by `edgemed parity` on the held-out probes, each in a copy of the export
folder with its QUANT file replaced. A type that ggml quantizes without looking at an importance matrix (q8_0)
cannot gain from calibration; the table says which do (``ggml_quantize_requires_imatrix`` aside, ggml's q8_0
kernel has no weighted path).

``--source-gguf FILE``: for a model that was itself dequantized from a GGUF (the PyPI Gemma 3 270M), also print how
much of the uncalibrated QUANT file reproduces that file: per type, the share of blocks that are byte-identical.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

UNWEIGHTED = {"Q8_0"}  # ggml's quantize_q8_0 ignores the importance matrix (ggml-quants.c)


def variant(quantized: Path, f16: Path, keep: set[str], dst: Path) -> int:
    """Write ``dst``: ``quantized`` with every tensor whose type is not in ``keep`` replaced by its f16 data;
    returns the number of tensors kept quantized."""
    import gguf
    import numpy as np

    from edgemed.export.ggml_quant import _copy_fields

    T = gguf.GGMLQuantizationType
    q = gguf.GGUFReader(quantized)
    f = {t.name: t for t in gguf.GGUFReader(f16).tensors}
    arch = q.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    w = gguf.GGUFWriter(dst, arch)
    chosen = []
    for t in q.tensors:
        src = t if T(t.tensor_type).name in keep or t.name not in f else f[t.name]
        chosen.append(src)
    try:
        _copy_fields(q, w, ())
        for t in chosen:
            w.add_tensor_info(t.name, tuple(int(x) for x in reversed(t.shape.tolist())), np.dtype(np.float32),
                              int(t.n_bytes), raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in chosen:
            w.write_tensor_data(np.asarray(t.data))
    finally:
        w.close()
    return sum(1 for t, s in zip(q.tensors, chosen, strict=True) if t is s and T(t.tensor_type).name in keep)


def same_blocks(ours: Path, source: Path) -> dict[str, tuple[int, float]]:
    """Per GGML type of ``ours``: (tensors, share of quant blocks byte-identical to ``source``'s same tensor);
    a tensor whose type differs in ``source`` counts under "TYPE (source SRC)" with share 0."""
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    src = {t.name: t for t in gguf.GGUFReader(source).tensors}
    shares: dict[str, list[float]] = {}
    for t in gguf.GGUFReader(ours).tensors:
        s, qt = src.get(t.name), T(t.tensor_type)
        if qt in (T.F32, T.F16, T.BF16):
            continue
        if s is None or s.tensor_type != t.tensor_type:
            key = f"{qt.name} (source {T(s.tensor_type).name if s is not None else 'missing'})"
            shares.setdefault(key, []).append(0.0)
            continue
        size = gguf.GGML_QUANT_SIZES[qt][1]
        a = np.asarray(s.data).reshape(-1, size)
        b = np.asarray(t.data).reshape(-1, size)
        shares.setdefault(qt.name, []).append(float((a == b).all(1).mean()))
    return {k: (len(v), float(np.mean(v))) for k, v in sorted(shares.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--probes", type=Path, required=True)
    ap.add_argument("--calibration", type=Path, default=None, help="default: the run's training data")
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--max-probes", type=int, default=16)
    ap.add_argument("--samples", type=int, default=64, help="calibration records")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--source-gguf", type=Path, default=None, help="the GGUF the model was dequantized from")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import gguf

    from edgemed.artifacts import read_manifest
    from edgemed.export.gguf import export_gguf
    from edgemed.export.imatrix import default_calibration
    from edgemed.manifest import save
    from edgemed.parity import run_parity

    cal = args.calibration or default_calibration(args.model)
    if cal is None:
        raise SystemExit("no calibration data: pass --calibration FILE")
    q = args.quant
    work = Path(tempfile.mkdtemp(prefix="quant-parts-"))
    rows = []
    try:
        for mode in ("uncalibrated", "calibrated"):
            folder = export_gguf(args.model, ["f16", q], work / mode, calibrate=mode == "calibrated",
                                 calibration=cal if mode == "calibrated" else None, calibration_samples=args.samples)
            qfile, f16 = folder / f"model-{q}.gguf", folder / "model-f16.gguf"
            if args.source_gguf and mode == "uncalibrated":
                identity = same_blocks(qfile, args.source_gguf)
            counts: dict[str, int] = {}
            for t in gguf.GGUFReader(qfile).tensors:
                name = gguf.GGMLQuantizationType(t.tensor_type).name
                counts[name] = counts.get(name, 0) + 1
            quantized = sorted(k for k in counts if k not in ("F32", "F16", "BF16"))
            for keep in [None, *([{k} for k in quantized] if len(quantized) > 1 else [])]:
                label = "all" if keep is None else f"only {next(iter(keep))}"
                target = work / f"{mode}-{label.replace(' ', '-')}"
                shutil.copytree(folder, target, ignore=shutil.ignore_patterns("model-*.gguf"))
                if keep is None:
                    shutil.copy(qfile, target / qfile.name)
                else:
                    variant(qfile, f16, keep, target / qfile.name)
                manifest = read_manifest(target, complete=False)  # measure the QUANT file alone
                manifest["models"] = {q: manifest["models"][q]}
                manifest["files"] = {k: v for k, v in (manifest.get("files") or {}).items() if k != f16.name}
                save(target, manifest)
                res = run_parity(target, reference=args.model, probes=args.probes, max_probes=args.max_probes,
                                 localise=False, n_threads=args.threads)
                m = next(r.metrics for r in res.rows if r.quant == q)
                n = sum(counts.values()) if keep is None else sum(counts[k] for k in keep)
                rows.append((label, mode, n, m.kl_mean, m.kl_p99, m.top1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"model {args.model}; {q}; calibration {cal}; {args.max_probes} held-out probes from {args.probes}")
    print("| tensors quantized (the rest f16) | calibration | tensors | KL mean | KL p99 | top-1 "
          "| calibration can act |")
    print("|---|---|---|---|---|---|---|")
    for label, mode, n, kl, p99, top1 in sorted(rows, key=lambda r: (r[0] != "all", r[0], r[1] != "uncalibrated")):
        acts = "-" if label == "all" else ("no" if label.split()[-1] in UNWEIGHTED else "yes")
        print(f"| {label} | {mode} | {n} | {kl:.4f} | {p99:.3f} | {top1:.1%} | {acts} |")
    if args.source_gguf:
        print(f"uncalibrated {q} against {args.source_gguf.name}:")
        for k, (n, share) in identity.items():
            print(f"  {k}: {n} tensors, {share:.1%} of blocks byte-identical")
    by = {(r[0], r[1]): r[3] for r in rows}
    for label in dict.fromkeys(r[0] for r in rows):
        u, c = by.get((label, "uncalibrated")), by.get((label, "calibrated"))
        if u and c:
            print(f"{label}: calibrated KL mean {100 * (1 - c / u):+.0f}% lower than uncalibrated")


if __name__ == "__main__":
    main()
