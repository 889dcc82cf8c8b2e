"""A low-rank correction of a quantized base's rounding error, carried in the run's llama.cpp adapter file.

An adapter export keeps the fine-tune's LoRA change in f16 beside a 4-bit base, but the base's own rounding
error remains: at q4_0 it is large enough on a small model to fail parity, LoRA or not. This is the LQER
construction (Zhang et al. 2024, "LQER: Low-Rank Quantization Error Reconstruction for LLMs", arXiv 2402.02446):
for each quantized weight W (GGUF layout, out x in) with dequantized copy Q, the error E = W - Q is
approximated by U V of rank k, weighted by the activations that reach it. With s = sqrt(imatrix) per input
column (the mean square of that column's inputs over calibration data, the same matrices calibrated quantization
uses), the rank-k U V that minimises ``||(E - U V) diag(s)||_F`` (the expected output error for such inputs) is
the truncated SVD of ``E diag(s)``, with V scaled back by ``1/s``. Without calibration data s = 1.

llama.cpp applies an adapter tensor pair as ``W x + alpha / r * B (A x)`` with r read per tensor from A's rows,
so the run's LoRA pair (scale alpha/r_lora) and the correction (scale 1) are stacked into one pair of rank
r_lora + k per tensor, and B is pre-multiplied so that llama.cpp's per-tensor scale gives exactly that sum.
The SVD is torch's randomised ``svd_lowrank`` (Halko et al.): one decomposition per matrix, no matrix held twice.
The dequantization is gguf-py's (llama.cpp's own reference formulas in numpy), so the error is the one the file
really holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgemed.errors import ExportError

FILE_ALPHA = 1.0  # the adapter file's alpha once corrections are stacked in: scales are folded into B


def correction(w: Any, q: Any, imatrix: Any | None, rank: int, seed: int = 0) -> tuple[Any, Any]:
    """U [out, k], V [k, in] (float32 numpy) with ``U @ V`` close to ``w - q`` on inputs weighted by ``imatrix``."""
    import numpy as np
    import torch

    e = torch.from_numpy(np.asarray(w, np.float32) - np.asarray(q, np.float32))
    s = None
    if imatrix is not None:
        im = torch.from_numpy(np.asarray(imatrix, np.float32)).clamp_min(0)
        # columns never reached get the mean weight, not zero: a zero would leave them uncorrected and divide by 0
        s = torch.sqrt(im + max(float(im.mean()), 1e-12) * 1e-3)
        e = e * s
    k = min(rank, *e.shape)
    gen = torch.random.fork_rng()  # deterministic bytes for the same inputs (the manifest binds files by sha256)
    with gen:
        torch.manual_seed(seed)
        u, sig, v = torch.svd_lowrank(e, q=min(k + 8, *e.shape), niter=4)
    u, sig, v = u[:, :k], sig[:k], v[:, :k]
    big_u = (u * sig).numpy()
    vt = v.T
    if s is not None:
        vt = vt / s
    return np.ascontiguousarray(big_u, np.float32), np.ascontiguousarray(vt.numpy(), np.float32)


def stack(lora: tuple[Any, Any, float] | None, corr: tuple[Any, Any] | None) -> tuple[Any, Any]:
    """One (A [r, in], B [out, r]) pair for the file whose llama.cpp scale ``FILE_ALPHA / r`` reproduces
    ``lora_scale * B_lora A_lora + U V``; ``lora`` is (A, B, scale)."""
    import numpy as np

    a_parts, b_parts = [], []
    if lora is not None:
        a, b, scale = lora
        a_parts.append(a)
        b_parts.append(b * scale)
    if corr is not None:
        u, v = corr
        a_parts.append(v)
        b_parts.append(u)
    if not a_parts:
        raise ExportError("nothing to stack: neither a LoRA pair nor a correction")
    a = np.concatenate(a_parts, 0)
    b = np.concatenate(b_parts, 1)
    r = a.shape[0]
    return a.astype(np.float32), (b * (r / FILE_ALPHA)).astype(np.float32)


def corrections(source_f16: Path, quantized: Path, imatrix: dict[str, Any] | None, rank: int,
                names: set[str] | None = None) -> dict[str, tuple[Any, Any]]:
    """Per quantized 2-D tensor of ``quantized`` (optionally only ``names``): its (U, V) against the f16 file
    llama.cpp quantized it from. Tensors llama.cpp left in f16/f32 need none and get none; so do the token
    embedding and the output head, which llama.cpp's adapter loader does not apply (and q4_0 keeps at q6_k)."""
    import gguf
    import numpy as np
    from tqdm import tqdm

    T = gguf.GGMLQuantizationType
    f = {t.name: t for t in gguf.GGUFReader(source_f16).tensors}
    out: dict[str, tuple[Any, Any]] = {}
    todo = [t for t in gguf.GGUFReader(quantized).tensors
            if len(t.shape) == 2 and T(t.tensor_type) not in (T.F32, T.F16, T.BF16) and t.name.startswith("blk.")
            and (names is None or t.name in names)]
    for t in tqdm(todo, desc=f"rank-{rank} correction of {quantized.stem}", unit="tensor", leave=False):
        if t.name not in f:
            raise ExportError(f"{quantized.name}: tensor {t.name} is not in {source_f16.name}")
        src = f[t.name]
        w = np.asarray(gguf.quants.dequantize(src.data, T(src.tensor_type)), np.float32)
        q = np.asarray(gguf.quants.dequantize(t.data, T(t.tensor_type)), np.float32)
        out[t.name] = correction(w.reshape(q.shape), q, (imatrix or {}).get(t.name), rank)
    return out
