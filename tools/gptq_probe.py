"""Experiment (not an edgemed option yet): GPTQ-style error feedback at llama.cpp's block size.

Writes a copy of a calibrated `edgemed export gguf` folder whose text model is quantized again tensor by tensor,
at the type llama.cpp chose, block by block with ggml's own kernel (``ggml_quant.quantize``), and after each block
the block's rounding error is compensated in the columns not yet rounded (Frantar et al. 2022, "GPTQ",
arXiv 2210.17323, with its lazy-batch update done one quantization block at a time: no compensation inside a
block, since a k-quant's scales are chosen for the whole block). The update uses the full covariance of each
layer's inputs, H = X^T X / N, collected in PyTorch on the calibration data (the run's training data with its
images by default), where the importance matrix is only its diagonal. Damping: H + damp * mean(diag H) * I.

Rounding a slice of a row gives the bytes rounding the whole row gives for every k-quant, weighted or not, and for
the legacy blocks without a matrix (checked for q4_k, q6_k, q3_k, iq4_xs, q5_0, q4_0, q8_0); a weighted legacy
block (q5_0 with a matrix) uses the row's mean square, so under ``--scope all`` those blocks differ slightly from
llama.cpp's weighting. Private helpers of edgemed.export are used on purpose: this is a probe of an idea.

    edgemed export gguf MODEL --quant f16 --out F16
    edgemed export gguf MODEL --quant q4_k_m --no-calibration --out NOCAL
    edgemed export gguf MODEL --quant q4_k_m --out CAL                  # the imatrix and provenance to copy
    python tools/gptq_probe.py MODEL NOCAL F16/model-f16.gguf CAL OUT [--data FILE] [--damp 0.1]
    edgemed parity OUT --probes HELD_OUT.jsonl --max-probes 288 --threads 1
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from edgemed.archs import arch_for_dir
from edgemed.backends.pytorch import TorchBackend
from edgemed.data import TextRecord, load_image
from edgemed.export import imatrix as im
from edgemed.export.ggml_quant import quantize, weighs, writer_like
from edgemed.export.gguf_tensors import Checkpoint, plan_tensors
from edgemed.export.gguf_text import load_config

T = gguf.GGMLQuantizationType


def collect_grams(model_dir: Path, data: Path, samples: int) -> dict[str, np.ndarray]:
    """GGUF tensor name -> mean input covariance (float64), from the calibration records with their images."""
    ckpt = Checkpoint(model_dir)
    plan = plan_tensors(arch_for_dir(model_dir), load_config(model_dir), ckpt, "text")
    records, _ = im.read_calibration(data, samples)
    system = im.run_system_prompt(model_dir)
    be = TorchBackend(model_dir, device="cpu")
    names = im._module_names(be.model, ckpt, plan)
    mods = dict(be.model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(mn: str):
        def pre(_m, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[mn] = sums.get(mn, 0) + x.T @ x
            counts[mn] = counts.get(mn, 0) + x.shape[0]
        return pre

    hooks = [mods[n].register_forward_pre_hook(hook(n)) for n, g in names.items() if g != ["token_embd.weight"]]
    try:
        for r in records:
            if isinstance(r, TextRecord):
                seq, image = be.tokenize(r.text)[: im.MAX_TOKENS], None
            else:
                image = load_image(r.image) if r.image is not None and be.is_vision else None
                seq = be.tokenize(be.render(r.question, image=image is not None, system=r.system or system)
                                  + r.answer)[: im.MAX_TOKENS]
            with torch.inference_mode():
                be.logits(seq, image)
    finally:
        for h in hooks:
            h.remove()
        be.close()
    return {g: (sums[m] / counts[m]).numpy() for m in sums for g in names[m]}


def gptq_quantize(w: np.ndarray, h: np.ndarray, qt: T, imat: np.ndarray | None, damp: float) -> np.ndarray:
    """Bytes of ``w`` (rows x n) at ``qt``, rounded block by block with the error fed forward through ``h``."""
    rows, n = w.shape
    b = gguf.GGML_QUANT_SIZES[qt][0]
    H = torch.from_numpy(np.array(h, np.float64))
    d = torch.diagonal(H).clone()
    dead = d <= 0
    H[dead, dead] = 1.0  # a column no input reached: any value is as good
    H += damp * float(d.mean()) * torch.eye(n, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    W = torch.from_numpy(w.astype(np.float64))
    out = []
    for i in range(0, n, b):
        blk = W[:, i:i + b].float().numpy()
        qb = quantize(blk, qt, None if imat is None else imat[i:i + b], 2)
        out.append(qb.reshape(rows, -1))
        if i + b < n:  # fixing the block's delta D, the rest moves by -D U_bb^-1 U_br (GPTQ's update, per block)
            delta = torch.from_numpy(blk.astype(np.float64) - gguf.quants.dequantize(qb, qt).reshape(rows, b))
            W[:, i + b:] -= delta @ torch.linalg.solve_triangular(U[i:i + b, i:i + b], U[i:i + b, i + b:], upper=True)
    return np.concatenate(out, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("nocal", type=Path, help="uncalibrated export folder (llama.cpp's tensor types)")
    ap.add_argument("f16", type=Path, help="the model's f16 GGUF file")
    ap.add_argument("cal", type=Path, help="calibrated export folder (copied: manifest, imatrix, mmproj)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--data", type=Path, help="calibration data (default: the run's training data)")
    ap.add_argument("--samples", type=int, default=im.MAX_SAMPLES)
    ap.add_argument("--damp", type=float, default=0.1)
    ap.add_argument("--scope", default="k-quants", help="which types also get the importance matrix")
    a = ap.parse_args()
    t0 = time.time()
    data = a.data or im.default_calibration(a.model)
    if data is None:
        ap.error(f"{a.model} has no run's training data; give --data FILE")
    grams = collect_grams(a.model, data, a.samples)
    print(f"input covariances of {len(grams)} tensors: {time.time() - t0:.0f} s", flush=True)
    cal = im.read_imatrix(a.cal / im.IMATRIX_FILE)
    q = gguf.GGUFReader(a.nocal / f"model-{a.quant}.gguf")
    f = {t.name: t for t in gguf.GGUFReader(a.f16).tensors}
    if a.out.exists():
        shutil.rmtree(a.out)
    shutil.copytree(a.cal, a.out)
    dst = a.out / f"model-{a.quant}.gguf"
    dst.unlink()
    w = writer_like(q, dst)
    done = 0
    for t in q.tensors:
        qt = T(t.tensor_type)
        if qt in (T.F32, T.F16, T.BF16) or t.name not in f:
            w.write_tensor_data(np.asarray(t.data))
            continue
        n = int(t.shape[0])
        src = np.asarray(f[t.name].data, np.float32).reshape(math.prod(int(x) for x in t.shape[1:]), n)
        imat = cal.matrices.get(t.name) if weighs(a.scope, qt.name) else None
        if t.name in grams:
            qb, done = gptq_quantize(src, grams[t.name], qt, imat, a.damp), done + 1
        else:
            qb = quantize(src, qt, imat, 2)
        assert qb.nbytes == int(t.n_bytes), (t.name, qb.nbytes, t.n_bytes)
        w.write_tensor_data(qb.reshape(-1))
    w.close()
    print(f"{dst}: {done} tensors with error feedback (damp {a.damp}), {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
